"""The demo workflow through the SLURM profile on a real single-node SLURM cluster."""

import filecmp

import pytest

from slurm_cluster import Cluster, unavailable_reason
from workflow_helpers import REPO, TINY, snakemake, truncated_stack_config, write_config

pytestmark = pytest.mark.workflow

FAST_STATUS = [
    "--slurm-init-seconds-before-status-checks",
    "1",
    "--seconds-between-status-checks",
    "2",
]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    c = Cluster(tmp_path_factory.mktemp("slurm"))
    try:
        c.start()
        yield c
    finally:
        c.stop()


def _outputs(folder):
    root = folder / "results"
    return sorted(
        p.relative_to(root)
        for p in root.rglob("*")
        if p.is_file() and p.parts[len(root.parts)] in ("demo", "particles")
    )


def test_demo_through_slurm_equals_local_run(cluster, tmp_path):
    on_slurm, local = tmp_path / "slurm", tmp_path / "local"
    for folder in (on_slurm, local):
        folder.mkdir()
        write_config(folder, TINY)
    snakemake(
        on_slurm,
        "--profile",
        str(REPO / "workflow/profiles/slurm"),
        *FAST_STATUS,
        configfile=on_slurm / "config.yaml",
    )
    snakemake(local, configfile=local / "config.yaml")

    ran = [j for j in cluster.jobs() if j.get("WorkDir") == str(on_slurm)]
    assert {j["Comment"] for j in ran} == {"rule_simulate_particles", "rule_preprocess"}
    assert all(j["JobState"] == "COMPLETED" for j in ran)

    files = _outputs(on_slurm)
    assert files == _outputs(local) and len(files) > 5
    for f in files:
        assert filecmp.cmp(on_slurm / "results" / f, local / "results" / f, shallow=False), f


@pytest.mark.slow
def test_likelihood_jobs_run_as_one_slurm_array(cluster, tmp_path):
    import copy

    from test_reruns import SMALL

    config = copy.deepcopy(SMALL)
    config["stages"] = ["preprocess", "likelihood"]
    configfile = write_config(tmp_path, config)
    # the inputs first, so that every likelihood job is ready at once: jobs that become
    # ready in different scheduling rounds go into different arrays
    inputs = [f"results/particles/fft/particles_fourier_stack_00000{i}.npy" for i in (0, 1)]
    for targets in ([*inputs, "results/templates/template_file_list.npy"], []):
        snakemake(
            tmp_path,
            "--profile",
            str(REPO / "workflow/profiles/slurm"),
            *FAST_STATUS,
            *targets,
            configfile=configfile,
        )
    ran = [j for j in cluster.jobs() if j.get("WorkDir") == str(tmp_path)]
    tasks = [j for j in ran if j["Comment"].startswith("rule_likelihood_wildcards")]
    assert len(tasks) == 4  # 2 structures x 2 stacks
    assert len({j["ArrayJobId"] for j in tasks}) == 1 and all(j.get("ArrayTaskId") for j in tasks)
    assert all(j["JobState"] == "COMPLETED" for j in ran)
    assert (tmp_path / "results/likelihood/likelihood_matrix.npy").is_file()


@pytest.mark.slow
def test_failed_job_shows_its_error_line_through_slurm(cluster, tmp_path, demo_particles):
    out = snakemake(
        tmp_path,
        "--profile",
        str(REPO / "workflow/profiles/slurm"),
        *FAST_STATUS,
        configfile=truncated_stack_config(tmp_path, demo_particles),
        check=False,
    )
    text = out.stdout + out.stderr
    assert out.returncode != 0
    error = [x for x in text.splitlines() if x.startswith("cryomatch: error:")]
    assert len(error) == 1, text
    assert "particles.mrcs: truncated MRC file" in error[0]
    assert error[0].endswith("[log: results/logs/preprocess.log]")
    assert "    input:" not in text  # no file lists
