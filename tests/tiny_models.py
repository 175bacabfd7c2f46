"""Tiny random models of every supported family, built offline from configs.

Each entry gives the base class (what a pretrained checkpoint is saved as), the fine-tuned
class (with a task head where the family has one) and a config. A "fine-tune" is the base
plus a small random perturbation of every weight, and a freshly initialised head.
"""

from __future__ import annotations

from pathlib import Path

import torch
import transformers as T

GQA = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, vocab_size=128, max_position_embeddings=64, initializer_range=0.2)

TINY: dict[str, tuple[str, str, T.PretrainedConfig]] = {
    "bert": ("BertModel", "BertForSequenceClassification",
             T.BertConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                          vocab_size=128, max_position_embeddings=64, num_labels=3, initializer_range=0.2)),
    "roberta": ("RobertaModel", "RobertaForSequenceClassification",
                T.RobertaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                                vocab_size=128, max_position_embeddings=70, num_labels=2, initializer_range=0.2)),
    "vit": ("ViTModel", "ViTForImageClassification",
            T.ViTConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                        image_size=16, patch_size=4, num_labels=5, initializer_range=0.2)),
    "clip": ("CLIPModel", "CLIPModel",
             T.CLIPConfig(text_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                           num_attention_heads=4, vocab_size=128, max_position_embeddings=32,
                                           bos_token_id=0, eos_token_id=1, pad_token_id=1),
                          vision_config=dict(hidden_size=40, intermediate_size=56, num_hidden_layers=2,
                                             num_attention_heads=5, image_size=16, patch_size=4),
                          projection_dim=16, initializer_factor=5.0)),
    "gpt2": ("GPT2LMHeadModel", "GPT2LMHeadModel",
             T.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=128, n_positions=64,
                          bos_token_id=0, eos_token_id=1, initializer_range=0.2)),
    "llama": ("LlamaForCausalLM", "LlamaForCausalLM",
              T.LlamaConfig(**GQA, tie_word_embeddings=True, bos_token_id=0, eos_token_id=1)),
    "mistral": ("MistralForCausalLM", "MistralForCausalLM",
                T.MistralConfig(**GQA, bos_token_id=0, eos_token_id=1)),
    "qwen2": ("Qwen2ForCausalLM", "Qwen2ForCausalLM",
              T.Qwen2Config(**{**GQA, "num_key_value_heads": 1}, bos_token_id=0, eos_token_id=1)),
}


def build(family: str, seed: int, finetune_of: torch.nn.Module | None = None, scale: float = 0.05) -> torch.nn.Module:
    base_cls, ft_cls, config = TINY[family]
    torch.manual_seed(seed)
    cls = getattr(T, ft_cls if finetune_of is not None else base_cls)
    model = cls(config).eval()
    if finetune_of is not None:
        ref = finetune_of.state_dict()
        gen = torch.Generator().manual_seed(seed + 1000)
        with torch.no_grad():
            for name, p in model.named_parameters():
                for cand in (name, name.split(".", 1)[-1]):
                    if cand in ref and ref[cand].shape == p.shape:
                        spread = ref[cand].std().clamp_min(1e-3) if ref[cand].numel() > 1 else torch.tensor(0.01)
                        p.copy_(ref[cand] + scale * spread
                                * torch.randn(p.shape, generator=gen))
                        break
    return model


def save(model: torch.nn.Module, folder: Path, dtype: torch.dtype | None = None, **kwargs: object) -> Path:
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(folder, **kwargs)
    return folder
