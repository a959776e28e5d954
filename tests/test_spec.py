"""Specs are validated once, at the edge: one-line errors naming the field, exit 2, nothing written."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipelines.specs.pipeline_spec import load_pipeline
from pipelines.specs.spec import PROJECT_ROOT, SpecError, load_spec, parse_overrides
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
        (changed("trainer", strategy="dpp"), "trainer.strategy: unknown strategy 'dpp'; allowed: ddp, "),
        (changed("trainer", strategy="fsdp"), "trainer: strategy fsdp needs a GPU (Lightning's FSDP strategy refuses"),
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
    with pytest.raises(SpecError, match="--set 'nope': unknown setting; known: "):
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

    fresh = catalog.build(MODELS, DATA, init_parameters)
    assert fresh == json.loads(catalog.CATALOG.read_text()), "stale: run `python -m lightning_modules.registry`"
    for kind, table in (("model", MODELS), ("data", DATA)):
        for name, cls in table.items():
            entry = catalog.entry(kind, name)
            assert list(entry.settings) == list(init_parameters(cls))
            own = typing.get_type_hints(cls.__init__, include_extras=True)
            for setting, tp in entry.types().items():  # every type and range reads back as declared
                assert setting not in own or tp == own[setting] or entry.settings[setting] == "Any", (name, setting)


def test_reading_a_spec_imports_no_torch_so_bad_input_is_reported_at_once(tmp_path: Path) -> None:
    check = (
        "import sys\nfrom pipelines.specs.spec import load_spec\n"
        f"load_spec({str(PROJECT_ROOT / 'pipelines' / 'finetune_minilm.yaml')!r}, {{'lr': 0.01}})\n"
        "assert 'torch' not in sys.modules and 'lightning' not in sys.modules, 'torch was imported'"
    )
    done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    bad = labbook("validate", str(write(tmp_path, changed("model", hidden_sizes="wide"))))
    assert bad.returncode == 2 and "model.hidden_sizes" in bad.stderr, bad.stderr


# -- one declaration per setting: the spec, --set and the class refuse the same values -----------------
SPEC_OF = {
    ("model", "mlp_classifier"): "digits_mlp",
    ("model", "cnn"): "digits_cnn",
    ("model", "mlp_regressor"): "regression_mlp",
    ("model", "gpt"): "tinygpt",
    ("model", "finetune"): "finetune_minilm",
    ("data", "digits"): "digits_mlp",
    ("data", "regression"): "regression_mlp",
    ("data", "text"): "tinygpt",
    ("data", "docstrings"): "finetune_minilm",
}


def _refused_values(tp) -> list:
    """Values a declared type refuses: past each bound, a wrong length, an unknown choice, a boolean."""
    import typing

    from annotated_types import Ge, Gt, Le, Len, Lt

    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Annotated:
        base, bad = args[0], _refused_values(args[0])
        for meta in tp.__metadata__:
            step = 1 if base is int else 0.5
            if isinstance(meta, Ge):
                bad.append(meta.ge - step)
            elif isinstance(meta, Gt):
                bad.append(meta.gt)
            elif isinstance(meta, Le):
                bad.append(meta.le + step)
            elif isinstance(meta, Lt):
                bad.append(meta.lt)
            elif isinstance(meta, Len):
                bad.append([8] * (meta.min_length - 1) if meta.min_length else [8] * (meta.max_length + 1))
        return bad
    if origin is typing.Literal:
        return ["no-such-choice"]
    if tp in (int, float):
        return [True]
    if args:  # Sequence[Annotated[int, Ge(1)]]: one bad element
        return [[value] for value in _refused_values(args[0]) if not isinstance(value, list)]
    return []


def _every_setting():
    from lightning_modules import catalog

    for kind in ("model", "data"):
        for name in catalog.names(kind):
            entry = catalog.entry(kind, name)
            for setting, tp in entry.types().items():
                for value in _refused_values(tp):
                    yield kind, name, setting, value


@pytest.mark.parametrize(("kind", "name", "setting", "value"), list(_every_setting()))
def test_every_setting_refuses_the_same_values_in_a_spec_and_in_its_class(kind, name, setting, value) -> None:
    """Out of its declared range, a setting is refused by `--set` (no torch) and by the class itself."""
    from lightning_modules import DATA, MODELS
    from lightning_modules.catalog import DERIVED_FROM_DATA, DERIVED_FROM_MODEL

    cls = (MODELS if kind == "model" else DATA)[name]
    with pytest.raises(ValueError, match=rf"^{cls.__name__}: {setting}\b"):
        cls(**{setting: value})
    if setting in (DERIVED_FROM_DATA if kind == "model" else DERIVED_FROM_MODEL):
        return  # never set by a spec
    path = PROJECT_ROOT / "pipelines" / f"{SPEC_OF[kind, name]}.yaml"
    with pytest.raises(SpecError, match=rf"\b{setting}\b") as caught:
        load_spec(path, {setting: value})
    assert "\n" not in str(caught.value) and len(str(caught.value)) <= 500


@pytest.mark.parametrize(
    ("spec", "overrides", "target", "expected"),
    [
        ("digits_mlp", {"val_fraction": 0.999}, "data", "val_fraction + test_fraction: must be below 1"),
        ("digits_mlp", {"test_fraction": 0.001}, "data", "each split needs at least 10"),
        ("regression_mlp", {"n_samples": 3}, "data", "n_samples: 3 examples split 1/1/1"),
        ("regression_mlp", {"n_samples": 20, "test_fraction": 0.1}, "data", "each split needs at least 5"),
        ("tinygpt", {"n_embd": 30}, "model", "n_embd: must be a multiple of n_head (4), got 30"),
        ("tinygpt", {"corpus_bytes": 1000}, "data", "corpus_bytes: must be at least"),
        ("finetune_minilm", {"per_class": 2}, "data", "per_class: 12 examples"),
    ],
)
def test_rules_between_settings_are_the_class_own(spec: str, overrides: dict, target: str, expected: str) -> None:
    """A rule between settings refuses the same values at `validate` as the class does when it is built."""
    from lightning_modules import data_class, model_class

    path = PROJECT_ROOT / "pipelines" / f"{spec}.yaml"
    with pytest.raises(SpecError, match=re.escape(expected)):
        load_spec(path, overrides)
    params = load_spec(path).parameters() | overrides
    cls = model_class(params["model"]) if target == "model" else data_class(params["data"])
    from lightning_modules import init_parameters

    kwargs = {k: params[k] for k in init_parameters(cls) if k in params and k not in ("input_shape", "num_classes")}
    with pytest.raises(ValueError, match=re.escape(expected)):
        cls(**kwargs)


def test_the_spec_sections_defaults_are_the_classes_defaults() -> None:
    """OptimSpec, dropout, batch_size and seed use the classes' declarations: same defaults, same ranges."""
    from lightning_modules import catalog
    from pipelines.specs.spec import DataSpec, ModelSpec, OptimSpec, TrainerSpec

    for model in catalog.names("model"):
        defaults = catalog.entry("model", model).defaults
        assert {k: defaults[k] for k in OptimSpec.model_fields} == OptimSpec().model_dump(), model
        assert defaults["dropout"] == ModelSpec.model_fields["dropout"].default
    for data in catalog.names("data"):
        defaults = catalog.entry("data", data).defaults
        assert defaults["batch_size"] == DataSpec.model_fields["batch_size"].default
        assert defaults["seed"] == TrainerSpec.model_fields["seed"].default


