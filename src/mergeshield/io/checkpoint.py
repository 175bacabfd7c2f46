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
import math
import os
import pickle
import re
import shutil
import stat
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent import futures
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import xxhash
from safetensors import safe_open
from tqdm.auto import tqdm

from mergeshield.errors import CheckpointError, OutputPathError

__all__ = [
    "Checkpoint",
    "Shard",
    "ShardWriter",
    "atomic_output_dir",
    "check_output_path",
    "output_bytes",
    "require_free_space",
    "rewrite_checkpoint",
    "tensor_bytes",
    "save_as_dtype",
    "structural_differences",
    "tensor_digest",
    "fingerprint_of",
    "FINGERPRINT_HASH",
    "FINGERPRINT_HASHES",
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


def _link_problem(path: Path, kind: str = "file") -> str | None:
    """Why the symbolic link `path` cannot be followed (a loop, or a missing target), else None.

    `kind` is what the link should lead to ("file" or "folder"), for the message.
    """
    if not path.is_symlink():
        return None
    target = os.readlink(path)
    try:
        path.stat()
    except FileNotFoundError:
        return (
            f"{path}: is a symbolic link to {target!r}, which does not exist (a dangling link). If the "
            f"folder is a Hugging Face cache snapshot, the {kind} it links to was deleted: download "
            f"the model again. Otherwise point the link at the real {kind}, or put the real {kind} here."
        )
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return (
                f"{path}: is a symbolic link that never reaches a {kind} (a link loop: it points to "
                f"{target!r}, which leads back to itself). Replace the link with the real {kind}."
            )
        return f"{path}: is a symbolic link to {target!r} that cannot be followed ({exc.strerror})."
    return None


def _require_file(path: Path, what: str, *, missing: str, allow_empty: bool = True) -> os.stat_result:
    """Check that `path` is a regular file this process can read, else raise a `CheckpointError`.

    Args:
        path: the file.
        what: what the file is for, e.g. ``"the weights"`` (used in the messages).
        missing: the whole message when nothing at all exists at `path`.
        allow_empty: whether a 0-byte file is acceptable.

    Returns:
        The file's ``stat`` (symlinks followed).
    """
    link = _link_problem(path)
    if link is not None:
        raise CheckpointError(link)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise CheckpointError(missing) from None
    except (OSError, ValueError) as exc:  # ValueError: a NUL byte in the name
        reason = exc.strerror if isinstance(exc, OSError) else str(exc)
        raise CheckpointError(f"{path}: cannot be accessed ({reason}); it should be {what}.") from None
    if stat.S_ISDIR(st.st_mode):
        raise CheckpointError(
            f"{path}: is a folder, but it should be a file ({what}). Move the folder away and put the "
            "real file there (save the model again with save_pretrained)."
        )
    if not stat.S_ISREG(st.st_mode):
        raise CheckpointError(
            f"{path}: is not a regular file (it is a FIFO, socket or device), but it should be {what}. "
            "Replace it with the real file."
        )
    try:
        with open(path, "rb"):
            pass
    except PermissionError:
        raise CheckpointError(
            f"{path}: permission denied: this user (uid {os.geteuid()}) cannot read it (mode "
            f"{stat.filemode(st.st_mode)}, owner uid {st.st_uid}). mergeshield only reads its inputs; "
            f"make the file readable (e.g. chmod a+r '{path}') or run as its owner."
        ) from None
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot be opened ({exc.strerror}); it should be {what}.") from None
    if not allow_empty and st.st_size == 0:
        raise CheckpointError(
            f"{path}: is empty (0 bytes), but it should be {what}. The download or save was "
            "interrupted: download or save the model again."
        )
    return st


def _plain_file_name(name: str) -> bool:
    """True when `name` names a file directly inside a folder (no path parts, no '..')."""
    return (
        bool(name)
        and name not in (".", "..")
        and "/" not in name
        and "\\" not in name
        and "\x00" not in name
        and Path(name).name == name
    )


class Checkpoint:
    """A Hugging Face checkpoint folder, read lazily one tensor at a time.

    The weights are found the way transformers finds them: ``model.safetensors``, else
    ``model.safetensors.index.json`` and its shards, else ``pytorch_model.bin``, else
    ``pytorch_model.bin.index.json``. A tensor name held by two safetensors files of the folder
    (two shards, or a single file and a shard) is refused as ambiguous.

    Args:
        folder: the folder with ``config.json`` and the weights.

    Raises:
        CheckpointError: the folder, its config or its weights are missing, unreadable, corrupt,
            ambiguous or unsafe.

    Example:
        >>> ckpt = Checkpoint("path/to/model")          # doctest: +SKIP
        >>> ckpt.model_type, len(ckpt.names)            # doctest: +SKIP
    """

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)
        self._handles: dict[Path, Any] = {}
        self._bin_cache: tuple[Path, dict[str, torch.Tensor]] | None = None
        self._check_folder()
        self.config = self._read_config()
        self.sharded = False  # True when the weights come with an index (kept in the output)
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
        self._check_stray_safetensors()
        self._meta: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        self._spans: dict[Path, dict[str, tuple[int, int]]] = {}
        self._load_meta()

    def _check_folder(self) -> None:
        link = _link_problem(self.folder, "folder")
        if link is not None:
            raise CheckpointError(link)
        try:
            st = self.folder.stat()
        except FileNotFoundError:
            raise CheckpointError(
                f"{self.folder}: no such folder. Pass a Hugging Face model folder (the one holding "
                "config.json and the weights)."
            ) from None
        except (OSError, ValueError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else str(exc)
            raise CheckpointError(f"{self.folder}: cannot be accessed ({reason}).") from None
        if not stat.S_ISDIR(st.st_mode):
            raise CheckpointError(
                f"{self.folder} is a file, not a folder. Pass the folder that holds config.json and "
                "the weights (a Hugging Face model folder)"
                + (f", probably {self.folder.parent}." if self.folder.name in (
                    "config.json", "model.safetensors", "pytorch_model.bin", SAFE_INDEX, BIN_INDEX) else ".")
            )
        try:
            with os.scandir(self.folder) as entries:
                next(entries, None)
        except PermissionError:
            raise CheckpointError(
                f"{self.folder}: permission denied: this user (uid {os.geteuid()}) cannot list the folder "
                f"(mode {stat.filemode(st.st_mode)}, owner uid {st.st_uid}). Make it readable (chmod a+rx)."
            ) from None

    # ---- config ---------------------------------------------------------------------------
    def _read_config(self) -> dict[str, Any]:
        path = self.folder / "config.json"
        _require_file(
            path,
            "the model's JSON config",
            missing=(
                f"{self.folder}: no config.json. mergeshield needs the model's config to know its "
                "architecture; copy config.json from where the model came from."
            ),
        )
        try:
            config = json.loads(path.read_bytes().decode("utf-8"))
        except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise CheckpointError(
                f"{path}: cannot be read as JSON ({exc}). It is truncated or edited by hand: copy "
                "config.json again from where the model came from."
            ) from None
        except OSError as exc:
            raise CheckpointError(f"{path}: cannot be read ({exc.strerror}).") from None
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
        # transformers' order (modeling_utils): single safetensors, safetensors index, bin, bin index.
        # A layout whose file is present but broken (dangling link, loop, folder, unreadable,
        # empty) is refused, not skipped: skipping would silently read another copy.
        single = self.folder / "model.safetensors"
        if os.path.lexists(single):
            self._require_weights(single)
            return [Shard(single, self._safetensors_names(single), "safetensors")]
        index = self.folder / SAFE_INDEX
        if os.path.lexists(index):
            self.sharded = True
            return self._shards_from_index(index, "safetensors")
        single_bin = self.folder / "pytorch_model.bin"
        if os.path.lexists(single_bin):
            self._require_weights(single_bin)
            return [Shard(single_bin, tuple(self._load_bin(single_bin)), "bin")]
        index = self.folder / BIN_INDEX
        if os.path.lexists(index):
            self.sharded = True
            return self._shards_from_index(index, "bin")
        found = sorted(p.name for p in self.folder.iterdir() if p.name.endswith(WEIGHT_SUFFIXES))
        raise CheckpointError(
            f"{self.folder}: no weights found (looked for model.safetensors, {SAFE_INDEX}, "
            f"pytorch_model.bin, {BIN_INDEX}); weight-like files present: {found or 'none'}. "
            "Save the model with save_pretrained() into this folder."
        )

    def _require_weights(self, path: Path) -> None:
        _require_file(
            path,
            "a weights file",
            missing=f"{path}: does not exist. Download or save the model again.",
            allow_empty=False,
        )

    def _read_index(self, index: Path, fmt: str) -> dict[str, str]:
        """The index's ``weight_map`` (tensor name -> shard file name), validated."""
        _require_file(
            index,
            "a JSON shard index",
            missing=f"{index}: does not exist.",
        )
        expected = (
            'A shard index is the JSON file save_pretrained writes next to the shards: '
            '{"metadata": {...}, "weight_map": {"<tensor name>": "<shard file name>", ...}}. '
            "Download it again, or re-save the model with save_pretrained."
        )
        try:
            data = json.loads(index.read_bytes().decode("utf-8"))
        except (ValueError, RecursionError) as exc:
            raise CheckpointError(f"{index}: not a valid shard index: not JSON ({exc}). {expected}") from None
        except OSError as exc:
            raise CheckpointError(f"{index}: cannot be read ({exc.strerror}).") from None
        if not isinstance(data, dict) or "weight_map" not in data:
            found = sorted(map(str, data))[:6] if isinstance(data, dict) else type(data).__name__
            raise CheckpointError(
                f"{index}: not a valid shard index: it has no 'weight_map' (found {found}). {expected}"
            )
        weight_map = data["weight_map"]
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(
                f"{index}: not a valid shard index: 'weight_map' should be a non-empty mapping of "
                f"tensor names to shard files, found {weight_map!r:.80}. {expected}"
            )
        bad = [(k, v) for k, v in weight_map.items() if not isinstance(v, str)]
        if bad:
            raise CheckpointError(
                f"{index}: not a valid shard index: 'weight_map' maps {bad[0][0]!r} to {bad[0][1]!r:.60}, "
                f"not a shard file name. {expected}"
            )
        suffix = ".safetensors" if fmt == "safetensors" else ".bin"
        for fname in sorted(set(weight_map.values())):
            if not _plain_file_name(fname):
                raise CheckpointError(
                    f"{index}: names shard {fname!r}, which is not a file inside the model folder. Shard "
                    "names must be plain file names next to the index (like "
                    f"model-00001-of-00002{suffix}); mergeshield never reads files outside the model "
                    "folder. Fix the index, or re-download the checkpoint."
                )
            if not fname.endswith(suffix):
                raise CheckpointError(
                    f"{index}: names shard {fname!r}, but a {index.name} lists {suffix} files only. "
                    "Re-download the checkpoint or re-save it with save_pretrained."
                )
        return weight_map

    def _shards_from_index(self, index: Path, fmt: str) -> list[Shard]:
        weight_map = self._read_index(index, fmt)
        shards = []
        for fname in sorted(set(weight_map.values())):
            path = self.folder / fname
            if not os.path.lexists(path):
                raise CheckpointError(
                    f"{index.name} lists shard {fname!r}, but {path} does not exist. The download is "
                    "incomplete: fetch the missing shard again."
                )
            self._require_weights(path)
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
            twice = [n for n in extra if n in weight_map]
            if twice:
                n = twice[0]
                raise CheckpointError(
                    f"{self.folder}: tensor {n!r} is stored in two shards: {weight_map[n]} (where "
                    f"{index.name} says it is) and {path.name}"
                    f"{f' (and {len(twice) - 1} more such tensor(s))' if len(twice) > 1 else ''}. "
                    "Which copy is meant is ambiguous, so mergeshield refuses the checkpoint. Re-save "
                    "it with save_pretrained (or re-download it)."
                )
            if extra:
                raise CheckpointError(
                    f"{path.name} holds {extra[:5]} which {index.name} does not list. The index and "
                    "the shards disagree: re-save the checkpoint with save_pretrained."
                )
            shards.append(Shard(path, names, fmt))
        return shards

    def _check_stray_safetensors(self) -> None:
        """Refuse a tensor that another, unused safetensors file of the folder also holds.

        Such a folder mixes two saves (e.g. ``model.safetensors`` next to shards and their index,
        or a stale shard the index no longer lists); which copy is meant is a guess.
        """
        if not self.shards or self.shards[0].fmt != "safetensors":
            return
        used = {s.path.name for s in self.shards}
        for entry in sorted(self.folder.iterdir()):
            if entry.name in used or not entry.name.endswith(".safetensors"):
                continue
            try:
                if not entry.is_file() or entry.stat().st_size == 0:
                    continue
                with safe_open(entry, framework="pt") as f:
                    names = set(f.keys())
            except Exception:  # noqa: BLE001, S112 - an unused file we cannot read is not our concern
                continue
            both = sorted(names & self._where.keys())
            if both:
                using = "the single-file checkpoint" if len(self.shards) == 1 and self.shards[0].path.name == \
                    "model.safetensors" else f"a shard listed in {SAFE_INDEX}"
                raise CheckpointError(
                    f"{self.folder}: tensor {both[0]!r} is stored in two files: "
                    f"{self._where[both[0]].path.name} ({using}, the copy transformers reads) and "
                    f"{entry.name}, which is not read"
                    f"{f'; {len(both) - 1} more tensor(s) likewise' if len(both) > 1 else ''}. The "
                    "folder mixes two saves, and which copy is meant is ambiguous. Move the file you "
                    "do not want out of the folder (transformers would load model.safetensors first, "
                    f"then {SAFE_INDEX})."
                )

    def _safetensors_names(self, path: Path) -> tuple[str, ...]:
        try:
            with safe_open(path, framework="pt") as f:
                return tuple(f.keys())
        except Exception as exc:  # noqa: BLE001 - any failure to parse untrusted bytes is corruption
            raise CheckpointError(
                f"{path}: not a readable safetensors file ({exc}). It is truncated or corrupt: "
                "download or save it again."
            ) from None

    def _load_bin(self, path: Path) -> dict[str, torch.Tensor]:
        cache = self._bin_cache  # once, into a local: another thread may replace it (see `_handle`)
        if cache is not None and cache[0] == path:
            return cache[1]
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except pickle.UnpicklingError as exc:
            raise CheckpointError(
                f"{path}: refused. This pickle file contains objects other than tensors (it would run "
                f"code when loaded; torch said: {str(exc).splitlines()[0] if str(exc) else exc!r}). "
                "mergeshield loads pickle checkpoints only with weights_only=True. If you trust its "
                "source, convert it to safetensors yourself; otherwise do not use it."
            ) from None
        except Exception as exc:  # noqa: BLE001 - torch.load raises many types on corrupt bytes
            raise CheckpointError(
                f"{path}: cannot be loaded as a PyTorch checkpoint ({type(exc).__name__}: {exc}). It is "
                "truncated or corrupt: download or save it again."
            ) from None
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
                    try:
                        sl = handle.get_slice(name)
                        shape, dtype = tuple(sl.get_shape()), sl.get_dtype()
                    except Exception as exc:  # noqa: BLE001 - corrupt header entries
                        raise CheckpointError(
                            f"{shard.path}: tensor {name!r} has an unreadable header entry ({exc}); the "
                            "file is corrupt: download or save it again."
                        ) from None
                    self._meta[name] = (shape, _dtype_of(dtype, shard.path, name))
            else:
                for name, t in self._load_bin(shard.path).items():
                    self._meta[name] = (tuple(t.shape), t.dtype)

    def _handle(self, path: Path) -> Any:
        # one lookup, into a local: protect's planner thread reads while the main thread may
        # `release` (clear) the handles; a handle stays open while it is referenced
        handle = self._handles.get(path)
        if handle is None:
            handle = self._handles[path] = _open_safetensors(path)
        return handle

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

    def get(self, name: str, *, own_map: bool = False) -> torch.Tensor:
        """Read one tensor (a CPU tensor in its stored dtype; from safetensors a view of the
        file's mapping, which it keeps alive: do not modify it).

        The mapping is shared by every tensor read from the shard until `release`; with
        `own_map` the tensor gets a mapping of its own (opening one took 0.1 ms here, an ad-hoc
        timing), unmapped as soon as the tensor is freed. For a reader that holds a few large
        tensors for a while (protect's planner): their pages then leave resident memory with
        them, not at the next `release`. (A ``.bin`` shard gives a fresh copy either way.)"""
        shard = self._where.get(name)
        if shard is None:
            raise CheckpointError(f"{self.folder}: no tensor {name!r}")
        if shard.fmt == "bin":
            return self._load_bin(shard.path)[name].clone()
        try:
            handle = _open_safetensors(shard.path) if own_map else self._handle(shard.path)
            return handle.get_tensor(name)
        except CheckpointError:
            raise
        except Exception as exc:  # noqa: BLE001 - corrupt bytes surface as many types
            raise CheckpointError(
                f"{shard.path}: tensor {name!r} cannot be read ({exc}); the file is corrupt: download "
                "or save it again."
            ) from None

    def prefetch(self, names: Iterable[str]) -> None:
        """Ask the kernel to start reading these tensors' bytes (``POSIX_FADV_WILLNEED``), so
        that disk reads overlap with work on earlier tensors. Only a hint: nothing happens for
        ``.bin`` files, where the call is missing, or if a header cannot be parsed (`get` then
        reports the problem)."""
        if not hasattr(os, "posix_fadvise"):
            return
        by_path: dict[Path, list[str]] = {}
        for name in names:
            shard = self._where.get(name)
            if shard is not None and shard.fmt == "safetensors":
                by_path.setdefault(shard.path, []).append(name)
        for path, wanted in by_path.items():
            offsets = self._offsets(path)
            spans = sorted(offsets[n] for n in wanted if n in offsets)
            if not spans:
                continue
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError:
                continue
            try:
                start, end = spans[0]
                for s, e in spans[1:]:  # one call per run of adjacent tensors
                    if s > end:
                        os.posix_fadvise(fd, start, end - start, os.POSIX_FADV_WILLNEED)
                        start = s
                    end = max(end, e)
                os.posix_fadvise(fd, start, end - start, os.POSIX_FADV_WILLNEED)
            except OSError:
                pass
            finally:
                os.close(fd)

    def _offsets(self, path: Path) -> dict[str, tuple[int, int]]:
        """Absolute byte range of each tensor in a safetensors file ({} if unparsable)."""
        if path not in self._spans:
            spans: dict[str, tuple[int, int]] = {}
            try:
                with open(path, "rb") as f:
                    n = int.from_bytes(f.read(8), "little")
                    header = json.loads(f.read(n)) if 0 < n < (100 << 20) else {}
                for name, entry in header.items():
                    if name != "__metadata__":
                        lo, hi = entry["data_offsets"]
                        spans[name] = (8 + n + int(lo), 8 + n + int(hi))
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                spans = {}
            self._spans[path] = spans
        return self._spans[path]

    def shard_metadata(self, shard: Shard) -> dict[str, str] | None:
        if shard.fmt != "safetensors":
            return {"format": "pt"}
        return self._handle(shard.path).metadata()

    def non_weight_files(self) -> list[Path]:
        """Files to copy unchanged to an output folder (config, tokenizer, README, ...).

        Raises:
            CheckpointError: one of them is a broken link or unreadable (the copy would lack it).
        """
        weights = {s.path.name for s in self.shards} | {SAFE_INDEX, BIN_INDEX}
        files = []
        for p in sorted(self.folder.iterdir()):
            if p.name in weights or p.name.endswith(WEIGHT_SUFFIXES):
                continue
            if p.is_symlink() and _link_problem(p) is not None:
                raise CheckpointError(
                    f"{_link_problem(p)} The protected copy would silently lack {p.name}: fix the link "
                    "or remove it."
                )
            if p.is_file():
                _require_file(p, "a file to copy to the output", missing=f"{p}: vanished while reading.")
                files.append(p)
        return files

    def close(self) -> None:
        self._handles.clear()
        self._bin_cache = None

    def release(self) -> None:
        """Unmap the safetensors files (reopened on demand): their touched pages count as resident
        memory until then. A loaded ``.bin`` stays cached (reloading it would cost a full read)."""
        self._handles.clear()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _open_safetensors(path: Path) -> Any:
    try:
        return safe_open(path, framework="pt")
    except Exception as exc:  # noqa: BLE001 - see Checkpoint._safetensors_names
        raise CheckpointError(
            f"{path}: cannot be opened as safetensors ({exc}); the file is corrupt or changed "
            "while mergeshield was reading it."
        ) from None


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


FINGERPRINT_HASH = "xxh3_128"
"""The hash behind output fingerprints (they match a key to its protected weights; a checksum,
not a signature: publish ``sha256sum`` of the files for that). xxh3-128 hashed 10 GB/s here,
sha256 1.3 GB/s (with SHA-NI; an ad-hoc timing of one 256 MB buffer): at Llama-2-7B size sha256 took about 10 CPU-seconds of protect.
Keys written before it name no hash and were fingerprinted with sha256 (`FINGERPRINT_HASHES`)."""

FINGERPRINT_HASHES = {"xxh3_128": xxhash.xxh3_128, "sha256": hashlib.sha256}


def tensor_digest(name: str, tensor: torch.Tensor, algorithm: str = FINGERPRINT_HASH) -> bytes:
    """A hash (`FINGERPRINT_HASH` by default) over a tensor's name, dtype, shape and bytes."""
    h = FINGERPRINT_HASHES[algorithm]()
    h.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
    h.update(tensor.contiguous().reshape(-1).view(torch.uint8).numpy())  # buffer protocol: no bytes copy
    return h.digest()


def fingerprint_of(digests: dict[str, bytes], algorithm: str = FINGERPRINT_HASH) -> str:
    """The fingerprint of a checkpoint from its tensors' `tensor_digest`s (any order)."""
    h = FINGERPRINT_HASHES[algorithm]()
    for name in sorted(digests):
        h.update(digests[name])
    return h.hexdigest()


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


def _remove_tree(path: Path) -> None:
    """Remove `path` even if a second Ctrl-C arrives while removing it."""
    for _ in range(5):
        try:
            shutil.rmtree(path, ignore_errors=True)
            return
        except KeyboardInterrupt:
            continue


@contextlib.contextmanager
def atomic_output_dir(out: str | os.PathLike[str], overwrite: bool = False, need: int = 0) -> Iterator[Path]:
    """Yield a temporary folder beside `out`; move it to `out` only if the block succeeds.

    `need` (bytes the output will take) is checked against the free space first
    (`require_free_space`), before the block writes anything.

    On any exception (including KeyboardInterrupt, and SIGTERM once the CLI has turned it into
    one) the temporary folder is removed, parent folders created for `out` are removed again, and
    `out` is left as it was. Temporary names carry the pid and a random part, so concurrent runs
    (threads or processes) into different outputs never collide.
    """
    out = Path(out)
    created = [p for p in (out.parent, *out.parent.parents) if not p.exists()]
    tmp = out.parent / f".{out.name}.mergeshield-tmp-{os.getpid()}-{uuid.uuid4().hex[:12]}"
    trash: Path | None = None
    try:  # the folders are made inside the try, so an interrupt right after making them cleans up
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
        if need:
            require_free_space(tmp, need)
        yield tmp
        if out.exists():
            if not overwrite:
                raise OutputPathError(f"output {out} appeared while writing; pass --overwrite.")
            trash = out.parent / f".{out.name}.mergeshield-old-{os.getpid()}-{uuid.uuid4().hex[:12]}"
            out.rename(trash)
            tmp.rename(out)
            _remove_tree(trash)
        else:
            tmp.rename(out)
    except BaseException:
        _remove_tree(tmp)
        if trash is not None and trash.exists() and not out.exists():
            trash.rename(out)  # interrupted between the two renames: put the old output back
        for p in created:  # innermost first
            with contextlib.suppress(OSError):
                p.rmdir()
        raise


def tensor_bytes(template: Checkpoint, dtype_of: Callable[[str], torch.dtype]) -> int:
    """Bytes of the tensors of a checkpoint laid out like `template`, each in `dtype_of(name)`."""
    return sum(math.prod(template.shape(n)) * dtype_of(n).itemsize for n in template.names)


def output_bytes(template: Checkpoint, dtype_of: Callable[[str], torch.dtype]) -> int:
    """`tensor_bytes` and the files copied beside the tensors (safetensors headers and the
    index, a few KB, not counted): what writing such a checkpoint takes on disk."""
    return tensor_bytes(template, dtype_of) + sum(p.stat().st_size for p in template.non_weight_files())


def _size(n: int) -> str:
    """A byte count for people: 13.50 GB, 48.2 MB, 812 bytes."""
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n} bytes"


