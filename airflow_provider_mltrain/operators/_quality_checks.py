"""The quality gate's rules: validating gates, comparing a candidate with thresholds and a champion, and
explaining the verdict. Standard library only, so DAG parsing stays cheap and the rules test without servers.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import math
from collections.abc import Mapping
from typing import Any

from airflow.exceptions import AirflowException

from airflow_provider_mltrain._templating import is_jinja_template

GATE_KEYS = ("min", "max")
ON_NO_CHAMPION = ("pass", "fail")
ON_MISSING_METRIC = ("raise", "fail_branch")
#: A metric whose name contains one of these is lower-is-better unless ``higher_is_better`` says otherwise.
LOWER_IS_BETTER_HINTS = ("loss", "error")
#: Float slack when comparing with a required improvement: 0.93 - 0.925 is 0.004999999999999893 in binary.
TOLERANCE = 1e-9


class MissingMetricError(AirflowException):
    """A metric the gate needs is absent from the candidate's or the champion's metrics."""


def is_number(value: Any) -> bool:
    """True for a finite int or float (bool excluded: ``True`` is not a metric value).

    :param value: anything.
    """
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_metric_name(name: Any, param: str) -> str:
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"{param}: metric names must be non-empty strings, got {name!r}")
    return name


def _number(value: Any, where: str, *, allow_templates: bool) -> float | str:
    """A finite float; a numeric string (what a rendered template gives) is converted.

    With ``allow_templates`` a Jinja string is returned as is, to be checked after rendering.
    """
    if allow_templates and is_jinja_template(value):
        return str(value)
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise ValueError(f"{where} must be a finite number, got {value!r}") from None
    if not is_number(value):
        raise ValueError(f"{where} must be a finite number, got {value!r}")
    return float(value)


def validate_metric_thresholds(
    thresholds: Any, *, allow_templates: bool = False
) -> dict[str, dict[str, Any]]:
    """Check ``{"val_accuracy": {"min": 0.9}, "val_loss": {"max": 0.3}}`` and return it normalized.

    :param thresholds: metric -> ``{"min": x, "max": y}`` (either or both).
    :param allow_templates: keep Jinja strings as bounds (DAG parse time); they are checked after rendering.
    :raises ValueError: naming the metric, the value and what is allowed.
    """
    if thresholds is None:
        return {}
    if not isinstance(thresholds, Mapping):
        raise ValueError(
            f"thresholds must be a dict of metric -> {{'min': x, 'max': y}}, got {type(thresholds).__name__}"
        )
    result: dict[str, dict[str, Any]] = {}
    for metric, gate in thresholds.items():
        _check_metric_name(metric, "thresholds")
        if not isinstance(gate, Mapping) or not gate:
            raise ValueError(
                f"thresholds[{metric!r}] must be a non-empty dict with keys {list(GATE_KEYS)}, got {gate!r}"
            )
        unknown = sorted(str(key) for key in gate if key not in GATE_KEYS)
        if unknown:
            raise ValueError(f"thresholds[{metric!r}] has unknown keys {unknown}; allowed: {list(GATE_KEYS)}")
        bounds = {
            key: _number(bound, f"thresholds[{metric!r}][{key!r}]", allow_templates=allow_templates)
            for key, bound in gate.items()
        }
        low, high = bounds.get("min"), bounds.get("max")
        if isinstance(low, float) and isinstance(high, float) and low > high:
            raise ValueError(
                f"thresholds[{metric!r}]: min {low!r} is greater than max {high!r}; no value could pass"
            )
        result[metric] = bounds
    return result


def validate_min_improvement(min_improvement: Any, *, allow_templates: bool = False) -> dict[str, Any]:
    """Check ``{"val_accuracy": 0.005}``: metric -> required improvement over the champion.

    A negative value tolerates a regression of at most that much.

    :param min_improvement: metric -> number.
    :param allow_templates: keep Jinja strings (DAG parse time); they are checked after rendering.
    :raises ValueError: naming the metric and the value.
    """
    if min_improvement is None:
        return {}
    if not isinstance(min_improvement, Mapping):
        raise ValueError(
            f"min_improvement must be a dict of metric -> number, got {type(min_improvement).__name__}"
        )
    result: dict[str, Any] = {}
    for metric, value in min_improvement.items():
        _check_metric_name(metric, "min_improvement")
        result[metric] = _number(value, f"min_improvement[{metric!r}]", allow_templates=allow_templates)
    return result


def validate_higher_is_better(higher_is_better: Any) -> dict[str, bool]:
    """Check ``{"val_loss": False}``: metric -> whether a higher value is better.

    :param higher_is_better: metric -> bool.
    :raises ValueError: naming the metric and the value.
    """
    if higher_is_better is None:
        return {}
    if not isinstance(higher_is_better, Mapping):
        raise ValueError(
            f"higher_is_better must be a dict of metric -> True/False, got {type(higher_is_better).__name__}"
        )
    for metric, value in higher_is_better.items():
        _check_metric_name(metric, "higher_is_better")
        if not isinstance(value, bool):
            raise ValueError(f"higher_is_better[{metric!r}] must be True or False, got {value!r}")
    return dict(higher_is_better)


def validate_choice(param: str, value: Any, allowed: tuple[str, ...]) -> str:
    """Check an enumerated option.

    :param param: the parameter name.
    :param value: its value.
    :param allowed: the allowed values.
    """
    if value not in allowed:
        raise ValueError(f"{param} must be one of {list(allowed)}, got {value!r}")
    return str(value)


def validate_task_ids(value: Any, param: str) -> list[str]:
    """One task id or several, as a non-empty list of non-empty strings.

    :param value: a task id or a list of them.
    :param param: the parameter name.
    """
    ids = [value] if isinstance(value, str) else value
    if not isinstance(ids, (list, tuple)) or not ids:
        raise ValueError(f"{param} must be a task id or a non-empty list of task ids, got {value!r}")
    for task_id in ids:
        if not isinstance(task_id, str) or not task_id.strip():
            raise ValueError(f"{param} must contain non-empty task id strings, got {task_id!r}")
    return list(dict.fromkeys(ids))


def parse_metrics(value: Any, param: str = "metrics") -> dict[str, float]:
    """The candidate's metrics as a dict of finite floats.

    A templated dict arrives as a dict (``render_template_as_native_obj``) or as its string form: JSON or a
    Python literal, parsed with ``json`` / ``ast.literal_eval`` (never ``eval``).

    :param value: a dict, or its JSON / Python-literal string.
    :param param: the parameter name for the error message.
    :raises ValueError: naming the parameter and what was wrong.
    """
    if isinstance(value, str):
        text = value.strip()
        try:
            value = json.loads(text)
        except ValueError:
            try:
                value = ast.literal_eval(text)
            except (ValueError, SyntaxError) as err:
                raise ValueError(
                    f"{param} must be a dict of metric -> number (or its JSON form), got the string {text[:200]!r}"
                ) from err
    if not isinstance(value, Mapping):
        raise ValueError(
            f"{param} must be a dict of metric -> number, got {type(value).__name__}: {value!r:.200}"
        )
    bad = {
        name: metric for name, metric in value.items() if not isinstance(name, str) or not is_number(metric)
    }
    if bad:
        raise ValueError(f"{param} must map metric names to finite numbers; invalid entries: {bad!r:.300}")
    return {name: float(metric) for name, metric in value.items()}


def _decode(value: Any, param: str) -> Any:
    """A templated value's string form (JSON or a Python literal) decoded; anything else as is."""
    if not isinstance(value, str):
        return value
    text = value.strip()
    try:
        return json.loads(text)
    except ValueError:
        try:
            return ast.literal_eval(text)
        except (ValueError, SyntaxError) as err:
            raise ValueError(
                f"{param} must be a dict (or its JSON form), got the string {text[:200]!r}"
            ) from err


