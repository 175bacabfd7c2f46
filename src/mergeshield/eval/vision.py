"""The vision suite: a self-pretrained ViT fine-tuned per image task, each with its own head.

No pretrained ViT exists offline, so the base is pretrained by mergeshield itself on the
Fashion-MNIST train split (see `mergeshield.demo._vision_model`) and labelled "self-pretrained"
in every report. Merging merges the encoder (embeddings, blocks, final LayerNorm); each task keeps
its own ``classifier`` head, attached to the merged encoder for evaluation.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from mergeshield.demo._vision_data import load_image_task, pixel_values
from mergeshield.demo._vision_model import cached_image_finetune, self_pretrained_vit
from mergeshield.eval.classify import ClassifierSuite
from mergeshield.eval.config import EvalConfig

__all__ = ["VisionSuite"]


class VisionSuite(ClassifierSuite):
    """Image tasks on the self-pretrained ViT; fine-tuned checkpoints cached."""

    def __init__(self, config: EvalConfig, cache: Path, log: Callable[[str], None] = print) -> None:
        if config.base_model:
            base = Path(config.base_model)
        else:
            base = self_pretrained_vit(cache, config.vit, seed=config.seed)
            log(f"self-pretrained ViT: {base}")
        super().__init__(config, base)
        for spec in config.tasks:
            task = load_image_task(spec.name, n_train=spec.n_train, n_test=spec.n_test, seed=config.seed, cache=cache)
            self.tasks[spec.name] = task
            log(f"task {spec.name}: {len(task.labels)} classes, {len(task.train_labels)} train / "
                f"{len(task.test_labels)} test, majority-class rate {task.chance:.3f}")
            self.folders[spec.name] = cached_image_finetune(self.base, task, cache / "vision", steps=spec.steps,
                                                            seed=config.seed)

    def _load(self, folder: Path) -> torch.nn.Module:
        from transformers import AutoModelForImageClassification

        # float32 whatever the checkpoint's dtype (a float16 release is scored in float32, as the causal suite does)
        return AutoModelForImageClassification.from_pretrained(folder, local_files_only=True, dtype=torch.float32)

    def _make_batches(self, task: str, batch_size: int) -> list[dict[str, torch.Tensor]]:
        images = self.tasks[task].test_images
        return [{"pixel_values": pixel_values(images[i : i + batch_size])} for i in range(0, len(images), batch_size)]
