"""The one place for rotation, shift and mirror conventions (RELION's, everywhere).

Coordinates are (x, y, z) vectors in Angstrom or pixels about the box centre
``box // 2`` (RELION, SPIDER and XMIPP put the centre of an n-pixel box at n // 2);
array index order is (z, y, x), so x is the last (fastest) axis.

Euler angles (rlnAngleRot, rlnAngleTilt, rlnAnglePsi) are ZYZ, in degrees. RELION's
matrix ``A = Rz(psi) Ry(tilt) Rz(rot)`` (passive form, RELION's ``Euler_angles2matrix``)
takes a point of the 3D map into the particle image's frame: the projection image is
``P(x, y) = integral of V(A^T (x, y, z)) dz``, and in Fourier space the image's central
slice is ``F_P(k) = F_V(A^T (kx, ky, 0))``. In scipy's terms
``A = Rotation.from_euler('ZYZ', [rot, tilt, psi]).inv()``.

Origins (rlnOriginXAngst, rlnOriginYAngst) translate the particle image back onto the
centred projection: ``image(r) = P(r + origin)``, i.e. the particle sits at
``centre - origin`` in the image (RELION's ObservationModel::predictObservation shifts the
projection by ``-origin``). :func:`displacement_from_origin` converts.

In-plane (2D) transforms: ``image(r) = ref(M A2^T (r + origin))`` with
``A2 = [[cos psi, sin psi], [-sin psi, cos psi]]`` (the 2D part of RELION's A for
rot = tilt = 0) and ``M = diag(-1, 1)`` when the mirror flag is set (x -> -x of the
reference, applied before the rotation).
"""

from __future__ import annotations

import warnings

import numpy as np
from scipy.spatial.transform import Rotation


# --- 3D: RELION Euler angles ------------------------------------------------------------
def relion_rotation(rot, tilt, psi) -> Rotation:
    """scipy Rotation whose matrix is RELION's A for Euler angles in degrees."""
    angles = np.stack(np.broadcast_arrays(rot, tilt, psi), axis=-1)
    return Rotation.from_euler("ZYZ", angles, degrees=True).inv()


def euler_to_matrix(rot, tilt, psi) -> np.ndarray:
    """RELION's A (..., 3, 3) for Euler angles in degrees; acts on (x, y, z)."""
    return relion_rotation(rot, tilt, psi).as_matrix()


def matrix_to_euler(matrix) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rot, tilt, psi) in degrees from RELION matrices (..., 3, 3); tilt in [0, 180]."""
    matrix = np.asarray(matrix, dtype=np.float64)
    inv = Rotation.from_matrix(np.swapaxes(matrix, -1, -2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # gimbal lock at tilt 0 or 180 is fine
        angles = inv.as_euler("ZYZ", degrees=True)
    return angles[..., 0], angles[..., 1], angles[..., 2]


def rotation_to_euler(rotation: Rotation):
    """(rot, tilt, psi) in degrees of a scipy Rotation whose matrix is RELION's A."""
    return matrix_to_euler(rotation.as_matrix())


def viewing_direction(rot, tilt) -> np.ndarray:
    """Unit vector (..., 3) of the projection direction in the map's frame (A^T e_z)."""
    rot, tilt = np.deg2rad(rot), np.deg2rad(tilt)
    return np.stack([np.sin(tilt) * np.cos(rot), np.sin(tilt) * np.sin(rot), np.cos(tilt)], axis=-1)


def angle_between_directions(d1, d2) -> np.ndarray:
    """Angle in degrees between unit vectors (..., 3)."""
    dot = np.clip(np.sum(np.asarray(d1) * np.asarray(d2), axis=-1), -1.0, 1.0)
    return np.rad2deg(np.arccos(dot))


def angle_between_rotations(a1, a2) -> np.ndarray:
    """Rotation angle in degrees of a1 a2^T for matrices (..., 3, 3)."""
    rel = np.asarray(a1) @ np.swapaxes(np.asarray(a2), -1, -2)
    cos = (np.trace(rel, axis1=-2, axis2=-1) - 1.0) / 2.0
    return np.rad2deg(np.arccos(np.clip(cos, -1.0, 1.0)))


