"""``cryomatch simulate KIND``: demo data with known answers, one module per kind."""

from __future__ import annotations

import importlib

# (kind, module under cryomatch.stages.simulate, help); one line per kind.
KINDS = [
    ("particles", "particles", "particle images of phantom structures or maps, with CTF and noise"),
    ("tiltseries", "tiltseries", "tilt series of an ellipsoid-and-bead phantom, known shifts"),
    ("views", "views", "images of a few distinct views, turned, mirrored, shifted (2D classes)"),
    ("subvolumes", "subvolumes", "subvolumes of phantoms, rotated, shifted, missing wedge, noise"),
]


def add_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="kind", required=True, metavar="KIND")
    for kind, module, help_text in KINDS:
        mod = importlib.import_module(f"{__name__}.{module}")
        p = sub.add_parser(kind, help=help_text, description=mod.__doc__.strip().split("\n\n")[0])
        mod.add_arguments(p)
        p.set_defaults(simulate_run=mod.run)


def run(args) -> None:
    args.simulate_run(args)
