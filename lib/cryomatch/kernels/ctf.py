"""Contrast transfer function, RELION's definition (Scheres 2012; ctf.h).

``CTF(k) = -sin(chi)`` with ``chi = pi lambda dz k^2 - (pi/2) Cs lambda^3 k^4 ... `` written
here in the positive form ``CTF = sin(pi lambda z(phi) k^2 - (pi/2) Cs lambda^3 k^4 + phase
+ asin(Q0)) * exp(-B k^2 / 4)``, where ``z(phi) = (U + V)/2 + (U - V)/2 cos(2 (phi - angle))``
is the defocus (positive = underfocus) along the azimuth ``phi = atan2(ky, kx)`` and
``angle`` is rlnDefocusAngle, the azimuth of the U axis from x. Low frequencies get
``sin(asin(Q0)) = Q0 > 0``: positive density stays positive (particles white, as RELION's
extracted and contrast-inverted images).
"""

from __future__ import annotations

import numpy as np

from ..backend import array_module


def electron_wavelength(voltage_kv):
    """Relativistic electron wavelength in Angstrom for an acceleration voltage in kV."""
    volts = np.asarray(voltage_kv, dtype=np.float64) * 1e3
    return 12.2642598 / np.sqrt(volts * (1.0 + 0.978466e-6 * volts))


def ctf(
    kx,
    ky,
    defocus_u,
    defocus_v,
    defocus_angle,
    voltage,
    cs,
    amplitude_contrast,
    phase_shift=0.0,
    bfactor=0.0,
):
    """CTF at spatial frequencies (kx, ky) in 1/Angstrom.

    Parameter arrays of shape (n,) give one CTF per particle: the result is (n, *k.shape).
    Scalars give one CTF of k's shape. Defocus in Angstrom, angles in degrees, voltage in kV,
    Cs in mm, B-factor in Angstrom^2.
    """
    xp = array_module(kx)
    params = [
        defocus_u,
        defocus_v,
        defocus_angle,
        voltage,
        cs,
        amplitude_contrast,
        phase_shift,
        bfactor,
    ]
    batched = any(np.ndim(p) > 0 for p in params)
    params = [np.asarray(p, dtype=np.float64) for p in params]
    if batched:
        n = max(p.size for p in params)
        params = [np.broadcast_to(p.reshape(-1), (n,)) for p in params]
    du, dv, dang, volt, cs_mm, q0, phase, bfac = params
    lam = electron_wavelength(volt)
    expand = (slice(None),) + (None,) * np.ndim(kx) if batched else ()

    def col(p):
        return xp.asarray(p[expand] if batched else p)

    k2 = kx * kx + ky * ky
    azimuth = xp.arctan2(ky, kx)
    defocus = 0.5 * (col(du) + col(dv)) + 0.5 * (col(du) - col(dv)) * xp.cos(
        2.0 * (azimuth - col(np.deg2rad(dang)))
    )
    chi = (
        np.pi * col(lam) * defocus * k2
        - 0.5 * np.pi * col(cs_mm * 1e7 * lam**3) * k2 * k2
        + col(np.deg2rad(phase) + np.arcsin(q0))
    )
    out = xp.sin(chi)
    if np.any(bfac != 0):
        out = out * xp.exp(-col(bfac) * k2 / 4.0)
    return out
