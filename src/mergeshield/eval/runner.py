"""Run an evaluation suite: every release variant of the victim x every merge -> records.

Release variants: the victim unprotected, then each defense, then each defense after each
attack. Every measurement is a model that was run; nothing is typed in.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import IO
from pathlib import Path

import torch
import yaml

from mergeshield.attack import attack, recovery
from mergeshield.errors import MergeShieldError
from mergeshield.eval.causal import CausalSuite
from mergeshield.eval.config import EvalConfig, MergeSpec
from mergeshield.eval.records import Record, Variant
from mergeshield.eval.text import TextSuite
from mergeshield.eval.vision import VisionSuite
from mergeshield.io.checkpoint import Checkpoint, save_as_dtype
from mergeshield.merge.adamerging import adamerging
from mergeshield.merge.engine import merge_checkpoints
from mergeshield.merge.methods import make_method
from mergeshield.protect import ProtectOptions, protect

__all__ = ["Record", "Variant", "run_eval"]

Suite = TextSuite | CausalSuite | VisionSuite


def _mergekit_config(base: Path, models: list[Path], spec: MergeSpec, lam: float | None) -> dict[str, object]:
    """The mergekit YAML a free-rider would write for this merge."""
    params: dict[str, object] = {"weight": 1.0}
    if spec.density is not None:
        params["density"] = spec.density
    method = {"average": "linear", "dare_ta": "dare_linear"}.get(spec.method, spec.method)
    if spec.method in ("dare_ta", "dare_ties") and spec.drop is not None:
        params["density"] = 1.0 - spec.drop
    if method == "della":
        params.setdefault("epsilon", 0.05)
    if method == "breadcrumbs":
        params.setdefault("gamma", 0.01)
    cfg: dict[str, object] = {
        "merge_method": method,
        "models": [{"model": str(m), "parameters": dict(params)} for m in models],
        "dtype": "float32",
        "out_dtype": "float32",
    }
    if method == "model_stock":
        cfg["models"] = [{"model": str(m)} for m in models]
    if lam is not None and method not in ("linear", "model_stock"):
        cfg["parameters"] = {"lambda": lam}
    if method != "linear":
        cfg["base_model"] = str(base)
    return cfg


class MergekitWorker:
    """mergekit's own CLI (``mergekit-yaml``), run in one long-lived worker process.

    Importing mergekit takes 11 of the 12 s a MiniLM merge costs (measured), so the worker
    imports it once; each merge is still mergekit's CLI entry point with its own seed, on a fresh
    loader cache (see `mergeshield.eval._mergekit_shim`), and gives the same bytes as a fresh
    process (tested). mergekit 0.1.5 crashes on every BERT checkpoint; the shim fixes that token.
    """

    def __init__(self, seed: int, log_path: Path) -> None:
        self.seed = seed
        self.log_path = log_path
        self._proc: subprocess.Popen[str] | None = None
        self._log: IO[str] | None = None

    def _start(self) -> subprocess.Popen[str]:
        if self._proc is None or self._proc.poll() is not None:
            if self._log is not None:  # a worker that died: its log handle goes with it
                self._log.close()
            self._log = self.log_path.open("a")
            env = {**os.environ, "PYTHONHASHSEED": str(self.seed)}
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "mergeshield.eval._mergekit_shim", "--serve"],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, text=True, env=env,
            )
        return self._proc

    def merge(self, base: Path, models: list[Path], out: Path, spec: MergeSpec, lam: float | None) -> None:
        from mergeshield.eval._mergekit_shim import REPLY

        cfg = _mergekit_config(base, models, spec, lam)
        out.parent.mkdir(parents=True, exist_ok=True)
        cfg_path = out.parent / f"{out.name}.yaml"
        cfg_path.write_text(yaml.safe_dump(cfg))
        proc = self._start()
        assert proc.stdin is not None and proc.stdout is not None
        args = [str(cfg_path), str(out), "--allow-crimes", "--random-seed", str(self.seed)]
        proc.stdin.write(json.dumps(args) + "\n")
        proc.stdin.flush()
        for line in proc.stdout:  # mergekit may print lines of its own first
            if line.startswith(REPLY):
                reply = json.loads(line[len(REPLY):])
                if not reply["ok"]:
                    raise MergeShieldError(f"mergekit failed on {cfg['merge_method']}: {reply['error']}")
                return
        tail = self.log_path.read_text(errors="replace")[-2000:]
        self.close()
        raise MergeShieldError(f"the mergekit worker died during {cfg['merge_method']}: {tail}")

    def close(self) -> None:
        if self._proc is not None:
            if self._proc.stdin is not None:
                self._proc.stdin.close()
            self._proc.wait(timeout=60)
            self._proc = None
        if self._log is not None:
            self._log.close()
            self._log = None


def _in_base_layout(model: Path, base: Path, out: Path) -> Path:
    """The model's tensors under the base's names (an exact copy; tensors the base lacks dropped)."""
    from safetensors.torch import save_file

    from mergeshield.io.naming import match_names

    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    m, b = Checkpoint(model), Checkpoint(base)
    names = match_names(m.names, b.names)
    save_file({bn: m.get(mn) for mn, bn in names.items()}, str(out / "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(base / "config.json", out / "config.json")
    return out


def _state(folder: Path) -> dict[str, torch.Tensor]:
    ckpt = Checkpoint(folder)
    return {n: ckpt.get(n) for n in ckpt.names}


def run_eval(config: EvalConfig, out_dir: Path, *, cache: Path, log: Callable[[str], None] = print) -> list[Record]:
    """Run a suite; write ``results.json`` (and return the records)."""
    from mergeshield.eval.report import write_report

    t0 = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    suite: Suite = {"text": TextSuite, "causal": CausalSuite, "vision": VisionSuite}[config.kind](config, cache, log)
    base = suite.base
    victim = config.victim
    partners = [t.name for t in config.tasks if t.name != victim]
    records: list[Record] = []
    extras: dict[str, object] = {"recovery": {}, "distances": {}, "phase_seconds": {}, "failures": []}
    mark = [t0]

    def phase(label: str) -> None:
        """Log a finished phase with its own wall time (kept in extras.json and the report)."""
        now = time.perf_counter()
        secs, mark[0] = now - mark[0], now
        extras["phase_seconds"][label] = round(secs, 1)  # type: ignore[index]
        log(f"{label}: done ({secs:.0f} s; {now - t0:.0f} s in all)")

    phase("data and fine-tuned task models (cached after the first run)")
    work = Path(tempfile.mkdtemp(prefix="mergeshield-eval-", dir=out_dir))
    mergekit = MergekitWorker(config.seed, work / "mergekit.log")
    try:
        if config.dtype != "float32":  # released in half precision: everything starts from the rounded models
            dtype = getattr(torch, config.dtype)
            base = save_as_dtype(base, work / f"base-{config.dtype}", dtype)
            for task in list(suite.folders):  # scoring reads each task's model (its head) from here
                suite.folders[task] = save_as_dtype(suite.folders[task], work / f"{task}-{config.dtype}", dtype)
            phase(f"base and task models rounded to {config.dtype}")
        # ---- release variants ------------------------------------------------------------------
        variants = [Variant("unprotected", suite.folders[victim], None, None)]
        for d in config.defenses:
            folder = work / f"victim-{d.name}"
            rep = protect(suite.folders[victim], base, folder, d.options, key_out=work / f"{d.name}.key", progress=False)
            extras["distances"][d.name] = [(r.id, r.kind, r.ratio) for r in rep.instances]  # type: ignore[index]
            variants.append(Variant(d.name, folder, d.name, None))
            for a in d.attacks:
                att_folder = work / f"victim-{d.name}-{a}"
                arep = attack(folder, base, att_folder, a, progress=False)
                extras["recovery"][f"{d.name}/{a}"] = recovery(work / f"{d.name}.key", arep)  # type: ignore[index]
                variants.append(Variant(f"{d.name}, {a}", att_folder, d.name, a))
        phase(f"release variants {[v.label for v in variants]}")

        partial = out_dir / "results.partial.jsonl"
        partial.unlink(missing_ok=True)

        def rec(task: str, method: str | None, lam: float | None, n: int, v: Variant, acc: float,
                engine: str = "mergeshield", with_: list[str] | None = None, note: str | None = None) -> None:
            records.append(Record(config.suite, task, method, lam, n, v.defense is not None, method is not None,
                                  engine, acc, suite.chance(task), suite.n_test(task), v.defense, v.attack,
                                  with_, note))
            # a long run that dies keeps what it measured (results.json appears only when complete)
            with partial.open("a") as f:  # one JSON line per record, appended
                f.write(json.dumps(records[-1].as_json()) + "\n")

        # ---- standalone (UMP) -----------------------------------------------------------------
        for t in partners:
            rec(t, None, None, 1, variants[0], suite.accuracy(t))
        for v in variants:
            rec(victim, None, None, 1, v, suite.accuracy(victim, None if v.defense is None else v.folder))

        # ---- merges (MMP) ---------------------------------------------------------------------
        for spec in config.merges:
            for n in spec.n_models:
                mates = partners[: n - 1]
                if len(mates) < n - 1:
                    raise MergeShieldError(f"n_models={n} needs {n - 1} partner tasks, config has {len(partners)}")
                for lam in spec.lambdas():
                    for v in variants:
                        if spec.engine == "mergekit" and v.attack is not None:
                            continue  # mergekit rows compare the released models only
                        models = [v.folder, *(suite.folders[m] for m in mates)]
                        try:
                            accs = _merge_and_score(suite, spec, lam, base, models, [victim, *mates], work,
                                                    config.seed, mergekit)
                        except MergeShieldError as exc:
                            if spec.engine != "mergekit":
                                raise
                            # the free-rider's tool itself failed on these checkpoints: say so, go on
                            extras["failures"].append(dict(  # type: ignore[attr-defined]
                                engine=spec.engine, method=spec.method, lam=lam, n_models=n, variant=v.label,
                                error=str(exc)[-400:]))
                            log(f"{spec.engine} {spec.method} failed on {v.label}: {str(exc)[-200:]}")
                            continue
                        for task, acc in accs.items():
                            rec(task, spec.method, lam, n, v, acc, spec.engine, [victim, *mates])
                phase(f"{spec.engine} {spec.method} n={n} lam={spec.lam}")

        # ---- the straight line from the base to the victim ------------------------------------
        if config.line_points:
            for v in variants[:2]:
                for i in range(config.line_points):
                    alpha = i / (config.line_points - 1)
                    folder = work / "line"
                    merge_checkpoints(base, [v.folder], folder, make_method("task_arithmetic", lam=alpha),
                                      extra="first", overwrite=True, progress=False)
                    rec(victim, "line", alpha, 1, v, suite.accuracy(victim, folder), note="interpolation")
            phase("line from base to victim")

        # ---- pruning-rate trade-off -----------------------------------------------------------
        for rate in config.prune_curve:
            d_name = f"params+prune{rate:g}"
            folder = work / "prune"
            protect(suite.folders[victim], base, folder, ProtectOptions(seed=config.seed, prune_rate=rate),
                    overwrite=True, progress=False)
            att = work / "prune-att"
            attack(folder, base, att, "realign+fill", overwrite=True, progress=False)
            for v in (Variant(d_name, folder, d_name, None), Variant(f"{d_name}, realign+fill", att, d_name, "realign+fill")):
                rec(victim, None, None, 1, v, suite.accuracy(victim, v.folder), note="prune-curve")
                spec = MergeSpec(method="task_arithmetic", lam=0.8)
                accs = _merge_and_score(suite, spec, 0.8, base, [v.folder, suite.folders[partners[0]]],
                                        [victim, partners[0]], work, config.seed, mergekit)
                for task, acc in accs.items():
                    rec(task, "task_arithmetic", 0.8, 2, v, acc, with_=[victim, partners[0]], note="prune-curve")
            phase(f"prune rate {rate}")
    finally:
        mergekit.close()
        shutil.rmtree(work, ignore_errors=True)

    seconds = time.perf_counter() - t0
    (out_dir / "results.json").write_text(json.dumps([r.as_json() for r in records], indent=1) + "\n")
    (out_dir / "results.partial.jsonl").unlink(missing_ok=True)
    extras["wall_seconds"] = seconds
    (out_dir / "extras.json").write_text(json.dumps(extras, indent=1) + "\n")
    write_report(config, records, extras, out_dir)
    log(f"wrote {out_dir}/results.json, report.md and plots ({seconds:.0f} s)")
    return records


def _merge_and_score(
    suite: Suite, spec: MergeSpec, lam: float | None, base: Path, models: list[Path], tasks: list[str],
    work: Path, seed: int, mergekit: MergekitWorker,
) -> dict[str, float]:
    folder = work / "merged"
    if folder.exists():
        shutil.rmtree(folder)
    if spec.method == "adamerging":
        return _adamerge_and_score(suite, spec, base, models, tasks)
    if spec.engine == "mergekit":
        # mergekit takes the architecture from the first model and then wants the base to have the
        # same (head-prefixed) names: give it every model re-saved in the base's layout, heads dropped
        plain = [_in_base_layout(m, base, work / f"mk-in-{i}") for i, m in enumerate(models)]
        mergekit.merge(base, plain, folder, spec, lam)
        got = set(Checkpoint(folder).names)
        want = set(Checkpoint(base).names)
        if not want <= got:
            raise MergeShieldError(f"mergekit dropped tensors: {sorted(want - got)[:5]}")
    else:
        method = make_method(spec.method, lam=lam, density=spec.density, drop=spec.drop)
        merge_checkpoints(base, models, folder, method, seed=seed, extra="first", progress=False)
    return {t: suite.accuracy(t, folder) for t in tasks}


def _adamerge_and_score(suite: Suite, spec: MergeSpec, base: Path, models: list[Path], tasks: list[str]) -> dict[str, float]:
    from mergeshield.io.naming import match_names

    b = {n: t.float() for n, t in _state(base).items() if t.is_floating_point()}
    taus = []
    for m in models:
        s = _state(m)
        names = match_names(list(s), list(b))
        inv = {bn: mn for mn, bn in names.items()}
        taus.append({n: s[inv[n]].float() - b[n] for n in b})
    losses = [suite.entropy_loss(t, suite.model_names(t, list(b)), spec.batch) for t in tasks]
    merged, _ = adamerging(b, taus, losses, steps=spec.steps, init=0.3)
    return {t: suite.accuracy(t, merged) for t in tasks}
