"""Adaptive attacks: realignment fully undoes PaRaMS without pruning; what pruning changes."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from tiny_models import TINY

from mergeshield import ProtectOptions, make_method, merge_checkpoints, protect, verify
from mergeshield.attack import ATTACKS, attack, recovery
from mergeshield.io.checkpoint import Checkpoint

FAMILIES = sorted(TINY)


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    ckpt = Checkpoint(folder)
    return {n: ckpt.get(n).double() for n in ckpt.names if ckpt.get(n).is_floating_point()}


def _dist(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return sum(float((a[n] - b[n]).norm() ** 2) for n in a) ** 0.5


def _assert_realigned(ft: Path, tmp_path: Path, rec: dict[str, float]) -> None:
    """Scales recovered, the attacked model (``a``) the same function as the fine-tune and back
    next to it, compared with the protected release (``p``)."""
    assert rec["scale_rel_err_median"] < 0.02 and rec["scale_rel_err_max"] < 0.2, rec
    assert verify(ft, tmp_path / "a", rtol=1e-4).equivalent
    w_ft, w_p, w_a = _weights(ft), _weights(tmp_path / "p"), _weights(tmp_path / "a")
    assert _dist(w_a, w_ft) < 0.05 * _dist(w_p, w_ft)


@pytest.mark.parametrize("family", FAMILIES)
def test_realignment_fully_recovers_unpruned_protection(tiny_pair, tmp_path, family):
    base, ft, _ = tiny_pair(family)
    protect(ft, base, tmp_path / "p", ProtectOptions(seed=5), key_out=tmp_path / "key", progress=False)
    report = attack(tmp_path / "p", base, tmp_path / "a", "realign", progress=False)
    rec = recovery(tmp_path / "key", report)
    assert rec["perm_units_restored"] == 1.0
    assert rec.get("residual_restored", 1.0) == 1.0, rec  # no residual permutation: the step finds none
    _assert_realigned(ft, tmp_path, rec)


def test_attacked_merge_returns_to_the_unprotected_merge(tiny_pair, tmp_path):
    base, ft, ft2 = tiny_pair("llama")
    protect(ft, base, tmp_path / "p", progress=False)
    attack(tmp_path / "p", base, tmp_path / "a", "realign", progress=False)
    m = make_method("task_arithmetic", lam=0.8)
    for name, victim in (("plain", ft), ("prot", tmp_path / "p"), ("att", tmp_path / "a")):
        merge_checkpoints(base, [victim, ft2], tmp_path / f"m_{name}", m, progress=False)
    plain, prot, att = (_weights(tmp_path / f"m_{n}") for n in ("plain", "prot", "att"))
    assert _dist(att, plain) < 0.05 * _dist(prot, plain)


def test_each_attack_step_alone_recovers_only_its_part(tiny_pair, tmp_path):
    base, ft, _ = tiny_pair("qwen2")
    protect(ft, base, tmp_path / "p", key_out=tmp_path / "key", progress=False)
    rp = recovery(tmp_path / "key", attack(tmp_path / "p", base, tmp_path / "ap", "permutation", progress=False))
    rs = recovery(tmp_path / "key", attack(tmp_path / "p", base, tmp_path / "as", "scale", progress=False))
    assert set(rp) == {"perm_units_restored"} and set(rs) == {"scale_rel_err_median", "scale_rel_err_max"}


def test_pruning_leaves_holes_that_fill_recovers_partly(tiny_pair, tmp_path):
    base, ft, _ = tiny_pair("llama")
    protect(ft, base, tmp_path / "p", ProtectOptions(prune_rate=0.3), key_out=tmp_path / "key", progress=False)
    assert not verify(ft, tmp_path / "p").equivalent  # pruning changes the function, honestly
    plain = attack(tmp_path / "p", base, tmp_path / "a", "realign", progress=False)
    filled = attack(tmp_path / "p", base, tmp_path / "af", "realign+fill", progress=False)
    assert recovery(tmp_path / "key", plain)["perm_units_restored"] > 0.9  # pruning does not stop matching
    assert filled.filled > 0
    w_ft, w_b = _weights(ft), _weights(base)
    from mergeshield.io.naming import match_names

    names = match_names(list(w_ft), list(w_b))
    w_b = {n: w_b[names[n]] for n in w_ft if n in names}
    w_ft = {n: w_ft[n] for n in w_b}
    tau = _dist(w_ft, w_b)
    d_plain = _dist({n: _weights(tmp_path / "a")[n] for n in w_ft}, w_ft)
    d_fill = _dist({n: _weights(tmp_path / "af")[n] for n in w_ft}, w_ft)
    # filling from the base puts the attacked model far closer to the fine-tune than zeros do,
    # but the pruned part of the task vector is gone for good
    assert d_fill < 0.5 * d_plain
    assert 0.2 * tau < d_fill < 0.9 * tau


def test_attack_never_reads_the_key(tiny_pair, tmp_path):
    base, ft, _ = tiny_pair("gpt2")
    protect(ft, base, tmp_path / "p", key_out=tmp_path / "key", progress=False)
    opened: list[str] = []
    folders: list[Path] = []

    def hook(event: str, args: tuple) -> None:
        if event == "open" and isinstance(args[0], str | bytes | Path):
            opened.append(str(args[0]))

    import mergeshield.io.checkpoint as io

    real_init = io.Checkpoint.__init__

    def spy(self, folder):  # type: ignore[no-untyped-def]
        folders.append(Path(folder).resolve())
        real_init(self, folder)

    io.Checkpoint.__init__ = spy  # type: ignore[method-assign]
    sys.addaudithook(hook)
    try:
        attack(tmp_path / "p", base, tmp_path / "a", "realign+fill", progress=False)
    finally:
        io.Checkpoint.__init__ = real_init  # type: ignore[method-assign]
    assert set(folders) == {(tmp_path / "p").resolve(), Path(base).resolve()}
    assert not [p for p in opened if "key" in Path(p).name]


def test_registry_lists_the_attacks():
    assert {"permutation", "scale", "realign", "realign+fill"} <= set(ATTACKS)
    with pytest.raises(ValueError, match="unknown attack"):
        attack("x", "y", "z", "nope")


def test_key_describes_exactly_what_was_applied(tiny_pair, tmp_path):
    """Each factor is applied once (a fused tensor bound twice must not be scaled twice)."""
    from mergeshield.core.transforms import axis_view, expand_factors
    from mergeshield.protect import _read_key, bind_checkpoint

    for family in ("gpt2", "llama", "clip"):
        base, ft, _ = tiny_pair(family)
        out = tmp_path / family
        protect(ft, base, out, key_out=tmp_path / f"{family}.key", progress=False)
        key = {t.instance_id: t for t in _read_key(tmp_path / f"{family}.key")[0]}
        p_ck, f_ck = Checkpoint(out), Checkpoint(ft)
        for inst in bind_checkpoint(p_ck).instances:
            if inst.id not in key:  # head and residual permutations: off by default, so not applied
                assert "heads" in inst.id or inst.id == "residual"
                continue
            t = key[inst.id]
            for bt in inst.tensors:
                p = axis_view(p_ck.get(bt.name).double(), bt.binding).movedim(bt.binding.axis, 0)
                f = axis_view(f_ck.get(bt.name).double(), bt.binding).movedim(bt.binding.axis, 0)
                if t.perm is not None:
                    torch.testing.assert_close(p, f[torch.from_numpy(t.perm)], msg=bt.name)
                else:
                    s = expand_factors(inst, t.factors, bt.binding.layout)
                    s = 1 / s if bt.binding.inverse else s
                    shape = (-1,) + (1,) * (f.dim() - 1)
                    torch.testing.assert_close(p, f * torch.from_numpy(s).reshape(shape), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
def test_vo_mixing_beats_diagonal_realignment_but_not_matrix_least_squares(tiny_pair, tmp_path, family):
    base, ft, _ = tiny_pair(family)
    protect(ft, base, tmp_path / "p", ProtectOptions(seed=2, mix_vo=True), key_out=tmp_path / "key", progress=False)
    assert verify(ft, tmp_path / "p", rtol=1e-4).equivalent
    attack(tmp_path / "p", base, tmp_path / "diag", "realign", progress=False)
    rec = recovery(tmp_path / "key", attack(tmp_path / "p", base, tmp_path / "mat", "realign-matrix", progress=False))
    assert rec["matrix_rel_err_median"] < 0.1
    assert verify(ft, tmp_path / "mat", rtol=1e-4).equivalent
    w_ft, w_p = _weights(ft), _weights(tmp_path / "p")
    vo = [n for n in w_ft if any(k in n for k in ("v_proj", "o_proj", "value", "attention.output.dense", "c_attn", "attn.c_proj"))
          and n.endswith("weight")]
    sub = lambda w: {n: w[n] for n in vo}  # noqa: E731
    d_diag = _dist(sub(_weights(tmp_path / "diag")), sub(w_ft))
    d_mat = _dist(sub(_weights(tmp_path / "mat")), sub(w_ft))
    d_prot = _dist(sub(w_p), sub(w_ft))
    assert d_diag > 0.3 * d_prot  # a diagonal least-squares fit cannot undo a rotation
    assert d_mat < 0.1 * d_prot  # a per-head matrix fit can
    from mergeshield import unprotect

    unprotect(tmp_path / "p", tmp_path / "key", tmp_path / "back", progress=False)
    back = _weights(tmp_path / "back")
    for n in w_ft:
        torch.testing.assert_close(back[n], w_ft[n], rtol=1e-4, atol=1e-5)  # mixing: float32 rounding


@pytest.mark.parametrize(("flag", "dtype"), [("mix_vo", torch.bfloat16), ("mix_qk", torch.float16)])
def test_mixing_is_refused_for_half_precision(tmp_path, flag, dtype):
    from tiny_models import build, save

    from mergeshield.errors import NumericError

    base = build("llama", 0)
    save(base, tmp_path / "base", dtype=dtype)
    save(build("llama", 1, finetune_of=base), tmp_path / "ft", dtype=dtype)
    cli_flag = "--" + flag.replace("_", "-")
    with pytest.raises(NumericError, match=f"{flag}.*float32 copy.*{cli_flag}"):
        protect(tmp_path / "ft", tmp_path / "base", tmp_path / "out", ProtectOptions(**{flag: True}), progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("family", FAMILIES)
def test_realignment_recovers_head_permutation_under_scales(tiny_pair, tmp_path, family):
    base, ft, _ = tiny_pair(family)
    prep = protect(ft, base, tmp_path / "p", ProtectOptions(seed=5, permute_heads=True), key_out=tmp_path / "key", progress=False)
    moved = any(r.kind == "heads" and ", 0% heads" not in r.detail for r in prep.instances)
    assert moved or family == "qwen2"  # qwen2's tiny model has one K/V head
    report = attack(tmp_path / "p", base, tmp_path / "a", "realign", progress=False)
    rec = recovery(tmp_path / "key", report)
    assert rec["heads_restored"] == 1.0 and rec["perm_units_restored"] == 1.0, rec
    _assert_realigned(ft, tmp_path, rec)
    # without the head step, the scales are matched against the wrong heads
    blind = recovery(tmp_path / "key", attack(tmp_path / "p", base, tmp_path / "s", "scale", progress=False))
    assert (blind["scale_rel_err_max"] > 0.2) == moved, blind


@pytest.mark.parametrize("family", FAMILIES)
def test_qk_and_vo_mixing_with_head_permutation_fall_to_the_matrix_attack_only(tiny_pair, tmp_path, family):
    """mix_qk (RoPE-compatible where RoPE applies) + mix_vo + head permutation: the function is
    kept, the key restores the original, diagonal realignment fails, the matrix attack succeeds."""
    base, ft, _ = tiny_pair(family)
    opts = ProtectOptions(seed=3, mix_qk=True, mix_vo=True, permute_heads=True)
    report = protect(ft, base, tmp_path / "p", opts, key_out=tmp_path / "key", progress=False)
    assert any("rotation and scale (RoPE)" in r.detail for r in report.instances) == (family in ("llama", "mistral", "qwen2"))
    assert verify(ft, tmp_path / "p", rtol=1e-4).equivalent
    from mergeshield import unprotect

    unprotect(tmp_path / "p", tmp_path / "key", tmp_path / "back", progress=False)
    w_ft, w_p, back = _weights(ft), _weights(tmp_path / "p"), _weights(tmp_path / "back")
    for n in w_ft:
        torch.testing.assert_close(back[n], w_ft[n], rtol=1e-4, atol=1e-5)
    diag = attack(tmp_path / "p", base, tmp_path / "diag", "realign", progress=False)
    mat = attack(tmp_path / "p", base, tmp_path / "mat", "realign-matrix", progress=False)
    rec = recovery(tmp_path / "key", mat)
    assert rec["heads_restored"] == 1.0 and rec["perm_units_restored"] == 1.0, rec
    assert rec["matrix_rel_err_median"] < 0.1, rec
    assert verify(ft, tmp_path / "mat", rtol=1e-4).equivalent  # the estimates are function-preserving
    assert verify(ft, tmp_path / "diag", rtol=1e-4).equivalent
    d_prot = _dist(w_p, w_ft)
    assert _dist(_weights(tmp_path / "mat"), w_ft) < 0.1 * d_prot
    assert _dist(_weights(tmp_path / "diag"), w_ft) > 0.3 * d_prot  # diagonal scales cannot undo rotations
    assert recovery(tmp_path / "key", diag)["heads_restored"] == 1.0  # the head matching is mixing-invariant


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "clip"])
def test_realignment_recovers_the_residual_permutation_first(tiny_pair, tmp_path, family):
    """The residual-stream permutation is matched on the tensors only it touches (embeddings,
    norms), before anything else: without that step every other estimate fails."""
    base, ft, _ = tiny_pair(family)
    opts = ProtectOptions(seed=5, permute_residual=True, permute_heads=True)
    protect(ft, base, tmp_path / "p", opts, key_out=tmp_path / "key", progress=False)
    rec = recovery(tmp_path / "key", attack(tmp_path / "p", base, tmp_path / "a", "realign", progress=False))
    assert rec["residual_restored"] == 1.0 and rec["perm_units_restored"] == 1.0, rec
    _assert_realigned(ft, tmp_path, rec)
    # the MLP matching alone, in shuffled residual coordinates, puts few units back
    blind = recovery(tmp_path / "key", attack(tmp_path / "p", base, tmp_path / "b", "permutation", progress=False))
    assert blind["perm_units_restored"] < 0.5, blind
