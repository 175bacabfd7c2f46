"""Function-preserving transforms on single tensors: permutations and per-dimension scales.

Pure functions. A `Transform` belongs to one `SpaceInstance` (one space at one layer); applying it
to every tensor the instance binds (and nothing else) leaves the network's function unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from mergeshield.symmetry.spec import Binding, PermutationSpace, SpaceInstance

__all__ = [
    "Transform",
    "apply_transform",
    "expand_factors",
    "invert_permutation",
    "axis_view",
]


@dataclass(frozen=True)
class Transform:
    """A permutation or a set of scale factors for one space instance.

    ``perm`` is a gather index: the unit at new position ``i`` is old unit ``perm[i]``.
    ``factors`` are the free scale factors (float64), expanded per binding by `expand_factors`.
    """

    instance_id: str
    perm: np.ndarray | None = None
    factors: np.ndarray | None = None

    def __post_init__(self) -> None:
        if (self.perm is None) == (self.factors is None):
            raise ValueError("a Transform holds exactly one of perm and factors")


def invert_permutation(perm: np.ndarray) -> np.ndarray:
    """The gather index that undoes `perm`."""
    inv = np.empty_like(perm)
    inv[perm] = np.arange(len(perm), dtype=perm.dtype)
    return inv


def expand_factors(instance: SpaceInstance, factors: np.ndarray, layout: str) -> np.ndarray:
    """Expand free factors to one factor per index of a bound axis.

    Free factors are ``(heads, per_head)``; RoPE ties rotated pairs (``rotate_half``: j and
    j + d/2; ``interleaved``: 2j and 2j+1); ``layout='q'`` repeats each K/V head's factors for
    the query heads of its group, in HF ``repeat_kv`` order (query head h uses K/V head
    ``h // (query_heads // heads)``).
    """
    space = instance.space
    assert not isinstance(space, PermutationSpace)
    f = factors.reshape(instance.heads, -1)  # (kv_heads, per_head)
    if space.rope == "rotate_half":
        f = np.concatenate([f, f], axis=1)  # (kv_heads, head_dim)
    elif space.rope == "interleaved":
        f = np.repeat(f, 2, axis=1)  # (kv_heads, head_dim)
    if layout == "q":
        f = np.repeat(f, instance.query_heads // instance.heads, axis=0)  # (q_heads, head_dim)
    return f.reshape(-1)


def axis_view(t: torch.Tensor, binding: Binding) -> torch.Tensor:
    """The part of `t` a binding acts on (a view: its chunk along its axis)."""
    if binding.chunk is None:
        return t
    index, count = binding.chunk
    length = t.shape[binding.axis] // count
    return t.narrow(binding.axis, index * length, length)


def apply_transform(
    t: torch.Tensor,
    binding: Binding,
    instance: SpaceInstance,
    transform: Transform,
    *,
    inverse: bool = False,
) -> torch.Tensor:
    """Apply (or undo) one instance's transform to one bound tensor; returns a new tensor.

    Args:
        t: the tensor, floating point (compute dtype).
        binding: how the instance binds this tensor (axis, chunk, layout, inverse side).
        instance: the space instance (sizes).
        transform: the permutation or factors.
        inverse: undo instead of apply.

    Returns:
        A new tensor of the same shape and dtype.
    """
    out = t.clone()
    part = axis_view(out, binding)
    if transform.perm is not None:
        idx = invert_permutation(transform.perm) if inverse else transform.perm
        part.copy_(part.index_select(binding.axis, torch.from_numpy(idx).to(part.device)))
        return out
    assert transform.factors is not None
    f = expand_factors(instance, transform.factors, binding.layout)
    shape = [1] * part.ndim
    shape[binding.axis] = -1
    factor = torch.from_numpy(f).to(dtype=part.dtype, device=part.device).reshape(shape)
    # Dividing (rather than multiplying by 1/f) makes unprotect undo protect to the last bit
    # wherever the product was exact, and always for power-of-two factors.
    if binding.inverse != inverse:
        part.div_(factor)
    else:
        part.mul_(factor)
    return out
