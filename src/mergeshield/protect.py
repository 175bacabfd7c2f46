"""Protect a fine-tuned checkpoint with PaRaMS' function-preserving transforms, and undo it.

PaRaMS: Wei, Yu, Sakuma, "Disrupting Model Merging: A Parameter-Level Defense Without
Sacrificing Accuracy", ICCV 2025, arXiv 2503.07661. MLP hidden units are permuted by the
assignment that moves them farthest from the pretrained weights; attention Q/K and V/O are
scaled per dimension by random factors and their inverses (RoPE pairs and GQA groups tied).

One streaming pass over the checkpoint: tensors are written one at a time in file order, and
a space instance (one layer's MLP or attention part) is planned in a background thread when the
writer's read-ahead reaches its tensors, reading only its tensors from the model and the base.
Peak memory is about one layer's tensors and their unit features plus two output tensors in
flight.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import uuid
from collections.abc import Callable, Container, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal, Self

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from mergeshield.core.numeric import SQUARES_EXACT_BELOW, all_finite, runs_square_sum, square_sums
from mergeshield.core.assignment import (
    GramAccumulator,
    NonFiniteCosts,
    SPARSE_CANDIDATES,
    UnitParts,
    choose_solver,
    farthest_assignment,
    farthest_from_gram,
    native_bfloat16,
    permutation_distances,
    unit_features,
)
from mergeshield.core.scales import ScaleLaw, pow2_exponent_bounds, pow2_exponent_range, sample_factors
from mergeshield.core.transforms import Transform, apply_transform, axis_view, expand_factors
from mergeshield.errors import BaseMismatchError, DeviceError, KeyMismatchError, NumericError, OutputPathError, SpecError
from mergeshield.io.checkpoint import (
    Checkpoint,
    check_output_path,
    structural_differences,
    FINGERPRINT_HASH,
    FINGERPRINT_HASHES,
    fingerprint_of,
    rewrite_checkpoint,
    tensor_digest,
)
from mergeshield.io.naming import match_names
from mergeshield.symmetry.registry import family_for_model_type
from mergeshield.symmetry.spec import Binding, BoundModel, BoundTensor, HeadPermutationSpace, PermutationSpace, ScaleSpace, SpaceInstance, bind

__all__ = [
    "ProtectOptions",
    "ProtectReport",
    "InstanceReport",
    "protect",
    "unprotect",
    "bind_checkpoint",
    "rewrite_checkpoint",  # lives in mergeshield.io.checkpoint; here for older imports
]

HALF_DTYPES = (torch.float16, torch.bfloat16)
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
KEY_FORMAT = "mergeshield-key/1"


class ProtectOptions(BaseModel):
    """What `protect` does. Every field is also a CLI flag."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    seed: int = 0
    permute_mlp: bool = True
    scale_qk: bool = True
    scale_vo: bool = True
    scale_low: float = Field(0.05, gt=0)
    scale_high: float = Field(20.0, gt=0)
    scale_law: ScaleLaw = "uniform"
    scale_quantize: Literal["auto", "none", "pow2"] = "auto"
    """``auto``: powers of two for float16/bfloat16 checkpoints (exact in any binary float
    format, so the protected half-precision model computes bit-for-bit the same products; its
    sums, rearranged, still round differently in float16 arithmetic), continuous factors for
    float32/float64."""
    permute_heads: bool = False
    """Beyond PaRaMS: reorder each layer's attention heads (K/V heads with their query-head
    groups under GQA) by the assignment farthest from the base, after the scales. Off by
    default: the default is PaRaMS as published."""
    mix_qk: bool = False
    """Beyond PaRaMS: instead of diagonal Q/K scales, a random invertible matrix ``M`` per K/V head
    (Q rows times ``M``, K rows times ``M^-T``): without RoPE a random rotation times scale
    factors; with RoPE a random rotation and scale of each rotated pair (a complex
    multiplication, which commutes with RoPE's own rotation). float32/float64 checkpoints only."""
    mix_vo: bool = False
    """Beyond PaRaMS: instead of diagonal V/O scales, a random invertible matrix per K/V head
    (a random rotation times scale factors, condition number at most scale_high/scale_low),
    as MergeLock (arXiv 2509.01548) does. float32/float64 checkpoints only (not exact in half)."""
    permute_residual: bool = False
    """Beyond PaRaMS: one permutation of the hidden dimension for the whole model (embeddings,
    every layer's reads and writes of the residual stream, the norms), farthest from the base.
    LayerNorm and RMSNorm do not depend on the order of the dimensions, so the function is kept.
    Families: bert, llama, gpt2, vit (not clip). Off by default."""
    solver: Literal["auto", "exact", "sparse", "block", "greedy", "random"] = "auto"
    """MLP assignment solver (see `mergeshield.core.assignment.SOLVERS`): ``auto`` is exact up to
    4096 units per layer and block-exact (blocks of `block_size`) above; ``sparse`` (`candidates`)
    comes nearer the exact objective at 2.2-2.4 times the protect time of ``block`` at 7B (two bench runs)."""
    block_size: int = Field(1024, ge=2)
    """Units per block of the block solver. Larger blocks reach more of the exact objective and
    cost more: on a 9216-unit stand-in for a large real layer, 1024 reached 0.956 of it, 2048
    0.967 in about 2x the time, 4608 0.985 in about 8.5x (`benchmarks/solver_quality.py`)."""
    candidates: int = Field(SPARSE_CANDIDATES, ge=1)
    """Cheapest columns per row (and rows per column) the sparse solver keeps: more reach more of
    the exact objective, at more time (measured in `mergeshield.core.assignment.SPARSE_CANDIDATES`)."""
    device: str = "cpu"
    """Where the MLP assignment's costs are multiplied: ``cpu``, or ``cuda`` / ``cuda:N`` for an
    NVIDIA GPU, or ``auto``: a GPU where torch sees one, else the CPU (the key records which, since
    the bytes then depend on the machine). The sparse solver's whole cost matrix is the product a
    GPU takes; the assignments themselves are solved on the CPU. Not yet run on a GPU by this project (none
    was lent): the path is the CPU's torch code on another device, tested on the CPU only. A
    GPU's products round differently, so its permutation for a seed may differ from the CPU's."""
    half_subnormals: Literal["round", "keep"] = "round"
    """float16 power-of-two scales: ``round`` lets a factor 2^-k scale down values that are (or
    become) smaller than float16's smallest normal, 6.1e-5, which rounds away their lowest bits
    (each moves by at most 2^(k-25): 2.4e-7 at 1/8); the outputs stay within float16's own
    rounding (`verify`) and `unprotect` restores those values to within the same bound, not
    bit-exact. ``keep`` is exact, but a row or column holding such a value can then only be
    scaled up, so a Q/K or V/O pair whose both sides hold one keeps factor 1: in float16 weights
    of a few thousand values per row (Llama-2-7B's) nearly every pair does, and the scales
    protect nothing. bfloat16 (float32's exponent range) and float32 are exact either way."""
    prune_rate: float = Field(0.0, ge=0.0, lt=1.0)
    """PaRaMS' dropout-based pruning against adaptive attackers: zero this fraction of the
    entries of every transformed tensor (random, seeded per tensor) before rearranging, without
    rescaling. Unlike the other transforms this CHANGES the function: measure its cost."""

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if value == "auto":
            return value
        try:
            kind = torch.device(value).type
        except (RuntimeError, ValueError):
            kind = None
        if kind not in ("cpu", "cuda"):
            raise ValueError(f"device {value!r}: use cpu, cuda, cuda:N or auto")
        return value

    @model_validator(mode="after")
    def _range(self) -> ProtectOptions:
        if self.scale_low > self.scale_high:
            raise ValueError(f"scale_low {self.scale_low} > scale_high {self.scale_high}")
        return self


