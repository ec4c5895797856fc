"""Stages: read inputs, call kernels in batches that fit memory, write outputs atomically.

Each stage module offers a Python function, plus ``add_arguments(parser)`` and
``run(args)`` for its ``cryomatch STAGE`` command (see :data:`COMMANDS`).
"""

# (command name, module under cryomatch.stages, one-line help); one line per stage.
COMMANDS = [
    ("simulate", "simulate", "make demo data with known answers (particles, ...)"),
    ("preprocess", "preprocess", "normalize, Fourier-crop and split particle stacks"),
    ("subtomo", "subtomo", "align subvolumes to templates (ZNCC/PCC, rotations, missing wedge)"),
]
