"""ModelQualityBranchOperator: parse-time validation and the gate's rules (no server needed)."""

from __future__ import annotations

import pytest

from airflow_provider_mltrain.operators._quality_checks import (
    MissingMetricError,
    Rescore,
    higher_is_better_for,
    parse_metrics,
    parse_rescore,
    render_table,
    run_gate_checks,
)
from airflow_provider_mltrain.operators.model_quality import ModelQualityBranchOperator

BASE = {"task_id": "gate", "pass_task_ids": "ok", "fail_task_ids": "no", "metrics": {"val_accuracy": 0.9}}


def make(**overrides) -> ModelQualityBranchOperator:
    return ModelQualityBranchOperator(**{**BASE, "thresholds": {"val_accuracy": {"min": 0.8}}, **overrides})


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"thresholds": {"val_accuracy": {"minimum": 0.9}}},
            r"thresholds\['val_accuracy'\] has unknown keys \['minimum'\]",
        ),
        ({"thresholds": {"val_loss": {"min": 0.5, "max": 0.3}}}, r"min 0.5 is greater than max 0.3"),
        (
            {"thresholds": {"val_accuracy": {"min": "high"}}},
            r"thresholds\['val_accuracy'\]\['min'\] must be a finite number, got 'high'",
        ),
        ({"thresholds": {"val_accuracy": {"min": True}}}, r"must be a finite number, got True"),
        ({"thresholds": {"val_accuracy": {"min": float("nan")}}}, r"must be a finite number, got nan"),
        ({"thresholds": {"val_accuracy": {}}}, r"must be a non-empty dict with keys \['min', 'max'\]"),
        ({"thresholds": [0.9]}, r"thresholds must be a dict"),
        ({"pass_task_ids": []}, r"pass_task_ids must be a task id or a non-empty list"),
        ({"fail_task_ids": ""}, r"fail_task_ids must contain non-empty task id strings"),
        ({"fail_task_ids": ["ok"]}, r"task ids \['ok'\] are in both pass_task_ids and fail_task_ids"),
        ({"metrics": None}, r"set metrics .*, run_id .*, or both"),
        ({"champion_metrics": {"val_accuracy": 0.9}}, r"champion_metrics .* needs champion_model"),
        (
            {"champion_model": "m", "champion_metrics": {"val_accuracy": "high"}},
            r"champion_metrics must map metric names to finite numbers",
        ),
        (
            {"champion_model": "m", "champion_metrics": "scored well"},
            r"champion_metrics must be a dict \(or its JSON form\), got the string 'scored well'",
        ),
        ({"metrics": {"val_accuracy": "x"}}, r"metrics must map metric names to finite numbers"),
        ({"metrics": "not a dict"}, r"metrics must be a dict of metric -> number \(or its JSON form\)"),
        (
            {"min_improvement": {"val_accuracy": 0.01}},
            r"min_improvement .* compares with a champion: set champion_model",
        ),
        (
            {"champion_model": "m", "min_improvement": {"val_accuracy": "a lot"}},
            r"min_improvement\['val_accuracy'\] must be a finite number",
        ),
        ({"higher_is_better": {"val_loss": "no"}}, r"higher_is_better\['val_loss'\] must be True or False"),
        ({"on_no_champion": "skip"}, r"on_no_champion must be one of \['pass', 'fail'\], got 'skip'"),
        ({"on_missing_metric": "ignore"}, r"on_missing_metric must be one of \['raise', 'fail_branch'\]"),
        ({"champion_model": "a/b"}, r"champion_model 'a/b' is not a valid registered model name"),
        ({"champion_model": "m", "champion_alias": "v3"}, r"champion_alias: alias 'v3' is reserved"),
        ({"thresholds": None}, r"nothing to check"),
        ({"relative_improvement": "yes"}, r"relative_improvement must be True or False"),
    ],
)
def test_bad_inputs_are_rejected_at_construction(overrides, message):
    with pytest.raises(ValueError, match=message):
        make(**overrides)


