# Likelihood: polar Fourier stacks, templates per structure (and per group of frames of
# each ensemble), one job per (i_template, stack) (per group of frames and stack for
# ensembles), then the likelihood matrix and best poses over all structures, and the
# ensemble reweighting of that matrix.
import re

from cryomatch.io.structures import count_frames, selected_frames
from cryomatch.stages.templates import (
    frame_name,
    structure_name,
    unique_structure_names,
)

LIKELIHOOD = config["likelihood"]
FFT = f"{OUT}/particles/fft"
TEMPLATES_DIR = f"{OUT}/templates"
LIKELIHOOD_DIR = f"{OUT}/likelihood"
ENSEMBLES = LIKELIHOOD.get("ensembles") or []
FRAMES_PER_JOB = LIKELIHOOD.get("frames_per_job", 50)


# the structure files: the config's list, or the demo phantoms (when no ensemble is given)
STRUCTURES = LIKELIHOOD["structures"] or (
    []
    if ENSEMBLES
    else [
        f"{OUT}/demo/particles/structures/structure_{k:02d}.mrc"
        for k in range(1, config["demo"]["particles"]["n_structures"] + 1)
    ]
)
STRUCTURE_NAMES = unique_structure_names(STRUCTURES)
# one template set (one i_template) per structure, then per selected frame of each ensemble;
# an ensemble's template sets are made in jobs of FRAMES_PER_JOB frames, each writing one
# folder (TEMPLATE_INPUTS: the file or folder a likelihood job waits for)
TEMPLATE_FILES = [
    f"{TEMPLATES_DIR}/templates_fourier_{name}.npy" for name in STRUCTURE_NAMES
]
TEMPLATE_INPUTS = list(TEMPLATE_FILES)
ENSEMBLE_GROUPS = {}  # (name, group) -> (ensemble config, frames, first i_template)
for ensemble in ENSEMBLES:
    source = ensemble.get("trajectory") or ensemble["topology"]
    ens_name = ensemble.get("name") or structure_name(source)
    if ens_name in STRUCTURE_NAMES or any(k[0] == ens_name for k in ENSEMBLE_GROUPS):
        raise WorkflowError(
            f"likelihood.ensembles: the name {ens_name!r} is used twice"
        )
    frames = selected_frames(
        count_frames(ensemble["topology"], ensemble.get("trajectory")),
        ensemble.get("stride", 1),
        ensemble.get("frames"),
        source,
    )
    for group, lo in enumerate(range(0, len(frames), FRAMES_PER_JOB)):
        chunk = frames[lo : lo + FRAMES_PER_JOB]
        ENSEMBLE_GROUPS[(ens_name, f"{group:05d}")] = (
            ensemble,
            chunk,
            len(TEMPLATE_FILES),
        )
        folder = f"{TEMPLATES_DIR}/{ens_name}/frames_{group:05d}"
        for frame in chunk:
            name = frame_name(ens_name, frame)
            TEMPLATE_FILES.append(f"{folder}/templates_fourier_{name}.npy")
            TEMPLATE_INPUTS.append(folder)
if not TEMPLATE_FILES:
    raise WorkflowError("likelihood.structures: the structure list is empty")
TEMPLATE_INDEX = list(range(len(TEMPLATE_FILES)))
TEMPLATE_LIST = f"{TEMPLATES_DIR}/template_file_list.npy"
# wildcard constraints: exactly these names ("(?!)" matches nothing)
STRUCTURE_NAMES_RE = "|".join(re.escape(n) for n in STRUCTURE_NAMES) or "(?!)"
ENSEMBLE_NAMES_RE = "|".join(re.escape(k[0]) for k in ENSEMBLE_GROUPS) or "(?!)"
STRUCTURE_INDEX_RE = "|".join(str(i) for i in range(len(STRUCTURE_NAMES))) or "(?!)"
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
LIKELIHOOD_OPTIONS = cli_options(
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
)


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
        name=STRUCTURE_NAMES_RE,
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
                "symmetry": "--symmetry",
            },
        ),
    shell:
        "{params.cryomatch} templates --structure {input.structure} --grid-from {input.grid} "
        "--out {params.out} --name {wildcards.name} {params.opts} > {log} 2>&1"


