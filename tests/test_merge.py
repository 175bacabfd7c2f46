"""Merge identities, the disruption protection causes, and cross-checks against mergekit."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny_models import TINY

from mergeshield import ProtectOptions, make_method, merge_checkpoints, merge_tensor, protect
from mergeshield.errors import MergeShieldError
from mergeshield.io.checkpoint import Checkpoint
from mergeshield.verify import load_model

FAMILIES = sorted(TINY)


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    ckpt = Checkpoint(folder)
    return {n: ckpt.get(n) for n in ckpt.names}


def _same_model_layout(family: str) -> bool:
    base_cls, ft_cls, _ = TINY[family]
    return base_cls == ft_cls


@pytest.mark.parametrize("family", FAMILIES)
def test_task_arithmetic_at_lambda_zero_is_the_base(tiny_pair, tmp_path, family):
    base, ft, ft2 = tiny_pair(family)
    merge_checkpoints(base, [ft, ft2], tmp_path / "m", make_method("task_arithmetic", lam=0.0), extra="first", progress=False)
    b, m = _weights(base), _weights(tmp_path / "m")
    from mergeshield.io.naming import match_names

    for name, bname in match_names(list(m), list(b)).items():
        assert torch.equal(m[name], b[bname]), name


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["average", "task_arithmetic", "ties", "dare_ties"])
def test_merging_a_model_with_itself_gives_the_model(tiny_pair, tmp_path, family, method):
    base, ft, _ = tiny_pair(family)
    params = {"task_arithmetic": dict(lam=0.5), "ties": dict(lam=1.0, density=1.0), "dare_ties": dict(lam=1.0, drop=0.0)}
    merge_checkpoints(base, [ft, ft], tmp_path / "m", make_method(method, **params.get(method, {})), extra="first", progress=False)
    a, m = _weights(ft), _weights(tmp_path / "m")
    for n in a:
        torch.testing.assert_close(m[n], a[n], rtol=1e-5, atol=1e-6, msg=n)


@pytest.mark.parametrize("family", FAMILIES)
def test_merging_the_protected_model_lands_far_from_the_unprotected_merge(tiny_pair, tmp_path, family):
    base, ft, ft2 = tiny_pair(family)
    protect(ft, base, tmp_path / "p", ProtectOptions(seed=0), progress=False)
    method = make_method("task_arithmetic", lam=0.8)
    merge_checkpoints(base, [ft, ft2], tmp_path / "m_plain", method, extra="first", progress=False)
    merge_checkpoints(base, [tmp_path / "p", ft2], tmp_path / "m_prot", method, extra="first", progress=False)
    plain, prot, b = _weights(tmp_path / "m_plain"), _weights(tmp_path / "m_prot"), _weights(base)
    from mergeshield.io.naming import match_names

    names = match_names(list(plain), list(b))
    d_prot = sum(float((prot[n].double() - plain[n].double()).norm() ** 2) for n in names) ** 0.5
    d_tau = sum(float((plain[n].double() - b[bn].double()).norm() ** 2) for n, bn in names.items()) ** 0.5
    assert d_prot > 3 * d_tau  # the protected merge is far outside the basin the plain one is in
    # and its outputs move further from the plain merge than merging moved them from the base
    hidden = {}
    for name in ("m_plain", "m_prot"):
        model = load_model(tmp_path / name)
        with torch.inference_mode():
            hidden[name] = _last_hidden(model(**_inputs(model), output_hidden_states=True))
    shutil.copytree(base, tmp_path / "b")
    shutil.copy(Path(ft) / "config.json", tmp_path / "b" / "config.json")  # same head class
    merge_checkpoints(base, [ft], tmp_path / "m_zero", make_method("task_arithmetic", lam=0.0), extra="first", progress=False)
    model = load_model(tmp_path / "m_zero")
    with torch.inference_mode():
        h0 = _last_hidden(model(**_inputs(model), output_hidden_states=True))
    moved_by_merge = float((hidden["m_plain"] - h0).norm())
    moved_by_protection = float((hidden["m_prot"] - hidden["m_plain"]).norm())
    assert moved_by_protection > 2 * moved_by_merge, (moved_by_protection, moved_by_merge)


def _last_hidden(out) -> torch.Tensor:
    if getattr(out, "hidden_states", None) is not None:
        return out.hidden_states[-1]
    return out.text_model_output.last_hidden_state  # CLIP


def _inputs(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    cfg = model.config
    g = torch.Generator().manual_seed(0)
    x: dict[str, torch.Tensor] = {}
    if cfg.model_type != "vit":
        vocab = (getattr(cfg, "text_config", None) or cfg).vocab_size
        x["input_ids"] = torch.randint(2, vocab, (3, 12), generator=g)
    if cfg.model_type in ("vit", "clip"):
        vc = getattr(cfg, "vision_config", None) or cfg
        x["pixel_values"] = torch.randn(3, 3, vc.image_size, vc.image_size, generator=g)
    return x


# ---- pure merge algebra ------------------------------------------------------------------------
tensors = st.integers(1, 40).flatmap(
    lambda n: st.lists(st.lists(st.floats(-3, 3, allow_nan=False, width=32), min_size=n, max_size=n), min_size=3, max_size=5)
)


@settings(max_examples=80, deadline=None)
@given(rows=tensors, lam=st.floats(0, 2))
def test_task_arithmetic_is_linear(rows, lam):
    base, *tuned = [torch.tensor(r, dtype=torch.float64) for r in rows]
    out = merge_tensor(base, tuned, make_method("task_arithmetic", lam=lam))
    torch.testing.assert_close(out, base + lam * sum(t - base for t in tuned))


@settings(max_examples=80, deadline=None)
@given(rows=tensors, density=st.floats(0.05, 1))
def test_ties_entries_agree_with_the_elected_sign_and_stay_within_range(rows, density):
    base, *tuned = [torch.tensor(r, dtype=torch.float64) for r in rows]
    out = merge_tensor(base, tuned, make_method("ties", lam=1.0, density=density))
    taus = torch.stack([t - base for t in tuned])
    delta = out - base
    lo, hi = taus.min(0).values, taus.max(0).values
    assert bool(((delta >= lo - 1e-9) | (delta == 0)).all() and ((delta <= hi + 1e-9) | (delta == 0)).all())


def test_dare_is_seeded_and_unbiased():
    base = torch.zeros(20000, dtype=torch.float64)
    tuned = [torch.ones(20000, dtype=torch.float64)]
    m = make_method("dare_ta", lam=1.0, drop=0.7)
    a = merge_tensor(base, tuned, m, torch.Generator().manual_seed(1))
    b = merge_tensor(base, tuned, m, torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    assert abs(float((a == 0).double().mean()) - 0.7) < 0.02
    assert abs(float(a.mean()) - 1.0) < 0.05  # rescaled by 1/(1-p)


def test_merge_refuses_heads_missing_from_the_base_unless_told(tiny_pair, tmp_path):
    from mergeshield.errors import BaseMismatchError

    base, ft, ft2 = tiny_pair("bert")
    with pytest.raises(BaseMismatchError, match="--extra"):
        merge_checkpoints(base, [ft, ft2], tmp_path / "m", make_method("ties"), progress=False)
    assert not (tmp_path / "m").exists()


# ---- mergekit, the tool users actually merge with ---------------------------------------------
MERGEKIT_CASES = {
    # ours: (method, params) ; mergekit: (merge_method, parameters)
    "linear": (("average", {}), ("linear", {"weight": 1.0})),
    "task_arithmetic": (("task_arithmetic", {"lam": 0.8}), ("task_arithmetic", {"weight": 1.0, "lambda": 0.8})),
    "ties": (("ties", {"lam": 0.8, "density": 0.2}), ("ties", {"weight": 1.0, "density": 0.2, "lambda": 0.8})),
}


def _mergekit(tmp: Path, base: Path, models: list[Path], method: str, params: dict) -> Path:
    pytest.importorskip("mergekit")
    shared = {k: v for k, v in params.items() if k == "lambda"}  # a global parameter in mergekit
    per_model = {k: v for k, v in params.items() if k != "lambda"}
    cfg = {
        "merge_method": method,
        "models": [{"model": str(m), "parameters": dict(per_model)} for m in models],
        "dtype": "float32",
        "out_dtype": "float32",
    }
    if shared:
        cfg["parameters"] = shared
    if method != "linear":
        cfg["base_model"] = str(base)
    (tmp / "mk.yaml").write_text(yaml.safe_dump(cfg))
    exe = shutil.which("mergekit-yaml") or str(Path(sys.executable).parent / "mergekit-yaml")
    res = subprocess.run([exe, str(tmp / "mk.yaml"), str(tmp / "mk_out"), "--allow-crimes", "--lazy-unpickle"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return tmp / "mk_out"


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen2"])
@pytest.mark.parametrize("case", sorted(MERGEKIT_CASES))
def test_our_merges_match_mergekit(tiny_pair, tmp_path, family, case):
    base, ft, ft2 = tiny_pair(family)
    (ours_m, ours_p), (mk_m, mk_p) = MERGEKIT_CASES[case]
    merge_checkpoints(base, [ft, ft2], tmp_path / "ours", make_method(ours_m, **ours_p), progress=False)
    mk = _mergekit(tmp_path, base, [ft, ft2], mk_m, mk_p)
    ours, theirs = _weights(tmp_path / "ours"), _weights(mk)
    # mergekit writes only the tensors its architecture definition knows: compare the sets
    assert set(theirs) <= set(ours)
    missing = set(ours) - set(theirs)
    assert missing <= {"lm_head.weight"}, f"mergekit dropped {sorted(missing)}"
    for n in theirs:
        torch.testing.assert_close(ours[n], theirs[n], rtol=1e-5, atol=1e-6, msg=n)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_streamed_average_and_task_arithmetic_equal_the_stacked_formula_bitwise(dtype, n, monkeypatch):
    """The no-sparsify path accumulates task vectors one at a time, chunk by chunk, instead of
    stacking them; it must give the same bytes as ``base + lam * stack(taus).sum(0)`` (committed
    results depend on it), whatever the chunking, and leave its inputs untouched."""
    from mergeshield.merge import methods
    from mergeshield.merge.methods import make_method, merge_tensor

    monkeypatch.setattr(methods, "CHUNK", 1000)  # 300 x 129 values: 39 chunks, the last one partial

    g = torch.Generator().manual_seed(n)
    b = torch.randn(300, 129, generator=g).to(dtype)
    ts = [(b.float() + 0.01 * torch.randn(300, 129, generator=g)).to(dtype) for _ in range(n)]
    for method in (make_method("average"), make_method("task_arithmetic", lam=0.3)):
        lam = 1 / n if method.lam is None else method.lam
        bf = b.float()
        ref = (bf + lam * torch.stack([t.float() - bf for t in ts]).sum(0)).to(dtype)
        before = [b.clone(), *(t.clone() for t in ts)]
        assert torch.equal(merge_tensor(b, ts, method), ref)
        assert all(torch.equal(x, y) for x, y in zip(before, [b, *ts]))


@settings(max_examples=80, deadline=None)
@given(n=st.integers(1, 400), density=st.floats(0.001, 1.0), levels=st.integers(1, 50), seed=st.integers(0, 2**16))
def test_topk_mask_by_selection_equals_a_stable_sort(n, density, levels, seed):
    """TIES' top-k by kthvalue keeps exactly what a stable descending argsort keeps, ties included."""
    from mergeshield.merge.methods import _topk_mask

    g = torch.Generator().manual_seed(seed)
    tau = torch.randint(-levels, levels + 1, (n,), generator=g).float() / levels  # many ties
    k = max(1, int(density * n))
    ref = torch.zeros(n, dtype=torch.bool)
    ref[torch.argsort(tau.abs(), descending=True, stable=True)[:k]] = True
    assert torch.equal(_topk_mask(tau, density), ref)