@dataclass(frozen=True)
class InstanceReport:
    """Distances to the base for one space instance (one layer's MLP or attention part)."""

    id: str
    kind: str
    task_norm: float
    """``||theta_ft - theta_pre||`` over the instance's tensors: the distance before."""
    dist_after: float
    """``||theta_protected - theta_pre||`` over the same tensors."""
    base_norm: float
    """``||theta_pre||`` over the same tensors (to judge whether the base is plausible)."""
    detail: str = ""

    @property
    def ratio(self) -> float:
        return self.dist_after / self.task_norm if self.task_norm > 0 else float("inf")


@dataclass
class ProtectReport:
    out: Path
    family: str
    fingerprint: str
    instances: list[InstanceReport] = field(default_factory=list)
    key: Path | None = None
    notes: list[str] = field(default_factory=list)

    def table(self) -> str:
        """A per-instance text table (distance to base before/after, ratio)."""
        lines = [f"{'instance':<40} {'kind':<12} {'||tau||':>10} {'after':>10} {'after/tau':>9}  detail"]
        for r in self.instances:
            lines.append(
                f"{r.id:<40} {r.kind:<12} {r.task_norm:>10.4g} {r.dist_after:>10.4g} {r.ratio:>9.2f}  {r.detail}"
            )
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
def bind_checkpoint(ckpt: Checkpoint) -> BoundModel:
    """Bind the checkpoint's family description to its tensors (see `symmetry.spec.bind`), on
    the config as transformers reads it (its defaults filled in; a config it refuses is refused)."""
    family = family_for_model_type(ckpt.model_type)
    return bind(family, ckpt.full_config(), ckpt.shapes())


def _instance_rng(seed: int, instance_id: str) -> np.random.Generator:
    # Keyed by the instance id, so a layer's draw does not depend on processing order.
    digest = int.from_bytes(hashlib.sha256(instance_id.encode()).digest()[:8], "little")
    return np.random.default_rng([seed, digest])


def _checked(t: torch.Tensor, name: str, where: str) -> torch.Tensor:
    """`t` itself, after refusing quantised dtypes and non-finite values."""
    if t.dtype not in FLOAT_DTYPES:
        raise NumericError(
            f"{where}: tensor {name!r} has dtype {t.dtype}. mergeshield transforms only float16, "
            "bfloat16, float32 and float64 weights; quantised (integer or float8) checkpoints would "
            "be mangled. Dequantise the checkpoint first."
        )
    if not all_finite(t):
        bad = int((~torch.isfinite(t)).sum())
        raise NumericError(
            f"{where}: tensor {name!r} has {bad} NaN/Inf value(s). A model with non-finite weights "
            "cannot be protected or merged meaningfully; fix or re-export the checkpoint."
        )
    return t


def _of_float_dtype(t: torch.Tensor, name: str, where: str) -> torch.Tensor:
    """`t` itself, after refusing quantised dtypes (`_checked` without the NaN/Inf check)."""
    if t.dtype not in FLOAT_DTYPES:
        _checked(t, name, where)
    return t


def _to_compute(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float64 if t.dtype == torch.float64 else torch.float32)


def _as_compute(t: torch.Tensor, name: str, where: str) -> torch.Tensor:
    return _to_compute(_checked(t, name, where))


def _exact_in(dtype: torch.dtype, transform: Transform) -> bool:
    """Whether applying `transform` in `dtype` itself gives the bits the float32/float64
    computation rounded back to `dtype` gives: a permutation only moves values; a power-of-two
    factor representable in `dtype` multiplies exactly (the half-precision bounds keep every
    product in range). Mixing matrices and other factors round: they need the wider dtype."""
    if transform.perm is not None or dtype in (torch.float32, torch.float64):
        return True
    return transform.factors is not None and _powers_of_two_in(dtype, transform.factors)


def _powers_of_two_in(dtype: torch.dtype, f: np.ndarray) -> bool:
    """Whether every factor is a power of two that `dtype` holds, with a finite inverse there:
    multiplying or dividing by it is then exact (barring overflow and subnormals)."""
    mantissa, _ = np.frexp(f)
    stored = torch.from_numpy(f).to(dtype).double().numpy()
    return bool(np.all(mantissa == 0.5) and np.array_equal(stored, f) and np.all(np.isfinite(1.0 / stored)))


def _check_base(model: Checkpoint, base: Checkpoint, bound: BoundModel) -> dict[str, str]:
    if model.model_type != base.model_type:
        raise BaseMismatchError(
            f"model is {model.model_type!r} ({model.folder}) but base is {base.model_type!r} "
            f"({base.folder}). Pass the pretrained checkpoint the model was fine-tuned from."
        )
    diffs = structural_differences(model, base)
    if diffs:
        raise BaseMismatchError(
            f"base {base.folder} and model {model.folder} differ in structure: {diffs[:4]}. The base "
            "is not the model's pretrained checkpoint: pass the one it was fine-tuned from."
        )
    names = match_names(model.names, base.names)
    # a task head the base lacks may read the residual stream (an optional binding there): fine
    bound_names = sorted({bt.name for inst in bound.instances for bt in inst.tensors
                          if not (inst.model_scoped and bt.binding.optional)})
    missing = [n for n in bound_names if n not in names]
    if missing:
        raise BaseMismatchError(
            f"base {base.folder} lacks {len(missing)} tensor(s) the model has, e.g. {missing[:4]}. "
            "The base has a different depth or architecture: pass the checkpoint the model was "
            "fine-tuned from."
        )
    wrong = [
        f"{n}: model {model.shape(n)} vs base {base.shape(b)}"
        for n, b in names.items()
        if model.shape(n) != base.shape(b)
    ]
    if wrong:
        raise BaseMismatchError(
            f"base and model shapes differ for {len(wrong)} tensor(s): {wrong[:4]}. The base is not "
            "the model's pretrained checkpoint (different width, head count or vocabulary)."
        )
    return names


