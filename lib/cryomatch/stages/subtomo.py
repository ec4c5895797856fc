"""Subtomogram alignment: shift, rotation, score and template label of every subvolume.

``cryomatch subtomo align`` aligns subvolumes to one or several templates with the ZNCC or
PCC model of :mod:`cryomatch.alignment` (rotations searched about the identity). The
subvolumes come from an MRC volume stack (``--subvolumes``), or are cut out of tomograms
(``--tomogram``, repeatable, matched to rlnTomoName by file name) at the positions of a
RELION 5 style STAR (``--star``: rlnCenteredCoordinateX/Y/ZAngst, or rlnCoordinateX/Y/Z
in tomogram voxels, minus rlnOriginX/Y/ZAngst when present). With ``--chunk K`` only
subvolumes ``K * chunk_size ..`` are aligned and ``OUT/chunks/chunk_K.star`` and
``chunk_K.npz`` (sums of the aligned subvolumes per template) are written for ``cryomatch
subtomo merge``; without it, everything is aligned and merged at once.

Outputs in OUT: ``subtomo.star`` (the input rows, or one row per stacked subvolume, with
rlnAngleRot/Tilt/Psi, rlnOriginX/Y/ZAngst (RELION's conventions, see
:func:`cryomatch.geometry.subvolume_pose_to_relion`), rlnClassNumber = template label + 1
and rlnCryomatchScore), ``average_TT.mrc`` (per template: the mean of the subvolumes
assigned to it, each moved onto the template) and ``average_TT.png`` (its central slices).

The pixel size comes from ``--angpix``, else the STAR's optics (rlnImagePixelSize), else
the MRC header of the subvolumes or tomogram (with a warning).
"""

from __future__ import annotations

import math
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from .. import geometry, provenance
from ..alignment import PCCAlignment, ZNCCAlignment
from ..alignment.base import AlignmentResult, transform_subvolume
from ..alignment.local import LocalZNCC
from ..alignment.tilt import add_tilt_arguments, single_axis, tilt_from_arguments
from ..backend import get_xp
from ..cli import positive_float, positive_int
from ..errors import CryomatchError, CryomatchWarning
from ..io.atomic import Outputs
from ..io.figures import orthogonal_slices, save_png
from ..io.files import write_npz
from ..io.mrc import open_mrc, pixel_size_from, read_volume, write_mrc
from ..io.star import read_star, write_star
from ..io.volumes import VolumeStackReader, extract_boxes
from ..progress import progress
from .subtomo_priors import (
    ImageSource,
    check_priors,
    has_priors,
    optics_pixel_size,
    origins_pixels,
    output_columns,
    read_particle_block,
    row_priors,
    subtomogram_matrices,
)

METHODS = {"zncc": ZNCCAlignment, "pcc": PCCAlignment}
SCORE_COLUMN = "rlnCryomatchScore"


def chunk_name(k: int) -> str:
    return f"chunk_{k:06d}"


def iter_chunks(folder, n_chunks: int):
    """Yield (particles, optics or None, open npz) of ``folder/chunk_K.star`` and ``.npz``,
    K < n_chunks, one chunk at a time."""
    for k in range(n_chunks):
        base = Path(folder) / chunk_name(k)
        blocks = read_star(f"{base}.star")
        path = Path(f"{base}.npz")
        if not path.is_file():
            raise CryomatchError("file does not exist", path)
        with np.load(path) as z:
            yield blocks["particles"], blocks.get("optics"), z


# --- inputs ----------------------------------------------------------------------------
def read_templates(paths, mask_path=None):
    """(templates (T, *shape), mask or None, voxel size of the first template or None)."""
    if not paths:
        raise CryomatchError("no template given")
    templates, voxel = [], None
    for path in paths:
        data, v = read_volume(path)
        if templates and data.shape != templates[0].shape:
            raise CryomatchError(
                f"the template has shape {data.shape}, the first template {templates[0].shape}",
                path,
            )
        templates.append(data)
        voxel = voxel if voxel is not None else v
    mask = None
    if mask_path:
        mask, _ = read_volume(mask_path)
        if mask.shape != templates[0].shape:
            raise CryomatchError(
                f"the mask has shape {mask.shape}, the template {templates[0].shape}", mask_path
            )
        if mask.min() < 0 or not mask.max() > 0:
            raise CryomatchError("the mask must be non-negative and not all zero", mask_path)
    return np.stack(templates), mask, voxel


