"""The MLP assignment solvers: valid permutations, exact optimum, approximate ones in between."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import linear_sum_assignment

from mergeshield.core.assignment import SOLVERS, choose_solver, farthest_permutation, permutation_objective


def _features(n: int, f: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    pre = torch.randn(n, f, generator=g, dtype=torch.float64) * torch.rand(n, 1, generator=g, dtype=torch.float64)
    return pre, pre + 0.05 * torch.randn(n, f, generator=g, dtype=torch.float64)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(2, 30), f=st.integers(1, 8), seed=st.integers(0, 10_000))
def test_exact_reaches_the_scipy_optimum(n, f, seed):
    pre, tuned = _features(n, f, seed)
    perm = farthest_permutation(pre, tuned, "exact")
    cost = (pre @ tuned.T).numpy()
    r, c = linear_sum_assignment(cost)
    assert np.isclose(cost[np.arange(n), perm].sum(), cost[r, c].sum())


@pytest.mark.parametrize("solver", [s for s in SOLVERS])
def test_every_solver_returns_a_valid_permutation(solver):
    pre, tuned = _features(300, 16, 0)
    perm = farthest_permutation(pre, tuned, solver, block_size=64, rng=np.random.default_rng(0))
    assert perm.dtype == np.int64 and sorted(perm.tolist()) == list(range(300))


def test_approximate_solvers_land_between_identity_and_exact():
    pre, tuned = _features(600, 24, 1)
    ident = permutation_objective(pre, tuned, np.arange(600))
    exact = permutation_objective(pre, tuned, farthest_permutation(pre, tuned, "exact"))
    for solver in ("sparse", "block", "greedy", "random"):
        obj = permutation_objective(pre, tuned, farthest_permutation(pre, tuned, solver, block_size=128, candidates=8,
                                                                     rng=np.random.default_rng(0)))
        assert ident < obj <= exact + 1e-9, solver
    block = permutation_objective(pre, tuned, farthest_permutation(pre, tuned, "block", block_size=128))
    rand = permutation_objective(pre, tuned, farthest_permutation(pre, tuned, "random", rng=np.random.default_rng(0)))
    assert (block - ident) > (rand - ident)  # the block solver is worth its time over a random permutation


def test_random_is_seeded_and_auto_picks_by_size():
    pre, tuned = _features(50, 4, 2)
    a = farthest_permutation(pre, tuned, "random", rng=np.random.default_rng(3))
    b = farthest_permutation(pre, tuned, "random", rng=np.random.default_rng(3))
    assert np.array_equal(a, b)
    with pytest.raises(ValueError, match="rng"):
        farthest_permutation(pre, tuned, "random")
    assert choose_solver("auto", 4096) == "exact" and choose_solver("auto", 4097) == "block"
    with pytest.raises(ValueError, match="unknown solver"):
        choose_solver("hungarian", 10)


def test_float32_features_give_the_same_block_and_random_permutations_and_distances():
    """protect builds float32 features for the block and random solvers (half the memory):
    from bfloat16 weights they are exact, so the permutation is the one float64 features give,
    and the distances agree to float32 rounding (chunked dot products: about 1e-6 relative)."""
    from mergeshield.core.assignment import farthest_permutation, permutation_distances

    g = torch.Generator().manual_seed(0)
    pre16 = torch.randn(3000, 96, generator=g).to(torch.bfloat16)
    tuned16 = (pre16.float() + 0.05 * torch.randn(3000, 96, generator=g)).to(torch.bfloat16)
    f64 = (pre16.double(), tuned16.double())
    f32 = (pre16.float(), tuned16.float())
    for solver in ("block", "random"):
        a = farthest_permutation(*f64, solver, block_size=512, rng=np.random.default_rng(1))
        b = farthest_permutation(*f32, solver, block_size=512, rng=np.random.default_rng(1))
        assert np.array_equal(a, b), solver
        d64, d32 = permutation_distances(*f64, a), permutation_distances(*f32, a)
        np.testing.assert_allclose(d32, d64, rtol=1e-5)


def test_block_costs_in_bfloat16_reach_the_float32_objective():
    """protect multiplies block costs in bfloat16 for bfloat16 checkpoints (on CPUs with native
    bfloat16): the inputs are exact, only each cost is rounded; the objective must not suffer."""
    from mergeshield.core.assignment import farthest_permutation, permutation_objective

    g = torch.Generator().manual_seed(0)
    pre = torch.randn(1500, 128, generator=g).to(torch.bfloat16).float()
    tuned = (pre + 0.05 * torch.randn(1500, 128, generator=g)).to(torch.bfloat16).float()
    ident = permutation_objective(pre, tuned, np.arange(1500))
    gains = {
        dt: permutation_objective(pre, tuned, farthest_permutation(pre, tuned, "block", block_size=256, products=dt))
        - ident
        for dt in (torch.float32, torch.bfloat16)
    }
    assert gains[torch.bfloat16] >= 0.999 * gains[torch.float32]


@pytest.mark.parametrize(("n", "width"), [(1, 3), (37, 5000), (300, 700), (1000, 131)])
def test_permutation_distances_match_float64_at_every_chunking(n, width):
    """Chunk boundaries (rows per dot product, rows per gather) must not drop or repeat units."""
    from mergeshield.core.assignment import permutation_distances

    g = torch.Generator().manual_seed(n)
    pre = torch.randn(n, width, generator=g)
    tuned = pre + 0.1 * torch.randn(n, width, generator=g)
    perm = np.random.default_rng(n).permutation(n)
    p64, t64 = pre.double(), tuned.double()
    want = (float(((p64 - t64) ** 2).sum()), float(((p64 - t64[torch.from_numpy(perm)]) ** 2).sum()), float((p64**2).sum()))
    np.testing.assert_allclose(permutation_distances(pre, tuned, perm), want, rtol=1e-5)


def test_bfloat16_features_reach_the_float32_features_block_objective_and_distances():
    """protect keeps bfloat16 features for bfloat16 products (converting small pieces only).
    Where the CPU multiplies bfloat16 natively their sort keys are bfloat16 products too
    (rounded to 3 digits: units move a few places in the sort order), so the permutation may
    differ from float32 features' but must reach the same objective; the distances of one
    permutation must not depend on the features' dtype."""
    from mergeshield.core.assignment import (
        farthest_permutation,
        native_bfloat16,
        permutation_distances,
        permutation_objective,
    )

    g = torch.Generator().manual_seed(5)
    pre = torch.randn(2500, 300, generator=g).to(torch.bfloat16)
    tuned = (pre.float() + 0.05 * torch.randn(2500, 300, generator=g)).to(torch.bfloat16)
    a = farthest_permutation(pre, tuned, "block", block_size=512, products=torch.bfloat16)
    b = farthest_permutation(pre.float(), tuned.float(), "block", block_size=512, products=torch.bfloat16)
    if not native_bfloat16():
        assert np.array_equal(a, b)
    obj_a, obj_b = (permutation_objective(pre.double(), tuned.double(), p) for p in (a, b))
    assert abs(obj_a - obj_b) <= 1e-3 * obj_b, (obj_a, obj_b)
    np.testing.assert_allclose(permutation_distances(pre, tuned, a), permutation_distances(pre.float(), tuned.float(), a),
                               rtol=1e-12)


