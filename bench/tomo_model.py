"""Accuracy of tilt-series alignment on a slab wider than the field of view (issue 13, point 5):
per seed, the RMS shift error (x across the axis, y along it; px, after removing the
unobservable components) of ``tomo-align`` with ``method: auto`` on the independent phantom of
tests/phantoms_tomo.py (128^2, 61 tilts +-60 deg, shifts +-8 px, noise 0.15, tilt axis 3 deg
off the nominal 0), with gold beads (auto: fiducial) and without (auto: patch), and beside
them etspy-style COM and cryomatch's reprojection on the bead-free slab.

    python bench/tomo_model.py --seeds 1 2 3
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from cryomatch.geometry import remove_unobservable  # noqa: E402
from cryomatch.io.tilts import write_tlt  # noqa: E402
from cryomatch.stages.tomo.align import tomo_align  # noqa: E402
from phantoms_tomo import tilt_series  # noqa: E402


def error(folder, truth, angles):
    found = pd.read_csv(folder / "shifts.csv")[["shift_x", "shift_y"]].to_numpy()
    d = remove_unobservable(found - truth, angles)
    return np.sqrt((d**2).mean(axis=0))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--others", action="store_true", help="also COM and reprojection")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    print("seed  specimen  method        err_x   err_y   axis (3)  CPU-s")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for seed in args.seeds:
            for beads in (True, False):
                stack, angles, shifts, _ = tilt_series(seed=seed, beads=beads)
                path = tmp / f"s{seed}{beads}.mrc"
                with mrcfile.new(path, overwrite=True) as m:
                    m.set_data(stack)
                write_tlt(path.with_suffix(".rawtlt"), angles)
                methods = ["auto"] + (["COM", "reprojection"] if args.others and not beads else [])
                for method in methods:
                    start = time.process_time()
                    folder = tomo_align(path, tmp / method, method=method, pixel_size=10.0)
                    seconds = time.process_time() - start
                    summary = pd.read_json(folder / "alignment.json", typ="series")
                    used, axis = summary["method"], summary["tilt_axis"]
                    ex, ey = error(folder, shifts, angles)
                    name = f"{method}:{used}" if method == "auto" else method
                    kind = "beads" if beads else "no beads"
                    print(
                        f"{seed:4d}  {kind:8s}  {name:13s} {ex:6.3f}  {ey:6.3f}  {axis:8.2f}  "
                        f"{seconds:5.1f}"
                    )


if __name__ == "__main__":
    main()
