"""Check that two checkpoints compute the same function (logits, hidden states, generations).

Both folders are loaded with transformers for their architecture (``config.architectures``) in
float32, and run on the same probe inputs: real text through the model's tokenizer when the
folder has one, valid random token ids or pixel tensors otherwise, or the user's own texts.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mergeshield.errors import CheckpointError, MergeShieldError
from mergeshield.io.checkpoint import Checkpoint

__all__ = ["verify", "VerifyReport", "OutputDiff", "load_model", "PROBE_TEXTS"]

PROBE_TEXTS = (
    "The central bank raised interest rates by a quarter point on Thursday.",
    "A gripping, beautifully acted film that stays with you long after the credits.",
    "Scientists have discovered a new species of frog in the rainforests of Ecuador.",
    "The striker scored twice in the second half to secure a comfortable win.",
    "Please reply to confirm your attendance at the meeting next week.",
    "def add(a, b):\n    return a + b",
    "Paris is the capital of",
    "Once upon a time, in a small village by the sea,",
)


@dataclass(frozen=True)
class OutputDiff:
    name: str
    max_abs: float
    max_rel: float
    """max |a - b| / max |a| over the output."""
    top1_agreement: float | None = None


@dataclass
class VerifyReport:
    architecture: str
    probe: str
    diffs: list[OutputDiff] = field(default_factory=list)
    generations_equal: bool | None = None
    generations: list[tuple[str, str]] = field(default_factory=list)
    rtol: float = 1e-4
    dtype: str = "float32"
    """What both models computed in."""
    baseline: list[OutputDiff] = field(default_factory=list)
    """Half precision only: the original model computed in float32 against itself computed in
    `dtype`: how far that arithmetic alone moves the outputs (context for choosing `rtol`)."""
    baseline_generations_equal: bool | None = None

    @property
    def equivalent(self) -> bool:
        ok = all(d.max_rel <= self.rtol for d in self.diffs) and all(
            d.top1_agreement in (None, 1.0) for d in self.diffs
        )
        return ok and self.generations_equal is not False and bool(self.diffs)

    def table(self) -> str:
        lines = [f"architecture: {self.architecture}; probe: {self.probe}; computed in {self.dtype}; rtol {self.rtol:g}",
                 *_lines(self.diffs, self.generations_equal)]
        if self.baseline:
            lines.append(f"  for scale, {self.dtype} arithmetic alone (the original computed in float32 and in {self.dtype}):")
            lines += _lines(self.baseline, self.baseline_generations_equal)
        lines.append("EQUIVALENT" if self.equivalent else "NOT EQUIVALENT")
        return "\n".join(lines)


def _lines(diffs: list[OutputDiff], generations_equal: bool | None) -> list[str]:
    """One line per compared output, and one for the greedy generations if compared."""
    lines = []
    for d in diffs:
        top1 = "" if d.top1_agreement is None else f"  top-1 agreement {d.top1_agreement:.3f}"
        lines.append(f"  {d.name:<22} max abs {d.max_abs:.3e}  max rel {d.max_rel:.3e}{top1}")
    if generations_equal is not None:
        lines.append(f"  greedy generations identical: {generations_equal}")
    return lines


def load_model(folder: str | os.PathLike[str], dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """Load a checkpoint folder with the transformers class its config names (or AutoModel)."""
    import transformers

    ckpt = Checkpoint(folder)  # validates the folder with clear errors first
    archs = ckpt.config.get("architectures") or []
    cls: Any = getattr(transformers, archs[0], None) if archs else None
    if cls is None:
        cls = transformers.AutoModel
    try:
        model = cls.from_pretrained(folder, dtype=dtype, local_files_only=True)
    except Exception as exc:  # transformers raises many kinds
        raise CheckpointError(f"{folder}: transformers cannot load it as {cls.__name__}: {exc}") from None
    return model.eval()


def _probe_inputs(folder: Path, model: torch.nn.Module, texts: list[str] | None, seed: int) -> tuple[dict[str, torch.Tensor], str, Any]:
    cfg = model.config
    gen = torch.Generator().manual_seed(seed)
    inputs: dict[str, torch.Tensor] = {}
    tokenizer = None
    text_cfg = getattr(cfg, "text_config", None) or cfg
    vision_cfg = getattr(cfg, "vision_config", None)
    takes_pixels = vision_cfg is not None or cfg.model_type in ("vit",)
    takes_text = cfg.model_type != "vit"
    probe = []
    if takes_text:
        tokenizer = _load_tokenizer(folder)
        if tokenizer is not None:
            if tokenizer.pad_token is None:
                tokenizer.pad_token = tokenizer.eos_token
            if _is_generator(model):
                tokenizer.padding_side = "left"  # so greedy generation continues the real text
            batch = tokenizer(list(texts or PROBE_TEXTS), return_tensors="pt", padding=True, truncation=True, max_length=64)
            inputs.update({k: v for k, v in batch.items() if k in ("input_ids", "attention_mask")})
            probe.append(f"{len(texts or PROBE_TEXTS)} {'user' if texts else 'built-in'} texts via the tokenizer")
        else:
            if texts:
                raise MergeShieldError(f"{folder}: texts were given but the folder has no tokenizer.")
            n_pos = getattr(text_cfg, "max_position_embeddings", None) or getattr(text_cfg, "n_positions", 64)
            inputs["input_ids"] = torch.randint(0, text_cfg.vocab_size, (4, min(16, n_pos)), generator=gen)
            probe.append("random token ids (no tokenizer in the folder)")
    if takes_pixels:
        vc = vision_cfg or cfg
        inputs["pixel_values"] = torch.randn(
            2 if takes_text is False else inputs["input_ids"].shape[0],
            getattr(vc, "num_channels", 3), vc.image_size, vc.image_size, generator=gen,
        )
        probe.append("random pixel tensors")
    return inputs, "; ".join(probe), tokenizer


def _is_generator(model: torch.nn.Module) -> bool:
    can = getattr(model, "can_generate", None)
    return bool(can()) if callable(can) else False


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "tokenizer.model", "spiece.model")


def _load_tokenizer(folder: Path) -> Any:
    # Without tokenizer files AutoTokenizer may still build an empty default one: check first.
    if not any((folder / f).is_file() for f in TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception:
        return None


def _diff(name: str, a: torch.Tensor, b: torch.Tensor, with_top1: bool) -> OutputDiff:
    a64, b64 = a.double(), b.double()
    max_abs = float((a64 - b64).abs().max())
    scale = float(a64.abs().max())
    top1 = float((a.argmax(-1) == b.argmax(-1)).double().mean()) if with_top1 else None
    return OutputDiff(name, max_abs, max_abs / scale if scale > 0 else max_abs, top1)


def verify(
    original_dir: str | os.PathLike[str],
    protected_dir: str | os.PathLike[str],
    *,
    texts: list[str] | None = None,
    rtol: float = 1e-4,
    generate_tokens: int = 16,
    seed: int = 0,
    dtype: str = "float32",
) -> VerifyReport:
    """Compare two checkpoints' outputs on the same probe inputs.

    Args:
        original_dir: the reference model folder.
        protected_dir: the folder to compare (e.g. the protected model).
        texts: probe texts (default: built-in sentences) when the model has a tokenizer.
        rtol: largest allowed ``max|a - b| / max|a|`` per output.
        generate_tokens: greedy tokens to compare for causal LMs (0 to skip).
        seed: for random probes (token ids, pixels).
        dtype: what both models compute in: ``float32`` (default: exact transforms then agree to
            float32 rounding), or ``float16`` / ``bfloat16``, as a half-precision checkpoint is
            usually run: half-precision arithmetic rounds a rearranged model's sums differently,
            so expect differences of about its precision there (and greedy continuations that
            part at near-ties), for the MLP permutation alone too.

    Returns:
        A report; ``report.equivalent`` is the verdict.
    """
    original_dir, protected_dir = Path(original_dir), Path(protected_dir)
    if dtype not in ("float32", "float16", "bfloat16"):
        raise ValueError(f"dtype {dtype!r}: use one of ['bfloat16', 'float16', 'float32']")
    a = load_model(original_dir, getattr(torch, dtype))
    b = load_model(protected_dir, getattr(torch, dtype))
    if type(a) is not type(b):
        raise MergeShieldError(f"the two folders hold different architectures: {type(a).__name__} vs {type(b).__name__}")
    inputs, probe, tokenizer = _probe_inputs(original_dir, a, texts, seed)
    report = VerifyReport(type(a).__name__, probe, rtol=rtol, dtype=dtype)
    generate = bool(generate_tokens) and _is_generator(a)
    kwargs = dict(max_new_tokens=generate_tokens, do_sample=False, pad_token_id=getattr(tokenizer, "pad_token_id", None) or 0)
    run_a, run_b = _run(a, inputs, generate, kwargs), _run(b, inputs, generate, kwargs)
    report.diffs = _diffs(run_a[0], run_b[0], inputs.get("attention_mask"))
    if generate:
        report.generations_equal = bool(torch.equal(run_a[1], run_b[1]))
        if tokenizer is not None:
            report.generations = [
                (tokenizer.decode(x, skip_special_tokens=True), tokenizer.decode(y, skip_special_tokens=True))
                for x, y in zip(run_a[1], run_b[1])
            ]
    if dtype != "float32":  # what the half-precision arithmetic alone does to the original
        run_ref = _run(load_model(original_dir, torch.float32), inputs, generate, kwargs)
        report.baseline = _diffs(run_ref[0], run_a[0], inputs.get("attention_mask"))
        if generate:
            report.baseline_generations_equal = bool(torch.equal(run_ref[1], run_a[1]))
    return report


def _run(model: torch.nn.Module, inputs: dict[str, torch.Tensor], generate: bool,
         kwargs: dict[str, Any]) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """The model's outputs on the probe inputs (float inputs, e.g. pixels drawn in float32, cast
    to its dtype) and, for a generator, the greedy continuations of the first two probes."""
    dtype = next(model.parameters()).dtype
    cast = {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}
    with torch.inference_mode():
        out = dict(model(**cast))
        gen = None
        if generate:
            mask = cast.get("attention_mask")
            gen = model.generate(cast["input_ids"][:2], attention_mask=mask[:2] if mask is not None else None, **kwargs)
    return out, gen


def _diffs(out_a: dict[str, torch.Tensor], out_b: dict[str, torch.Tensor], mask: torch.Tensor | None) -> list[OutputDiff]:
    """Each floating output compared (padding positions left out)."""
    diffs = []
    for key, ta in out_a.items():
        tb = out_b[key]
        if not isinstance(ta, torch.Tensor) or not ta.is_floating_point():
            continue
        if mask is not None and ta.dim() == 3 and ta.shape[:2] == mask.shape:
            ta, tb = ta[mask.bool()], tb[mask.bool()]  # padding positions are not outputs
        diffs.append(_diff(key, ta, tb, with_top1=key.startswith("logits")))
    return diffs
