"""Atomic writes: every output is written under a temporary name in its own folder and
renamed when complete, so a killed job never leaves a file that looks finished.

:class:`Outputs` groups the files of one stage run: if the run fails, every file it has
already completed is removed too, so bad input leaves no partial output behind.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, outputs: Outputs | None = None):
    """Yield a temporary path beside ``path``; rename it to ``path`` on success.

    The temporary name keeps the suffix (``.stack.mrcs.tmp-XXXX.mrcs``) so that libraries
    that look at the extension still work. On error the temporary file is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; outputs get the usual permissions
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
    if outputs is not None:
        outputs.completed.append(path)


def write_text(path: str | os.PathLike, text: str, outputs: Outputs | None = None) -> None:
    """Write a text file atomically."""
    with atomic_path(path, outputs) as tmp:
        tmp.write_text(text)


class Outputs:
    """The files one stage run writes; all removed again if the run raises.

    Usage::

        with Outputs() as out:
            with out.path("a.mrcs") as tmp:
                ...  # write tmp
    """

    def __init__(self):
        self.completed: list[Path] = []

    def path(self, path: str | os.PathLike):
        return atomic_path(path, self)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            for p in self.completed:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(p)
        return False
