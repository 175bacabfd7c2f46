"""The linear assignment behind PaRaMS' MLP permutation (and its realignment attack).

PaRaMS (Wei et al., ICCV 2025, arXiv 2503.07661) picks the permutation P of a layer's hidden
units that maximises ``||theta_pre - P theta_def||^2``. Norms are permutation invariant, so
this is ``min_P sum_i <u_pre_i, u_def_P(i)>``: a linear assignment on the Gram matrix of unit
feature vectors (each unit's rows and columns across every bound tensor, concatenated).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import lap  # lapx's module
import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from mergeshield.core.numeric import all_finite
from mergeshield.symmetry.spec import Binding

__all__ = [
    "unit_features",
    "UnitParts",
    "farthest_permutation",
    "farthest_assignment",
    "closest_permutation",
    "permutation_objective",
    "permutation_distances",
    "SOLVERS",
    "choose_solver",
    "min_cost_assignment",
    "GramAccumulator",
    "farthest_from_gram",
    "native_bfloat16",
    "block_assignment",
    "sparse_assignment",
    "sparse_cost_matrix",
    "SPARSE_CANDIDATES",
    "NonFiniteCosts",
]

SOLVERS = ("auto", "exact", "sparse", "block", "greedy", "random")
"""``exact``: scipy's Jonker-Volgenant on the full cost matrix (O(n^2 F) to build, O(n^3) worst
case to solve). ``sparse``: the full cost matrix, a few rows at a time, keeping each row's
`SPARSE_CANDIDATES` cheapest columns and each column's cheapest rows, plus one complete pairing
(the block solver's sort order, so that a solution exists); then an exact sparse assignment on
those edges (lapx's ``lapmod``).
Nearer the exact objective than ``block`` (see `SPARSE_CANDIDATES`); its cost is mostly the
full product, about 3 TFLOP a layer at Llama-2-7B's width.
``block``: sort units along their leading principal direction (base units ascending,
fine-tuned units descending, so opposite units meet), cut into blocks of ``block_size`` and solve
each block exactly: only the block-diagonal costs are ever computed.
The direction comes from at most 2048 evenly spaced base units (it only orders units).
Block costs may be multiplied in bfloat16 (``products``; protect does so for bfloat16, float16
and float32 checkpoints on CPUs with native bfloat16 matrix units, see `native_bfloat16`): for
bfloat16 the inputs are then exact and only each cost is rounded (to 3 significant digits), the
others' inputs are rounded too (`to_products`); on MiniLM's layers the objective stayed within
6e-6 of float32 products' for each dtype, and the product ran 4x faster
(`benchmarks/solver_quality.py`).
``greedy``: rows in random order each take their cheapest free column. ``random``: a uniformly
random permutation. ``auto``: exact up to ``EXACT_MAX`` units, block above (near disk speed; on
real data the merged accuracy of a protected model did not follow the objective above about 97%
of the exact distance: `configs/solver-minilm.yaml`)."""
EXACT_MAX = 4096
SPARSE_CANDIDATES = 16
"""Cheapest columns kept per row, and rows per column, by the ``sparse`` solver. On the
9216-unit real-weight stand-in of `benchmarks/solver_quality.py` 8 reached 0.9912 of the exact
objective, 16 0.9986, 32 0.9998, in 2.4-3.1, 2.1-2.7 and 3.0-3.9 s (three runs; exact: 11.4-12.6
s; the block solver 0.956 in 0.3-0.5 s); on MiniLM's own 1536-unit layers 16 reached 0.9962-0.9999;
on a 9216-unit stand-in pooled from SmolLM2-135M's layers 8 reached 0.9996 and 16 1.0000 (block
0.979)."""


class NonFiniteCosts(ArithmeticError):
    """A solver's costs hold a NaN or an infinity: the features do, or finite features'
    products overflowed their dtype. Solvers raise it before solving (a LAP solver given NaN
    costs may return any answer or none)."""


def _require_finite(costs: np.ndarray | torch.Tensor) -> None:
    """Raise NonFiniteCosts for a NaN or infinity among `costs` (`all_finite`)."""
    if not all_finite(torch.as_tensor(costs)):
        raise NonFiniteCosts("assignment costs hold NaN/Inf values")


def unit_features(
    tensors: Sequence[tuple[torch.Tensor, Binding]], n_units: int | None = None, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """Concatenate each unit's slices across bound tensors: ``(n_units, n_features)``.

    By default every element of a bound axis is a unit (MLP neurons); with `n_units`, the axis
    is cut into that many equal contiguous blocks (attention heads). `dtype` float32 halves the
    memory where the solver computes in float32 anyway (block, random); it holds float16 and
    bfloat16 weights exactly.
    """
    from mergeshield.core.transforms import axis_view

    views = [(axis_view(t, binding), binding.axis) for t, binding in tensors]
    n = n_units or views[0][0].shape[views[0][1]]
    widths = [v.numel() // n for v, _ in views]  # features per unit
    out = torch.empty(n, sum(widths), dtype=dtype)
    at = 0
    for (v, axis), width in zip(views, widths):
        if v.ndim == 2 and axis == 1:  # units are columns (a down projection): transposed copy
            _columns_into(v, out[:, at : at + width].unflatten(1, (v.shape[1] // n, v.shape[0])))
        else:  # one converting copy per tensor, no float64 intermediates
            out[:, at : at + width].copy_(v.movedim(axis, 0).reshape(n, -1))
        at += width
    return out


class UnitParts:
    """`unit_features` without the concatenation, for the block solver: each bound tensor's part
    of every unit's features, kept where it lies when units are its rows (a view when the dtype
    matches: no copy) and transposed once when units are its columns. The block solver needs a
    few units' whole features at a time (`index_select`), gathered straight from the parts into
    one buffer, so a bfloat16 gate and up projection are read once for the features instead of
    copied and read again. Supports what `_sort_orders` and `_block` use: ``shape``, ``dtype``,
    ``index_select(0, index)``, row slices, and `_keys`."""

    def __init__(self, tensors: Sequence[tuple[torch.Tensor, Binding]], n_units: int | None = None,
                 dtype: torch.dtype = torch.float32) -> None:
        from mergeshield.core.transforms import axis_view

        self.parts: list[torch.Tensor] = []
        n = n_units or axis_view(*tensors[0]).shape[tensors[0][1].axis]
        for t, binding in tensors:
            v = axis_view(t, binding)
            if v.ndim == 2 and binding.axis == 1:
                self.parts.append(unit_features([(t, binding)], n_units, dtype))
            else:
                self.parts.append(v.movedim(binding.axis, 0).reshape(n, -1).to(dtype).contiguous())
        self.dtype = dtype
        self.shape = torch.Size((n, sum(p.shape[1] for p in self.parts)))

    def index_select(self, dim: int, index: torch.Tensor) -> torch.Tensor:
        """These units' whole features, ``(len(index), F)``: each part's rows gathered straight
        into its columns of the result by torch's index_select (a strided destination). 1024
        units of a Llama-2-7B MLP's three bfloat16 parts in 1.8-2.7 ms on one thread, where numpy's
        ``take`` into the same strided destination (it gathers into a temporary and copies that
        back) took 5.2-6.2 ms (`benchmarks/transform_speed.py`, five runs)."""
        assert dim == 0
        out = torch.empty(len(index), self.shape[1], dtype=self.dtype)
        at = 0
        for part in self.parts:
            torch.index_select(part, 0, index, out=out[:, at : at + part.shape[1]])
            at += part.shape[1]
        return out

    def __getitem__(self, rows: slice) -> torch.Tensor:
        return torch.cat([p[rows] for p in self.parts], dim=1)


TRANSPOSE_ROWS = 64
"""Rows of a matrix transposed per copy, so that source and destination stay in cache: one
Llama-2-7B MLP's bfloat16 features took 235-241 ms with one transposing copy of the down
projection and 86-88 ms in blocks of 64 rows (`benchmarks/solver_quality.py`)."""


def _columns_into(m: torch.Tensor, dest: torch.Tensor) -> None:
    """``dest[u, e, :] = m[:, u * per + e]`` for an ``(r, c)`` matrix and ``(c // per, per, r)``
    destination: the columns of `m`, unit by unit, copied a few rows of `m` at a time."""
    units, per, _ = dest.shape
    for start in range(0, m.shape[0], TRANSPOSE_ROWS):
        rows = m[start : start + TRANSPOSE_ROWS]
        dest[:, :, start : start + rows.shape[0]].copy_(rows.T.reshape(units, per, rows.shape[0]))


CONVERT_ROWS = 64
"""Rows of float16 features converted to bfloat16 per step of `to_products` (through float32: a
few rows at a time stay in cache)."""


def to_products(x: torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """`x` in `dtype` on `device`, for a cost product: ``x.to(device, dtype)``, except that on
    the CPU float16 goes to bfloat16 through float32 `CONVERT_ROWS` rows at a time, which gives
    the same bits in about half the time (a 1024 x 12288 block: 6.2 against 11.4 ms on one
    thread, 4.9 against 6.6 ms on two; an ad-hoc timing)."""
    if x.dtype == torch.float16 and dtype == torch.bfloat16 and device.type == "cpu" and x.ndim == 2:
        out = torch.empty(x.shape, dtype=dtype)
        for start in range(0, x.shape[0], CONVERT_ROWS):
            out[start : start + CONVERT_ROWS].copy_(x[start : start + CONVERT_ROWS].float())
        return out
    return x.to(device=device, dtype=dtype)


def min_cost_assignment(cost: np.ndarray) -> np.ndarray:
    """The gather index minimising ``sum_i cost[i, perm[i]]`` (scipy's Jonker-Volgenant)."""
    rows, cols = linear_sum_assignment(cost)
    # rows come back sorted 0..n-1, so cols is the gather index: new unit i = old unit cols[i]
    assert np.array_equal(rows, np.arange(len(rows)))
    return cols.astype(np.int64)


def block_assignment(cost: np.ndarray) -> np.ndarray:
    """`min_cost_assignment` by lapx's ``lapjvr`` (also exact; releases the GIL): on the block
    solver's sorted blocks it took 20-28% (real-weight stand-in) to 68% (synthetic 1B layer) less time
    than scipy (`benchmarks/lap_solvers.py`), while on whole real cost matrices scipy was faster,
    so the exact solver keeps scipy. lapx installs the module ``lap``; where the older ``lap``
    package replaced it (no ``lapjvr``), scipy solves the block."""
    if not hasattr(lap, "lapjvr"):
        return min_cost_assignment(cost)
    return np.asarray(lap.lapjvr(np.ascontiguousarray(cost), return_cost=False)[1], dtype=np.int64)


def choose_solver(solver: str, n: int) -> str:
    """Resolve ``auto`` by size (see `SOLVERS`)."""
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; choose one of {SOLVERS}")
    if solver == "auto":
        return "exact" if n <= EXACT_MAX else "block"
    return solver


@functools.cache
def native_bfloat16() -> bool:
    """Whether this CPU multiplies bfloat16 matrices natively (AMX or AVX512-BF16): there,
    bfloat16 products run several times faster than float32 ones; elsewhere they are emulated
    and slower."""
    caps = torch.cpu.get_capabilities()
    return bool(caps.get("amx_bf16") or caps.get("avx512_bf16"))


def farthest_permutation(pre: torch.Tensor, tuned: torch.Tensor, solver: str = "exact", **options: object) -> np.ndarray:
    """The gather index P maximising ``||pre - tuned[P]||^2``: `farthest_assignment` without
    the chosen costs (same arguments)."""
    return farthest_assignment(pre, tuned, solver, **options)[0]  # type: ignore[arg-type]


def farthest_assignment(
    pre: torch.Tensor,
    tuned: torch.Tensor,
    solver: str = "exact",
    *,
    block_size: int = 1024,
    rng: np.random.Generator | None = None,
    products: torch.dtype | None = None,
    candidates: int = SPARSE_CANDIDATES,
    device: str | torch.device = "cpu",
) -> tuple[np.ndarray, float | None]:
    """The gather index P maximising ``||pre - tuned[P]||^2`` and, where the solver multiplied
    them anyway, the sum of the chosen costs ``sum_i <pre_i, tuned_perm[i]>``.

    With the two squared norms the chosen costs give the distance after (``||pre||^2 +
    ||tuned||^2 - 2 x chosen``) without another pass over the features. Block and sparse costs
    are products in `products`: in bfloat16 each is rounded to 3 significant digits (the sum's
    error shrinks with the number of units).

    Args:
        pre: ``(n, F)`` unit features of the pretrained model.
        tuned: ``(n, F)`` unit features of the model to protect.
        solver: one of `SOLVERS`.
        block_size: units per block for ``block``.
        rng: random source for ``greedy`` (row order) and ``random``.
        products: the dtype ``block`` and ``sparse`` multiply their costs in (default float32).
        candidates: cheapest columns per row (and rows per column) ``sparse`` keeps.
        device: where the costs are multiplied (``sparse`` also picks its candidates there);
            the features stay where they are and go over a block or a row piece at a time
            (``sparse``: the fine-tuned features whole), the assignments are solved on the CPU.

    Returns:
        ``(perm, chosen)``: int64 ``perm`` with ``protected_unit[i] = tuned_unit[perm[i]]``;
        ``chosen`` None for ``random`` (no costs multiplied).

    Raises:
        NonFiniteCosts: a cost is NaN or infinite (``random`` multiplies none, and checks none).
    """
    n = pre.shape[0]
    solver = choose_solver(solver, n)
    device = torch.device(device)
    if solver == "random":
        if rng is None:
            raise ValueError("the random solver needs an rng")
        return rng.permutation(n).astype(np.int64), None
    if solver in ("exact", "greedy"):
        # cost[i, j] = <pre_i, tuned_j>: placing tuned unit j at position i; minimise the sum
        gram = (pre.to(device) @ tuned.to(device).T).cpu().numpy()
        _require_finite(gram)
        perm = farthest_from_gram(gram, solver, rng or np.random.default_rng(0))
        return perm, float(gram[np.arange(n), perm].sum())
    if solver == "sparse":
        return _sparse(pre, tuned, candidates, products or torch.float32, device)
    return _block(pre, tuned, block_size, products or torch.float32, device)


class GramAccumulator:
    """``sum_t pre_t tuned_t^T`` over many tensors' unit features, one tensor at a time.

    For a space that spans the whole model (the residual stream) the unit features are the
    whole model: they are never concatenated. The Gram matrix (n x n, float64) is all an
    assignment needs, and with the two squared norms it gives the distances before and after
    (`distances`)."""

    def __init__(self, n: int) -> None:
        self.gram = np.zeros((n, n))
        self.pre2 = self.tuned2 = 0.0

    def add(self, pre: torch.Tensor, tuned: torch.Tensor) -> None:
        """Add one tensor's ``(n, F)`` features (in float64: the distances before and after are
        differences of large sums, where float32 products would cost about 1% of a small task
        vector's norm)."""
        pre, tuned = pre.double(), tuned.double()
        self.gram += (pre @ tuned.T).numpy()
        self.pre2 += float(pre.pow(2).sum())
        self.tuned2 += float(tuned.pow(2).sum())

    def distances(self, perm: np.ndarray) -> tuple[float, float, float]:
        """As `permutation_distances`: ``(||pre - tuned||^2, ||pre - tuned[perm]||^2, ||pre||^2)``."""
        same = float(np.trace(self.gram))
        moved = float(self.gram[np.arange(len(perm)), perm].sum())
        base = self.pre2 + self.tuned2
        return max(base - 2 * same, 0.0), max(base - 2 * moved, 0.0), self.pre2


def farthest_from_gram(gram: np.ndarray, solver: str, rng: np.random.Generator) -> np.ndarray:
    """`farthest_permutation` from the Gram matrix alone (``block`` needs the features: exact)."""
    solver = choose_solver(solver, gram.shape[0])
    if solver == "random":
        return rng.permutation(gram.shape[0]).astype(np.int64)
    if solver == "greedy":
        return _greedy(gram, rng)
    return min_cost_assignment(gram)


def _greedy(cost: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    n = cost.shape[0]
    perm = np.empty(n, dtype=np.int64)
    taken = np.zeros(n, dtype=bool)
    for i in rng.permutation(n):
        row = np.where(taken, np.inf, cost[i])
        j = int(row.argmin())
        perm[i], taken[j] = j, True
    return perm


def _sort_orders(pre: torch.Tensor, tuned: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Base units ascending and fine-tuned units descending along the base units' leading
    principal direction: ``rows[j]`` and ``cols[j]`` are opposite units."""
    n = pre.shape[0]
    # the leading principal direction of the base units (a few power iterations suffice for
    # sorting), without materialising the centred matrix: (X - 1m^T)^T w = X^T w - m sum(w)
    sample = pre[:: max(1, n // 2048)]  # the direction only orders units: a sample finds it
    # one contiguous copy (a strided sample multiplies slowly), in float32 unless `_keys`
    # multiplies bfloat16 natively
    native = sample.dtype == torch.bfloat16 and native_bfloat16()
    sample = sample.contiguous() if native else sample.float().contiguous()
    mean = torch.from_numpy(_keys(sample.T, torch.ones(len(sample)))) / len(sample)
    v = torch.ones(pre.shape[1]) / pre.shape[1] ** 0.5
    for _ in range(8):
        w = torch.from_numpy(_keys(sample, v)) - mean @ v
        v = torch.from_numpy(_keys(sample.T, w)) - mean * w.sum()
        v = v / v.norm().clamp_min(1e-30)
    return np.argsort(_keys(pre, v), kind="stable"), np.argsort(-_keys(tuned, v), kind="stable")


def _block(pre: torch.Tensor, tuned: torch.Tensor, block_size: int, products: torch.dtype,
           device: torch.device) -> tuple[np.ndarray, float]:
    n = pre.shape[0]
    rows, cols = _sort_orders(pre, tuned)
    perm = np.empty(n, dtype=np.int64)
    moved = 0.0
    # lapx and scipy release the GIL: blocks are solved in threads while the next block's
    # costs are multiplied (each block is independent: the result does not depend on timing)
    with ThreadPoolExecutor(max(1, min(4, os.cpu_count() or 1))) as pool:
        solved = []
        for start in range(0, n, block_size):
            r, c = rows[start : start + block_size], cols[start : start + block_size]
            a = to_products(pre.index_select(0, torch.from_numpy(r)), products, device)
            b = to_products(tuned.index_select(0, torch.from_numpy(c)), products, device)
            sub = (a @ b.T).cpu().double().numpy()  # (b, b)
            _require_finite(sub)
            solved.append((r, c, sub, pool.submit(block_assignment, sub)))
        for r, c, sub, job in solved:
            local = job.result()
            perm[r] = c[local]
            moved += float(sub[np.arange(len(local)), local].sum())
    return perm, moved


SPARSE_ROWS = 1024
"""Rows of the cost matrix multiplied at a time by the ``sparse`` solver (its memory: this many
rows of costs, not n^2)."""


def _sparse(pre: torch.Tensor, tuned: torch.Tensor, k: int, products: torch.dtype,
            device: torch.device) -> tuple[np.ndarray, float]:
    n = pre.shape[0]
    k = min(k, n)
    rows, cols = _sort_orders(pre, tuned)
    pairing = np.empty(n, dtype=np.int64)
    pairing[rows] = cols  # a complete matching among the edges: the sparse problem is feasible
    b = to_products(tuned, products, device)
    pair = torch.from_numpy(pairing).to(device)
    by_row = np.empty((n, k), dtype=np.int64)
    row_cost = np.empty((n, k))
    pair_cost = np.empty(n)
    # each column's k cheapest rows too: without them a column few rows want is left to the
    # pairing's (poor) edge
    col_cost = torch.full((k, n), torch.inf, device=device)
    by_col = torch.zeros((k, n), dtype=torch.int64, device=device)
    for start in range(0, n, SPARSE_ROWS):
        c = to_products(pre[start : start + SPARSE_ROWS], products, device) @ b.T  # (rows, n) costs
        _require_finite(c)
        stop = start + len(c)
        values, where = torch.topk(c, k, dim=1, largest=False, sorted=False)
        by_row[start:stop], row_cost[start:stop] = where.cpu().numpy(), values.cpu().double().numpy()
        pair_cost[start:stop] = c.gather(1, pair[start:stop, None])[:, 0].cpu().double().numpy()
        kc = min(k, len(c))
        values, where = torch.topk(c, kc, dim=0, largest=False, sorted=False)
        merged = torch.cat([col_cost, values.float()])
        col_cost, pick = torch.topk(merged, k, dim=0, largest=False, sorted=False)
        by_col = torch.cat([by_col, where + start]).gather(0, pick)
    by_col, col_cost = by_col.cpu(), col_cost.cpu()
    # edges as (row, column, cost), each once
    r = np.concatenate([np.repeat(np.arange(n), k), np.arange(n), by_col.numpy().reshape(-1)])
    c = np.concatenate([by_row.reshape(-1), pairing, np.tile(np.arange(n), k)])
    w = np.concatenate([row_cost.reshape(-1), pair_cost, col_cost.double().numpy().reshape(-1)])
    valid = np.isfinite(w)
    r, c, w = r[valid], c[valid], w[valid]
    key = r * n + c
    key, first = np.unique(key, return_index=True)
    rows_e, cols_e, cost_e = key // n, key % n, w[first]
    perm = sparse_assignment(rows_e, cols_e, cost_e, n)
    chosen = np.searchsorted(key, np.arange(n) * n + perm)  # each row's edge (keys are sorted)
    return perm, float(cost_e[chosen].sum())


SPARSE_COST_SPAN = 1e5
"""The widest range of costs handed to lapmod (below its limit ``lap.LARGE``, 1e6, with room)."""


def sparse_cost_matrix(rows: np.ndarray, cols: np.ndarray, cost: np.ndarray, n: int):  # -> scipy csr_matrix
    """The edges as an ``n x n`` CSR matrix with sorted indices, costs shifted to >= 1 (scipy
    drops explicit zeros) and, where they span more than `SPARSE_COST_SPAN`, scaled into it
    (lapmod refuses values of ``lap.LARGE``, 1e6, or more: costs of large weights, e.g. a
    model's with values of a few units, or the float64 retake of overflowing ones). A positive
    scale and a shift keep the optimum."""
    from scipy.sparse import csr_matrix

    shifted = cost - cost.min()
    span = float(shifted.max()) if len(shifted) else 0.0
    if span > SPARSE_COST_SPAN:
        shifted = shifted * (SPARSE_COST_SPAN / span)
    m = csr_matrix((shifted + 1.0, (rows, cols)), shape=(n, n))
    m.sort_indices()
    return m


def sparse_assignment(rows: np.ndarray, cols: np.ndarray, cost: np.ndarray, n: int) -> np.ndarray:
    """The gather index ``perm`` minimising ``sum_i cost(i, perm[i])`` using only the given edges
    (row ``rows[e]`` may take column ``cols[e]`` at ``cost[e]``; each pair at most once, some
    permutation must use given edges only).

    lapx's ``lapmod`` (sparse Jonker-Volgenant) solves it: on the ``sparse`` solver's graphs it took
    9-26% less time than scipy's ``min_weight_full_bipartite_matching`` for the same optimum
    (`benchmarks/lap_solvers.py`). An answer that is not a permutation along given edges (lapmod
    has no feasibility check) falls back to scipy, which raises ValueError on an infeasible graph."""
    m = sparse_cost_matrix(rows, cols, cost, n)
    perm = None
    if hasattr(lap, "lapmod"):
        x = lap.lapmod(n, m.data, m.indptr.astype(np.int32), m.indices.astype(np.int32), return_cost=False)[0]
        perm = np.asarray(x, dtype=np.int64)
        if not np.array_equal(np.sort(perm), np.arange(n)) or np.any(m[np.arange(n), perm] == 0):
            perm = None
    if perm is None:
        from scipy.sparse.csgraph import min_weight_full_bipartite_matching

        r, c = min_weight_full_bipartite_matching(m)
        perm = np.empty(n, dtype=np.int64)
        perm[r] = c
    return perm


def _keys(x: torch.Tensor, v: torch.Tensor) -> np.ndarray:
    """``x @ v`` in float32 (a sort key). bfloat16 `x` multiplies `v` rounded to bfloat16 where
    the CPU does so natively (`native_bfloat16`): 20x faster than converting `x` (a Llama-2-7B
    MLP's features: 12-14 against 250-261 ms, one thread; `benchmarks/transform_speed.py`); the
    key is then rounded to 3 significant digits, which moves units a few places in the sort
    order (block solver's objective on MiniLM's layers and their 9216-unit pool: -9e-5 to
    +1.1e-4 from float32 keys'; `benchmarks/solver_quality.py`). Other narrow dtypes are
    converted a few rows at a time."""
    if isinstance(x, UnitParts):
        bounds = np.cumsum([0] + [p.shape[1] for p in x.parts])
        return sum(_keys(p, v[a:b]) for p, a, b in zip(x.parts, bounds, bounds[1:]))  # type: ignore[return-value]
    if x.dtype in (torch.float32, torch.float64):
        return (x.float() @ v.float()).numpy()
    if x.dtype == torch.bfloat16 and native_bfloat16():
        return (x @ v.to(x.dtype)).float().numpy()
    step = max(1, (1 << 18) // max(1, x.shape[1]))
    return torch.cat([x[i : i + step].float() @ v.float() for i in range(0, x.shape[0], step)]).numpy()


def closest_permutation(pre: torch.Tensor, tuned: torch.Tensor) -> np.ndarray:
    """The gather index P minimising ``||pre - tuned[P]||^2`` (weight matching, the attack)."""
    return min_cost_assignment(-(pre @ tuned.T).numpy())


def permutation_objective(pre: torch.Tensor, tuned: torch.Tensor, perm: np.ndarray) -> float:
    """``||pre - tuned[perm]||^2``."""
    return float(((pre - tuned[torch.from_numpy(perm)]) ** 2).sum())


def permutation_distances(pre: torch.Tensor, tuned: torch.Tensor, perm: np.ndarray) -> tuple[float, float, float]:
    """``(||pre - tuned||^2, ||pre - tuned[perm]||^2, ||pre||^2)``, over chunks of units.

    Dot products in float32 (or float64 for float64 features; half-precision features are
    converted a chunk at a time) over chunks of about 128K values, added in float64: 1e-8 to
    1e-6 relative error in our measurements (one long float32 dot product reached 7e-5, torch's
    float32 norm 4e-3), at BLAS speed.
    The distance before is summed from the differences, not from ``a.a + b.b - 2 a.b``, which
    cancels for a small task vector; the distance after has no such cancellation (a permutation
    moves units far), so it comes from dot products. No (n, F) temporaries."""
    pp = tt = before = moved = 0.0
    idx = torch.from_numpy(perm)
    width = max(1, pre.shape[1])
    step = max(1, (1 << 17) // width)  # rows per dot product
    gather = 8 * step  # rows per gather: a few large gathers are cheap, many small ones are not
    wide = torch.float64 if pre.dtype == torch.float64 else torch.float32  # half: per chunk
    for outer in range(0, pre.shape[0], gather):
        rows = tuned.index_select(0, idx[outer : outer + gather])
        for start in range(outer, min(outer + gather, pre.shape[0]), step):
            p, t = pre[start : start + step].reshape(-1).to(wide), tuned[start : start + step].reshape(-1).to(wide)
            m = rows[start - outer : start - outer + step].reshape(-1).to(wide)
            d = p - t
            pp, tt = pp + float(p @ p), tt + float(t @ t)
            before, moved = before + float(d @ d), moved + float(p @ m)
    return before, max(pp + tt - 2 * moved, 0.0), pp
