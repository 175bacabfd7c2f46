"""Benchmark: protect and merge Llama-shaped checkpoints against their floors, in one run.

Generates a synthetic base and a "fine-tune" (base + small noise) with a Llama layout
(default: TinyLlama-1.1B's shape, about 1.1B parameters; ``--shape 7b`` for Llama-2-7B's;
``--shape 70b-2layers`` for two layers of Llama-2-70B's width),
sharded safetensors in bfloat16 (``--dtype float16`` for float16, as Llama-2-7B itself is stored;
its checkpoints go to folders named ``SHAPE-f16-*``), then measures, each in a fresh subprocess:

- ``copy``: read every tensor and write it back (the disk floor the issue measures against);
- ``copy2``: the same, also reading (one memory copy) every base tensor protect reads, with the
  same read-ahead: the floor of protect's I/O, which reads two models (no transform, no check;
  importing transformers is not timed here, and is in protect);
- ``protect`` with each requested solver: wall time / copy time, peak RSS;
- ``merge`` (task arithmetic, TIES) with mergeshield and with mergekit: wall time ratio;
- the objective each solver reaches on one layer, as a fraction of the exact optimum's
  distance gain over the identity.

With ``--cold`` every timed run starts with the inputs' pages dropped from the page cache
(``os.sync`` then ``POSIX_FADV_DONTNEED`` on each file of both checkpoints): the runs then read the
disk, as the issue's "1-1.5 minutes to read and write 13.5 GB" did, instead of memory.

Usage: ``python benchmarks/bench_protect.py --work /tmp/bench --out bench.json [--shape 7b] [--dtype float16]
[--device cuda] [--cold]``.
Not a test: numbers depend on the machine; ratios within one run are what to compare.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

SHAPES = {
    "tiny": dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8,
                 num_key_value_heads=4, vocab_size=8000),
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=4, vocab_size=32000),
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32, vocab_size=32000),
    # Llama-2-70B's layer widths (GQA with 8 K/V heads, a 28672-wide MLP) with 2 of its 80 layers:
    # per-layer time and memory at 70B width on a disk that cannot hold 70B twice
    "70b-2layers": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=2, num_attention_heads=64,
                        num_key_value_heads=8, vocab_size=32000),
}


def prefix(shape: str, dtype: str = "bfloat16") -> str:
    """The checkpoints' folder names start with this (bfloat16 ones keep their old names)."""
    return shape if dtype == "bfloat16" else f"{shape}-f16"


