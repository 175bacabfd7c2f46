"""Function-preserving transforms on single tensors: permutations and per-dimension scales.

Pure functions. A `Transform` belongs to one `SpaceInstance` (one space at one layer); applying it
to every tensor the instance binds (and nothing else) leaves the network's function unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from mergeshield.core.numeric import SAME_SIZE_INT
from mergeshield.symmetry.spec import Binding, HeadPermutationSpace, PermutationSpace, SpaceInstance

__all__ = [
    "Transform",
    "apply_transform",
    "expand_factors",
    "element_index",
    "invert_permutation",
    "axis_view",
    "take",
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
    matrices: np.ndarray | None = None
    """``(heads, d, d)`` invertible per-head mixing of a scale space (V/O, or Q/K with matrices
    that commute with RoPE): primal bindings are multiplied by ``M``, inverse bindings by
    ``M^-1`` on their side (MergeLock-style)."""

    def __post_init__(self) -> None:
        if sum(x is not None for x in (self.perm, self.factors, self.matrices)) != 1:
            raise ValueError("a Transform holds exactly one of perm, factors and matrices")


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
    assert not isinstance(space, PermutationSpace | HeadPermutationSpace)
    f = factors.reshape(instance.heads, -1)  # (kv_heads, per_head)
    if space.rope == "rotate_half":
        f = np.concatenate([f, f], axis=1)  # (kv_heads, head_dim)
    elif space.rope == "interleaved":
        f = np.repeat(f, 2, axis=1)  # (kv_heads, head_dim)
    if layout == "q":
        f = np.repeat(f, instance.query_heads // instance.heads, axis=0)  # (q_heads, head_dim)
    return f.reshape(-1)


def element_index(instance: SpaceInstance, binding: Binding, perm: np.ndarray) -> np.ndarray:
    """A unit permutation as a gather index over a bound axis's elements.

    MLP units are single elements; a head permutation moves blocks of ``head_dim`` elements
    (``layout='q'``: the K/V head's whole group of query heads, ``head_dim * group`` elements).
    """
    if not isinstance(instance.space, HeadPermutationSpace):
        return perm
    block = instance.head_dim * (instance.query_heads // instance.heads if binding.layout == "q" else 1)
    return (perm[:, None] * block + np.arange(block)).reshape(-1)


def take(t: torch.Tensor, index: np.ndarray, axis: int) -> torch.Tensor:
    """A new tensor: `t`'s slices along `axis` in the order `index` (``t.index_select``).
    `index` must be valid: it is not checked on this path.

    On the CPU numpy's ``take`` on the raw bits does it: on a Llama-2-7B down projection
    (4096 x 11008, bfloat16, one thread) it gathered the columns in 47-52 ms, torch's advanced
    indexing in 136-138 ms and index_select in 148-158 ms; the gate projection's rows in 13-14
    ms against 39-49 ms (`benchmarks/transform_speed.py`, two runs)."""
    if t.device.type != "cpu" or not t.is_contiguous() or t.element_size() not in SAME_SIZE_INT:
        return t.index_select(axis, torch.from_numpy(np.asarray(index)).to(t.device))
    bits = t.detach().view(SAME_SIZE_INT[t.element_size()]).numpy()
    return torch.from_numpy(np.take(bits, index, axis=axis)).view(t.dtype)


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
    whole = binding.chunk is None  # the binding covers the tensor: build the result in one pass
    if transform.perm is not None:
        idx = element_index(instance, binding, invert_permutation(transform.perm) if inverse else transform.perm)
        if whole:
            return take(t, idx, binding.axis)
        out = t.clone()
        part = axis_view(out, binding)
        part.copy_(part.index_select(binding.axis, torch.from_numpy(idx).to(t.device)))
        return out
    if transform.matrices is not None:
        out = t.clone()
        return _apply_mixing(out, axis_view(out, binding), binding, instance, transform.matrices, inverse)
    assert transform.factors is not None
    f = expand_factors(instance, transform.factors, binding.layout)
    shape = [1] * t.ndim
    shape[binding.axis] = -1
    factor = torch.from_numpy(f).to(dtype=t.dtype, device=t.device).reshape(shape)
    # Dividing (rather than multiplying by 1/f) makes unprotect undo protect to the last bit
    # wherever the product was exact, and always for power-of-two factors.
    divide = binding.inverse != inverse
    if whole:
        return t / factor if divide else t * factor
    out = t.clone()
    part = axis_view(out, binding)
    if divide:
        part.div_(factor)
    else:
        part.mul_(factor)
    return out


def _apply_mixing(
    out: torch.Tensor, part: torch.Tensor, binding: Binding, instance: SpaceInstance, mats: np.ndarray, inverse: bool
) -> torch.Tensor:
    """Per-head mixing along a bound axis: vectors along the axis, one ``d``-block per head.

    Primal side (V or Q rows): ``v' = M v``. Inverse side (O columns: ``O' = O M^-1``; K rows:
    ``k' = M^-T k``): each vector along the axis is multiplied by ``M^-T``. Undoing swaps ``M``
    for ``M^-1``.
    """
    m = torch.from_numpy(mats).to(torch.float64)  # (kv_heads, d, d)
    if binding.inverse:  # O columns / K rows: apply M^-T, undo M^T
        m = m.transpose(1, 2) if inverse else torch.linalg.inv(m).transpose(1, 2)
    elif inverse:  # V / Q rows: apply M, undo M^-1
        m = torch.linalg.inv(m)
    if binding.layout == "q":
        m = m.repeat_interleave(instance.query_heads // instance.heads, dim=0)  # (q_heads, d, d)
    moved = part.movedim(binding.axis, 0)  # (axis, rest...)
    shape = moved.shape
    blocks = moved.reshape(m.shape[0], m.shape[1], -1).to(torch.float64)  # (heads, d, rest)
    mixed = torch.bmm(m, blocks).reshape(shape).movedim(0, binding.axis)
    part.copy_(mixed.to(part.dtype))
    return out
