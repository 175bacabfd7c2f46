"""One measurement of an evaluation: the schema of ``results.json``."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

__all__ = ["Record", "Variant"]


@dataclass(frozen=True)
class Record:
    suite: str
    task: str
    merge_method: str | None
    lam: float | None
    n_models: int
    protected: bool
    merged: bool
    engine: str
    accuracy: float
    chance: float
    n_test: int
    defense: str | None
    attack: str | None
    partners: list[str] | None = None
    note: str | None = None

    def as_json(self) -> dict[str, object]:
        d = asdict(self)
        d["lambda"] = d.pop("lam")
        return d


@dataclass(frozen=True)
class Variant:
    label: str
    folder: Path
    defense: str | None
    attack: str | None