@dataclasses.dataclass
class Rescore:
    """The champion's metrics measured again on the candidate's holdout (like-for-like comparison).

    :param metrics: metric -> value; empty when the scorer found no model to score (no champion yet).
    :param run_id: the MLflow run behind the scored model, when the scorer reports it.
    :param model_uri: the model URI that was scored.
    :param data: what it was scored on.
    :param rows: how many rows it was scored on.
    """

    metrics: dict[str, float]
    run_id: str | None = None
    model_uri: str | None = None
    data: str | None = None
    rows: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def parse_rescore(value: Any, param: str = "champion_metrics") -> Rescore | None:
    """The champion's re-scored metrics: a metrics dict, or the whole result ``gpu_trainer.evaluate`` wrote.

    :param value: ``None`` / ``""`` (nothing was scored), a dict of metric -> number, a trainer-contract
        result (keys ``schema_version``, ``run_id``, ``model_uri``, ``metrics``, ``params``), or the JSON /
        Python-literal string of either.
    :param param: the parameter name for error messages.
    :raises ValueError: naming the parameter and what was wrong.
    """
    if value is None or (isinstance(value, str) and value.strip() in ("", "None", "null")):
        return None
    value = _decode(value, param)
    if isinstance(value, Mapping) and "schema_version" in value and "metrics" in value:
        raw_params = value.get("params")
        params: Mapping[str, Any] = raw_params if isinstance(raw_params, Mapping) else {}
        rows = params.get("rows")
        return Rescore(
            metrics=parse_metrics(value["metrics"], f"{param}['metrics']"),
            run_id=str(value["run_id"]) if value.get("run_id") else None,
            model_uri=str(value["model_uri"]) if value.get("model_uri") else None,
            data=str(params["data"]) if params.get("data") else None,
            rows=int(rows) if isinstance(rows, int) and not isinstance(rows, bool) else None,
        )
    return Rescore(metrics=parse_metrics(value, param))


