"""The linear assignment behind PaRaMS' MLP permutation (and its realignment attack).

PaRaMS (Wei et al., ICCV 2025, arXiv 2503.07661) picks the permutation P of a layer's hidden
units that maximises ``||theta_pre - P theta_def||^2``. Norms are permutation invariant, so
this is ``min_P sum_i <u_pre_i, u_def_P(i)>``: a linear assignment on the Gram matrix of unit
feature vectors (each unit's rows and columns across every bound tensor, concatenated).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from mergeshield.symmetry.spec import Binding

__all__ = ["unit_features", "farthest_permutation", "closest_permutation", "permutation_objective"]


def unit_features(tensors: Sequence[tuple[torch.Tensor, Binding]]) -> torch.Tensor:
    """Concatenate each unit's slices across bound tensors: ``(n_units, n_features)`` float64."""
    from mergeshield.core.transforms import axis_view

    parts = []
    for t, binding in tensors:
        part = axis_view(t, binding).movedim(binding.axis, 0)
        parts.append(part.reshape(part.shape[0], -1).to(torch.float64))  # (n_units, rest)
    return torch.cat(parts, dim=1)


def _solve(cost: np.ndarray) -> np.ndarray:
    rows, cols = linear_sum_assignment(cost)
    # rows come back sorted 0..n-1, so cols is the gather index: new unit i = old unit cols[i]
    assert np.array_equal(rows, np.arange(len(rows)))
    return cols.astype(np.int64)


def farthest_permutation(pre: torch.Tensor, tuned: torch.Tensor) -> np.ndarray:
    """The gather index P maximising ``||pre - tuned[P]||^2`` (exact, Jonker-Volgenant via scipy).

    Args:
        pre: ``(n, F)`` unit features of the pretrained model.
        tuned: ``(n, F)`` unit features of the model to protect.

    Returns:
        int64 array ``perm`` with ``protected_unit[i] = tuned_unit[perm[i]]``.
    """
    # cost[i, j] = <pre_i, tuned_j>: placing tuned unit j at position i; minimise the sum
    return _solve((pre @ tuned.T).numpy())


def closest_permutation(pre: torch.Tensor, tuned: torch.Tensor) -> np.ndarray:
    """The gather index P minimising ``||pre - tuned[P]||^2`` (weight matching, the attack)."""
    return _solve(-(pre @ tuned.T).numpy())


def permutation_objective(pre: torch.Tensor, tuned: torch.Tensor, perm: np.ndarray) -> float:
    """``||pre - tuned[perm]||^2``."""
    return float(((pre - tuned[torch.from_numpy(perm)]) ** 2).sum())
