"""More faults: layouts that lie, links, permissions, precision, ties, signals, concurrency, fuzzing."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import build, save

from mergeshield import protect, verify
from mergeshield.errors import BaseMismatchError, CheckpointError, NumericError, SpecError

sys.path.insert(0, str(Path(__file__).parents[1] / "fuzzing"))


def _snapshot(*folders: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for f in folders for p in sorted(Path(f).rglob("*")) if p.is_file()}


def _no_leftovers(parent: Path) -> bool:
    return not [p for p in parent.iterdir() if "mergeshield-tmp" in p.name or "mergeshield-old" in p.name]


@pytest.fixture()
def pair(tiny_pair, tmp_path):
    base, ft, _ = tiny_pair("llama")
    return Path(shutil.copytree(base, tmp_path / "base")), Path(shutil.copytree(ft, tmp_path / "ft"))


def _sharded_gpt2(tmp: Path) -> tuple[Path, Path]:
    base = build("gpt2", 0)
    save(base, tmp / "base")
    save(build("gpt2", 1, finetune_of=base), tmp / "ft", max_shard_size="20KB")
    return tmp / "base", tmp / "ft"


def test_tensor_in_two_shards(tmp_path):
    base, ft = _sharded_gpt2(tmp_path)
    index = json.loads((ft / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    name, home = next((n, f) for n, f in index["weight_map"].items() if f == files[0])
    other = load_file(ft / files[1])
    other[name] = load_file(ft / home)[name]
    save_file(other, ft / files[1], metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="does not list"):
        protect(ft, base, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("content,msg", [("{not json", "not a valid shard index"), ('{"metadata": {}}', "not a valid shard index"),
                                         ('{"weight_map": {"x": "../evil.safetensors"}}', "does not exist")])
def test_bad_index_files(tmp_path, content, msg):
    base, ft = _sharded_gpt2(tmp_path)
    (ft / "model.safetensors.index.json").write_text(content)
    (tmp_path / "evil.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match=msg):
        protect(ft, base, tmp_path / "out", progress=False)


def test_symlink_loop_and_dangling_link(pair, tmp_path):
    base, ft = pair
    (ft / "model.safetensors").unlink()
    os.symlink("model.safetensors", ft / "model.safetensors")  # points at itself
    with pytest.raises(CheckpointError, match="no weights found"):
        protect(ft, base, tmp_path / "out", progress=False)
    (ft / "model.safetensors").unlink()
    os.symlink(tmp_path / "nowhere.safetensors", ft / "model.safetensors")
    with pytest.raises(CheckpointError, match="no weights found"):
        protect(ft, base, tmp_path / "out", progress=False)


def test_empty_weights_file_and_directory_named_like_weights(pair, tmp_path):
    base, ft = pair
    (ft / "model.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        protect(ft, base, tmp_path / "out", progress=False)
    (ft / "model.safetensors").unlink()
    (ft / "model.safetensors").mkdir()
    with pytest.raises(CheckpointError, match="no weights found"):
        protect(ft, base, tmp_path / "out", progress=False)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permission bits")
def test_unreadable_files(pair, tmp_path):
    base, ft = pair
    (ft / "model.safetensors").chmod(0)
    with pytest.raises(CheckpointError):
        protect(ft, base, tmp_path / "out", progress=False)


def test_model_path_is_a_file_and_base_does_not_exist(pair, tmp_path):
    base, ft = pair
    with pytest.raises(CheckpointError, match="is a file, not a folder"):
        protect(ft / "config.json", base, tmp_path / "out", progress=False)
    with pytest.raises(CheckpointError, match="no such folder"):
        protect(ft, tmp_path / "missing", tmp_path / "out", progress=False)


def test_float8_weights_are_refused(pair, tmp_path):
    base, ft = pair
    w = load_file(ft / "model.safetensors")
    w["model.layers.0.mlp.gate_proj.weight"] = w["model.layers.0.mlp.gate_proj.weight"].to(torch.float8_e4m3fn)
    save_file(w, ft / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(NumericError, match="float8"):
        protect(ft, base, tmp_path / "out", progress=False)


def test_integer_buffers_are_copied_unchanged(tiny_pair, tmp_path):
    base, ft, _ = tiny_pair("bert")
    w = load_file(Path(ft) / "model.safetensors")
    w["bert.embeddings.position_ids"] = torch.arange(64).unsqueeze(0)
    shutil.copytree(ft, tmp_path / "ft")
    save_file(w, tmp_path / "ft" / "model.safetensors", metadata={"format": "pt"})
    protect(tmp_path / "ft", base, tmp_path / "out", progress=False)
    out = load_file(tmp_path / "out" / "model.safetensors")
    assert torch.equal(out["bert.embeddings.position_ids"], torch.arange(64).unsqueeze(0))


def test_tied_embeddings_stored_once_or_twice(tiny_pair, tmp_path):
    base, ft, _ = tiny_pair("llama")  # tie_word_embeddings: lm_head absent from the file
    assert "lm_head.weight" not in load_file(Path(ft) / "model.safetensors")
    protect(ft, base, tmp_path / "once", progress=False)
    assert verify(ft, tmp_path / "once").equivalent
    w = load_file(Path(ft) / "model.safetensors")
    w["lm_head.weight"] = w["model.embed_tokens.weight"].clone()
    shutil.copytree(ft, tmp_path / "ft2")
    save_file(w, tmp_path / "ft2" / "model.safetensors", metadata={"format": "pt"})
    protect(tmp_path / "ft2", base, tmp_path / "twice", progress=False)
    out = load_file(tmp_path / "twice" / "model.safetensors")
    assert torch.equal(out["lm_head.weight"], out["model.embed_tokens.weight"])
    assert verify(tmp_path / "ft2", tmp_path / "twice").equivalent


def test_base_with_another_vocabulary(tiny_pair, tmp_path):
    import transformers as T
    from tiny_models import TINY

    _, ft, _ = tiny_pair("llama")
    cfg = TINY["llama"][2].to_dict()
    cfg["vocab_size"] = 200
    save(T.LlamaForCausalLM(T.LlamaConfig.from_dict(cfg)), tmp_path / "base")
    with pytest.raises(BaseMismatchError, match=r"embed_tokens.weight: model \(128, 64\) vs base \(200, 64\)"):
        protect(ft, tmp_path / "base", tmp_path / "out", progress=False)


def test_config_head_count_disagreeing_with_weights(pair, tmp_path):
    base, ft = pair
    cfg = json.loads((ft / "config.json").read_text())
    cfg["num_key_value_heads"] = 4
    (ft / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(SpecError, match="config implies"):
        protect(ft, base, tmp_path / "out", progress=False)


def _big(tmp: Path) -> tuple[Path, Path]:
    import transformers as T

    cfg = T.LlamaConfig(hidden_size=512, intermediate_size=2048, num_hidden_layers=8, num_attention_heads=8,
                        num_key_value_heads=4, vocab_size=256)
    torch.manual_seed(0)
    m = T.LlamaForCausalLM(cfg)
    m.save_pretrained(tmp / "base", max_shard_size="8MB")
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.01 * torch.randn_like(p))
    m.save_pretrained(tmp / "ft", max_shard_size="8MB")
    return tmp / "base", tmp / "ft"


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_leaves_no_output(tmp_path, sig):
    base, ft = _big(tmp_path)
    before = _snapshot(base, ft)
    proc = subprocess.Popen([sys.executable, "-m", "mergeshield.cli", "protect", str(ft), "--base", str(base),
                             "--out", str(tmp_path / "out"), "--solver", "exact"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while time.time() < deadline and not any("mergeshield-tmp" in p.name for p in tmp_path.iterdir()):
        time.sleep(0.05)
    time.sleep(0.3)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode != 0, out
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists() and _no_leftovers(tmp_path)
    assert _snapshot(base, ft) == before


def test_concurrent_runs_do_not_interfere(tiny_pair, tmp_path):
    base, ft, _ = tiny_pair("qwen2")
    protect(ft, base, tmp_path / "seq", progress=False)
    errors: list[BaseException] = []

    def run(name: str) -> None:
        try:
            protect(ft, base, tmp_path / name, progress=False)
        except BaseException as exc:  # noqa: BLE001 - collected for the assertion
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(f"par{i}",)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for i in range(3):
        assert _snapshot(tmp_path / f"par{i}").values() and list(_snapshot(tmp_path / f"par{i}").values()) == list(
            _snapshot(tmp_path / "seq").values())
    assert _no_leftovers(tmp_path)


def test_cli_errors_for_several_faults(pair, tmp_path):
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


# ---- fuzzing (brief here; FUZZ_EXAMPLES=20000 for a long run) -------------------------------------
def test_fuzz_safetensors_reader():
    from targets import fuzz_safetensors

    fuzz_safetensors()


def test_fuzz_shard_index():
    from targets import fuzz_index

    fuzz_index()


def test_fuzz_family_loader():
    from targets import fuzz_family_file

    fuzz_family_file()
