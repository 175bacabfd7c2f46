"""The fast finiteness check agrees with the element-wise one, whatever the dtype and values."""

from __future__ import annotations

import numpy as np
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
    2**lo and 2**hi (within the +-40 that matters) must be exact, with zeros and subnormals present."""
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
            lowest, highest = max(lo[i], -40), min(hi[i], 40)  # protect's factors are near 2**0
            for e in {lowest, highest} if lowest <= highest else ():
                y = (x * 2.0 ** float(e)).to(dtype)
                assert torch.equal(y.double() / 2.0 ** float(e), x), (axis, i, e)
