"""Every family through the same checks: equivalence, round-trip, determinism, layouts, dtypes."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tiny_models import TINY, build, save

from mergeshield import ProtectOptions, protect, unprotect, verify
from mergeshield.io.checkpoint import Checkpoint

FAMILIES = sorted(TINY)


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    ckpt = Checkpoint(folder)
    return {n: ckpt.get(n) for n in ckpt.names}


@pytest.fixture(scope="module")
def protected(tiny_pair, tmp_path_factory):
    cache: dict[str, tuple[Path, Path, Path, Path]] = {}

    def get(family: str):
        if family not in cache:
            base, ft, _ = tiny_pair(family)
            root = tmp_path_factory.mktemp(f"prot-{family}")
            report = protect(ft, base, root / "out", ProtectOptions(seed=7), key_out=root / "key.safetensors", progress=False)
            cache[family] = (base, ft, root / "out", root / "key.safetensors", report)
        return cache[family]

    return get


@pytest.mark.parametrize("family", FAMILIES)
def test_protected_forward_equals_original(protected, family):
    _, ft, out, _, _ = protected(family)
    report = verify(ft, out, rtol=1e-5)
    assert report.equivalent, report.table()
    if family in ("llama", "mistral", "qwen2", "gpt2"):
        assert report.generations_equal


@pytest.mark.parametrize("family", FAMILIES)
def test_protection_moves_weights_far_from_base(protected, family):
    base, ft, out, _, report = protected(family)
    for r in report.instances:
        # each transformed layer is several task-vector norms away from the base
        assert r.ratio > 3, r
    # and the protected tensors really differ from the fine-tuned ones
    a, b = _weights(ft), _weights(out)
    changed = [n for n in a if not torch.equal(a[n], b[n])]
    assert len(changed) >= 4 * len(report.instances) // 3


@pytest.mark.parametrize("family", FAMILIES)
def test_unprotect_restores_original(protected, tmp_path, family):
    _, ft, out, key, _ = protected(family)
    unprotect(out, key, tmp_path / "restored", progress=False)
    a, b = _weights(ft), _weights(tmp_path / "restored")
    assert a.keys() == b.keys()
    for n in a:
        torch.testing.assert_close(b[n], a[n], rtol=1e-6, atol=1e-7, msg=n)


@pytest.mark.parametrize("family", FAMILIES)
def test_same_seed_same_bytes_other_seed_other_key(tiny_pair, tmp_path, family):
    base, ft, _ = tiny_pair(family)
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        protect(ft, base, tmp_path / name, ProtectOptions(seed=seed), key_out=tmp_path / f"{name}.key", progress=False)
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    assert (tmp_path / "a.key").read_bytes() == (tmp_path / "b.key").read_bytes()
    assert (tmp_path / "a" / "model.safetensors").read_bytes() != (tmp_path / "c" / "model.safetensors").read_bytes()


@pytest.mark.parametrize(
    "options",
    [
        ProtectOptions(scale_qk=False, scale_vo=False),
        ProtectOptions(permute_mlp=False),
        ProtectOptions(permute_mlp=False, scale_vo=False, scale_law="loguniform"),
        ProtectOptions(permute_mlp=False, scale_qk=False, scale_law="beta", scale_low=0.5, scale_high=2),
    ],
    ids=["mlp-only", "scales-only", "qk-loguniform", "vo-beta"],
)
def test_each_transform_alone_preserves_function(tiny_pair, tmp_path, options):
    base, ft, _ = tiny_pair("llama")
    report = protect(ft, base, tmp_path / "out", options, progress=False)
    kinds = {r.kind for r in report.instances}
    assert ("permutation" in kinds) == options.permute_mlp
    assert ("scale-qk" in kinds) == options.scale_qk
    assert ("scale-vo" in kinds) == options.scale_vo
    assert verify(ft, tmp_path / "out", rtol=1e-5).equivalent


def test_mlp_permutation_is_the_farthest_assignment(protected):
    """The chosen permutation beats every random one and the identity (correct LAP direction)."""
    from mergeshield.core.assignment import farthest_permutation, permutation_objective

    rng = np.random.default_rng(0)
    pre, tuned = torch.randn(40, 12, dtype=torch.float64), torch.randn(40, 12, dtype=torch.float64)
    tuned = pre + 0.1 * tuned
    best = farthest_permutation(pre, tuned)
    obj = permutation_objective(pre, tuned, best)
    assert obj > permutation_objective(pre, tuned, np.arange(40))
    for _ in range(200):
        assert obj >= permutation_objective(pre, tuned, rng.permutation(40)) - 1e-9
    # applying the inverse instead would be a different (worse) permutation
    inv = np.argsort(best)
    if not np.array_equal(inv, best):
        assert permutation_objective(pre, tuned, inv) <= obj


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_exact_and_keeps_dtype(tmp_path, dtype):
    base = build("llama", 0)
    ft = build("llama", 1, finetune_of=base)
    save(base, tmp_path / "base", dtype=dtype)
    save(ft, tmp_path / "ft", dtype=dtype)
    report = protect(tmp_path / "ft", tmp_path / "base", tmp_path / "out", key_out=tmp_path / "k", progress=False)
    assert any("powers of two" in n for n in report.notes)
    w = load_file(tmp_path / "out" / "model.safetensors")
    assert {t.dtype for t in w.values()} == {dtype}
    assert all(torch.isfinite(t).all() for t in w.values())
    assert verify(tmp_path / "ft", tmp_path / "out", rtol=1e-5).equivalent
    # power-of-two factors make the round trip bit-exact (float16: up to the rounding of values
    # below its smallest normal, `test_float16_subnormals_round_or_keep_the_scales_exact`)
    unprotect(tmp_path / "out", tmp_path / "k", tmp_path / "back", progress=False)
    a, b = _weights(tmp_path / "ft"), _weights(tmp_path / "back")
    if dtype == torch.bfloat16:
        assert all(torch.equal(a[n], b[n]) for n in a)
    for n in a:  # whatever differs is a float16 value below its smallest normal times 2^4
        differs = a[n] != b[n]
        assert torch.all(a[n][differs].float().abs() < 2.0**-14 * 2**4), n
        assert torch.all((a[n].float() - b[n].float()).abs() <= 2.0 ** (4 - 25)), n


@pytest.mark.parametrize("mode", ["round", "keep"])
def test_float16_subnormals_round_or_keep_the_scales_exact(mode, tmp_path):
    """float16 weights with a value below float16's smallest normal (6.1e-5) in every row and
    column of every attention matrix, as real float16 weights of a few thousand values per row
    have. ``keep`` (exact) must then bound every Q/K and V/O factor to 1: the scales do nothing
    (what every float16 checkpoint got before `half_subnormals`), and unprotect is bit-exact.
    ``round`` must scale (as bfloat16 would), keep the function (verify), say so in a note, and
    restore through unprotect every value to within the note's bound, the tiny values only."""
    base = build("llama", 0)
    ft = build("llama", 1, finetune_of=base)
    with torch.no_grad():
        for m in (base, ft):
            for layer in m.model.layers:
                for lin in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.self_attn.o_proj):
                    w = lin.weight
                    rows = torch.arange(w.shape[0])
                    w[rows, rows % w.shape[1]] = 3e-6  # subnormal in float16: every row ...
                    cols = torch.arange(w.shape[1])
                    w[cols % w.shape[0], cols] = -5e-6  # ... and every column
    save(base, tmp_path / "base", dtype=torch.float16)
    save(ft, tmp_path / "ft", dtype=torch.float16)
    report = protect(tmp_path / "ft", tmp_path / "base", tmp_path / "out", ProtectOptions(half_subnormals=mode),
                     key_out=tmp_path / "k", progress=False)
    scales = [r for r in report.instances if r.kind.startswith("scale-")]
    assert scales
    notes = " ".join(report.notes)
    if mode == "keep":
        assert all(r.detail == "factors 1..1" for r in scales), [r.detail for r in scales]
        assert all(r.ratio == pytest.approx(1.0) for r in scales)
        assert "round the values" not in notes
    else:
        assert all(r.ratio > 2 for r in scales), [(r.id, r.ratio) for r in scales]
        m = re.search(r"down to 2\^-(\d+) round .* at most 2\^(-?\d+)", notes)
        assert m and int(m[2]) == int(m[1]) - 25, notes
    assert verify(tmp_path / "ft", tmp_path / "out", rtol=1e-4).equivalent
    unprotect(tmp_path / "out", tmp_path / "k", tmp_path / "back", progress=False)
    a, b = _weights(tmp_path / "ft"), _weights(tmp_path / "back")
    if mode == "keep":
        assert all(torch.equal(a[n], b[n]) for n in a)
    else:
        bound = 2.0 ** int(m[2])
        rounded = 0
        for n in a:
            differs = a[n] != b[n]
            rounded += int(differs.sum())
            assert torch.all(a[n][differs].float().abs() < 2.0**-14 * 2.0 ** int(m[1])), n
            assert torch.all((a[n].float() - b[n].float()).abs() <= bound), n
        assert rounded > 0  # the planted values were scaled down somewhere


