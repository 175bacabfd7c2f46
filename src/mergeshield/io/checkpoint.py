"""Lazy, validated reading of Hugging Face checkpoint folders and atomic writing of new ones.

A checkpoint is a folder with ``config.json`` and weights in one of these layouts:
``model.safetensors``; sharded safetensors with ``model.safetensors.index.json``;
``pytorch_model.bin`` (or sharded with ``pytorch_model.bin.index.json``), loaded with
``torch.load(weights_only=True)`` so that no pickled code can run. Tensors are read one at a time.
Output is always safetensors, in the same shard split as the input.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import pickle
import re
import shutil
import stat
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from mergeshield.errors import CheckpointError, OutputPathError

__all__ = [
    "Checkpoint",
    "Shard",
    "atomic_output_dir",
    "check_output_path",
    "tensor_digest",
    "structural_differences",
]

SAFE_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")


@dataclass(frozen=True)
class Shard:
    """One weights file and the tensor names it holds, in file order."""

    path: Path
    names: tuple[str, ...]
    fmt: str  # "safetensors" | "bin"

    @property
    def output_name(self) -> str:
        """The safetensors file name this shard is written to."""
        if self.fmt == "safetensors":
            return self.path.name
        stem = self.path.name.removesuffix(".bin")
        return stem.replace("pytorch_model", "model", 1) + ".safetensors"


class Checkpoint:
    """A Hugging Face checkpoint folder, read lazily one tensor at a time.

    Args:
        folder: the folder with ``config.json`` and the weights.

    Raises:
        CheckpointError: the folder, its config or its weights are missing, corrupt or unsafe.

    Example:
        >>> ckpt = Checkpoint("path/to/model")          # doctest: +SKIP
        >>> ckpt.model_type, len(ckpt.names)            # doctest: +SKIP
    """

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)
        if not self.folder.exists():
            raise CheckpointError(f"{self.folder}: no such folder. Pass a Hugging Face model folder.")
        if not self.folder.is_dir():
            raise CheckpointError(
                f"{self.folder} is a file, not a folder. Pass the folder that holds config.json and "
                "the weights (a Hugging Face model folder)."
            )
        self._handles: dict[Path, Any] = {}
        self._bin_cache: tuple[Path, dict[str, torch.Tensor]] | None = None
        self.config = self._read_config()
        self.shards = self._find_shards()
        self._where: dict[str, Shard] = {}
        for shard in self.shards:
            for name in shard.names:
                if name in self._where:
                    raise CheckpointError(
                        f"{self.folder}: tensor {name!r} is stored in two shards, "
                        f"{self._where[name].path.name} and {shard.path.name}. The checkpoint is "
                        "inconsistent; re-save it with save_pretrained."
                    )
                self._where[name] = shard
        self._meta: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        self._load_meta()

    # ---- config ---------------------------------------------------------------------------
    def _read_config(self) -> dict[str, Any]:
        path = self.folder / "config.json"
        if not path.is_file():
            raise CheckpointError(
                f"{self.folder}: no config.json. mergeshield needs the model's config to know its "
                "architecture; copy config.json from where the model came from."
            )
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError, OSError) as exc:
            raise CheckpointError(f"{path}: cannot be read as JSON ({exc}).") from None
        if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
            raise CheckpointError(
                f"{path}: has no 'model_type' string. It is not a transformers config.json."
            )
        return config

    @property
    def model_type(self) -> str:
        return str(self.config["model_type"])

    def full_config(self) -> dict[str, Any]:
        """The config with transformers' defaults filled in (``AutoConfig(...).to_dict()``)."""
        from transformers import AutoConfig

        try:
            cfg = AutoConfig.from_pretrained(self.folder, local_files_only=True)
        except Exception as exc:  # transformers raises many types for a bad config
            raise CheckpointError(f"{self.folder}/config.json: transformers cannot read it: {exc}") from None
        return cfg.to_dict()

    # ---- shards ---------------------------------------------------------------------------
    def _find_shards(self) -> list[Shard]:
        for index_name, fmt in ((SAFE_INDEX, "safetensors"), (BIN_INDEX, "bin")):
            index = self.folder / index_name
            if index.is_file():
                return self._shards_from_index(index, fmt)
        single = self.folder / "model.safetensors"
        if single.is_file():
            return [Shard(single, self._safetensors_names(single), "safetensors")]
        single_bin = self.folder / "pytorch_model.bin"
        if single_bin.is_file():
            return [Shard(single_bin, tuple(self._load_bin(single_bin)), "bin")]
        found = sorted(p.name for p in self.folder.iterdir() if p.name.endswith(WEIGHT_SUFFIXES))
        raise CheckpointError(
            f"{self.folder}: no weights found (looked for model.safetensors, {SAFE_INDEX}, "
            f"pytorch_model.bin, {BIN_INDEX}); weight-like files present: {found or 'none'}. "
            "Save the model with save_pretrained() into this folder."
        )

    def _shards_from_index(self, index: Path, fmt: str) -> list[Shard]:
        try:
            data = json.loads(index.read_text(encoding="utf-8"))
            weight_map = data["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError("weight_map is not a mapping")
        except (json.JSONDecodeError, KeyError, TypeError, OSError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{index}: not a valid shard index ({exc!r}).") from None
        files = sorted(set(weight_map.values()))
        shards = []
        for fname in files:
            path = self.folder / fname
            if Path(fname).name != fname or not path.is_file():
                raise CheckpointError(
                    f"{index.name} lists shard {fname!r}, but {path} does not exist. The download "
                    "is incomplete: fetch the missing shard again."
                )
            names = self._safetensors_names(path) if fmt == "safetensors" else tuple(self._load_bin(path))
            listed = {n for n, f in weight_map.items() if f == fname}
            missing = sorted(listed - set(names))
            if missing:
                raise CheckpointError(
                    f"{index.name} says {path.name} holds {missing[:5]}{' ...' if len(missing) > 5 else ''}"
                    f" but that shard has no such tensor(s). The index and the shards disagree: "
                    "re-download the checkpoint or re-save it with save_pretrained."
                )
            extra = sorted(set(names) - listed)
            if extra:
                raise CheckpointError(
                    f"{path.name} holds {extra[:5]} which {index.name} does not list. The index and "
                    "the shards disagree: re-save the checkpoint with save_pretrained."
                )
            shards.append(Shard(path, names, fmt))
        return shards

    def _safetensors_names(self, path: Path) -> tuple[str, ...]:
        try:
            with safe_open(path, framework="pt") as f:
                return tuple(f.keys())
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(
                f"{path}: not a readable safetensors file ({exc}). It is truncated or corrupt: "
                "download or save it again."
            ) from None

    def _load_bin(self, path: Path) -> dict[str, torch.Tensor]:
        if self._bin_cache is not None and self._bin_cache[0] == path:
            return self._bin_cache[1]
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except pickle.UnpicklingError as exc:
            raise CheckpointError(
                f"{path}: refused. This pickle file contains objects other than tensors (it would run "
                f"code when loaded; torch said: {str(exc).splitlines()[0]}). mergeshield loads pickle "
                "checkpoints only with weights_only=True. If you trust its source, convert it to "
                "safetensors yourself; otherwise do not use it."
            ) from None
        except (RuntimeError, OSError, EOFError, ValueError) as exc:
            raise CheckpointError(f"{path}: cannot be loaded as a PyTorch checkpoint ({exc}).") from None
        if not isinstance(state, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
        ):
            raise CheckpointError(f"{path}: is not a flat state dict of tensors.")
        self._bin_cache = (path, state)
        return state

    def _load_meta(self) -> None:
        for shard in self.shards:
            if shard.fmt == "safetensors":
                handle = self._handle(shard.path)
                for name in shard.names:
                    sl = handle.get_slice(name)
                    self._meta[name] = (tuple(sl.get_shape()), _dtype_of(sl.get_dtype(), shard.path, name))
            else:
                for name, t in self._load_bin(shard.path).items():
                    self._meta[name] = (tuple(t.shape), t.dtype)

    def _handle(self, path: Path) -> Any:
        if path not in self._handles:
            try:
                self._handles[path] = safe_open(path, framework="pt")
            except (SafetensorError, OSError) as exc:
                raise CheckpointError(f"{path}: cannot be opened ({exc}).") from None
        return self._handles[path]

    # ---- tensors --------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: object) -> bool:
        return name in self._where

    def shape(self, name: str) -> tuple[int, ...]:
        return self._meta[name][0]

    def dtype(self, name: str) -> torch.dtype:
        return self._meta[name][1]

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {n: m[0] for n, m in self._meta.items()}

    def get(self, name: str) -> torch.Tensor:
        """Read one tensor (a fresh CPU tensor, in its stored dtype)."""
        shard = self._where.get(name)
        if shard is None:
            raise CheckpointError(f"{self.folder}: no tensor {name!r}")
        if shard.fmt == "bin":
            return self._load_bin(shard.path)[name].clone()
        try:
            return self._handle(shard.path).get_tensor(name)
        except (SafetensorError, OSError, RuntimeError) as exc:
            raise CheckpointError(
                f"{shard.path}: tensor {name!r} cannot be read ({exc}); the file is corrupt."
            ) from None

    def shard_metadata(self, shard: Shard) -> dict[str, str] | None:
        if shard.fmt != "safetensors":
            return {"format": "pt"}
        return self._handle(shard.path).metadata()

    def non_weight_files(self) -> list[Path]:
        """Files to copy unchanged to an output folder (config, tokenizer, README, ...)."""
        weights = {s.path.name for s in self.shards} | {SAFE_INDEX, BIN_INDEX}
        return sorted(
            p for p in self.folder.iterdir()
            if p.is_file() and p.name not in weights and not p.name.endswith(WEIGHT_SUFFIXES)
        )

    def close(self) -> None:
        self._handles.clear()
        self._bin_cache = None

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _dtype_of(name: str, path: Path, tensor: str) -> torch.dtype:
    table = {
        "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
        "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
        "U8": torch.uint8, "BOOL": torch.bool,
        "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    }
    if name not in table:
        raise CheckpointError(f"{path}: tensor {tensor!r} has dtype {name}, which mergeshield cannot handle.")
    return table[name]


def tensor_digest(name: str, tensor: torch.Tensor) -> bytes:
    """sha256 over a tensor's name, dtype, shape and bytes (for fingerprints)."""
    h = hashlib.sha256()
    h.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
    h.update(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.digest()


# ---- output -------------------------------------------------------------------------------
def check_output_path(out: Path, inputs: list[Path], overwrite: bool) -> None:
    """Refuse an output folder that equals, contains or lies inside an input, or exists.

    Raises:
        OutputPathError: with the conflicting path and the fix.
    """
    out_r = out.resolve()
    for inp in inputs:
        inp_r = inp.resolve()
        if out_r == inp_r or inp_r in out_r.parents or out_r in inp_r.parents:
            raise OutputPathError(
                f"output {out} {'is' if out_r == inp_r else 'overlaps'} input {inp}. "
                "mergeshield never writes into or over its inputs: choose another --out."
            )
    if out.exists() and not overwrite:
        raise OutputPathError(
            f"output {out} already exists. Choose another --out, or pass --overwrite to replace it "
            "(it is replaced only once the new output is complete)."
        )
    if out.exists() and not out.is_dir():
        raise OutputPathError(f"output {out} exists and is a file, not a folder.")


@contextlib.contextmanager
def atomic_output_dir(out: str | os.PathLike[str], overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `out`; move it to `out` only if the block succeeds.

    On any exception (including KeyboardInterrupt) the temporary folder is removed and `out`
    is left as it was.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.mergeshield-tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        if out.exists():
            if not overwrite:
                raise OutputPathError(f"output {out} appeared while writing; pass --overwrite.")
            trash = out.parent / f".{out.name}.mergeshield-old-{uuid.uuid4().hex[:8]}"
            out.rename(trash)
            tmp.rename(out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def copy_non_weight_files(src: Checkpoint, dest: Path) -> None:
    """Copy config, tokenizer, generation config, README... unchanged."""
    for p in src.non_weight_files():
        shutil.copy2(p, dest / p.name)


def write_shard(
    dest: Path,
    shard: Shard,
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None,
) -> None:
    """Write one output shard as safetensors (tensors made contiguous and unshared)."""
    clean = {n: t.detach().contiguous() for n, t in tensors.items()}
    save_file(clean, str(dest / shard.output_name), metadata=dict(metadata or {"format": "pt"}))


def write_index(dest: Path, ckpt: Checkpoint, total_size: int) -> None:
    """Write ``model.safetensors.index.json`` when the input was sharded."""
    if len(ckpt.shards) == 1 and not (ckpt.folder / SAFE_INDEX).exists() and not (ckpt.folder / BIN_INDEX).exists():
        return
    weight_map = {name: shard.output_name for shard in ckpt.shards for name in shard.names}
    index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    (dest / SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