def test_the_train_notebook_defaults_are_valid_settings() -> None:
    """The notebook's parameters cell holds values every declaration accepts (run as plain papermill)."""
    import ast

    import nbformat

    from lightning_modules import catalog
    from lightning_modules.settings import check_value

    notebook = nbformat.read(PROJECT_ROOT / "notebooks" / "train.ipynb", as_version=4)
    cell = next(c for c in notebook.cells if "parameters" in c.metadata.get("tags", []))
    values = {
        node.targets[0].id: ast.literal_eval(node.value)
        for node in ast.parse(cell.source).body
        if isinstance(node, ast.Assign)
    }
    checked = 0
    for kind in ("model", "data"):
        for name in catalog.names(kind):
            entry = catalog.entry(kind, name)
            for setting, tp in entry.types().items():
                # None where the class has a default of its own means that default (registry.pick drops it)
                if setting in values and not (values[setting] is None and entry.defaults.get(setting) is not None):
                    check_value(setting, tp, values[setting])
                    checked += 1
    assert checked > 30


@pytest.mark.parametrize(
    ("spec", "setting", "field"),
    [
        ("digits_mlp", "test_fraction=1.5", "data.test_fraction: Input should be less than 1"),
        ("digits_mlp", "val_fraction=0.999", "val_fraction + test_fraction: must be below 1"),
        ("digits_mlp", "seed=-1", "trainer.seed: Input should be greater than or equal to 0"),
        ("digits_mlp", "max_epochs=true", "trainer.max_epochs: expected a number, got the boolean True"),
        ("digits_mlp", "lr=.inf", "optim.lr: Input should be a finite number"),
        ("digits_mlp", "hidden_sizes=[8, 0]", "model.hidden_sizes.1: Input should be greater than or equal to 1"),
        ("regression_mlp", "n_samples=3", "n_samples: 3 examples split 1/1/1"),
    ],
)
def test_cli_refuses_out_of_range_settings_before_writing_anything(
    tmp_path: Path, spec: str, setting: str, field: str
) -> None:
    path = PROJECT_ROOT / "pipelines" / f"{spec}.yaml"
    for verb in ("validate", "run"):
        done = labbook(verb, str(path), "--set", setting, cwd=tmp_path, env={"MLFLOW_TRACKING_URI": ""})
        assert done.returncode == 2, (verb, done.stdout, done.stderr)
        assert done.stderr.strip().count("\n") == 0 and field in done.stderr, done.stderr
        assert not (tmp_path / "mlruns").exists()


