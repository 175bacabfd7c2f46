"""The fast finiteness check agrees with the element-wise one, whatever the dtype and values."""

from __future__ import annotations

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
