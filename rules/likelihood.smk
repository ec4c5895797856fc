# Likelihood: polar Fourier stacks, templates per structure, one job per (i_template,
# stack), then the likelihood matrix and best poses over all structures.
import re

from cryomatch.stages.templates import unique_structure_names

LIKELIHOOD = config["likelihood"]
FFT = f"{OUT}/particles/fft"
TEMPLATES_DIR = f"{OUT}/templates"
LIKELIHOOD_DIR = f"{OUT}/likelihood"


# the structure files: the config's list, or the demo phantoms
STRUCTURES = LIKELIHOOD["structures"] or [
    f"{OUT}/demo/particles/structures/structure_{k:02d}.mrc"
    for k in range(1, config["demo"]["particles"]["n_structures"] + 1)
]
if not STRUCTURES:
    raise WorkflowError("likelihood.structures: the structure list is empty")
STRUCTURE_NAMES = unique_structure_names(STRUCTURES)
TEMPLATE_INDEX = list(range(len(STRUCTURES)))
TEMPLATE_FILES = [
    f"{TEMPLATES_DIR}/templates_fourier_{name}.npy" for name in STRUCTURE_NAMES
]
LIKELIHOOD_OUTPUTS = {
    "cross_correlation": "cross_correlation/cross_correlation_stack_{stack}.npy",
    "template": "optimal_pose/optimal_template_stack_{stack}.npy",
    "displacement_x": "optimal_pose/optimal_displacement_x_stack_{stack}.npy",
    "displacement_y": "optimal_pose/optimal_displacement_y_stack_{stack}.npy",
    "inplane_rotation": "optimal_pose/optimal_inplane_rotation_stack_{stack}.npy",
    "ll_integrated": "log_likelihood/log_likelihood_integrated_stack_{stack}.npy",
    "ll_optimal": "log_likelihood/log_likelihood_optimal_stack_{stack}.npy",
    "provenance": "provenance_stack_{stack}.json",
}
if LIKELIHOOD["full_cross_correlation"]:
    LIKELIHOOD_OUTPUTS["full"] = (
        "cross_correlation/cross_correlation_pose_stack_{stack}.npy"
    )
if LIKELIHOOD["refine"]:
    LIKELIHOOD_OUTPUTS["refined"] = "optimal_pose/refined_pose_stack_{stack}.npy"
DISPLACEMENT_FLAGS = {
    "max_displacement_pixels": "--max-displacement-pixels",
    "n_displacements_x": "--n-displacements-x",
    "n_displacements_y": "--n-displacements-y",
}


rule fourier_stack:
    input:
        star=f"{OUT}/particles/stack_{{stack}}.star",
        stack=f"{OUT}/particles/stack_{{stack}}.mrcs",
        code=code("fourier_stack"),
    output:
        npy=f"{FFT}/particles_fourier_stack_{{stack}}.npy",
        npz=f"{FFT}/particles_fourier_stack_{{stack}}.npz",
    log:
        f"{LOGS}/fourier_stack_{{stack}}.log",
    benchmark:
        f"{BENCH}/fourier_stack_{{stack}}.tsv"
    conda:
        conda_env(gpu_capable=True)
    threads: res("fourier_stack", "cpus_per_task")
    resources:
        **rule_resources("fourier_stack", gpu_capable=True),
    params:
        cryomatch=CRYOMATCH,
        out=lambda wildcards, output: os.path.dirname(output.npy),
        opts=cli_options(
            {**LIKELIHOOD, "backend": config["backend"]},
            {
                "resolution_factor": "--resolution-factor",
                "n_inplanes": "--n-inplanes",
                "transform": "--method",
                "backend": "--backend",
            },
        ),
    shell:
        "{params.cryomatch} fourier-stack --star {input.star} --out {params.out} {params.opts} > {log} 2>&1"


rule templates:
    input:
        structure=lambda wildcards: STRUCTURES[STRUCTURE_NAMES.index(wildcards.name)],
        grid=f"{FFT}/particles_fourier_stack_{STACKS[0]}.npy",
        code=code("templates"),
    output:
        npy=f"{TEMPLATES_DIR}/templates_fourier_{{name}}.npy",
        npz=f"{TEMPLATES_DIR}/templates_fourier_{{name}}.npz",
    log:
        f"{LOGS}/templates_{{name}}.log",
    benchmark:
        f"{BENCH}/templates_{{name}}.tsv"
    wildcard_constraints:
        name="|".join(re.escape(n) for n in STRUCTURE_NAMES),
    conda:
        conda_env(gpu_capable=True)
    threads: res("templates", "cpus_per_task")
    resources:
        **rule_resources("templates", gpu_capable=True),
    params:
        cryomatch=CRYOMATCH,
        out=lambda wildcards, output: os.path.dirname(output.npy),
        opts=cli_options(
            LIKELIHOOD,
            {
                "viewing_distance": "--viewing-distance",
                "atom_selection": "--atoms",
                "atom_sigma": "--atom-sigma",
            },
        ),
    shell:
        "{params.cryomatch} templates --structure {input.structure} --grid-from {input.grid} "
        "--out {params.out} --name {wildcards.name} {params.opts} > {log} 2>&1"


rule template_list:
    input:
        templates=TEMPLATE_FILES,
        code=code("templates"),
    output:
        f"{TEMPLATES_DIR}/template_file_list.npy",
    log:
        f"{LOGS}/template_list.log",
    benchmark:
        f"{BENCH}/template_list.tsv"
    conda:
        conda_env()
    threads: res("template_list", "cpus_per_task")
    resources:
        **rule_resources("template_list"),
    params:
        cryomatch=CRYOMATCH,
    shell:
        "{params.cryomatch} templates --list {input.templates} --out {output} > {log} 2>&1"


