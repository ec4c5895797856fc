"""Stages: read inputs, call kernels in batches that fit memory, write outputs atomically.

Each stage module offers a Python function, plus ``add_arguments(parser)`` and
``run(args)`` for its ``cryomatch STAGE`` command (see :data:`COMMANDS`).
"""

# (command name, module under cryomatch.stages, one-line help); one line per stage.
COMMANDS = [
    ("simulate", "simulate", "make demo data with known answers (particles, ...)"),
    ("preprocess", "preprocess", "normalize, Fourier-crop and split particle stacks"),
    ("tomo-align", "tomo.align", "align a tilt series (shifts, tilt axis) and reconstruct it"),
    ("tomo-refine", "tomo.refine", "refine tilt-series shifts by phase matching (mumott)"),
    ("classify2d", "classify2d", "2D multi-reference alignment and classification (mref_ali2d)"),
    ("fourier-stack", "fourier_stack", "a preprocessed stack on the polar Fourier grid"),
    ("templates", "templates", "a structure's projections on the polar Fourier grid, per view"),
    ("likelihood", "likelihood", "best pose and log-likelihoods: one template set x one stack"),
    ("likelihood-gather", "likelihood_gather", "likelihood matrix, best poses and figure"),
    ("reweight", "reweight", "population weights of structures from the likelihood matrix"),
    ("subtomo", "subtomo", "align subvolumes to templates (ZNCC/PCC, rotations, missing wedge)"),
    ("subtomo-refine", "subtomo_refine", "subtomogram averaging: iterations with half sets, FSC"),
    ("particle-series", "particle_series", "particle series: average by back-projection, refine"),
]