@pytest.mark.parametrize("quantize", ["auto", "none"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_transforms_in_stored_dtype_match_the_float32_computation(tmp_path, dtype, quantize):
    """protect applies permutations and power-of-two scales in float16/bfloat16 directly: every
    output tensor must equal the float32 computation (each transform in turn) rounded back.
    Continuous factors (``none``) are not exact in half precision: they must go through float32."""
    from mergeshield.core.transforms import apply_transform
    from mergeshield.io.checkpoint import Checkpoint
    from mergeshield.protect import _read_key, bind_checkpoint

    base = build("llama", 0)
    ft = build("llama", 1, finetune_of=base)
    save(base, tmp_path / "base", dtype=dtype)
    save(ft, tmp_path / "ft", dtype=dtype)
    opts = ProtectOptions(seed=3, permute_heads=True, permute_residual=True, scale_quantize=quantize)
    protect(tmp_path / "ft", tmp_path / "base", tmp_path / "out", opts, key_out=tmp_path / "k", progress=False)
    transforms, _ = _read_key(tmp_path / "k")
    assert any(t.factors is not None for t in transforms) and any(t.perm is not None for t in transforms)
    rank = {t.instance_id: k for k, t in enumerate(transforms)}
    by_id = {t.instance_id: t for t in transforms}
    ckpt = Checkpoint(tmp_path / "ft")
    bound = bind_checkpoint(ckpt)
    out = _weights(tmp_path / "out")
    changed = 0
    for name in ckpt.names:
        c = ckpt.get(name).float()
        todo = sorted(((inst, bt.binding) for inst in bound.by_tensor.get(name, ()) if inst.id in by_id
                       for bt in inst.tensors if bt.name == name), key=lambda ib: rank[ib[0].id])
        for inst, binding in todo:
            c = apply_transform(c, binding, inst, by_id[inst.id])
        assert torch.equal(out[name], c.to(dtype)), name
        changed += bool(todo)
    assert changed > 10


def test_half_precision_bounds_factors_that_would_overflow(tmp_path):
    base = build("llama", 0)
    ft = build("llama", 1, finetune_of=base)
    with torch.no_grad():  # q rows near float16's max: scaling them up would overflow
        for m in (base, ft):
            m.model.layers[0].self_attn.q_proj.weight.mul_(30000 / m.model.layers[0].self_attn.q_proj.weight.abs().max())
    save(base, tmp_path / "base", dtype=torch.float16)
    save(ft, tmp_path / "ft", dtype=torch.float16)
    report = protect(tmp_path / "ft", tmp_path / "base", tmp_path / "out", progress=False)
    assert any("bounded" in n for n in report.notes)
    w = load_file(tmp_path / "out" / "model.safetensors")
    q = w["model.layers.0.self_attn.q_proj.weight"]
    assert torch.isfinite(q).all() and q.abs().max() <= 65504 / 2**8 * 1.01 or q.abs().max() <= 30000


def test_sharded_input_gives_same_sharding(tmp_path):
    base = build("gpt2", 0)
    ft = build("gpt2", 1, finetune_of=base)
    save(base, tmp_path / "base")
    save(ft, tmp_path / "ft", max_shard_size="20KB")
    index = json.loads((tmp_path / "ft" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    protect(tmp_path / "ft", tmp_path / "base", tmp_path / "out", progress=False)
    out_index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert out_index["weight_map"] == index["weight_map"]
    for shard in set(index["weight_map"].values()):
        assert load_file(tmp_path / "ft" / shard).keys() == load_file(tmp_path / "out" / shard).keys()
    assert verify(tmp_path / "ft", tmp_path / "out", rtol=1e-5).equivalent


def test_pytorch_bin_input_gives_safetensors(tmp_path):
    base = build("bert", 0)
    ft = build("bert", 1, finetune_of=base)
    save(base, tmp_path / "base")
    (tmp_path / "ft").mkdir()
    ft.config.save_pretrained(tmp_path / "ft")
    torch.save(ft.state_dict(), tmp_path / "ft" / "pytorch_model.bin")
    protect(tmp_path / "ft", tmp_path / "base", tmp_path / "out", progress=False)
    assert (tmp_path / "out" / "model.safetensors").is_file()
    assert not (tmp_path / "out" / "pytorch_model.bin").exists()
    assert verify(tmp_path / "ft", tmp_path / "out", rtol=1e-5).equivalent


def test_non_weight_files_are_copied_unchanged(protected):
    _, ft, out, _, _ = protected("gpt2")
    for p in Path(ft).iterdir():
        if p.suffix != ".safetensors":
            assert (out / p.name).read_bytes() == p.read_bytes()


def test_inputs_are_not_modified(tiny_pair, tmp_path):
    base, ft, _ = tiny_pair("qwen2")
    before = {p: p.read_bytes() for d in (base, ft) for p in Path(d).iterdir()}
    protect(ft, base, tmp_path / "out", key_out=tmp_path / "key", progress=False)
    assert before == {p: p.read_bytes() for d in (base, ft) for p in Path(d).iterdir()}


def test_key_is_never_inside_the_published_folder(tiny_pair, tmp_path):
    from mergeshield.errors import OutputPathError

    base, ft, _ = tiny_pair("llama")
    with pytest.raises(OutputPathError, match="Keep the key apart"):
        protect(ft, base, tmp_path / "out", key_out=tmp_path / "out" / "key.safetensors", progress=False)
    assert not (tmp_path / "out").exists()
    protect(ft, base, tmp_path / "out", key_out=tmp_path / "key.safetensors", progress=False)
    blob = b"".join(p.read_bytes() for p in (tmp_path / "out").iterdir())
    assert b"perm::" not in blob and b"scale::" not in blob


def _plain_fingerprint(folder: Path, new_hash) -> str:
    """The fingerprint by its definition: a hash of each tensor's name, dtype, shape and bytes,
    then one hash of those digests in name order."""
    digests = []
    for name, t in sorted(_weights(folder).items()):
        h = new_hash()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode() + t.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        digests.append(h.digest())
    h = new_hash()
    for d in digests:
        h.update(d)
    return h.hexdigest()


def _rewrite_key_meta(key: Path, **changes) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(key, framework="pt") as f:
        tensors = {n: f.get_tensor(n) for n in f.keys()}
        meta = json.loads(f.metadata()["mergeshield_key"])
    meta.update(changes)
    meta = {k: v for k, v in meta.items() if v is not None}
    save_file(tensors, str(key), metadata={"mergeshield_key": json.dumps(meta)})


def test_fingerprint_is_xxh3_of_the_written_weights_and_sha256_keys_still_work(tiny_pair, tmp_path):
    import hashlib

    import xxhash

    from mergeshield.errors import KeyMismatchError

    base, ft, _ = tiny_pair("llama")
    key = tmp_path / "key"
    report = protect(ft, base, tmp_path / "out", key_out=key, progress=False)
    assert report.fingerprint == _plain_fingerprint(tmp_path / "out", xxhash.xxh3_128)
    # a key written before xxh3 names no hash and holds the sha256 fingerprint: it still restores
    _rewrite_key_meta(key, fingerprint=_plain_fingerprint(tmp_path / "out", hashlib.sha256), fingerprint_hash=None)
    unprotect(tmp_path / "out", key, tmp_path / "restored", progress=False)
    a, b = _weights(ft), _weights(tmp_path / "restored")
    for n in a:
        torch.testing.assert_close(b[n], a[n], rtol=1e-6, atol=1e-7, msg=n)
    # ... and is still checked against the weights: the xxh3 fingerprint under sha256 is refused
    _rewrite_key_meta(key, fingerprint=report.fingerprint)
    with pytest.raises(KeyMismatchError, match="does not belong"):
        unprotect(tmp_path / "out", key, tmp_path / "r2", progress=False)
    _rewrite_key_meta(key, fingerprint_hash="blake9")
    with pytest.raises(KeyMismatchError, match="'blake9'.*newer mergeshield"):
        unprotect(tmp_path / "out", key, tmp_path / "r2", progress=False)
    assert not (tmp_path / "r2").exists()


@pytest.mark.parametrize("family", FAMILIES)
def test_head_permutation_preserves_function_and_round_trips(tiny_pair, tmp_path, family):
    base, ft, _ = tiny_pair(family)
    opts = ProtectOptions(seed=7, permute_heads=True)
    report = protect(ft, base, tmp_path / "out", opts, key_out=tmp_path / "key", progress=False)
    heads = [r for r in report.instances if r.kind == "heads"]
    assert heads and all("heads" in r.id for r in heads)
    single = family == "qwen2"  # one K/V head (MQA): nothing to reorder
    assert single or any(", 0% heads" not in r.detail for r in heads), [r.detail for r in heads]
    # heads are permuted after the scales: the report lists them last, the key keeps the order
    kinds = [r.kind for r in report.instances]
    assert kinds.index("heads") > max(i for i, k in enumerate(kinds) if k.startswith("scale"))
    assert verify(ft, tmp_path / "out", rtol=1e-5).equivalent
    unprotect(tmp_path / "out", tmp_path / "key", tmp_path / "restored", progress=False)
    a, b = _weights(ft), _weights(tmp_path / "restored")
    for n in a:
        torch.testing.assert_close(b[n], a[n], rtol=1e-6, atol=1e-7, msg=n)
    # and the heads really moved: the protected model differs from the scales-only one
    protect(ft, base, tmp_path / "noheads", ProtectOptions(seed=7), progress=False)
    assert _weights(tmp_path / "out").keys() == _weights(tmp_path / "noheads").keys()
    moved = any(not torch.equal(x, _weights(tmp_path / "noheads")[n]) for n, x in _weights(tmp_path / "out").items())
    assert moved != single


RESIDUAL_FAMILIES = [f for f in FAMILIES if f != "clip"]  # clip: two towers, not described


@pytest.mark.parametrize("family", RESIDUAL_FAMILIES)
def test_residual_permutation_preserves_function_and_round_trips(tiny_pair, tmp_path, family):
    base, ft, _ = tiny_pair(family)
    only = ProtectOptions(seed=7, permute_residual=True, permute_mlp=False, scale_qk=False, scale_vo=False)
    report = protect(ft, base, tmp_path / "out", only, key_out=tmp_path / "key", progress=False)
    (res,) = report.instances
    assert res.kind == "residual" and res.id == "residual" and " 0% dims" not in res.detail, res
    assert res.ratio > 3, res
    assert verify(ft, tmp_path / "out", rtol=1e-5).equivalent
    # exactly the tensors on the residual stream moved, those PaRaMS leaves alone (embeddings,
    # norms) included; the rest is bit for bit the fine-tune
    from mergeshield.protect import bind_checkpoint

    (inst,) = [i for i in bind_checkpoint(Checkpoint(ft)).instances if i.id == "residual"]
    on_stream = {bt.name for bt in inst.tensors}
    assert any("embed" in n or "wte" in n for n in on_stream) and any("norm" in n.lower() or "ln_" in n for n in on_stream)
    a, p = _weights(ft), _weights(tmp_path / "out")
    assert {n for n in a if not torch.equal(a[n], p[n])} == {n for n in on_stream if a[n].std() > 0}
    unprotect(tmp_path / "out", tmp_path / "key", tmp_path / "restored", progress=False)
    back = _weights(tmp_path / "restored")
    assert all(torch.equal(back[n], a[n]) for n in a)  # a permutation undoes bit for bit
    # with every other transform: still the same function, still restorable
    full = ProtectOptions(seed=7, permute_residual=True, permute_heads=True)
    report = protect(ft, base, tmp_path / "all", full, key_out=tmp_path / "key2", progress=False)
    assert [r.kind for r in report.instances].count("residual") == 1
    assert verify(ft, tmp_path / "all", rtol=1e-5).equivalent
    unprotect(tmp_path / "all", tmp_path / "key2", tmp_path / "restored2", progress=False)
    back = _weights(tmp_path / "restored2")
    for n in a:
        torch.testing.assert_close(back[n], a[n], rtol=1e-6, atol=1e-7, msg=n)


def test_residual_permutation_is_refused_where_the_description_does_not_hold(tiny_pair, tmp_path):
    from mergeshield.errors import SpecError

    base, ft, _ = tiny_pair("clip")
    with pytest.raises(SpecError, match="no residual-stream space"):
        protect(ft, base, tmp_path / "c", ProtectOptions(permute_residual=True), progress=False)
    assert not (tmp_path / "c").exists()
    # BERT with its MLM head: the decoder is the word embedding, read in the head's own space
    import transformers as T

    torch.manual_seed(0)
    mlm = T.BertForMaskedLM(TINY["bert"][2])
    save(mlm, tmp_path / "mlm")
    with pytest.raises(SpecError, match=r"cls\.predictions"):
        protect(tmp_path / "mlm", tmp_path / "mlm", tmp_path / "m", ProtectOptions(permute_residual=True), progress=False)
    protect(tmp_path / "mlm", tmp_path / "mlm", tmp_path / "m", progress=False)  # the rest still works


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize(("shape", "axis"), [((7,), 0), ((300, 50), 0), ((50, 300), 1), ((4, 5, 6), 1), ((3, 2000), 0),
                                           ((600, 300), 0), ((300, 600), 1)])  # the last two: several chunks
@pytest.mark.parametrize("inverse", [False, True])
def test_scale_distances_from_chunked_sums_match_the_scaled_tensor(dtype, shape, axis, inverse):
    """The report's distances for a scale space come from per-index sums over chunks: they must
    equal the distances of the actually scaled tensor (factors of exactly 1 included)."""
    from mergeshield.protect import _scaled_distances
    from mergeshield.symmetry.spec import Binding

    g = torch.Generator().manual_seed(sum(shape) + axis)
    p = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    t = (p.double() + 0.01 * torch.randn(shape, generator=g, dtype=torch.float64)).to(dtype)
    f = np.exp2(np.random.default_rng(1).integers(-3, 4, shape[axis])).astype(np.float64)
    f[::3] = 1.0
    got = _scaled_distances(t, p, Binding(tensor="w", axis=axis, inverse=inverse), f)
    view = [1] * len(shape)
    view[axis] = -1
    fac = torch.from_numpy(1 / f if inverse else f).reshape(view)
    t64, p64 = t.double(), p.double()
    want = (float(((t64 - p64) ** 2).sum()), float(((t64 * fac - p64) ** 2).sum()), float((p64**2).sum()))
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_protect_reads_ahead_every_model_tensor_and_only_the_base_tensors_it_plans_on(tmp_path, monkeypatch):
    """The read-ahead hint covers the whole model but only the base tensors a transform is planned
    on (the base's embeddings, norms and head are never read without --permute-residual)."""
    from mergeshield.io.checkpoint import Checkpoint as Ckpt

    base = build("llama", 0)
    ft = build("llama", 1, finetune_of=base)
    save(base, tmp_path / "base")
    save(ft, tmp_path / "ft")
    asked: dict[str, set[str]] = {"base": set(), "ft": set()}
    real = Ckpt.prefetch

    def spy(self, names):
        names = list(names)
        asked[self.folder.name].update(names)
        return real(self, names)

    monkeypatch.setattr(Ckpt, "prefetch", spy)
    protect(tmp_path / "ft", tmp_path / "base", tmp_path / "out", progress=False)
    ft_names = set(Ckpt(tmp_path / "ft").names)
    assert asked["ft"] == ft_names
    assert any(".mlp." in n for n in asked["base"]) and any("q_proj" in n for n in asked["base"])
    assert not any("embed" in n or "norm" in n for n in asked["base"]), sorted(asked["base"])


def test_block_size_and_candidates_trade_objective_for_time_and_the_whole_layer_is_exact(tiny_pair, tmp_path,
                                                                                        monkeypatch):
    """--block-size reaches protect's block solver: one block as large as the layer is the
    exact assignment (the same distances as --solver exact), tiny blocks fall short of it; and
    --candidates the sparse solver's, alike. Costs in float32 here (where the CPU multiplies
    bfloat16 natively protect rounds them to bfloat16, which may break near-ties otherwise)."""
    import importlib

    monkeypatch.setattr(importlib.import_module("mergeshield.protect"), "native_bfloat16", lambda: False)
    base, ft, _ = tiny_pair("llama")  # MLP 96 units wide

    def mlp_distances(**options: object) -> list[float]:
        out = tmp_path / "-".join(f"{k}{v}" for k, v in options.items())
        report = protect(ft, base, out, ProtectOptions(**options), progress=False)
        return [r.dist_after for r in report.instances if r.kind == "permutation"]

    exact = mlp_distances(solver="exact")
    one_block = mlp_distances(solver="block", block_size=96)
    small = mlp_distances(solver="block", block_size=8)
    np.testing.assert_allclose(one_block, exact, rtol=1e-6)  # float32 features and distances for block
    assert all(s < e for s, e in zip(small, exact, strict=True)), (small, exact)
    with pytest.raises(ValueError, match="block_size"):
        ProtectOptions(block_size=1)
    # the same for --candidates and the sparse solver: every column a candidate is exact
    every = mlp_distances(solver="sparse", candidates=96)
    one = mlp_distances(solver="sparse", candidates=1)
    np.testing.assert_allclose(every, exact, rtol=1e-6)
    assert all(s < e for s, e in zip(one, exact, strict=True)), (one, exact)
    with pytest.raises(ValueError, match="candidates"):
        ProtectOptions(candidates=0)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_report_distances_are_the_distances_of_the_written_weights(family, fast, dtype, tmp_path, monkeypatch):
    """Every instance's distances in the report (before, after, base norm) against the same
    norms taken in float64 from the files protect read and wrote, for a bfloat16, a float16 and
    a float32 model. With `fast` the fast paths (sums of squares by norms of runs, scaled
    distances in the stored dtype, the chosen costs of bfloat16 products: of float16 and float32
    features rounded to bfloat16 a block at a time) are forced on these small tensors, also on a
    CPU without native bfloat16."""
    import importlib

    from mergeshield.core import numeric

    protect_module = importlib.import_module("mergeshield.protect")  # the package's `protect` is the function

    if fast:
        monkeypatch.setattr(numeric, "SQUARES_EXACT_BELOW", 0)
        monkeypatch.setattr(protect_module, "SQUARES_EXACT_BELOW", 0)
        monkeypatch.setattr(protect_module, "native_bfloat16", lambda: True)
    base_model = build(family, 0)
    save(base_model, tmp_path / "base", dtype=dtype)
    save(build(family, 1, finetune_of=base_model), tmp_path / "ft", dtype=dtype)
    report = protect(tmp_path / "ft", tmp_path / "base", tmp_path / "out", ProtectOptions(solver="block", block_size=16),
                     progress=False)
    ckpt = Checkpoint(tmp_path / "ft")
    bound = protect_module.bind_checkpoint(ckpt)
    w = {k: _weights(tmp_path / k) for k in ("ft", "base", "out")}
    from mergeshield.core.assignment import native_bfloat16
    from mergeshield.core.transforms import axis_view

    mlp = [r for r in report.instances if r.kind == "permutation"]
    assert mlp and all(("bfloat16 products" in r.detail) == (fast or native_bfloat16()) for r in mlp), mlp
    for r in report.instances:
        (inst,) = [i for i in bound.instances if i.id == r.id]
        got = {"task": 0.0, "after": 0.0, "base": 0.0}
        for bt in inst.tensors:
            t, p, o = (axis_view(w[k][bt.name], bt.binding).double() for k in ("ft", "base", "out"))
            got["task"] += float(((t - p) ** 2).sum())
            got["after"] += float(((o - p) ** 2).sum())
            got["base"] += float((p**2).sum())
        np.testing.assert_allclose([r.task_norm, r.dist_after, r.base_norm],
                                   [got["task"] ** 0.5, got["after"] ** 0.5, got["base"] ** 0.5], rtol=2e-3, err_msg=r.id)


@pytest.mark.parametrize("round_float16", [False, True])
@pytest.mark.parametrize("extreme", [None, "big", "small"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_factor_bounds_shortcut_bounds_exactly_what_the_per_index_ranges_bound(extreme, dtype, round_float16, tmp_path):
    """Half-precision scale factors are bounded per index; protect first tries whole-tensor
    ranges, which stand only where they bound nothing: the bounded exponents must be those of
    the per-index ranges, with values near the dtype's largest or smallest present or not, and
    with float16's small values allowed to round (then only overflow bounds; bfloat16 stays exact)."""
    import importlib

    from mergeshield.core.scales import pow2_exponent_bounds
    from mergeshield.core.transforms import axis_view, expand_factors

    protect_module = importlib.import_module("mergeshield.protect")
    base = build("llama", 0)
    ckpt = Checkpoint(save(base, tmp_path / "m", dtype=dtype))
    bound = protect_module.bind_checkpoint(ckpt)
    info = torch.finfo(dtype)
    for k, inst in enumerate(i for i in bound.instances if i.id.startswith(("model.qk.", "model.vo."))):
        tensors = {bt.name: ckpt.get(bt.name).clone() for bt in inst.tensors}
        name = inst.tensors[k % len(inst.tensors)].name
        if extreme == "big":
            tensors[name][1] *= info.max / 2**10 / tensors[name][1].abs().max().float()
        elif extreme == "small":
            tensors[name][2, 3] = info.tiny * 4
        exps = np.random.default_rng(k).integers(-4, 5, inst.size)
        lo, hi = protect_module._factor_bounds(ckpt, inst, tensors, exps, round_float16)
        want_lo, want_hi = np.full(inst.size, -1000), np.full(inst.size, 1000)
        keep = not (round_float16 and dtype == torch.float16)
        for bt in inst.tensors:
            r_lo, r_hi = pow2_exponent_bounds(axis_view(tensors[bt.name], bt.binding), dtype, axis=bt.binding.axis,
                                              keep_small=keep)
            if not keep:  # only the overflow bound: the same upper bound as the exact ranges'
                e_lo, e_hi = pow2_exponent_bounds(axis_view(tensors[bt.name], bt.binding), dtype, axis=bt.binding.axis)
                assert np.all(r_lo == -1000) and np.array_equal(r_hi, e_hi) and np.all(e_lo >= r_lo)
            if bt.binding.inverse:
                r_lo, r_hi = -r_hi, -r_lo
            owner = expand_factors(inst, np.arange(inst.size, dtype=np.float64), bt.binding.layout).astype(np.int64)
            np.maximum.at(want_lo, owner, r_lo)
            np.minimum.at(want_hi, owner, r_hi)
        assert np.all(lo >= want_lo) and np.all(hi <= want_hi), "outside the per-index ranges"
        ok, want_ok = lo <= hi, want_lo <= want_hi
        assert np.array_equal(np.where(ok, np.clip(exps, lo, hi), 0), np.where(want_ok, np.clip(exps, want_lo, want_hi), 0))


@pytest.mark.parametrize(("dtype", "peak", "solver", "weight", "instance"), [
    (torch.float16, 30000.0, "block", "mlp.up_proj", "model.mlp.0"),
    (torch.bfloat16, 1e38, "random", "mlp.up_proj", "model.mlp.0"),
    (torch.bfloat16, 1e38, "block", "mlp.up_proj", "model.mlp.0"),
    (torch.bfloat16, 1e38, "sparse", "mlp.gate_proj", "model.mlp.0"),
    (torch.bfloat16, 1e38, "exact", "mlp.down_proj", "model.mlp.0"),
    (torch.float16, 30000.0, "auto", "self_attn.v_proj", "model.vo.0"),
    (torch.bfloat16, 1e38, "auto", "self_attn.v_proj", "model.vo.0"),
])
def test_half_precision_norms_that_overflow_are_not_taken_for_nan(dtype, peak, solver, weight, instance, tmp_path,
                                                                  monkeypatch):
    """Weights near the dtype's maximum: every value is finite, but norms of their runs in a
    narrow dtype overflow. protect must tell that from a NaN/Inf weight (no error) and report the
    instance's distances as float64 gives them. MLP: float16 weights at 30000 (their squares
    overflow float16; its sums are float32 dot products, which do not) and bfloat16 ones at 1e38 (the runs overflow and the sums are
    taken again in float64; the block and sparse solvers' bfloat16 costs overflow too and are
    multiplied again in float64; `random` multiplies no costs, and its distance after would overflow in
    bfloat16 features, so only the distance before and the base norm are checked there). Attention
    (V/O scales): the bfloat16 runs overflow and are taken again in float64."""
    import importlib

    from mergeshield.core import numeric
    from mergeshield.core.transforms import axis_view

    protect_module = importlib.import_module("mergeshield.protect")
    monkeypatch.setattr(numeric, "SQUARES_EXACT_BELOW", 0)  # the runs path on tiny tensors
    monkeypatch.setattr(protect_module, "SQUARES_EXACT_BELOW", 0)
    base_model = build("llama", 0)
    ft_model = build("llama", 1, finetune_of=base_model)
    module, name = weight.split(".")
    with torch.no_grad():
        for m in (base_model, ft_model):
            w = getattr(getattr(m.model.layers[0], module), name).weight
            w.mul_(peak / w.abs().max())
    save(base_model, tmp_path / "base", dtype=dtype)
    save(ft_model, tmp_path / "ft", dtype=dtype)
    big = Checkpoint(tmp_path / "ft").get(f"model.layers.0.{weight}.weight")
    assert torch.isfinite(big).all() and not torch.isfinite(big.square()).all()
    if dtype == torch.bfloat16:  # narrow runs overflow
        assert not np.isfinite(numeric.runs_square_sum(big))
    else:  # float16 sums in float32
        np.testing.assert_allclose(numeric.runs_square_sum(big), float(big.double().square().sum()), rtol=1e-6)
    report = protect(tmp_path / "ft", tmp_path / "base", tmp_path / "out", ProtectOptions(solver=solver, block_size=16),
                     progress=False)
    (r,) = [r for r in report.instances if r.id == instance]
    ckpt = Checkpoint(tmp_path / "ft")
    (inst,) = [i for i in protect_module.bind_checkpoint(ckpt).instances if i.id == r.id]
    w = {k: _weights(tmp_path / k) for k in ("ft", "base", "out")}
    got = [0.0, 0.0, 0.0]
    for bt in inst.tensors:
        t, p, o = (axis_view(w[k][bt.name], bt.binding).double() for k in ("ft", "base", "out"))
        got = [got[0] + float(((t - p) ** 2).sum()), got[1] + float(((o - p) ** 2).sum()), got[2] + float((p**2).sum())]
    if solver == "random":
        np.testing.assert_allclose([r.task_norm, r.base_norm], np.sqrt([got[0], got[2]]), rtol=1e-4)
    else:
        np.testing.assert_allclose([r.task_norm, r.dist_after, r.base_norm], np.sqrt(got), rtol=1e-4)


def test_verify_computes_in_the_dtype_asked(tmp_path):
    """verify computes both models in float32 unless asked for float16/bfloat16 (as a
    half-precision checkpoint is run): a protected float16 model agrees to float32 rounding in
    float32, and only to half-precision rounding in float16 (its rearranged sums round
    differently there), which the report puts beside the original's own float32-vs-float16
    difference; an unknown dtype is refused by name."""
    base = build("llama", 0)
    save(base, tmp_path / "base", dtype=torch.float16)
    save(build("llama", 1, finetune_of=base), tmp_path / "ft", dtype=torch.float16)
    protect(tmp_path / "ft", tmp_path / "base", tmp_path / "out", progress=False)
    r32 = verify(tmp_path / "ft", tmp_path / "out", generate_tokens=0)
    r16 = verify(tmp_path / "ft", tmp_path / "out", generate_tokens=0, dtype="float16")
    assert r32.dtype == "float32" and "computed in float32" in r32.table() and r32.equivalent
    assert r16.dtype == "float16" and "computed in float16" in r16.table()
    assert r16.diffs[0].max_abs > 10 * r32.diffs[0].max_abs, (r16.diffs, r32.diffs)
    # for scale, the original itself in float32 against float16 (none in float32)
    assert not r32.baseline and [d.name for d in r16.baseline] == [d.name for d in r16.diffs]
    assert r16.baseline[0].max_abs > 10 * r32.diffs[0].max_abs and "float16 arithmetic alone" in r16.table()
    same = verify(tmp_path / "ft", tmp_path / "ft", generate_tokens=0, dtype="bfloat16")
    assert same.equivalent and same.diffs[0].max_abs == 0
    with pytest.raises(ValueError, match="dtype 'int8'"):
        verify(tmp_path / "ft", tmp_path / "out", dtype="int8")
    # a model that takes pixels (drawn in float32) computes in float16 too
    save(build("vit", 0), tmp_path / "vit", dtype=torch.float16)
    assert verify(tmp_path / "vit", tmp_path / "vit", dtype="float16").equivalent