def make_checkpoints(work: Path, shape: str, seed: int = 0, dtype: str = "bfloat16") -> tuple[Path, Path]:
    """Write base/ and ft/ (`dtype`: bfloat16 or float16; 2 GB shards) one tensor at a time. The
    values are drawn in float32 and rounded to `dtype`, so both dtypes hold the same model."""
    import torch
    from safetensors.torch import save_file

    stored = {"bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    cfg = dict(SHAPES[shape], model_type="llama", architectures=["LlamaForCausalLM"], rms_norm_eps=1e-5,
               max_position_embeddings=2048, tie_word_embeddings=False, torch_dtype=dtype)
    h, m, L, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    kv = h // cfg["num_attention_heads"] * cfg["num_key_value_heads"]
    shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,), "lm_head.weight": (v, h)}
    for i in range(L):
        p = f"model.layers.{i}."
        shapes.update({
            p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, h),
            p + "mlp.gate_proj.weight": (m, h), p + "mlp.up_proj.weight": (m, h), p + "mlp.down_proj.weight": (h, m),
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
        })
    out = []
    for name, noise in (("base", 0.0), ("ft", 0.02)):
        folder = work / f"{prefix(shape, dtype)}-{name}"
        out.append(folder)
        if (folder / "model.safetensors.index.json").exists():
            continue
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps(cfg))
        weight_map, shard, size, k, total = {}, {}, 0, 0, 0
        files = []

        def flush() -> None:
            nonlocal shard, size, k
            fname = f"model-{k:05d}.safetensors"
            save_file(shard, str(folder / fname), metadata={"format": "pt"})
            files.append(fname)
            weight_map.update({n: fname for n in shard})
            shard, size, k = {}, 0, k + 1

        for j, (n, s) in enumerate(shapes.items()):
            g = torch.Generator().manual_seed(seed * 100003 + j)
            t = torch.ones(s) if len(s) == 1 else torch.randn(s, generator=g) * 0.02
            if noise:
                t = t + noise * t.abs().mean() * torch.randn(s, generator=torch.Generator().manual_seed(j + 7))
            t = t.to(stored)
            shard[n] = t
            size += t.numel() * 2
            total += t.numel() * 2
            if size > 2 * 1024**3:
                flush()
        if shard:
            flush()
        (folder / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return out[0], out[1]


def copy_with_base(ft: Path, base: Path, out: Path) -> None:
    """The ``copy2`` floor: rewrite `ft` as the copy does, and read every base tensor that protect
    (default options) reads, prefetched as protect prefetches it."""
    from mergeshield.io.checkpoint import Checkpoint
    from mergeshield.io.checkpoint import rewrite_checkpoint
    from mergeshield.protect import ProtectOptions, _check_base, _Plan, bind_checkpoint

    with Checkpoint(ft) as model, Checkpoint(base) as pre:
        bound = bind_checkpoint(model)
        names = _check_base(model, pre, bound)
        read = _Plan(model, pre, bound, names, ProtectOptions()).read_names  # plans nothing yet

        def produce(name: str):
            if name in read:
                pre.get(names[name]).clone()
            return model.get(name)

        def prefetch(batch: list[str]) -> None:
            model.prefetch(batch)
            pre.prefetch([names[n] for n in batch if n in read])

        rewrite_checkpoint(model, out, produce, overwrite=True, progress=False, desc="", inputs=[pre], prefetch=prefetch)


def evict_page_cache(*folders: Path) -> None:
    """Write back dirty pages (``os.sync``), then ask the kernel to drop every file of these
    folders from the page cache (``POSIX_FADV_DONTNEED``; clean pages go, no root needed)."""
    os.sync()
    for folder in folders:
        for path in sorted(Path(folder).rglob("*")):
            if path.is_file():
                fd = os.open(path, os.O_RDONLY)
                try:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)


