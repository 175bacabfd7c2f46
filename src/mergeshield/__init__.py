"""mergeshield: release fine-tuned transformers that work alone but break when merged.

Public API::

    from mergeshield import protect, unprotect, verify, merge_checkpoints, make_method, ProtectOptions
"""

from mergeshield.errors import (
    BaseMismatchError,
    CheckpointError,
    KeyMismatchError,
    MergeShieldError,
    NumericError,
    OutputPathError,
    SpecError,
    UnsupportedArchitectureError,
)
from mergeshield.merge.engine import merge_checkpoints
from mergeshield.merge.methods import METHODS, MergeMethod, make_method, merge_tensor
from mergeshield.protect import ProtectOptions, ProtectReport, protect, unprotect
from mergeshield.symmetry.registry import family_for_model_type, get_family, list_families
from mergeshield.verify import VerifyReport, verify

__version__ = "0.1.0"

__all__ = [
    "protect",
    "unprotect",
    "verify",
    "merge_checkpoints",
    "merge_tensor",
    "make_method",
    "MergeMethod",
    "METHODS",
    "ProtectOptions",
    "ProtectReport",
    "VerifyReport",
    "list_families",
    "get_family",
    "family_for_model_type",
    "MergeShieldError",
    "CheckpointError",
    "UnsupportedArchitectureError",
    "SpecError",
    "BaseMismatchError",
    "OutputPathError",
    "KeyMismatchError",
    "NumericError",
]
