"""The ``mergeshield`` command line: a thin layer over the library API."""

from __future__ import annotations

import errno
import functools
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from pydantic import ValidationError
from rich.console import Console

from mergeshield.errors import MergeShieldError
from mergeshield.protect import ProtectOptions

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Protect fine-tuned transformers against free-rider model merging; verify, merge, measure.",
)
err = Console(stderr=True, highlight=False)
out = Console(highlight=False, markup=False, soft_wrap=True)
_state = {"debug": False}
F = TypeVar("F", bound=Callable[..., Any])
_D = ProtectOptions.model_fields


_OS_HINTS = {
    errno.ENOSPC: "The disk is full: free space or choose an output on another disk.",
    errno.EDQUOT: "The disk quota is exceeded: free space or choose an output on another disk.",
    errno.EACCES: "Permission denied: make the file readable (inputs) or the folder writable (output).",
    errno.EROFS: "The file system is read-only: choose another output.",
}


def _message(exc: BaseException) -> str:
    """The one-paragraph message for an input or environment error."""
    from safetensors import SafetensorError

    text = str(exc) or type(exc).__name__
    if isinstance(exc, SafetensorError):
        text = f"safetensors: {text}"
    if isinstance(exc, OSError) and exc.errno in _OS_HINTS and "then run again" not in text:
        text = f"{text}. {_OS_HINTS[exc.errno]}"
    if isinstance(exc, MemoryError):
        text = "not enough memory for this model on this machine (peak is about one shard plus one layer)."
    return text


