# Demo data made by cryomatch itself (used where the config names no input of the user's).
DEMO = f"{OUT}/demo"
DEMO_PARTICLES = config["demo"]["particles"]


rule simulate_particles:
    input:
        code=code("simulate.particles"),
    output:
        star=f"{DEMO}/particles/particles.star",
        stack=f"{DEMO}/particles/particles.mrcs",
        maps=expand(
            f"{DEMO}/particles/structures/structure_{{k:02d}}.mrc",
            k=range(1, DEMO_PARTICLES["n_structures"] + 1),
        ),
        projections=report(
            f"{DEMO}/particles/structures/projections.png",
            caption="../workflow/report/simulate_structures.rst",
            category="Demo data",
        ),
    log:
        f"{LOGS}/simulate_particles.log",
    benchmark:
        f"{BENCH}/simulate_particles.tsv"
    conda:
        conda_env()
    threads: res("simulate_particles", "cpus_per_task")
    resources:
        **rule_resources("simulate_particles"),
    params:
        cryomatch=CRYOMATCH,
        out=lambda wildcards, output: os.path.dirname(output.star),
        opts=cli_options(
            {**DEMO_PARTICLES, "seed": config["demo"]["seed"]},
            {
                "n": "--n",
                "snr": "--snr",
                "box": "--box",
                "seed": "--seed",
                "pixel_size": "--pixel-size",
                "n_structures": "--n-structures",
                "max_shift": "--max-shift",
                "optics_groups": "--optics-groups",
            },
        ),
    shell:
        "{params.cryomatch} simulate particles --phantom --out {params.out} {params.opts} > {log} 2>&1"
