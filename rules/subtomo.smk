# Subtomogram alignment: chunks of subvolumes aligned to the templates, then merged into
# one STAR of poses, scores and labels, and an average per template.


include: "subtomo_common.smk"


rule simulate_subvolumes:
    input:
        code=code("simulate.subvolumes"),
    output:
        star=f"{DEMO_SUBTOMO}/subvolumes.star",
        stack=f"{DEMO_SUBTOMO}/subvolumes.mrcs",
        mask=f"{DEMO_SUBTOMO}/mask.mrc",
        templates=expand(
            f"{DEMO_SUBTOMO}/templates/template_{{k:02d}}.mrc",
            k=range(1, DEMO_SUBVOLUMES["n_templates"] + 1),
        ),
        tomogram=(
            [f"{DEMO_SUBTOMO}/tomogram.mrc", f"{DEMO_SUBTOMO}/particles.star"]
            if DEMO_SUBVOLUMES["tomogram"]
            else []
        ),
    log:
        f"{LOGS}/simulate_subvolumes.log",
    benchmark:
        f"{BENCH}/simulate_subvolumes.tsv"
    conda:
        conda_env()
    threads: res("simulate_subvolumes", "cpus_per_task")
    resources:
        **rule_resources("simulate_subvolumes"),
    params:
        cryomatch=CRYOMATCH,
        out=lambda wildcards, output: os.path.dirname(output.star),
        opts=cli_options(
            {**DEMO_SUBVOLUMES, "seed": config["demo"]["seed"]},
            {
                "n": "--n",
                "snr": "--snr",
                "box": "--box",
                "seed": "--seed",
                "pixel_size": "--pixel-size",
                "n_templates": "--n-templates",
                "max_angle": "--max-angle",
                "max_shift": "--max-shift",
                "tomogram": "--tomogram",
            },
        ),
    shell:
        "{params.cryomatch} simulate subvolumes --out {params.out} {params.opts} > {log} 2>&1"


rule subtomo_align:
    input:
        unpack(lambda wildcards: subtomo_sources()),
        templates=subtomo_templates(),
        mask=subtomo_mask(),
        code=code("subtomo"),
    output:
        star=f"{SUBTOMO}/chunks/chunk_{{chunk}}.star",
        sums=f"{SUBTOMO}/chunks/chunk_{{chunk}}.npz",
    log:
        f"{LOGS}/subtomo_align_{{chunk}}.log",
    benchmark:
        f"{BENCH}/subtomo_align_{{chunk}}.tsv"
    wildcard_constraints:
        chunk=r"\d+",
    conda:
        conda_env(gpu_capable=True)
    threads: res("subtomo_align", "cpus_per_task")
    resources:
        **rule_resources("subtomo_align", gpu_capable=True),
    params:
        cryomatch=CRYOMATCH,
        out=lambda wildcards, output: os.path.dirname(os.path.dirname(output.star)),
        source=subtomo_source_options,
        opts=cli_options(
            {
                **SUBTOMO_CFG,
                "rotations": [v for pair in SUBTOMO_CFG["rotations"] for v in pair],
                "wedge": SUBTOMO_CFG["tilt"] is not None,
                "backend": config["backend"],
                **{f"prior_{k}": v for k, v in SUBTOMO_CFG["prior_search"].items()},
            },
            {
                "method": "--method",
                "max_shifts": "--max-shifts",
                "rotations": "--rotations",
                "cutoff": "--cutoff",
                "tilt": "--tilt",
                "wedge": "--no-wedge",
                "interpolate": "--no-interpolate",
                "refine": "--refine",
                "angpix": "--angpix",
                "chunk_size": "--chunk-size",
                "batch_size": "--batch-size",
                "backend": "--backend",
                "prior_range": "--prior-range",
                "prior_step": "--prior-step",
                "prior_cone": "--cone",
                "prior_inplane": "--inplane",
            },
        ),
    shell:
        "{params.cryomatch} subtomo align {params.source} --out {params.out} "
        "--chunk {wildcards.chunk} {params.opts} > {log} 2>&1"


rule subtomo_merge:
    input:
        stars=expand(f"{SUBTOMO}/chunks/chunk_{{c}}.star", c=SUBTOMO_CHUNKS),
        sums=expand(f"{SUBTOMO}/chunks/chunk_{{c}}.npz", c=SUBTOMO_CHUNKS),
        code=code("subtomo"),
    output:
        star=f"{SUBTOMO}/subtomo.star",
        averages=expand(f"{SUBTOMO}/average_{{k:02d}}.mrc", k=range(1, N_TEMPLATES + 1)),
        pngs=report(
            expand(f"{SUBTOMO}/average_{{k:02d}}.png", k=range(1, N_TEMPLATES + 1)),
            caption="../workflow/report/subtomo_average.rst",
            category="Subtomogram alignment",
        ),
    log:
        f"{LOGS}/subtomo_merge.log",
    benchmark:
        f"{BENCH}/subtomo_merge.tsv"
    conda:
        conda_env()
    threads: res("subtomo_merge", "cpus_per_task")
    resources:
        **rule_resources("subtomo_merge"),
    params:
        cryomatch=CRYOMATCH,
        out=lambda wildcards, output: os.path.dirname(output.star),
        n=len(SUBTOMO_CHUNKS),
    shell:
        "{params.cryomatch} subtomo merge --out {params.out} --chunks {params.n} > {log} 2>&1"


TARGETS["subtomo"] = rules.subtomo_merge.output


include: "subtomo_refine.smk"
