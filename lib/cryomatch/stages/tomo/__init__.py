"""Tomography: tilt-series alignment and reconstruction (``cryomatch tomo-align``, module
:mod:`.align`) and phase-matching refinement (``cryomatch tomo-refine``, :mod:`.refine`)."""