def random_rotations(n: int, rng: np.random.Generator) -> Rotation:
    """n rotations uniform on SO(3), drawn from ``rng``."""
    return Rotation.random(n, random_state=rng)


# --- origins and displacements ------------------------------------------------------------
def displacement_from_origin(origin):
    """Where the particle sits relative to the box centre, given RELION's origin (same units)."""
    return -np.asarray(origin)


def origin_from_displacement(displacement):
    """RELION's origin for a particle displaced by ``displacement`` from the box centre."""
    return -np.asarray(displacement)


# --- 2D: in-plane rotation, shift and mirror ----------------------------------------------
def inplane_matrix(psi) -> np.ndarray:
    """RELION's 2D matrix A2 (..., 2, 2) for in-plane angles in degrees; acts on (x, y)."""
    p = np.deg2rad(np.asarray(psi, dtype=np.float64))
    c, s = np.cos(p), np.sin(p)
    return np.stack([np.stack([c, s], -1), np.stack([-s, c], -1)], -2)


def _mirror_matrix(mirror) -> np.ndarray:
    m = np.asarray(mirror, dtype=bool)
    out = np.zeros(m.shape + (2, 2))
    out[..., 0, 0] = np.where(m, -1.0, 1.0)
    out[..., 1, 1] = 1.0
    return out


def image_to_reference_matrix(psi, mirror) -> np.ndarray:
    """The 2x2 matrix L = M A2^T with ``image(r) = ref(L (r + origin))``."""
    return _mirror_matrix(mirror) @ np.swapaxes(inplane_matrix(psi), -1, -2)


def recentre_origin(psi, origin, mirror, centre_shift):
    """New origins after the reference is re-centred as ``ref_new(s) = ref_old(s + c)``.

    ``image(r) = ref_old(L (r + o)) = ref_new(L (r + o) - c) = ref_new(L (r + o - L^-1 c))``,
    so ``o' = o - L^-1 c`` with ``L^-1 = A2 M``. Shapes broadcast: psi (...), origin (..., 2),
    mirror (...), c (..., 2), all in the same length unit.
    """
    linv = inplane_matrix(psi) @ _mirror_matrix(mirror)
    return np.asarray(origin) - np.einsum("...ij,...j->...i", linv, np.asarray(centre_shift))


# --- single-axis tilt series ----------------------------------------------------------------
# A tilt series is a set of projections at Euler angles (rot, tilt, psi) = (0, theta, 0): the
# map turns about its y axis, so a map point (X, Y, Z) lands on the image at
# (u, v) = (X cos theta - Z sin theta, Y) (first two rows of RELION's A; see above). In an
# aligned stack the tilt axis therefore runs along the image's y axis (IMOD's convention too).
#
# Raw images may have the axis at an angle phi (degrees, counter-clockwise from the image's
# +y axis: IMOD's and SerialEM's "tilt axis angle") and be displaced. The alignment of image i
# is IMOD's .xf transform: ``aligned(R q + s_i) = raw(q)`` for coordinates q about the image
# centre, with R = :func:`tilt_axis_rotation` (phi) and s_i the shift (x, y) in pixels; in
# words, the shift moves the (rotated) image content by +s_i. The simulator writes the same
# shifts as truth.
def tilt_matrices(angles) -> np.ndarray:
    """RELION's A (n, 3, 3) for tilt angles in degrees (rotation about the map's y axis)."""
    angles = np.asarray(angles, dtype=np.float64)
    return euler_to_matrix(np.zeros_like(angles), angles, np.zeros_like(angles))


def tilt_projection_x(x, z, angles) -> np.ndarray:
    """Image x coordinate ``X cos(theta) - Z sin(theta)`` of map points (X, Z) at each tilt
    (angles in degrees; broadcasts angles (n, 1, ...) against points)."""
    t = np.deg2rad(np.asarray(angles, dtype=np.float64))
    return np.asarray(x) * np.cos(t) - np.asarray(z) * np.sin(t)


def tilt_axis_rotation(phi) -> np.ndarray:
    """The 2x2 matrix (on (x, y)) that turns a tilt axis at ``phi`` degrees counter-clockwise
    from +y onto +y: a rotation by -phi (IMOD .xf's A11 A12 / A21 A22)."""
    p = np.deg2rad(float(phi))
    c, s = np.cos(p), np.sin(p)
    return np.array([[c, s], [-s, c]])


