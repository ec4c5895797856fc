# cryomatch workflow: config and schema validation, the rules of each stage, the targets.
# Every rule body is one call of the `cryomatch` command (lib/cryomatch).
import os

from snakemake.utils import min_version, validate

min_version("9.0")


# Defaults (the demo) from this checkout; --configfile/--config override any key.
configfile: os.path.join(workflow.basedir, "config", "config.yaml")


validate(config, "config/schema.yaml")


report: "workflow/report/workflow.rst"


include: "rules/common.smk"
include: "rules/simulate.smk"
include: "rules/preprocess.smk"
include: "rules/likelihood.smk"
include: "rules/classify2d.smk"
include: "rules/tomo.smk"
include: "rules/subtomo.smk"
include: "rules/particle_series.smk"


check_resources()


onstart:
    record_lock_owner()


# A failed run ends with each failed job's one-line error and its log.
onerror:
    print_failures(LOGS, STARTED)


rule all:
    default_target: True
    input:
        stage_targets(),
