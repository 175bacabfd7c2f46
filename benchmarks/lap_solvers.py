"""Benchmark: exact linear assignment solvers from the package registries on our cost matrices.

protect's ``exact`` solver is scipy's ``linear_sum_assignment``; each block of the ``block``
solver is lapx's ``lapjvr`` (a dependency). This script times them against each other and, where
installed, ``fastlap`` (``pip install fastlap``; not a dependency), on the cost matrices protect
solves: the Gram matrices ``<pre_i, tuned_j>`` of all-MiniLM-L6-v2's six MLP layers (1536 units;
real weights, the "fine-tune" a 5% perturbation as in `solver_quality.py`), the sorted 1024-unit
blocks the block solver cuts from the six layers pooled (9216 units), and, with ``--work``, one
MLP layer of `bench_protect.py`'s synthetic 1B checkpoints (5632 units, its first 4096 x 4096
block, and its sorted blocks). Every solver must reach scipy's optimum; the table gives seconds.

Then the ``sparse`` solver's LAPs: the candidate graphs it builds on the same features (each row's
and each column's `SPARSE_CANDIDATES` cheapest edges and one complete pairing), solved by lapx's
``lapmod`` (what it uses) and by scipy's ``min_weight_full_bipartite_matching``.

Usage: ``python benchmarks/lap_solvers.py [--work /tmp/bench] [--work7 /tmp/bench7]``. Not a test.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from solver_quality import minilm_layers  # this folder is on sys.path when run as a script

from mergeshield.core.assignment import sparse_cost_matrix, unit_features
from mergeshield.io.checkpoint import Checkpoint
from mergeshield.protect import bind_checkpoint


def _solvers() -> dict[str, Callable[[np.ndarray], np.ndarray]]:
    solvers: dict[str, Callable[[np.ndarray], np.ndarray]] = {"scipy": lambda c: linear_sum_assignment(c)[1]}
    import lap  # lapx's module

    solvers["lapx lapjvr"] = lambda c: lap.lapjvr(c, return_cost=False)[1]
    solvers["lapx lapjv"] = lambda c: lap.lapjv(c, extend_cost=False, return_cost=False)[0]
    try:
        import fastlap

        solvers["fastlap lapjv"] = lambda c: np.asarray(fastlap.linear_sum_assignment(c)[1])
    except ImportError:
        print("fastlap not installed: skipped")
    return solvers


def _captured(pre: torch.Tensor, tuned: torch.Tensor, solver: str, hook: str) -> list[tuple]:
    """The arguments `solver` hands to its LAP (`mergeshield.core.assignment`'s function `hook`)
    on these features (bfloat16 products, as protect on a bfloat16 checkpoint)."""
    from mergeshield.core import assignment

    captured: list[tuple] = []
    real = getattr(assignment, hook)

    def capture(*args):
        captured.append(args)
        return real(*args)

    setattr(assignment, hook, capture)
    try:
        assignment.farthest_permutation(pre.to(torch.bfloat16), tuned.to(torch.bfloat16), solver,
                                        products=torch.bfloat16)
    finally:
        setattr(assignment, hook, real)
    return captured


def _blocks(pre: torch.Tensor, tuned: torch.Tensor) -> list[np.ndarray]:
    """The cost blocks the block solver solves on these features."""
    return [np.ascontiguousarray(cost) for (cost,) in _captured(pre, tuned, "block", "block_assignment")]


def _graphs(pre: torch.Tensor, tuned: torch.Tensor) -> list[tuple[np.ndarray, np.ndarray, np.ndarray, int]]:
    """The candidate graph the sparse solver solves on these features: (rows, cols, cost, n)."""
    return _captured(pre, tuned, "sparse", "sparse_assignment")


def _sparse_table(graphs: list[tuple[str, tuple[np.ndarray, np.ndarray, np.ndarray, int]]]) -> None:
    import lap
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import min_weight_full_bipartite_matching

    def lapmod(m: csr_matrix) -> np.ndarray:
        return np.asarray(lap.lapmod(m.shape[0], m.data, m.indptr.astype(np.int32), m.indices.astype(np.int32),
                                     return_cost=False)[0])

    def scipy_sparse(m: csr_matrix) -> np.ndarray:
        r, c = min_weight_full_bipartite_matching(m)
        perm = np.empty(m.shape[0], dtype=np.int64)
        perm[r] = c
        return perm

    print(f"\n{'sparse graph':<36}{'edges/row':>10}{'lapx lapmod':>16}{'scipy LAPJVsp':>16}")
    for name, (rows, cols, cost, n) in graphs:
        m = sparse_cost_matrix(rows, cols, cost, n)  # as sparse_assignment builds it
        row, best = [], None
        for solve in (lapmod, scipy_sparse):
            t = time.perf_counter()
            perm = solve(m)
            sec = time.perf_counter() - t
            total = float(np.asarray(m[np.arange(n), perm]).sum())
            best = total if best is None else best
            row.append(f"{sec:15.3f}{' ' if np.isclose(total, best, rtol=1e-12) else '!'}")
        print(f"{name:<36}{len(rows) / n:10.1f}" + "".join(row))
    print("seconds; '!' marks a solver that missed lapmod's optimum")


def _first_mlp(work: Path, shape: str = "1b", dtype: torch.dtype = torch.float64) -> tuple[str, torch.Tensor, torch.Tensor]:
    """The first MLP layer of `bench_protect.py`'s synthetic base and fine-tune of that shape."""
    ft, base = Checkpoint(work / f"{shape}-ft"), Checkpoint(work / f"{shape}-base")
    inst = next(i for i in bind_checkpoint(ft).instances if i.space.kind == "permutation" and not i.model_scoped)
    pre = unit_features([(base.get(bt.name), bt.binding) for bt in inst.tensors], dtype=dtype)
    tuned = unit_features([(ft.get(bt.name), bt.binding) for bt in inst.tensors], dtype=dtype)
    return f"{inst.id} ({inst.size})", pre, tuned


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, help="bench_protect.py's folder with 1b-base and 1b-ft")
    ap.add_argument("--work7", type=Path, help="bench_protect.py's folder with 7b-base and 7b-ft (sparse table only)")
    args = ap.parse_args()
    costs: list[tuple[str, list[np.ndarray]]] = []
    pooled = []
    for name, pre, tuned in minilm_layers():  # the layers solver_quality.py measures
        costs.append((f"{name} ({pre.shape[0]})", [np.ascontiguousarray((pre @ tuned.T).numpy())]))
        pooled.append((pre, tuned))
    pre, tuned = (torch.cat(x) for x in zip(*pooled))
    blocks = _blocks(pre, tuned)
    costs.append((f"MiniLM pooled: {len(blocks)} blocks", blocks))
    graphs = [(f"MiniLM pooled ({pre.shape[0]})", g) for g in _graphs(pre, tuned)]
    if args.work is not None:
        name, pre, tuned = _first_mlp(args.work)
        full = np.ascontiguousarray((pre @ tuned.T).numpy())
        costs += [(f"1B {name}", [full]), ("1B, its first 4096", [np.ascontiguousarray(full[:4096, :4096])])]
        blocks = _blocks(pre, tuned)
        costs.append((f"1B: {len(blocks)} blocks", blocks))
        graphs += [(f"1B {name}", g) for g in _graphs(pre, tuned)]
    if args.work7 is not None:
        name, pre, tuned = _first_mlp(args.work7, "7b", torch.bfloat16)
        graphs += [(f"7B {name}", g) for g in _graphs(pre, tuned)]
    solvers = _solvers()
    print(f"{'cost matrix':<36}" + "".join(f"{s:>16}" for s in solvers))
    for name, mats in costs:
        row, best = [], None
        for solve in solvers.values():
            t = time.perf_counter()
            total = 0.0
            for cost in mats:
                cols = solve(cost)
                total += float(cost[np.arange(len(cols)), cols].sum())
            sec = time.perf_counter() - t
            best = total if best is None else best
            ok = np.isclose(total, best, rtol=1e-12, atol=1e-9)
            row.append(f"{sec:15.3f}{' ' if ok else '!'}")
        print(f"{name:<36}" + "".join(row))
    print("seconds (all blocks of a row together); '!' marks a solver that missed scipy's optimum")
    _sparse_table(graphs)


if __name__ == "__main__":
    main()
