"""What each model and data setting accepts: one declaration of its type and range, read by all.

A constructor annotates each argument with one of the types below (an `annotated-types`
constraint such as `Ge(1)` on a plain `int`). From that one annotation:
- `python -m lightning_modules.registry` writes the type, range and default to `catalog.json`;
- `labbook validate` / `--set` / a tune range / a pipeline step check a value against it
  (pydantic, reading catalog.json without importing torch);
- the class itself refuses the same value at construction (`checked`, on its `__init__`).
Rules between settings (`val_fraction + test_fraction < 1`) are named functions in `RULES`; a
class lists the names it obeys in `rules`, the catalog records them, and both sides run them.

Numbers are strict in one way everywhere: a boolean is never an int or a float (YAML's
`max_epochs: true` is refused, not taken as 1), and a float is finite. This module imports
only `annotated_types` (and pydantic when it checks), never torch.
"""

from __future__ import annotations

import functools
import inspect
import math
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Annotated, Any, Literal

from annotated_types import Ge, Gt, Le, Lt

# -- declarations: the types constructors annotate with ----------------------------------------
PositiveInt = Annotated[int, Ge(1)]
NonNegativeInt = Annotated[int, Ge(0)]
PositiveFloat = Annotated[float, Gt(0)]
NonNegativeFloat = Annotated[float, Ge(0)]
Fraction = Annotated[float, Gt(0), Lt(1)]  # a share of the data for a split: (0, 1)
Dropout = Annotated[float, Ge(0), Lt(1)]  # a probability of dropping a unit: [0, 1)
Momentum = Annotated[float, Ge(0), Lt(1)]
Gamma = Annotated[float, Gt(0), Le(1)]  # a decay factor: (0, 1]
Seed = Annotated[int, Ge(0), Le(2**32 - 1)]  # what numpy's and torch's generators take
Sizes = Sequence[PositiveInt]  # layer widths, input to output
Optimizer = Literal["sgd", "adam", "adamw"]
Scheduler = Literal["none", "cosine", "step", "onecycle"]


# -- rules between settings ----------------------------------------------------------------------
def _split_sizes(n: int, val: float, test: float) -> tuple[int, int, int]:
    """Train, val and test sizes of `n` examples, as scikit-learn's `train_test_split` cuts them."""
    test_n = math.ceil(n * test)
    rest = n - test_n
    val_n = math.ceil(rest * val / (1 - test))
    return rest - val_n, val_n, test_n


def _enough_for_splits(what: str, n: int, classes: int, s: Mapping[str, Any]) -> None:
    # A stratified split needs each split to hold every class (and each class two examples).
    train, val, test = _split_sizes(n, s["val_fraction"], s["test_fraction"])
    if n < 2 * classes or min(train, val, test) < classes:
        raise ValueError(
            f"{what}: {n} examples split {train}/{val}/{test} (train/val/test); each split needs at least "
            f"{classes} (one per {'class' if classes != 5 else 'target quintile'}): raise it or the fractions"
        )


def split_fractions(s: Mapping[str, Any]) -> None:
    """val_fraction + test_fraction < 1: something must be left to train on."""
    if s["val_fraction"] + s["test_fraction"] >= 1:
        raise ValueError(
            f"val_fraction + test_fraction: must be below 1, got {s['val_fraction']} + {s['test_fraction']}"
        )


def digits_splits(s: Mapping[str, Any]) -> None:
    """The 1,797 digits (10 classes) leave every split at least one image of each digit."""
    _enough_for_splits("val_fraction/test_fraction", 1797, 10, s)


def regression_splits(s: Mapping[str, Any]) -> None:
    """`n_samples` is enough for three stratified splits (5 target quintiles)."""
    _enough_for_splits("n_samples", s["n_samples"], 5, s)


def docstrings_splits(s: Mapping[str, Any]) -> None:
    """`per_class` docstrings of each of the 6 packages are enough for three stratified splits."""
    _enough_for_splits("per_class", 6 * s["per_class"], 6, s)


def corpus_fits_blocks(s: Mapping[str, Any]) -> None:
    """The smallest split of the corpus holds at least three windows of `block_size + 1` bytes."""
    least = math.ceil(3 * (s["block_size"] + 1) / min(s["val_fraction"], s["test_fraction"]))
    if s["corpus_bytes"] < least:
        raise ValueError(
            f"corpus_bytes: must be at least {least} for block_size {s['block_size']}, got {s['corpus_bytes']}"
        )