# -- the spec file itself: duplicate keys, alias bombs, bytes, names, tune ranges, environment -------------
def _bomb(levels: int) -> str:
    """`[&a0 [8, ...], &a1 [*a0, ...], ...]`: 9**levels values in a few hundred bytes."""
    parts = ["&a0 [8, 8, 8, 8, 8, 8, 8, 8, 8]"]
    parts += [f"&a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, levels)]
    return f"[{', '.join(parts)}]"


BASE_TEXT = (PROJECT_ROOT / "pipelines" / "digits_mlp.yaml").read_text()
TUNE_TEXT = (PROJECT_ROOT / "pipelines" / "regression_tune.yaml").read_text()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (BASE_TEXT + "optim:\n  lr: 0.1\n", "line 24: duplicate key 'optim' (lines 12 and 24)"),
        (BASE_TEXT.replace("  max_epochs: 30\n", "  max_epochs: 30\n  max_epochs: 3\n"), "duplicate key 'max_epochs'"),
        (BASE_TEXT.replace("hidden_sizes: [64]", f"hidden_sizes: {_bomb(7)}"), "aliases expand to more than 100000"),
        (BASE_TEXT.replace("hidden_sizes: [64]", f"hidden_sizes: {_bomb(9)}"), "aliases expand to more than 100000"),
        (
            BASE_TEXT.replace("hidden_sizes: [64]", "hidden_sizes: &r [8, *r]"),
            "an alias refers to a value that contains",
        ),
        (BASE_TEXT.replace("hidden_sizes: [64]", f"hidden_sizes: {_bomb(5)}"), "model.hidden_sizes.0: Input should be"),
        (BASE_TEXT.replace("name: digits_mlp", "name: " + "n" * 230), "name: String should have at most 200"),
        (
            BASE_TEXT.replace("experiment: digits", "experiment: " + "e" * 501),
            "experiment: String should have at most 500",
        ),
        (
            TUNE_TEXT.replace("high: 1.0, log: true", "high: .inf, log: true"),
            "tune.space.lr.high: Input should be a finite",
        ),
        (TUNE_TEXT.replace("low: 1.0e-5, high: 1.0, log: true", "low: -1.0e308, high: 1.0e308"), "range too wide"),
        (TUNE_TEXT.replace("low: 1.0e-5, high: 1.0,", "low: true, high: 1.0,"), "lr.low: expected a number, got the"),
        (TUNE_TEXT.replace("metric: val_r2", "metric: test_r2"), "logs each epoch while it trains; known: val_loss"),
    ],
)
def test_refused_spec_files_give_one_bounded_line(tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(SpecError) as caught:
        load_spec(path)
    message = str(caught.value)
    assert expected in message and "\n" not in message and len(message) <= 500, message[:1000]


def test_a_spec_that_is_not_utf8_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "spec.yaml"
    path.write_bytes(BASE_TEXT.encode().replace(b"digits_mlp", b"digits_\xff_mlp"))
    with pytest.raises(SpecError, match=r"spec.yaml: line 2: not UTF-8 text \(byte \d+\)"):
        load_spec(path)


def test_set_values_are_read_as_strictly_as_spec_files() -> None:
    with pytest.raises(SpecError, match="duplicate key 'a'"):
        parse_overrides(["hidden_sizes={a: 1, a: 2}"])
    with pytest.raises(SpecError, match="aliases expand to more than"):
        parse_overrides([f"hidden_sizes={_bomb(7)}"])


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("LABBOOK_HEARTBEAT_SECONDS", "abc", "LABBOOK_HEARTBEAT_SECONDS='abc': expected a whole number from 1 to 3600"),
        ("LABBOOK_WARM_KERNELS", "abc", "LABBOOK_WARM_KERNELS='abc': expected a whole number from 0 to 64"),
        ("LABBOOK_OPTUNA_STORAGE", "::nope", "LABBOOK_OPTUNA_STORAGE: not a database URL"),
        ("LABBOOK_OPTUNA_STORAGE", "sqlite:////etc/passwd/dir/x.db", "folder '/etc/passwd/dir' cannot be made"),
        ("MLFLOW_TRACKING_URI", "notaurl", "MLFLOW_TRACKING_URI: expected a tracking server"),
        ("MLFLOW_TRACKING_URI", "sqlite:////etc/passwd/x.db", "folder '/etc/passwd' cannot be made"),
    ],
)
def test_bad_labbook_environment_is_refused_before_anything_is_written(
    tmp_path: Path, variable: str, value: str, expected: str
) -> None:
    path = str(PROJECT_ROOT / "pipelines" / "regression_tune.yaml")
    for command in (("run", path), ("tune", path, "--n-trials", "1")):
        done = labbook(*command, cwd=tmp_path, env={"MLFLOW_TRACKING_URI": "", variable: value})
        assert done.returncode == 2, (command, done.stdout, done.stderr[-2000:])
        assert done.stderr.strip().count("\n") == 0 and expected in done.stderr, done.stderr[-2000:]
        assert not (tmp_path / "mlruns").exists()


