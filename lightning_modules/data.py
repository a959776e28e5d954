"""Data modules that need no download: scikit-learn's digits and seeded synthetic regression.

Both split train/val/test with a fixed seed (stratified), expose `input_shape`, `task` and a
`fingerprint` of the arrays, so a run records exactly which data it saw.
"""

from __future__ import annotations

import hashlib
from typing import ClassVar

import lightning.pytorch as L
import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch.utils.data import DataLoader, TensorDataset

from lightning_modules.settings import Fraction, NonNegativeFloat, PositiveInt, Seed, checked


def fingerprint(*arrays: np.ndarray) -> str:
    """A short sha256 over the arrays' shapes, dtypes and bytes."""
    digest = hashlib.sha256()
    for array in arrays:
        array = np.ascontiguousarray(array)
        digest.update(f"{array.shape}{array.dtype}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()[:16]


class SplitDataModule(L.LightningDataModule):
    """Train/val/test splits held in memory, served by seeded loaders, described by `summary()`.

    `task` and `input_kind` say which models can use it (see `registry.build_model`).
    """

    task: str
    input_kind = "features"  # or "tokens": integer ids for a language model or text encoder
    input_shape: tuple[int, ...]

    # Names of the rules in `lightning_modules.settings.RULES` this class's settings obey.
    rules: ClassVar[tuple[str, ...]] = ("split_fractions",)

    @checked  # each value against its declared type and range (lightning_modules.settings)
    def __init__(self, batch_size: PositiveInt, val_fraction: Fraction, test_fraction: Fraction, seed: Seed) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.seed = seed
        self.splits: dict[str, TensorDataset] = {}
        self.fingerprint = ""

    def _loader(self, split: str, shuffle: bool = False) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(self.splits[split], batch_size=self.batch_size, shuffle=shuffle, generator=generator)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test")

    def summary(self) -> dict[str, object]:
        """Sizes and shapes, for the notebook's data-summary cell."""
        return {
            "task": self.task,
            "input_shape": self.input_shape,
            **{f"{name}_size": len(ds) for name, ds in self.splits.items()},
            "fingerprint": self.fingerprint,
        }


class ArrayDataModule(SplitDataModule):
    """Splits in-memory arrays into stratified train/val/test sets."""

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Features, targets and the labels to stratify on."""
        raise NotImplementedError

    def to_tensors(self, x: np.ndarray, y: np.ndarray) -> TensorDataset:
        """One split as tensors: the arrays as they are (a subclass reshapes, e.g. into images)."""
        return TensorDataset(torch.from_numpy(x), torch.from_numpy(y))

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        x, y, strata = self.arrays()
        self.fingerprint = fingerprint(x, y)
        index = np.arange(len(x))
        rest, test = train_test_split(index, test_size=self.test_fraction, random_state=self.seed, stratify=strata)
        train, val = train_test_split(
            rest,
            test_size=self.val_fraction / (1 - self.test_fraction),
            random_state=self.seed,
            stratify=strata[rest],
        )
        self.splits = {
            name: self.to_tensors(x[idx], y[idx]) for name, idx in (("train", train), ("val", val), ("test", test))
        }


class DigitsDataModule(ArrayDataModule):
    """scikit-learn's bundled 8×8 handwritten digits (1,797 images, 10 classes), scaled to [0, 1]."""

    task = "classification"
    num_classes = 10
    rules = ("split_fractions", "digits_splits")

    @checked
    def __init__(
        self,
        batch_size: PositiveInt = 64,
        flatten: bool = True,
        val_fraction: Fraction = 0.15,
        test_fraction: Fraction = 0.15,
        seed: Seed = 42,
    ) -> None:
        super().__init__(batch_size, val_fraction, test_fraction, seed)
        self.save_hyperparameters()
        self.flatten = flatten
        self.input_shape = (64,) if flatten else (1, 8, 8)

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        digits = load_digits()
        x = (digits.data / 16.0).astype(np.float32)
        y = digits.target.astype(np.int64)
        return x, y, y

    def to_tensors(self, x: np.ndarray, y: np.ndarray) -> TensorDataset:
        features = torch.from_numpy(x).reshape(-1, *self.input_shape)
        return TensorDataset(features, torch.from_numpy(y))


class RegressionDataModule(ArrayDataModule):
    """Seeded synthetic regression: y = x·w + 0.5·sin(2·x₀) + noise, with a known noise level.

    Targets are standardized, so `noise` sets the best reachable R² (printed by `best_r2`).
    """

    task = "regression"
    rules = ("split_fractions", "regression_splits")

    @checked
    def __init__(
        self,
        n_samples: PositiveInt = 1000,
        n_features: PositiveInt = 10,
        noise: NonNegativeFloat = 0.1,
        batch_size: PositiveInt = 64,
        val_fraction: Fraction = 0.15,
        test_fraction: Fraction = 0.15,
        seed: Seed = 42,
    ) -> None:
        super().__init__(batch_size, val_fraction, test_fraction, seed)
        self.save_hyperparameters()
        self.n_samples = n_samples
        self.n_features = n_features
        self.noise = noise
        self.input_shape = (n_features,)
        self.best_r2: float | None = None

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        rng = np.random.default_rng(self.seed)
        x = rng.standard_normal((self.n_samples, self.n_features)).astype(np.float32)
        w = rng.uniform(-1.0, 1.0, self.n_features)
        signal = x @ w + 0.5 * np.sin(2.0 * x[:, 0])
        scale = signal.std()
        y = (signal + self.noise * scale * rng.standard_normal(self.n_samples)) / scale
        self.best_r2 = float(1.0 / (1.0 + self.noise**2))
        y = ((y - y.mean()) / y.std()).astype(np.float32)
        strata = np.digitize(y, np.quantile(y, [0.2, 0.4, 0.6, 0.8]))
        return x, y, strata
