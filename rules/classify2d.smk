# 2D multi-reference alignment and classification (SPARX sxmref_ali2d): one job per
# iteration. Iteration 0 makes the initial references; iteration n reads iteration n-1, so
# raising classify2d.maxit runs only the new iterations (maxit is no parameter of any job).
# SPARX's automatic stop: each iteration writes convergence.json; an iteration after the
# converged one only copies its outputs (a cheap job), so the target is always iteration
# maxit (0: up to 10).
C2D = config["classify2d"]
C2D_OUT = f"{OUT}/classify2d"
DEMO_VIEWS = f"{OUT}/demo/views"
C2D_FILES = [
    "class_averages.mrcs",
    "references.mrcs",
    "particles.star",
    "frc.csv",
    "classes.csv",
    "convergence.json",
]
C2D_LAST = C2D["maxit"] or 10  # maxit 0: SPARX's up to 10 iterations
C2D_FLAGS = {
    "ir": "--ir",
    "ou": "--ou",
    "rs": "--rs",
    "xr": "--xr",
    "yr": "--yr",
    "ts": "--ts",
    "center": "--center",
    "CTF": "--CTF",
    "snr": "--snr",
    "rand_seed": "--rand_seed",
    "min_class_size": "--min-class-size",
    "mask": "--mask",
    "batch_size": "--batch-size",
    "backend": "--backend",
}
# The particles: classify2d.particles, else the user's preprocessed ones, else demo views.
C2D_PARTICLES = C2D["particles"] or (
    f"{OUT}/particles/particles.star"
    if config["particles"]["star"]
    else f"{DEMO_VIEWS}/particles.star"
)
C2D_INIT = (
    f"--references {C2D['references']}"
    if C2D["references"]
    else f"--classes {C2D['classes']}"
)
C2D_CAPTION = "../workflow/report/classify2d_averages.rst"


rule simulate_views:
    input:
        code=code("simulate.views"),
    output:
        star=f"{DEMO_VIEWS}/particles.star",
        stack=f"{DEMO_VIEWS}/particles.mrcs",
        views=f"{DEMO_VIEWS}/views.mrcs",
    log:
        f"{LOGS}/simulate_views.log",
    benchmark:
        f"{BENCH}/simulate_views.tsv"
    conda:
        conda_env()
    threads: res("simulate_views", "cpus_per_task")
    resources:
        **rule_resources("simulate_views"),
    params:
        cryomatch=CRYOMATCH,
        out=lambda wildcards, output: os.path.dirname(output.star),
        opts=cli_options(
            {**config["demo"]["views"], "seed": config["demo"]["seed"]},
            {
                "n": "--n",
                "views": "--views",
                "snr": "--snr",
                "box": "--box",
                "seed": "--seed",
                "pixel_size": "--pixel-size",
                "max_shift": "--max-shift",
            },
        ),
    shell:
        "{params.cryomatch} simulate views --phantom --out {params.out} {params.opts} > {log} 2>&1"


rule classify2d_initial:
    input:
        star=C2D_PARTICLES,
        references=C2D["references"] or [],
        mask=C2D["mask"] or [],
        code=code("classify2d"),
    output:
        files=expand(f"{C2D_OUT}/iter000/{{f}}", f=C2D_FILES),
        png=report(
            f"{C2D_OUT}/iter000/class_averages.png",
            caption=C2D_CAPTION,
            category="Classify2D",
        ),
        frc=report(
            f"{C2D_OUT}/iter000/frc.png",
            caption="../workflow/report/classify2d_frc.rst",
            category="Classify2D",
        ),
    log:
        f"{LOGS}/classify2d/iter000.log",
    benchmark:
        f"{BENCH}/classify2d/iter000.tsv"
    conda:
        conda_env(gpu_capable=True)
    threads: res("classify2d_initial", "cpus_per_task")
    resources:
        **rule_resources("classify2d_initial", gpu_capable=True),
    params:
        cryomatch=CRYOMATCH,
        out=lambda wildcards, output: os.path.dirname(
            os.path.dirname(os.path.dirname(output.png))
        ),
        init=C2D_INIT,
        opts=cli_options(
            {**C2D, "backend": config["backend"]},
            {**C2D_FLAGS, "continue": "--continue"},
        ),
    shell:
        "{params.cryomatch} classify2d --particles {input.star} --out {params.out} {params.init} "
        "--iteration 0 {params.opts} > {log} 2>&1"


rule classify2d_iteration:
    input:
        star=lambda wc: f"{C2D_OUT}/iter{int(wc.iteration) - 1:03d}/particles.star",
        references=lambda wc: f"{C2D_OUT}/iter{int(wc.iteration) - 1:03d}/references.mrcs",
        state=lambda wc: f"{C2D_OUT}/iter{int(wc.iteration) - 1:03d}/convergence.json",
        mask=C2D["mask"] or [],
        code=code("classify2d"),
    output:
        files=[f"{C2D_OUT}/iter{{iteration}}/{f}" for f in C2D_FILES],
        png=report(
            f"{C2D_OUT}/iter{{iteration}}/class_averages.png",
            caption=C2D_CAPTION,
            category="Classify2D",
        ),
        frc=report(
            f"{C2D_OUT}/iter{{iteration}}/frc.png",
            caption="../workflow/report/classify2d_frc.rst",
            category="Classify2D",
        ),
    log:
        f"{LOGS}/classify2d/iter{{iteration}}.log",
    benchmark:
        f"{BENCH}/classify2d/iter{{iteration}}.tsv"
    wildcard_constraints:
        iteration=r"(?!000)\d{3}",
    conda:
        conda_env(gpu_capable=True)
    threads: res("classify2d_iteration", "cpus_per_task")
    resources:
        **rule_resources("classify2d_iteration", gpu_capable=True),
    params:
        cryomatch=CRYOMATCH,
        out=lambda wildcards, output: os.path.dirname(
            os.path.dirname(os.path.dirname(output.png))
        ),
        init=C2D_INIT,
        iteration=lambda wildcards: int(wildcards.iteration),
        opts=cli_options({**C2D, "backend": config["backend"]}, C2D_FLAGS),
    shell:
        "{params.cryomatch} classify2d --out {params.out} {params.init} "
        "--iteration {params.iteration} {params.opts} > {log} 2>&1"


TARGETS["classify2d"] = [
    f"{C2D_OUT}/iter{C2D_LAST:03d}/{f}"
    for f in C2D_FILES + ["class_averages.png", "frc.png"]
]