def test_every_labbook_variable_read_anywhere_is_checked() -> None:
    import re as regex

    from pipelines.specs import environment

    read = set()
    for source in (PROJECT_ROOT / "pipelines").rglob("*.py"):  # every package, not the top folder only
        read |= set(regex.findall(r"\"(LABBOOK_[A-Z_]+)\"", source.read_text()))
    assert read - environment.INTERNAL <= set(environment.readers()), read - set(environment.readers())


@pytest.mark.parametrize(
    ("student", "expected"),
    [
        ("{hidden_sizes: [0], dropout: 0.0}", "steps.compress.student.hidden_sizes.0: Input should be greater than"),
        ("{hidden_sizes: [16], dropout: true}", "steps.compress.student.dropout: expected a number, got the boolean"),
    ],
)
def test_pipeline_steps_settings_go_through_the_same_declarations(tmp_path: Path, student: str, expected: str) -> None:
    text = (PROJECT_ROOT / "pipelines" / "digits_compress.yaml").read_text()
    path = tmp_path / "pipeline.yaml"
    path.write_text(text.replace("student: {hidden_sizes: [16], dropout: 0.0}", f"student: {student}"))
    (tmp_path / "digits_mlp.yaml").write_text(BASE_TEXT)
    with pytest.raises(SpecError, match=re.escape(expected)):
        load_pipeline(path)
    path.write_text(text.replace("max_epochs: 20}", "max_epochs: true}"))  # a train step's `set:`, as --set
    with pytest.raises(SpecError, match="steps.train.set: trainer.max_epochs: expected a number, got the boolean"):
        load_pipeline(path)