def _features_reference(tensors, n_units, dtype):
    """The plain definition: each bound axis moved first, cut into units, concatenated."""
    from mergeshield.core.transforms import axis_view

    parts = [axis_view(t, b).movedim(b.axis, 0) for t, b in tensors]
    return torch.cat([p.reshape(n_units or p.shape[0], -1).to(dtype) for p in parts], 1)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_unit_features_copy_columns_in_blocks_exactly(dtype):
    """Column bindings (down projections, Conv1D) are transposed a few rows at a time: every
    layout (row counts not a multiple of the block, chunks, heads of unequal sizes under GQA,
    non-contiguous inputs, biases) must give the plain definition's features; and so must the
    block solver's `UnitParts`, whose features are gathered from the tensors a block at a time
    (their sort keys add up per tensor: equal up to the rounding of bfloat16 keys)."""
    from mergeshield.core.assignment import TRANSPOSE_ROWS, UnitParts, _keys, unit_features
    from mergeshield.symmetry.spec import Binding

    g = torch.Generator().manual_seed(0)
    h, i = 2 * TRANSPOSE_ROWS + 3, 96

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(torch.bfloat16)

    gate, down, bias, fused = rand(i, h), rand(h, i), rand(i), rand(h, 3 * i)
    q_cols, kv_rows = rand(h, 4 * 24), rand(2 * 24, h)  # 4 query heads over 2 K/V heads of 24
    cases = [
        ([(gate, Binding(tensor="g", axis=0)), (down, Binding(tensor="d", axis=1)), (bias, Binding(tensor="b", axis=0))], None),
        ([(gate, Binding(tensor="g", axis=0)), (down, Binding(tensor="d", axis=1))], 8),
        ([(fused, Binding(tensor="c", axis=1, chunk=(1, 3))), (gate, Binding(tensor="g", axis=0))], None),
        ([(fused, Binding(tensor="c", axis=1, chunk=(2, 3)))], 12),
        ([(down.T.contiguous().T, Binding(tensor="d", axis=1))], None),
        ([(kv_rows, Binding(tensor="k", axis=0)), (q_cols, Binding(tensor="o", axis=1))], 2),
    ]
    for tensors, n_units in cases:
        got = unit_features(tensors, n_units, dtype)
        want = _features_reference(tensors, n_units, dtype)
        assert got.dtype == dtype and got.shape == want.shape and torch.equal(got, want), n_units
        # the block solver's parts (no concatenation): whole features of any units, row slices, keys
        parts = UnitParts(tensors, n_units, dtype)
        assert parts.shape == want.shape and parts.dtype == dtype
        idx = torch.randperm(want.shape[0], generator=g)[: max(1, want.shape[0] // 2)]
        assert torch.equal(parts.index_select(0, idx), want.index_select(0, idx)), n_units
        assert torch.equal(parts[1::3], want[1::3])
        v = torch.randn(want.shape[1], generator=g)
        np.testing.assert_allclose(_keys(parts, v), _keys(want, v), rtol=0.05, atol=0.05 * float(_keys(want, v).std()))


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 60), seed=st.integers(0, 10_000), ties=st.booleans())
def test_block_assignment_reaches_the_scipy_optimum(n, seed, ties):
    """The block solver's LAP (lapx's lapjvr) is exact too: scipy's optimum on any square cost,
    ties (bfloat16-rounded costs have many) included."""
    from mergeshield.core.assignment import block_assignment

    cost = np.random.default_rng(seed).normal(size=(n, n))
    if ties:
        cost = np.round(cost, 1)
    perm = block_assignment(cost)
    assert sorted(perm.tolist()) == list(range(n))
    r, c = linear_sum_assignment(cost)
    assert np.isclose(cost[np.arange(n), perm].sum(), cost[r, c].sum())


