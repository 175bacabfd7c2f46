from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tiny_models import TINY, build, save  # noqa: E402

FAMILIES = sorted(TINY)


@pytest.fixture(scope="session")
def tiny_pair(tmp_path_factory: pytest.TempPathFactory):
    """``tiny_pair(family) -> (base_dir, finetuned_dir, other_finetuned_dir)``, built once."""
    cache: dict[str, tuple[Path, Path, Path]] = {}

    def get(family: str) -> tuple[Path, Path, Path]:
        if family not in cache:
            root = tmp_path_factory.mktemp(family)
            base = build(family, seed=0)
            ft = build(family, seed=1, finetune_of=base)
            ft2 = build(family, seed=2, finetune_of=base)
            cache[family] = (save(base, root / "base"), save(ft, root / "ft"), save(ft2, root / "ft2"))
        return cache[family]

    return get