class StackSource:
    """Subvolumes of an MRC volume stack, one output row each."""

    box_in_subtomogram_frame = True

    def __init__(self, path):
        self.path = Path(path)
        self.reader = VolumeStackReader(path)
        names = [f"{i + 1:06d}@{self.path.name}" for i in range(len(self.reader))]
        self.table = pd.DataFrame({"rlnImageName": names, "rlnOpticsGroup": 1})

    def __len__(self) -> int:
        return len(self.reader)

    def shape(self):
        return self.reader.shape[1:]

    optics = None

    def pixel_size(self):
        return None, self.reader.voxel_size()

    def read(self, start: int, stop: int, shape) -> tuple[np.ndarray, np.ndarray]:
        """(subvolumes, where the rows put their particles relative to the box centre (n, 3)
        z, y, x voxels: minus their origins, 0 without)."""
        origin = origins_pixels(self.table.iloc[start:stop], getattr(self, "_angpix", 1.0))
        return self.reader.read(start, stop), -origin[:, ::-1]

    def close(self):
        self.reader.close()


class TomogramSource:
    """Subvolumes cut out of tomograms at the positions of a RELION 5 style STAR."""

    box_in_subtomogram_frame = False

    def __init__(self, star, tomograms, angpix=None):
        self.star = Path(star)
        self.table, self.optics = read_particle_block(star)
        self.angpix = angpix
        if not tomograms:
            raise CryomatchError("positions in a STAR need the tomogram(s) (--tomogram)", star)
        self.tomograms = {_tomo_key(t): Path(t) for t in tomograms}
        self._open = {}
        self._files = self._assign_tomograms()

    def _assign_tomograms(self) -> list[Path]:
        if (
            "rlnTomoName" not in self.table
            or len(self.tomograms) == 1
            and (self.table["rlnTomoName"].nunique() == 1)
        ):
            if len(self.tomograms) != 1:
                raise CryomatchError("several tomograms but no rlnTomoName column", self.star)
            return [next(iter(self.tomograms.values()))] * len(self.table)
        files = []
        for name in self.table["rlnTomoName"].astype(str):
            key = _tomo_key(name)
            if key not in self.tomograms:
                raise CryomatchError(f"no tomogram given for rlnTomoName {name!r}", self.star)
            files.append(self.tomograms[key])
        return files

    def __len__(self) -> int:
        return len(self.table)

    def _mrc(self, path):
        if path not in self._open:
            self._open[path] = open_mrc(path)
            if self._open[path].data.ndim != 3:
                raise CryomatchError(
                    f"not a 3D tomogram: shape {self._open[path].data.shape}", path
                )
        return self._open[path]

    def pixel_size(self):
        header = float(self._mrc(self._files[0]).voxel_size.x)
        return optics_pixel_size(self.optics), header if header > 0 else None

    def positions(self, angpix: float) -> np.ndarray:
        """Particle positions (n, 3) (z, y, x) in tomogram voxels."""
        t = self.table
        if all(f"rlnCenteredCoordinate{a}Angst" in t for a in "XYZ"):
            centred = t[[f"rlnCenteredCoordinate{a}Angst" for a in "XYZ"]].to_numpy(float) / angpix
            shapes = np.array([self._mrc(f).data.shape[::-1] for f in self._files])  # x, y, z
            xyz = centred + shapes // 2
        elif all(f"rlnCoordinate{a}" in t for a in "XYZ"):
            xyz = t[[f"rlnCoordinate{a}" for a in "XYZ"]].to_numpy(float)
        else:
            raise CryomatchError(
                "no particle positions: need rlnCenteredCoordinateX/Y/ZAngst or rlnCoordinateX/Y/Z",
                self.star,
            )
        # RELION 5: the origin is in the subtomogram's frame (A_sub origin in the tomogram)
        origin = origins_pixels(t, angpix)
        xyz = xyz - np.einsum("nij,nj->ni", subtomogram_matrices(t), origin)
        return xyz[:, ::-1]

    def read(self, start: int, stop: int, shape) -> tuple[np.ndarray, np.ndarray]:
        pos = self._positions[start:stop]
        centre = np.round(pos).astype(np.int64)
        out = np.empty((stop - start, *shape), dtype=np.float32)
        files = np.array(self._files[start:stop], dtype=object)
        for path in dict.fromkeys(files):
            rows = np.flatnonzero(files == path)
            data = self._mrc(path).data
            try:
                out[rows] = extract_boxes(data, centre[rows], shape)
            except CryomatchError as exc:
                raise CryomatchError(f"row {start + rows[0] + 1}: {exc.problem}", path) from None
        if not np.isfinite(out).all():
            raise CryomatchError(
                f"subvolumes {start + 1}..{stop} hold NaN or inf values", self.star
            )
        return out, pos - centre

    def close(self):
        for mrc in self._open.values():
            mrc.close()


