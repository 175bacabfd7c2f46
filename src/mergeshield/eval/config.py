"""Evaluation configs: YAML -> ``yaml.safe_load`` -> a frozen, strict pydantic model."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from mergeshield.demo._vision_model import ViTPretrain
from mergeshield.errors import MergeShieldError
from mergeshield.protect import ProtectOptions

__all__ = ["EvalConfig", "TaskSpec", "MergeSpec", "DefenseSpec", "load_config"]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class TaskSpec(_Frozen):
    name: str
    n_train: int = Field(gt=0)
    n_test: int = Field(gt=0)
    steps: int = Field(gt=0)
    """Fine-tuning steps (batch 16)."""


class MergeSpec(_Frozen):
    """One merge method; a list of lambdas is a sweep."""

    method: Literal["average", "task_arithmetic", "ties", "dare_ta", "dare_ties", "adamerging",
                    "breadcrumbs", "della", "model_stock"]
    lam: float | list[float] | None = None
    density: float | None = None
    drop: float | None = None
    engine: Literal["mergeshield", "mergekit"] = "mergeshield"
    n_models: list[int] = [2]
    """Merge the victim with the first n-1 other tasks, for each n."""
    steps: int = 40
    """AdaMerging optimisation steps."""
    batch: int | None = Field(default=None, gt=0)
    """AdaMerging: unlabelled test inputs per task and step (default: the suite's, 64 for text
    and vision, 8 for causal)."""

    def lambdas(self) -> list[float | None]:
        if isinstance(self.lam, list):
            return list(self.lam)
        return [self.lam]


class DefenseSpec(_Frozen):
    """A protected release of the victim, and the attacks to run on it."""

    name: str
    options: ProtectOptions = ProtectOptions()
    attacks: list[str] = ["realign+fill"]


class EvalConfig(_Frozen):
    suite: str
    kind: Literal["text", "causal", "vision"] = "text"
    """``text``: MiniLM classifiers with per-task heads; ``causal``: SmolLM2 label-word generation;
    ``vision``: a self-pretrained ViT with per-task heads."""
    seed: int = 0
    tasks: list[TaskSpec] = Field(min_length=2)
    victim: str
    """The task whose model the publisher protects."""
    defenses: list[DefenseSpec] = Field(min_length=1)
    merges: list[MergeSpec] = Field(min_length=1)
    line_points: int = 11
    """Points on the straight line from the base to the victim (0 = skip that plot)."""
    prune_curve: list[float] = []
    """Pruning rates for the trade-off curve (measured with TA at lambda 0.8, attacked)."""
    max_length: int = 64
    base_model: Path | None = None
    """A checkpoint folder with a tokenizer; default: the packaged all-MiniLM-L6-v2 (text),
    SmolLM2-135M-Instruct (causal), or the self-pretrained ViT built from `vit` (vision)."""
    train_layers: int = 4
    """Causal suite: fine-tune only the last this many decoder layers (CPU budget)."""
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    """The released checkpoints' dtype: with float16 or bfloat16 the base and every fine-tuned
    model are rounded to it (as such checkpoints are published) before anything is protected,
    attacked or merged; accuracies are computed in float32 from those weights."""
    vit: ViTPretrain = ViTPretrain()
    """Vision suite: shape and schedule of the self-pretrained ViT (ignored with `base_model`)."""


def load_config(path: str | Path) -> EvalConfig:
    """Read and validate an evaluation config.

    Raises:
        MergeShieldError: unreadable file, invalid YAML, or a config that breaks the schema.
    """
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise MergeShieldError(f"{path}: cannot read the eval config ({exc})") from None
    try:
        cfg = EvalConfig.model_validate(data)
    except ValidationError as exc:
        raise MergeShieldError(f"{path}: invalid eval config:\n{exc}") from None
    names = [t.name for t in cfg.tasks]
    if cfg.victim not in names:
        raise MergeShieldError(f"{path}: victim {cfg.victim!r} is not one of the tasks {names}")
    return cfg
