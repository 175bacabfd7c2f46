"""mergeshield: release fine-tuned transformers that work alone but break when merged.

Public API::

    from mergeshield import protect, unprotect, verify, merge_checkpoints, make_method, ProtectOptions
"""

import os as _os
import sys as _sys

if "torch" not in _sys.modules:
    # Before torch loads: its CPU allocations of 2 MB and more on transparent huge pages
    # (PyTorch's own switch; unset, it is off). Protect allocates and frees tens of GB of
    # short-lived tensors; with 4 KB pages each new one page-faults and is zeroed page by page.
    # At Llama-2-7B size this took protect from 21-32 to 14-17 system CPU-seconds and from
    # 52-69 s to 46-56 s (`benchmarks/peak_rss_protect.py`, five alternating pairs). Only where the
    # kernel allows it (THP "madvise" or "always"); a value already set (e.g. 0) is kept.
    _os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

from mergeshield.errors import (
    BaseMismatchError,
    CheckpointError,
    DeviceError,
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
    "DeviceError",
]