def require_free_space(folder: Path, need: int) -> None:
    """Refuse, before anything is written, an output of `need` bytes that cannot fit in the free
    space of `folder`'s file system (a 7B release is about 13.5 GB and takes half a minute or
    more to write: better to say so at once than to fail near the end).

    Raises:
        OSError: ENOSPC, naming both sizes. An output being replaced does not count as free: it
            is removed only once the new one is complete.
    """
    try:
        free = shutil.disk_usage(folder).free
    except OSError:  # a file system that cannot say: the write itself will tell
        return
    if free < need:
        raise OSError(
            errno.ENOSPC,
            f"{folder.parent}: the output needs {_size(need)} ({need} bytes) and the disk has {_size(free)} "
            f"({free} bytes) free (an output being replaced counts as used: it is removed only once the new one "
            "is complete). "
            "Nothing was written: free space or choose an output on another disk, then run again.",
        )


def copy_non_weight_files(src: Checkpoint, dest: Path) -> None:
    """Copy config, tokenizer, generation config, README... and subfolders without weights unchanged.

    Subfolders (sentence-transformers' ``1_Pooling/``, ...) are copied too. A subfolder that holds
    weight files (a training ``checkpoint-500/``, an adapter) is refused: copying it would ship
    unprotected weights inside the protected release, and leaving it out silently would lose it.
    """
    for p in src.non_weight_files():
        shutil.copy2(p, dest / p.name)
    for d in sorted(x for x in src.folder.iterdir() if x.is_dir() and not x.name.startswith(".")):
        weights = sorted(str(f.relative_to(src.folder)) for f in d.rglob("*") if f.name.endswith(WEIGHT_SUFFIXES))
        if weights:
            raise CheckpointError(
                f"{d}: this subfolder holds weight files ({weights[:3]}). Copying it would publish "
                "unprotected weights with the protected model, and dropping it silently would lose it: "
                "move it out of the model folder (e.g. training checkpoints) and run again."
            )
        shutil.copytree(d, dest / d.name, symlinks=False)


