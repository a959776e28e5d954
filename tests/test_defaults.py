"""One default per setting: the notebooks' parameters cells, the spec schemas and the classes agree.

A setting is declared in up to four places (a notebook's parameters cell, `OptimSpec`/`TrainerSpec`,
a class's `__init__`, a pipeline step's schema); where two give it a default, the defaults are the
same, and a notebook's `None` means "the class's own default".
"""

from __future__ import annotations

import ast
import inspect
import json
from pathlib import Path
from typing import Any

import pytest

from lightning_modules import DATA, MODELS, init_parameters
from pipelines.specs import pipeline_spec
from pipelines.specs.spec import TRACKING_PARAMETERS, DataSpec, ModelSpec, OptimSpec, TrainerSpec

pytestmark = pytest.mark.fast

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def _parameters(notebook: str) -> dict[str, Any]:
    cells = json.loads((NOTEBOOKS / notebook).read_text())["cells"]
    cell = next(c for c in cells if "parameters" in c["metadata"].get("tags", []))
    return {
        node.targets[0].id: ast.literal_eval(node.value)
        for node in ast.parse("".join(cell["source"])).body
        if isinstance(node, ast.Assign)
    }


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def test_the_train_notebook_gives_each_class_setting_its_class_default_or_none() -> None:
    notebook = _parameters("train.ipynb")
    differ = [
        f"{name}.{setting}: notebook {notebook[setting]!r}, class {param.default!r}"
        for table in (MODELS, DATA)
        for name, cls in table.items()
        for setting, param in init_parameters(cls).items()
        if setting in notebook
        and param.default is not inspect.Parameter.empty
        and notebook[setting] is not None
        and notebook[setting] != _plain(param.default)
    ]
    assert not differ, "\n".join(differ)


def test_a_none_in_the_notebook_builds_each_model_with_its_own_default() -> None:
    from lightning_modules import build_data, build_model

    params = {**_parameters("train.ipynb"), "model": "mlp_regressor", "data": "regression", "n_samples": 60}
    assert params["hidden_sizes"] is None
    data = build_data(params)
    data.setup()
    assert build_model(params, data).hparams.hidden_sizes == (20,)
    params |= {"model": "mlp_classifier", "data": "digits"}
    data = build_data(params)
    data.setup()
    assert build_model(params, data).hparams.hidden_sizes == (50,)


def test_the_spec_sections_and_the_train_notebook_share_their_defaults() -> None:
    notebook = _parameters("train.ipynb")
    fields = {**OptimSpec.model_fields, **TrainerSpec.model_fields}
    fields |= {k: v for k, v in {**ModelSpec.model_fields, **DataSpec.model_fields}.items() if k != "name"}
    missing = sorted(set(fields) - set(notebook))
    assert not missing, f"spec settings without a notebook parameter: {missing}"
    differ = {k: (notebook[k], f.default) for k, f in fields.items() if notebook[k] != f.default}
    assert not differ


@pytest.mark.parametrize(
    ("notebook", "step"),
    [("compress.ipynb", pipeline_spec.CompressStep), ("explain.ipynb", pipeline_spec.ExplainStep)],
)
def test_a_step_schema_has_every_notebook_parameter_with_the_same_default(notebook: str, step: type) -> None:
    parameters = _parameters(notebook)
    own = {k for k in parameters if k not in TRACKING_PARAMETERS and k not in ("train_run_id", "model_ref", "seed")}
    fields = {k: f for k, f in step.model_fields.items() if k not in ("name", "kind", "retries", "run")}
    assert own == set(fields), f"{notebook} parameters vs {step.__name__} fields"
    defaults = {k: f.get_default(call_default_factory=True) for k, f in fields.items() if not f.is_required()}
    differ = {k: (parameters[k], default) for k, default in defaults.items()}
    differ = {k: v for k, v in differ.items() if v[1] is not None and v[0] != v[1]}
    assert not differ


def test_distillation_defaults_are_the_step_schemas() -> None:
    from lightning_modules.distill import Distill

    signature = inspect.signature(Distill.__init__).parameters
    fields = pipeline_spec.CompressStep.model_fields
    assert signature["alpha"].default == fields["alpha"].default == _parameters("compress.ipynb")["alpha"]
    assert signature["temperature"].default == fields["temperature"].default
    assert fields["temperature"].default == _parameters("compress.ipynb")["temperature"]
