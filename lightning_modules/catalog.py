"""The registry's models and data sets described as plain data: what a spec is checked against.

Importing the classes means importing torch and Lightning, seconds on a laptop; every `labbook`
command would pay that before reading its spec, and a typo took 5 s to report. So each
registered class's settings (name → type with its range, as declared on the constructor with
`lightning_modules.settings`), defaults, rules between settings, task, kind of input and metrics
are written once to `catalog.json` by `python -m lightning_modules.registry`, from the classes
themselves, and read here without importing torch. `tests/test_spec.py` fails when the file and
the classes disagree. This module imports nothing from torch, Lightning or the rest of this
package but `lightning_modules.settings` (torch-free).
"""

from __future__ import annotations

import functools
import inspect
import json
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import annotated_types

CATALOG = Path(__file__).with_name("catalog.json")

# Model arguments that come from the data module (never set by a spec), and data arguments
# that come from the model: `-p model cnn` alone gives the CNN its images, and the text data
# cuts its windows to the GPT's own `block_size` (a model setting).
DERIVED_FROM_DATA = ("input_shape", "num_classes", "vocab_size")
DERIVED_FROM_MODEL = ("flatten", "block_size")

# A model logs `<split>_<metric>` per epoch for each split; only train and val while it fits (the
# checkpoint monitor, early stopping and a study's pruner read those), test after fitting.
SPLITS = ("train", "val", "test")
FIT_SPLITS = ("val", "train")

# The names a setting's type may use, as written in catalog.json: `Annotated[int, Ge(ge=1)]`.
_CONSTRAINTS = ("Gt", "Ge", "Lt", "Le", "MultipleOf", "MinLen", "MaxLen", "Len")
_TYPE_NAMES: dict[str, Any] = {
    "Any": Any,
    "Literal": Literal,
    "Annotated": Annotated,
    **{name: getattr(annotated_types, name) for name in _CONSTRAINTS},
    "Sequence": Sequence,
    "Mapping": Mapping,
    "None": None,
    **{t.__name__: t for t in (int, float, str, bool, list, tuple, dict)},
}


@dataclass(frozen=True)
class Entry:
    """One registered class, as a spec sees it."""

    name: str
    target: str  # "module:Class", what the registry builds
    # every `__init__` argument → its type and range as Python source ("Annotated[int, Ge(ge=1)]")
    settings: dict[str, str]
    task: str
    input_kind: str
    input_rank: int | None = None
    metric_names: tuple[str, ...] = ()
    defaults: dict[str, Any] = field(default_factory=dict)  # as JSON: a tuple default is a list
    rules: tuple[str, ...] = ()  # names in `lightning_modules.settings.RULES`

    def types(self) -> dict[str, Any]:
        """The settings' types, for pydantic: `{"hidden_sizes": Sequence[Annotated[int, Ge(ge=1)]], ...}`."""
        return {name: eval(source, {"__builtins__": {}}, _TYPE_NAMES) for name, source in self.settings.items()}

    def check_rules(self, values: dict[str, Any]) -> None:
        """Run this class's rules on `values` (defaults filled in); `ValueError` names the setting."""
        from lightning_modules.settings import apply_rules

        apply_rules(self.rules, {**self.defaults, **values})


@functools.cache
def _read() -> dict[str, dict[str, Entry]]:
    raw = json.loads(CATALOG.read_text())
    return {
        kind: {
            name: Entry(
                name=name,
                **{**e, "metric_names": tuple(e.get("metric_names", ())), "rules": tuple(e.get("rules", ()))},
            )
            for name, e in entries.items()
        }
        for kind, entries in raw.items()
    }


def names(kind: Literal["model", "data"]) -> list[str]:
    return list(_read()[kind])


def entry(kind: Literal["model", "data"], name: str) -> Entry:
    """The entry of model or data `name`; an unknown one says which are known."""
    table = _read()[kind]
    try:
        return table[name]
    except KeyError:
        raise ValueError(f"unknown {kind} {name!r}; known: {', '.join(sorted(table))}") from None