@pytest.mark.fast
@pytest.mark.parametrize(
    ("accelerator", "devices", "ok"),
    [
        ("cpu", "0", False),  # Trainer(devices=0) is invalid: it said ok, then the run failed
        ("auto", "0", False),
        ("auto", "-2", False),
        ("auto", "[]", False),
        ("auto", "[0, 0]", False),
        ("auto", "[-1]", False),
        ("auto", "''", False),
        ("cpu", "-1", False),  # Lightning's CPUAccelerator takes a process count only
        ("cpu", "[0, 1]", False),
        ("cpu", "'0,1'", False),
        ("cpu", "2", True),
        ("cpu", "auto", True),
        ("gpu", "-1", True),
        ("gpu", "[0, 1]", True),
        ("gpu", "'0,1'", True),
    ],
)
def test_trainer_devices_are_checked_as_lightning_reads_them(accelerator: str, devices: str, ok: bool) -> None:
    overrides = parse_overrides([f"accelerator={accelerator}", f"devices={devices}"])
    path = PROJECT_ROOT / "pipelines" / "digits_mlp.yaml"
    if ok:
        assert load_spec(path, overrides).trainer.devices is not None
        return
    with pytest.raises(SpecError, match="devices") as caught:
        load_spec(path, overrides)
    assert "positive int" in str(caught.value) and "\n" not in str(caught.value).strip()


@pytest.mark.parametrize("storage", ["notaurl", "sqlite:////etc/passwd/x.db"])
def test_a_bad_storage_flag_is_refused_before_anything_is_written(tmp_path: Path, storage: str) -> None:
    path = str(PROJECT_ROOT / "pipelines" / "regression_tune.yaml")
    done = labbook("tune", path, "--storage", storage, cwd=tmp_path, env={"MLFLOW_TRACKING_URI": ""})
    assert done.returncode == 2 and done.stderr.strip().count("\n") == 0, done.stderr[-2000:]
    assert "--storage / tune.storage:" in done.stderr
    assert not (tmp_path / "mlruns").exists()


# -- booleans never pass as numbers in a tune: section or a pipeline step; steps checked as they will run -------
TUNE_SPEC = yaml.safe_load((PROJECT_ROOT / "pipelines" / "digits_mlp_tune.yaml").read_text())


def tuned(section: str | None = None, **values) -> dict:
    """digits_mlp_tune.yaml with values of its `tune:` (or of `sampler`, `pruner`, `space.<name>` there) changed."""
    raw = yaml.safe_load(yaml.safe_dump(TUNE_SPEC))
    target = raw["tune"]
    for key in section.split(".") if section else ():
        target = target.setdefault(key, {})
    target.update(values)
    return raw


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (tuned(n_trials=True), "tune.n_trials: expected a number, got the boolean True"),
        (tuned(timeout=True), "tune.timeout: expected a number, got the boolean True"),
        (tuned(timeout=float("inf")), "tune.timeout: Input should be a finite number"),
        (tuned("sampler", seed=True), "tune.sampler.seed: expected a number, got the boolean True"),
        (tuned("sampler", seed=-1), "tune.sampler.seed: Input should be greater than or equal to 0 (got -1)"),
        (tuned("sampler", n_startup_trials=True), "tune.sampler.n_startup_trials: expected a number, got the boolean"),
        (tuned("pruner", min_resource=True), "tune.pruner.min_resource: expected a number, got the boolean True"),
        (tuned("pruner", min_resource=0), "tune.pruner.min_resource: Input should be greater than or equal to 1"),
        (tuned("pruner", reduction_factor=True), "tune.pruner.reduction_factor: expected a number, got the boolean"),
        (tuned("pruner", name="median", n_warmup_steps=True), "tune.pruner.n_warmup_steps: expected a number, got"),
        (tuned("pruner", name="median", n_startup_trials=True), "tune.pruner.n_startup_trials: expected a number"),
        (tuned("space.l1", step=True), "tune.space.l1.step: expected a number, got the boolean True"),
        (tuned("space.lr", log=1), "tune.space.lr.log: Input should be a valid boolean (got 1)"),
        (tuned("space.max_epochs", type="int", low=2, high=True), "tune.space.max_epochs.high: expected a number"),
        (tuned("space.max_epochs", type="int", low=True, high=4), "tune.space.max_epochs.low: expected a number"),
        (tuned("space.max_epochs", type="int", low=2, high=4, step=True), "tune.space.max_epochs.step: expected a"),
        (tuned("space.max_epochs", type="int", low=2, high=4, log="yes"), "tune.space.max_epochs.log: Input should"),
    ],
)
def test_tune_numbers_refuse_booleans_and_out_of_range_values(tmp_path: Path, raw: dict, expected: str) -> None:
    path = write(tmp_path, raw)
    with pytest.raises(SpecError) as caught:
        load_spec(path)
    message = str(caught.value)
    assert expected in message and "\n" not in message, message


