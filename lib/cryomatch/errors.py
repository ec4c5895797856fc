"""Errors and warnings that reach the user: each names the file and the problem."""

from __future__ import annotations

import os


class CryomatchError(Exception):
    """An input problem the user can fix; the command line prints it and exits non-zero."""

    def __init__(self, problem: str, path: str | os.PathLike | None = None):
        self.path = None if path is None else os.fspath(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if self.path else problem)


class CryomatchWarning(UserWarning):
    """Something suspicious in the input that cryomatch works around."""


def available_memory() -> int | None:
    """Bytes of memory this process may still use: the system's available memory, or the
    cgroup's limit (a SLURM job's --mem) when smaller; None where unknown."""
    found = []
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    found.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        if limit.isdigit():
            found.append(int(limit))
    except OSError:
        pass
    return min(found) if found else None


def check_memory(nbytes: float, what: str, hint: str = "") -> None:
    """Raise before any work when ``what`` needs more than the available memory (bytes)."""
    available = available_memory()
    if available is not None and nbytes > available:
        raise CryomatchError(
            f"{what} needs about {nbytes / 2**30:.1f} GiB of memory, more than the "
            f"{available / 2**30:.1f} GiB available" + (f": {hint}" if hint else "")
        )