def test_mergekit_worker_gives_the_bytes_of_a_fresh_mergekit_process(tiny_pair, tmp_path):
    """The eval's long-lived mergekit worker (one import for many merges) must merge exactly as a
    fresh ``mergekit-yaml`` process: seeded methods included, with input folders reused for
    other models in between (mergekit caches loaders by path in the process)."""
    from mergeshield.eval.config import MergeSpec
    from mergeshield.eval.runner import MergekitWorker

    pytest.importorskip("mergekit")
    base, ft, ft2 = tiny_pair("llama")
    spec = MergeSpec(method="dare_ties", lam=0.8, drop=0.5, engine="mergekit")
    mk_in = [tmp_path / "in0", tmp_path / "in1"]
    worker = MergekitWorker(seed=3, log_path=tmp_path / "mk.log")
    try:
        for i, (a, b) in enumerate([(ft2, ft), (ft, ft2)]):  # the second merge reuses the folders
            for src, dst in zip((a, b), mk_in, strict=True):
                shutil.rmtree(dst, ignore_errors=True)
                shutil.copytree(src, dst)
            worker.merge(base, mk_in, tmp_path / f"w{i}", spec, 0.8)
        with pytest.raises(MergeShieldError, match="mergekit failed on ties"):  # an error comes back, the worker lives
            worker.merge(base, [tmp_path / "missing"], tmp_path / "bad", MergeSpec(method="ties", lam=0.8), 0.8)
        worker.merge(base, mk_in, tmp_path / "w2", spec, 0.8)
    finally:
        worker.close()
    cfg = tmp_path / "fresh.yaml"
    shutil.copy(tmp_path / "w1.yaml", cfg)
    exe = [sys.executable, "-m", "mergeshield.eval._mergekit_shim"]
    res = subprocess.run([*exe, str(cfg), str(tmp_path / "fresh"), "--allow-crimes", "--random-seed", "3"],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONHASHSEED": "3"})
    assert res.returncode == 0, res.stderr[-3000:]
    fresh = _weights(tmp_path / "fresh")
    for got in (_weights(tmp_path / "w1"), _weights(tmp_path / "w2")):
        assert set(got) == set(fresh)
        for n in fresh:
            assert torch.equal(got[n], fresh[n]), n
    w0 = _weights(tmp_path / "w0")  # the other model order: a different merge, so the check can fail
    assert any(not torch.equal(w0[n], fresh[n]) for n in fresh)
