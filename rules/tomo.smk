# Tomography: demo tilt series, alignment and reconstruction, phase-matching refinement.
from cryomatch.stages.tomo.workflow import (
    model_options,
    series_inputs,
    series_options,
    tomo_series,
)

TOMO = f"{OUT}/tomo"
TOMO_CONFIG = config["tomo"]
DEMO_TILTSERIES = config["demo"]["tiltseries"]


TOMO_SERIES = tomo_series(TOMO_CONFIG, f"{DEMO}/tiltseries", DEMO_TILTSERIES)


rule simulate_tiltseries:
    input:
        code=code("simulate.tiltseries"),
    output:
        stack=f"{DEMO}/tiltseries/tiltseries.mrc",
        angles=f"{DEMO}/tiltseries/tiltseries.rawtlt",
        truth=f"{DEMO}/tiltseries/truth.csv",
    log:
        f"{LOGS}/simulate_tiltseries.log",
    benchmark:
        f"{BENCH}/simulate_tiltseries.tsv"
    conda:
        conda_env()
    threads: res("simulate_tiltseries", "cpus_per_task")
    resources:
        **rule_resources("simulate_tiltseries"),
    params:
        cryomatch=CRYOMATCH,
        out=lambda wildcards, output: os.path.dirname(output.stack),
        opts=cli_options(
            {**DEMO_TILTSERIES, "seed": config["demo"]["seed"]},
            {
                "size": "--size",
                "specimen": "--specimen",
                "tilts": "--tilts",
                "max_shift": "--max-shift",
                "noise": "--noise",
                "tilt_axis": "--tilt-axis",
                "pixel_size": "--pixel-size",
                "seed": "--seed",
            },
        ),
    shell:
        "{params.cryomatch} simulate tiltseries --out {params.out} {params.opts} > {log} 2>&1"


rule tomo_align:
    input:
        series=lambda wildcards: series_inputs(TOMO_SERIES[wildcards.name]),
        code=code("tomo.align"),
    output:
        shifts=f"{TOMO}/{{name}}/shifts.csv",
        xf=f"{TOMO}/{{name}}/{{name}}.xf",
        tlt=f"{TOMO}/{{name}}/{{name}}.tlt",
        aligned=f"{TOMO}/{{name}}/aligned.mrc",
        reconstruction=f"{TOMO}/{{name}}/reconstruction.mrc",
        summary=f"{TOMO}/{{name}}/alignment.json",
        points=f"{TOMO}/{{name}}/points.csv",
        model=f"{TOMO}/{{name}}/model.csv",
        png=report(
            f"{TOMO}/{{name}}/alignment.png",
            caption="../workflow/report/tomo_align.rst",
            category="Tomography",
        ),
    log:
        f"{LOGS}/tomo_align_{{name}}.log",
    benchmark:
        f"{BENCH}/tomo_align_{{name}}.tsv"
    wildcard_constraints:
        name="[^/]+",
    conda:
        conda_env(gpu_capable=True)
    threads: res("tomo_align", "cpus_per_task")
    resources:
        **rule_resources("tomo_align", gpu_capable=True),
    params:
        cryomatch=CRYOMATCH,
        out=lambda wildcards, output: os.path.dirname(
            os.path.dirname(os.path.dirname(output.shifts))
        ),
        stack=lambda wildcards: TOMO_SERIES[wildcards.name]["stack"],
        series=lambda wildcards: series_options(TOMO_SERIES[wildcards.name]),
        opts=cli_options(
            {
                **TOMO_CONFIG,
                **model_options(TOMO_CONFIG),
                "backend": config["backend"],
            },
            {
                "method": "--method",
                "bead_size": "--bead-size",
                "min_beads": "--min-beads",
                "max_beads": "--max-beads",
                "patch_size": "--patch-size",
                "patch_spacing": "--patch-spacing",
                "model_rotation": "--model-rotation",
                "model_tilt_angles": "--model-tilt-angles",
                "model_magnification": "--model-magnification",
                "max_residual": "--max-residual",
                "fit_tilt_axis": "--no-fit-tilt-axis",
                "tilt_axis_search": "--tilt-axis-search",
                "center_axis": "--no-center-axis",
                "start": "--start",
                "binning": "--binning",
                "thickness": "--thickness",
                "reconstruction": "--reconstruction",
                "sirt_iterations": "--sirt-iterations",
                "upsample_factor": "--upsample-factor",
                "xrange": "--xrange",
                "p": "--p",
                "nslices": "--nslices",
                "com_ref_index": "--com-ref-index",
                "cl_ref_index": "--cl-ref-index",
                "cl_resolution": "--cl-resolution",
                "cl_div_factor": "--cl-div-factor",
                "initial": "--initial",
                "iterations": "--iterations",
                "tolerance": "--tolerance",
                "smooth_degree": "--smooth-degree",
                "backend": "--backend",
            },
        ),
    shell:
        "{params.cryomatch} tomo-align --stack {params.stack} --out {params.out} --name {wildcards.name}"
        " {params.series} {params.opts} > {log} 2>&1"