def _tomo_key(name) -> str:
    base = Path(str(name)).name
    for suffix in (".tomostar", ".mrc", ".rec", ".st"):
        if base.endswith(suffix):
            base = base[: -len(suffix)]
    return base


def open_source(subvolumes, star, tomograms):
    """The subvolumes: an MRC stack, a STAR of positions with tomograms, or a STAR whose
    rlnImageName names the subvolumes (RELION 3/4 subtomograms)."""
    if subvolumes is not None:
        return StackSource(subvolumes)
    if tomograms:
        return TomogramSource(star, tomograms)
    return ImageSource(star)


# --- the stage -------------------------------------------------------------------------
# the local search about STAR priors: range and step (degrees, per axis of the grid), the
# cone of viewing directions and the in-plane range (degrees from the prior; None: no limit)
PRIOR_SEARCH = {"range": 10.0, "step": 5.0, "cone": None, "inplane": None}


def build_model(templates, mask, method, rotations, cutoff, tilt, interpolate, refine):
    if method not in METHODS:
        raise CryomatchError(f"unknown method {method!r} (use {', '.join(METHODS)})")
    return METHODS[method](
        list(templates) if len(templates) > 1 else templates[0],
        mask=mask,
        rotations=rotations,
        cutoff=cutoff,
        tilt=single_axis(tuple(tilt)) if tilt is not None else None,
        interpolate=interpolate,
        refine=refine,
    )


def build_local_model(templates, mask, search, cutoff, tilt, interpolate):
    """A :class:`LocalZNCC` for a search dict (range, step, cone, inplane; degrees)."""
    return LocalZNCC(
        list(templates) if len(templates) > 1 else templates[0],
        mask=mask,
        angular_range=search["range"],
        angular_step=search["step"],
        cutoff=cutoff,
        tilt=single_axis(tuple(tilt)) if tilt is not None else None,
        cone=search.get("cone"),
        inplane=search.get("inplane"),
        interpolate=interpolate,
    )


def align_batch(model, source, volumes, offsets, lo, hi, max_shifts, backend):
    """(labels, shifts, quats, scores) of one batch: about the rows' priors when the model
    is a :class:`LocalZNCC`, else about the identity."""
    if not isinstance(model, LocalZNCC):
        return model.align_batch(volumes, max_shifts, backend=backend)
    table = source.table.iloc[lo:hi]
    quats, shifts, box, ref = row_priors(
        table, offsets, volumes.shape[1:], source.box_in_subtomogram_frame
    )
    return model.align_priors(volumes, max_shifts, quats, shifts, box, ref, backend)


