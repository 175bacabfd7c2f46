"""What the text and vision suites share: a task model per task (fine-tuned backbone plus its own
``classifier.*`` head), accuracy with a merged backbone swapped in, and AdaMerging's entropy."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mergeshield.errors import MergeShieldError
from mergeshield.eval.config import EvalConfig
from mergeshield.io.checkpoint import Checkpoint
from mergeshield.io.naming import match_names
from mergeshield.merge.adamerging import entropy

__all__ = ["ClassifierSuite"]


class ClassifierSuite:
    """Subclasses call ``super().__init__(config, base)``, then fill ``tasks`` (objects with
    ``labels``, ``test_labels``, ``chance``) and ``folders``, and implement `_load` and
    `_make_batches`."""

    def __init__(self, config: EvalConfig, base: Path) -> None:
        self.config = config
        self.base = base
        self.tasks: dict[str, Any] = {}
        self.folders: dict[str, Path] = {}
        self._models: dict[str, tuple[torch.nn.Module, dict[str, torch.Tensor]]] = {}
        self._batches: dict[tuple[str, int], list[dict[str, torch.Tensor]]] = {}
        self._disk_maps: dict[str, dict[str, str]] = {}

    def _load(self, folder: Path) -> torch.nn.Module:
        raise NotImplementedError

    def _make_batches(self, task: str, batch_size: int) -> list[dict[str, torch.Tensor]]:
        raise NotImplementedError

    # ---- evaluation ----------------------------------------------------------------------------
    def _model(self, task: str) -> torch.nn.Module:
        """The task model as fine-tuned (loaded once, restored before every use)."""
        cached = self._models
        if task not in cached:
            model = self._load(self.folders[task]).eval()
            cached[task] = (model, {n: t.clone() for n, t in model.state_dict().items()})
        model, original = cached[task]
        model.load_state_dict(original)
        return model

    def batches(self, task: str, batch_size: int = 64) -> list[dict[str, torch.Tensor]]:
        store = self._batches
        if (task, batch_size) not in store:
            store[(task, batch_size)] = self._make_batches(task, batch_size)
        return store[(task, batch_size)]

    def accuracy(self, task: str, encoder: Mapping[str, torch.Tensor] | Path | None = None) -> float:
        """Accuracy on the task's test set, with the backbone replaced when one is given."""
        model = self._model(task)
        if encoder is not None:
            self._load_encoder(task, model, encoder)
        batches = self.batches(task)  # built outside inference mode: AdaMerging backprops through them
        preds = []
        with torch.inference_mode():
            for batch in batches:
                preds.append(model(**batch).logits.argmax(-1).numpy())
        return float((np.concatenate(preds) == np.asarray(self.tasks[task].test_labels)).mean())

    def chance(self, task: str) -> float:
        return float(self.tasks[task].chance)

    def n_test(self, task: str) -> int:
        return len(self.tasks[task].test_labels)

    # ---- AdaMerging hooks ------------------------------------------------------------------------
    def entropy_loss(self, task: str, names: Mapping[str, str],
                     batch_size: int | None = None) -> Callable[[dict[str, torch.Tensor]], torch.Tensor]:
        """Entropy of the task's predictions on its unlabelled test inputs (``batch_size`` a step,
        default 64), as a function of the merged tensors (``names`` maps merged-tensor names to the
        task model's parameter names)."""
        from torch.func import functional_call

        model = self._load(self.folders[task]).eval()
        for p in model.parameters():
            p.requires_grad_(False)
        batches = self.batches(task, batch_size or 64)
        counter = {"i": 0}

        def loss(params: dict[str, torch.Tensor]) -> torch.Tensor:
            batch = batches[counter["i"] % len(batches)]
            counter["i"] += 1
            mapped = {names[n]: t for n, t in params.items() if n in names}
            return entropy(functional_call(model, mapped, args=(), kwargs=dict(batch)).logits)

        return loss

    def model_names(self, task: str, tensor_names: list[str]) -> dict[str, str]:
        """Map checkpoint tensor names (base layout) to the task model's state-dict names.

        On-disk and in-memory names can differ (transformers 5 renames ViT's ``encoder.layer.N.
        attention.attention.query`` to ``layers.N.attention.q_proj`` when loading): names are
        matched on disk, then carried to memory."""
        maps = self._disk_maps
        if task not in maps:  # the same for every call: a full state-dict walk, once per task
            maps[task] = _disk_to_memory(self._model(task))
        disk = maps[task]
        return {n: disk[d] for n, d in match_names(tensor_names, list(disk)).items()}

    def _load_encoder(self, task: str, model: torch.nn.Module, encoder: Mapping[str, torch.Tensor] | Path) -> None:
        if isinstance(encoder, Path):
            ckpt = Checkpoint(encoder)
            state = {n: ckpt.get(n) for n in ckpt.names}
        else:
            state = dict(encoder)
        names = self.model_names(task, list(state))
        own = model.state_dict()
        heads = [n for n in own if n not in set(names.values())]
        if any(not n.startswith("classifier.") for n in heads):
            raise MergeShieldError(f"the merged weights do not cover the task model's backbone: missing {heads[:4]}")
        model.load_state_dict({names[n]: state[n] for n in names if not names[n].startswith("classifier.")},
                              strict=False)


def _disk_to_memory(model: torch.nn.Module) -> dict[str, str]:
    """{name as save_pretrained writes it: state-dict name}, by tensor identity after transformers'
    own reverse renaming (pure renamings only; a converter that builds new tensors is refused)."""
    own = model.state_dict()
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # a transformers without weight conversions: names are the same
        return {n: n for n in own}
    by_storage = {(t.data_ptr(), tuple(t.shape)): n for n, t in own.items()}
    out = {}
    for disk_name, t in revert_weight_conversion(model, dict(own)).items():
        mem = by_storage.get((t.data_ptr(), tuple(t.shape)))
        if mem is None:
            raise MergeShieldError(f"{type(model).__name__}: transformers converts {disk_name!r} when loading "
                                   "(not a plain renaming); the evaluation cannot swap its weights")
        out[disk_name] = mem
    return out
