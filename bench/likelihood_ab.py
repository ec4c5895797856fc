"""The likelihood search of this checkout against another version, timed in one process.

The VM's speed drifts by 20% or more within an hour (the same code measured 1.39 and
1.77 CPU-s a few minutes apart), so two bench runs made one after the other cannot resolve a
change of a few percent. This script loads the other version's package under another name,
and times both on the same images, alternating batch by batch (the order switching every
batch), so that both see the same machine state. It prints each version's CPU-seconds per
pass over the images and the ratio, for the realistic particles of ``bench/likelihood.py``
and for pure noise.

Usage: ``git worktree add /tmp/base <commit>`` (or ``git archive <commit> lib | tar -x -C
/tmp/base``), then ``python bench/likelihood_ab.py /tmp/base/lib/cryomatch [--passes 3]``.
"""

from __future__ import annotations

import os

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"  # one thread, before numpy loads its BLAS

import argparse  # noqa: E402
import importlib  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from likelihood import CRYOLIKE, noise_like, polar_inputs, setting  # noqa: E402

from cryomatch.kernels import likelihood as lk  # noqa: E402


def load_other(package: Path, folder: Path):
    """The other version's likelihood kernel, imported as ``cryomatch_other``."""
    shutil.copytree(package, folder / "cryomatch_other")
    sys.path.insert(0, str(folder))
    return importlib.import_module("cryomatch_other.kernels.likelihood")


def interleaved(versions, inputs, grid, templates, weights, dc, disp, passes, batch=32):
    """CPU-seconds per pass over the images of each version, batches alternating."""
    values, ctf, syy, ctf0 = inputs
    banks = {name: mod.prepare_templates(templates, grid, weights, dc) for name, mod in versions}
    seconds = {name: 0.0 for name, _ in versions}
    for p in range(passes):
        for i, lo in enumerate(range(0, len(values), batch)):
            sl = slice(lo, lo + batch)
            for name, mod in versions if (i + p) % 2 == 0 else versions[::-1]:
                t0 = time.process_time()
                images = mod.prepare_images(
                    values[sl], ctf[sl], syy[sl], ctf0[sl], grid, banks[name], disp
                )
                mod.search(images, banks[name])
                seconds[name] += time.process_time() - t0
    return {name: s / passes for name, s in seconds.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("other", type=Path, help="the other version's cryomatch package folder")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--noise-images", type=int, default=64)
    parser.add_argument("--viewing-distance", type=float, default=0.3)
    parser.add_argument("--passes", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        versions = [("this", lk), ("other", load_other(args.other, tmp))]
        table, images, volume, grid, pixel, rot, _, weights, templates, disp = setting(
            tmp / "sim", args.images, args.viewing_distance
        )
        m = min(args.noise_images, args.images)
        noise = polar_inputs(table, noise_like(images), grid, pixel)
        cases = [
            ("particles", polar_inputs(table, images, grid, pixel)),
            ("pure noise", tuple(x[:m] for x in noise)),
        ]
        for label, inputs in cases:
            s = interleaved(
                versions, inputs, grid, templates, weights, float(volume.sum()), disp, args.passes
            )
            poses = len(inputs[0]) * len(rot) * len(disp) * grid.n_inplanes
            ratio = {name: poses / sec / CRYOLIKE for name, sec in s.items()}
            print(
                f"{label}: this {s['this']:.3f} CPU-s per pass ({ratio['this']:.2f}x CryoLike), "
                f"other {s['other']:.3f} ({ratio['other']:.2f}x); "
                f"this / other {s['this'] / s['other']:.3f} ({args.passes} passes, interleaved)"
            )


if __name__ == "__main__":
    main()
