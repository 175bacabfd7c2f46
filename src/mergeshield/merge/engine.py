"""Streaming merge of Hugging Face checkpoints: one tensor of each model in memory at a time."""

from __future__ import annotations

import hashlib
import os
from contextlib import ExitStack
from pathlib import Path
from typing import Literal

import torch

from mergeshield.core.numeric import all_finite
from mergeshield.errors import BaseMismatchError, NumericError
from mergeshield.io.checkpoint import Checkpoint, check_output_path
from mergeshield.io.naming import match_names
from mergeshield.merge.methods import MergeMethod, merge_tensor

__all__ = ["merge_checkpoints", "ExtraPolicy"]

ExtraPolicy = Literal["error", "first", "average"]


def _generator(seed: int, name: str) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}|{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def merge_checkpoints(
    base_dir: str | os.PathLike[str],
    model_dirs: list[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    method: MergeMethod,
    *,
    seed: int = 0,
    extra: ExtraPolicy = "error",
    overwrite: bool = False,
    progress: bool = True,
) -> str:
    """Merge fine-tuned checkpoints of one base into a new checkpoint folder.

    The output is laid out like the first model (names, shards, config, tokenizer). Tensors the
    base lacks (task heads) follow `extra`: ``error`` (default) refuses, ``first`` copies the
    first model's, ``average`` averages them (shapes must agree).

    Args:
        base_dir: the pretrained checkpoint all models were fine-tuned from.
        model_dirs: the fine-tuned checkpoints (two or more; one is allowed for TA scans).
        out_dir: the output folder (appears only when complete).
        method: a `MergeMethod` (see `make_method`).
        seed: DARE's random stream (per tensor, independent of order).

    Returns:
        The output fingerprint.
    """
    from mergeshield.io.checkpoint import rewrite_checkpoint

    if not model_dirs:
        raise ValueError("merge needs at least one model")
    out = Path(out_dir)
    check_output_path(out, [Path(base_dir), *map(Path, model_dirs)], overwrite)
    with ExitStack() as stack:
        base = stack.enter_context(Checkpoint(base_dir))
        models = [stack.enter_context(Checkpoint(d)) for d in model_dirs]
        first = models[0]
        maps = []
        for m in models:
            if m.model_type != base.model_type:
                raise BaseMismatchError(
                    f"{m.folder} is {m.model_type!r} but the base is {base.model_type!r}: "
                    "only fine-tunes of the same base can be merged."
                )
            maps.append(match_names(m.names, base.names))
        first_map = maps[0]
        for m, mp in zip(models[1:], maps[1:]):
            own = {v: k for k, v in mp.items()}
            for name, bname in first_map.items():
                if bname not in own:
                    raise BaseMismatchError(f"{m.folder} lacks {bname!r}, which {first.folder} has.")
                if m.shape(own[bname]) != first.shape(name):
                    raise BaseMismatchError(
                        f"{bname}: {m.folder} has shape {m.shape(own[bname])}, {first.folder} has "
                        f"{first.shape(name)}. These are not fine-tunes of the same architecture."
                    )
        extras = [n for n in first.names if n not in first_map]
        if extras and extra == "error":
            raise BaseMismatchError(
                f"{len(extras)} tensor(s) of {first.folder} have no counterpart in the base, e.g. "
                f"{extras[:4]} (task heads?). Choose what to do with them: --extra first (copy the "
                "first model's) or --extra average."
            )
        inverse_maps = [{v: k for k, v in mp.items()} for mp in maps]

        def produce(name: str) -> torch.Tensor:
            if name in first_map:
                bname = first_map[name]
                b = base.get(bname)
                tuned = [m.get(inv[bname]) for m, inv in zip(models, inverse_maps)]
                if not b.is_floating_point():
                    return tuned[0]  # integer buffers (position ids) are copied
                for t, m in zip([b, *tuned], [base, *models]):
                    if not all_finite(t):
                        raise NumericError(f"{m.folder}: tensor {name!r} has NaN/Inf values.")
                return merge_tensor(b, tuned, method, _generator(seed, bname))
            if extra == "first":
                return first.get(name)
            same = [m.get(name) if name in m else None for m in models]
            if any(t is None or t.shape != same[0].shape for t in same):  # type: ignore[union-attr]
                raise BaseMismatchError(f"--extra average: {name!r} is missing or differs in shape across models.")
            return torch.stack([t.to(torch.float32) for t in same]).mean(0).to(same[0].dtype)  # type: ignore[union-attr]

        def dtype_of(name: str) -> torch.dtype:
            # merge_tensor returns the base's dtype; integer buffers and extras keep the first model's
            if name in first_map and base.dtype(first_map[name]).is_floating_point:
                return base.dtype(first_map[name])
            return first.dtype(name)

        def prefetch(batch: list[str]) -> None:
            bnames = [first_map[n] for n in batch if n in first_map]
            base.prefetch(bnames)
            for m, inv in zip(models, inverse_maps):
                m.prefetch([inv[b] for b in bnames if b in inv])

        return rewrite_checkpoint(first, out, produce, overwrite=overwrite, progress=progress,
                                  desc=f"merging ({method.name})", dtype_of=dtype_of, inputs=[base, *models[1:]],
                                  prefetch=prefetch)