def _dense_optimum(rows, cols, cost, n) -> float:
    """The optimum over the given edges by the dense exact solver: missing edges cost more than
    any permutation of given ones could save."""
    dense = np.full((n, n), 1e6)
    dense[rows, cols] = cost
    r, c = linear_sum_assignment(dense)
    return float(dense[r, c].sum())


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 40), per_row=st.integers(1, 6), seed=st.integers(0, 10_000), ties=st.booleans(),
       lapmod=st.booleans())
def test_sparse_assignment_reaches_the_optimum_on_its_edges(n, per_row, seed, ties, lapmod):
    """The sparse solver's LAP (lapx's lapmod, or scipy's where lapx lacks it) is exact on any
    feasible graph: a random permutation's edges plus a few random ones per row."""
    from mergeshield.core import assignment

    rng = np.random.default_rng(seed)
    rows = np.concatenate([np.arange(n), np.repeat(np.arange(n), per_row)])
    cols = np.concatenate([rng.permutation(n), rng.integers(0, n, n * per_row)])
    key = np.unique(rows * n + cols)
    rows, cols = key // n, key % n
    cost = rng.normal(size=len(rows))
    if ties:
        cost = np.round(cost, 1)
    with pytest.MonkeyPatch.context() as m:
        if not lapmod:
            m.delattr(assignment.lap, "lapmod")
        perm = assignment.sparse_assignment(rows, cols, cost, n)
    assert sorted(perm.tolist()) == list(range(n))
    edge = {(int(r), int(c)): w for r, c, w in zip(rows, cols, cost)}
    assert all((i, int(j)) in edge for i, j in enumerate(perm))  # only given edges
    got = sum(edge[(i, int(j))] for i, j in enumerate(perm))
    assert np.isclose(got, _dense_optimum(rows, cols, cost, n))