def _timed(code: str, setup: str = "", cold: Sequence[Path] = ()) -> dict[str, float]:
    """Run python code in a fresh process; wall seconds (after `setup`, e.g. imports) and peak
    RSS (GiB): the process's own ``VmHWM`` (Linux), or its children's ``ru_maxrss`` if larger.
    Not its own ``ru_maxrss``: Linux keeps that across ``execve``, so a child forked from this
    process would report at least this process's resident size at the fork (2.7 GiB once this
    process had generated the 7B checkpoints)."""
    wrapper = (
        "import resource, time, json, re\n" + setup + "\nt=time.perf_counter()\n" + code +
        "\nhwm = int(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1))"
        "\nprint(json.dumps({'seconds': time.perf_counter()-t, "
        "'peak_rss_gib': max(hwm, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)/2**20}))"
    )
    if cold:  # the child's setup (imports, removing the last output) reads no weights
        evict_page_cache(*cold)
    res = subprocess.run([sys.executable, "-c", wrapper], capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(res.stderr[-3000:])
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True, help="scratch folder for checkpoints (needs disk)")
    ap.add_argument("--out", type=Path, default=Path("bench_protect.json"))
    ap.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    ap.add_argument("--dtype", choices=("bfloat16", "float16"), default="bfloat16", help="the checkpoints' dtype")
    ap.add_argument("--solvers", default="auto,sparse,block,random", help="protect solvers to time (exact is slow at 7b)")
    ap.add_argument("--no-mergekit", action="store_true")
    ap.add_argument("--repeat", type=int, default=3, help="rounds of copy + protect runs (medians are reported)")
    ap.add_argument("--parts", default="protect,objective,merge", help="which measurements to run")
    ap.add_argument("--device", default="cpu", help="where protect multiplies the assignment costs (cpu, cuda)")
    ap.add_argument("--exact-layer", action="store_true", help="run the exact solver on one layer even above 6000 units")
    ap.add_argument("--cold", action="store_true", help="drop the inputs from the page cache before each timed run")
    args = ap.parse_args()
    import torch

    work = args.work
    parts = set(args.parts.split(","))
    work.mkdir(parents=True, exist_ok=True)
    base, ft = make_checkpoints(work, args.shape, dtype=args.dtype)
    from mergeshield.io.checkpoint import Checkpoint

    n_params = sum(int(torch.Size(s).numel()) for s in Checkpoint(ft).shapes().values())
    results: dict[str, object] = {"shape": args.shape, "params_b": n_params / 1e9, "cpus": os.cpu_count(),
                                  "device": args.device, "dtype": args.dtype}
    print(f"{args.shape}: {n_params / 1e9:.2f}B parameters, {args.dtype}, {len(Checkpoint(ft).shards)} shard(s)")

    if "protect" in parts:
        # imports (about 2 s) and deleting the previous run's output are left out of the timings;
        # protect's own import of transformers (for the config defaults, about 1.5 s) is counted
        copy_code = (
            f"c=Checkpoint(r'{ft}')\n"
            f"rewrite_checkpoint(c, __import__('pathlib').Path(r'{work / 'copy'}'), c.get, overwrite=True, progress=False, desc='')"
        )
        copy_setup = ("from mergeshield.io.checkpoint import Checkpoint, rewrite_checkpoint\n"
                      f"import shutil; shutil.rmtree(r'{work / 'copy'}', ignore_errors=True)")
        copy2_setup = (f"import sys, shutil; sys.path.insert(0, r'{Path(__file__).resolve().parent}')\n"
                       "from bench_protect import copy_with_base\nimport transformers\n"
                       f"shutil.rmtree(r'{work / 'copy'}', ignore_errors=True)")  # one output folder: disk
        copy2_code = f"copy_with_base(Path(r'{ft}'), Path(r'{base}'), Path(r'{work / 'copy'}'))"
        solvers = args.solvers.split(",")
        cold = (ft, base) if args.cold else ()
        results["cold"] = args.cold
        runs: dict[str, list[dict[str, float]]] = {"copy": [], "copy2": [], **{s: [] for s in solvers}}
        for rep in range(args.repeat):  # interleaved, so that a slow spell of the machine hits all alike
            runs["copy"].append(_timed(copy_code, copy_setup, cold))
            runs["copy2"].append(_timed(copy2_code, "from pathlib import Path\n" + copy2_setup, cold))
            for solver in solvers:
                runs[solver].append(_timed(
                    f"protect(r'{ft}', r'{base}', r'{work / 'prot'}', ProtectOptions(solver='{solver}', device='{args.device}'), "
                    "overwrite=True, progress=False)",
                    setup=f"from mergeshield import protect, ProtectOptions\nimport shutil; shutil.rmtree(r'{work / 'prot'}', ignore_errors=True)",
                    cold=cold,
                ))
            print(f"round {rep + 1}/{args.repeat}: " + ", ".join(f"{k} {v[-1]['seconds']:.1f} s" for k, v in runs.items()))

        def median(rs: list[dict[str, float]]) -> dict[str, object]:
            return {"seconds": statistics.median(r["seconds"] for r in rs),
                    "peak_rss_gib": max(r["peak_rss_gib"] for r in rs), "runs": rs}

        copy = median(runs["copy"])
        results["copy"] = copy
        print(f"copy (read + write, the floor): median {copy['seconds']:.1f} s of {args.repeat}, "
              f"peak RSS {copy['peak_rss_gib']:.2f} GiB")
        copy2 = median(runs["copy2"])
        copy2["ratio_to_copy"] = copy2["seconds"] / copy["seconds"]
        results["copy2"] = copy2
        print(f"copy2 (the copy + reading the base tensors protect reads): median {copy2['seconds']:.1f} s = "
              f"{copy2['ratio_to_copy']:.2f}x copy, peak RSS {copy2['peak_rss_gib']:.2f} GiB")
        for solver in solvers:
            r = median(runs[solver])
            r["ratio_to_copy"] = r["seconds"] / copy["seconds"]
            r["ratio_to_copy2"] = r["seconds"] / copy2["seconds"]
            results[f"protect_{solver}"] = r
            print(f"protect [{solver}]: median {r['seconds']:.1f} s = {r['ratio_to_copy']:.2f}x copy, "
                  f"{r['ratio_to_copy2']:.2f}x copy2, peak RSS {r['peak_rss_gib']:.2f} GiB")

    if "objective" in parts:
        # objective fraction per solver on one MLP layer
        import numpy as np

        from mergeshield.core.assignment import (
            farthest_permutation,
            native_bfloat16,
            permutation_objective,
            unit_features,
        )
        from mergeshield.protect import bind_checkpoint

        bc, fc = Checkpoint(base), Checkpoint(ft)
        inst = next(i for i in bind_checkpoint(fc).instances if i.space.kind == "permutation")
        fp = unit_features([(bc.get(bt.name).float(), bt.binding) for bt in inst.tensors])
        ff = unit_features([(fc.get(bt.name).float(), bt.binding) for bt in inst.tensors])
        ident = permutation_objective(fp, ff, np.arange(inst.size))
        # as protect does for these half-precision checkpoints: block costs in bfloat16 where the CPU has it
        products = torch.bfloat16 if native_bfloat16() else torch.float32
        results["block_products"] = str(products)
        objective: dict[str, dict[str, float]] = {}
        best = None
        for solver in ("exact", "sparse", "block", "greedy", "random"):
            if solver == "exact" and inst.size > 6000 and not args.exact_layer:
                continue
            t = time.perf_counter()
            perm = farthest_permutation(fp, ff, solver, rng=np.random.default_rng(0), products=products)
            # "objective": ||pre - P tuned||^2 (the measure); "gain": its increase over the
            # identity, the stricter share (the identity's distance is the task vector's)
            obj = permutation_objective(fp, ff, perm)
            objective[solver] = {"seconds": time.perf_counter() - t, "gain": obj - ident, "objective": obj}
            if solver == "exact":
                best = objective[solver]
        for solver, o in objective.items():
            if best:
                o["fraction_of_exact"] = o["gain"] / best["gain"]
                o["objective_fraction_of_exact"] = o["objective"] / best["objective"]
            print(f"one {inst.size}-wide layer, {solver}: {o['seconds']:.2f} s"
                  + (f", {o['fraction_of_exact']:.4f} of the exact gain, {o['objective_fraction_of_exact']:.5f} of "
                     "its objective" if best else ""))
        results["objective"] = objective

    if "merge" in parts and not args.no_mergekit:
        import shutil

        import yaml

        ft2 = work / f"{prefix(args.shape, args.dtype)}-ft-b"
        if not ft2.exists():
            shutil.copytree(ft, ft2)
        for method, ours, theirs in (("task_arithmetic", "make_method('task_arithmetic', lam=0.8)", {"lambda": 0.8}),
                                     ("ties", "make_method('ties', lam=0.8, density=0.2)", {"lambda": 0.8})):
            r_ours = _timed(
                "from mergeshield import merge_checkpoints, make_method\n"
                f"merge_checkpoints(r'{base}', [r'{ft}', r'{ft2}'], r'{work / 'm_ours'}', {ours}, overwrite=True, progress=False)"
            )
            per_model = {"weight": 1.0} if method == "task_arithmetic" else {"weight": 1.0, "density": 0.2}
            cfg = {"merge_method": method, "base_model": str(base), "parameters": theirs, "dtype": args.dtype,
                   "models": [{"model": str(ft), "parameters": per_model}, {"model": str(ft2), "parameters": per_model}]}
            (work / "mk.yaml").write_text(yaml.safe_dump(cfg))
            shutil.rmtree(work / "m_mk", ignore_errors=True)
            r_mk = _timed(
                "import subprocess, sys\n"
                f"subprocess.run([sys.executable, '-m', 'mergeshield.eval._mergekit_shim', r'{work / 'mk.yaml'}', "
                f"r'{work / 'm_mk'}', '--allow-crimes', '--lazy-unpickle'], check=True, capture_output=True)"
            )
            results[f"merge_{method}"] = {"mergeshield": r_ours, "mergekit": r_mk,
                                          "ratio": r_ours["seconds"] / r_mk["seconds"]}
            print(f"merge {method}: mergeshield {r_ours['seconds']:.1f} s, mergekit {r_mk['seconds']:.1f} s, "
                  f"ratio {r_ours['seconds'] / r_mk['seconds']:.2f}; peak RSS ours {r_ours['peak_rss_gib']:.2f} GiB, "
                  f"mergekit {r_mk['peak_rss_gib']:.2f} GiB")
    args.out.write_text(json.dumps(results, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
