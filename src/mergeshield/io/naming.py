"""Matching tensor names across checkpoints whose heads add different prefixes.

A fine-tuned ``BertForSequenceClassification`` stores ``bert.encoder.layer.0...`` while its base
``BertModel`` stores ``encoder.layer.0...``. One prefix translation for the whole checkpoint is
found by trying each candidate pair and keeping the one that matches the most names.
"""

from __future__ import annotations

from collections.abc import Collection

__all__ = ["match_names"]


def _prefixes(names: Collection[str]) -> set[str]:
    return {""} | {n.split(".", 1)[0] + "." for n in names if "." in n}


def match_names(model: Collection[str], base: Collection[str]) -> dict[str, str]:
    """Map each model tensor name to the base's name for the same tensor (where one exists).

    Returns:
        ``{model_name: base_name}`` under the single prefix translation ``(pm -> pb)`` that
        matches the most names; model names without a counterpart are absent.
    """
    base_set = set(base)
    best: dict[str, str] = {}
    for pm in sorted(_prefixes(model)):
        for pb in sorted(_prefixes(base)):
            mapping = {
                n: pb + n[len(pm):]
                for n in model
                if n.startswith(pm) and pb + n[len(pm):] in base_set
            }
            if len(mapping) > len(best):
                best = mapping
    return best
