"""Small numeric checks shared by protect, merge and attack."""

from __future__ import annotations

import torch

__all__ = ["all_finite", "index_square_sums", "runs_square_sum", "square_sums"]


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


SQUARES_ROW = 256
"""Elements per partial sum in `index_square_sums`."""
SQUARES_EXACT_BELOW = 1 << 22
"""Tensors with fewer elements are summed in float64 outright (cheap at that size)."""


def index_square_sums(x: torch.Tensor, axis: int = 0) -> torch.Tensor:
    """Per index along `axis`, the sum of squares over the other axes: float64, ``(n,)``.

    One pass with no converted copy: torch's norms (accumulated in float32) of runs of
    `SQUARES_ROW` elements, squared and added in float64. A half-precision norm comes back
    rounded to its dtype (bfloat16: up to 2^-9 relative, at random); short runs make many of
    them, whatever the tensor's shape, so the errors average out: a Llama-2-7B MLP tensor's
    total was off by 9e-6 of itself, in 6-7 ms against 149-154 ms for a float32 copy and sum
    (`benchmarks/transform_speed.py`, one thread). Small tensors (`SQUARES_EXACT_BELOW`) and
    float64 ones are summed in float64.

    Non-finite where the tensor holds a NaN or Inf (that run's norm is NaN or Inf), and also
    where a half-precision norm overflows its dtype: callers check with `all_finite` then.
    """
    if x.ndim == 0:
        x = x.reshape(1)
    n = x.shape[axis]
    last = axis == x.ndim - 1 and x.ndim > 1
    if x.numel() < SQUARES_EXACT_BELOW or x.dtype == torch.float64:
        m = x.reshape(-1, n) if last else x.movedim(axis, 0).reshape(n, -1)
        return m.double().pow(2).sum(0 if last else 1)
    if last:  # indices are columns: runs down the rows
        m = x.reshape(-1, n)
        whole = m.shape[0] // SQUARES_ROW * SQUARES_ROW
        runs = torch.linalg.vector_norm(m[:whole].reshape(-1, SQUARES_ROW, n), dim=1).double()
        return runs.pow(2).sum(0) + m[whole:].double().pow(2).sum(0)
    m = x.movedim(axis, 0).reshape(n, -1)
    whole = m.shape[1] // SQUARES_ROW * SQUARES_ROW
    runs = torch.linalg.vector_norm(m[:, :whole].reshape(n, -1, SQUARES_ROW), dim=2).double()
    return runs.pow(2).sum(1) + m[:, whole:].double().pow(2).sum(1)


def square_sums(pre: torch.Tensor, tuned: torch.Tensor) -> tuple[float, float, float]:
    """``(sum pre^2, sum tuned^2, sum (pre - tuned)^2)`` of two tensors of one shape, as
    `index_square_sums` adds them (non-finite for a NaN or Inf in either). The difference is
    taken in the stored dtype: exact where the two values are within a factor 2 of each other,
    as a fine-tune's mostly are."""
    pp, tt = float(index_square_sums(pre).sum()), float(index_square_sums(tuned).sum())
    if pre.numel() < SQUARES_EXACT_BELOW or pre.dtype == torch.float64 or pre.ndim < 2:
        return pp, tt, float(index_square_sums(pre - tuned).sum())
    # the difference a few rows at a time into one reused buffer (in cache, and no large
    # allocation): about half the time of one whole difference (an ad-hoc timing)
    p2, t2 = pre.reshape(-1, pre.shape[-1]), tuned.reshape(-1, pre.shape[-1])
    step = max(1, (1 << 20) // p2.shape[1])
    buf = torch.empty(step, p2.shape[1], dtype=pre.dtype)
    dd = 0.0
    for start in range(0, p2.shape[0], step):
        part = buf[: len(p2[start : start + step])]
        torch.sub(p2[start : start + step], t2[start : start + step], out=part)
        dd += float(index_square_sums(part).sum()) if part.numel() >= SQUARES_EXACT_BELOW else runs_square_sum(part)
    return pp, tt, dd


def runs_square_sum(x: torch.Tensor) -> float:
    """The sum of squares of a contiguous tensor by norms of runs (see `index_square_sums`)."""
    flat = x.reshape(-1)
    whole = flat.numel() // SQUARES_ROW * SQUARES_ROW
    runs = torch.linalg.vector_norm(flat[:whole].view(-1, SQUARES_ROW), dim=1).double()
    return float(runs.pow(2).sum()) + float(flat[whole:].double().pow(2).sum())
