"""The ``cryomatch`` command: one subcommand per stage (``cryomatch STAGE --help``)."""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings

from . import __version__, provenance
from .errors import CryomatchError, CryomatchWarning
from .stages import COMMANDS


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
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


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    provenance.set_command(["cryomatch", *argv])
    warnings.showwarning = _show_warning
    try:
        args.run(args)
    except CryomatchError as exc:
        print(f"cryomatch: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
