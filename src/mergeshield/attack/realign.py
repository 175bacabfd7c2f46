"""Adaptive attacks: undo function-preserving protection by realigning to the public base model.

The free-rider has the protected model and the pretrained base, never the key. Fine-tuned
weights stay close to the base, so each symmetry can be estimated by matching against it:

- ``permutation``: per MLP layer, the permutation that brings the protected units *closest* to
  the base units (the PaRaMS assignment in the other direction; Ainsworth et al.'s weight
  matching, "Git Re-Basin", ICLR 2023, arXiv 2209.04836).
- ``scale``: per attention dimension, least squares against the base: for rows multiplied by
  ``s``, ``s ~ <p, b> / <b, b>``; for rows divided by ``s``, ``1/s ~ <p, b> / <b, b>``, over the
  entries that are not exactly zero (so pruning does not bias the estimate). The two
  estimates are combined in log space, respecting RoPE pairs and GQA groups (rows that share a
  factor are pooled).
- ``residual``: the one permutation of the hidden dimension (``--permute-residual``), by weight
  matching on the tensors only the residual stream touches (embeddings, norms): first, since
  every other estimate compares coordinates of the residual stream with the base's.
- ``heads``: per layer, the order of attention heads, by how much of each base head's weights
  lies outside the row space of each protected head (invariant to any mixing inside a head).
- ``matrix``: per attention space, a general matrix per K/V head by least squares (undoes
  ``mix_vo`` / ``mix_qk`` and diagonal scales alike; RoPE-compatible where RoPE applies).
- ``fill``: entries that are exactly zero in the protected model but not in the base (pruning
  defenses) are filled from the base once aligned.

Every estimate is applied as a function-preserving transform itself, so the attacked model
computes the same function as the protected one (up to the filled entries) while lying next to
the base again, where merging works. See ``../shared/PAPER.md``, "Known threats".
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from mergeshield.core.assignment import GramAccumulator, closest_permutation, min_cost_assignment, unit_features
from mergeshield.core.transforms import Transform, apply_transform, axis_view, expand_factors
from mergeshield.io.checkpoint import Checkpoint, check_output_path
from mergeshield.symmetry.spec import BoundTensor, HeadPermutationSpace, PermutationSpace, ScaleSpace, SpaceInstance

__all__ = ["ATTACKS", "AttackReport", "attack", "estimate_head_permutation", "estimate_permutation", "estimate_scales"]

ATTACKS: dict[str, tuple[str, ...]] = {
    "permutation": ("permutation",),
    "scale": ("scale",),
    "heads": ("heads",),
    "residual": ("residual",),
    "realign": ("residual", "heads", "scale", "permutation"),
    "realign+fill": ("residual", "heads", "scale", "permutation", "fill"),
    "realign-matrix": ("residual", "heads", "matrix", "permutation"),
    "realign-matrix+fill": ("residual", "heads", "matrix", "permutation", "fill"),
}
"""Registered attacks: name -> the steps it runs, in order. Head order first (protect permutes
heads last, and scales can only be matched once heads are back in place; the head matching is
invariant to any mixing inside a head); then per-dimension scales, or with ``matrix`` a general
per-head matrix for every attention space (covers diagonal scales, ``mix_vo`` and ``mix_qk``;
projected onto RoPE-compatible matrices where RoPE applies); MLP permutations touch other
tensors. On a release without head permutation the head step finds (and applies) the identity;
the residual step likewise. The residual step comes first of all: until it is undone, every
other tensor's rows or columns sit in shuffled residual coordinates."""


@dataclass
class AttackReport:
    out: Path
    attack: str
    transforms: list[Transform] = field(default_factory=list)
    filled: int = 0
    """Entries filled from the base (``fill`` step)."""
    steps: dict[str, str] = field(default_factory=dict)
    """Instance id -> the step that estimated its transform."""
    instances: dict[str, SpaceInstance] = field(default_factory=dict)
    """Instance id -> the space instance (sizes, for measuring recovery)."""


def estimate_permutation(inst: SpaceInstance, prot: dict[str, torch.Tensor], pre: dict[str, torch.Tensor]) -> Transform:
    """Weight matching: the gather index bringing protected units closest to the base's."""
    f_prot = unit_features([(prot[bt.name], bt.binding) for bt in inst.tensors])
    f_pre = unit_features([(pre[bt.name], bt.binding) for bt in inst.tensors])
    return Transform(inst.id, perm=closest_permutation(f_pre, f_prot))