def higher_is_better_for(metric: str, overrides: Mapping[str, bool]) -> bool:
    """The direction of ``metric``: the override, else lower-is-better for names with 'loss' or 'error'.

    :param metric: the metric name.
    :param overrides: ``higher_is_better`` as given to the operator.
    """
    if metric in overrides:
        return overrides[metric]
    lowered = metric.lower()
    return not any(hint in lowered for hint in LOWER_IS_BETTER_HINTS)


@dataclasses.dataclass
class Check:
    """One line of the quality report.

    :param metric: the metric (or ``"-"`` for the champion's existence).
    :param check: ``min``, ``max``, ``vs_champion``, ``champion`` or ``missing``.
    :param value: the candidate's value.
    :param threshold: the bound of a ``min`` / ``max`` check.
    :param champion_value: the champion's value of a ``vs_champion`` check.
    :param required: the improvement required over the champion.
    :param improvement: the improvement achieved (absolute, or a fraction when relative).
    :param champion_recorded_value: like-for-like mode: the value the champion's own run recorded (on
        its own data), shown beside ``champion_value``, its score on the candidate's holdout.
    :param passed: the verdict.
    :param detail: a sentence explaining the verdict.
    """

    metric: str
    check: str
    value: float | None
    passed: bool
    detail: str
    threshold: float | None = None
    champion_value: float | None = None
    required: float | None = None
    improvement: float | None = None
    champion_recorded_value: float | None = None

    @property
    def verdict(self) -> str:
        return "PASS" if self.passed else "FAIL"

    def as_dict(self) -> dict[str, Any]:
        """JSON-safe: a relative improvement over a champion value of 0 is infinite, which strict JSON
        (and Postgres' JSON columns behind XCom) rejects, so non-finite numbers become strings."""
        plain = {
            key: (str(value) if isinstance(value, float) and not math.isfinite(value) else value)
            for key, value in dataclasses.asdict(self).items()
        }
        return {**plain, "verdict": self.verdict}


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.6g}"


def _missing(metric: str, whose: str, available: Mapping[str, float], on_missing_metric: str) -> Check:
    if on_missing_metric == "raise":
        raise MissingMetricError(
            f"metric {metric!r} is missing from {whose}; available metrics: {sorted(available)}. Log it in "
            "training, remove it from thresholds/min_improvement, or set on_missing_metric='fail_branch'"
        )
    return Check(
        metric, "missing", None, False, f"{metric!r} is missing from {whose}; has {sorted(available)}"
    )