def align_rows(model, source, start, stop, max_shifts, angpix, backend, batch_size):
    """Align rows start .. stop: (result columns (DataFrame), sums (T, *shape), counts (T,))."""
    shape = model.input_shape
    n_templates = len(model._template)
    sums = np.zeros((n_templates, *shape))
    counts = np.zeros(n_templates, dtype=np.int64)
    labels, shifts, quats, scores = [], [], [], []
    bar = progress(total=stop - start, desc="subtomo", unit="subvol")
    for lo in range(start, stop, batch_size):
        hi = min(stop, lo + batch_size)
        volumes, offsets = source.read(lo, hi, shape)
        lab, sh, q, sc = align_batch(model, source, volumes, offsets, lo, hi, max_shifts, backend)
        for i in range(len(volumes)):  # resampling is one ndimage call per subvolume
            result = AlignmentResult(int(lab[i]), sh[i], q[i], float(sc[i]))
            sums[lab[i]] += transform_subvolume(volumes[i], result, float(volumes[i].mean()))
            counts[lab[i]] += 1
        labels.append(lab)
        # relative to the rows' positions: their remainders of rounding to a voxel (a
        # translation of the box content, the same about any rotation centre)
        shifts.append(sh - offsets)
        quats.append(q)
        scores.append(sc)
        bar.update(hi - lo)
    bar.close()
    labels, shifts, quats, scores = (np.concatenate(x) for x in (labels, shifts, quats, scores))
    columns = pose_columns(labels, quats, shifts, shape, angpix)
    columns[SCORE_COLUMN] = scores
    return columns, sums, counts


def pose_columns(labels, quats, shifts, shape, angpix) -> pd.DataFrame:
    """RELION columns (angles, origins in Angstrom, class = label + 1) of poses in the
    alignment API's conventions (see :func:`geometry.subvolume_pose_to_relion`)."""
    rot, tilt, psi, origin = geometry.subvolume_pose_to_relion(quats, shifts, shape)
    columns = {"rlnAngleRot": rot, "rlnAngleTilt": tilt, "rlnAnglePsi": psi}
    for i, axis in enumerate("XYZ"):
        columns[f"rlnOrigin{axis}Angst"] = origin[:, i] * angpix
    columns["rlnClassNumber"] = np.asarray(labels) + 1
    return pd.DataFrame(columns)


