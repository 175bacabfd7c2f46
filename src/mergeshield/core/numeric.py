"""Small numeric checks shared by protect, merge and attack."""

from __future__ import annotations

import torch

__all__ = ["all_finite", "runs_square_sum", "square_sum", "square_sums", "SAME_SIZE_INT"]


def all_finite(t: torch.Tensor) -> bool:
    """No NaN/Inf in a floating tensor.

    One vectorised sum in the tensor's own dtype (a NaN or Inf anywhere makes it non-finite),
    checked element-wise only when the sum is not finite (which a finite tensor can also reach by
    overflow, e.g. large float16 sums): about 20x faster on the CPU than
    ``torch.isfinite(t).all()``, which allocates a mask as large as the tensor.
    """
    if t.numel() == 0:
        return True
    if torch.isfinite(t.sum()):
        return True
    return bool(torch.isfinite(t).all())


SAME_SIZE_INT = {2: torch.int16, 4: torch.int32, 8: torch.int64}
"""The integer dtype with a float dtype's item size: its raw bits (for numpy, which has no
bfloat16, and for reading magnitudes off the bits)."""

SQUARES_ROW = 256
"""Elements per partial sum in `runs_square_sum`."""
SQUARES_HALF_PIECE = 1 << 18
"""float16 values converted to float32 at a time by `runs_square_sum` (256K: 6.0 ms for a
Llama-2-7B MLP tensor, against 8.1 ms in pieces of 64K and 14.3 ms of 1M, which leave the cache;
one thread, an ad-hoc timing)."""
SQUARES_EXACT_BELOW = 1 << 22
"""Tensors with fewer elements are summed in float64 outright (cheap at that size)."""


def runs_square_sum(x: torch.Tensor) -> float:
    """The sum of squares of a tensor, as torch's norms (accumulated in float32) of runs of
    `SQUARES_ROW` elements, squared and added in float64: one pass, no converted copy (a
    non-contiguous view is copied once, flat).

    A half-precision norm comes back rounded to its dtype (bfloat16: up to 2^-9 relative, at
    random); short runs make many of them, whatever the tensor's shape, so the errors average
    out: a Llama-2-7B MLP tensor's total was off by 9e-6 of itself, in 6-7 ms against 149-154 ms
    for a float32 copy and sum (`benchmarks/transform_speed.py`, one thread).

    Non-finite when the tensor holds a NaN or Inf (that run's norm is NaN or Inf), and also when
    a half-precision norm overflows its dtype: callers check with `all_finite` then.

    float16 goes another way: torch's norm has no fast float16 kernel on the CPU (a Llama-2-7B
    MLP tensor: 40 ms against 11 ms in bfloat16, one thread; an ad-hoc timing), so pieces of
    `SQUARES_HALF_PIECE` values are converted to float32 and dotted with themselves (6 ms). No
    float16 square is formed: the sum overflows only for NaN/Inf (65504^2 times a piece is far
    below float32's maximum).
    """
    flat = x.reshape(-1)
    if flat.dtype == torch.float16:
        total = 0.0
        for piece in flat.split(SQUARES_HALF_PIECE):
            wide = piece.float()
            total += float(wide @ wide)
        return total
    whole = flat.numel() // SQUARES_ROW * SQUARES_ROW
    runs = torch.linalg.vector_norm(flat[:whole].view(-1, SQUARES_ROW), dim=1).double()
    return float(runs.pow(2).sum()) + float(flat[whole:].double().pow(2).sum())


def square_sum(x: torch.Tensor, exact: bool = False) -> float:
    """The sum of squares: in float64 for small tensors (`SQUARES_EXACT_BELOW`), float64 ones
    and with `exact`, else `runs_square_sum`."""
    if exact or x.numel() < SQUARES_EXACT_BELOW or x.dtype == torch.float64:
        return float(x.double().pow(2).sum())
    return runs_square_sum(x)


def square_sums(pre: torch.Tensor, tuned: torch.Tensor, exact: bool = False) -> tuple[float, float, float]:
    """``(sum pre^2, sum tuned^2, sum (pre - tuned)^2)`` of two tensors of one shape, as
    `square_sum` adds them (non-finite for a NaN or Inf in either). The difference is taken in
    the stored dtype: exact where the two values are within a factor 2 of each other, as a
    fine-tune's mostly are."""
    pp, tt = square_sum(pre, exact), square_sum(tuned, exact)
    if exact or pre.numel() < SQUARES_EXACT_BELOW or pre.dtype == torch.float64 or pre.ndim < 2:
        return pp, tt, square_sum(pre.double() - tuned.double() if exact else pre - tuned, exact)
    # the difference a few rows at a time into one reused buffer (in cache, and no large
    # allocation): about half the time of one whole difference (an ad-hoc timing)
    p2, t2 = pre.reshape(-1, pre.shape[-1]), tuned.reshape(-1, pre.shape[-1])
    step = max(1, (1 << 20) // p2.shape[1])
    buf = torch.empty(min(step, p2.shape[0]), p2.shape[1], dtype=pre.dtype)
    dd = 0.0
    for start in range(0, p2.shape[0], step):
        part = buf[: len(p2[start : start + step])]
        dd += runs_square_sum(torch.sub(p2[start : start + step], t2[start : start + step], out=part))
    return pp, tt, dd
