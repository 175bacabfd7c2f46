"""Benchmark: one Llama-2-7B-shaped MLP assignment (11008 units) with its costs multiplied on
each device torch sees: the CPU and, where present, a GPU (``ProtectOptions.device``).

Builds one MLP layer in memory (gate, up: 11008 x 4096; down: 4096 x 11008; bfloat16, the
synthetic weights of ``bench_protect.py``: base ``N(0, 0.02^2)``, fine-tune plus 2% noise), then
per device and solver (sparse, block) times `farthest_assignment` and reports its objective
``||pre - tuned[perm]||^2`` (`permutation_distances`) as a share of the CPU sparse solver's gain
over the identity. The CPU is the baseline in the same run.

Usage: ``python benchmarks/device_assignment.py [--devices cpu,cuda] [--json out.json]``.
Not a test. No GPU was lent to this project's sessions so far, so only CPU rows exist yet.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from mergeshield.core.assignment import farthest_assignment, permutation_distances, unit_features
from mergeshield.symmetry.spec import Binding


def layer(m: int = 11008, h: int = 4096, noise: float = 0.02) -> tuple[torch.Tensor, torch.Tensor]:
    """(base, fine-tuned) unit features of one SwiGLU MLP, bfloat16, ``(m, 3h)``."""
    tensors = []
    for which in (0, 1):
        parts = []
        for j, shape in enumerate(((m, h), (m, h), (h, m))):
            t = torch.randn(shape, generator=torch.Generator().manual_seed(j)) * 0.02
            if which:
                t = t + noise * t.abs().mean() * torch.randn(shape, generator=torch.Generator().manual_seed(j + 7))
            parts.append((t.to(torch.bfloat16), Binding(tensor="x", axis=0 if j < 2 else 1)))
        tensors.append(unit_features(parts, None, torch.bfloat16))
    return tensors[0], tensors[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", default="cpu" + (",cuda" if torch.cuda.is_available() else ""))
    ap.add_argument("--solvers", default="sparse,block")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    pre, tuned = layer()
    n = pre.shape[0]
    rows = []
    for device in args.devices.split(","):
        for solver in args.solvers.split(","):
            times = []
            for _ in range(2):  # the first call on a GPU also starts its kernels
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                t = time.perf_counter()
                perm, _ = farthest_assignment(pre, tuned, solver, products=torch.bfloat16, device=device)
                times.append(time.perf_counter() - t)
            before, after, _ = permutation_distances(pre, tuned, perm)
            rows.append({"device": device, "solver": solver, "seconds": min(times), "first_seconds": times[0],
                         "identity": before, "objective": after, "moved": float((perm != np.arange(n)).mean())})
    ref = next((r for r in rows if r["device"] == "cpu" and r["solver"] == "sparse"), rows[0])
    for r in rows:  # the objective's gain over the identity, as a share of the reference's
        r["gain_vs_cpu_sparse"] = (r["objective"] - r["identity"]) / (ref["objective"] - ref["identity"])
        print(f"{r['device']:>7} {r['solver']:>6}: {r['seconds']:.2f} s (first call {r['first_seconds']:.2f} s), "
              f"gain {r['gain_vs_cpu_sparse']:.6f} of the CPU sparse solver's")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"units": n, "features": pre.shape[1], "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