def run_gate_checks(
    candidate: Mapping[str, float],
    *,
    thresholds: Mapping[str, Mapping[str, float]],
    champion: Mapping[str, Any] | None,
    compare_with_champion: bool,
    min_improvement: Mapping[str, float],
    relative_improvement: bool = False,
    higher_is_better: Mapping[str, bool] | None = None,
    on_no_champion: str = "pass",
    on_missing_metric: str = "raise",
    rescored: Mapping[str, float] | None = None,
) -> list[Check]:
    """Every check the gate makes, in order: absolute thresholds first, then the champion comparison.

    :param candidate: the candidate's metrics.
    :param thresholds: validated absolute gates.
    :param champion: ``{version, run_id, metrics, ...}`` of the alias holder, or None when there is none.
    :param compare_with_champion: whether a champion was asked for (``champion_model`` set).
    :param min_improvement: metric -> required improvement; when empty, the threshold metrics must not be
        worse than the champion's.
    :param relative_improvement: improvements are fractions of the champion's value.
    :param higher_is_better: direction overrides.
    :param on_no_champion: ``pass`` or ``fail`` when no version holds the alias.
    :param on_missing_metric: ``raise`` (a clear error) or ``fail_branch`` (a failed check).
    :param rescored: like-for-like mode: the champion's metrics on the candidate's holdout, compared
        instead of the ones its own run recorded (which are reported beside them).
    :raises MissingMetricError: a needed metric is absent and ``on_missing_metric`` is ``raise``.
    """
    directions = dict(higher_is_better or {})
    checks: list[Check] = []
    for metric, gate in thresholds.items():
        if metric not in candidate:
            checks.append(_missing(metric, "the candidate's metrics", candidate, on_missing_metric))
            continue
        value = candidate[metric]
        if "min" in gate:
            ok = value >= gate["min"]
            checks.append(
                Check(
                    metric,
                    "min",
                    value,
                    ok,
                    f"{_fmt(value)} {'>=' if ok else '<'} min {_fmt(gate['min'])}",
                    gate["min"],
                )
            )
        if "max" in gate:
            ok = value <= gate["max"]
            checks.append(
                Check(
                    metric,
                    "max",
                    value,
                    ok,
                    f"{_fmt(value)} {'<=' if ok else '>'} max {_fmt(gate['max'])}",
                    gate["max"],
                )
            )
    if not compare_with_champion:
        return checks
    if champion is None:
        ok = on_no_champion == "pass"
        checks.append(
            Check(
                "-", "champion", None, ok, f"no champion to compare with; on_no_champion={on_no_champion!r}"
            )
        )
        return checks
    required_by_metric = dict(min_improvement) or {metric: 0.0 for metric in thresholds}
    recorded: Mapping[str, float] = champion.get("metrics") or {}
    champion_metrics: Mapping[str, float] = recorded if rescored is None else rescored
    label = f"champion version {champion.get('version')} (run {champion.get('run_id')})"
    if rescored is not None:
        label += " re-scored on the candidate's holdout"
    for metric, required in required_by_metric.items():
        if metric not in candidate:
            checks.append(_missing(metric, "the candidate's metrics", candidate, on_missing_metric))
            continue
        if metric not in champion_metrics:
            checks.append(_missing(metric, f"the metrics of {label}", champion_metrics, on_missing_metric))
            continue
        value, best = candidate[metric], float(champion_metrics[metric])
        higher = higher_is_better_for(metric, directions)
        delta = value - best if higher else best - value
        if relative_improvement:
            improvement = (
                delta / abs(best) if best else (math.inf if delta > 0 else 0.0 if delta == 0 else -math.inf)
            )
        else:
            improvement = delta
        ok = improvement >= required - TOLERANCE
        unit = " (relative)" if relative_improvement else ""
        direction = "higher" if higher else "lower"
        recorded_value = float(recorded[metric]) if rescored is not None and metric in recorded else None
        recorded_note = "" if recorded_value is None else f"; its own run recorded {_fmt(recorded_value)}"
        checks.append(
            Check(
                metric,
                "vs_champion",
                value,
                ok,
                f"improvement {_fmt(improvement)}{unit} over {label}: {_fmt(best)}{recorded_note} "
                f"({direction} is better) {'>=' if ok else '<'} required {_fmt(required)}",
                champion_value=best,
                required=required,
                improvement=improvement,
                champion_recorded_value=recorded_value,
            )
        )
    return checks


def render_table(checks: list[Check]) -> str:
    """A fixed-width table of the checks for the task log.

    :param checks: from :func:`run_gate_checks`.
    """
    header = ("metric", "check", "candidate", "threshold/champion", "required", "verdict")
    rows = [header]
    for c in checks:
        bound = c.threshold if c.check in GATE_KEYS else c.champion_value
        required = _fmt(c.required) if c.check == "vs_champion" else "-"
        rows.append((c.metric, c.check, _fmt(c.value), _fmt(bound), required, c.verdict))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    lines.extend(f"  {c.metric}/{c.check}: {c.detail}" for c in checks)
    return "\n".join(lines)