rule tomo_refine:
    input:
        series=lambda wildcards: series_inputs(TOMO_SERIES[wildcards.name]),
        alignment=f"{TOMO}/{{name}}/alignment.json",
        shifts=f"{TOMO}/{{name}}/shifts.csv",
        code=code("tomo.refine"),
    output:
        shifts=f"{TOMO}/{{name}}/refined_shifts.csv",
        xf=f"{TOMO}/{{name}}/{{name}}_refined.xf",
        tlt=f"{TOMO}/{{name}}/{{name}}_refined.tlt",
        record=f"{TOMO}/{{name}}/refinement.csv",
        reconstruction=f"{TOMO}/{{name}}/refined_reconstruction.mrc",
        png=report(
            f"{TOMO}/{{name}}/refinement.png",
            caption="../workflow/report/tomo_refine.rst",
            category="Tomography",
        ),
    log:
        f"{LOGS}/tomo_refine_{{name}}.log",
    benchmark:
        f"{BENCH}/tomo_refine_{{name}}.tsv"
    wildcard_constraints:
        name="[^/]+",
    conda:
        conda_env(gpu_capable=True)
    threads: res("tomo_refine", "cpus_per_task")
    resources:
        **rule_resources("tomo_refine", gpu_capable=True),
    params:
        cryomatch=CRYOMATCH,
        out=lambda wildcards, output: os.path.dirname(
            os.path.dirname(os.path.dirname(output.shifts))
        ),
        stack=lambda wildcards: TOMO_SERIES[wildcards.name]["stack"],
        series=lambda wildcards: series_options(
            TOMO_SERIES[wildcards.name], refine=True
        ),
        opts=cli_options(
            {
                **TOMO_CONFIG["refine"],
                "thickness": TOMO_CONFIG["thickness"],
                "backend": config["backend"],
            },
            {
                "maxiter": "--maxiter",
                "upsampling": "--upsampling",
                "shift_tolerance": "--shift-tolerance",
                "shift_cutoff": "--shift-cutoff",
                "relative_sample_size": "--relative-sample-size",
                "relaxation_weight": "--relaxation-weight",
                "center_of_mass_shift_weight": "--center-of-mass-shift-weight",
                "align_j": "--no-align-j",
                "align_k": "--no-align-k",
                "ignored_subset": "--ignored-subset",
                "projection_cropping": "--projection-cropping",
                "reconstruction": "--reconstruction",
                "reconstruction_iterations": "--reconstruction-iterations",
                "seed": "--seed",
                "thickness": "--thickness",
                "backend": "--backend",
            },
        ),
    shell:
        "{params.cryomatch} tomo-refine --stack {params.stack} --out {params.out} --name {wildcards.name}"
        " --alignment {input.alignment} {params.series} {params.opts} > {log} 2>&1"


TARGETS["tomo"] = expand(
    f"{TOMO}/{{name}}/{{file}}",
    name=list(TOMO_SERIES),
    file=["alignment.png", "refinement.png", "refined_shifts.csv"],
) + ([] if TOMO_CONFIG["series"] else [f"{DEMO}/tiltseries/truth.csv"])
