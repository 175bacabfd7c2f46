"""Regenerate the README's "Results" section from committed ``results/*/results.json`` files.

Usage: ``python -m mergeshield.eval.readme [README.md]`` rewrites the text between the
``<!-- results:start -->`` and ``<!-- results:end -->`` markers. Nothing in it is typed by hand.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

START, END = "<!-- results:start -->", "<!-- results:end -->"


def _variant(r: dict) -> str:
    if r["defense"] is None:
        return "unprotected"
    return r["defense"] if r["attack"] is None else f"{r['defense']}, {r['attack']}"


def section(results: Path) -> str:
    """Markdown for one suite: the victim alone and merged (2 models), per release variant."""
    recs = [r for r in json.loads(results.read_text()) if r.get("note") is None]
    for r in recs:  # the demo's first results were written with the field name "lam"
        r.setdefault("lambda", r.get("lam"))
    victim = next(r["task"] for r in recs if r["protected"])
    suite = results.parent.name  # = the config's name (a renamed config keeps its old records)
    variants = list(dict.fromkeys(_variant(r) for r in recs if r["task"] == victim and not r["merged"]))
    chance = next(r["chance"] for r in recs if r["task"] == victim)
    lines = [
        f"### {suite} (victim task: {victim}, chance {chance:.3f}, n_test {recs[0]['n_test']})",
        "",
        (f"Reproduce: `mergeshield eval configs/{suite}.yaml --out results/{suite}` " if suite != "demo-minilm"
         else "Reproduce: `bash scripts/demo.sh --out results/demo-minilm` ")
        + f"(full report: [results/{suite}/report.md](results/{suite}/report.md)).",
        "",
        "| victim accuracy | " + " | ".join(variants) + " |",
        "|---|" + "---|" * len(variants),
    ]

    def row(label: str, pick) -> None:  # type: ignore[no-untyped-def]
        vals = []
        for v in variants:
            hit = [r["accuracy"] for r in recs if r["task"] == victim and _variant(r) == v and pick(r)]
            vals.append(f"{hit[0]:.3f}" if hit else "")
        if any(vals):
            lines.append(f"| {label} | " + " | ".join(vals) + " |")

    row("alone (UMP)", lambda r: not r["merged"])
    settings = dict.fromkeys((r["merge_method"], r["lambda"], r["engine"]) for r in recs
                             if r["merged"] and r["n_models"] == 2 and r["task"] == victim)
    for method, lam, engine in settings:
        label = f"merged with 1 other: {method}" + ("" if lam is None or "lambda" in method else f" lam={lam:g}")
        label += "" if engine == "mergeshield" else f" [{engine}]"
        row(label, lambda r, m=method, la=lam, e=engine: r["merged"] and r["merge_method"] == m
            and r["n_models"] == 2 and r["engine"] == e and r["lambda"] == la)
    return "\n".join(lines)


def main(readme: Path = Path("README.md")) -> None:
    parts = [section(p) for p in sorted(Path("results").glob("*/results.json"))]
    text = readme.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"{readme}: no {START} ... {END} markers")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(head + START + "\n" + "\n\n".join(parts) + "\n" + END + tail)


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("README.md"))
