"""Running the Snakemake workflow from tests: in a temporary folder, with a small config."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

TINY = {
    "stages": ["preprocess"],
    "demo": {
        "seed": 3,
        "particles": {
            "n": 24,
            "snr": 0.5,
            "box": 24,
            "pixel_size": 4.0,
            "n_structures": 2,
            "max_shift": 2.0,
            "optics_groups": 2,
        },
    },
    "preprocess": {"stack_size": 10},
}


def write_config(folder: Path, config: dict, name: str = "config.yaml") -> Path:
    path = folder / name
    path.write_text(yaml.safe_dump(config))
    return path


def command(
    folder: Path, *args: str, configfile: Path | None = None, repo: Path = REPO
) -> list[str]:
    cmd = [str(BIN / "snakemake"), "-s", str(repo / "Snakefile"), "-d", str(folder), "--cores", "2"]
    if configfile is not None:
        cmd += ["--configfile", str(configfile)]
    return cmd + list(args)


def environment() -> dict[str, str]:
    """This interpreter's bin first on PATH (its python runs the jobs)."""
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}


def snakemake(
    folder: Path,
    *args: str,
    configfile: Path | None = None,
    check: bool = True,
    repo: Path = REPO,
):
    """Run snakemake on a checkout's Snakefile (this one by default) in ``folder``."""
    cmd = command(folder, *args, configfile=configfile, repo=repo)
    out = subprocess.run(cmd, capture_output=True, text=True, env=environment(), cwd=folder)
    if check and out.returncode != 0:
        raise AssertionError(f"snakemake failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
    return out


def planned_jobs(
    folder: Path, configfile: Path | None = None, repo: Path = REPO, *args: str
) -> dict[str, int]:
    """Rule -> number of jobs a dry run would execute (empty when nothing is to be done)."""
    out = snakemake(folder, "-n", *args, configfile=configfile, repo=repo)
    text = out.stdout + out.stderr
    if "Nothing to be done" in text:
        return {}
    table = text.split("Job stats:", 1)[1]
    jobs = {}
    for line in table.splitlines()[3:]:
        match = re.match(r"^(\S+)\s+(\d+)$", line.strip())
        if not match or match.group(1) == "total":
            break
        jobs[match.group(1)] = int(match.group(2))
    return jobs


def truncated_stack_config(folder: Path, demo_particles: Path) -> Path:
    """A config (written in ``folder``) of TINY whose particles' stack is cut in half."""
    import shutil

    data = folder / "in"
    data.mkdir()
    shutil.copy(demo_particles, data / "particles.star")
    raw = (demo_particles.parent / "particles.mrcs").read_bytes()
    (data / "particles.mrcs").write_bytes(raw[: len(raw) // 2])
    config = {**TINY, "particles": {"star": str(data / "particles.star"), "angpix": None}}
    return write_config(folder, config)