def metric_names(model: str, splits: Sequence[str] = SPLITS) -> list[str]:
    """The metrics `model` logs, `<split>_<metric>`: `val_acc`, `train_loss`, ... (`test_` after fitting)."""
    return [f"{split}_{m}" for split in splits for m in entry("model", model).metric_names]


def fit_metric_names(model: str) -> list[str]:
    """The metrics `model` logs every epoch while it trains: what a checkpoint, early stop or pruner can watch."""
    return metric_names(model, FIT_SPLITS)


def check_fit(model: str, data: str) -> None:
    """A model trains on a data set only if they share the task and the kind of input."""
    m, d = entry("model", model), entry("data", data)
    if (m.task, m.input_kind) != (d.task, d.input_kind):
        fitting = [e.name for e in _read()["data"].values() if (e.task, e.input_kind) == (m.task, m.input_kind)]
        raise ValueError(
            f"model {model!r} is for {m.task} but data {data!r} is {d.task}"
            + ("" if m.input_kind == d.input_kind else f" ({d.input_kind})")
            + f"; pick a data set made for it ({', '.join(fitting)})"
        )


def type_source(tp: Any) -> str:
    """A type as the Python source `Entry.types` evaluates back to it; `Any` where it cannot."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is type(None) or tp is None:
        return "None"
    if origin is Annotated:
        shown = [type_source(args[0])]
        for meta in tp.__metadata__:
            if type(meta).__name__ not in _CONSTRAINTS or type(meta).__module__ != "annotated_types":
                raise TypeError(f"{meta!r}: a setting's range is declared with annotated_types {_CONSTRAINTS}")
            shown.append(repr(meta))
        return f"Annotated[{', '.join(shown)}]"
    if origin is Literal:
        return f"Literal[{', '.join(repr(a) for a in args)}]"
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_source(a) for a in args)
    if origin is not None and args:
        inner = ", ".join("..." if a is Ellipsis else type_source(a) for a in args)
        return f"{type_source(origin)}[{inner}]"
    name = getattr(tp, "__name__", None)
    return name if name in _TYPE_NAMES and _TYPE_NAMES[name] is tp else "Any"


def build(
    models: Mapping[str, type], data: Mapping[str, type], init_parameters: Callable[[type], Mapping[str, Any]]
) -> dict[str, dict[str, dict[str, Any]]]:
    """The catalog of the registry's classes (`registry.MODELS`, `registry.DATA`, and how it reads
    a class's settings): handed in by `lightning_modules.registry`, which this module never imports."""

    def describe(cls: type) -> dict[str, Any]:
        hints: dict[str, Any] = {}
        for klass in reversed(cls.__mro__):  # a subclass's annotation wins over its base's
            if "__init__" in vars(klass) and klass.__module__.startswith("lightning_modules."):
                hints |= typing.get_type_hints(klass.__init__, include_extras=True)
        parameters = init_parameters(cls)
        defaults = {n: p.default for n, p in parameters.items() if p.default is not inspect.Parameter.empty}
        fields = {
            "target": f"{cls.__module__}:{cls.__qualname__}",
            "settings": {name: type_source(hints.get(name, Any)) for name in parameters},
            "defaults": {n: list(v) if isinstance(v, tuple) else v for n, v in defaults.items()},
            "rules": list(getattr(cls, "rules", ())),
            "task": cls.task,
            "input_kind": cls.input_kind,
            "input_rank": getattr(cls, "input_rank", None),
            "metric_names": list(getattr(cls, "metric_names", ())),
        }
        return {k: v for k, v in fields.items() if v not in (None, [], {})}  # Entry's defaults

    return {
        "model": {name: describe(cls) for name, cls in models.items()},
        "data": {name: describe(cls) for name, cls in data.items()},
    }


def write(built: dict[str, dict[str, dict[str, Any]]]) -> Path:
    """Rewrite catalog.json (`python -m lightning_modules.registry` does, from the classes)."""
    CATALOG.write_text(json.dumps(built, indent=2) + "\n")
    return CATALOG