def test_tune_n_trials_true_is_refused_by_validate(tmp_path: Path) -> None:
    done = labbook(
        "validate", str(write(tmp_path, tuned(n_trials=True))), cwd=tmp_path, env={"MLFLOW_TRACKING_URI": ""}
    )
    assert done.returncode == 2 and done.stderr.strip().count("\n") == 0, (done.stdout, done.stderr)
    assert "tune.n_trials: expected a number, got the boolean True" in done.stderr


NIGHTLY_TEXT = (PROJECT_ROOT / "pipelines" / "digits_nightly.yaml").read_text()
COMPRESS_TEXT = (PROJECT_ROOT / "pipelines" / "digits_compress.yaml").read_text()


@pytest.mark.parametrize(
    ("text", "old", "new", "expected"),
    [
        (NIGHTLY_TEXT, "n_trials: 4 ", "n_trials: true ", "steps.0.tune.n_trials: expected a number, got the boolean"),
        (NIGHTLY_TEXT, "n_trials: 4 ", "timeout: true ", "steps.0.tune.timeout: expected a number, got the boolean"),
        (NIGHTLY_TEXT, "n_trials: 4 ", "n_trials: 4\n    workers: true", "steps.0.tune.workers: expected a number"),
        (
            NIGHTLY_TEXT,
            "n_trials: 4 ",
            "n_trials: 4\n    report: 1",
            "steps.0.tune.report: Input should be a valid bool",
        ),
        (NIGHTLY_TEXT, "retries: 1", "retries: true", "steps.1.train.retries: expected a number, got the boolean"),
        (NIGHTLY_TEXT, "kind: report\n", "kind: report\n    top_k: true\n", "steps.4.report.top_k: expected a number"),
        (NIGHTLY_TEXT, "steps:\n", "report: 1\nsteps:\n", "report: Input should be a valid boolean (got 1)"),
        (
            NIGHTLY_TEXT,
            "n_trials: 4 ",
            "n_trials: 4\n    launcher: {name: slurm, cpus_per_task: true}",
            "steps.0.tune.launcher.cpus_per_task: expected a number, got the boolean True",
        ),
        (
            NIGHTLY_TEXT,
            "metric: test_acc",
            "metric: nope_acc",
            "steps.promote.metric: got 'nope_acc'; mlp_classifier logs train_loss, train_acc",
        ),
        (NIGHTLY_TEXT, "metric: test_acc", "metric: test_r2", "steps.promote.metric: got 'test_r2'; mlp_classifier"),
        (
            NIGHTLY_TEXT,
            "run: ${retrain.run_id}\n    metric: test_acc",
            "run: 0123abcd\n    metric: acc",
            "steps.promote.metric: got 'acc'; the models log test_acc",
        ),
        (
            NIGHTLY_TEXT,
            "run: ${retrain.run_id}",
            "run: ${search.run_id}",
            "steps.promote.run: ${search.run_id} names no trained model; a register step takes (train run_id; tune",
        ),
        (NIGHTLY_TEXT, "split: test}", "split: banana}", "steps.evaluate.parameters.split: got 'banana'; expected one"),
        (
            NIGHTLY_TEXT,
            "split: test}",
            "split: 3}",
            "steps.evaluate.parameters.split: got 3; expected one of test, val",
        ),
        (COMPRESS_TEXT, "sparsity: 0.5", "sparsity: true", "steps.1.compress.sparsity: expected a number, got the"),
        (COMPRESS_TEXT, "finetune_epochs: 1", "finetune_epochs: true", "steps.1.compress.finetune_epochs: expected a"),
        (COMPRESS_TEXT, "distill_epochs: 10", "distill_epochs: true", "steps.1.compress.distill_epochs: expected a"),
        (COMPRESS_TEXT, "temperature: 1.0", "temperature: .inf", "steps.1.compress.temperature: Input should be a"),
        (COMPRESS_TEXT, "samples: 8", "samples: true", "steps.2.explain.samples: expected a number, got the boolean"),
        (
            COMPRESS_TEXT,
            "run: ${train.run_id}  #",
            "run: ${train.params}  #",
            "steps.compress.run: ${train.params} names no trained model; a compress step takes (train model_uri",
        ),
    ],
)
def test_pipeline_steps_refuse_what_their_run_would(
    tmp_path: Path, text: str, old: str, new: str, expected: str
) -> None:
    """Booleans as numbers, a metric the model does not log, a split or a run the step cannot use: refused up front."""
    for name in ("digits_mlp.yaml", "digits_mlp_tune.yaml"):
        (tmp_path / name).write_text((PROJECT_ROOT / "pipelines" / name).read_text())
    assert old in text
    path = tmp_path / "pipeline.yaml"
    path.write_text(text.replace(old, new, 1))
    with pytest.raises(SpecError) as caught:
        load_pipeline(path)
    message = str(caught.value)
    assert expected in message and "\n" not in message and len(message) <= 500, message


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("split: test}", "split: val}"),  # the other split the evaluate notebook scores
        ("run: ${retrain.run_id}", "run: ${search.best_run_id}"),  # the best trial's run holds a model
        ("run: ${retrain.run_id}\n    metric: test_acc", "run: 0123abcd\n    metric: test_r2"),  # some model logs it
    ],
)
def test_pipeline_steps_accept_what_their_run_can_use(tmp_path: Path, old: str, new: str) -> None:
    for name in ("digits_mlp.yaml", "digits_mlp_tune.yaml"):
        (tmp_path / name).write_text((PROJECT_ROOT / "pipelines" / name).read_text())
    path = tmp_path / "pipeline.yaml"
    path.write_text(NIGHTLY_TEXT.replace(old, new, 1))
    assert load_pipeline(path).steps


