"""A sweep's search space: its validation (at DAG parse time) and the sampling of configurations.

Forms of a value (one per hyperparameter):

- a list: the choices (``[64, 128, 256]``);
- ``{"uniform": [low, high]}``: a float drawn uniformly;
- ``{"loguniform": [low, high]}``: a float whose logarithm is uniform (learning rates), ``0 < low``;
- ``{"int": [low, high]}``: an int drawn uniformly, both ends included.

When every value is a list and ``n_configs`` equals the number of combinations, the configurations are
exactly the grid; otherwise they are drawn with ``random.Random(seed)`` (lists only: distinct
combinations), so the same seed gives the same sweep.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Mapping
from typing import Any

from airflow_provider_mltrain._halving import bad_argument

#: The distribution forms a search-space value may take besides a list of choices.
DISTRIBUTIONS = ("uniform", "loguniform", "int")

_FORMS = f"a non-empty list of choices or one of {[{d: ['low', 'high']} for d in DISTRIBUTIONS]}"


def _is_number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


def check_search_space(space: Any, *, reserved: tuple[str, ...] = ()) -> dict[str, Any]:
    """Validate a search space; return it as a plain dict.

    :param reserved: hyperparameter names the sweep sets itself (e.g. ``epochs``).
    :raises ValueError: naming ``search_space[<key>]``, the value and the allowed forms.
    """
    if not isinstance(space, Mapping) or not space:
        raise bad_argument("search_space", space, f"expected a non-empty dict of name -> {_FORMS}")
    for key, value in space.items():
        name = f"search_space[{key!r}]"
        if not isinstance(key, str) or not key:
            raise bad_argument(
                "search_space", space, "expected hyperparameter names (non-empty strings) as keys"
            )
        if key in reserved:
            raise bad_argument(name, value, f"{key!r} is set by the sweep (its epoch budget per round)")
        if isinstance(value, list):
            if not value:
                raise bad_argument(name, value, f"expected {_FORMS}")
            continue
        if not isinstance(value, Mapping) or len(value) != 1 or next(iter(value)) not in DISTRIBUTIONS:
            raise bad_argument(name, value, f"unknown search-space form; expected {_FORMS}")
        form, bounds = next(iter(value.items()))
        if not isinstance(bounds, (list, tuple)) or len(bounds) != 2 or not all(map(_is_number, bounds)):
            raise bad_argument(name, value, f"expected {{{form!r}: [low, high]}} with two numbers")
        low, high = bounds
        if form == "int" and not (isinstance(low, int) and isinstance(high, int) and low <= high):
            raise bad_argument(name, value, "expected {'int': [low, high]} with ints, low <= high")
        if form != "int" and not low < high:
            raise bad_argument(name, value, f"expected {{{form!r}: [low, high]}} with low < high")
        if form == "loguniform" and low <= 0:
            raise bad_argument(name, value, "expected {'loguniform': [low, high]} with 0 < low < high")
    return dict(space)


def grid_size(space: Mapping[str, Any]) -> int | None:
    """The number of combinations when every value is a list, else None."""
    if not all(isinstance(v, list) for v in space.values()):
        return None
    return math.prod(len(v) for v in space.values())


def check_n_configs(space: Mapping[str, Any], n_configs: Any) -> None:
    """``n_configs`` is at least 1 and, for a lists-only space, at most its number of combinations."""
    if isinstance(n_configs, bool) or not isinstance(n_configs, int) or n_configs < 1:
        raise bad_argument("n_configs", n_configs, "expected an int >= 1")
    size = grid_size(space)
    if size is not None and n_configs > size:
        raise bad_argument(
            "n_configs",
            n_configs,
            f"expected at most {size}: the search space (lists only) has {size} distinct combinations",
        )


def _draw(rng: random.Random, value: Any) -> Any:
    if isinstance(value, list):
        return rng.choice(value)
    form, (low, high) = next(iter(value.items()))
    if form == "int":
        return rng.randint(low, high)
    drawn = (
        math.exp(rng.uniform(math.log(low), math.log(high)))
        if form == "loguniform"
        else rng.uniform(low, high)
    )
    # Six significant digits: readable in run names and the MLflow UI, and far below any tuning effect.
    return float(f"{drawn:.6g}")


def sample_configs(space: Mapping[str, Any], n_configs: int, seed: int | None) -> list[dict[str, Any]]:
    """``n_configs`` configurations: the grid, a seeded sample of it, or seeded random draws."""
    names = list(space)
    size = grid_size(space)
    rng = random.Random(seed)
    if size is not None:
        grid = [
            dict(zip(names, combo, strict=True)) for combo in itertools.product(*(space[n] for n in names))
        ]
        return grid if n_configs == size else rng.sample(grid, n_configs)
    return [{name: _draw(rng, space[name]) for name in names} for _ in range(n_configs)]
