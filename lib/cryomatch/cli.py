"""The ``cryomatch`` command: one subcommand per stage (``cryomatch STAGE --help``).

Whatever stops a command is one line on stderr, ``cryomatch: error: FILE: problem``, and a
non-zero exit status: 2 for input problems (:class:`CryomatchError`, bad options), 1 for
the system (a full disk, a permission, memory) and for bugs (their traceback is printed
above the line). Options take the argparse types below, so out-of-range numbers are
refused before any work starts.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import sys
import traceback
import warnings

from . import __version__, provenance
from .errors import CryomatchError, CryomatchWarning
from .stages import COMMANDS


def _number(kind, low, inclusive: bool, name: str):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            what = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if value != value or (value < low if inclusive else value <= low):  # NaN too
            bound = f"at least {low}" if inclusive else f"greater than {low}"
            raise argparse.ArgumentTypeError(f"{text} is out of range: must be {bound}")
        return value

    parse.__name__ = name  # argparse names the type in its messages
    return parse


# Validated argparse types for stage options (e.g. ``type=positive_int``).
positive_int = _number(int, 1, True, "positive integer")
nonnegative_int = _number(int, 0, True, "non-negative integer")
positive_float = _number(float, 0.0, False, "positive number")
nonnegative_float = _number(float, 0.0, True, "non-negative number")


class _Parser(argparse.ArgumentParser):
    """Bad options are one line too (``--help`` shows the usage)."""

    def error(self, message):
        self.exit(2, f"cryomatch: error: {self.prog}: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="cryomatch",
        description="Align and score cryo-EM and cryo-ET images against references.",
    )
    parser.add_argument("--version", action="version", version=f"cryomatch {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="STAGE")
    for name, module, help_text in COMMANDS:
        mod = importlib.import_module(f"cryomatch.stages.{module}")
        p = sub.add_parser(
            name,
            help=help_text,
            description=mod.__doc__.strip().split("\n\n")[0],
            formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        )
        mod.add_arguments(p)
        p.set_defaults(run=mod.run)
    return parser


def _show_warning(message, category, filename, lineno, file=None, line=None):
    label = "warning" if issubclass(category, CryomatchWarning) else category.__name__
    print(f"cryomatch: {label}: {message}", file=sys.stderr)


def os_error_message(exc: OSError) -> str:
    """'FILE: cause' for an OSError (a full disk, a permission, a missing folder...)."""
    cause = exc.strerror or errno.errorcode.get(exc.errno or 0) or str(exc)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        cause += " (free some space or write the outputs elsewhere)"
    if exc.filename is None:
        return cause
    names = [exc.filename] + ([exc.filename2] if exc.filename2 else [])
    return f"{': '.join(os.fspath(n) for n in names)}: {cause}"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    provenance.set_command(["cryomatch", *argv])
    warnings.showwarning = _show_warning
    try:
        args.run(args)
    except CryomatchError as exc:
        return _error(str(exc), 2)
    except OSError as exc:
        return _error(os_error_message(exc), 1)
    except MemoryError:
        return _error("out of memory: lower the batch size or the data size", 1)
    except KeyboardInterrupt:
        return _error("interrupted", 130)
    except Exception as exc:  # a bug: the traceback goes to the log, one line last
        traceback.print_exc()
        return _error(f"internal error ({type(exc).__name__}: {exc}); traceback above", 1)
    return 0


def _error(message: str, status: int) -> int:
    print(f"cryomatch: error: {message}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
