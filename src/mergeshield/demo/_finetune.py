"""Fine-tune the packaged all-MiniLM-L6-v2 as a sequence classifier, cached by what produced it."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from mergeshield.demo._data import TextTask

__all__ = ["finetune_classifier", "cached_finetune", "save_atomic", "hash_file", "train_steps", "versions", "predict", "accuracy", "default_cache_root"]

COMPLETE = ".mergeshield-complete"


def default_cache_root() -> Path:
    """``$MERGESHIELD_CACHE`` or ``~/.cache/mergeshield``."""
    return Path(os.environ.get("MERGESHIELD_CACHE", Path.home() / ".cache" / "mergeshield"))


def finetune_classifier(
    base_dir: Path,
    task: TextTask,
    out_dir: Path,
    *,
    steps: int,
    batch_size: int = 16,
    max_length: int = 64,
    lr: float = 5e-5,
    seed: int = 0,
    progress: bool = True,
) -> Path:
    """Fine-tune ``AutoModelForSequenceClassification`` from `base_dir` on `task` (AdamW, linear decay).

    Returns:
        `out_dir`, written atomically (safetensors, tokenizer, label names in the config).
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(seed)  # the new head's init and dropout; transformers draws from the global generator
    tok = AutoTokenizer.from_pretrained(base_dir, local_files_only=True)
    model = AutoModelForSequenceClassification.from_pretrained(
        base_dir, num_labels=len(task.labels), local_files_only=True,
        id2label=dict(enumerate(task.labels)), label2id={c: i for i, c in enumerate(task.labels)},
    )
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1 - s / steps))
    texts, labels = list(task.train_texts), np.asarray(task.train_labels)

    def make_batch(idx: list[int]) -> dict[str, torch.Tensor]:
        batch = tok([texts[i] for i in idx], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        return {**batch, "labels": torch.as_tensor(labels[idx])}

    train_steps(model, len(texts), make_batch, opt, sched, steps=steps, batch_size=batch_size,
                rng=np.random.default_rng(seed), desc=f"fine-tuning {task.name}", progress=progress)

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)

    return save_atomic(out_dir, write)


def train_steps(
    model: torch.nn.Module, n_examples: int, make_batch: Callable[[list[int]], dict[str, torch.Tensor]],
    opt: torch.optim.Optimizer, sched: torch.optim.lr_scheduler.LRScheduler, *, steps: int, batch_size: int,
    rng: np.random.Generator, desc: str, progress: bool,
) -> None:
    """`steps` optimiser steps on batches from a seeded epoch-wise shuffle; leaves `model` in eval mode."""
    model.train()
    order: list[int] = []
    bar = tqdm(range(steps), desc=desc, unit="step", disable=not progress)
    for _ in bar:
        if len(order) < batch_size:
            order += list(rng.permutation(n_examples))
        idx, order = order[:batch_size], order[batch_size:]
        loss = model(**make_batch(idx)).loss
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()


def save_atomic(out_dir: Path, write: Callable[[Path], None]) -> Path:
    """Run ``write(tmp)`` on a fresh folder beside `out_dir`, mark it complete, move it into place."""
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        write(tmp)
        (tmp / COMPLETE).write_text("ok\n")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def hash_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def versions() -> str:
    """torch|transformers versions, part of every cache key (a new version retrains)."""
    import transformers

    return f"{torch.__version__.split('+')[0]}|{transformers.__version__}"


def cached_finetune(base_dir: Path, task: TextTask, cache_root: Path, **hp: object) -> Path:
    """`finetune_classifier` unless the same base, data and hyper-parameters are cached.

    The key covers the base weights' sha256, the task's training data, every hyper-parameter and
    the torch/transformers versions.
    """
    h = hashlib.sha256()
    h.update(hash_file(Path(base_dir) / "model.safetensors").encode())
    h.update(json.dumps([task.name, task.labels, task.train_texts, task.train_labels]).encode())
    h.update(json.dumps(sorted(hp.items()), default=str).encode())
    h.update(versions().encode())
    out = Path(cache_root) / f"{task.name}-{h.hexdigest()[:12]}"
    if (out / COMPLETE).is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    return finetune_classifier(Path(base_dir), task, out, **hp)  # type: ignore[arg-type]


def predict(model: torch.nn.Module, tokenizer: object, texts: list[str], *, batch_size: int = 64,
            max_length: int = 64) -> np.ndarray:
    """Predicted label ids."""
    model.eval()
    out = []
    with torch.inference_mode():
        for i in range(0, len(texts), batch_size):
            batch = tokenizer(texts[i : i + batch_size], padding=True, truncation=True,  # type: ignore[operator]
                              max_length=max_length, return_tensors="pt")
            out.append(model(**batch).logits.argmax(-1).numpy())
    return np.concatenate(out)


def accuracy(preds: np.ndarray, labels: np.ndarray) -> float:
    return float((np.asarray(preds) == np.asarray(labels)).mean())
