"""Progress bars that end up readable in Snakemake log files."""

from __future__ import annotations

import sys

from tqdm.auto import tqdm


def progress(iterable=None, total=None, desc=None, unit="it"):
    """tqdm to stderr; updates at most every few seconds when stderr is a file (a log)."""
    interactive = sys.stderr.isatty()
    return tqdm(
        iterable,
        total=total,
        desc=desc,
        unit=unit,
        file=sys.stderr,
        mininterval=0.2 if interactive else 5.0,
        dynamic_ncols=interactive,
        ascii=not interactive,
        delay=1.0,  # short runs (and errors in the first second) print no bar
    )