def test_templates_are_accepted_at_parse_time_and_checked_after_rendering():
    op = make(
        metrics="{{ ti.xcom_pull(task_ids='train')['metrics'] }}",
        thresholds={"val_accuracy": {"min": "{{ params.min_acc }}", "max": 1.0}},
        champion_model="{{ params.model_name }}",
        min_improvement={"val_accuracy": "{{ params.min_improvement }}"},
    )
    assert op.thresholds == {"val_accuracy": {"min": "{{ params.min_acc }}", "max": 1.0}}
    assert set(op.template_fields) >= {"metrics", "thresholds", "champion_model", "min_improvement"}

    # What rendering gives without native rendering: strings; numbers are converted, anything else named.
    op.metrics = "{'val_accuracy': 0.93}"
    op.thresholds = {"val_accuracy": {"min": "0.9", "max": 1.0}}
    op.champion_model = None
    op.min_improvement = {}
    assert op.quality_report()["branch"] == ["ok"]
    op.thresholds = {"val_accuracy": {"min": "None", "max": 1.0}}
    with pytest.raises(
        ValueError, match=r"thresholds\['val_accuracy'\]\['min'\] must be a finite number, got 'None'"
    ):
        op.quality_report()


@pytest.mark.parametrize(
    "text",
    [
        '{"val_accuracy": 0.93, "val_loss": 0.2}',
        "{'val_accuracy': 0.93, 'val_loss': 0.2}",
        " {'val_accuracy': 0.93, 'val_loss': 0.2}\n",
    ],
)
def test_metrics_arrive_as_json_or_python_literal_strings(text):
    assert parse_metrics(text) == {"val_accuracy": 0.93, "val_loss": 0.2}


def test_metric_strings_are_never_evaluated_as_code():
    with pytest.raises(ValueError, match="metrics must be a dict"):
        parse_metrics("__import__('os').system('true')")


@pytest.mark.parametrize(
    ("metric", "overrides", "expected"),
    [
        ("val_accuracy", {}, True),
        ("val_loss", {}, False),
        ("mean_squared_error", {}, False),
        ("val_f1", {}, True),
        ("val_loss", {"val_loss": True}, True),
        ("perplexity", {"perplexity": False}, False),
    ],
)
def test_direction_defaults_and_overrides(metric, overrides, expected):
    assert higher_is_better_for(metric, overrides) is expected


CHAMPION = {"version": "3", "run_id": "r3", "metrics": {"val_accuracy": 0.92, "val_loss": 0.25}}


def gate(candidate, **kwargs):
    defaults = {
        "thresholds": {},
        "champion": CHAMPION,
        "compare_with_champion": True,
        "min_improvement": {"val_accuracy": 0.005},
    }
    return run_gate_checks(candidate, **{**defaults, **kwargs})


@pytest.mark.parametrize(("value", "passed"), [(0.93, True), (0.925, True), (0.921, False), (0.92, False)])
def test_absolute_improvement_boundary(value, passed):
    (check,) = gate({"val_accuracy": value})
    assert check.passed is passed
    assert check.champion_value == 0.92 and check.required == 0.005


def test_without_min_improvement_the_threshold_metrics_must_not_get_worse():
    checks = gate(
        {"val_accuracy": 0.95, "val_loss": 0.26},
        thresholds={"val_accuracy": {"min": 0.9}, "val_loss": {"max": 0.3}},
        min_improvement={},
    )
    verdicts = {(c.metric, c.check): c.passed for c in checks}
    assert verdicts == {
        ("val_accuracy", "min"): True,
        ("val_loss", "max"): True,
        ("val_accuracy", "vs_champion"): True,
        ("val_loss", "vs_champion"): False,  # 0.26 is worse than the champion's 0.25
    }


