# Helpers of rules/subtomo_refine.smk: the loop's inputs, chunks and iterations.

REFINE = f"{OUT}/subtomo_refine"
LOOP_CFG = SUBTOMO_CFG["loop"]
DEMO_REFINE_CFG = DEMO_SUBVOLUMES["refine"]
DEMO_REFINE = f"{DEMO}/subvolumes_refine"
ITERATION = r"\d\d[1-9]|\d[1-9]\d|[1-9]\d\d"  # 001 .. 999 (000 is the init rule's)


def refine_sources():
    """The loop's particles: the subtomo inputs, or the loop's own demo set (priors)."""
    if SUBTOMO_DEMO:
        return {
            "subvolumes": [],
            "star": f"{DEMO_REFINE}/priors.star",
            "tomograms": [],
            "stack": f"{DEMO_REFINE}/subvolumes.mrcs",
        }
    return {**subtomo_sources(), "stack": []}


def refine_reference():
    if LOOP_CFG.get("reference"):
        return LOOP_CFG["reference"]
    if SUBTOMO_DEMO:
        return f"{DEMO_REFINE}/templates/template_01.mrc"
    return subtomo_templates()[0]


def refine_mask():
    if SUBTOMO_CFG["mask"]:
        return SUBTOMO_CFG["mask"]
    return f"{DEMO_REFINE}/mask.mrc" if SUBTOMO_DEMO else []


def refine_source_options(wildcards, input):
    if input.subvolumes:
        opts = ["--subvolumes", input.subvolumes]
    else:
        opts = ["--star", input.star]
        for t in input.tomograms:
            opts += ["--tomogram", t]
    return " ".join(shlex.quote(str(o)) for o in opts)


def refine_previous(wildcards):
    folder = f"{REFINE}/it{int(wildcards.iteration) - 1:03d}"
    return {
        "particles": f"{folder}/particles.star",
        "state": f"{folder}/state.json",
        "references": [f"{folder}/reference1.mrc", f"{folder}/reference2.mrc"],
    }


def _n_refine():
    if SUBTOMO_DEMO:
        return DEMO_REFINE_CFG["n"]
    return _n_subvolumes()


REFINE_CHUNKS = [
    f"{k:06d}" for k in range(n_stacks(_n_refine(), LOOP_CFG["chunk_size"]))
]
REFINE_ITERATIONS = [f"{i:03d}" for i in range(1, LOOP_CFG["maxit"] + 1)]