def subtomo_align(
    out,
    templates,
    subvolumes=None,
    star=None,
    tomograms=(),
    mask=None,
    method: str = "zncc",
    max_shifts=(4.0, 4.0, 4.0),
    rotations=((10.0, 5.0), (10.0, 5.0), (10.0, 5.0)),
    cutoff=None,
    tilt=(-60.0, 60.0),
    interpolate: bool = True,
    refine: bool = False,
    angpix=None,
    chunk=None,
    chunk_size: int = 100,
    batch_size: int = 32,
    backend: str = "numpy",
    prior_search=None,
):
    """Align subvolumes (all, or chunk ``chunk``) and write the outputs (module doc).
    ``prior_search``: dict of the local search about STAR priors (range, step, cone,
    inplane in degrees; default :data:`PRIOR_SEARCH`)."""
    out = Path(out)
    if (subvolumes is None) == (star is None):
        raise CryomatchError("give either --subvolumes (a volume stack) or --star")
    if chunk_size < 1 or batch_size < 1:
        raise CryomatchError("chunk_size and batch_size must be at least 1")
    params = {k: v for k, v in locals().items() if k != "out"}
    prov = provenance.record("subtomo align", params)
    xp = get_xp(backend)
    stack, mask_arr, template_voxel = read_templates(templates, mask)
    source = open_source(subvolumes, star, tomograms)
    try:
        what = subvolumes if subvolumes is not None else star
        angpix = pixel_size_from(angpix, *source.pixel_size(), what)
        if template_voxel and abs(template_voxel - angpix) > 0.01 * angpix:
            warnings.warn(
                f"{templates[0]}: the template's voxel size {template_voxel:g} A differs from "
                f"the subvolumes' {angpix:g} A",
                CryomatchWarning,
                stacklevel=2,
            )
        source._angpix = angpix
        if not isinstance(source, TomogramSource) and tuple(source.shape()) != stack.shape[1:]:
            shape = tuple(source.shape())
            raise CryomatchError(
                f"the subvolumes have shape {shape}, the template {stack.shape[1:]}", subvolumes
            )
        if isinstance(source, TomogramSource):
            source._positions = source.positions(angpix)
        n = len(source)
        start, stop = 0, n
        if chunk is not None:
            n_chunks = max(1, math.ceil(n / chunk_size))
            if not 0 <= chunk < n_chunks:
                raise CryomatchError(
                    f"chunk {chunk} does not exist: {n} subvolumes make {n_chunks} chunks"
                )
            start, stop = chunk * chunk_size, min(n, (chunk + 1) * chunk_size)
        if has_priors(source.table):
            check_priors(source.table, what)
            search = {**PRIOR_SEARCH, **(prior_search or {})}
            if method != "zncc" or refine:
                raise CryomatchError(
                    "the local search about priors is ZNCC's (method zncc, no refine)", what
                )
            model = build_local_model(stack, mask_arr, search, cutoff, tilt, interpolate)
            print(
                f"{what}: priors of {n} particles used: searched within {search['range']:g} "
                f"deg (step {search['step']:g}, cone {search.get('cone')}, in-plane "
                f"{search.get('inplane')}) and {max_shifts} voxels of their STAR poses",
                file=sys.stderr,
            )
        else:
            model = build_model(
                stack, mask_arr, method, rotations, cutoff, tilt, interpolate, refine
            )
        columns, sums, counts = align_rows(
            model, source, start, stop, max_shifts, angpix, xp.__name__, batch_size
        )
        table = source.table.iloc[start:stop].reset_index(drop=True)
        table = output_columns(table, columns, source.box_in_subtomogram_frame, angpix)
        optics = source.optics if source.optics is not None else _optics(stack.shape[1:], angpix)
    finally:
        source.close()
    with Outputs() as outputs:
        if chunk is None:
            _write_results(out, optics, table, sums, counts, angpix, prov, outputs)
        else:
            name = chunk_name(chunk)
            blocks = {"optics": optics, "particles": table}
            write_star(out / "chunks" / f"{name}.star", blocks, prov, outputs)
            write_npz(
                out / "chunks" / f"{name}.npz", outputs, sums=sums, counts=counts, angpix=angpix
            )
    return table


def subtomo_merge(out, n_chunks: int):
    """Merge ``chunks/chunk_K.star`` and ``.npz`` (K < n_chunks) into the outputs."""
    out = Path(out)
    prov = provenance.record("subtomo merge", {"n_chunks": n_chunks})
    tables, sums, counts, angpix, optics = [], 0, 0, None, None
    for particles, chunk_optics, z in iter_chunks(out / "chunks", n_chunks):
        tables.append(particles)
        optics = chunk_optics
        sums = sums + z["sums"]
        counts = counts + z["counts"]
        angpix = float(z["angpix"])
    table = pd.concat(tables, ignore_index=True)
    with Outputs() as outputs:
        _write_results(out, optics, table, sums, counts, angpix, prov, outputs)
    return table


def _optics(shape, angpix) -> pd.DataFrame:
    return pd.DataFrame(
        [
            {
                "rlnOpticsGroup": 1,
                "rlnOpticsGroupName": "opticsGroup1",
                "rlnImagePixelSize": angpix,
                "rlnImageSize": shape[-1],
                "rlnImageDimensionality": 3,
            }
        ]
    )


def _write_results(out, optics, table, sums, counts, angpix, prov, outputs):
    blocks = {"particles": table} if optics is None else {"optics": optics, "particles": table}
    write_star(out / "subtomo.star", blocks, prov, outputs)
    labels = provenance.mrc_labels(prov)
    for k in range(len(sums)):
        average = (sums[k] / max(int(counts[k]), 1)).astype(np.float32)
        name = f"average_{k + 1:02d}"
        write_mrc(out / f"{name}.mrc", average, angpix, labels, outputs)
        title = f"template {k + 1}: average of {int(counts[k])} aligned subvolumes"
        save_png(orthogonal_slices(average, title), out / f"{name}.png", outputs)


