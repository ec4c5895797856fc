"""The Snakemake workflow end to end on a tiny demo config: outputs, reruns, config errors."""

import copy

import pytest

from workflow_helpers import TINY, planned_jobs, snakemake, write_config

pytestmark = pytest.mark.workflow


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
