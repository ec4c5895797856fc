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
