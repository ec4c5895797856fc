"""The Snakemake workflow end to end on a tiny demo config: outputs, reruns, config errors."""

import copy
import os
import shutil
import signal
import subprocess
import time
import zipfile

import pytest

from cryomatch.io.mrc import read_images
from workflow_helpers import REPO, TINY, command, environment, planned_jobs, snakemake, write_config

pytestmark = pytest.mark.workflow
IGNORE = shutil.ignore_patterns("*.egg-info", "__pycache__")


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("wf")
    config = write_config(folder, TINY)
    snakemake(folder, configfile=config)
    return folder, config


def test_outputs_logs_and_benchmarks(finished_run):
    folder, _ = finished_run
    particles = folder / "results/particles"
    assert sorted(p.name for p in particles.glob("*.mrcs")) == [
        f"stack_00000{i}.mrcs" for i in range(3)
    ]
    assert (particles / "particles.star").is_file()
    for rule in ("simulate_particles", "preprocess"):
        assert (folder / f"results/logs/{rule}.log").is_file()
        assert (folder / f"results/benchmarks/{rule}.tsv").is_file()
    assert not list(folder.rglob(".*.tmp-*"))


def test_second_run_has_nothing_to_do(finished_run):
    folder, config = finished_run
    assert planned_jobs(folder, config) == {}


def test_preprocess_parameter_reruns_only_preprocess(finished_run):
    folder, _ = finished_run
    changed = copy.deepcopy(TINY)
    changed["preprocess"]["invert"] = True
    assert planned_jobs(folder, write_config(folder, changed, "changed.yaml")) == {
        "preprocess": 1,
        "all": 1,
    }


def test_demo_parameter_reruns_simulation_and_what_follows(finished_run):
    folder, _ = finished_run
    changed = copy.deepcopy(TINY)
    changed["demo"]["particles"]["snr"] = 0.25
    jobs = planned_jobs(folder, write_config(folder, changed, "snr.yaml"))
    assert jobs == {"simulate_particles": 1, "preprocess": 1, "all": 1}


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"preprocess": {"stack_size": 10, "foo": 1}}, "'foo' was unexpected"),
        ({"demo": {"particles": {"n": "many"}}}, "'many' is not of type 'integer'"),
        ({"colour": "blue"}, "'colour' was unexpected"),
        ({"resources": {"preprocesss": {"mem_mb": 100}}}, "unknown rule(s) preprocesss"),
    ],
)
def test_bad_config_fails_before_any_job(tmp_path, bad, message):
    out = snakemake(tmp_path, configfile=write_config(tmp_path, bad), check=False)
    assert out.returncode != 0
    assert message in out.stdout + out.stderr
    assert not (tmp_path / "results").exists()


def test_report_holds_the_plots_with_captions(finished_run):
    folder, config = finished_run
    snakemake(folder, "--report", "report.zip", configfile=config)
    with zipfile.ZipFile(folder / "report.zip") as report:
        names = report.namelist()
        html = report.read(next(n for n in names if n.endswith("report.html"))).decode()
    for plot in ("projections.png", "preview.png"):
        assert any(n.endswith(plot) for n in names), plot
    assert "The first 16 particle images after preprocessing" in html


def test_editing_package_code_reruns_the_rules_that_use_it(tmp_path):
    repo = tmp_path / "checkout"  # a copy of the workflow and package, to edit
    repo.mkdir()
    for part in ("Snakefile", "rules", "config", "envs", "workflow", "lib"):
        copy_part = shutil.copytree if (REPO / part).is_dir() else shutil.copy
        copy_part(REPO / part, repo / part, **({"ignore": IGNORE} if part == "lib" else {}))
    run = tmp_path / "run"
    run.mkdir()
    config = write_config(run, TINY)
    snakemake(run, configfile=config, repo=repo)
    assert planned_jobs(run, config, repo) == {}
    with open(repo / "lib/cryomatch/stages/preprocess.py", "a") as f:
        f.write("\n# an edit\n")
    assert planned_jobs(run, config, repo) == {"preprocess": 1, "all": 1}
    with open(repo / "lib/cryomatch/kernels/phantom.py", "a") as f:  # used by the simulator only
        f.write("\n# an edit\n")
    jobs = planned_jobs(run, config, repo)
    assert jobs == {"simulate_particles": 1, "preprocess": 1, "all": 1}


def test_killed_job_leaves_nothing_taken_as_complete(tmp_path):
    big = copy.deepcopy(TINY)
    big["demo"]["particles"].update(n=3000, box=64)
    big["preprocess"].update(stack_size=500, batch_size=20)
    config = write_config(tmp_path, big)
    particles = tmp_path / "results/particles"
    job = subprocess.Popen(
        command(tmp_path, configfile=config),
        cwd=tmp_path,
        env=environment(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.time() + 120
    while time.time() < deadline and not (
        (particles / "stack_000000.mrcs").exists() and list(particles.glob(".stack_*.tmp-*"))
    ):
        time.sleep(0.05)
    os.killpg(job.pid, signal.SIGKILL)  # the run dies while a later stack is being written
    job.wait()
    assert (particles / "stack_000000.mrcs").exists(), "the run ended before preprocess wrote"
    assert not (particles / "particles.star").exists()
    snakemake(tmp_path, "--unlock", configfile=config)  # the killed run held the lock
    dry = snakemake(tmp_path, "-n", configfile=config, check=False)
    assert "Nothing to be done" not in dry.stdout + dry.stderr
    jobs = planned_jobs(tmp_path, config, REPO, "--rerun-incomplete")
    assert jobs == {"preprocess": 1, "all": 1}
    snakemake(tmp_path, "--rerun-incomplete", configfile=config)
    stacks = sorted(particles.glob("stack_*.mrcs"))
    assert [read_images(s).shape[0] for s in stacks] == [500] * 6