def estimate_residual_permutation(
    inst: SpaceInstance, anchors: list[BoundTensor], prot_ckpt: Checkpoint, base: Checkpoint, names: dict[str, str]
) -> Transform:
    """Weight matching of the residual stream's dimensions on its anchor tensors (see
    `mergeshield.protect.residual_anchors`), streamed: only the Gram matrix is kept."""
    acc = GramAccumulator(inst.size)
    for bt in anchors:
        acc.add(unit_features([(base.get(names[bt.name]), bt.binding)]),
                unit_features([(prot_ckpt.get(bt.name), bt.binding)]))
    return Transform(inst.id, perm=min_cost_assignment(-acc.gram))


def estimate_head_permutation(inst: SpaceInstance, prot: dict[str, torch.Tensor], pre: dict[str, torch.Tensor]) -> Transform:
    """Weight matching of whole heads, invariant to any invertible mixing inside a head (so to
    per-dimension scales too): base head ``h`` is paired with protected head ``g`` by how much
    of ``h``'s weights lies outside the row space of ``g``'s (the least-squares residual of
    ``min_A ||B_h - A P_g||``), summed over the bound matrices; biases carry no such signal."""
    cost = torch.zeros(inst.size, inst.size, dtype=torch.float64)
    for bt in inst.tensors:
        if prot[bt.name].dim() < 2:
            continue
        blocks = []
        for src in (prot, pre):
            t = axis_view(src[bt.name], bt.binding).movedim(bt.binding.axis, 0).double()
            blocks.append(t.reshape(inst.size, t.shape[0] // inst.size, -1))  # (heads, rows, rest)
        p, b = blocks
        basis = torch.linalg.qr(p.transpose(1, 2)).Q  # (heads, rest, rows): row space of each protected head
        # ||B_h Q_g||^2 for every pair (h, g): the part of base head h inside protected head g's span
        inside = torch.einsum("hrc,gck->hgrk", b, basis).pow(2).sum((2, 3))
        cost += (b.pow(2).sum((1, 2))[:, None] - inside)
    # gather index: new head i = protected head perm[i], chosen to sit where base head i sits
    return Transform(inst.id, perm=min_cost_assignment(cost.numpy()))


def estimate_scales(inst: SpaceInstance, prot: dict[str, torch.Tensor], pre: dict[str, torch.Tensor]) -> Transform:
    """Least-squares scale recovery; returns the transform that *undoes* the estimated scales."""
    log_sum = np.zeros(inst.size)
    weight = np.zeros(inst.size)
    for bt in inst.tensors:
        p = axis_view(prot[bt.name], bt.binding).movedim(bt.binding.axis, 0)
        b = axis_view(pre[bt.name], bt.binding).movedim(bt.binding.axis, 0)
        p, b = p.reshape(p.shape[0], -1).double(), b.reshape(b.shape[0], -1).double()  # (rows, rest)
        b = b * (p != 0)  # entries pruned to zero carry no information about the scale
        owner = expand_factors(inst, np.arange(inst.size, dtype=np.float64), bt.binding.layout).astype(np.int64)
        num = np.zeros(inst.size)
        den = np.zeros(inst.size)
        np.add.at(num, owner, (p * b).sum(1).numpy())
        np.add.at(den, owner, (b * b).sum(1).numpy())
        ok = (den > 0) & (num > 0)
        est = np.where(ok, num / np.where(ok, den, 1), 1.0)  # s for primal rows, 1/s for inverse rows
        w = np.where(ok, den, 0.0)  # rows with more energy in the base count more
        log_sum += w * (-np.log(est) if bt.binding.inverse else np.log(est))
        weight += w
    s = np.exp(np.where(weight > 0, log_sum / np.where(weight > 0, weight, 1), 0.0))
    return Transform(inst.id, factors=1.0 / s)


def estimate_mixing(inst: SpaceInstance, prot: dict[str, torch.Tensor], pre: dict[str, torch.Tensor]) -> Transform:
    """Least squares for a general invertible matrix per K/V head (covers diagonal scales too).

    From the primal side (V or Q rows and bias, ``P = M V``): ``A = B P^T (P P^T)^-1 ~ M^-1``
    with the base's ``B ~ V``; the query heads of a GQA group all count for their K/V head.
    Under RoPE the estimate is projected onto scaled rotations of each rotated pair (the only
    matrices that commute with RoPE), so that applying it keeps the function. Returns the
    transform that undoes it (``matrices = A``).
    """
    ps, bs = [], []
    d = inst.head_dim
    for bt in inst.tensors:
        if bt.binding.inverse:
            continue
        for src, out in ((prot, ps), (pre, bs)):
            t = axis_view(src[bt.name], bt.binding).movedim(bt.binding.axis, 0).double()
            group = inst.query_heads // inst.heads if bt.binding.layout == "q" else 1
            t = t.reshape(inst.heads, group, d, -1).transpose(1, 2)  # (heads, d, group, cols)
            out.append(t.reshape(inst.heads, d, -1))
    p, b = torch.cat(ps, dim=2), torch.cat(bs, dim=2)
    gram = p @ p.transpose(1, 2)  # (heads, d, d)
    a = torch.linalg.solve(gram, (b @ p.transpose(1, 2)).transpose(1, 2)).transpose(1, 2)
    rope = inst.space.rope if isinstance(inst.space, ScaleSpace) else "none"
    if rope != "none":  # nearest s R(phi) on each pair (i, j): the Frobenius projection
        half = torch.arange(d // 2)
        i, j = (half, half + d // 2) if rope == "rotate_half" else (2 * half, 2 * half + 1)
        c = (a[:, i, i] + a[:, j, j]) / 2
        sn = (a[:, j, i] - a[:, i, j]) / 2
        a = torch.zeros_like(a)
        a[:, i, i], a[:, j, j], a[:, j, i], a[:, i, j] = c, c, sn, -sn
    return Transform(inst.id, matrices=a.numpy())


def attack(
    protected_dir: str | os.PathLike[str],
    base_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    name: str = "realign",
    *,
    overwrite: bool = False,
    progress: bool = True,
) -> AttackReport:
    """Run an attack on a protected checkpoint, reading only it and the base, and save the result.

    Args:
        protected_dir: the protected model (as published).
        base_dir: the public pretrained checkpoint.
        out_dir: where the attacked (realigned) model is written.
        name: one of `ATTACKS`.

    Returns:
        The estimated transforms (as applied to the protected model) and the fill count.
    """
    from mergeshield.io.checkpoint import rewrite_checkpoint
    from mergeshield.protect import _check_base, _transformed, bind_checkpoint, residual_anchors

    if name not in ATTACKS:
        raise ValueError(f"unknown attack {name!r}; choose one of {sorted(ATTACKS)}")
    steps = ATTACKS[name]
    out = Path(out_dir)
    check_output_path(out, [Path(protected_dir), Path(base_dir)], overwrite)
    report = AttackReport(out, name)
    with Checkpoint(protected_dir) as prot_ckpt, Checkpoint(base_dir) as base:
        bound = bind_checkpoint(prot_ckpt)
        names = _check_base(prot_ckpt, base, bound)
        undone: dict[str, Transform] = {}  # residual and head estimates, applied before later steps

        def current(tensor: str) -> torch.Tensor:
            """The protected tensor with the residual and head permutations estimated so far undone."""
            t = prot_ckpt.get(tensor).double()
            for inst in sorted(bound.by_tensor.get(tensor, ()), key=lambda i: not i.model_scoped):
                if inst.id in undone:
                    for bt in inst.tensors:
                        if bt.name == tensor:
                            t = apply_transform(t, bt.binding, inst, undone[inst.id])
            return t

        def step_of(inst: SpaceInstance) -> str:
            if inst.model_scoped:
                return "residual"
            if isinstance(inst.space, HeadPermutationSpace):
                return "heads"
            if isinstance(inst.space, PermutationSpace):
                return "permutation"
            assert isinstance(inst.space, ScaleSpace)
            return "matrix" if "matrix" in steps else "scale"

        todo = [(step, inst) for step in steps for inst in bound.instances if step_of(inst) == step]
        for step, inst in tqdm(todo, desc=f"attack ({name})", unit="layer", disable=not progress):
            if step == "residual":
                transform = estimate_residual_permutation(inst, residual_anchors(bound, inst, names), prot_ckpt,
                                                          base, names)
            else:
                prot = {bt.name: current(bt.name) for bt in inst.tensors}
                pre = {bt.name: base.get(names[bt.name]).double() for bt in inst.tensors}
                estimate = {"heads": estimate_head_permutation, "permutation": estimate_permutation,
                            "matrix": estimate_mixing, "scale": estimate_scales}[step]
                transform = estimate(inst, prot, pre)
            if step in ("residual", "heads"):
                undone[inst.id] = transform
            report.transforms.append(transform)
            report.steps[inst.id] = step
            report.instances[inst.id] = inst
            prot_ckpt.release()
            base.release()
        realigned = _transformed(prot_ckpt, bound, report.transforms)
        produce: Callable[[str], torch.Tensor] = realigned
        if "fill" in steps:
            def produce(name_: str) -> torch.Tensor:
                t = realigned(name_)
                if name_ in names and t.is_floating_point():
                    b = base.get(names[name_]).to(t.dtype)
                    holes = (t == 0) & (b != 0)
                    report.filled += int(holes.sum())
                    t = torch.where(holes, b, t)
                return t

        rewrite_checkpoint(prot_ckpt, out, produce, overwrite=overwrite, progress=progress, desc="writing", inputs=[base])
    return report


def recovery(key_path: str | os.PathLike[str], report: AttackReport) -> dict[str, float]:
    """Measure an attack against the true key (evaluation only: the attack never reads it).

    Returns:
        ``perm_units_restored``: fraction of MLP units put back in their original place;
        ``heads_restored``: the same for attention heads (a release without head permutation
        counts as the identity, so a head step that wrongly moves heads scores below 1);
        ``residual_restored``: the same for the residual stream's dimensions;
        ``scale_rel_err_median`` / ``scale_rel_err_max``: relative error of recovered factors.
    """
    from mergeshield.protect import _read_key

    truth = {t.instance_id: t for t in _read_key(Path(key_path))[0]}
    kinds = ("permutation", "heads", "residual")
    restored, total, errs, mix_errs = dict.fromkeys(kinds, 0), dict.fromkeys(kinds, 0), [], []
    for est in report.transforms:
        true = truth.get(est.instance_id)
        if est.perm is not None:
            # protected[i] = ft[true[i]]; attacked[i] = protected[est[i]] = ft[true[est[i]]]
            true_perm = true.perm if true is not None and true.perm is not None else np.arange(len(est.perm))
            kind = report.steps.get(est.instance_id, "permutation")
            restored[kind] += int((true_perm[est.perm] == np.arange(len(est.perm))).sum())
            total[kind] += len(est.perm)
            continue
        if true is None:
            continue
        elif est.factors is not None and true.factors is not None:
            errs.append(np.abs(true.factors * est.factors - 1.0))  # est holds 1/s_hat
        elif est.matrices is not None:
            # est holds A ~ M^-1; the residual of A M from the identity, per head
            if true.matrices is not None:
                true_m = true.matrices
            else:  # diagonal scales, expanded over RoPE pairs, as a matrix per K/V head
                assert true.factors is not None
                f = expand_factors(report.instances[est.instance_id], true.factors, "kv")
                true_m = np.stack([np.diag(x) for x in f.reshape(est.matrices.shape[0], -1)])
            resid = np.einsum("hij,hjk->hik", est.matrices, true_m) - np.eye(est.matrices.shape[1])
            mix_errs.append(np.linalg.norm(resid, axis=(1, 2)) / np.sqrt(est.matrices.shape[1]))
    out: dict[str, float] = {}
    if total["permutation"]:
        out["perm_units_restored"] = restored["permutation"] / total["permutation"]
    if total["heads"]:
        out["heads_restored"] = restored["heads"] / total["heads"]
    if total["residual"]:
        out["residual_restored"] = restored["residual"] / total["residual"]
    if mix_errs:
        out["matrix_rel_err_median"] = float(np.median(np.concatenate(mix_errs)))
    if errs:
        e = np.concatenate(errs)
        out["scale_rel_err_median"] = float(np.median(e))
        out["scale_rel_err_max"] = float(e.max())
    return out
