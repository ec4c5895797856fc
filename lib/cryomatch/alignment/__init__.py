"""Subtomogram alignment with acryo's API: ``from cryomatch.alignment import ZNCCAlignment``.

See :mod:`cryomatch.alignment.base` for the conventions and custom models,
:mod:`cryomatch.alignment.models` for the ZNCC and PCC searches.
"""

from .base import (
    AlignmentResult,
    Backend,
    BaseAlignmentModel,
    RotationImplemented,
    TomographyInput,
)
from .models import PCCAlignment, ZNCCAlignment
from .rotations import normalize_rotations
from .tilt import TiltSeriesModel, dual_axis, no_wedge, single_axis

__all__ = [
    "AlignmentResult",
    "Backend",
    "BaseAlignmentModel",
    "PCCAlignment",
    "RotationImplemented",
    "TiltSeriesModel",
    "TomographyInput",
    "ZNCCAlignment",
    "dual_axis",
    "no_wedge",
    "normalize_rotations",
    "single_axis",
]