rule templates_frames:
    input:
        topology=lambda wildcards: ENSEMBLE_GROUPS[
            (wildcards.ensemble, wildcards.group)
        ][0]["topology"],
        trajectory=lambda wildcards: [
            ENSEMBLE_GROUPS[(wildcards.ensemble, wildcards.group)][0].get("trajectory")
            or []
        ],
        grid=f"{FFT}/particles_fourier_stack_{STACKS[0]}.npy",
        code=code("templates"),
    output:
        directory(f"{TEMPLATES_DIR}/{{ensemble}}/frames_{{group}}"),
    log:
        f"{LOGS}/templates_{{ensemble}}_frames_{{group}}.log",
    benchmark:
        f"{BENCH}/templates_{{ensemble}}_frames_{{group}}.tsv"
    wildcard_constraints:
        ensemble=ENSEMBLE_NAMES_RE,
        group=r"\d+",
    conda:
        conda_env(gpu_capable=True)
    threads: res("templates", "cpus_per_task")
    resources:
        **rule_resources("templates", gpu_capable=True),
    params:
        cryomatch=CRYOMATCH,
        frames=lambda wildcards: " ".join(
            str(f) for f in ENSEMBLE_GROUPS[(wildcards.ensemble, wildcards.group)][1]
        ),
        source=lambda wildcards: cli_options(
            ENSEMBLE_GROUPS[(wildcards.ensemble, wildcards.group)][0],
            {"trajectory": "--trajectory", "selection": "--atom-filter"},
        ),
        opts=cli_options(
            LIKELIHOOD,
            {
                "viewing_distance": "--viewing-distance",
                "atom_selection": "--atoms",
                "atom_sigma": "--atom-sigma",
                "symmetry": "--symmetry",
            },
        ),
    shell:
        "{params.cryomatch} templates --topology {input.topology} {params.source} "
        "--frames {params.frames} --name {wildcards.ensemble} --grid-from {input.grid} "
        "--out {output} {params.opts} > {log} 2>&1"


rule template_list:
    input:
        templates=list(dict.fromkeys(TEMPLATE_INPUTS)),
        code=code("templates"),
    output:
        TEMPLATE_LIST,
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
        templates=lambda wildcards: TEMPLATE_INPUTS[int(wildcards.i)],
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
        i=STRUCTURE_INDEX_RE,
    conda:
        conda_env(gpu_capable=True)
    threads: res("likelihood", "cpus_per_task")
    resources:
        **rule_resources("likelihood", gpu_capable=True),
    params:
        cryomatch=CRYOMATCH,
        templates=lambda wildcards: TEMPLATE_FILES[int(wildcards.i)],
        # OUT of OUT/templateN/cross_correlation/FILE
        out=lambda wildcards, output: os.path.dirname(
            os.path.dirname(os.path.dirname(output.cross_correlation))
        ),
        opts=LIKELIHOOD_OPTIONS,
    shell:
        "{params.cryomatch} likelihood --fourier-stack {input.fft} --templates {params.templates} "
        "--out {params.out} --i-template {wildcards.i} {params.opts} > {log} 2>&1"


# an ensemble's frames: one job per (group of frames, stack), one rule per group
for (ens_name, group), (_, chunk, first) in ENSEMBLE_GROUPS.items():

    rule:
        name:
            f"likelihood_{re.sub(r'[^A-Za-z0-9_]', '_', ens_name)}_{group}"
        input:
            fft=f"{FFT}/particles_fourier_stack_{{stack}}.npy",
            fft_meta=f"{FFT}/particles_fourier_stack_{{stack}}.npz",
            templates=f"{TEMPLATES_DIR}/{ens_name}/frames_{group}",
            code=code("likelihood"),
        output:
            [
                f"{LIKELIHOOD_DIR}/template{i}/{path}"
                for i in range(first, first + len(chunk))
                for path in LIKELIHOOD_OUTPUTS.values()
            ],
        log:
            f"{LOGS}/likelihood_{ens_name}_frames_{group}_stack_{{stack}}.log",
        benchmark:
            f"{BENCH}/likelihood_{ens_name}_frames_{group}_stack_{{stack}}.tsv"
        conda:
            conda_env(gpu_capable=True)
        threads: res("likelihood", "cpus_per_task")
        resources:
            **rule_resources("likelihood", gpu_capable=True),
        params:
            cryomatch=CRYOMATCH,
            templates=" ".join(TEMPLATE_FILES[first : first + len(chunk)]),
            i=" ".join(str(i) for i in range(first, first + len(chunk))),
            out=LIKELIHOOD_DIR,
            opts=LIKELIHOOD_OPTIONS,
        shell:
            "{params.cryomatch} likelihood --fourier-stack {input.fft} --templates {params.templates} "
            "--out {params.out} --i-template {params.i} {params.opts} > {log} 2>&1"


rule likelihood_gather:
    input:
        results=[
            f"{LIKELIHOOD_DIR}/template{i}/{path.format(stack=stack)}"
            for i in TEMPLATE_INDEX
            for stack in STACKS
            for path in LIKELIHOOD_OUTPUTS.values()
        ],
        template_list=TEMPLATE_LIST,
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
        "{params.cryomatch} likelihood-gather --results {params.out} --template-list {input.template_list} "
        "--stacks {input.stacks} {params.opts} > {log} 2>&1"


rule reweight:
    input:
        matrix=rules.likelihood_gather.output.matrix,
        star=rules.likelihood_gather.output.star,
        template_list=TEMPLATE_LIST,
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
        "--template-list {input.template_list} --out {params.out} {params.opts} > {log} 2>&1"


TARGETS["likelihood"] = [
    *rules.likelihood_gather.output,
    *rules.reweight.output,
    *rules.template_list.output,
]
