"""Regenerate the README's "Results" section from committed ``results/*/results.json`` files.

Usage: ``python -m mergeshield.eval.readme [README.md]`` rewrites the text between the
``<!-- results:start -->`` and ``<!-- results:end -->`` markers. Nothing in it is typed by hand.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

START, END = "<!-- results:start -->", "<!-- results:end -->"
HEADLINE = [("average", None), ("task_arithmetic", 0.3), ("task_arithmetic", 0.8), ("ties", 0.8),
            ("dare_ties", 0.8), ("adamerging", None)]


def _variant(r: dict) -> str:
    if r["defense"] is None:
        return "unprotected"
    return r["defense"] if r["attack"] is None else f"{r['defense']}, {r['attack']}"


def section(results: Path) -> str:
    """Markdown for one suite: the victim alone and merged (2 models), per release variant."""
    recs = [r for r in json.loads(results.read_text()) if r.get("note") is None]
    victim = next(r["task"] for r in recs if r["protected"])
    suite = recs[0]["suite"]
    variants = list(dict.fromkeys(_variant(r) for r in recs if r["task"] == victim and not r["merged"]))
    chance = next(r["chance"] for r in recs if r["task"] == victim)
    lines = [
        f"### {suite} (victim task: {victim}, chance {chance:.3f}, n_test {recs[0]['n_test']})",
        "",
        f"Reproduce: `mergeshield eval configs/{suite}.yaml --out results/{suite}` "
        f"(full report: [results/{suite}/report.md](results/{suite}/report.md)).",
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
    for method, lam in HEADLINE:
        label = method + ("" if lam is None else f" lam={lam:g}")
        row(f"merged with 1 other, {label}", lambda r, m=method, la=lam: r["merged"] and r["merge_method"] == m
            and r["n_models"] == 2 and r["engine"] == "mergeshield" and (la is None or r["lambda"] == la))
    for method in ("task_arithmetic", "ties", "dare_ties", "breadcrumbs", "della", "model_stock"):
        row(f"merged with 1 other, mergekit {method}", lambda r, m=method: r["merged"] and r["merge_method"] == m
            and r["n_models"] == 2 and r["engine"] == "mergekit")
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
