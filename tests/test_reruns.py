"""A small run of every stage: only stale outputs are rebuilt, and the report holds every plot."""

import copy
import shutil
import zipfile

import pytest

from workflow_helpers import planned_jobs, snakemake, write_config

pytestmark = pytest.mark.workflow

SMALL = {
    "stages": ["preprocess", "likelihood", "classify2d", "tomo", "subtomo"],
    "demo": {
        "seed": 5,
        "particles": {
            "n": 24,
            "snr": 0.5,
            "box": 24,
            "pixel_size": 4.0,
            "n_structures": 2,
            "max_shift": 1.0,
            "optics_groups": 2,
        },
        "views": {"n": 40, "views": 2, "snr": 0.5, "box": 24, "pixel_size": 4.0, "max_shift": 1.0},
        "tiltseries": {
            "size": 32,
            "tilts": [-60, 60, 6],
            "max_shift": 3.0,
            "noise": 0.1,
            "tilt_axis": 2.0,
            "pixel_size": 10.0,
        },
        "subvolumes": {
            "n": 8,
            "snr": 0.5,
            "box": 24,
            "pixel_size": 8.0,
            "n_templates": 2,
            "max_angle": 4.0,
            "max_shift": 1.0,
            "tomogram": True,
        },
    },
    "preprocess": {"stack_size": 12},
    "likelihood": {
        "viewing_distance": 0.5,
        "max_displacement_pixels": 1.0,
        "n_displacements_x": 3,
        "n_displacements_y": 3,
    },
    "classify2d": {"classes": 2, "maxit": 2, "ou": 9, "xr": 1, "yr": 1},
    "tomo": {"refine": {"maxiter": 3}},
    "subtomo": {"chunk_size": 4, "max_shifts": [2, 2, 2]},
}
PLOTS = [
    "projections.png",
    "preview.png",
    "likelihood_differences.png",
    "ensemble_weights.png",
    "class_averages.png",
    "frc.png",
    "alignment.png",
    "refinement.png",
    "average_01.png",
]
STRUCTURES = [f"results/demo/particles/structures/structure_0{k}.mrc" for k in (1, 2)]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("reruns")
    config = copy.deepcopy(SMALL)
    config["likelihood"]["structures"] = STRUCTURES
    snakemake(folder, configfile=write_config(folder, config))
    return folder, config


def _changed(folder, config, edit, name):
    config = copy.deepcopy(config)
    edit(config)
    return planned_jobs(folder, write_config(folder, config, name))


def test_nothing_to_do_after_a_run(run):
    folder, config = run
    assert planned_jobs(folder, write_config(folder, config, "same.yaml")) == {}


def test_likelihood_parameter_reruns_only_likelihood_jobs(run):
    folder, config = run
    jobs = _changed(
        folder, config, lambda c: c["likelihood"].update(max_displacement_pixels=2.0), "ll.yaml"
    )
    # 2 structures x 2 stacks, then the gather and the reweighting of its matrix
    assert jobs == {"likelihood": 4, "likelihood_gather": 1, "reweight": 1, "all": 1}


def test_adding_a_structure_runs_only_its_jobs(run):
    folder, config = run
    shutil.copy(folder / STRUCTURES[1], folder / "third.mrc")
    jobs = _changed(
        folder, config, lambda c: c["likelihood"]["structures"].append("third.mrc"), "s3.yaml"
    )
    assert jobs == {
        "templates": 1,
        "template_list": 1,
        "likelihood": 2,
        "likelihood_gather": 1,
        "reweight": 1,
        "all": 1,
    }


def test_raising_maxit_runs_only_the_new_iterations(run):
    folder, config = run
    jobs = _changed(folder, config, lambda c: c["classify2d"].update(maxit=4), "maxit.yaml")
    assert jobs == {"classify2d_iteration": 2, "all": 1}


def test_subtomo_parameter_reruns_only_subtomo_jobs(run):
    folder, config = run
    jobs = _changed(folder, config, lambda c: c["subtomo"].update(method="pcc"), "pcc.yaml")
    assert jobs == {"subtomo_align": 2, "subtomo_merge": 1, "all": 1}  # 8 subvolumes, 4 a job


def test_report_holds_every_stages_plots(run):
    folder, config = run
    snakemake(folder, "--report", "report.zip", configfile=write_config(folder, config, "r.yaml"))
    with zipfile.ZipFile(folder / "report.zip") as report:
        names = report.namelist()
    missing = [p for p in PLOTS if not any(n.endswith(p) for n in names)]
    assert missing == []
