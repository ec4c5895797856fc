"""The classify2d rules: one job per iteration, raising maxit runs only the new ones, and
after SPARX's automatic stop the remaining iterations copy the converged one."""

from __future__ import annotations

import filecmp
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def _snakemake(tmp_path, maxit, *extra):
    config = {
        "output_dir": str(tmp_path / "results"),
        "stages": ["classify2d"],
        "demo": {
            "views": {
                "n": 90,
                "views": 3,
                "snr": 0.5,
                "box": 48,
                "pixel_size": 3.0,
                "max_shift": 1.0,
            }
        },
        "classify2d": {"classes": 3, "maxit": maxit, "ou": 18, "xr": 1, "yr": 1},
    }
    configfile = tmp_path / f"config{maxit}.yaml"
    configfile.write_text(yaml.safe_dump(config))
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "snakemake",
            "--snakefile",
            str(REPO / "Snakefile"),
            "--directory",
            str(tmp_path),
            "--cores",
            "2",
            "--configfile",
            str(configfile),
            *extra,
        ],
        capture_output=True,
        text=True,
        check=False,
    )


def _jobs(output: str) -> dict[str, int]:
    table = output.split("Job stats:")[1].split("\n\n")[0]
    return {m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)$", table, re.M)}


@pytest.mark.slow
@pytest.mark.workflow
def test_iterations_are_jobs_and_raising_maxit_runs_only_new_ones(tmp_path):
    planned = _snakemake(tmp_path, 2, "--dry-run")
    assert planned.returncode == 0, planned.stderr
    assert _jobs(planned.stdout) == {
        "simulate_views": 1,
        "classify2d_initial": 1,
        "classify2d_iteration": 2,
        "all": 1,
        "total": 5,
    }
    done = _snakemake(tmp_path, 2)
    assert done.returncode == 0, done.stderr
    folder = tmp_path / "results" / "classify2d"
    assert sorted(p.name for p in folder.iterdir()) == ["iter000", "iter001", "iter002"]
    assert (tmp_path / "results" / "logs" / "classify2d" / "iter002.log").is_file()
    more = _snakemake(tmp_path, 3, "--dry-run")
    assert more.returncode == 0, more.stderr
    assert _jobs(more.stdout) == {"classify2d_iteration": 1, "all": 1, "total": 2}
    # up to 10 iterations (maxit 0): the run stops by itself, later jobs copy the last one
    done = _snakemake(tmp_path, 0)
    assert done.returncode == 0, done.stderr
    state = json.loads((folder / "iter010" / "convergence.json").read_text())
    assert state["converged"] and state["iteration"] == 10
    last = state["converged_at"]
    assert 2 < last < 10
    for f in ("particles.star", "class_averages.mrcs", "classes.csv"):
        assert filecmp.cmp(folder / f"iter{last:03d}" / f, folder / "iter010" / f, shallow=False)
    log = (tmp_path / "results" / "logs" / "classify2d" / "iter010.log").read_text()
    assert f"converged at iteration {last}; its outputs copied" in log
    assert "criterion" in (tmp_path / "results" / "logs" / "classify2d" / "iter002.log").read_text()
