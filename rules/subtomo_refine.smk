# Subtomogram averaging loop: iteration 0 (half sets, initial references), then per
# iteration chunks of particles aligned about their previous poses (each half set to its
# own reference) and merged into half maps, FSC and the next references. The iteration
# wildcard's input function points at iteration n-1, so raising maxit runs only the new
# iterations; after convergence the later ones copy it.


include: "subtomo_refine_common.smk"


rule simulate_subvolumes_refine:
    input:
        code=code("simulate.subvolumes"),
    output:
        priors=f"{DEMO_REFINE}/priors.star",
        stack=f"{DEMO_REFINE}/subvolumes.mrcs",
        truth=f"{DEMO_REFINE}/subvolumes.star",
        mask=f"{DEMO_REFINE}/mask.mrc",
        template=f"{DEMO_REFINE}/templates/template_01.mrc",
    log:
        f"{LOGS}/simulate_subvolumes_refine.log",
    benchmark:
        f"{BENCH}/simulate_subvolumes_refine.tsv"
    conda:
        conda_env()
    threads: res("simulate_subvolumes_refine", "cpus_per_task")
    resources:
        **rule_resources("simulate_subvolumes_refine"),
    params:
        cryomatch=CRYOMATCH,
        out=lambda wildcards, output: os.path.dirname(output.priors),
        opts=cli_options(
            {
                **DEMO_REFINE_CFG,
                "seed": config["demo"]["seed"],
                "pixel_size": DEMO_SUBVOLUMES["pixel_size"],
                "max_shift": DEMO_SUBVOLUMES["max_shift"],
                "uniform": True,
            },
            {
                "n": "--n",
                "snr": "--snr",
                "box": "--box",
                "seed": "--seed",
                "pixel_size": "--pixel-size",
                "max_shift": "--max-shift",
                "uniform": "--uniform",
                "prior_error": "--prior-error",
            },
        ),
    shell:
        "{params.cryomatch} simulate subvolumes --out {params.out} {params.opts} > {log} 2>&1"


rule subtomo_refine_init:
    input:
        unpack(lambda wildcards: refine_sources()),
        reference=refine_reference(),
        code=code("subtomo_refine"),
    output:
        particles=f"{REFINE}/it000/particles.star",
        state=f"{REFINE}/it000/state.json",
        references=[f"{REFINE}/it000/reference1.mrc", f"{REFINE}/it000/reference2.mrc"],
    log:
        f"{LOGS}/subtomo_refine_init.log",
    benchmark:
        f"{BENCH}/subtomo_refine_init.tsv"
    conda:
        conda_env()
    threads: res("subtomo_refine_init", "cpus_per_task")
    resources:
        **rule_resources("subtomo_refine_init"),
    params:
        cryomatch=CRYOMATCH,
        out=lambda wildcards, output: os.path.dirname(os.path.dirname(output.particles)),
        source=refine_source_options,
        opts=cli_options(
            {**LOOP_CFG, "angpix": SUBTOMO_CFG["angpix"]},
            {
                "angpix": "--angpix",
                "initial_lowpass": "--initial-lowpass",
                "range": "--range",
                "step": "--step",
            },
        ),
    shell:
        "{params.cryomatch} subtomo-refine init {params.source} --out {params.out} "
        "--reference {input.reference} {params.opts} > {log} 2>&1"