def test_relative_improvement_against_a_zero_champion_value():
    champion = {"version": "1", "run_id": "r", "metrics": {"errors": 0.0}}
    (worse,) = gate(
        {"errors": 1.0}, champion=champion, min_improvement={"errors": 0.0}, relative_improvement=True
    )
    (same,) = gate(
        {"errors": 0.0}, champion=champion, min_improvement={"errors": 0.0}, relative_improvement=True
    )
    assert worse.passed is False and same.passed is True


def test_negative_min_improvement_tolerates_a_small_regression():
    (check,) = gate({"val_accuracy": 0.918}, min_improvement={"val_accuracy": -0.005})
    assert check.passed is True


def test_missing_metric_message_names_what_exists():
    with pytest.raises(
        MissingMetricError, match=r"'val_accuracy' is missing .* available metrics: \['loss'\]"
    ):
        gate({"loss": 0.1})


def test_report_table_lists_every_check_with_its_verdict():
    checks = gate({"val_accuracy": 0.921, "val_loss": 0.2}, thresholds={"val_loss": {"max": 0.3}})
    table = render_table(checks)
    lines = table.splitlines()
    assert lines[0].split() == ["metric", "check", "candidate", "threshold/champion", "required", "verdict"]
    assert lines[2].split() == ["val_loss", "max", "0.2", "0.3", "-", "PASS"]
    assert lines[3].split() == ["val_accuracy", "vs_champion", "0.921", "0.92", "0.005", "FAIL"]
    assert "champion version 3 (run r3)" in table


def test_report_is_strict_json_even_with_an_infinite_relative_improvement():
    import json

    champion = {"version": "1", "run_id": "r", "metrics": {"val_f1": 0.0}}
    (check,) = gate(
        {"val_f1": 0.5}, champion=champion, min_improvement={"val_f1": 0.1}, relative_improvement=True
    )
    assert check.passed is True
    assert json.loads(json.dumps(check.as_dict(), allow_nan=False))["improvement"] == "inf"


def test_like_for_like_compares_with_the_rescored_champion_and_reports_both_numbers():
    # Recorded 0.92 on its own day; 0.96 on the candidate's holdout, where the candidate has 0.95.
    (check,) = gate({"val_accuracy": 0.95}, rescored={"val_accuracy": 0.96})

    assert check.passed is False
    assert check.champion_value == 0.96 and check.champion_recorded_value == 0.92
    assert check.improvement == pytest.approx(-0.01)
    assert "re-scored on the candidate's holdout: 0.96; its own run recorded 0.92" in check.detail
    # Against the recorded number the same candidate would have passed: the mode changes the verdict.
    (recorded,) = gate({"val_accuracy": 0.95})
    assert recorded.passed is True and recorded.champion_recorded_value is None


EVALUATE_RESULT = {
    "schema_version": 1,
    "run_id": "r3",
    "model_uri": "models:/digits@champion",
    "metrics": {"val_accuracy": 0.96, "val_loss": 0.2, "val_f1": 0.95},
    "params": {"data": "s3://b/2026-11-20/prepared", "rows": 360, "model_found": True},
    "resumed_from_epoch": None,
}


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, None),
        ("", None),
        ("None", None),
        (
            EVALUATE_RESULT,
            Rescore(
                metrics={"val_accuracy": 0.96, "val_loss": 0.2, "val_f1": 0.95},
                run_id="r3",
                model_uri="models:/digits@champion",
                data="s3://b/2026-11-20/prepared",
                rows=360,
            ),
        ),
        (
            {**EVALUATE_RESULT, "run_id": None, "metrics": {}, "params": {"model_found": False}},
            Rescore(metrics={}, model_uri="models:/digits@champion"),
        ),
        ({"val_accuracy": 0.9}, Rescore(metrics={"val_accuracy": 0.9})),
        ('{"val_accuracy": 0.9}', Rescore(metrics={"val_accuracy": 0.9})),
    ],
)
def test_champion_metrics_accepts_an_evaluate_result_or_a_metrics_dict(value, expected):
    assert parse_rescore(value) == expected
