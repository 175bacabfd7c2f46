"""The fast finiteness check agrees with the element-wise one, whatever the dtype and values."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mergeshield.core.numeric import all_finite


@settings(max_examples=60, deadline=None)
@given(
    dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float32, torch.float64]),
    n=st.integers(0, 3000),
    scale=st.sampled_from([1e-3, 1.0, 1e3, 6e4]),
    bad=st.sampled_from([None, float("nan"), float("inf"), -float("inf")]),
    where=st.floats(0, 1),
    seed=st.integers(0, 2**16),
)
def test_all_finite_matches_isfinite(dtype, n, scale, bad, where, seed):
    t = (torch.rand(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale).to(dtype)
    if bad is not None and n:
        t[min(int(where * n), n - 1)] = bad
    # float16 sums of large positive values overflow to inf: the fallback must still say finite
    assert all_finite(t) == bool(torch.isfinite(t).all())


@settings(max_examples=40, deadline=None)
@given(
    dtype=st.sampled_from([torch.float16, torch.bfloat16]),
    shape=st.sampled_from([(7,), (5, 9), (9, 5), (3, 4, 6)]),
    seed=st.integers(0, 2**16),
)
def test_pow2_bounds_along_any_axis_keep_every_slice_exact(dtype, shape, seed):
    """The exponent bounds reduce over the other axes where they lie (no transposed copy): per
    index they must equal the bounds of the same values moved to rows, and scaling each slice by
    2**lo and 2**hi (within the +-40 that matters) must be exact, with zeros and subnormals present
    (a slice holding a subnormal value may stay as it is: its lowest exponent is 0)."""
    from mergeshield.core.scales import pow2_exponent_bounds

    g = torch.Generator().manual_seed(seed)
    info = torch.finfo(dtype)
    t = (torch.randn(shape, generator=g, dtype=torch.float64) * torch.exp2(torch.randint(-12, 12, shape, generator=g))).to(dtype)
    t.view(-1)[0], t.view(-1)[-1] = 0, info.tiny / 4  # a zero and a subnormal
    for axis in range(len(shape)):
        lo, hi = pow2_exponent_bounds(t, dtype, axis=axis)
        rows = t.movedim(axis, 0).reshape(shape[axis], -1)
        want = pow2_exponent_bounds(rows.contiguous(), dtype, axis=0)
        assert np.array_equal(lo, want[0]) and np.array_equal(hi, want[1])
        for i in range(shape[axis]):
            x = rows[i].double()
            if ((x != 0) & (x.abs() < info.tiny)).any():  # it cannot move down, and need not move up
                assert lo[i] == 0, (axis, i, lo[i])
            lowest, highest = max(lo[i], -40), min(hi[i], 40)  # protect's factors are near 2**0
            for e in {lowest, highest} if lowest <= highest else ():
                y = (x * 2.0 ** float(e)).to(dtype)
                assert torch.equal(y.double() / 2.0 ** float(e), x), (axis, i, e)


_TOL = {torch.bfloat16: 2e-3, torch.float16: 1e-5, torch.float32: 1e-6, torch.float64: 1e-12}


@pytest.mark.parametrize("dtype", list(_TOL))
@pytest.mark.parametrize("shape", [(300, 700), (5000, 300), (5, 4099), (9999,)])
@pytest.mark.parametrize("runs", [True, False])
def test_square_sums_match_float64(dtype, shape, runs, monkeypatch):
    """The sums of squares behind the report's distances (and protect's NaN/Inf check of MLP
    weights): by norms of runs in the stored dtype (float16: float32 pieces, as exact as float32)
    (forced here on small tensors; the difference a few rows at a time) or in float64, they must
    match the float64 definition, on views too, and any NaN/Inf must make them non-finite."""
    from mergeshield.core import numeric

    if runs:
        monkeypatch.setattr(numeric, "SQUARES_EXACT_BELOW", 0)
    g = torch.Generator().manual_seed(len(shape) * 7 + shape[0])
    pre = (torch.randn(shape, generator=g, dtype=torch.float64) * 0.02).to(dtype)
    tuned = (pre.double() + 1e-3 * torch.randn(shape, generator=g, dtype=torch.float64)).to(dtype)
    views = [(pre.T, tuned.T)] if pre.ndim == 2 else []  # a transposed view: copied flat once
    for p_, t_ in [(pre, tuned), *views]:
        p, t = p_.double(), t_.double()
        want = [float((p * p).sum()), float((t * t).sum()), float(((p - t) ** 2).sum())]
        np.testing.assert_allclose(numeric.square_sums(p_, t_), want, rtol=_TOL[dtype])
        np.testing.assert_allclose(numeric.square_sums(p_, t_, exact=True), want, rtol=1e-12)
        np.testing.assert_allclose(numeric.runs_square_sum(p_), want[0], rtol=_TOL[dtype])
    for bad in (float("nan"), float("inf")):
        broken = tuned.clone()
        broken.view(-1)[broken.numel() // 3] = bad
        assert not np.isfinite(sum(numeric.square_sums(pre, broken)))
        assert not np.isfinite(sum(numeric.square_sums(broken, pre)))


@settings(max_examples=60, deadline=None)
@given(
    dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float32]),
    shape=st.sampled_from([(7,), (5, 9), (9, 5), (3, 4, 6)]),
    zeros=st.booleans(),
    view=st.booleans(),
    seed=st.integers(0, 2**16),
    chunk=st.sampled_from([1, 4, 13, 1 << 20]),
)
def test_whole_tensor_pow2_range_is_the_intersection_of_the_per_index_ranges(dtype, shape, zeros, view, seed, chunk):
    """`pow2_exponent_range` (read off the raw bits, `POW2_CHUNK` values at a time) must give
    exactly the exponents every index's own range admits: the largest lower and the smallest
    upper bound, with zeros, subnormals, an all-zero tensor, non-contiguous views, and chunks
    that split the tensor anywhere (the largest and smallest values in any chunk)."""
    from unittest.mock import patch

    from mergeshield.core import scales
    from mergeshield.core.scales import pow2_exponent_bounds, pow2_exponent_range

    g = torch.Generator().manual_seed(seed)
    t = (torch.randn(shape, generator=g, dtype=torch.float64) * torch.exp2(torch.randint(-30, 12, shape, generator=g))).to(dtype)
    t.view(-1)[0] = 0
    if zeros:
        t.zero_()
    if view and t.ndim > 1:
        t = t.transpose(0, 1)
    lo, hi = pow2_exponent_bounds(t, dtype, axis=0)
    with patch.object(scales, "POW2_CHUNK", chunk):
        assert pow2_exponent_range(t, dtype) == (int(lo.max()), int(hi.min()))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64, torch.int8])
@pytest.mark.parametrize("axis", [0, 1, 2])
def test_take_is_index_select(dtype, axis):
    """The permutation gather (numpy's take on the raw bits) against torch's index_select, on
    contiguous tensors and on a view (which falls back to index_select)."""
    from mergeshield.core.transforms import take

    g = torch.Generator().manual_seed(axis)
    t = (torch.randn(6, 7, 8, generator=g) * 100).to(dtype)
    for x in (t, t.transpose(0, 2)):
        idx = torch.randperm(x.shape[axis], generator=g).numpy()
        got = take(x, idx, axis)
        assert got.dtype == x.dtype and torch.equal(got, x.index_select(axis, torch.from_numpy(idx)))
