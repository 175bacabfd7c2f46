"""Fuzz targets (hypothesis) for the checkpoint reader and the architecture-data loader.

Contract: on any input, ``Checkpoint(folder)`` and reading every tensor either succeed or raise
`CheckpointError`; ``load_family_file(text)`` returns a `FamilySpec` or raises `SpecError`.
Nothing else may escape and nothing may hang.

Brief run (in the test suite): ``pytest tests/test_reliability.py -k fuzz``.
Long run: ``FUZZ_EXAMPLES=20000 pytest tests/test_reliability.py -k fuzz``.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from mergeshield.errors import CheckpointError, SpecError
from mergeshield.io.checkpoint import Checkpoint
from mergeshield.symmetry.registry import get_family, load_family_file

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "60"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))


def _valid_safetensors() -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        save_file({"a.weight": torch.arange(12, dtype=torch.float32).reshape(3, 4), "b": torch.ones(2, dtype=torch.float16)},
                  f"{tmp}/m.safetensors", metadata={"format": "pt"})
        return Path(f"{tmp}/m.safetensors").read_bytes()


VALID = _valid_safetensors()
CONFIG = json.dumps({"model_type": "llama"})


@st.composite
def mutated(draw: st.DrawFn, data: bytes) -> bytes:
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["flip", "truncate", "insert", "header-int"]))
        if kind == "flip" and out:
            i = draw(st.integers(0, len(out) - 1))
            out[i] = draw(st.integers(0, 255))
        elif kind == "truncate":
            out = out[: draw(st.integers(0, len(out)))]
        elif kind == "insert":
            i = draw(st.integers(0, len(out)))
            out[i:i] = draw(st.binary(max_size=16))
        elif kind == "header-int" and len(out) >= 8:
            out[:8] = draw(st.integers(0, 2**64 - 1)).to_bytes(8, "little")
    return bytes(out)


def check_reader(blob: bytes, index: str | None = None) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "config.json").write_text(CONFIG)
        name = "model-00001-of-00001.safetensors" if index is not None else "model.safetensors"
        (folder / name).write_bytes(blob)
        if index is not None:
            (folder / "model.safetensors.index.json").write_text(index)
        try:
            ckpt = Checkpoint(folder)
            for n in ckpt.names:
                ckpt.get(n)
            ckpt.close()
        except CheckpointError:
            pass


@FUZZ
@given(mutated(VALID))
def fuzz_safetensors(blob: bytes) -> None:
    check_reader(blob)


INDEX = json.dumps({"metadata": {}, "weight_map": {"a.weight": "model-00001-of-00001.safetensors",
                                                   "b": "model-00001-of-00001.safetensors"}})


@FUZZ
@given(mutated(INDEX.encode()))
def fuzz_index(raw: bytes) -> None:
    check_reader(VALID, raw.decode("utf-8", errors="replace"))


FAMILY = get_family("llama").model_dump_json()


@FUZZ
@given(mutated(FAMILY.encode()))
def fuzz_family_file(raw: bytes) -> None:
    try:
        load_family_file(raw.decode("utf-8", errors="replace"), "fuzz.yaml")
    except SpecError:
        pass
