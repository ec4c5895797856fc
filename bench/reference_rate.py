"""The reference rate the benchmarks divide by: numpy's float32 matrix product."""

from __future__ import annotations

import time

import numpy as np


def matmul_gflops() -> float:
    """numpy float32 1500 x 1500 matrix product rate (GFLOP/s): 3 runs after a warm-up."""
    a = np.random.default_rng(0).normal(size=(1500, 1500)).astype(np.float32)
    a @ a
    t = time.perf_counter()
    for _ in range(3):
        a @ a
    return 3 * 2 * 1500**3 / (time.perf_counter() - t) / 1e9
