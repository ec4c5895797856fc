"""Atomic writes: every output is written under a temporary name in its own folder and
renamed when complete, so a killed job never leaves a file that looks finished.

:class:`Outputs` groups the files of one stage run: if the run fails, every file it has
already completed is removed too (and the folders made for them, when left empty), so bad
input leaves no partial output behind.

Temporaries are hidden files ``.NAME.tmp-XXXX.SUFFIX`` beside ``NAME``; the ones a killed
run left behind are removed when ``NAME`` is written again. Write errors (a full disk, a
folder without write permission) are raised as :class:`OSError` naming ``NAME``, not the
temporary. Memory-mapped outputs reserve their disk blocks first (:func:`mapped`), so a full
disk is an error, not a SIGBUS when a page is first written.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from pathlib import Path

_UMASK = os.umask(0)
os.umask(_UMASK)


def temporaries(path: str | os.PathLike) -> list[Path]:
    """The temporary files of ``path`` (its own hidden ``.NAME.tmp-*`` siblings)."""
    path = Path(path)
    if not path.parent.is_dir():
        return []
    return sorted(path.parent.glob(f".{glob_escape(path.name)}.tmp-*"))


def glob_escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, outputs: Outputs | None = None):
    """Yield a temporary path beside ``path``; rename it to ``path`` on success.

    The temporary name keeps the suffix (``.stack.mrcs.tmp-XXXX.mrcs``) so that libraries
    that look at the extension still work. On error the temporary file is removed, and an
    OSError about the temporary is raised again naming ``path``.
    """
    path = Path(path)
    created = _make_folders(path.parent)
    if outputs is not None:
        outputs.folders += created
    for stale in temporaries(path):  # left by a killed run that wrote this file
        with contextlib.suppress(FileNotFoundError):
            stale.unlink()
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", suffix=path.suffix, dir=path.parent)
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror, str(path)) from None
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; outputs get the usual permissions
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        if outputs is None:
            _remove_empty(created)
        if isinstance(exc, OSError) and exc.filename in (None, tmp):
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
        raise
    if outputs is not None:
        outputs.completed.append(path)


def _make_folders(folder: Path) -> list[Path]:
    """mkdir -p ``folder``; returns the folders it created, outermost first."""
    missing = [p for p in [folder, *folder.parents] if not p.exists()][::-1]
    folder.mkdir(parents=True, exist_ok=True)
    return missing


def _remove_empty(folders: list[Path]) -> None:
    for folder in reversed(folders):  # innermost first
        with contextlib.suppress(OSError):
            folder.rmdir()  # only if empty


def reserve(path: str | os.PathLike) -> None:
    """Allocate the disk blocks of a file of its present size (a sparse file made for
    memory mapping): a full disk raises OSError here instead of SIGBUS later."""
    fd = os.open(path, os.O_RDWR)
    try:
        size = os.fstat(fd).st_size
        if size:
            os.posix_fallocate(fd, 0, size)
    finally:
        os.close(fd)


def mapped(ctx, create, close=None):
    """Enter the :func:`atomic_path` context ``ctx``, memory-map the temporary with
    ``create(tmp)`` and reserve its disk space; returns what ``create`` returned. On any
    error, ``close(obj)`` it and leave nothing behind. Finish with :func:`finish_mapped`."""
    tmp = ctx.__enter__()
    obj = None
    try:
        obj = create(tmp)
        reserve(tmp)
        return obj
    except BaseException:
        if obj is not None and close is not None:
            with contextlib.suppress(Exception):
                close(obj)
        ctx.__exit__(*sys.exc_info())  # removes the temporary (may raise a clearer error)
        raise


def finish_mapped(ctx, close, exc: BaseException | None) -> None:
    """Close a memory-mapped output (``close()``: flush, header) and rename it into place;
    with ``exc`` (the error that stopped the writing) or an error while closing, remove the
    temporary and raise."""
    if exc is None:
        try:
            close()
        except BaseException as error:  # e.g. a full disk while flushing
            exc = error
    else:
        with contextlib.suppress(Exception):
            close()
    if exc is None:
        ctx.__exit__(None, None, None)
        return
    ctx.__exit__(type(exc), exc, exc.__traceback__)  # may raise a clearer OSError
    raise exc


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
        self.folders: list[Path] = []  # created for the outputs, removed again if empty

    def path(self, path: str | os.PathLike):
        return atomic_path(path, self)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            for p in self.completed:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(p)
            _remove_empty(self.folders)
        return False
