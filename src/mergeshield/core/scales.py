"""Sampling the per-dimension attention scale factors, and bounding them for half precision."""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch

from mergeshield.core.numeric import SAME_SIZE_INT

__all__ = ["sample_factors", "pow2_exponent_bounds", "pow2_exponent_range", "ScaleLaw"]

ScaleLaw = Literal["uniform", "loguniform", "beta"]


def sample_factors(rng: np.random.Generator, n: int, low: float, high: float, law: ScaleLaw) -> np.ndarray:
    """Draw `n` factors in ``[low, high]`` (float64).

    ``uniform`` is the PaRaMS authors' default; ``loguniform`` spreads evenly in log scale (as
    many factors below 1 as above); ``beta`` is Beta(0.5, 0.5) stretched to the range, which
    piles factors at both ends.
    """
    if not 0 < low <= high:
        raise ValueError(f"scale range must satisfy 0 < low <= high, got [{low}, {high}]")
    if law == "uniform":
        return rng.uniform(low, high, n)
    if law == "loguniform":
        return np.exp(rng.uniform(np.log(low), np.log(high), n))
    if law == "beta":
        return low + (high - low) * rng.beta(0.5, 0.5, n)
    raise ValueError(f"unknown scale law {law!r}; use uniform, loguniform or beta")


def pow2_exponent_bounds(
    t: torch.Tensor, dtype: torch.dtype, headroom_bits: int = 8, axis: int = 0, keep_small: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Per index along `axis`, the range of exponents e such that its slice ``* 2**e`` stays
    exactly representable.

    Multiplying by a power of two is exact in binary floating point unless it overflows or
    enters the subnormal range. For each index: ``max|x| * 2**e <= finfo.max / 2**headroom_bits``
    (headroom for the activations computed from these weights) and
    ``min nonzero |x| * 2**e >= finfo.tiny``.

    Args:
        t: values in the checkpoint's dtype; one scaled index per element of `axis`.
        dtype: the checkpoint dtype.
        axis: the scaled axis (reduced over the others where they lie: no transposed copy).
        keep_small: with False only the overflow bound is taken: the smallest values may then
            round (those that are or become subnormal lose their lowest bits when scaled
            down), and are not read. For float16, see `ProtectOptions.half_subnormals`.

    Returns:
        ``(lo, hi)`` int64 arrays; ``lo > hi`` where no exponent but 0 is safe.
    """
    a = t.to(dtype).abs()  # extremes are exact in the stored dtype: no wider copy needed
    others = tuple(d for d in range(a.ndim) if d != axis)
    big = (a.amax(dim=others) if others else a).double().numpy()
    if not keep_small:
        return _bounds(big, None, dtype, headroom_bits)
    a.masked_fill_(a == 0, float("inf"))
    small = (a.amin(dim=others) if others else a).double().numpy()
    return _bounds(big, small, dtype, headroom_bits)


POW2_CHUNK = 1 << 20
"""Values `pow2_exponent_range` reads at a time: each chunk's bits are masked, reduced and
wrapped in one buffer that stays in the CPU cache, instead of four passes over the tensor and
a masked copy of it (see `pow2_exponent_range` for the timings)."""


def pow2_exponent_range(t: torch.Tensor, dtype: torch.dtype, headroom_bits: int = 8,
                        keep_small: bool = True) -> tuple[int, int]:
    """`pow2_exponent_bounds` for the whole tensor at once: exponents safe for every element
    (so for every index; narrower than an index's own range). From the largest magnitude and the
    smallest nonzero one, read off the raw bits, `POW2_CHUNK` values at a time: on a Llama-2-7B
    attention matrix (bfloat16, one thread) 7.0-7.2 ms against 46-57 ms for the per-index ranges
    and 14-21 ms for the same bits read in whole-tensor passes (`benchmarks/transform_speed.py`,
    two runs of each)."""
    t = t.to(dtype)
    if t.element_size() in SAME_SIZE_INT and t.is_contiguous():
        int_type, mask = SAME_SIZE_INT[t.element_size()], (1 << (8 * t.element_size() - 1)) - 1
        flat = t.view(int_type).reshape(-1)
        buf = torch.empty(min(POW2_CHUNK, flat.numel()), dtype=int_type)
        most, least = 0, mask + 1  # all zero: mask + 1
        for start in range(0, flat.numel(), POW2_CHUNK):
            part = flat[start : start + POW2_CHUNK]
            m = torch.bitwise_and(part, mask, out=buf[: len(part)])  # |x|'s bits, ordered as |x|
            most = max(most, int(m.amax()))
            if keep_small:  # else only the largest magnitude bounds anything
                m.sub_(1).bitwise_and_(mask)  # zero wraps to the largest value: the min skips it
                least = min(least, int(m.amin()) + 1)
        big, small = (float(torch.tensor([b], dtype=int_type).view(t.dtype)) for b in (most, min(least, mask)))
        small = small if least <= mask else float("inf")
    else:
        low, high = torch.aminmax(t)
        big = max(abs(float(low)), abs(float(high)))
        a = t.abs()
        nonzero = a[a > 0]
        small = float(nonzero.min()) if nonzero.numel() else float("inf")
    lo, hi = _bounds(np.array([big]), np.array([small]) if keep_small else None, dtype, headroom_bits)
    return int(lo[0]), int(hi[0])


def _bounds(big: np.ndarray, small: np.ndarray | None, dtype: torch.dtype,
            headroom_bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Exponent ranges from the largest magnitudes and the smallest nonzero ones (inf: none;
    None: no lower bound, the small values may round)."""
    info = torch.finfo(dtype)
    # a NaN or Inf (callers check for them after planning) bounds like the largest value
    big = np.maximum(np.nan_to_num(big, nan=info.max, posinf=info.max), info.tiny)
    hi = np.floor(np.log2(info.max / 2.0**headroom_bits / big))
    if small is None:
        return np.full(hi.shape, -1000, dtype=np.int64), hi.clip(-1000, 1000).astype(np.int64)
    with np.errstate(divide="ignore"):
        lo = np.where(np.isfinite(small), np.ceil(np.log2(info.tiny / np.where(np.isfinite(small), small, 1.0))), -np.inf)
    # An original subnormal value cannot move down without losing bits; up it moves exactly
    # (its few bits fit any exponent), so only the overflow bound limits it. (Before, such an
    # index was required to move up until the value was normal: stricter than exactness needs.)
    lo = np.where(small < info.tiny, 0, lo)
    return lo.clip(-1000, 1000).astype(np.int64), hi.clip(-1000, 1000).astype(np.int64)