def _write_error(path: Path, exc: BaseException) -> OSError:
    """An OSError naming the file being written, with a hint for the common causes."""
    code = exc.errno if isinstance(exc, OSError) and exc.errno else None
    if code is None:
        m = re.search(r"os error (\d+)", str(exc))
        code = int(m.group(1)) if m else errno.EIO
    hint = {
        errno.ENOSPC: "the disk is full: free space or choose an output on another disk",
        errno.EDQUOT: "the disk quota is exceeded: free space or choose an output on another disk",
        errno.EFBIG: "the file exceeds the size limit for this process or file system",
        errno.EACCES: "the output folder is not writable: choose another output",
        errno.EROFS: "the file system is read-only: choose another output",
    }.get(code, "see the cause above")
    return OSError(
        code,
        f"{os.strerror(code)} while writing {path} ({exc}). The partial output is removed; {hint}, "
        "then run again.",
    )


# safetensors' dtype codes in the order of its Rust enum; its writer lays tensors out by this rank,
# descending (so every tensor stays aligned to its element size), then by name.
_ST_CODES: dict[torch.dtype, str] = {
    torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8", torch.float8_e5m2: "F8_E5M2",
    torch.float8_e4m3fn: "F8_E4M3", torch.int16: "I16", torch.uint16: "U16", torch.float16: "F16",
    torch.bfloat16: "BF16", torch.int32: "I32", torch.uint32: "U32", torch.float32: "F32",
    torch.complex64: "C64", torch.float64: "F64", torch.int64: "I64", torch.uint64: "U64",
}
_ST_RANK = {d: k for k, d in enumerate(_ST_CODES)}


