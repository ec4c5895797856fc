"""Helpers rules/tomo.smk uses: the tilt series a run works on and their per-series options."""

from __future__ import annotations

from ...workflow import cli_options

SERIES_FLAGS = {
    "angles": "--angles",
    "tilt_axis": "--tilt-axis",
    "pixel_size": "--pixel-size",
    "invert": "--invert",
}


def tomo_series(tomo_config: dict, demo_folder: str, demo_config: dict) -> dict:
    """NAME -> {stack, angles, ...}: the config's tilt series, or the demo's."""
    if tomo_config["series"]:
        return tomo_config["series"]
    return {
        "demo": {
            "stack": f"{demo_folder}/tiltseries.mrc",
            "angles": f"{demo_folder}/tiltseries.rawtlt",
            "pixel_size": demo_config["pixel_size"],
        }
    }


def series_inputs(entry: dict) -> list[str]:
    """The files of one series that a rule reads (angles may be a file or a list)."""
    angles = entry.get("angles")
    return [entry["stack"]] + ([angles] if isinstance(angles, str) else [])


def series_options(entry: dict, refine: bool = False) -> str:
    """Command-line options of one series; refinement keeps the alignment's fitted axis."""
    flags = {k: v for k, v in SERIES_FLAGS.items() if not (refine and k == "tilt_axis")}
    return cli_options(entry, flags)


def model_options(tomo_config: dict) -> dict:
    """The fiducial / patch / model sections as tomo-align's flat option names."""
    out = {}
    for section, prefix in (("fiducial", ""), ("patch", "patch_"), ("model", "model_")):
        for key, value in (tomo_config.get(section) or {}).items():
            name = key if key == "max_residual" else prefix + key
            out[name] = value
    return out