def unobservable_shift_basis(angles) -> tuple[np.ndarray, np.ndarray]:
    """Bases (n, k) of the shift components a tilt series cannot determine.

    Moving the object by (tx, ty, tz) moves its projection at tilt theta by
    (tx cos theta - tz sin theta, ty) (:func:`tilt_projection_x`); a constant x shift is the
    position of the tilt axis, which alignment alone fixes only weakly. So shifts across the
    axis (x) are known up to span(1, cos, sin), shifts along it (y) up to a constant.
    """
    t = np.deg2rad(np.asarray(angles, dtype=np.float64))
    across = np.stack([np.ones_like(t), np.cos(t), np.sin(t)], axis=1)
    return across, np.ones((len(t), 1))


def remove_unobservable(shifts, angles) -> np.ndarray:
    """Shifts (n, 2) = (x, y) minus their least-squares fit by the unobservable components
    (:func:`unobservable_shift_basis`); compare two alignments after this."""
    shifts = np.asarray(shifts, dtype=np.float64)
    out = shifts.copy()
    for column, basis in enumerate(unobservable_shift_basis(angles)):
        coef, *_ = np.linalg.lstsq(basis, shifts[:, column], rcond=None)
        out[:, column] -= basis @ coef
    return out


def wrap_degrees(angle):
    """Angles in degrees wrapped to (-180, 180]."""
    return 180.0 - np.mod(180.0 - np.asarray(angle, dtype=np.float64), 360.0)


def compose_inplane(psi1, mirror1, origin1, psi2, mirror2, origin2):
    """(psi, mirror, origin) of ``image = ref2 o T`` where ``image = ref1 o T1`` and
    ``ref1 = ref2 o T2`` (``ref o T`` is ``r -> ref(L (r + o))``, module docstring).

    ``L = L2 L1`` and, since ``M A2(a)^T M = A2(-a)^T``, ``psi = psi1 + (-1)^mirror1 psi2``,
    ``mirror = mirror1 xor mirror2``, ``origin = origin1 + L1^-1 origin2``. Shapes broadcast:
    angles in degrees (...), mirrors (...), origins (..., 2).
    """
    m1 = np.asarray(mirror1, dtype=bool)
    psi = np.asarray(psi1, dtype=np.float64) + np.where(m1, -1.0, 1.0) * np.asarray(psi2)
    mirror = np.logical_xor(m1, np.asarray(mirror2, dtype=bool))
    origin = recentre_origin(psi1, origin1, mirror1, -np.asarray(origin2, dtype=np.float64))
    return wrap_degrees(psi), mirror, origin


def invert_inplane(psi, mirror, origin):
    """(psi, mirror, origin) of ``T^-1``: if ``image = ref o T`` then ``ref = image o T^-1``.

    ``T^-1(s) = L^-1 s - o = L^-1 (s - L o)``, and ``L^-1 = A2 M`` is ``M A2(psi)^T`` with a
    mirror (the angle is kept) or ``A2(-psi)^T`` without.
    """
    m = np.asarray(mirror, dtype=bool)
    psi = np.asarray(psi, dtype=np.float64)
    matrix = image_to_reference_matrix(psi, m)
    new_origin = -np.einsum("...ij,...j->...i", matrix, np.asarray(origin, dtype=np.float64))
    return wrap_degrees(np.where(m, psi, -psi)), m, new_origin


def sparx_to_relion(alpha, sx, sy, mirror):
    """SPARX/EMAN2 2D alignment parameters -> (psi, origin (..., 2), mirror) of this module.

    SPARX's ``rot_shift2D(image, alpha, sx, sy, mirror)`` (EMAN2 Transform "2D", applied
    as rotate, shift, then mirror x -> -x: Penczek, Radermacher and Frank 1992) moves the
    image point p to ``T(p) = M (R(alpha) p + t)`` with ``R(alpha) = [[c, s], [-s, c]]``,
    and the result matches the reference: ``image(p) = ref(T(p))``. Here
    ``T(p) = L (p + origin)`` with ``L = M A2(psi)^T``: ``R(alpha) = A2(alpha)``, so
    ``psi = -alpha`` and ``origin = L^-1 M t = A2(alpha)^T t``. Shifts in pixels.
    """
    alpha = np.asarray(alpha, dtype=np.float64)
    t = np.stack(np.broadcast_arrays(np.asarray(sx, np.float64), np.asarray(sy, np.float64)), -1)
    origin = np.einsum("...ij,...j->...i", np.swapaxes(inplane_matrix(alpha), -1, -2), t)
    return wrap_degrees(-alpha), origin, np.asarray(mirror, dtype=bool)


