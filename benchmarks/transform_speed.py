"""Benchmark: the numeric primitives protect's planning and writing lean on, each against the
plain torch way in the same run, at Llama-2-7B's shapes in bfloat16, on one thread (protect's
planner is one thread; torch's own threads come on top).

- permutation gathers (`take`: numpy's take on the raw bits) vs torch's advanced indexing and
  index_select, for rows (gate/up projections) and columns (the down projection);
- the block solver's gather of 1024 units' features from three parts (`UnitParts.index_select`:
  torch's index_select into each part's columns) vs numpy's take into the same strided columns;
- sums of squares by norms of runs (`runs_square_sum`, `square_sums`) vs a float32 sum, with
  their relative error against float64;
- the bfloat16 sort key (`_keys`) vs converting the features to float32;
- the whole-tensor power-of-two range (`pow2_exponent_range`) vs the per-index ranges;
- the scaled distances of an attention matrix in the stored dtype vs the float32 per-index sums.

Usage: ``python benchmarks/transform_speed.py [--threads 1] [--json OUT]``. Not a test: it
prints milliseconds (best of 5) and ratios.
"""

from __future__ import annotations

import argparse
import importlib
import json
import time
from collections.abc import Callable

import numpy as np
import torch

import mergeshield  # noqa: F401  (huge pages for torch's allocations, as in protect)
from mergeshield.core.assignment import UnitParts, _keys
from mergeshield.core.numeric import runs_square_sum, square_sums
from mergeshield.core.scales import pow2_exponent_bounds, pow2_exponent_range
from mergeshield.core.transforms import take
from mergeshield.symmetry.spec import Binding

protect_module = importlib.import_module("mergeshield.protect")


def best(f: Callable[[], object], repeat: int = 5) -> float:
    f()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        f()
        times.append(time.perf_counter() - t)
    return min(times) * 1e3


def _float32_path(t: torch.Tensor, p: torch.Tensor, binding: Binding, f: np.ndarray) -> tuple[float, float, float]:
    """`_scaled_distances` with its half-precision path off: float32 per-index sums of chunks."""
    saved = protect_module.SQUARES_EXACT_BELOW
    protect_module.SQUARES_EXACT_BELOW = 1 << 62
    try:
        return protect_module._scaled_distances(t, p, binding, f)
    finally:
        protect_module.SQUARES_EXACT_BELOW = saved


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    bf = torch.bfloat16
    gate = (torch.randn(11008, 4096, generator=g) * 0.02).to(bf)
    tuned = (gate.float() + 1e-3 * torch.randn(11008, 4096, generator=g)).to(bf)
    down = (torch.randn(4096, 11008, generator=g) * 0.02).to(bf)
    attn = (torch.randn(4096, 4096, generator=g) * 0.02).to(bf)
    attn_t = (attn.float() + 1e-3 * torch.randn(4096, 4096, generator=g)).to(bf)
    perm = torch.randperm(11008, generator=g)
    idx = perm.numpy()
    rows: dict[str, dict[str, float]] = {}

    def row(name: str, ours: float, plain: float, plain_name: str, **extra: float) -> None:
        rows[name] = {"ours_ms": ours, "plain_ms": plain, "ratio": ours / plain, **extra}
        more = "".join(f", {k} {v:.6g}" for k, v in extra.items())
        print(f"{name:<44} {ours:8.1f} ms  vs {plain_name:<28} {plain:8.1f} ms  ratio {ours / plain:5.2f}{more}")

    row("column gather 4096x11008 (take)", best(lambda: take(down, idx, 1)),
        best(lambda: down[:, perm]), "advanced indexing")
    row("column gather 4096x11008 (take)/index_select", best(lambda: take(down, idx, 1)),
        best(lambda: down.index_select(1, perm)), "index_select")
    row("row gather 11008x4096 (take)", best(lambda: take(gate, idx, 0)), best(lambda: gate[perm]), "advanced indexing")
    row("row gather 11008x4096 (take)/index_select", best(lambda: take(gate, idx, 0)),
        best(lambda: gate.index_select(0, perm)), "index_select")

    parts = UnitParts([(gate, Binding(tensor="gate", axis=0)), (tuned, Binding(tensor="up", axis=0)),
                       (down, Binding(tensor="down", axis=1))], dtype=bf)
    block = perm[:1024]

    def numpy_strided() -> torch.Tensor:
        out = torch.empty(len(block), parts.shape[1], dtype=bf)
        at = 0
        for part in parts.parts:
            dest = out[:, at : at + part.shape[1]].view(torch.int16).numpy()
            np.take(part.view(torch.int16).numpy(), block.numpy(), axis=0, out=dest, mode="clip")
            at += part.shape[1]
        return out

    assert torch.equal(parts.index_select(0, block), numpy_strided())
    row("block gather 1024 of 11008x12288 (3 parts)", best(lambda: parts.index_select(0, block)),
        best(numpy_strided), "numpy take, strided out")

    ref = float((gate.double() ** 2).sum())
    err = abs(runs_square_sum(gate) - ref) / ref
    err4096 = abs(float((torch.linalg.vector_norm(gate, dim=1).double() ** 2).sum()) - ref) / ref
    row("sum of squares 11008x4096 (runs of 256)", best(lambda: runs_square_sum(gate)),
        best(lambda: gate.float().pow(2).sum()), "float32 copy and sum", rel_error=err, rel_error_runs_4096=err4096)
    p, t = gate.double(), tuned.double()
    want = [float((p * p).sum()), float((t * t).sum()), float(((p - t) ** 2).sum())]
    got = square_sums(gate, tuned)
    row("square_sums pair 11008x4096", best(lambda: square_sums(gate, tuned)),
        best(lambda: [x.float().pow(2).sum() for x in (gate, tuned, gate - tuned)]), "float32 copies and sums",
        rel_error=max(abs(a - b) / b for a, b in zip(got, want)))

    features = torch.cat([gate, tuned, down.T], dim=1)  # an MLP's unit features, 11008 x 12288
    v = torch.randn(features.shape[1], generator=g)
    k32 = (features.float() @ v).numpy()
    k16 = _keys(features, v)
    ranks = np.corrcoef(np.argsort(np.argsort(k32)), np.argsort(np.argsort(k16)))[0, 1]
    row("sort key 11008x12288 (_keys)", best(lambda: _keys(features, v)), best(lambda: features.float() @ v),
        "float32 copy and product", rank_correlation=ranks)

    row("pow2 range 4096x4096 (whole tensor)", best(lambda: pow2_exponent_range(attn, bf)),
        best(lambda: pow2_exponent_bounds(attn, bf, axis=0)), "per-index ranges")

    f = np.exp2(np.random.default_rng(0).integers(-4, 5, 4096).astype(np.float64))
    for axis in (0, 1):
        b = Binding(tensor="x", axis=axis)
        F = torch.from_numpy(f).reshape(-1, 1) if axis == 0 else torch.from_numpy(f).reshape(1, -1)
        want_after = float(((attn.double() * F - attn_t.double()) ** 2).sum())
        got_after = protect_module._scaled_distances(attn, attn_t, b, f)[1]
        row(f"scaled distances 4096x4096 axis {axis}", best(lambda b=b: protect_module._scaled_distances(attn, attn_t, b, f)),
            best(lambda b=b: _float32_path(attn, attn_t, b, f)),
            "float32 per-index sums", rel_error=abs(got_after - want_after) / want_after)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"threads": args.threads, "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
