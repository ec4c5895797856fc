# Particle series: configuration and input files of the particle_series rules.

PSERIES = f"{OUT}/particle_series"
PSERIES_CFG = config["particle_series"]


def pseries_inputs():
    """The STAR (and tomograms STAR and reference map where given) the rules read."""
    if not PSERIES_CFG["star"]:
        if "particle_series" in config["stages"]:
            raise WorkflowError(
                "particle_series.star is required for the particle_series stage"
            )
        return {}
    files = {"star": PSERIES_CFG["star"]}
    for key in ("tomograms", "reference"):
        if PSERIES_CFG[key]:
            files[key] = PSERIES_CFG[key]
    return files
