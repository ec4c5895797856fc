# Shared helpers: output folder, package sources per stage, resources, targets.
import shlex
import sys
import time

from snakemake.exceptions import WorkflowError
from snakemake.settings.types import DeploymentMethod

# The package of this checkout, for the Snakefile and for every job (also in conda envs).
LIB = os.path.join(workflow.basedir, "lib")
sys.path.insert(0, LIB)
# Each job runs `{params.cryomatch} STAGE ... > {log} 2>&1`, with the interpreter that runs
# Snakemake (so an unactivated venv works), or the environment's python with --sdm conda.
# It is set in the shell prefix of every job, so that the rules' params (and reruns) do
# not depend on where the interpreter is.
PYTHON = (
    "python"
    if DeploymentMethod.CONDA in workflow.deployment_settings.deployment_method
    else shlex.quote(sys.executable)
)
shell.prefix(f"set -euo pipefail; CRYOMATCH_PYTHON={PYTHON}; ")
CRYOMATCH = (
    f"PYTHONPATH={shlex.quote(LIB)}${{PYTHONPATH:+:$PYTHONPATH}} "
    '"$CRYOMATCH_PYTHON" -m cryomatch'
)

from cryomatch.errors import CryomatchError
from cryomatch.workflow import (
    cli_options,
    count_particles,
    n_stacks,
    package_sources,
    print_failures,
    record_lock_owner,
    release_stale_lock,
)

OUT = config["output_dir"].rstrip("/")
LOGS = f"{OUT}/logs"
BENCH = f"{OUT}/benchmarks"
TARGETS = {}  # stage name -> files of that stage; each rules/*.smk adds its own
STARTED = time.time()

# After `kill -9` (or a crash) Snakemake's lock stays: remove it when its run (and its
# jobs) are dead.
if workflow.is_main_process and (message := release_stale_lock()):
    print(f"cryomatch: {message}", file=sys.stderr)


def code(module):
    """Package files a rule runs (edits to them rerun the rule)."""
    return package_sources(f"cryomatch.stages.{module}")


def res(rule_name, key):
    """A resource of a rule from config['resources'], falling back to 'default'."""
    table = config["resources"]
    return table.get(rule_name, {}).get(key, table["default"].get(key))


def rule_resources(rule_name, gpu_capable=False):
    """Resources of one rule from the config (memory, time, cores); a GPU request only for
    GPU-capable rules when the backend is cupy; SLURM partition and extra sbatch options
    where set. Used as ``**rule_resources(name)`` in a resources section."""
    out = {key: res(rule_name, key) for key in ("mem_mb", "runtime", "cpus_per_task")}
    if gpu_capable and config["backend"] == "cupy":
        out["gpu"] = max(1, res(rule_name, "gpus") or 0)
    for key in ("slurm_partition", "slurm_extra"):
        if res(rule_name, key):
            out[key] = res(rule_name, key)
    return out


def conda_env(gpu_capable=False):
    """The conda environment of a rule: with cupy for GPU-capable rules on backend cupy."""
    gpu = gpu_capable and config["backend"] == "cupy"
    return "../envs/cryomatch-gpu.yaml" if gpu else "../envs/cryomatch.yaml"


def check_resources():
    unknown = set(config["resources"]) - {"default"} - {r.name for r in workflow.rules}
    if unknown:
        raise WorkflowError(
            f"config resources: unknown rule(s) {', '.join(sorted(unknown))}"
        )


def stage_targets():
    return [f for stage in config["stages"] for f in TARGETS[stage]]


def particles_star():
    """The particle metadata the workflow starts from: the user's, or the demo's."""
    return config["particles"]["star"] or f"{OUT}/demo/particles/particles.star"


def _n_particles():
    star = config["particles"]["star"]
    if not star:
        return config["demo"]["particles"]["n"]
    try:
        drop = config["preprocess"].get("drop_duplicates")
        return count_particles(star, "drop" if drop else "error")
    except CryomatchError as exc:
        raise WorkflowError(f"particles.star: {exc}") from exc


STACKS = [
    f"{i:06d}"
    for i in range(n_stacks(_n_particles(), config["preprocess"]["stack_size"]))
]
