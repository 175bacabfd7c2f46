"""Fuzz targets (hypothesis) for the checkpoint reader and the architecture-data loader.

Contracts checked on every generated input:

- ``Checkpoint(folder)`` followed by reading every tensor either succeeds or raises
  `CheckpointError` (never another exception type, never a hang), for mutated safetensors files
  (byte flips, truncations, insertions, forged header lengths, and structured lies inside the
  JSON header: offsets, shapes, dtypes) and mutated ``model.safetensors.index.json`` files;
- ``load_family_file(text)`` returns a `FamilySpec` or raises `SpecError`, for byte- and
  line-level mutations of the real family YAML files.

A brief run is part of the test suite (``tests/test_faults.py``). A long run (see
``fuzz/README.md``)::

    FUZZ_EXAMPLES=20000 python fuzz/fuzz_reader.py          # every target
    FUZZ_EXAMPLES=20000 python fuzz/fuzz_reader.py index    # one target

Each example runs under a time limit (``FUZZ_TIMEOUT`` seconds, default 20): a hang is a failure.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from mergeshield.errors import CheckpointError, SpecError
from mergeshield.io.checkpoint import Checkpoint
from mergeshield.symmetry.registry import load_family_file

__all__ = ["TARGETS", "check_family", "check_index", "check_safetensors", "run"]

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "50"))
TIMEOUT = float(os.environ.get("FUZZ_TIMEOUT", "20"))
SHARD = "model-00001-of-00001.safetensors"
CONFIG = json.dumps({"model_type": "llama"})


class FuzzHang(Exception):
    """One example took longer than ``FUZZ_TIMEOUT`` seconds."""


@contextlib.contextmanager
def _time_limit(seconds: float) -> Iterator[None]:
    """Raise `FuzzHang` if the block runs longer than `seconds` (main thread, POSIX only)."""
    if not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        yield
        return

    def _alarm(signum: int, frame: object) -> None:
        raise FuzzHang(f"example ran longer than {seconds} s")

    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# ---- seeds -----------------------------------------------------------------------------------
def _valid_safetensors() -> bytes:
    tensors = {
        "model.layers.0.mlp.up_proj.weight": torch.arange(12, dtype=torch.float32).reshape(3, 4),
        "model.norm.weight": torch.ones(4, dtype=torch.float16),
        "model.embed_tokens.weight": torch.zeros(2, 4, dtype=torch.bfloat16),
        "position_ids": torch.arange(5, dtype=torch.int64).unsqueeze(0),
        "mask": torch.tensor([True, False, True]),
    }
    with tempfile.TemporaryDirectory() as tmp:
        save_file(tensors, f"{tmp}/m.safetensors", metadata={"format": "pt"})
        return Path(f"{tmp}/m.safetensors").read_bytes()


VALID = _valid_safetensors()
_HEADER_LEN = int.from_bytes(VALID[:8], "little")
HEADER: dict[str, Any] = json.loads(VALID[8 : 8 + _HEADER_LEN])
NAMES = sorted(k for k in HEADER if k != "__metadata__")
INDEX = json.dumps({"metadata": {"total_size": len(VALID) - 8 - _HEADER_LEN},
                    "weight_map": {n: SHARD for n in NAMES}}, indent=2)
FAMILIES = {
    e.name: e.read_text(encoding="utf-8")
    for e in sorted((resources.files("mergeshield.symmetry") / "families").iterdir(), key=lambda e: e.name)
    if e.name.endswith(".yaml")
}


# ---- strategies ------------------------------------------------------------------------------
@st.composite
def byte_mutations(draw: st.DrawFn, data: bytes) -> bytes:
    """Flip, truncate, insert, duplicate, or forge the 8-byte header length."""
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["flip", "truncate", "insert", "duplicate", "header-len"]))
        if kind == "flip" and out:
            i = draw(st.integers(0, len(out) - 1))
            out[i] = draw(st.integers(0, 255))
        elif kind == "truncate":
            out = out[: draw(st.integers(0, len(out)))]
        elif kind == "insert":
            i = draw(st.integers(0, len(out)))
            out[i:i] = draw(st.binary(max_size=32))
        elif kind == "duplicate" and out:
            i = draw(st.integers(0, len(out) - 1))
            j = draw(st.integers(i, min(len(out), i + 64)))
            out[j:j] = out[i:j]
        elif kind == "header-len" and len(out) >= 8:
            n = draw(st.one_of(st.integers(0, 2 * len(out)), st.integers(0, 2**64 - 1)))
            out[:8] = n.to_bytes(8, "little")
    return bytes(out)


_JSON_LEAF = st.one_of(
    st.integers(-(2**64), 2**64), st.floats(allow_nan=True), st.text(max_size=12), st.none(), st.booleans(),
    st.sampled_from(["F32", "F16", "BF16", "F64", "I64", "I32", "I8", "U8", "BOOL", "F8_E4M3", "F8_E5M2",
                     "U16", "U32", "U64", "C64", "F4", "F8_E8M0", "f32", ""]),
)
_JSON = st.recursive(_JSON_LEAF, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
                     max_leaves=8)


@st.composite
def header_lies(draw: st.DrawFn) -> bytes:
    """A well-formed container whose JSON header lies: offsets, shapes, dtypes, names, metadata."""
    header = json.loads(json.dumps(HEADER))
    for _ in range(draw(st.integers(1, 4))):
        name = draw(st.sampled_from([*NAMES, "__metadata__"]))
        entry = header.get(name)
        kind = draw(st.sampled_from(["offsets", "shape", "dtype", "replace", "drop", "rename", "extra-field"]))
        if kind == "drop":
            header.pop(name, None)
        elif kind == "rename" and name in header:
            header[draw(st.text(max_size=20))] = header.pop(name)
        elif kind == "replace" or not isinstance(entry, dict):
            header[name] = draw(_JSON)
        elif kind == "offsets":
            entry["data_offsets"] = draw(st.one_of(
                st.lists(st.integers(-10, 2 * len(VALID)), min_size=0, max_size=3), _JSON))
        elif kind == "shape":
            entry["shape"] = draw(st.one_of(st.lists(st.integers(-3, 2**40), max_size=4), _JSON))
        elif kind == "dtype":
            entry["dtype"] = draw(_JSON_LEAF)
        else:
            entry[draw(st.text(max_size=8))] = draw(_JSON)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    body = VALID[8 + _HEADER_LEN :]
    if draw(st.booleans()):
        body = body[: draw(st.integers(0, len(body)))]
    return len(raw).to_bytes(8, "little") + raw + body


@st.composite
def index_mutations(draw: st.DrawFn) -> bytes:
    """Mutated shard indexes: structured (paths, types, names) or raw bytes."""
    if draw(st.booleans()):
        return draw(byte_mutations(INDEX.encode()))
    data: Any = json.loads(INDEX)
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["file", "drop-name", "add-name", "replace-map", "replace-top"]))
        if kind == "file":
            name = draw(st.sampled_from(NAMES))
            data["weight_map"][name] = draw(st.one_of(
                st.sampled_from(["../x.safetensors", "/etc/passwd", "", ".", "..", "sub/m.safetensors",
                                 "model.safetensors", "config.json", "a\x00b.safetensors", "m.bin",
                                 "model-00002-of-00002.safetensors", SHARD]),
                st.text(max_size=24), _JSON))
        elif kind == "drop-name" and data["weight_map"]:
            data["weight_map"].pop(draw(st.sampled_from(sorted(data["weight_map"]))), None)
        elif kind == "add-name":
            data["weight_map"][draw(st.text(max_size=16))] = SHARD
        elif kind == "replace-map":
            data["weight_map"] = draw(_JSON)
        else:
            data = draw(_JSON)
        if not isinstance(data, dict) or not isinstance(data.get("weight_map"), dict):
            break
    return json.dumps(data).encode()


@st.composite
def yaml_mutations(draw: st.DrawFn) -> str:
    """Byte-level or line-level mutations of a real family file."""
    text = FAMILIES[draw(st.sampled_from(sorted(FAMILIES)))]
    if draw(st.booleans()):
        return draw(byte_mutations(text.encode())).decode("utf-8", errors="replace")
    lines = text.splitlines()
    for _ in range(draw(st.integers(1, 5))):
        if not lines:
            break
        i = draw(st.integers(0, len(lines) - 1))
        kind = draw(st.sampled_from(["delete", "duplicate", "swap", "indent", "dedent", "value", "insert"]))
        if kind == "delete":
            del lines[i]
        elif kind == "duplicate":
            lines.insert(i, lines[i])
        elif kind == "swap":
            j = draw(st.integers(0, len(lines) - 1))
            lines[i], lines[j] = lines[j], lines[i]
        elif kind == "indent":
            lines[i] = "  " + lines[i]
        elif kind == "dedent":
            lines[i] = lines[i].lstrip()
        elif kind == "value" and ":" in lines[i]:
            key = lines[i].split(":", 1)[0]
            value = draw(st.one_of(
                st.sampled_from(["-1", "0", "[]", "{}", "null", "~", "yes", "1e999", "[a, b]", "{axis: -3}",
                                 "hidden_size/0", "n_embd/n_head/", "'{layer}{layer}'", "&a [*a]", "!!binary zz"]),
                st.text(max_size=16)))
            lines[i] = f"{key}: {value}"
        else:
            lines.insert(i, draw(st.text(max_size=30)))
    return "\n".join(lines) + "\n"


# ---- checks ----------------------------------------------------------------------------------
def _read_all(folder: Path) -> None:
    try:
        with _time_limit(TIMEOUT), Checkpoint(folder) as ckpt:
            for name in ckpt.names:
                ckpt.get(name)
                ckpt.shape(name), ckpt.dtype(name)
            for shard in ckpt.shards:
                ckpt.shard_metadata(shard)
    except CheckpointError:
        pass


def check_safetensors(blob: bytes) -> None:
    """`blob` as ``model.safetensors``: a clean read or a `CheckpointError`, nothing else."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "config.json").write_text(CONFIG)
        (folder / "model.safetensors").write_bytes(blob)
        _read_all(folder)


