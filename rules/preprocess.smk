# Preprocess: normalize, optionally Fourier-crop and invert, split into stacks.
PARTICLES = f"{OUT}/particles"


rule preprocess:
    input:
        star=particles_star(),
        code=code("preprocess"),
    output:
        stacks=expand(f"{PARTICLES}/stack_{{s}}.mrcs", s=STACKS),
        stars=expand(f"{PARTICLES}/stack_{{s}}.star", s=STACKS),
        star=f"{PARTICLES}/particles.star",
        preview=report(
            f"{PARTICLES}/preview.png",
            caption="../workflow/report/preprocess_preview.rst",
            category="Preprocess",
        ),
    log:
        f"{LOGS}/preprocess.log",
    benchmark:
        f"{BENCH}/preprocess.tsv"
    conda:
        conda_env()
    threads: res("preprocess", "cpus_per_task")
    resources:
        **rule_resources("preprocess"),
    params:
        cryomatch=CRYOMATCH,
        out=lambda wildcards, output: os.path.dirname(os.path.dirname(output.star)),
        opts=cli_options(
            {**config["preprocess"], "angpix": config["particles"]["angpix"]},
            {
                "box": "--box",
                "pixel_size": "--pixel-size",
                "stack_size": "--stack-size",
                "invert": "--invert",
                "bg_radius": "--bg-radius",
                "ramp": "--no-ramp",
                "angpix": "--angpix",
                "batch_size": "--batch-size",
                "drop_duplicates": "--drop-duplicates",
            },
        ),
    shell:
        "{params.cryomatch} preprocess --star {input.star} --out {params.out} {params.opts} > {log} 2>&1"


TARGETS["preprocess"] = rules.preprocess.output