def test_sparse_solver_with_every_edge_is_exact_and_fewer_edges_fall_short():
    """With as many candidates as units every edge is in: the exact optimum. With few, on
    structured features, less (but more than the block solver reaches here)."""
    pre, tuned = _features(400, 24, 5)
    exact = permutation_objective(pre, tuned, farthest_permutation(pre, tuned, "exact"))
    full = permutation_objective(pre, tuned, farthest_permutation(pre, tuned, "sparse", candidates=400))
    assert np.isclose(full, exact, rtol=1e-6)
    few = permutation_objective(pre, tuned, farthest_permutation(pre, tuned, "sparse", candidates=2))
    assert few < exact * (1 - 1e-6)
    block = permutation_objective(pre, tuned, farthest_permutation(pre, tuned, "block", block_size=50))
    assert permutation_objective(pre, tuned, farthest_permutation(pre, tuned, "sparse", candidates=8)) > block


@pytest.mark.parametrize(("solver", "products"), [("exact", None), ("greedy", None), ("random", None),
                                                   *((s, p) for s in ("block", "sparse") for p in (None, torch.bfloat16))])
def test_farthest_assignment_returns_the_sum_of_its_chosen_costs(solver, products):
    """protect takes the distance after from ||pre||^2 + ||tuned||^2 - 2 x the chosen costs the
    solver returns: they must be sum_i <pre_i, tuned_perm[i]> for its own permutation (to the
    rounding of bfloat16 products), and None only where no costs were multiplied."""
    from mergeshield.core.assignment import farthest_assignment

    g = torch.Generator().manual_seed(11)
    pre = torch.randn(700, 90, generator=g, dtype=torch.float64)
    tuned = pre + 0.1 * torch.randn(700, 90, generator=g, dtype=torch.float64)
    pre_s, tuned_s = (pre.float(), tuned.float()) if solver in ("block", "sparse") else (pre, tuned)
    perm, chosen = farthest_assignment(pre_s, tuned_s, solver, block_size=128, candidates=8, products=products,
                                       rng=np.random.default_rng(0))
    if solver == "random":
        assert chosen is None
        return
    want = float((pre * tuned[torch.from_numpy(perm)]).sum())
    scale = float((pre * pre).sum())  # what the distance after is made of
    tol = 1e-3 if products else 1e-6 if solver in ("block", "sparse") else 1e-9  # bfloat16, float32, float64
    assert abs(chosen - want) <= tol * scale, (chosen, want)


@pytest.mark.parametrize("scale", [1e-3, 1e7, 1e40])
def test_sparse_assignment_of_costs_of_any_size_reaches_the_optimum(scale):
    """lapmod refuses costs of 1e6 or more (lap.LARGE): large weights give such costs, so they
    are scaled into its range (the optimum is the same); small ones are left alone."""
    from mergeshield.core import assignment

    rng = np.random.default_rng(3)
    cost = rng.random((60, 60)) * scale
    rows, cols = (x.ravel() for x in np.indices(cost.shape))
    perm = assignment.sparse_assignment(rows, cols, cost[rows, cols], 60)
    r, c = linear_sum_assignment(cost)
    np.testing.assert_allclose(cost[np.arange(60), perm].sum(), cost[r, c].sum(), rtol=1e-9)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("side", ["pre", "tuned"])
