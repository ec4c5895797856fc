"""Array backends: numpy everywhere, cupy where configured and available.

Kernels take arrays and find their module with :func:`array_module`; stages pick the
backend once with :func:`get_xp` and move results back with :func:`to_numpy`.
"""

from __future__ import annotations

import numpy as np

from .errors import CryomatchError

try:  # cupy is optional
    import cupy as _cupy
except Exception:  # ImportError, or a CUDA runtime that fails to load
    _cupy = None


def cupy_available() -> bool:
    """True when cupy imports and sees at least one CUDA device."""
    if _cupy is None:
        return False
    try:
        return _cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


def get_xp(name: str = "numpy"):
    """Return the array module for a backend name ('numpy' or 'cupy')."""
    if name == "numpy":
        return np
    if name == "cupy":
        if not cupy_available():
            raise CryomatchError(
                "backend 'cupy' was asked for, but cupy or a CUDA GPU is not available"
            )
        return _cupy
    raise CryomatchError(f"unknown backend {name!r} (use 'numpy' or 'cupy')")


def array_module(x):
    """numpy or cupy, whichever owns ``x``."""
    if _cupy is not None and isinstance(x, _cupy.ndarray):
        return _cupy
    return np


def fft_module(xp):
    """scipy.fft for numpy (multi-threaded with ``workers``), cupyx.scipy.fft for cupy."""
    if xp is np:
        import scipy.fft

        return scipy.fft
    import cupyx.scipy.fft

    return cupyx.scipy.fft


def to_numpy(x):
    """A numpy copy (or view) of a numpy or cupy array."""
    if _cupy is not None and isinstance(x, _cupy.ndarray):
        return _cupy.asnumpy(x)
    return np.asarray(x)
