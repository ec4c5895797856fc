# Helpers of rules/subtomo.smk: where the subvolumes, templates and mask come from, and
# how many chunks (jobs) they make.
import shlex

from cryomatch.workflow import count_subvolumes

SUBTOMO = f"{OUT}/subtomo"
SUBTOMO_CFG = config["subtomo"]
DEMO_SUBVOLUMES = config["demo"]["subvolumes"]
DEMO_SUBTOMO = f"{DEMO}/subvolumes"
SUBTOMO_DEMO = not (SUBTOMO_CFG["star"] or SUBTOMO_CFG["subvolumes"])


def subtomo_sources():
    """The subvolumes: a volume stack, or a STAR of positions with its tomograms."""
    cfg = SUBTOMO_CFG
    if cfg["star"]:
        return {"subvolumes": [], "star": cfg["star"], "tomograms": cfg["tomograms"]}
    if cfg["subvolumes"]:
        return {"subvolumes": cfg["subvolumes"], "star": [], "tomograms": []}
    if DEMO_SUBVOLUMES["tomogram"]:
        return {
            "subvolumes": [],
            "star": f"{DEMO_SUBTOMO}/particles.star",
            "tomograms": [f"{DEMO_SUBTOMO}/tomogram.mrc"],
        }
    return {
        "subvolumes": f"{DEMO_SUBTOMO}/subvolumes.mrcs",
        "star": [],
        "tomograms": [],
    }


def subtomo_templates():
    if SUBTOMO_CFG["templates"]:
        return SUBTOMO_CFG["templates"]
    n = DEMO_SUBVOLUMES["n_templates"]
    return [f"{DEMO_SUBTOMO}/templates/template_{k:02d}.mrc" for k in range(1, n + 1)]


def subtomo_mask():
    if SUBTOMO_CFG["mask"]:
        return SUBTOMO_CFG["mask"]
    return f"{DEMO_SUBTOMO}/mask.mrc" if SUBTOMO_DEMO else []


def subtomo_source_options(wildcards, input):
    """Command-line options naming the inputs of a subtomo_align job."""
    if input.subvolumes:
        opts = ["--subvolumes", input.subvolumes]
    else:
        opts = ["--star", input.star]
        for t in input.tomograms:
            opts += ["--tomogram", t]
    for t in input.templates:
        opts += ["--template", t]
    if input.mask:
        opts += ["--mask", input.mask]
    return " ".join(shlex.quote(str(o)) for o in opts)


def _n_subvolumes():
    if SUBTOMO_DEMO:
        return DEMO_SUBVOLUMES["n"]
    try:
        return count_subvolumes(SUBTOMO_CFG["star"] or SUBTOMO_CFG["subvolumes"])
    except CryomatchError as exc:
        raise WorkflowError(f"subtomo: {exc}") from exc


SUBTOMO_CHUNKS = [
    f"{k:06d}" for k in range(n_stacks(_n_subvolumes(), SUBTOMO_CFG["chunk_size"]))
]
N_TEMPLATES = len(subtomo_templates())
