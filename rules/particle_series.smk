# Particle series (RELION 5 / WarpTools 2D tilt stacks, or per-tilt RELION 3 rows): the
# average by Fourier back-projection with its FSCs, and optionally a local pose refinement.
# Not in the default stages: it needs particle_series.star.


include: "particle_series_common.smk"


PSERIES_COMMON = {
    "tomograms": "--tomograms",
    "angpix": "--angpix",
    "reference": "--reference",
    "pad": "--pad",
    "gridding": "--gridding",
    "wiener": "--wiener",
    "dose": "--no-dose",
    "mask_radius": "--mask-radius",
    "mask_edge": "--mask-edge",
    "batch_size": "--batch-size",
    "backend": "--backend",
}
PSERIES_REFERENCE = ["fsc_reference.csv"] if PSERIES_CFG["reference"] else []


rule particle_series_reconstruct:
    input:
        **pseries_inputs(),
        code=code("particle_series"),
    output:
        average=f"{PSERIES}/reconstruct/average.mrc",
        halves=expand(f"{PSERIES}/reconstruct/half{{h}}.mrc", h=(1, 2)),
        fsc=f"{PSERIES}/reconstruct/fsc_halves.csv",
        reference=expand(f"{PSERIES}/reconstruct/{{f}}", f=PSERIES_REFERENCE),
        summary=f"{PSERIES}/reconstruct/summary.json",
        pngs=report(
            expand(f"{PSERIES}/reconstruct/{{f}}.png", f=("average", "fsc")),
            caption="../workflow/report/particle_series.rst",
            category="Particle series",
        ),
    log:
        f"{LOGS}/particle_series_reconstruct.log",
    benchmark:
        f"{BENCH}/particle_series_reconstruct.tsv"
    conda:
        conda_env(gpu_capable=True)
    threads: res("particle_series_reconstruct", "cpus_per_task")
    resources:
        **rule_resources("particle_series_reconstruct", gpu_capable=True),
    params:
        cryomatch=CRYOMATCH,
        out=lambda wildcards, output: os.path.dirname(output.average),
        opts=cli_options(
            {**PSERIES_CFG, "backend": config["backend"]},
            {**PSERIES_COMMON, "split": "--split"},
        ),
    shell:
        "{params.cryomatch} particle-series reconstruct --star {input.star} "
        "--out {params.out} {params.opts} > {log} 2>&1"


rule particle_series_refine:
    input:
        **pseries_inputs(),
        code=code("particle_series"),
    output:
        star=f"{PSERIES}/refine/particles_refined.star",
        average=f"{PSERIES}/refine/average.mrc",
        changes=f"{PSERIES}/refine/pose_changes.csv",
        summary=f"{PSERIES}/refine/summary.json",
        pngs=report(
            expand(f"{PSERIES}/refine/{{f}}.png", f=("average", "fsc")),
            caption="../workflow/report/particle_series.rst",
            category="Particle series",
        ),
    log:
        f"{LOGS}/particle_series_refine.log",
    benchmark:
        f"{BENCH}/particle_series_refine.tsv"
    conda:
        conda_env(gpu_capable=True)
    threads: res("particle_series_refine", "cpus_per_task")
    resources:
        **rule_resources("particle_series_refine", gpu_capable=True),
    params:
        cryomatch=CRYOMATCH,
        out=lambda wildcards, output: os.path.dirname(output.star),
        opts=cli_options(
            {**PSERIES_CFG, "backend": config["backend"]},
            {
                **PSERIES_COMMON,
                "max_angle": "--max-angle",
                "angle_step": "--angle-step",
                "max_shift": "--max-shift",
                "shift_step": "--shift-step",
                "lowpass": "--lowpass",
                "highpass": "--highpass",
                "iterations": "--iterations",
                "references": "--references",
                "estimate": "--estimate",
            },
        ),
    shell:
        "{params.cryomatch} particle-series refine --star {input.star} "
        "--out {params.out} {params.opts} > {log} 2>&1"


TARGETS["particle_series"] = (
    (
        rules.particle_series_reconstruct.output
        + (rules.particle_series_refine.output if PSERIES_CFG["refine"] else [])
    )
    if PSERIES_CFG["star"]
    else []
)