class ShardWriter:
    """Write one safetensors file tensor by tensor, so memory holds one tensor, not a shard.

    Every name's dtype and shape are declared up front: the header (laid out exactly as
    safetensors' own writer lays it out: same order, offsets and padding, hence the same bytes)
    goes first, then each tensor's bytes as `write` receives them, in the order `order`.

    Raises:
        OSError: the write failed (disk full, quota, permissions); the message names the file.
        ValueError: a tensor arrived out of order or differs from its declared dtype/shape.
    """

    def __init__(
        self,
        path: Path,
        specs: Mapping[str, tuple[torch.dtype, tuple[int, ...]]],
        metadata: Mapping[str, str] | None,
    ) -> None:
        unknown = {str(d) for d, _ in specs.values() if d not in _ST_CODES}
        if unknown:
            raise ValueError(f"safetensors cannot store dtype(s) {sorted(unknown)}")
        self.path = path
        self.specs = dict(specs)
        self.order = sorted(self.specs, key=lambda n: (-_ST_RANK[self.specs[n][0]], n))
        header: dict[str, Any] = {"__metadata__": dict(sorted(metadata.items()))} if metadata else {}
        offset = 0
        for name in self.order:
            dtype, shape = self.specs[name]
            size = math.prod(shape) * dtype.itemsize
            header[name] = {"dtype": _ST_CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
        raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        raw += b" " * (-len(raw) % 8)
        self._next = 0
        try:
            self._file = open(path, "wb")  # noqa: SIM115 (closed in close/__exit__)
            self._file.write(len(raw).to_bytes(8, "little") + raw)
        except OSError as exc:
            raise _write_error(path, exc) from None

    def write(self, name: str, tensor: torch.Tensor) -> None:
        expected = self.order[self._next] if self._next < len(self.order) else None
        if name != expected:
            raise ValueError(f"{self.path.name}: got tensor {name!r}, expected {expected!r} next")
        dtype, shape = self.specs[name]
        if tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
            raise ValueError(
                f"{self.path.name}: {name!r} was declared {dtype} {list(shape)} but is "
                f"{tensor.dtype} {list(tensor.shape)}"
            )
        data = tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
        try:
            self._file.write(memoryview(data))
        except OSError as exc:
            raise _write_error(self.path, exc) from None
        self._next += 1

    def close(self) -> None:
        """Close the file; raises ValueError if a declared tensor was never written."""
        try:
            self._file.close()
        except OSError as exc:
            raise _write_error(self.path, exc) from None
        if self._next != len(self.order):
            raise ValueError(f"{self.path.name}: {len(self.order) - self._next} declared tensor(s) never written")

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if exc_type is None:
            self.close()
        else:  # the output folder is abandoned anyway; keep the original error
            with contextlib.suppress(OSError):
                self._file.close()


def write_index(dest: Path, ckpt: Checkpoint, total_size: int) -> None:
    """Write ``model.safetensors.index.json`` when the input was sharded (had an index)."""
    if not ckpt.sharded:
        return
    weight_map = {name: shard.output_name for shard in ckpt.shards for name in shard.names}
    index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    (dest / SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")


# Config keys that fix how tensors split into heads and layers. Two checkpoints with equal tensor
# shapes can still disagree on these (e.g. 4 heads of 16 vs 8 heads of 8 dimensions).
STRUCTURAL_KEYS = (
    "num_attention_heads", "num_key_value_heads", "head_dim", "n_head", "multi_query",
    "hidden_size", "n_embd", "intermediate_size", "n_inner", "num_hidden_layers", "n_layer",
    "position_embedding_type", "partial_rotary_factor", "rotary_dim",
)


def structural_differences(model: Checkpoint, base: Checkpoint) -> list[str]:
    """Structural config values (heads, head size, widths, depth) on which two checkpoints differ.

    Only keys present in both ``config.json`` files are compared, at the top level and in
    sub-configs (``text_config``, ``vision_config``, ...). Returns ``"key: model X vs base Y"``
    lines; empty when they agree.
    """

    def walk(a: Mapping[str, Any], b: Mapping[str, Any], prefix: str) -> list[str]:
        out = [
            f"{prefix}{k}: model {a[k]!r} vs base {b[k]!r}"
            for k in STRUCTURAL_KEYS
            if k in a and k in b and a[k] != b[k]
        ]
        for k in sorted(a):
            if k.endswith("_config") and isinstance(a[k], dict) and isinstance(b.get(k), dict):
                out += walk(a[k], b[k], f"{prefix}{k}.")
        return out

    return walk(model.config, base.config, "")


RELEASE_BYTES = 256 << 20
"""rewrite_checkpoint unmaps its inputs after about this many bytes of output."""
PREFETCH_BYTES = 1 << 30
"""rewrite_checkpoint asks the kernel to read ahead the inputs of about this many bytes of output."""


def rewrite_checkpoint(
    template: Checkpoint,
    out: Path,
    produce: Callable[[str], torch.Tensor],
    *,
    overwrite: bool,
    progress: bool,
    desc: str,
    before_commit: Callable[[str], None] | None = None,
    dtype_of: Callable[[str], torch.dtype] | None = None,
    inputs: Sequence[Checkpoint] = (),
    prefetch: Callable[[list[str]], None] | None = None,
    files: Callable[[Path], None] | None = None,
) -> str:
    """Write a checkpoint laid out like `template` whose tensors come from `produce(name)`.

    Shards, index and non-weight files follow the template; the folder appears at `out` only
    when complete. Tensors are streamed into their shard one by one (memory holds one output
    tensor, not a shard); `dtype_of(name)` gives each output dtype (default: the template's).
    Every `RELEASE_BYTES` of output the template and `inputs` are unmapped, so their mapped
    pages do not pile up as resident memory (reopening a file cost 15 ms here, so not per tensor).
    `prefetch(names)` (default: the template's `Checkpoint.prefetch`) is told the tensors about
    to be produced, about `PREFETCH_BYTES` of output ahead, so that their inputs' disk reads
    overlap with the work on earlier tensors.
    Returns the fingerprint (`FINGERPRINT_HASH` over every output tensor's name, dtype, shape and
    bytes).
    `files(folder)` may edit the non-weight files once they are copied into the (temporary)
    output folder. `before_commit(fingerprint)` may raise to abandon the output. An output larger
    than the free space of its disk is refused (OSError ENOSPC) before anything is written.
    """
    dtype_of = dtype_of or template.dtype
    prefetch = prefetch or template.prefetch
    digests: dict[str, bytes] = {}
    total = unreleased = 0

    def store(writer: ShardWriter, name: str, t: torch.Tensor) -> None:
        writer.write(name, t)
        digests[name] = tensor_digest(name, t)

    # progress in bytes of output (tensors differ in size by 10^4): the ETA means something
    out_bytes = tensor_bytes(template, dtype_of)
    need = output_bytes(template, dtype_of)  # refused at once if the disk cannot hold it
    with atomic_output_dir(out, overwrite=overwrite, need=need) as tmp, ThreadPoolExecutor(1, "mergeshield-writer") as pool:
        copy_non_weight_files(template, tmp)
        if files is not None:
            files(tmp)
        bar = tqdm(total=out_bytes, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, disable=not progress)
        for shard in template.shards:
            specs = {name: (dtype_of(name), template.shape(name)) for name in shard.names}
            with ShardWriter(tmp / shard.output_name, specs, template.shard_metadata(shard) or {"format": "pt"}) as writer:
                # Writing and hashing (both release the GIL) run in one worker thread, in order,
                # while the next tensor is produced; at most one tensor waits for it.
                pending: deque[Future[None]] = deque()
                nbytes = {n: math.prod(specs[n][1]) * specs[n][0].itemsize for n in writer.order}
                ahead = ahead_bytes = done_bytes = 0
                try:
                    for name in writer.order:
                        batch = []
                        while ahead < len(writer.order) and ahead_bytes < done_bytes + PREFETCH_BYTES:
                            batch.append(writer.order[ahead])
                            ahead_bytes += nbytes[writer.order[ahead]]
                            ahead += 1
                        if batch:
                            prefetch(batch)
                        done_bytes += nbytes[name]
                        t = produce(name)
                        while len(pending) > 1:  # result() before popleft: a wait cut short by
                            pending[0].result()  # Ctrl-C leaves the write in `pending` for the
                            pending.popleft()  # finally below (result() re-raises write errors)
                        pending.append(pool.submit(store, writer, name, t))
                        size = nbytes[name]  # the writer checks t against its declared dtype and shape
                        total += size
                        unreleased += size
                        del t
                        if unreleased >= RELEASE_BYTES:
                            for ckpt in (template, *inputs):
                                ckpt.release()  # unmap the input pages read so far
                            unreleased = 0
                        bar.update(size)
                    while pending:
                        pending[0].result()
                        pending.popleft()
                finally:  # never close the file under a running write
                    futures.wait(pending)
        bar.close()
        write_index(tmp, template, total)
        fingerprint = fingerprint_of(digests)
        if before_commit is not None:
            before_commit(fingerprint)
    return fingerprint


def save_as_dtype(src: str | os.PathLike[str], out: str | os.PathLike[str], dtype: torch.dtype,
                  overwrite: bool = False) -> Path:
    """A copy of the checkpoint folder `src` with every floating-point tensor rounded to `dtype`
    (`rewrite_checkpoint`: sharded like `src`, safetensors also for ``.bin`` shards, streamed a
    tensor at a time; the config's dtype names it; the other files copied), written atomically
    to `out`. For publishing or evaluating a checkpoint in
    half precision. Returns `out`.

    Raises:
        ValueError: `dtype` is not a floating-point dtype.
        OutputPathError: `out` is, holds or lies inside `src`, or exists without `overwrite`.
        CheckpointError: `src` is not a readable checkpoint folder.
        OSError: ENOSPC, the copy would not fit in the disk's free space (nothing is written).
    """
    if not dtype.is_floating_point:
        raise ValueError(f"save_as_dtype rounds weights to a floating-point dtype, not {dtype}")
    out = Path(out)
    check_output_path(out, [Path(src)], overwrite)
    name = str(dtype).removeprefix("torch.")

    def name_dtype(folder: Path) -> None:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        config["torch_dtype"] = name  # transformers 4 reads this key
        if "dtype" in config:  # and 5 writes this one
            config["dtype"] = name
        (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")

    with Checkpoint(src) as ckpt:
        def out_dtype(n: str) -> torch.dtype:
            return dtype if ckpt.dtype(n).is_floating_point else ckpt.dtype(n)

        rewrite_checkpoint(ckpt, out, lambda n: ckpt.get(n).to(out_dtype(n)), overwrite=overwrite, progress=False,
                           desc="", dtype_of=out_dtype, files=name_dtype)
    return out