def _handled(fn: F) -> F:
    """Turn errors into one message and a non-zero exit (a traceback only with --debug).

    Exit codes: 2 for bad input or an environment problem (the message says what was found and
    how to fix it), 3 for an internal error (a bug: rerun with --debug and report it), 128+N when
    interrupted by signal N (130 for Ctrl-C, 143 for SIGTERM); temporary output is removed.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from safetensors import SafetensorError

        try:
            return _call(fn, *args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except (MergeShieldError, ValidationError, ValueError, OSError, SafetensorError, MemoryError) as exc:
            if _state["debug"]:
                raise
            err.print(f"error: {_message(exc)}", markup=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt as exc:
            signum = getattr(exc, "signum", _received[0] if _received else signal.SIGINT)
            err.print(f"interrupted ({signal.Signals(signum).name}): stopped; temporary output was removed "
                      "and the inputs are unchanged", markup=False, soft_wrap=True)
            raise typer.Exit(128 + signum) from None
        except Exception as exc:
            if _state["debug"]:
                raise
            err.print(f"internal error: {type(exc).__name__}: {exc}. This is a bug in mergeshield, not a "
                      "problem with your input; temporary output was removed. Run again with --debug for "
                      "the traceback and report it.", markup=False, soft_wrap=True)
            raise typer.Exit(3) from None

    return wrapper  # type: ignore[return-value]


def _call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    try:
        return fn(*args, **kwargs)
    except (typer.Exit, typer.Abort, KeyboardInterrupt):
        raise
    except Exception as exc:
        if not _received:
            raise
        # the signal's exception was raised inside native code (safetensors, torch), which turned it
        # into some other error (seen: a CheckpointError saying "corrupt"): it is still an interruption
        raise Interrupted(_received[0]) from exc


@app.callback()
def _main(
    debug: Annotated[bool, typer.Option("--debug", help="Show Python tracebacks on errors.")] = False,
) -> None:
    _state["debug"] = debug


@app.command()
@_handled
def protect(
    model_dir: Annotated[Path, typer.Argument(help="Fine-tuned model folder (never modified).")],
    base: Annotated[Path, typer.Option("--base", help="The pretrained checkpoint it was fine-tuned from.")],
    out_dir: Annotated[Path, typer.Option("--out", help="Where to write the protected model.")],
    seed: Annotated[int, typer.Option(help="Random seed (same seed, same bytes).")] = _D["seed"].default,
    permute_mlp: Annotated[bool, typer.Option(help="Permute MLP neurons (LAP against the base).")] = _D["permute_mlp"].default,
    scale_qk: Annotated[bool, typer.Option(help="Random per-dimension Q/K scaling.")] = _D["scale_qk"].default,
    scale_vo: Annotated[bool, typer.Option(help="Random per-dimension V/O scaling.")] = _D["scale_vo"].default,
    scale_low: Annotated[float, typer.Option(help="Smallest scale factor.")] = _D["scale_low"].default,
    scale_high: Annotated[float, typer.Option(help="Largest scale factor.")] = _D["scale_high"].default,
    scale_law: Annotated[str, typer.Option(help="uniform | loguniform | beta.")] = _D["scale_law"].default,
    scale_quantize: Annotated[str, typer.Option(help="auto (powers of two for fp16/bf16) | none | pow2.")] = _D["scale_quantize"].default,
    permute_heads: Annotated[bool, typer.Option(help="Also reorder attention heads (beyond PaRaMS).")] = _D["permute_heads"].default,
    permute_residual: Annotated[bool, typer.Option(help="Also permute the hidden dimension of the whole model (beyond PaRaMS; not clip).")] = _D["permute_residual"].default,
    mix_vo: Annotated[bool, typer.Option(help="Per-head invertible V/O mixing instead of diagonal scales (float32).")] = _D["mix_vo"].default,
    mix_qk: Annotated[bool, typer.Option(help="Per-head invertible Q/K mixing, RoPE-compatible (float32).")] = _D["mix_qk"].default,
    solver: Annotated[str, typer.Option(help="MLP assignment: auto | exact | sparse | block | greedy | random.")] = _D["solver"].default,
    block_size: Annotated[int, typer.Option(help="Units per block of the block solver (larger: nearer the exact objective, slower).")] = _D["block_size"].default,
    candidates: Annotated[int, typer.Option(help="Cheapest columns per row (and rows per column) the sparse solver keeps (more: nearer the exact objective, slower).")] = _D["candidates"].default,
    device: Annotated[str, typer.Option(help="Where the MLP assignment's costs are multiplied: cpu | cuda | cuda:N | auto (a GPU if torch sees one; not yet run on a GPU by this project).")] = _D["device"].default,
    half_subnormals: Annotated[str, typer.Option(help="float16 scales: round (values under 6.1e-5 scaled down lose their lowest bits; unprotect not bit-exact) | keep (exact; most factors then bounded to 1).")] = _D["half_subnormals"].default,
    prune_rate: Annotated[float, typer.Option(help="Zero this fraction of transformed weights (changes the function).")] = _D["prune_rate"].default,
    key_out: Annotated[Path | None, typer.Option(help="Write a key file here (keep it private; not inside --out).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output once the new one is complete.")] = False,
    quiet: Annotated[bool, typer.Option(help="No progress bars.")] = False,
) -> None:
    """Write a protected copy of MODEL_DIR that computes the same function but resists merging."""
    from mergeshield.protect import protect as _protect

    options = ProtectOptions(
        seed=seed, permute_mlp=permute_mlp, scale_qk=scale_qk, scale_vo=scale_vo,
        scale_low=scale_low, scale_high=scale_high, scale_law=scale_law,  # type: ignore[arg-type]
        scale_quantize=scale_quantize, prune_rate=prune_rate, solver=solver, block_size=block_size, candidates=candidates, device=device,  # type: ignore[arg-type]
        mix_vo=mix_vo, half_subnormals=half_subnormals,  # type: ignore[arg-type]
        permute_heads=permute_heads, mix_qk=mix_qk, permute_residual=permute_residual,
    )
    report = _protect(model_dir, base, out_dir, options, key_out=key_out, overwrite=overwrite, progress=not quiet)
    out.print(report.table(), highlight=False)
    for note in report.notes:
        out.print(f"note: {note}", highlight=False)
    out.print(f"protected model written to {report.out} (fingerprint {report.fingerprint[:16]})")
    if report.key:
        out.print(f"key written to {report.key}: keep it private, do not publish it with the model")


@app.command()
@_handled
def unprotect(
    protected_dir: Annotated[Path, typer.Argument(help="The protected model folder.")],
    key: Annotated[Path, typer.Option("--key", help="The key file written by protect --key-out.")],
    out_dir: Annotated[Path, typer.Option("--out", help="Where to write the restored model.")],
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output.")] = False,
    quiet: Annotated[bool, typer.Option(help="No progress bars.")] = False,
) -> None:
    """Restore the original weights from a protected model and its key."""
    from mergeshield.protect import unprotect as _unprotect

    fp = _unprotect(protected_dir, key, out_dir, overwrite=overwrite, progress=not quiet)
    out.print(f"restored model written to {out_dir} (fingerprint {fp[:16]})")


@app.command()
@_handled
def verify(
    original_dir: Annotated[Path, typer.Argument(help="Reference model folder.")],
    protected_dir: Annotated[Path, typer.Argument(help="Model folder to compare.")],
    texts: Annotated[Path | None, typer.Option(help="Probe texts, one per line (default: built-in).")] = None,
    rtol: Annotated[float, typer.Option(help="Largest allowed max|a-b|/max|a| per output.")] = 1e-4,
    generate: Annotated[int, typer.Option(help="Greedy tokens to compare for causal LMs.")] = 16,
    seed: Annotated[int, typer.Option(help="Seed for random probes.")] = 0,
    dtype: Annotated[str, typer.Option(help="Compute in float32 | float16 | bfloat16 (half precision rounds rearranged sums differently: loosen --rtol).")] = "float32",
) -> None:
    """Exit 0 if both models compute the same outputs within tolerance, 1 if not."""
    from mergeshield.verify import verify as _verify

    lines = None
    if texts is not None:
        lines = [ln for ln in texts.read_text(encoding="utf-8").splitlines() if ln.strip()]
        if not lines:
            raise MergeShieldError(f"{texts}: no non-empty lines to use as probes")
    report = _verify(original_dir, protected_dir, texts=lines, rtol=rtol, generate_tokens=generate, seed=seed, dtype=dtype)
    out.print(report.table(), highlight=False)
    raise typer.Exit(0 if report.equivalent else 1)


@app.command()
@_handled
def merge(
    model_dirs: Annotated[list[Path], typer.Argument(help="Fine-tuned model folders to merge.")],
    base: Annotated[Path, typer.Option("--base", help="Their common pretrained checkpoint.")],
    out_dir: Annotated[Path, typer.Option("--out", help="Where to write the merged model.")],
    method: Annotated[str, typer.Option(help="average | task_arithmetic | ties | dare_ta | dare_ties.")] = "task_arithmetic",
    lam: Annotated[float | None, typer.Option("--lambda", help="Scale on the merged task vector.")] = None,
    density: Annotated[float | None, typer.Option(help="TIES: fraction of each task vector kept.")] = None,
    drop: Annotated[float | None, typer.Option(help="DARE: drop probability.")] = None,
    seed: Annotated[int, typer.Option(help="Seed for DARE.")] = 0,
    extra: Annotated[str, typer.Option(help="Tensors the base lacks (heads): error | first | average.")] = "error",
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output.")] = False,
    quiet: Annotated[bool, typer.Option(help="No progress bars.")] = False,
) -> None:
    """Merge fine-tunes of one base (for evaluating protection)."""
    from mergeshield.merge.engine import merge_checkpoints
    from mergeshield.merge.methods import make_method

    if extra not in ("error", "first", "average"):
        raise MergeShieldError(f"--extra must be error, first or average, got {extra!r}")
    m = make_method(method, lam=lam, density=density, drop=drop)
    fp = merge_checkpoints(base, list(model_dirs), out_dir, m, seed=seed, extra=extra,  # type: ignore[arg-type]
                           overwrite=overwrite, progress=not quiet)
    out.print(f"merged model ({m.model_dump(exclude_none=True)}) written to {out_dir} (fingerprint {fp[:16]})",
              highlight=False)


@app.command()
@_handled
def attack(
    protected_dir: Annotated[Path, typer.Argument(help="The protected model, as published.")],
    base: Annotated[Path, typer.Option("--base", help="The public pretrained checkpoint.")],
    out_dir: Annotated[Path, typer.Option("--out", help="Where to write the realigned model.")],
    method: Annotated[str, typer.Option(help="residual | heads | permutation | scale | realign | realign+fill | realign-matrix[+fill].")] = "realign",
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output.")] = False,
    quiet: Annotated[bool, typer.Option(help="No progress bars.")] = False,
) -> None:
    """Act as a free-rider: realign a protected model to the base (reads no key), to measure robustness."""
    from mergeshield.attack import attack as _attack

    report = _attack(protected_dir, base, out_dir, method, overwrite=overwrite, progress=not quiet)
    steps = list(report.steps.values())
    counts = ", ".join(f"{steps.count(k)} {what}" for k, what in (
        ("residual", "residual-stream permutation"), ("heads", "head order(s)"), ("scale", "scale set(s)"),
        ("matrix", "attention matrix set(s)"),
        ("permutation", "MLP permutation(s)")) if k in steps)
    out.print(f"attack {method}: estimated {counts or 'nothing'}; "
              f"filled {report.filled} pruned entries from the base; wrote {report.out}")


@app.command("eval")
@_handled
def eval_(
    config: Annotated[Path, typer.Argument(help="Suite config (YAML), e.g. configs/text-minilm.yaml.")],
    out_dir: Annotated[Path, typer.Option("--out", help="Where to write results.json, report.md, plots.")],
    cache: Annotated[Path | None, typer.Option(help="Cache for fine-tuned models (default ~/.cache/mergeshield).")] = None,
) -> None:
    """Run an evaluation suite: every merge method, protected and not, attacked and not."""
    from mergeshield.demo._finetune import default_cache_root
    from mergeshield.eval.config import load_config
    from mergeshield.eval.runner import run_eval

    cfg = load_config(config)
    run_eval(cfg, out_dir, cache=cache or default_cache_root(), log=lambda m: out.print(m))


@app.command()
def families() -> None:
    """List the supported architecture families and model types."""
    from mergeshield.symmetry.registry import get_family, list_families

    for name in list_families():
        fam = get_family(name)
        out.print(f"{name:<8} model_type: {', '.join(fam.model_types):<24} {fam.description}", highlight=False)


@app.command()
@_handled
def demo(
    out_dir: Annotated[Path, typer.Option("--out", help="Where to write the report and checkpoints.")] = Path("mergeshield-demo"),
    cache: Annotated[Path | None, typer.Option(help="Cache for fine-tuned models (default ~/.cache/mergeshield).")] = None,
    seed: Annotated[int, typer.Option(help="Seed for data splits, fine-tuning and protection.")] = 0,
) -> None:
    """Fine-tune all-MiniLM-L6-v2 on BBC topic and Rotten Tomatoes sentiment, protect one, merge, report."""
    from mergeshield.demo import run_demo

    run_demo(out_dir, cache=cache, seed=seed, console=Console(width=160, highlight=False))


class Interrupted(KeyboardInterrupt):
    """SIGINT, SIGTERM or SIGHUP, raised where the program is, so that cleanup code runs."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
_received: list[int] = []


def _interrupt(signum: int, frame: object) -> None:
    # SIGTERM and SIGHUP would otherwise kill the process without unwinding, leaving the
    # temporary output folder behind. Later signals are ignored while the first one unwinds,
    # so that a second Ctrl-C cannot cut the cleanup short.
    for sig in _SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    _received.append(signum)
    raise Interrupted(signum)


def main() -> None:
    """Console-script entry point."""
    for sig in _SIGNALS:
        if signal.getsignal(sig) is not signal.SIG_IGN:  # keep nohup's choice
            signal.signal(sig, _interrupt)
    try:
        sys.exit(app())
    except SystemExit as exc:
        if not _received:
            raise
        # Interrupted: the output is cleaned up and the message printed. Leave now rather than
        # through interpreter finalisation, where a native thread twice aborted the process in the
        # test suite's interrupt test ("terminate called without an active exception": exit -6
        # instead of 130/143; rare, and the thread's owner was not found).
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(exc.code if isinstance(exc.code, int) else 1)


if __name__ == "__main__":
    main()
