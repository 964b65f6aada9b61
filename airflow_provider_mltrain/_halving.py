"""Successive halving's arithmetic: the rounds' sizes and epoch budgets, and the ranking of a round.

Pure functions of their inputs (standard library only) so the plan is fixed at DAG parse time and the
ranking tasks stay cheap; :mod:`airflow_provider_mltrain.sweeps` builds the tasks around them.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

log = logging.getLogger(__name__)

#: What ``mode`` may be: the direction in which ``metric`` is better.
MODES = ("max", "min")


def bad_argument(name: str, value: Any, allowed: str) -> ValueError:
    """The error every sweep check raises: the argument, the value and what is allowed."""
    return ValueError(f"successive_halving: invalid {name}={value!r}; {allowed}")


@dataclasses.dataclass(frozen=True)
class Round:
    """One round of a successive-halving sweep.

    :param number: 1 for the first round.
    :param trials: trials planned in this round (fewer run when trials of an earlier round failed).
    :param epochs: the epoch budget: each trial's total epochs at the end of this round.
    :param new_epochs: epochs each trial trains in this round (it resumes the previous round's checkpoint).
    """

    number: int
    trials: int
    epochs: int
    new_epochs: int


def _positive_int(name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise bad_argument(name, value, f"expected an int >= {minimum}")
    return value


def plan_rounds(n_configs: int, eta: int, min_epochs: int, max_epochs: int) -> tuple[Round, ...]:
    """The rounds: budgets ``min_epochs * eta**k`` while they stay under ``max_epochs``, then ``max_epochs``.

    Round 1 trains every configuration for ``min_epochs``; each later round keeps the best
    ``1/eta`` (at least one) and trains them on to ``eta`` times the budget; the last round always
    ends at ``max_epochs``, so the winner is trained as long as a grid sweep would train it.

    :raises ValueError: naming the argument, for ``n_configs < 1``, ``eta < 2``, ``min_epochs < 1`` or
        ``min_epochs > max_epochs``.
    """
    _positive_int("n_configs", n_configs)
    _positive_int("eta", eta, minimum=2)
    _positive_int("min_epochs", min_epochs)
    _positive_int("max_epochs", max_epochs)
    if min_epochs > max_epochs:
        raise bad_argument("min_epochs", min_epochs, f"expected at most max_epochs={max_epochs}")
    budgets = [min_epochs]
    while budgets[-1] * eta < max_epochs:
        budgets.append(budgets[-1] * eta)
    if budgets[-1] < max_epochs:
        budgets.append(max_epochs)
    rounds = []
    trials = n_configs
    previous = 0
    for number, epochs in enumerate(budgets, start=1):
        rounds.append(Round(number=number, trials=trials, epochs=epochs, new_epochs=epochs - previous))
        trials = max(1, trials // eta)
        previous = epochs
    return tuple(rounds)


def planned_epochs(rounds: Sequence[Round]) -> int:
    """Trainer epochs the whole sweep runs when no trial fails (survivors resume, so each epoch once)."""
    return sum(r.trials * r.new_epochs for r in rounds)


def check_mode(mode: Any) -> str:
    if mode not in MODES:
        raise bad_argument("mode", mode, f"expected one of {list(MODES)}")
    return str(mode)


def check_metric(metric: Any) -> str:
    if not isinstance(metric, str) or not metric.strip():
        raise bad_argument("metric", metric, "expected the name of a metric in the trainer's result")
    return metric


def metric_value(result: Any, metric: str) -> float | None:
    """``result["metrics"][metric]`` as a finite float, or None when the trial did not report it."""
    metrics = result.get("metrics") if isinstance(result, Mapping) else None
    value = metrics.get(metric) if isinstance(metrics, Mapping) else None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def rank_round(
    round_number: int,
    trial_keys: Sequence[str],
    results: Sequence[Any],
    *,
    metric: str,
    mode: str,
    min_successful: int,
) -> list[tuple[str, dict[str, Any]]]:
    """The round's successful trials, best first; failed ones are dropped with a log line.

    :param trial_keys: the round's trials, in map index order.
    :param results: each trial's result, None where the trial failed (after its retries).
    :raises RuntimeError: when fewer than ``min_successful`` trials (capped at the round's size) succeeded.
    """
    scored: list[tuple[float, int, str, dict[str, Any]]] = []
    for index, (key, result) in enumerate(zip(trial_keys, results, strict=True)):
        value = metric_value(result, metric) if result is not None else None
        if result is None:
            log.warning(
                "round %d: trial %s failed (map index %d): dropped from the ranking", round_number, key, index
            )
        elif value is None:
            log.warning(
                "round %d: trial %s reported no finite %r (metrics %s): dropped from the ranking",
                round_number,
                key,
                metric,
                sorted((result.get("metrics") or {}) if isinstance(result, Mapping) else []),
            )
        else:
            # The map index breaks ties: the same inputs always give the same survivors.
            scored.append((-value if mode == "max" else value, index, key, dict(result)))
    needed = min(min_successful, len(trial_keys))
    if len(scored) < needed:
        raise RuntimeError(
            f"round {round_number}: {len(scored)} of {len(trial_keys)} trials succeeded with a {metric!r} "
            f"metric, fewer than min_successful={needed}; the sweep stops here (see the failed trials' logs)"
        )
    scored.sort(key=lambda item: (item[0], item[1]))
    return [(key, result) for _, _, key, result in scored]