@pytest.mark.parametrize("solver", [s for s in SOLVERS if s != "auto"])
def test_non_finite_costs_are_refused_before_solving(solver, side, value):
    """Every solver that multiplies costs must refuse non-finite ones, whatever its caller checked
    (a LAP solver given NaN may return anything; protect retakes overflowing products in float64
    on this error); random multiplies none."""
    from mergeshield.core.assignment import NonFiniteCosts, farthest_assignment

    pre, tuned = _features(300, 16, 0)
    (pre if side == "pre" else tuned)[123, 5] = value

    def run() -> tuple[np.ndarray, float | None]:
        return farthest_assignment(pre, tuned, solver, block_size=64, candidates=8, rng=np.random.default_rng(0))

    if solver == "random":
        assert sorted(run()[0].tolist()) == list(range(300))
    else:
        with pytest.raises(NonFiniteCosts):
            run()


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("solver", "products"), [("exact", None), ("block", None), ("sparse", None),
                                                   ("block", torch.bfloat16), ("sparse", torch.bfloat16)])
def test_costs_multiplied_on_a_device_give_the_cpu_objective(device, solver, products):
    """``device`` moves only the cost products: the permutation's objective (and its chosen
    costs) match the CPU's. On the CPU this runs the device plumbing (inputs stay on the CPU,
    results come back as numpy); where torch sees a GPU, the GPU's products (whose rounding may
    pick another permutation of the same objective)."""
    from mergeshield.core.assignment import farthest_assignment

    g = torch.Generator().manual_seed(12)
    pre = torch.randn(600, 80, generator=g, dtype=torch.float64)
    tuned = pre + 0.1 * torch.randn(600, 80, generator=g, dtype=torch.float64)
    if solver != "exact":
        pre, tuned = pre.float(), tuned.float()
    kw = {"block_size": 128, "candidates": 8, "products": products}
    ref_perm, ref_chosen = farthest_assignment(pre, tuned, solver, **kw)
    perm, chosen = farthest_assignment(pre, tuned, solver, device=device, **kw)
    assert isinstance(perm, np.ndarray) and sorted(perm) == list(range(600))
    tol = 1e-3 if products else 1e-6  # bfloat16 products round to 3 digits
    scale = float((pre.double() ** 2).sum())
    assert abs(chosen - ref_chosen) <= tol * scale
    got, want = (permutation_objective(pre.double(), tuned.double(), p) for p in (perm, ref_perm))
    assert abs(got - want) <= tol * want
    if device == "cpu":
        assert np.array_equal(perm, ref_perm)


@pytest.mark.parametrize(("steps", "extra"), [(0, 1), (1, -1), (1, 0), (1, 1), (3, 5)])
def test_float16_features_convert_to_bfloat16_products_bit_for_bit(steps, extra):
    """`to_products` converts float16 features to bfloat16 through float32 a few rows at a time:
    the bits must be torch's direct conversion's, for every float16 value (normal, subnormal,
    largest, signed zeros, Inf, NaN) and any row count around the step; other dtypes pass through."""
    from mergeshield.core.assignment import CONVERT_ROWS, to_products

    rows = steps * CONVERT_ROWS + extra
    every = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(torch.float16)  # all 65536 bit patterns
    cols = -(-len(every) // rows)  # every pattern in every case, shuffled, padded by repeating the first ones
    shuffled = every[torch.randperm(len(every), generator=torch.Generator().manual_seed(rows))]
    x = torch.cat([shuffled, shuffled[: rows * cols - len(every)]]).reshape(rows, cols)
    got = to_products(x, torch.bfloat16, torch.device("cpu"))
    want = x.to(torch.bfloat16)
    assert got.dtype == torch.bfloat16 and got.shape == x.shape
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(got), nan)
    assert torch.equal(got[~nan].view(torch.int16), want[~nan].view(torch.int16))
    for dtype, products in ((torch.bfloat16, torch.bfloat16), (torch.float32, torch.bfloat16), (torch.float16, torch.float32)):
        y = x[:, :97].to(dtype)
        assert torch.equal(to_products(y, products, torch.device("cpu")).nan_to_num(), y.to(products).nan_to_num())