def relion_to_sparx(psi, origin, mirror):
    """(alpha, sx, sy, mirror) for SPARX from (psi, origin (..., 2), mirror); inverse of
    :func:`sparx_to_relion`. Shifts in pixels."""
    psi = np.asarray(psi, dtype=np.float64)
    rotation = np.swapaxes(inplane_matrix(psi), -1, -2)  # t = A2(psi)^T origin
    t = np.einsum("...ij,...j->...i", rotation, np.asarray(origin, dtype=np.float64))
    return wrap_degrees(-psi), t[..., 0], t[..., 1], np.asarray(mirror, dtype=bool)


def defocus_angle_in_reference_frame(defocus_angle, psi, mirror):
    """rlnDefocusAngle (degrees) of an image's CTF seen in its reference's frame.

    The image mapped onto its reference, ``aligned(s) = image(L^-1 s - o)``, has the Fourier
    transform ``F_image(L^-1 k)`` (times a phase), so its CTF is ``CTF(L^-1 k)``: the
    astigmatism axis turns with the image (``angle + psi``) and a mirror reflects it
    (``-(angle + psi)``); the CTF depends on the axis modulo 180 degrees.
    """
    angle = np.asarray(defocus_angle, dtype=np.float64) + np.asarray(psi, dtype=np.float64)
    return np.where(np.asarray(mirror, dtype=bool), -angle, angle)


# --- polar Fourier search: in-plane turns ---------------------------------------------------
def psi_from_polar_turn(turn, n_inplanes: int):
    """RELION psi (degrees, [0, 360)) of an image best matched by a psi = 0 template turned by
    ``turn`` angle steps in :func:`cryomatch.kernels.polar.rotational_correlation` (which
    correlates image(l) with reference(l - turn)). The transform of an image at psi is
    the template's at theta + psi (F_img(k) = F_V(A^T k), A = Rz(psi) A0), so
    turn = -psi / step."""
    return np.mod(-360.0 * np.asarray(turn, dtype=np.float64) / n_inplanes, 360.0)


def polar_turn_from_psi(psi, n_inplanes: int):
    """Inverse of :func:`psi_from_polar_turn`: the (real-valued) turn in angle steps, [0, n)."""
    return np.mod(-np.asarray(psi, dtype=np.float64) * n_inplanes / 360.0, n_inplanes)


def inplane_angle_between(a1, a2) -> np.ndarray:
    """In-plane (twist) angle in degrees, (-180, 180], of the rotation a1 a2^T about the image
    z axis (swing-twist decomposition): the in-plane error of pose a1 against a2 (RELION
    matrices (..., 3, 3)), apart from any change of viewing direction."""
    rel = np.asarray(a1) @ np.swapaxes(np.asarray(a2), -1, -2)
    return np.rad2deg(np.arctan2(rel[..., 0, 1] - rel[..., 1, 0], rel[..., 0, 0] + rel[..., 1, 1]))


# --- 3D subvolumes: rotations acting on array (z, y, x) vectors ----------------------------
# Subvolume alignment (acryo's convention, kept so that user code ports): a rotation R acts
# on (z, y, x) index vectors about a centre c, and a subvolume is the template moved as
# ``x -> R (x - c) + c + shift``, i.e. ``subvolume(x) = template(R^T (x - c - shift) + c)``.
# acryo rotates about c = shape / 2 - 0.5; RELION's box centre is shape // 2.
def acryo_centre(shape) -> np.ndarray:
    """acryo's rotation centre ``shape / 2 - 0.5`` of a (z, y, x) box."""
    return np.asarray(shape, dtype=np.float64) / 2 - 0.5