# --- command line ------------------------------------------------------------------------
def add_arguments(p) -> None:
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    a = sub.add_parser("align", help="align subvolumes (all, or one chunk)")
    src = a.add_mutually_exclusive_group(required=True)
    src.add_argument("--subvolumes", help="MRC volume stack of subvolumes")
    src.add_argument(
        "--star",
        help="STAR of positions in tomograms (with --tomogram) or of subvolume files "
        "(rlnImageName); its angles and origins are priors",
    )
    a.add_argument("--tomogram", action="append", default=[], help="tomogram MRC (repeat)")
    a.add_argument("--template", action="append", required=True, help="template MRC (repeat)")
    a.add_argument("--mask", help="mask MRC (same shape as the templates); default: none")
    a.add_argument("--out", required=True, help="output folder")
    a.add_argument("--method", choices=sorted(METHODS), default="zncc", help="score")
    a.add_argument(
        "--max-shifts",
        type=float,
        nargs=3,
        default=(4.0, 4.0, 4.0),
        metavar=("Z", "Y", "X"),
        help="largest shift per axis, voxels",
    )
    a.add_argument(
        "--rotations",
        type=float,
        nargs=6,
        default=(10.0, 5.0) * 3,
        metavar=("ZMAX", "ZSTEP", "YMAX", "YSTEP", "XMAX", "XSTEP"),
        help="rotation search about z, y, x: (max, step) degrees each",
    )
    a.add_argument("--cutoff", type=float, help="low-pass cutoff, relative frequency (0.5 Nyquist)")
    add_tilt_arguments(a)
    a.add_argument(
        "--no-interpolate",
        dest="interpolate",
        action="store_false",
        help="keep the best grid rotation (no interpolation between grid points)",
    )
    a.add_argument(
        "--refine", action="store_true", help="local rotation search below the grid step"
    )
    a.add_argument("--angpix", type=positive_float, help="pixel size (A) of subvolumes/tomograms")
    a.add_argument("--chunk", type=int, help="align only this chunk (for `subtomo merge`)")
    a.add_argument("--chunk-size", type=positive_int, default=100, help="subvolumes per chunk")
    a.add_argument("--batch-size", type=positive_int, default=32, help="subvolumes read at a time")
    a.add_argument("--backend", choices=("numpy", "cupy"), default="numpy", help="array backend")
    add_prior_arguments(a)
    m = sub.add_parser("merge", help="merge the chunks into the STAR and the averages")
    m.add_argument("--out", required=True, help="output folder (holding chunks/)")
    m.add_argument("--chunks", type=positive_int, required=True, help="number of chunks")


def add_prior_arguments(a) -> None:
    """Flags of the local search about STAR priors (used when the STAR has angles)."""
    a.add_argument("--prior-range", type=float, default=10.0, help="search range, degrees")
    a.add_argument("--prior-step", type=float, default=5.0, help="search step, degrees")
    a.add_argument("--cone", type=float, help="viewing directions within this many degrees")
    a.add_argument("--inplane", type=float, help="in-plane angles within this many degrees")


def prior_search_from(args) -> dict:
    return {
        "range": args.prior_range,
        "step": args.prior_step,
        "cone": args.cone,
        "inplane": args.inplane,
    }


def run(args) -> None:
    if args.action == "merge":
        subtomo_merge(args.out, args.chunks)
        return
    r = args.rotations
    subtomo_align(
        args.out,
        args.template,
        args.subvolumes,
        args.star,
        args.tomogram,
        args.mask,
        args.method,
        tuple(args.max_shifts),
        [(r[0], r[1]), (r[2], r[3]), (r[4], r[5])],
        args.cutoff,
        tilt_from_arguments(args),
        args.interpolate,
        args.refine,
        args.angpix,
        args.chunk,
        args.chunk_size,
        args.batch_size,
        args.backend,
        prior_search_from(args),
    )
