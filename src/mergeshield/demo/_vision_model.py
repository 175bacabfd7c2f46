"""A self-pretrained ViT and its fine-tunes, cached by what produced them.

No pretrained ViT exists in any package registry, so the vision suite pretrains a small HF
``ViTModel`` itself: supervised on the Fashion-MNIST train split (10 classes), then keeps the
encoder (embeddings,
transformer blocks, final LayerNorm) and drops the pretraining head. It is called "self-pretrained"
everywhere: it is far smaller and far less general than a real pretrained ViT.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from mergeshield.demo._finetune import COMPLETE, save_atomic, train_steps, versions
from mergeshield.demo._vision_data import FASHION_CLASSES, ImageTask, fashion_mnist, pixel_values

__all__ = ["ViTPretrain", "self_pretrained_vit", "cached_image_finetune", "image_processor"]


class ViTPretrain(BaseModel):
    """Shape and schedule of the self-pretrained ViT (28x28 grayscale input)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    patch_size: int = Field(7, gt=0)
    hidden_size: int = Field(128, gt=0)
    num_hidden_layers: int = Field(4, gt=0)
    num_attention_heads: int = Field(4, gt=0)
    intermediate_size: int = Field(512, gt=0)
    steps: int = Field(1000, gt=0)
    batch_size: int = Field(128, gt=0)
    lr: float = Field(1e-3, gt=0)
    n_images: int = Field(60000, gt=0)
    """How many Fashion-MNIST train images to pretrain on (all 60,000 by default)."""


def image_processor() -> object:
    """The processor saved with every model: what `pixel_values` computes."""
    from transformers import ViTImageProcessor

    return ViTImageProcessor(do_resize=False, do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
                             image_mean=[0.5], image_std=[0.5], size={"height": 28, "width": 28})


def _train(model: torch.nn.Module, images: np.ndarray, labels: np.ndarray, *, steps: int, batch_size: int,
           lr: float, seed: int, desc: str, warmup: int, progress: bool) -> None:
    """AdamW, linear warm-up then linear decay; batches from a seeded epoch-wise shuffle."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / max(warmup, 1), max(0.0, (steps - s) / max(steps - warmup, 1))))
    y = torch.from_numpy(labels)
    train_steps(model, len(images), lambda idx: {"pixel_values": pixel_values(images[idx]), "labels": y[idx]},
                opt, sched, steps=steps, batch_size=batch_size, rng=np.random.default_rng(seed), desc=desc,
                progress=progress)


def self_pretrained_vit(cache_root: Path, spec: ViTPretrain = ViTPretrain(), *, seed: int = 0,
                        progress: bool = True) -> Path:
    """Pretrain (or reuse from the cache) the self-pretrained ViT; returns a ``ViTModel`` folder."""
    from transformers import ViTConfig, ViTForImageClassification

    cache_root = Path(cache_root)
    images, labels = fashion_mnist("train", cache_root)
    images, labels = images[: spec.n_images], labels[: spec.n_images]
    h = hashlib.sha256(json.dumps([spec.model_dump(), seed, versions()]).encode())
    h.update(images.tobytes())
    h.update(labels.tobytes())
    out = cache_root / "vision" / f"vit-self-pretrained-{h.hexdigest()[:12]}"
    if (out / COMPLETE).is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    config = ViTConfig(
        image_size=28, patch_size=spec.patch_size, num_channels=1, hidden_size=spec.hidden_size,
        num_hidden_layers=spec.num_hidden_layers, num_attention_heads=spec.num_attention_heads,
        intermediate_size=spec.intermediate_size, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        num_labels=10, id2label=dict(enumerate(FASHION_CLASSES)),
    )
    model = ViTForImageClassification(config)
    _train(model, images, labels, steps=spec.steps, batch_size=spec.batch_size, lr=spec.lr, seed=seed,
           desc="self-pretraining ViT on Fashion-MNIST", warmup=min(100, spec.steps // 10), progress=progress)

    def write(tmp: Path) -> None:
        encoder = model.vit
        encoder.config.architectures = ["ViTModel"]
        encoder.save_pretrained(tmp, safe_serialization=True)
        image_processor().save_pretrained(tmp)  # type: ignore[attr-defined]
        (tmp / "README.md").write_text(
            "# Self-pretrained ViT (mergeshield vision suite)\n\n"
            "Not a real pretrained ViT: a small HF ViTModel pretrained by mergeshield itself, supervised on the\n"
            f"Fashion-MNIST train split ({len(images)} images, {spec.steps} steps of {spec.batch_size}), pretraining\n"
            "head dropped. 28x28 grayscale input.\n\n```json\n" + spec.model_dump_json(indent=1) + "\n```\n"
        )

    return save_atomic(out, write)


def cached_image_finetune(base_dir: Path, task: ImageTask, cache_root: Path, *, steps: int, batch_size: int = 64,
                          lr: float = 5e-4, seed: int = 0, progress: bool = True) -> Path:
    """Fine-tune ``ViTForImageClassification`` from `base_dir` on `task` (new head, whole model
    trained), unless the same base, data and hyper-parameters are cached."""
    from transformers import ViTForImageClassification

    from mergeshield.demo._finetune import hash_file

    h = hashlib.sha256(hash_file(Path(base_dir) / "model.safetensors").encode())
    h.update(json.dumps([task.name, task.labels, steps, batch_size, lr, seed, versions()]).encode())
    h.update(task.train_images.tobytes())
    h.update(task.train_labels.tobytes())
    out = Path(cache_root) / f"{task.name}-{h.hexdigest()[:12]}"
    if (out / COMPLETE).is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = ViTForImageClassification.from_pretrained(
        base_dir, num_labels=len(task.labels), local_files_only=True,
        id2label=dict(enumerate(task.labels)), label2id={c: i for i, c in enumerate(task.labels)},
    )
    _train(model, task.train_images, task.train_labels, steps=steps, batch_size=batch_size, lr=lr, seed=seed,
           desc=f"fine-tuning {task.name}", warmup=0, progress=progress)

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        image_processor().save_pretrained(tmp)  # type: ignore[attr-defined]

    return save_atomic(out, write)