def test_pipeline_validate_refuses_a_metric_and_a_split_the_steps_would_fail_on(tmp_path: Path) -> None:
    for name in ("digits_mlp.yaml", "digits_mlp_tune.yaml"):
        (tmp_path / name).write_text((PROJECT_ROOT / "pipelines" / name).read_text())
    for old, new, field in (
        ("metric: test_acc", "metric: nope_acc", "steps.promote.metric"),
        ("split: test}", "split: banana}", "steps.evaluate.parameters.split"),
    ):
        path = tmp_path / "pipeline.yaml"
        path.write_text(NIGHTLY_TEXT.replace(old, new))
        done = labbook("validate", str(path), cwd=tmp_path, env={"MLFLOW_TRACKING_URI": ""})
        assert done.returncode == 2 and done.stderr.strip().count("\n") == 0, (done.stdout, done.stderr)
        assert field in done.stderr, done.stderr
        assert not (tmp_path / "mlruns").exists()


# -- trainer settings the run would refuse: a package not installed, a checkpoint not there -------------------
_NO_XLA = importlib.util.find_spec("torch_xla") is None
_NO_DEEPSPEED = importlib.util.find_spec("deepspeed") is None


@pytest.mark.parametrize(
    ("setting", "field"),
    [
        pytest.param(
            "accelerator=tpu",
            "trainer.accelerator: accelerator 'tpu' needs the torch_xla package, not installed here; allowed: auto",
            marks=pytest.mark.skipif(not _NO_XLA, reason="torch_xla is installed"),
        ),
        pytest.param(
            "strategy=deepspeed",
            "trainer.strategy: strategy 'deepspeed' needs the deepspeed package, not installed here; allowed: auto",
            marks=pytest.mark.skipif(not _NO_DEEPSPEED, reason="deepspeed is installed"),
        ),
        ("ckpt_path=../../x.ckpt", "trainer.ckpt_path: no such file '../../x.ckpt'"),
        ("gradient_clip_val=0", "trainer.gradient_clip_val: Input should be greater than 0 (got 0)"),
    ],
)
def test_validate_refuses_trainer_settings_the_run_would_fail_on(tmp_path: Path, setting: str, field: str) -> None:
    path = PROJECT_ROOT / "pipelines" / "digits_mlp.yaml"
    for verb in ("validate", "run"):
        done = labbook(verb, str(path), "--set", setting, cwd=tmp_path, env={"MLFLOW_TRACKING_URI": ""})
        assert done.returncode == 2, (verb, done.stdout, done.stderr)
        assert done.stderr.strip().count("\n") == 0 and field in done.stderr, done.stderr
        assert not (tmp_path / "mlruns").exists()


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        pytest.param(
            {"strategy": "deepspeed_stage_2"},
            "needs the deepspeed package",
            marks=pytest.mark.skipif(not _NO_DEEPSPEED, reason="deepspeed is installed"),
        ),
        pytest.param(
            {"strategy": "xla"}, "needs the torch_xla package", marks=pytest.mark.skipif(not _NO_XLA, reason="xla")
        ),
        pytest.param(
            {"strategy": "single_tpu"},
            "needs the torch_xla package",
            marks=pytest.mark.skipif(not _NO_XLA, reason="torch_xla is installed"),
        ),
        ({"strategy": "fsdp", "accelerator": "mps"}, "strategy fsdp needs a GPU (Lightning's FSDP strategy refuses"),
        ({"ckpt_path": "missing/best.ckpt"}, "trainer.ckpt_path: no such file 'missing/best.ckpt'"),
        ({"ckpt_path": "latest"}, "trainer.ckpt_path: expected 'last' or a path to a .ckpt file"),
        ({"gradient_clip_val": -0.5}, "trainer.gradient_clip_val: Input should be greater than 0"),
        ({"gradient_clip_val": True}, "trainer.gradient_clip_val: expected a number, got the boolean True"),
    ],
)
def test_trainer_settings_refused_as_the_run_would(tmp_path: Path, monkeypatch, overrides: dict, expected: str) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SpecError, match=re.escape(expected)):
        load_spec(PROJECT_ROOT / "pipelines" / "digits_mlp.yaml", overrides)


def test_trainer_settings_the_run_takes_are_accepted(tmp_path: Path, monkeypatch) -> None:
    """No GPU is asked for (login nodes have none); a checkpoint path is read from the current folder, as the run
    reads it."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "start.ckpt").write_bytes(b"")
    (tmp_path / "sharded.ckpt").mkdir()  # DeepSpeed and FSDP write a checkpoint as a folder
    path = PROJECT_ROOT / "pipelines" / "digits_mlp.yaml"
    for overrides in (
        {"accelerator": "gpu", "strategy": "ddp", "devices": 2},
        {"accelerator": "gpu", "strategy": "fsdp"},
        {"ckpt_path": "last"},
        {"ckpt_path": "runs/start.ckpt"},
        {"ckpt_path": str(tmp_path / "runs" / "start.ckpt")},
        {"ckpt_path": "sharded.ckpt"},
        {"gradient_clip_val": 0.5},
        {"gradient_clip_val": None},
    ):
        spec = load_spec(path, overrides)
        assert {k: spec.parameters()[k] for k in overrides} == overrides