rule likelihood:
    input:
        fft=f"{FFT}/particles_fourier_stack_{{stack}}.npy",
        fft_meta=f"{FFT}/particles_fourier_stack_{{stack}}.npz",
        templates=lambda wildcards: TEMPLATE_FILES[int(wildcards.i)],
        templates_meta=lambda wildcards: f"{TEMPLATE_FILES[int(wildcards.i)][:-4]}.npz",
        code=code("likelihood"),
    output:
        **{
            key: f"{LIKELIHOOD_DIR}/template{{i}}/{path}"
            for key, path in LIKELIHOOD_OUTPUTS.items()
        },
    log:
        f"{LOGS}/likelihood_template{{i}}_stack_{{stack}}.log",
    benchmark:
        f"{BENCH}/likelihood_template{{i}}_stack_{{stack}}.tsv"
    wildcard_constraints:
        i=r"\d+",
    conda:
        conda_env(gpu_capable=True)
    threads: res("likelihood", "cpus_per_task")
    resources:
        **rule_resources("likelihood", gpu_capable=True),
    params:
        cryomatch=CRYOMATCH,
        # OUT of OUT/templateN/cross_correlation/FILE
        out=lambda wildcards, output: os.path.dirname(
            os.path.dirname(os.path.dirname(output.cross_correlation))
        ),
        opts=cli_options(
            {**LIKELIHOOD, "backend": config["backend"]},
            {
                **DISPLACEMENT_FLAGS,
                "use_prior_shifts": "--use-prior-shifts",
                "full_cross_correlation": "--full-cross-correlation",
                "refine": "--refine",
                "compression_tolerance": "--compression-tolerance",
                "ll_tolerance": "--ll-tolerance",
                "memory_mb": "--memory-mb",
                "atom_selection": "--atoms",
                "atom_sigma": "--atom-sigma",
                "backend": "--backend",
            },
        ),
    shell:
        "{params.cryomatch} likelihood --fourier-stack {input.fft} --templates {input.templates} "
        "--out {params.out} --i-template {wildcards.i} {params.opts} > {log} 2>&1"


rule likelihood_gather:
    input:
        results=[
            f"{LIKELIHOOD_DIR}/template{i}/{path.format(stack=stack)}"
            for i in TEMPLATE_INDEX
            for stack in STACKS
            for path in LIKELIHOOD_OUTPUTS.values()
        ],
        templates=TEMPLATE_FILES,
        stacks=expand(f"{OUT}/particles/stack_{{stack}}.star", stack=STACKS),
        code=code("likelihood_gather"),
    output:
        matrix=f"{LIKELIHOOD_DIR}/likelihood_matrix.npy",
        csv=f"{LIKELIHOOD_DIR}/likelihood_matrix.csv",
        star=f"{LIKELIHOOD_DIR}/best_poses.star",
        png=report(
            f"{LIKELIHOOD_DIR}/likelihood_differences.png",
            caption="../workflow/report/likelihood_differences.rst",
            category="Likelihood",
        ),
        displacements=f"{LIKELIHOOD_DIR}/displacements_set.npy",
    log:
        f"{LOGS}/likelihood_gather.log",
    benchmark:
        f"{BENCH}/likelihood_gather.tsv"
    conda:
        conda_env()
    threads: res("likelihood_gather", "cpus_per_task")
    resources:
        **rule_resources("likelihood_gather"),
    params:
        cryomatch=CRYOMATCH,
        out=lambda wildcards, output: os.path.dirname(output.matrix),
        opts=cli_options(LIKELIHOOD, DISPLACEMENT_FLAGS),
    shell:
        "{params.cryomatch} likelihood-gather --results {params.out} --templates {input.templates} "
        "--stacks {input.stacks} {params.opts} > {log} 2>&1"


rule reweight:
    input:
        matrix=rules.likelihood_gather.output.matrix,
        star=rules.likelihood_gather.output.star,
        templates=TEMPLATE_FILES,
        code=code("reweight"),
    output:
        weights=f"{LIKELIHOOD_DIR}/reweight/ensemble_weights.csv",
        png=report(
            f"{LIKELIHOOD_DIR}/reweight/ensemble_weights.png",
            caption="../workflow/report/ensemble_weights.rst",
            category="Likelihood",
        ),
        posterior=f"{LIKELIHOOD_DIR}/reweight/structure_posterior.npy",
        posterior_csv=f"{LIKELIHOOD_DIR}/reweight/structure_posterior.csv",
    log:
        f"{LOGS}/reweight.log",
    benchmark:
        f"{BENCH}/reweight.tsv"
    conda:
        conda_env()
    threads: res("reweight", "cpus_per_task")
    resources:
        **rule_resources("reweight"),
    params:
        cryomatch=CRYOMATCH,
        out=lambda wildcards, output: os.path.dirname(output.weights),
        opts=cli_options(
            LIKELIHOOD.get("reweight", {}),
            {
                "alpha": "--alpha",
                "samples": "--samples",
                "burn_in": "--burn-in",
                "interval": "--interval",
                "seed": "--seed",
            },
        ),
    shell:
        "{params.cryomatch} reweight --matrix {input.matrix} --star {input.star} "
        "--templates {input.templates} --out {params.out} {params.opts} > {log} 2>&1"


TARGETS["likelihood"] = [
    *rules.likelihood_gather.output,
    *rules.reweight.output,
    *rules.template_list.output,
]
