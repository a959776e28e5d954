"""Specs are validated once, at the edge: one-line errors naming the field, exit 2, nothing written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipelines.pipeline_spec import load_pipeline
from pipelines.spec import PROJECT_ROOT, SpecError, load_spec, parse_overrides
from tests.conftest import labbook

pytestmark = pytest.mark.fast  # no notebook: `make test-fast`

SHIPPED = sorted((PROJECT_ROOT / "pipelines").glob("*.yaml"))
BASE = yaml.safe_load((PROJECT_ROOT / "pipelines" / "digits_mlp.yaml").read_text())


def write(tmp_path: Path, raw: dict | str) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(raw if isinstance(raw, str) else yaml.safe_dump(raw))
    return path


def changed(section: str, **values) -> dict:
    raw = yaml.safe_load(yaml.safe_dump(BASE))
    raw.setdefault(section, {}).update(values)
    return raw


def test_shipped_specs_are_valid() -> None:
    names = {path.stem for path in SHIPPED}
    assert {
        "digits_mlp",
        "digits_cnn",
        "regression_mlp",
        "digits_nightly",
        "tinygpt",
        "finetune_minilm",
        "lessons",
    } <= names
    for path in SHIPPED:
        if "steps" in yaml.safe_load(path.read_text()):
            load_pipeline(path)
        else:
            load_spec(path)


def test_parameters_are_one_flat_dict_with_one_name_per_setting() -> None:
    params = load_spec(PROJECT_ROOT / "pipelines" / "digits_mlp.yaml").parameters()
    assert params["model"] == "mlp_classifier" and params["data"] == "digits"
    assert params["lr"] == 0.003 and params["hidden_sizes"] == [64] and params["max_epochs"] == 30
    assert "flatten" not in params and "input_shape" not in params  # derived, never set by hand


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (changed("optim", lr=0), "optim.lr: Input should be greater than 0 (got 0)"),
        (changed("optim", lr=-0.1), "optim.lr: Input should be greater than 0"),
        (changed("model", dropout=1.0), "model.dropout: Input should be less than 1 (got 1.0)"),
        (changed("model", dropout=-0.1), "model.dropout: Input should be greater than or equal to 0"),
        (changed("model", name="resnet"), "model: unknown model 'resnet'; known: cnn, finetune, gpt, mlp_classifier"),
        (changed("data", name="mnist"), "data: unknown data 'mnist'; known: digits, docstrings, regression, text"),
        (changed("model", hidden=[3]), "model: 'hidden' is not a setting of model 'mlp_classifier'; allowed:"),
        (changed("optim", lrr=0.1), "optim.lrr: unknown key"),
        (changed("trainer", max_epochs="ten"), "trainer.max_epochs: Input should be a valid integer"),
        (changed("optim", scheduler="cos"), "optim.scheduler: got 'cos'; input should be 'none', 'cosine'"),
        (changed("optim", optimizer="lamb"), "optim.optimizer: got 'lamb'; input should be 'sgd', 'adam' or 'adamw'"),
        ({**BASE, "epochs": 3}, "epochs: unknown key"),
        ({k: v for k, v in BASE.items() if k != "model"}, "model: required field is missing"),
        (changed("model", name="mlp_regressor"), "model 'mlp_regressor' is for regression but data 'digits'"),
        ({**BASE, "model": {"name": "gpt"}}, "model 'gpt' is for language_modeling but data 'digits' is"),
        (changed("trainer", strategy="dpp"), "trainer.strategy: unknown strategy 'dpp'; allowed: auto, ddp, ddp_spawn"),
        (changed("trainer", strategy="fsdp"), "trainer: strategy fsdp needs a GPU (torch FSDP does not run on CPU)"),
        (changed("trainer", early_stopping_patience=0), "trainer.early_stopping_patience: Input should be greater"),
        ({**BASE, "notebook": "notebooks/missing.ipynb"}, "notebook: no such notebook 'notebooks/missing.ipynb'"),
        ("name: x\nmodel: [1,\n", "line 3: malformed YAML"),
        ("- a list\n", "expected a mapping of settings"),
    ],
)
def test_invalid_spec_gives_one_line_naming_the_field(tmp_path: Path, raw, expected: str) -> None:
    path = write(tmp_path, raw)
    with pytest.raises(SpecError) as caught:
        load_spec(path)
    message = str(caught.value)
    assert message.startswith(str(path)) and expected in message and "\n" not in message


def test_overrides_are_placed_and_validated() -> None:
    spec = load_spec(PROJECT_ROOT / "pipelines" / "digits_cnn.yaml", parse_overrides(["lr=0.01", "channels=[4, 8]"]))
    assert spec.optim.lr == 0.01 and spec.parameters()["channels"] == [4, 8]
    with pytest.raises(SpecError, match="--set nope: unknown setting; known: "):
        load_spec(PROJECT_ROOT / "pipelines" / "digits_cnn.yaml", {"nope": 1})
    with pytest.raises(SpecError, match="optim.lr: Input should be greater than 0"):
        load_spec(PROJECT_ROOT / "pipelines" / "digits_cnn.yaml", {"lr": 0})
    with pytest.raises(SpecError, match="expected key=value"):
        parse_overrides(["lr"])


def test_cli_validate_exits_2_with_one_line_and_writes_nothing(tmp_path: Path) -> None:
    path = write(tmp_path, changed("optim", lr=-1))
    done = labbook("validate", str(path), cwd=tmp_path, env={"MLFLOW_TRACKING_URI": ""})
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "optim.lr" in done.stderr
    assert not (tmp_path / "mlruns").exists()


def test_cli_validate_accepts_a_good_spec() -> None:
    done = labbook("validate", str(PROJECT_ROOT / "pipelines" / "digits_mlp.yaml"), "--set", "max_epochs=2")
    assert done.returncode == 0, done.stderr
    assert "ok (mlp_classifier on digits, 2 epochs)" in done.stdout


def test_the_catalog_specs_are_checked_against_describes_the_registered_classes() -> None:
    import typing

    from lightning_modules import DATA, MODELS, catalog, init_parameters

    fresh = catalog.build()
    assert fresh == json.loads(catalog.CATALOG.read_text()), "stale: run `python -m lightning_modules.catalog`"
    for kind, table in (("model", MODELS), ("data", DATA)):
        for name, cls in table.items():
            entry = catalog.entry(kind, name)
            assert list(entry.settings) == list(init_parameters(cls))
            own = typing.get_type_hints(cls.__init__, include_extras=True)
            for setting, tp in entry.types().items():  # every type and range reads back as declared
                assert setting not in own or tp == own[setting] or entry.settings[setting] == "Any", (name, setting)


def test_reading_a_spec_imports_no_torch_so_bad_input_is_reported_at_once(tmp_path: Path) -> None:
    check = (
        "import sys\nfrom pipelines.spec import load_spec\n"
        f"load_spec({str(PROJECT_ROOT / 'pipelines' / 'finetune_minilm.yaml')!r}, {{'lr': 0.01}})\n"
        "assert 'torch' not in sys.modules and 'lightning' not in sys.modules, 'torch was imported'"
    )
    done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    bad = labbook("validate", str(write(tmp_path, changed("model", hidden_sizes="wide"))))
    assert bad.returncode == 2 and "model.hidden_sizes" in bad.stderr, bad.stderr
