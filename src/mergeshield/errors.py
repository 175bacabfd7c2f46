"""Exceptions raised by mergeshield.

Every error says what was wrong, what was found, and how to fix it. The CLI turns any
`MergeShieldError` into a one-paragraph message and a non-zero exit, without a traceback.
"""

from __future__ import annotations

__all__ = [
    "MergeShieldError",
    "CheckpointError",
    "UnsupportedArchitectureError",
    "SpecError",
    "BaseMismatchError",
    "OutputPathError",
    "KeyMismatchError",
    "NumericError",
    "DeviceError",
]


class MergeShieldError(Exception):
    """Base class: a problem with the user's input that the user can fix."""


class CheckpointError(MergeShieldError):
    """A checkpoint folder or file is missing, corrupt, truncated or unsafe."""


class UnsupportedArchitectureError(MergeShieldError):
    """No symmetry description exists for this `model_type`."""


class SpecError(MergeShieldError):
    """A symmetry description is invalid or does not fit the checkpoint."""


class BaseMismatchError(MergeShieldError):
    """The base model does not match the fine-tuned model (type, names or shapes)."""


class OutputPathError(MergeShieldError):
    """The output path exists, or equals or lies inside an input."""


class KeyMismatchError(MergeShieldError):
    """A key file does not belong to the protected model it is applied to."""


class NumericError(MergeShieldError):
    """Non-finite weights, or a transform that the dtype cannot represent."""


class DeviceError(MergeShieldError):
    """The requested compute device (a GPU) is not available to this torch."""