def relion_centre(shape) -> np.ndarray:
    """RELION's box centre ``shape // 2`` of a (z, y, x) box."""
    return (np.asarray(shape) // 2).astype(np.float64)


def change_rotation_centre(shift, matrix, old_centre, new_centre) -> np.ndarray:
    """The shift that describes the same motion about another centre.

    ``R (x - c1) + c1 + s1 == R (x - c2) + c2 + s2`` for ``s2 = s1 + (I - R)(c1 - c2)``.
    shift (..., 3), matrix (..., 3, 3), centres (3,), all in one axis order.
    """
    d = np.asarray(old_centre, dtype=np.float64) - np.asarray(new_centre, dtype=np.float64)
    rd = np.einsum("...ij,j->...i", np.asarray(matrix, dtype=np.float64), d)
    return np.asarray(shift, dtype=np.float64) + d - rd


def zyx_to_relion_matrix(matrix_zyx) -> np.ndarray:
    """RELION's A (acting on (x, y, z)) of a subvolume rotation R acting on (z, y, x).

    RELION's subtomogram is ``S(p) = V(A^T (p + origin))`` (p = (x, y, z) about the box
    centre); with ``S(x) = V(R^T (x - d))`` in (z, y, x) order this is A = P R P with P the
    axis reversal, and origin = -d in (x, y, z) order.
    """
    return np.asarray(matrix_zyx, dtype=np.float64)[..., ::-1, ::-1]


def relion_to_zyx_matrix(matrix_xyz) -> np.ndarray:
    """Inverse of :func:`zyx_to_relion_matrix` (the axis reversal is its own inverse)."""
    return np.asarray(matrix_xyz, dtype=np.float64)[..., ::-1, ::-1]


def subvolume_pose_to_relion(quat, shift_zyx, shape):
    """(rot, tilt, psi) in degrees and RELION origins (..., 3) as (x, y, z) pixels of
    subvolume poses given as scipy quaternions (x, y, z, w) acting on (z, y, x) about
    acryo's centre, and shifts (..., 3) in (z, y, x) pixels (see the section comment)."""
    matrix = Rotation.from_quat(np.asarray(quat, dtype=np.float64)).as_matrix()
    shift = change_rotation_centre(shift_zyx, matrix, acryo_centre(shape), relion_centre(shape))
    rot, tilt, psi = matrix_to_euler(zyx_to_relion_matrix(matrix))
    return rot, tilt, psi, origin_from_displacement(shift[..., ::-1])


def relion_to_subvolume_pose(rot, tilt, psi, origin_xyz, shape):
    """Inverse of :func:`subvolume_pose_to_relion`: quaternions (x, y, z, w) acting on
    (z, y, x) about acryo's centre and shifts (..., 3) in (z, y, x) pixels."""
    matrix = relion_to_zyx_matrix(euler_to_matrix(rot, tilt, psi))
    shift = displacement_from_origin(np.asarray(origin_xyz, dtype=np.float64))[..., ::-1]
    shift = change_rotation_centre(shift, matrix, relion_centre(shape), acryo_centre(shape))
    return Rotation.from_matrix(matrix).as_quat(), shift


def compose_subvolume_poses(prior_quat, prior_shift, quat, shift):
    """The pose of a subvolume found as a correction (quat, shift) in the frame of its prior
    (prior_quat, prior_shift), all in the alignment API's convention (section comment).

    The search sees the subvolume turned back by the prior, ``v_p(y) = v(R_P (y - c) + c +
    s_P)``, and finds ``v_p = template moved by (R_C, s_C)``; so ``v = template moved by
    (R_C, s_C), then by (R_P, s_P)``: ``R = R_P R_C``, ``s = s_P + R_P s_C``. In RELION's
    matrices this is ``A = A_P A_C`` (the correction acts first, in the reference's frame).
    Returns (quats (..., 4), shifts (..., 3) z, y, x).
    """
    rp = Rotation.from_quat(np.asarray(prior_quat, dtype=np.float64))
    rc = Rotation.from_quat(np.asarray(quat, dtype=np.float64))
    total = (rp * rc).as_quat()
    return total, np.asarray(prior_shift, dtype=np.float64) + rp.apply(np.asarray(shift))