def check_index(raw: bytes, shard: bytes = VALID) -> None:
    """`raw` as ``model.safetensors.index.json`` next to one shard: read or `CheckpointError`."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        folder.mkdir()
        (folder / "config.json").write_text(CONFIG)
        (folder / SHARD).write_bytes(shard)
        (folder / "model.safetensors.index.json").write_bytes(raw)
        (Path(tmp) / "x.safetensors").write_bytes(shard)  # a real file outside the folder
        _read_all(folder)


def check_family(text: str) -> None:
    """`text` as a family file: a `FamilySpec` or a `SpecError`, nothing else."""
    try:
        with _time_limit(TIMEOUT):
            load_family_file(text, "fuzz.yaml")
    except SpecError:
        pass


# ---- runners ---------------------------------------------------------------------------------
def _runner(check: Callable[[Any], None], strategy: st.SearchStrategy[Any]) -> Callable[[int], None]:
    def run_target(examples: int = EXAMPLES) -> None:
        def one(value: Any) -> None:
            check(value)

        fuzz = settings(max_examples=examples, deadline=None, database=None, print_blob=True,
                        suppress_health_check=list(HealthCheck))(given(strategy)(one))
        fuzz()

    return run_target


TARGETS: dict[str, Callable[[int], None]] = {
    "safetensors": _runner(check_safetensors, byte_mutations(VALID)),
    "header": _runner(check_safetensors, header_lies()),
    "index": _runner(check_index, index_mutations()),
    "family": _runner(check_family, yaml_mutations()),
}


def run(names: list[str] | None = None, examples: int = EXAMPLES) -> None:
    """Run the named targets (all by default) with `examples` examples each."""
    for name in names or list(TARGETS):
        print(f"fuzzing {name}: {examples} examples", flush=True)
        TARGETS[name](examples)


if __name__ == "__main__":
    unknown = [a for a in sys.argv[1:] if a not in TARGETS]
    if unknown:
        sys.exit(f"unknown target(s) {unknown}; choose from {list(TARGETS)}")
    run(sys.argv[1:] or None)
    print("no contract violations found")