rule subtomo_refine_align:
    input:
        unpack(lambda wildcards: refine_sources()),
        unpack(refine_previous),
        mask=refine_mask(),
        code=code("subtomo_refine"),
    output:
        star=f"{REFINE}/it{{iteration}}/chunks/chunk_{{chunk}}.star",
        sums=f"{REFINE}/it{{iteration}}/chunks/chunk_{{chunk}}.npz",
    log:
        f"{LOGS}/subtomo_refine_align_{{iteration}}_{{chunk}}.log",
    benchmark:
        f"{BENCH}/subtomo_refine_align_{{iteration}}_{{chunk}}.tsv"
    wildcard_constraints:
        iteration=ITERATION,
        chunk=r"\d+",
    conda:
        conda_env(gpu_capable=True)
    threads: res("subtomo_refine_align", "cpus_per_task")
    resources:
        **rule_resources("subtomo_refine_align", gpu_capable=True),
    params:
        cryomatch=CRYOMATCH,
        out=lambda wildcards, output: os.path.dirname(
            os.path.dirname(os.path.dirname(output.star))
        ),
        source=refine_source_options,
        mask=lambda wildcards, input: f"--mask {input.mask}" if input.mask else "",
        opts=cli_options(
            {
                **LOOP_CFG,
                "rotations": [v for pair in SUBTOMO_CFG["rotations"] for v in pair],
                "tilt": SUBTOMO_CFG["tilt"],
                "wedge": SUBTOMO_CFG["tilt"] is not None,
                "backend": config["backend"],
            },
            {
                "chunk_size": "--chunk-size",
                "max_shifts": "--max-shifts",
                "rotations": "--rotations",
                "tilt": "--tilt",
                "wedge": "--no-wedge",
                "cone": "--cone",
                "inplane": "--inplane",
                "backend": "--backend",
            },
        ),
    shell:
        "{params.cryomatch} subtomo-refine align {params.source} --out {params.out} "
        "--iteration {wildcards.iteration} --chunk {wildcards.chunk} {params.mask} "
        "{params.opts} > {log} 2>&1"


rule subtomo_refine_merge:
    input:
        stars=expand(
            f"{REFINE}/it{{{{iteration}}}}/chunks/chunk_{{c}}.star", c=REFINE_CHUNKS
        ),
        sums=expand(
            f"{REFINE}/it{{{{iteration}}}}/chunks/chunk_{{c}}.npz", c=REFINE_CHUNKS
        ),
        mask=refine_mask(),
        code=code("subtomo_refine"),
    output:
        particles=f"{REFINE}/it{{iteration}}/particles.star",
        state=f"{REFINE}/it{{iteration}}/state.json",
        references=[
            f"{REFINE}/it{{iteration}}/reference1.mrc",
            f"{REFINE}/it{{iteration}}/reference2.mrc",
        ],
        halves=[
            f"{REFINE}/it{{iteration}}/half1.mrc",
            f"{REFINE}/it{{iteration}}/half2.mrc",
        ],
        average=f"{REFINE}/it{{iteration}}/average.mrc",
        fsc=f"{REFINE}/it{{iteration}}/fsc.csv",
        fsc_png=report(
            f"{REFINE}/it{{iteration}}/fsc.png",
            caption="../workflow/report/subtomo_fsc.rst",
            category="Subtomogram averaging",
        ),
        sections=report(
            f"{REFINE}/it{{iteration}}/sections.png",
            caption="../workflow/report/subtomo_sections.rst",
            category="Subtomogram averaging",
        ),
    log:
        f"{LOGS}/subtomo_refine_merge_{{iteration}}.log",
    benchmark:
        f"{BENCH}/subtomo_refine_merge_{{iteration}}.tsv"
    wildcard_constraints:
        iteration=ITERATION,
    conda:
        conda_env()
    threads: res("subtomo_refine_merge", "cpus_per_task")
    resources:
        **rule_resources("subtomo_refine_merge"),
    params:
        cryomatch=CRYOMATCH,
        out=lambda wildcards, output: os.path.dirname(os.path.dirname(output.particles)),
        n=len(REFINE_CHUNKS),
        mask=lambda wildcards, input: f"--mask {input.mask}" if input.mask else "",
        opts=cli_options(
            LOOP_CFG,
            {
                "symmetry": "--symmetry",
                "wiener": "--wiener",
                "diameter": "--diameter",
                "min_step": "--min-step",
                "converge_angle": "--converge-angle",
                "converge_shift": "--converge-shift",
            },
        ),
    shell:
        "{params.cryomatch} subtomo-refine merge --out {params.out} --iteration {wildcards.iteration} "
        "--chunks {params.n} {params.mask} {params.opts} > {log} 2>&1"


if REFINE_ITERATIONS:
    TARGETS["subtomo"] = [
        *TARGETS["subtomo"],
        *expand(f"{REFINE}/it{{i}}/state.json", i=REFINE_ITERATIONS),
        *expand(f"{REFINE}/it{{i}}/fsc.png", i=REFINE_ITERATIONS),
        *expand(f"{REFINE}/it{{i}}/sections.png", i=REFINE_ITERATIONS),
    ]