def _factor_bounds(
    model: Checkpoint, inst: SpaceInstance, tensors: dict[str, torch.Tensor], exps: np.ndarray,
    round_float16: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Exponent range per free factor keeping every bound half-precision tensor exact (with
    `round_float16`, float16 tensors' only against overflow: `ProtectOptions.half_subnormals`).

    Whole-tensor ranges (`pow2_exponent_range`, a third of the time) come first: where they already
    admit every drawn exponent in `exps`, they are the answer (safe for every index, and no
    exponent is bounded by them, as by the per-index ranges); otherwise the per-index ranges."""
    lo = np.full(inst.size, -1000, dtype=np.int64)
    hi = np.full(inst.size, 1000, dtype=np.int64)
    half = [bt for bt in inst.tensors if model.dtype(bt.name) in HALF_DTYPES]
    whole_lo, whole_hi = -1000, 1000
    keep = {bt.name: not (round_float16 and model.dtype(bt.name) == torch.float16) for bt in half}
    for bt in half:
        r_lo, r_hi = pow2_exponent_range(axis_view(tensors[bt.name], bt.binding), model.dtype(bt.name),
                                         keep_small=keep[bt.name])
        if bt.binding.inverse:  # these rows are multiplied by 2**-e
            r_lo, r_hi = -r_hi, -r_lo
        whole_lo, whole_hi = max(whole_lo, r_lo), min(whole_hi, r_hi)
    if len(exps) == 0 or (whole_lo <= exps.min() and exps.max() <= whole_hi):
        return lo.clip(whole_lo, None), hi.clip(None, whole_hi)
    for bt in half:
        dtype = model.dtype(bt.name)
        r_lo, r_hi = pow2_exponent_bounds(axis_view(tensors[bt.name], bt.binding), dtype, axis=bt.binding.axis,
                                          keep_small=keep[bt.name])
        if bt.binding.inverse:  # these rows are multiplied by 2**-e
            r_lo, r_hi = -r_hi, -r_lo
        # map expanded rows back to their free factor: expand the free index itself
        owner = expand_factors(inst, np.arange(inst.size, dtype=np.float64), bt.binding.layout).astype(np.int64)
        np.maximum.at(lo, owner, r_lo)
        np.minimum.at(hi, owner, r_hi)
    return lo, hi


def _mixing_matrices(rng: np.random.Generator, inst: SpaceInstance, options: ProtectOptions) -> np.ndarray:
    """Per K/V head: a random orthogonal matrix times a diagonal of sampled scale factors."""
    d = inst.head_dim
    out = np.empty((inst.heads, d, d))
    for h in range(inst.heads):
        q, r = np.linalg.qr(rng.standard_normal((d, d)))
        q = q * np.sign(np.diag(r))  # Haar-distributed rotation
        out[h] = q * sample_factors(rng, d, options.scale_low, options.scale_high, options.scale_law)
    return out


def _rope_mixing_matrices(rng: np.random.Generator, inst: SpaceInstance, options: ProtectOptions) -> np.ndarray:
    """Per K/V head, on each RoPE pair (j, j + d/2 for ``rotate_half``, 2j, 2j+1 for
    ``interleaved``): ``s R(phi)`` with a sampled scale ``s`` and a uniform angle ``phi``. RoPE
    rotates each pair by a position-dependent angle; scaled rotations of the same plane commute
    with it, so ``q.k`` keeps its value at every position."""
    assert isinstance(inst.space, ScaleSpace) and inst.space.rope != "none"
    d = inst.head_dim
    half = np.arange(d // 2)
    i, j = (half, half + d // 2) if inst.space.rope == "rotate_half" else (2 * half, 2 * half + 1)
    out = np.zeros((inst.heads, d, d))
    for h in range(inst.heads):
        s = sample_factors(rng, d // 2, options.scale_low, options.scale_high, options.scale_law)
        phi = rng.uniform(0.0, 2 * np.pi, d // 2)
        c, sn = s * np.cos(phi), s * np.sin(phi)
        out[h, i, i], out[h, j, j], out[h, j, i], out[h, i, j] = c, c, sn, -sn
    return out


class _Plan(Mapping[str, Transform]):
    """The transforms to apply, by instance id in key order, each planned in a background thread
    when announced (`ahead`) or first looked up.

    protect writes the output in one pass: a space instance (one layer's MLP or attention part)
    is planned when the writer's read-ahead reaches its tensors, reading only that instance's
    tensors from the model and the base, each through a mapping of its own (`Checkpoint.get`
    with ``own_map``), so that their pages leave resident memory when the plan is made rather
    than at the writer's next `Checkpoint.release`: peak RSS 1.34-1.55 against 1.86-2.18 GiB at
    Llama-2-7B's shape, 3.92-4.11 against 4.70-4.74 GiB at Llama-2-70B's layer width
    (`benchmarks/peak_rss_protect.py`, README "Scale and speed"). Each instance's random draw is
    keyed by its id, so the order does not change the result. `finish` gives the transforms,
    reports and notes in key order. Use it as a context manager: leaving it waits for the plan
    in progress (it reads the checkpoints)."""

    def __init__(
        self, model: Checkpoint, base: Checkpoint, bound: BoundModel, names: dict[str, str], options: ProtectOptions
    ) -> None:
        self.model, self.base, self.bound, self.names, self.options = model, base, bound, names, options
        self.notes: list[str] = []
        self.device = _available_device(options.device)
        dtypes = {model.dtype(bt.name) for inst in bound.instances for bt in inst.tensors}
        quantize = options.scale_quantize
        if quantize == "auto":
            quantize = "pow2" if dtypes & set(HALF_DTYPES) else "none"
        self.quantize = quantize
        if quantize == "pow2":
            self.notes.append("scale factors rounded to powers of two (exact in float16/bfloat16)")
        if (options.mix_vo or options.mix_qk) and dtypes & set(HALF_DTYPES):
            flag = "--mix-vo" if options.mix_vo else "--mix-qk"
            raise NumericError(
                f"{flag.lstrip('-').replace('-', '_')}: per-head mixing matrices cannot be applied exactly "
                "to float16/bfloat16 weights (the protected model would not compute the same function). "
                f"Protect a float32 copy, or drop {flag} to use power-of-two scales."
            )
        if options.permute_residual and not any(i.model_scoped for i in bound.instances):
            why = bound.skipped.get("residual", f"the {bound.family.name} description has no residual-stream space "
                                    "(described for bert, llama, gpt2 and vit)")
            raise SpecError(f"--permute-residual: {why}. Protect without it.")
        # Head permutations come last, so that the scales (planned on the tensors as stored, with
        # their half-precision bounds) act on heads in their stored order; the key keeps this order.
        ordered = sorted(bound.instances, key=lambda i: isinstance(i.space, HeadPermutationSpace))
        self.instances = {inst.id: inst for inst in ordered if self._enabled(inst)}
        self._clamped: dict[str, int] = {}
        """Scale factors bounded, per instance."""
        self._scale_sums: dict[str, list[float]] = {}
        """Per scale instance, its distances (squared: before, after, base) as `measure` adds them."""
        self.checked: set[str] = set()
        """Model tensors planning or `measure` has read and checked (dtype, NaN/Inf)."""
        self._done: dict[str, tuple[Transform, InstanceReport]] = {}
        # Every instance is planned in this one thread, in the order asked (`ahead`, then
        # lookups), so planning the next layers overlaps with writing this one. (Two planner
        # threads: 3.2-3.45 instead of 1.8-2.2 GiB peak RSS at 7B, and no steady gain in time:
        # benchmarks/HISTORY.md, "Planning ahead".)
        self._planner = ThreadPoolExecutor(1, "mergeshield-planner")
        self._futures: dict[str, Future[tuple[Transform, InstanceReport]]] = {}

    def _enabled(self, inst: SpaceInstance) -> bool:
        space, o = inst.space, self.options
        if inst.model_scoped:
            return o.permute_residual
        if isinstance(space, PermutationSpace):
            return o.permute_mlp
        if isinstance(space, HeadPermutationSpace):
            return o.permute_heads
        return o.scale_qk if space.role == "qk" else o.scale_vo

    def __getitem__(self, iid: str) -> Transform:
        if iid not in self._done:
            self._done[iid] = self._submit(iid).result()
        return self._done[iid][0]

    def _submit(self, iid: str) -> Future[tuple[Transform, InstanceReport]]:
        if iid not in self._futures:
            inst = self.instances[iid]
            if inst.model_scoped:
                job = functools.partial(_plan_residual, self.model, self.base, self.bound, inst, self.names, self.options)
            else:
                job = functools.partial(self._plan, inst)
            self._futures[iid] = self._planner.submit(job)
        return self._futures[iid]

    def ahead(self, names: Sequence[str]) -> None:
        """Start planning, in the background, the instances these tensors (about to be written,
        in this order) belong to: the planner thread works while earlier tensors are written."""
        for name in names:
            for inst in self.bound.by_tensor.get(name, ()):
                if inst.id in self.instances:
                    self._submit(inst.id)

    def close(self) -> None:
        """Drop the plans not started and wait for the running one (it reads the checkpoints,
        which must stay open until it ends)."""
        self._planner.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def read_names(self) -> set[str]:
        """The model tensors an enabled transform is planned on: the only ones whose base
        counterparts protect reads."""
        return {bt.name for inst in self.instances.values() for bt in inst.tensors}

    def __contains__(self, iid: object) -> bool:  # enabled, planned or not (never plans)
        return iid in self.instances

    def __iter__(self) -> Iterator[str]:
        return iter(self.instances)

    def __len__(self) -> int:
        return len(self.instances)

    def finish(self) -> tuple[list[Transform], list[InstanceReport], list[str]]:
        """Plan whatever no tensor asked for yet; the transforms, reports and notes in key order."""
        transforms = [self[iid] for iid in self.instances]
        reports = [self._done[iid][1] for iid in self.instances]
        for k, r in enumerate(reports):  # the scales' distances, as `measure` summed them
            if r.id in self._scale_sums:
                task2, after2, base2 = self._scale_sums[r.id]
                reports[k] = replace(r, task_norm=task2**0.5, dist_after=after2**0.5, base_norm=base2**0.5)
        notes = list(self.notes)
        clamped = sum(self._clamped.values())
        if clamped:
            notes.append(
                f"{clamped} scale factor(s) were bounded so that no float16/bfloat16 weight overflows "
                "(or, where kept exact, moves into or within the subnormal range)"
            )
        # float16 scale factors 2^-k (and, on the inverse side, 2^k) round the values they move below
        # float16's smallest normal, unless kept exact: the deepest k bounds the change
        deepest = max((int(np.abs(np.log2(t.factors)).max(initial=0)) for t in transforms
                       if t.factors is not None and self.quantize == "pow2" and self.options.half_subnormals == "round"
                       and any(self.model.dtype(bt.name) == torch.float16 for bt in self.instances[t.instance_id].tensors)),
                      default=0)
        if deepest > 0:
            notes.append(
                f"float16: scale factors down to 2^-{deepest} round the values they scale below float16's "
                f"smallest normal (6.1e-5), each by at most 2^{deepest - 25} = {2.0 ** (deepest - 25):.2g}: "
                "the outputs stay within float16's own rounding (check with verify); unprotect restores "
                "those values to within that, not bit-exact (--half-subnormals keep: exact, but factors "
                "are then bounded to 1 wherever both sides of a pair hold such a value: most of them in "
                "real float16 weights)"
            )
        return transforms, reports, notes

    def _plan(self, inst: SpaceInstance) -> tuple[Transform, InstanceReport]:
        space = inst.space
        # tensors in their stored dtype: features, bounds and distances convert what they need
        is_perm = isinstance(space, PermutationSpace | HeadPermutationSpace)
        if not is_perm:
            return self._plan_scales(inst)
        model_at, base_at = str(self.model.folder), str(self.base.folder)
        tuned = {bt.name: _of_float_dtype(self.model.get(bt.name, own_map=True), bt.name, model_at) for bt in inst.tensors}
        pre = {bt.name: _of_float_dtype(self.base.get(self.names[bt.name], own_map=True), self.names[bt.name], base_at)
               for bt in inst.tensors}
        units = inst.size if isinstance(space, HeadPermutationSpace) else None
        solver = choose_solver(self.options.solver, inst.size)
        # Block and sparse costs are multiplied in bfloat16 where that is natively fast (some
        # CPUs, GPUs), for bfloat16, float16 and float32 weights alike: the features stay in the
        # stored dtype (half-precision ones a copy without conversion, half the memory of
        # float32) and each block is rounded to bfloat16 for its product (3 significant digits per
        # input, as each cost already is; exact for bfloat16). This CPU multiplies float16 no
        # faster than float32, a sixth of bfloat16's speed. Otherwise block and random compute in
        # float32 (the same permutation as float64, half the memory) and exact and greedy in
        # float64; float64 weights keep float64 features (the report's sums are taken on them),
        # multiplied in float32 all the same.
        stored = {t.dtype for t in (*tuned.values(), *pre.values())}
        single = next(iter(stored)) if len(stored) == 1 else None
        fast = native_bfloat16() or self.device.type == "cuda"
        products = torch.bfloat16 if fast and single in (torch.bfloat16, torch.float16, torch.float32) else None
        narrow = solver in ("block", "sparse", "random") and torch.float64 not in stored
        ftype = (single if products else torch.float32) if narrow else torch.float64
        # the block solver gathers a block's features straight from the tensors (`UnitParts`)
        features = UnitParts if solver == "block" else unit_features
        # The features hold the bound values exactly (in a dtype at least as wide), so each
        # model's tensors go as soon as its features are built: a tensor the features copied
        # (the down projection, transposed; every tensor for the other solvers) is unmapped before
        # the next ones are read (at Llama-2-70B's width 3.41 against 4.07 GiB peak RSS).
        f_pre = features([(pre[bt.name], bt.binding) for bt in inst.tensors], units, ftype)
        del pre
        f_tuned = features([(tuned[bt.name], bt.binding) for bt in inst.tensors], units, ftype)
        del tuned
        # The squared norms the report needs double as the NaN/Inf check (a NaN or Inf makes
        # them non-finite), before any solver sees the values.
        base2, tuned2, task2 = _feature_square_sums(f_pre, f_tuned)
        if not math.isfinite(base2 + tuned2 + task2):
            for bt in inst.tensors:  # raises for the first tensor with a NaN/Inf
                _checked(self.model.get(bt.name, own_map=True), bt.name, model_at)
                _checked(self.base.get(self.names[bt.name], own_map=True), self.names[bt.name], base_at)
            # finite values whose norms overflowed in narrow features (bfloat16 or float32 runs
            # of values near bfloat16's maximum): again in float64
            base2, tuned2, task2 = _feature_square_sums(f_pre, f_tuned, exact=True)
        # a tensor is checked whole only if the instance binds all of it
        self.checked.update(bt.name for bt in inst.tensors if bt.binding.chunk is None)
        kwargs = {"rng": _instance_rng(self.options.seed, inst.id), "block_size": self.options.block_size,
                  "candidates": self.options.candidates, "device": self.device}
        try:
            perm, chosen = farthest_assignment(f_pre, f_tuned, solver, products=products, **kwargs)
        except NonFiniteCosts:  # finite weights whose products overflowed (bfloat16 near 1e38):
            products = torch.float64  # lapjvr refused such costs ("infeasible or overflow")
            try:
                perm, chosen = farthest_assignment(f_pre, f_tuned, solver, products=products, **kwargs)
            except NonFiniteCosts:  # even float64 overflows: no trained model holds such weights
                big = max(float(w.abs().max()) for ckpt, names in ((self.model, [bt.name for bt in inst.tensors]),
                                                                  (self.base, [self.names[bt.name] for bt in inst.tensors]))
                          for w in (ckpt.get(n) for n in names))
                raise NumericError(
                    f"{model_at} / {base_at}: the weights of {inst.id} ({', '.join(bt.name for bt in inst.tensors)}) "
                    f"reach magnitude {big:.3g}: their products overflow even in float64, so no assignment "
                    "can be computed. No trained model holds such values: the checkpoint is corrupt or was "
                    "saved wrongly (check how it was exported)."
                ) from None
        transform = Transform(inst.id, perm=perm)
        moved = float((perm != np.arange(len(perm))).mean())
        what = "heads (distances before scaling)" if units else "units"
        how = [*([f"{str(products).removeprefix('torch.')} products"] if products and solver in ("block", "sparse") else []),
               *([f"costs on {self.device}"] if self.device.type != "cpu" and solver != "random" else [])]
        paren = f" ({', '.join(how)})" if how else ""
        detail = f"{solver} solver{paren}, {moved:.0%} {what} moved"
        if chosen is None:  # the solver multiplied no costs (random): one pass for them
            _, after2, _ = permutation_distances(f_pre, f_tuned, perm)
        else:  # ||pre - tuned[perm]||^2 = ||pre||^2 + ||tuned||^2 - 2 sum of the chosen costs
            after2 = max(base2 + tuned2 - 2 * chosen, 0.0)
        kind = "heads" if isinstance(space, HeadPermutationSpace) else space.kind
        return transform, InstanceReport(inst.id, kind, task2**0.5, after2**0.5, base2**0.5, detail)

    def _plan_scales(self, inst: SpaceInstance) -> tuple[Transform, InstanceReport]:
        space = inst.space
        model_at = str(self.model.folder)
        # Only the bounds read the values here; the distances (and with them the NaN/Inf check of
        # both models' values) are taken as the tensors are written (`measure`). The bounds
        # tolerate NaN/Inf.
        tuned = {bt.name: _of_float_dtype(self.model.get(bt.name, own_map=True), bt.name, model_at) for bt in inst.tensors}
        assert isinstance(space, ScaleSpace)
        rng = _instance_rng(self.options.seed, inst.id)
        factors = sample_factors(rng, inst.size, self.options.scale_low, self.options.scale_high, self.options.scale_law)
        if self.quantize == "pow2":
            exps = np.round(np.log2(factors)).astype(np.int64)
            lo, hi = _factor_bounds(self.model, inst, tuned, exps, self.options.half_subnormals == "round")
            ok = lo <= hi
            bounded = np.where(ok, np.clip(exps, lo, hi), 0)
            self._clamped[inst.id] = int((bounded != exps).sum())
            factors = np.exp2(bounded.astype(np.float64))
        transform = Transform(inst.id, factors=factors)
        detail = f"factors {factors.min():.3g}..{factors.max():.3g}"
        if (self.options.mix_vo and space.role == "vo") or (self.options.mix_qk and space.role == "qk"):
            make = _mixing_matrices if space.rope == "none" else _rope_mixing_matrices
            transform = Transform(inst.id, matrices=make(rng, inst, self.options))
            kind = "per-head mixing" if space.rope == "none" else "per-pair rotation and scale (RoPE)"
            detail = f"{kind}, condition <= {self.options.scale_high / self.options.scale_low:.3g}"
        self._scale_sums[inst.id] = [0.0, 0.0, 0.0]
        # distances filled in by `measure`
        return transform, InstanceReport(inst.id, f"scale-{space.role}", 0.0, 0.0, 0.0, detail)

    def measure(self, name: str, t: torch.Tensor) -> None:
        """Add the model tensor `name` (`t`, as stored) to the distances of the scale instances
        that bind it, reading its base counterpart. Called from the main thread as it reaches
        the tensor, which takes this work off the planner thread, protect's critical path (7B,
        six alternating pairs of `benchmarks/peak_rss_protect.py`: 43.7, 38.3, 37.2, 37.7, 37.9,
        37.9 s against 43.5, 42.2, 39.2, 40.4, 39.7, 38.7 s). The distance before (the
        differences' squares) doubles as the NaN/Inf check of both tensors' bound values (a NaN
        or Inf in either makes it non-finite): a tensor some instance binds whole is then
        checked."""
        bindings = [(inst, bt.binding) for inst in self.bound.by_tensor.get(name, ())
                    if inst.id in self.instances and isinstance(inst.space, ScaleSpace)
                    for bt in inst.tensors if bt.name == name]
        if not bindings:
            return
        model_at, base_at = str(self.model.folder), str(self.base.folder)
        _of_float_dtype(t, name, model_at)
        p = _of_float_dtype(self.base.get(self.names[name], own_map=True), self.names[name], base_at)
        for inst, binding in bindings:
            transform = self[inst.id]
            d = _scale_distance(t, p, binding, inst, transform)
            if not math.isfinite(sum(d)):
                _checked(t, name, model_at)  # raises for a NaN/Inf
                _checked(p, self.names[name], base_at)
                # finite values whose half-precision runs (or float32 squares) overflowed
                d = _scale_distance(t, p, binding, inst, transform, exact=True)
            sums = self._scale_sums[inst.id]
            for k in range(3):
                sums[k] += d[k]
        if any(binding.chunk is None for _, binding in bindings):
            self.checked.add(name)


def _scale_distance(t: torch.Tensor, p: torch.Tensor, binding: Binding, inst: SpaceInstance, transform: Transform,
                    exact: bool = False) -> tuple[float, float, float]:
    """``(||t - p||^2, ||transformed t - p||^2, ||p||^2)`` over one binding of a scale instance
    (its chunk of a fused tensor such as GPT-2's c_attn): `_scaled_distances` for factors, the
    mixing matrices applied in float32 (float64 weights: float64); in float64 with `exact`."""
    if transform.matrices is None:
        return _scaled_distances(axis_view(t, binding), axis_view(p, binding), binding,
                                 expand_factors(inst, transform.factors, binding.layout), exact)
    t_c, p_c = (x.to(torch.float64) if exact else _to_compute(x) for x in (t, p))
    new = apply_transform(t_c, binding, inst, transform)
    pv = axis_view(p_c, binding)
    return (float(((axis_view(t_c, binding) - pv) ** 2).sum()), float(((axis_view(new, binding) - pv) ** 2).sum()),
            float((pv**2).sum()))


def _feature_square_sums(pre: torch.Tensor | UnitParts, tuned: torch.Tensor | UnitParts,
                         exact: bool = False) -> tuple[float, float, float]:
    """`square_sums` (``||pre||^2, ||tuned||^2, ||pre - tuned||^2``) of two instances' unit
    features, part by part for `UnitParts`."""
    pairs = zip(pre.parts, tuned.parts) if isinstance(pre, UnitParts) else [(pre, tuned)]
    sums = [square_sums(p, t, exact) for p, t in pairs]  # type: ignore[union-attr]
    return sum(x[0] for x in sums), sum(x[1] for x in sums), sum(x[2] for x in sums)


def _available_device(name: str) -> torch.device:
    """`name` as a torch device (``auto``: cuda where torch sees a GPU, else cpu), refused
    (DeviceError) when this torch cannot use it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise DeviceError(
            f"device {name!r}: this torch ({torch.__version__}, CUDA build: {torch.version.cuda or 'no'}) "
            f"sees {torch.cuda.device_count()} CUDA device(s). Protect with --device cpu, or on a "
            "machine with an NVIDIA GPU and a CUDA build of torch."
        )
    return device


def _scaled_distances(t: torch.Tensor, p: torch.Tensor, binding: Binding, f: np.ndarray,
                      exact: bool = False) -> tuple[float, float, float]:
    """``(||t - p||^2, ||t * f - p||^2, ||p||^2)`` for factors `f` along the binding's axis
    (``1/f`` on an inverse binding), from per-index sums: no scaled copy of `t`, and the tensors
    (any dtype) are read a cache-sized chunk at a time, converted to float32 (float64 stays, and
    everything converts to float64 with `exact`). An index whose factor is 1 takes its distance
    from the differences themselves (no cancellation)."""
    fr = 1.0 / f if binding.inverse else f
    if (not exact and t.ndim == 2 and t.dtype in HALF_DTYPES and t.numel() >= SQUARES_EXACT_BELOW
            and _powers_of_two_in(t.dtype, fr)):
        factor = torch.from_numpy(fr).to(t.dtype)  # exact products in the stored dtype
        return _scaled_distances_half(t, p, factor.reshape(-1, 1) if binding.axis == 0 else factor.reshape(1, -1))
    axis = binding.axis if t.ndim > 1 else 0
    n = t.shape[axis]
    if axis == t.ndim - 1 and t.ndim > 1:  # units along the last axis (columns): sum over rows
        t2, p2, reduce = t.reshape(-1, n), p.reshape(-1, n), 0
    else:  # units along a leading axis: rows of everything after it (a copy only if not contiguous)
        t2, p2, reduce = t.movedim(axis, 0).reshape(n, -1), p.movedim(axis, 0).reshape(n, -1), 1
    wide = torch.float64 if exact or t.dtype == torch.float64 else torch.float32
    sums = torch.zeros(4, n, dtype=torch.float64)  # (t-p)^2, t.t, t.p, p.p per index
    step = max(1, (1 << 16) // max(1, t2.shape[1]))
    for start in range(0, t2.shape[0], step):
        ct, cp = t2[start : start + step].to(wide), p2[start : start + step].to(wide)
        diff = ct - cp
        part = torch.stack([(diff * diff).sum(reduce), (ct * ct).sum(reduce), (ct * cp).sum(reduce),
                            (cp * cp).sum(reduce)]).double()
        if reduce == 0:
            sums += part
        else:
            sums[:, start : start + step] = part
    d_r, tt_r, tp_r, pp_r = sums
    fr = torch.from_numpy(fr)
    after = torch.where(fr == 1.0, d_r, (fr * fr * tt_r - 2 * fr * tp_r + pp_r).clamp_min(0.0))
    return float(d_r.sum()), float(after.sum()), float(pp_r.sum())


def _scaled_distances_half(t: torch.Tensor, p: torch.Tensor, factor: torch.Tensor) -> tuple[float, float, float]:
    """`_scaled_distances` of a half-precision matrix and power-of-two factors (a column, one
    per row, or a row, one per column): the differences and the scaled differences are formed
    in the stored dtype a few rows at a time in reused buffers and summed as `square_sums`
    does (no float32 copy; 1.2-1.6x faster than the float32 per-index sums on a Llama-2-7B
    attention matrix, `benchmarks/transform_speed.py`)."""
    step = max(1, (1 << 20) // max(1, t.shape[1]))
    buf = torch.empty(min(step, t.shape[0]), t.shape[1], dtype=t.dtype)
    before = after = base = 0.0
    for start in range(0, t.shape[0], step):
        ct, cp = t[start : start + step], p[start : start + step]
        f = factor[start : start + step] if factor.shape[0] > 1 else factor
        part = buf[: len(ct)]
        before += runs_square_sum(torch.sub(ct, cp, out=part))
        after += runs_square_sum(torch.mul(ct, f, out=part).sub_(cp))
        base += runs_square_sum(cp)
    return before, after, base


def residual_anchors(bound: BoundModel, inst: SpaceInstance, names: dict[str, str]) -> list[BoundTensor]:
    """The residual instance's bindings on tensors that no other space touches (embeddings,
    norms, the biases of the residual writes) and that the base has: their unit features
    depend on the residual permutation alone, so they plan it (and an attacker matches it)
    without reading the whole model."""
    return [bt for bt in inst.tensors if len(bound.by_tensor.get(bt.name, ())) == 1 and bt.name in names]


def _plan_residual(
    model: Checkpoint, base: Checkpoint, bound: BoundModel, inst: SpaceInstance, names: dict[str, str],
    options: ProtectOptions,
) -> tuple[Transform, InstanceReport]:
    """The residual-stream permutation farthest from the base, planned on its anchor tensors
    (see `residual_anchors`), one tensor at a time (only the Gram matrix is kept)."""
    anchors = residual_anchors(bound, inst, names)
    acc = GramAccumulator(inst.size)
    for bt in anchors:
        tuned = _checked(model.get(bt.name), bt.name, str(model.folder))
        pre = _checked(base.get(names[bt.name]), names[bt.name], str(base.folder))
        acc.add(unit_features([(pre, bt.binding)]), unit_features([(tuned, bt.binding)]))
    model.release()
    base.release()
    solver = choose_solver(options.solver, inst.size)
    solver = "exact" if solver in ("block", "sparse") else solver  # they need the features; n is only d_model
    perm = farthest_from_gram(acc.gram, solver, _instance_rng(options.seed, inst.id))
    task2, after2, base2 = acc.distances(perm)
    moved = float((perm != np.arange(len(perm))).mean())
    detail = (f"{solver} solver on {len(anchors)} residual-only tensors, "
              f"{moved:.0%} dims moved, {len(inst.tensors)} tensors permuted")
    return Transform(inst.id, perm=perm), InstanceReport(inst.id, "residual", task2**0.5, after2**0.5, base2**0.5, detail)


def _transformed(
    ckpt: Checkpoint,
    bound: BoundModel,
    transforms: Mapping[str, Transform] | Sequence[Transform],
    *,
    inverse: bool = False,
    prune: tuple[float, int] | None = None,
    checked: Container[str] = (),
    measure: Callable[[str, torch.Tensor], None] | None = None,
) -> Callable[[str], torch.Tensor]:
    """``produce(name)`` for `rewrite_checkpoint`: the tensor with every transform applied.

    `transforms` in key order: a list, or a mapping by instance id (a `_Plan` plans each one
    when first looked up). ``prune=(rate, seed)`` zeroes a random fraction of each transformed
    tensor first. Tensors in `checked` (read and checked by planning, or by `measure`) are not
    checked again. `measure(name, t)` sees every tensor as stored, first.
    """
    by_id = transforms if isinstance(transforms, Mapping) else {t.instance_id: t for t in transforms}
    rank = {iid: k for k, iid in enumerate(by_id)}

    def produce(name: str) -> torch.Tensor:
        t = ckpt.get(name)
        if measure is not None:
            measure(name, t)
        todo = sorted(
            (
                (inst, bt.binding)
                for inst in bound.by_tensor.get(name, ())
                if inst.id in by_id
                for bt in inst.tensors
                if bt.name == name
            ),
            key=lambda ib: rank[ib[0].id],
            reverse=inverse,
        )
        if not todo:
            if t.dtype in FLOAT_DTYPES and not all_finite(t):
                raise NumericError(
                    f"{ckpt.folder}: tensor {name!r} has NaN/Inf values. Fix or re-export the checkpoint."
                )
            return t
        # in the stored dtype where that is exact (permutations, power-of-two scales): no
        # float32 round trip of every transformed tensor
        exact = all(_exact_in(t.dtype, by_id[inst.id]) for inst, _ in todo)  # plans what it needs
        if name not in checked:  # planning checked the tensors it read (dtype, NaN/Inf) already
            _checked(t, name, str(ckpt.folder))
        c = t if exact else _to_compute(t)
        if prune is not None and prune[0] > 0:
            gen = torch.Generator().manual_seed(int.from_bytes(hashlib.sha256(f"{prune[1]}|prune|{name}".encode()).digest()[:8], "little") >> 1)
            c = c * (torch.rand(c.shape, generator=gen) >= prune[0]).to(c.dtype)
        for inst, binding in todo:
            c = apply_transform(c, binding, inst, by_id[inst.id], inverse=inverse)
        return c.to(t.dtype)

    return produce


# ---- key files ------------------------------------------------------------------------------
def _write_key(path: Path, transforms: list[Transform], meta: dict[str, object]) -> None:
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    tensors = {}
    for t in transforms:
        if t.perm is not None:
            tensors[f"perm::{t.instance_id}"] = torch.from_numpy(t.perm.astype(np.int64))
        elif t.matrices is not None:
            tensors[f"mix::{t.instance_id}"] = torch.from_numpy(t.matrices.astype(np.float64))
        else:
            assert t.factors is not None
            tensors[f"scale::{t.instance_id}"] = torch.from_numpy(t.factors.astype(np.float64))
    meta = {**meta, "format": KEY_FORMAT, "order": [t.instance_id for t in transforms]}
    # One metadata entry: safetensors writes several in hash order, which would break
    # byte-identical keys for identical inputs.
    header = {"mergeshield_key": json.dumps(meta, sort_keys=True)}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        try:
            save_file(tensors, str(tmp), metadata=header)
        except SafetensorError as exc:  # safetensors reports I/O errors (a full disk) this way
            raise OSError(f"{tmp}: cannot write the key file ({exc})") from None
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _read_key(path: Path) -> tuple[list[Transform], dict[str, object]]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("mergeshield_key", "{}"))
            if meta.get("format") != KEY_FORMAT:
                raise KeyMismatchError(f"{path}: not a mergeshield key file (format {meta.get('format')!r}).")
            out = []
            for iid in meta["order"]:
                if f"perm::{iid}" in f.keys():
                    out.append(Transform(iid, perm=f.get_tensor(f"perm::{iid}").numpy()))
                elif f"mix::{iid}" in f.keys():
                    out.append(Transform(iid, matrices=f.get_tensor(f"mix::{iid}").numpy()))
                else:
                    out.append(Transform(iid, factors=f.get_tensor(f"scale::{iid}").numpy()))
    except (SafetensorError, OSError, KeyError, json.JSONDecodeError) as exc:
        raise KeyMismatchError(f"{path}: cannot be read as a mergeshield key file ({exc}).") from None
    for t in out:  # a damaged key would restore wrong weights with no error: refuse it here
        what = _damage(t)
        if what:
            raise KeyMismatchError(
                f"{path}: the key is damaged: its transform for {t.instance_id!r} {what}. Use an intact "
                "copy of the key written when the model was protected."
            )
    return out, meta


def _damage(t: Transform) -> str:
    """What is wrong with a transform read from a key ('' if nothing)."""
    if t.perm is not None:
        if not np.array_equal(np.sort(t.perm), np.arange(len(t.perm))):
            return f"is not a permutation of 0..{len(t.perm) - 1}"
        return ""
    values = t.factors if t.factors is not None else t.matrices
    assert values is not None
    if not np.all(np.isfinite(values)):
        return "holds NaN or Inf values"
    if t.factors is not None and np.any(t.factors == 0):
        return "holds a zero scale factor"
    if t.matrices is not None and np.any(np.abs(np.linalg.det(t.matrices)) < 1e-300):
        return "holds a singular mixing matrix"
    return ""


# ---- public API -----------------------------------------------------------------------------
def protect(
    model_dir: str | os.PathLike[str],
    base_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    options: ProtectOptions | None = None,
    *,
    key_out: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> ProtectReport:
    """Write a protected copy of a fine-tuned checkpoint.

    Args:
        model_dir: the fine-tuned Hugging Face model folder (never modified).
        base_dir: the pretrained checkpoint it was fine-tuned from.
        out_dir: where the protected folder appears (only once complete).
        options: which transforms, seed, scale range and law.
        key_out: optional path of a key file from which `unprotect` restores the original;
            refused inside `out_dir` (the key must never ship with the model).
        overwrite: replace an existing `out_dir`.
        progress: show progress bars.

    Returns:
        A report with per-layer distances to the base, the output fingerprint and notes.

    Example:
        >>> report = protect("ft", "base", "ft-protected", ProtectOptions(seed=1))  # doctest: +SKIP
        >>> print(report.table())                                                 # doctest: +SKIP
    """
    options = options or ProtectOptions()
    model_dir, base_dir, out = Path(model_dir), Path(base_dir), Path(out_dir)
    check_output_path(out, [model_dir, base_dir], overwrite)
    key_path = Path(key_out) if key_out is not None else None
    if key_path is not None:
        kr, outr = key_path.resolve(), out.resolve()
        if kr == outr or outr in kr.parents or kr.parent in (model_dir.resolve(), base_dir.resolve()):
            raise OutputPathError(
                f"key file {key_path} would be written inside the protected output or an input "
                "folder. Keep the key apart from the model you publish: choose another --key-out."
            )
        if key_path.exists() and not overwrite:
            raise OutputPathError(f"key file {key_path} exists; choose another path or pass --overwrite.")
    with Checkpoint(model_dir) as model, Checkpoint(base_dir) as base:
        bound = bind_checkpoint(model)
        names = _check_base(model, base, bound)
        # refuses impossible options before writing; planning stops before the inputs close
        with _Plan(model, base, bound, names, options) as plan:
            produce = _transformed(model, bound, plan, prune=(options.prune_rate, options.seed), checked=plan.checked,
                                   measure=plan.measure)
            meta = {
                "family": bound.family.name,
                "model_type": model.model_type,
                "options": options.model_dump(),
                "device": str(plan.device),  # where the costs were multiplied (`auto` resolved)
            }

            def commit_key(fp: str) -> None:
                if key_path is not None:
                    _write_key(key_path, plan.finish()[0], {**meta, "fingerprint": fp, "fingerprint_hash": FINGERPRINT_HASH})

            planned = plan.read_names

            def prefetch(batch: list[str]) -> None:
                model.prefetch(batch)
                base.prefetch([names[n] for n in batch if n in planned and n in names])
                plan.ahead(batch)

            fingerprint = rewrite_checkpoint(
                model, out, produce, overwrite=overwrite, progress=progress, desc="protecting",
                before_commit=commit_key, inputs=[base], prefetch=prefetch,
            )
            _, reports, notes = plan.finish()
    ratio = _task_vector_ratio(reports)
    if ratio > 0.5:
        notes.append(
            f"WARNING: the task vector is {ratio:.0%} of the base weights' norm in the "
            "transformed layers: implausibly large for a fine-tune. Is --base really this model's "
            "pretrained checkpoint?"
        )
    if options.prune_rate > 0:
        notes.append(
            f"pruning zeroed about {options.prune_rate:.0%} of every transformed tensor: the protected "
            "model no longer computes exactly the same function (verify will say so); measure "
            "its accuracy"
        )
    return ProtectReport(out, bound.family.name, fingerprint, reports, key_path, notes)


def _task_vector_ratio(reports: list[InstanceReport]) -> float:
    tau2 = sum(r.task_norm**2 for r in reports)
    pre2 = sum(r.base_norm**2 for r in reports)
    return (tau2 / pre2) ** 0.5 if pre2 else 0.0


def unprotect(
    protected_dir: str | os.PathLike[str],
    key: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    progress: bool = True,
) -> str:
    """Restore the original weights from a protected checkpoint and its key file.

    Exact for permutations and power-of-two scales; within float rounding for other scales.

    Raises:
        KeyMismatchError: the key's fingerprint does not match the protected weights (wrong
            key, another model, or the protected files were changed).

    Returns:
        The fingerprint of the restored weights.
    """
    protected_dir, out = Path(protected_dir), Path(out_dir)
    check_output_path(out, [protected_dir], overwrite)
    transforms, meta = _read_key(Path(key))
    with Checkpoint(protected_dir) as ckpt:
        if meta.get("model_type") != ckpt.model_type:
            raise KeyMismatchError(
                f"key {key} was made for a {meta.get('model_type')!r} model, but {protected_dir} is "
                f"{ckpt.model_type!r}. Use the key written when this model was protected."
            )
        bound = bind_checkpoint(ckpt)
        known = {inst.id for inst in bound.instances}
        unknown = [t.instance_id for t in transforms if t.instance_id not in known]
        if unknown:
            raise KeyMismatchError(f"key {key} names layers this model lacks: {unknown[:4]}.")
        algorithm = str(meta.get("fingerprint_hash", "sha256"))  # keys before xxh3 name none
        if algorithm not in FINGERPRINT_HASHES:
            raise KeyMismatchError(
                f"key {key} fingerprints with {algorithm!r}, which this mergeshield does not know "
                f"(it knows {sorted(FINGERPRINT_HASHES)}): the key comes from a newer mergeshield; upgrade it."
            )
        sizes = {inst.id: inst for inst in bound.instances}
        wrong = [t.instance_id for t in transforms if _key_size(t) != _instance_size(sizes[t.instance_id], t)]
        if wrong:
            raise KeyMismatchError(
                f"key {key} does not belong to {protected_dir}: its transforms for {wrong[:4]} have other sizes "
                "than this model's layers. Use the key written when this exact model was protected."
            )
        # The fingerprint is checked on the same pass that restores (each protected tensor is
        # hashed as it is read, before it is transformed), not on a pass of its own: a mismatch
        # abandons the restored output before it appears.
        inverse = _transformed(ckpt, bound, transforms, inverse=True)
        digests: dict[str, bytes] = {}

        def produce(name: str) -> torch.Tensor:
            digests[name] = tensor_digest(name, ckpt.get(name), algorithm)
            return inverse(name)

        def check(_restored: str) -> None:
            actual = fingerprint_of(digests, algorithm)
            if actual != meta.get("fingerprint"):
                raise KeyMismatchError(
                    f"key {key} does not belong to {protected_dir}: the protected weights' fingerprint "
                    f"is {actual[:16]}..., the key expects {str(meta.get('fingerprint'))[:16]}.... Use the "
                    "key written when this exact model was protected (the weights must be unchanged)."
                )

        return rewrite_checkpoint(ckpt, out, produce, overwrite=overwrite, progress=progress, desc="restoring",
                                  before_commit=check)


def _key_size(t: Transform) -> int:
    if t.perm is not None:
        return len(t.perm)
    if t.factors is not None:
        return t.factors.size
    assert t.matrices is not None
    return t.matrices.shape[0] * t.matrices.shape[1]


def _instance_size(inst: SpaceInstance, t: Transform) -> int:
    """What `_key_size` must be for this model: units, free factors, or heads x head_dim."""
    return inst.heads * inst.head_dim if t.matrices is not None else inst.size