def heads_divide_width(s: Mapping[str, Any]) -> None:
    """Attention splits `n_embd` evenly across `n_head` heads."""
    if s["n_embd"] % s["n_head"]:
        raise ValueError(f"n_embd: must be a multiple of n_head ({s['n_head']}), got {s['n_embd']}")


RULES: dict[str, Callable[[Mapping[str, Any]], None]] = {
    f.__name__: f
    for f in (
        split_fractions,
        digits_splits,
        regression_splits,
        docstrings_splits,
        corpus_fits_blocks,
        heads_divide_width,
    )
}


def apply_rules(names: Sequence[str], settings: Mapping[str, Any]) -> None:
    """Run the named rules on a class's full settings; the first broken one raises `ValueError`."""
    for name in names:
        RULES[name](settings)


# -- checking ----------------------------------------------------------------------------------------
# The largest whole number any setting takes: 2**53, the last a float (and JSON, and an MLflow
# param read back) holds exactly. No count, size or seed comes near it; a 400-digit `n_samples`
# passed `validate` and then crashed the split (`math.ceil(n * fraction)`: OverflowError).
LARGEST_INT = 2**53


def _not_bool(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError(f"expected a number, got the boolean {value}")
    return value


@functools.cache
def checked_type(tp: Any) -> Any:
    """`tp` as pydantic checks it: no booleans as numbers, finite floats, strict booleans.

    The same rewrite for a spec (lax otherwise, so YAML's `lr: 1e-3`, a string, still reads as
    a float) and for a constructor, so both accept exactly the same values.
    """
    from pydantic import AllowInfNan, BeforeValidator, StrictBool

    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is bool:
        return StrictBool
    if tp is int:  # and never past 2**53: float math on it (split sizes) overflowed, exit 1
        return Annotated[int, BeforeValidator(_not_bool), Le(LARGEST_INT)]
    if tp is float:
        return Annotated[float, BeforeValidator(_not_bool), AllowInfNan(False)]
    if origin is Annotated:
        return Annotated[(checked_type(args[0]), *tp.__metadata__)]
    if origin is Literal or not args:
        return tp
    if origin in (typing.Union, __import__("types").UnionType):
        return typing.Union[tuple(checked_type(a) for a in args)]  # noqa: UP007 - built from a tuple
    return origin[tuple(a if a is Ellipsis else checked_type(a) for a in args)]


@functools.cache
def _adapter(tp: Any) -> Any:
    from pydantic import TypeAdapter

    return TypeAdapter(checked_type(tp))


def check_value(name: str, tp: Any, value: Any) -> Any:
    """`value` checked against setting `name`'s declared type; `ValueError` in one line if not."""
    from pydantic import ValidationError

    try:
        return _adapter(tp).validate_python(value)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join([name, *(str(p) for p in first["loc"] if not isinstance(p, str) or p.isdigit())])
        message = first["msg"].removeprefix("Value error, ")
        if first["type"] != "value_error":
            shown = repr(first.get("input"))
            message += f" (got {shown if len(shown) <= 80 else shown[:77] + '...'})"
        raise ValueError(f"{where}: {message}") from None


def checked(init: Callable[..., None]) -> Callable[..., None]:
    """Check an `__init__`'s annotated arguments against their declarations, then its class's rules.

    The rules (`rules = ("split_fractions", ...)` on the class) run in the outermost `__init__`
    only, on its bound arguments with defaults filled in.
    """
    signature = inspect.signature(init)

    @functools.wraps(init)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> None:
        hints = typing.get_type_hints(init, include_extras=True)
        bound = signature.bind(self, *args, **kwargs)
        bound.apply_defaults()
        owner = type(self).__name__
        values = {k: v for k, v in bound.arguments.items() if k != "self"}
        try:
            for name, value in values.items():
                if name in hints and signature.parameters[name].kind not in (
                    inspect.Parameter.VAR_KEYWORD,
                    inspect.Parameter.VAR_POSITIONAL,
                ):
                    check_value(name, hints[name], value)
            if type(self).__init__ is wrapper:
                apply_rules(getattr(type(self), "rules", ()), values)
        except ValueError as exc:
            raise ValueError(f"{owner}: {exc}") from None
        init(self, *args, **kwargs)

    return wrapper
