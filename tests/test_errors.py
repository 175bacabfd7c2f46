"""Bad input gets a clear error, exit code 2 from the CLI, no traceback and no partial output."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import build, save

from mergeshield import ProtectOptions, protect, unprotect
from mergeshield.errors import (
    BaseMismatchError,
    CheckpointError,
    KeyMismatchError,
    NumericError,
    OutputPathError,
    SpecError,
    UnsupportedArchitectureError,
)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _snapshot(*folders: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for f in folders for p in sorted(Path(f).rglob("*")) if p.is_file()}


def _leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if "mergeshield-tmp" in p.name]


@pytest.fixture()
def pair(tiny_pair, tmp_path):
    base, ft, _ = tiny_pair("llama")
    return _copy(base, tmp_path / "base"), _copy(ft, tmp_path / "ft")


def _corrupt_ft(ft: Path, how: str) -> None:
    st = ft / "model.safetensors"
    if how == "missing_config":
        (ft / "config.json").unlink()
    elif how == "bad_config_json":
        (ft / "config.json").write_text("{not json")
    elif how == "config_transformers_refuses":  # valid JSON, every size there, a value of the wrong type
        cfg = json.loads((ft / "config.json").read_text())
        (ft / "config.json").write_text(json.dumps({**cfg, "hidden_act": 3}))
    elif how == "config_without_model_type":
        (ft / "config.json").write_text(json.dumps({"hidden_size": 4}))
    elif how == "missing_weights":
        st.unlink()
    elif how == "truncated":
        data = st.read_bytes()
        st.write_bytes(data[: len(data) // 2])
    elif how == "garbage_header":
        st.write_bytes(b"\xff" * 64)
    elif how == "header_lies_about_offsets":
        data = bytearray(st.read_bytes())
        n = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + n])
        name = next(k for k in header if k != "__metadata__")
        header[name]["data_offsets"][1] += 10**6
        raw = json.dumps(header).encode()
        raw += b" " * (-len(raw) % 8)
        st.write_bytes(len(raw).to_bytes(8, "little") + raw + bytes(data[8 + n :]))
    elif how == "nan_weight":
        w = load_file(st)
        w["model.layers.1.mlp.up_proj.weight"][0, 0] = float("nan")
        save_file(w, st, metadata={"format": "pt"})
    elif how == "inf_invariant":
        w = load_file(st)
        w["model.norm.weight"][0] = float("inf")
        save_file(w, st, metadata={"format": "pt"})
    elif how == "int8_quantised":
        w = load_file(st)
        w["model.layers.0.mlp.up_proj.weight"] = w["model.layers.0.mlp.up_proj.weight"].to(torch.int8)
        save_file(w, st, metadata={"format": "pt"})
    elif how == "unknown_model_type":
        cfg = json.loads((ft / "config.json").read_text())
        cfg["model_type"] = "mamba"
        (ft / "config.json").write_text(json.dumps(cfg))
    elif how == "extra_unknown_tensor":
        w = load_file(st)
        w["model.layers.0.adapter.weight"] = torch.zeros(3)
        save_file(w, st, metadata={"format": "pt"})
    elif how == "missing_layer_tensor":
        w = load_file(st)
        del w["model.layers.1.mlp.down_proj.weight"]
        save_file(w, st, metadata={"format": "pt"})
    else:
        raise AssertionError(how)


CASES = {
    "missing_config": (CheckpointError, "config.json"),
    "bad_config_json": (CheckpointError, "JSON"),
    "config_without_model_type": (CheckpointError, "model_type"),
    "config_transformers_refuses": (CheckpointError, "transformers cannot read it"),
    "missing_weights": (CheckpointError, "no weights found"),
    "truncated": (CheckpointError, "truncated or corrupt"),
    "garbage_header": (CheckpointError, "truncated or corrupt"),
    "header_lies_about_offsets": (CheckpointError, "corrupt"),
    "nan_weight": (NumericError, "NaN/Inf"),
    "inf_invariant": (NumericError, "NaN/Inf"),
    "int8_quantised": (NumericError, "Dequantise"),
    "unknown_model_type": (UnsupportedArchitectureError, "Supported model types"),
    "extra_unknown_tensor": (SpecError, "adapter"),
    "missing_layer_tensor": (SpecError, "down_proj"),
}


@pytest.mark.parametrize("how", sorted(CASES))
def test_bad_model_is_refused_clearly_and_leaves_nothing(pair, tmp_path, how):
    base, ft = pair
    _corrupt_ft(ft, how)
    before = _snapshot(base, ft)
    err, text = CASES[how]
    with pytest.raises(err, match=text):
        protect(ft, base, tmp_path / "out", key_out=tmp_path / "key", progress=False)
    assert not (tmp_path / "out").exists() and not (tmp_path / "key").exists()
    assert _leftovers(tmp_path) == []
    assert _snapshot(base, ft) == before


@pytest.mark.parametrize(("side", "name", "value"), [
    ("ft", "model.layers.0.self_attn.q_proj.weight", float("nan")),
    ("ft", "model.layers.1.self_attn.o_proj.weight", float("inf")),
    ("base", "model.layers.1.self_attn.k_proj.weight", float("-inf")),
    ("base", "model.layers.0.self_attn.v_proj.weight", float("nan")),
    ("ft", "model.layers.0.mlp.gate_proj.weight", float("nan")),
    ("base", "model.layers.1.mlp.down_proj.weight", float("inf")),
])
def test_non_finite_bound_weight_in_either_model_is_refused(pair, tmp_path, side, name, value):
    """The attention scales and the MLP permutations find NaN/Inf through their distance sums (no
    separate pass): a bad value in the model's or the base's bound tensors is still refused,
    naming the tensor."""
    base, ft = pair
    st = {"ft": ft, "base": base}[side] / "model.safetensors"
    w = load_file(st)
    w[name][1, 2] = value
    save_file(w, st, metadata={"format": "pt"})
    before = _snapshot(base, ft)
    with pytest.raises(NumericError, match=f"{name}.*NaN/Inf"):
        protect(ft, base, tmp_path / "out", key_out=tmp_path / "key", progress=False)
    assert not (tmp_path / "out").exists() and not (tmp_path / "key").exists()
    assert _snapshot(base, ft) == before


@pytest.mark.parametrize("solver", ["block", "exact"])
def test_mlp_weights_whose_products_overflow_float64_are_refused(tmp_path, solver):
    """Finite float64 MLP weights so large (1e160) that their products overflow even in float64:
    no assignment can be computed; refused by name with the magnitude found, nothing written (it
    raised a bare NonFiniteCosts before, a traceback at the command line)."""
    base_model = build("llama", 0)
    ft_model = build("llama", 1, finetune_of=base_model)
    with torch.no_grad():
        for m in (base_model, ft_model):
            m.double()
            w = m.model.layers[0].mlp.up_proj.weight
            w.mul_(1e160 / w.abs().max())
    base, ft = save(base_model, tmp_path / "base"), save(ft_model, tmp_path / "ft")
    before = _snapshot(base, ft)
    with pytest.raises(NumericError, match=r"model.mlp.0 .*up_proj.*magnitude 1e\+160.*overflow even in float64"):
        protect(ft, base, tmp_path / "out", ProtectOptions(solver=solver, block_size=16), key_out=tmp_path / "key",
                progress=False)
    assert not (tmp_path / "out").exists() and not (tmp_path / "key").exists() and _leftovers(tmp_path) == []
    assert _snapshot(base, ft) == before


def test_base_of_another_width_is_refused(tiny_pair, tmp_path):
    import transformers as T

    _, ft, _ = tiny_pair("llama")
    other = T.LlamaForCausalLM(T.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, vocab_size=128))
    save(other, tmp_path / "base")
    with pytest.raises(BaseMismatchError, match="not the model's pretrained"):
        protect(ft, tmp_path / "base", tmp_path / "out", progress=False)


def test_base_of_another_depth_is_refused(tiny_pair, tmp_path):
    import transformers as T

    _, ft, _ = tiny_pair("llama")
    other = T.LlamaForCausalLM(T.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                                             num_attention_heads=4, num_key_value_heads=2, vocab_size=128))
    save(other, tmp_path / "base")
    with pytest.raises(BaseMismatchError, match="num_hidden_layers: model 2 vs base 1"):
        protect(ft, tmp_path / "base", tmp_path / "out", progress=False)


def test_base_of_another_architecture_is_refused(tiny_pair, tmp_path):
    base, _, _ = tiny_pair("gpt2")
    _, ft, _ = tiny_pair("llama")
    with pytest.raises(BaseMismatchError, match="'gpt2'"):
        protect(ft, base, tmp_path / "out", progress=False)


def test_unrelated_base_is_warned_about(tiny_pair, tmp_path):
    import transformers as T
    from tiny_models import TINY

    _, ft, _ = tiny_pair("llama")
    torch.manual_seed(123)
    save(T.LlamaForCausalLM(TINY["llama"][2]), tmp_path / "base")
    report = protect(ft, tmp_path / "base", tmp_path / "out", progress=False)
    assert any("implausibly large" in n for n in report.notes)


@pytest.mark.parametrize("where", ["equal_to_model", "inside_model", "equal_to_base", "contains_model"])
def test_output_overlapping_an_input_is_refused(pair, tmp_path, where):
    base, ft = pair
    out = {"equal_to_model": ft, "inside_model": ft / "sub", "equal_to_base": base, "contains_model": tmp_path}[where]
    before = _snapshot(base, ft)
    with pytest.raises(OutputPathError, match="overlaps|is input"):
        protect(ft, base, out, progress=False, overwrite=True)
    assert _snapshot(base, ft) == before


def test_existing_output_needs_overwrite_and_is_replaced_whole(pair, tmp_path):
    base, ft = pair
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("old")
    with pytest.raises(OutputPathError, match="--overwrite"):
        protect(ft, base, tmp_path / "out", progress=False)
    assert (tmp_path / "out" / "old.txt").exists()
    protect(ft, base, tmp_path / "out", progress=False, overwrite=True)
    assert not (tmp_path / "out" / "old.txt").exists() and (tmp_path / "out" / "model.safetensors").exists()
    assert _leftovers(tmp_path) == []


def test_failure_mid_write_leaves_no_output(pair, tmp_path, monkeypatch):
    import mergeshield.io.checkpoint as io

    base, ft = pair
    calls = {"n": 0}
    real_init = io.ShardWriter.__init__

    class FullDisk:  # the output file (header already written): the disk fills up on the fourth tensor
        def __init__(self, f):
            self.f = f

        def write(self, data):
            calls["n"] += 1
            if calls["n"] == 4:
                raise OSError(28, "No space left on device")
            return self.f.write(data)

        def close(self):
            self.f.close()

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        self._file = FullDisk(self._file)

    monkeypatch.setattr(io.ShardWriter, "__init__", init)
    with pytest.raises(OSError, match=r"No space left on device while writing .*model\.safetensors.*disk is full"):
        protect(ft, base, tmp_path / "out", key_out=tmp_path / "key", progress=False)
    assert calls["n"] == 4 and not (tmp_path / "out").exists() and not (tmp_path / "key").exists()
    assert _leftovers(tmp_path) == []


def test_sharded_index_naming_a_missing_shard(tmp_path):
    base = build("gpt2", 0)
    save(base, tmp_path / "base")
    save(build("gpt2", 1, finetune_of=base), tmp_path / "ft", max_shard_size="20KB")
    shard = sorted((tmp_path / "ft").glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(CheckpointError, match="does not exist"):
        protect(tmp_path / "ft", tmp_path / "base", tmp_path / "out", progress=False)


def test_sharded_index_naming_a_tensor_no_shard_has(tmp_path):
    base = build("gpt2", 0)
    save(base, tmp_path / "base")
    save(build("gpt2", 1, finetune_of=base), tmp_path / "ft", max_shard_size="20KB")
    index_path = tmp_path / "ft" / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["ghost.weight"] = next(iter(index["weight_map"].values()))
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="ghost.weight"):
        protect(tmp_path / "ft", tmp_path / "base", tmp_path / "out", progress=False)


class _Payload:
    def __reduce__(self):
        return (print, ("PAYLOAD-RAN",))


def test_pickle_with_code_is_refused_and_nothing_runs(tmp_path, capfd):
    base = build("bert", 0)
    save(base, tmp_path / "base")
    (tmp_path / "ft").mkdir()
    base.config.save_pretrained(tmp_path / "ft")
    torch.save({"x": _Payload()}, tmp_path / "ft" / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="weights_only"):
        protect(tmp_path / "ft", tmp_path / "base", tmp_path / "out", progress=False)
    assert "PAYLOAD-RAN" not in capfd.readouterr().out


def test_unprotect_with_a_key_for_another_model_is_refused(tiny_pair, tmp_path):
    base, ft, ft2 = tiny_pair("llama")
    protect(ft, base, tmp_path / "p1", key_out=tmp_path / "k1", progress=False)
    protect(ft2, base, tmp_path / "p2", key_out=tmp_path / "k2", progress=False)
    with pytest.raises(KeyMismatchError, match="does not belong"):
        unprotect(tmp_path / "p1", tmp_path / "k2", tmp_path / "r", progress=False)
    assert not (tmp_path / "r").exists()
    g_base, g_ft, _ = tiny_pair("gpt2")
    protect(g_ft, g_base, tmp_path / "p3", key_out=tmp_path / "k3", progress=False)
    with pytest.raises(KeyMismatchError, match="'gpt2'"):
        unprotect(tmp_path / "p1", tmp_path / "k3", tmp_path / "r", progress=False)
    (tmp_path / "notakey").write_bytes(b"hello")
    with pytest.raises(KeyMismatchError, match="cannot be read"):
        unprotect(tmp_path / "p1", tmp_path / "notakey", tmp_path / "r", progress=False)
    # a key whose layers have other sizes (a wider model of the same architecture): refused before
    # any work, with a message that says so
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(tmp_path / "k1", framework="pt") as f:
        tensors, meta = {n: f.get_tensor(n) for n in f.keys()}, f.metadata()
    name = next(n for n in tensors if n.startswith("perm::"))
    tensors[name] = torch.cat([tensors[name], torch.tensor([len(tensors[name])])])
    save_file(tensors, str(tmp_path / "k4"), metadata=meta)
    with pytest.raises(KeyMismatchError, match="other sizes"):
        unprotect(tmp_path / "p1", tmp_path / "k4", tmp_path / "r", progress=False)
    assert not (tmp_path / "r").exists()
    # a damaged key of the right sizes (which would restore wrong weights): refused, nothing written
    with safe_open(tmp_path / "k1", framework="pt") as f:
        tensors = {n: f.get_tensor(n) for n in f.keys()}
    scale = next(n for n in tensors if n.startswith("scale::"))
    for damage, match in (("perm", "not a permutation"), ("zero", "zero scale factor"), ("nan", "NaN or Inf")):
        bad = {n: t.clone() for n, t in tensors.items()}
        if damage == "perm":
            bad[name][1] = bad[name][0]
        else:
            bad[scale][0] = 0.0 if damage == "zero" else float("nan")
        save_file(bad, str(tmp_path / "k5"), metadata=meta)
        with pytest.raises(KeyMismatchError, match=match):
            unprotect(tmp_path / "p1", tmp_path / "k5", tmp_path / "r", progress=False)
        assert not (tmp_path / "r").exists()


def test_bad_options_are_refused():
    with pytest.raises(ValueError):
        ProtectOptions(scale_low=5, scale_high=1)
    with pytest.raises(ValueError):
        ProtectOptions(scale_law="gaussian")
    with pytest.raises(ValueError):
        ProtectOptions(seed=1, colour="red")
    for device in ("gpu", "cuda:x", "mps", ""):
        with pytest.raises(ValueError, match="use cpu, cuda, cuda:N or auto"):
            ProtectOptions(device=device)


@pytest.mark.skipif(torch.cuda.device_count() > 1, reason="this machine has the GPUs asked for")
def test_missing_gpu_is_refused_and_leaves_nothing(tiny_pair, tmp_path):
    """--device cuda without a GPU this torch can use: DeviceError naming what torch sees, before
    anything is written; the CLI says it in one message with exit code 2."""
    from mergeshield.errors import DeviceError

    base, ft, _ = tiny_pair("llama")
    device = "cuda" if not torch.cuda.is_available() else "cuda:1"
    with pytest.raises(DeviceError, match=r"sees \d CUDA device\(s\)"):
        protect(ft, base, tmp_path / "p", ProtectOptions(device=device), progress=False)
    assert not (tmp_path / "p").exists()
    res = _cli("protect", str(ft), "--base", str(base), "--out", str(tmp_path / "p"), "--device", device, "--quiet")
    assert res.returncode == 2 and "error: device" in res.stderr and "Traceback" not in res.stderr, res.stderr
    assert not (tmp_path / "p").exists()


def test_device_auto_takes_a_gpu_only_where_torch_sees_one(tiny_pair, tmp_path):
    """``--device auto``: the costs go to a GPU where torch sees one and stay on the CPU otherwise;
    the key records which (the bytes depend on it), and the report names a GPU when one was used."""
    from mergeshield.protect import _read_key

    base, ft, _ = tiny_pair("llama")
    report = protect(ft, base, tmp_path / "p", ProtectOptions(device="auto", solver="block", block_size=16),
                     key_out=tmp_path / "k", progress=False)
    want = "cuda" if torch.cuda.is_available() else "cpu"
    assert _read_key(tmp_path / "k")[1]["device"] == want
    mlp = [r for r in report.instances if r.kind == "permutation"]
    assert mlp and all(("costs on cuda" in r.detail) == (want == "cuda") for r in mlp)


# ---- the CLI: message, exit code 2, no traceback -------------------------------------------------
def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mergeshield.cli", *args], capture_output=True, text=True, timeout=120)


def test_cli_error_is_one_message_without_traceback(pair, tmp_path):
    base, ft = pair
    _corrupt_ft(ft, "truncated")
    res = _cli("protect", str(ft), "--base", str(base), "--out", str(tmp_path / "out"), "--quiet")
    assert res.returncode == 2
    assert "error:" in res.stderr and "truncated or corrupt" in res.stderr
    assert "Traceback" not in res.stderr + res.stdout
    res = _cli("--debug", "protect", str(ft), "--base", str(base), "--out", str(tmp_path / "out"), "--quiet")
    assert "Traceback" in res.stderr


def test_cli_exit_code_2_for_several_faults(pair, tmp_path):
    base, ft = pair
    cases = [
        ["protect", str(ft), "--base", str(tmp_path / "nope"), "--out", str(tmp_path / "o")],
        ["protect", str(ft), "--base", str(base), "--out", str(ft)],
        ["protect", str(ft), "--base", str(base), "--out", str(tmp_path / "o"), "--scale-low", "5", "--scale-high", "1"],
        ["unprotect", str(ft), "--key", str(tmp_path / "nokey"), "--out", str(tmp_path / "o")],
        ["merge", str(ft), "--base", str(base), "--out", str(tmp_path / "o"), "--method", "slerp"],
    ]
    for args in cases:
        res = subprocess.run([sys.executable, "-m", "mergeshield.cli", *args, "--quiet"] if args[0] != "merge"
                             else [sys.executable, "-m", "mergeshield.cli", *args], capture_output=True, text=True)
        assert res.returncode == 2, (args, res.stderr)
        assert "error:" in res.stderr and "Traceback" not in res.stderr, res.stderr
    assert not (tmp_path / "o").exists()


def test_subfolder_with_weights_is_refused_not_shipped(pair, tmp_path):
    base, ft = pair
    (ft / "checkpoint-500").mkdir()
    shutil.copy(ft / "model.safetensors", ft / "checkpoint-500" / "model.safetensors")
    with pytest.raises(CheckpointError, match="unprotected weights"):
        protect(ft, base, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []
