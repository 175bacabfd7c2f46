"""The architecture descriptions: strict schema, registry coverage, binding errors, RoPE/GQA algebra."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny_models import TINY

from mergeshield.core.transforms import expand_factors
from mergeshield.errors import SpecError, UnsupportedArchitectureError
from mergeshield.symmetry.registry import family_for_model_type, get_family, list_families, load_family_file
from mergeshield.symmetry.spec import ScaleSpace, SpaceInstance, bind


def test_every_registered_model_type_has_a_tiny_model():
    covered = {cfg.model_type for _, _, cfg in TINY.values()}
    for name in list_families():
        for model_type in get_family(name).model_types:
            assert model_type in covered, f"add a tiny {model_type} config to tests/tiny_models.py"


def test_list_families_wildcard():
    assert list_families("l*") == ["llama"]
    assert set(list_families()) == {"bert", "clip", "gpt2", "llama", "vit"}


def test_unknown_model_type_lists_supported_and_fix():
    with pytest.raises(UnsupportedArchitectureError) as exc:
        family_for_model_type("mamba")
    msg = str(exc.value)
    assert "'mamba'" in msg and "llama" in msg and "family file" in msg


def test_schema_rejects_unknown_fields():
    text = (get_family("bert").model_dump_json())
    import json

    data = json.loads(text)
    data["spaces"][0]["bindings"][0]["axes"] = 1  # typo of "axis"
    import yaml

    with pytest.raises(SpecError, match="axes"):
        load_family_file(yaml.safe_dump(data), "typo.yaml")


def test_bad_yaml_is_a_spec_error():
    with pytest.raises(SpecError, match="not valid YAML"):
        load_family_file("spaces: [", "broken.yaml")


def test_unbound_tensor_is_an_error(tiny_pair):
    from mergeshield.io.checkpoint import Checkpoint

    _, ft, _ = tiny_pair("llama")
    ckpt = Checkpoint(ft)
    shapes = {**ckpt.shapes(), "model.layers.0.mystery.weight": (4, 4)}
    with pytest.raises(SpecError, match="mystery"):
        bind(get_family("llama"), ckpt.full_config(), shapes)


def test_config_width_disagreeing_with_weights_is_an_error(tiny_pair):
    from mergeshield.io.checkpoint import Checkpoint

    _, ft, _ = tiny_pair("bert")
    ckpt = Checkpoint(ft)
    cfg = {**ckpt.full_config(), "intermediate_size": 999}
    with pytest.raises(SpecError, match="999"):
        bind(get_family("bert"), cfg, ckpt.shapes())


def _instance(heads: int, groups: int, head_dim: int, rope: str) -> SpaceInstance:
    space = ScaleSpace.model_validate({
        "kind": "scale", "name": "qk", "role": "qk", "heads": "h", "head_dim": "d", "rope": rope,
        "bindings": [{"tensor": "q", "axis": 0, "layout": "q"}, {"tensor": "k", "axis": 0, "inverse": True}],
    })
    per_head = head_dim // 2 if rope != "none" else head_dim
    return SpaceInstance("x", space, (), heads * per_head, heads, heads * groups, head_dim)


@settings(max_examples=60, deadline=None)
@given(
    heads=st.integers(1, 4), groups=st.integers(1, 3), half=st.integers(1, 4),
    rope=st.sampled_from(["none", "rotate_half", "interleaved"]), seed=st.integers(0, 2**32 - 1),
)
def test_expanded_factors_respect_rope_pairs_and_gqa_groups(heads, groups, half, rope, seed):
    head_dim = 2 * half
    inst = _instance(heads, groups, head_dim, rope)
    free = np.random.default_rng(seed).uniform(0.1, 10, inst.size)
    kv = expand_factors(inst, free, "kv").reshape(heads, head_dim)
    q = expand_factors(inst, free, "q").reshape(heads * groups, head_dim)
    # every query head of a group uses its K/V head's factors (HF repeat_kv order)
    for h in range(heads * groups):
        np.testing.assert_array_equal(q[h], kv[h // groups])
    if rope == "rotate_half":
        np.testing.assert_array_equal(kv[:, :half], kv[:, half:])
    elif rope == "interleaved":
        np.testing.assert_array_equal(kv[:, 0::2], kv[:, 1::2])
    assert len(np.unique(free)) == len(free) and set(np.unique(kv)) == set(free)


@pytest.mark.parametrize("family", sorted(TINY))
def test_every_tiny_checkpoint_binds_completely(tiny_pair, family):
    from mergeshield.io.checkpoint import Checkpoint

    _, ft, _ = tiny_pair(family)
    ckpt = Checkpoint(ft)
    bound = bind(family_for_model_type(ckpt.model_type), ckpt.full_config(), ckpt.shapes())
    kinds = {inst.space.kind for inst in bound.instances}
    assert kinds == {"permutation", "scale", "head_permutation"}
    layers = 2 * (2 if family == "clip" else 1)  # CLIP has two towers
    mlp = [i for i in bound.instances if i.space.kind == "permutation" and i.id != "residual"]
    assert len(mlp) == layers
    # one residual-stream instance for the whole model (clip's towers are not described)
    residual = [i for i in bound.instances if i.id == "residual"]
    assert len(residual) == (family != "clip")
    if residual:
        names = {bt.name for bt in residual[0].tensors}
        assert len(names) == len(residual[0].tensors)  # no tensor bound twice
        # every layer's norms and the embedding are on it
        assert sum("norm" in n.lower() or "ln_" in n for n in names) >= 2 * 2
    assert sum(inst.space.kind == "head_permutation" for inst in bound.instances) == layers
