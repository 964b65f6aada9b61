"""ModelQualityBranchOperator against a champion registered on a real ``mlflow server``."""

from __future__ import annotations

import pytest

from airflow_provider_mltrain.hooks.mlflow import MLflowHook, connection_json
from airflow_provider_mltrain.operators._quality_checks import MissingMetricError
from airflow_provider_mltrain.operators.model_quality import ModelQualityBranchOperator
from tests.fixtures.mlflow_models import log_tiny_model, unique_name

CHAMPION_METRICS = {"val_accuracy": 0.92, "val_loss": 0.25}


@pytest.fixture(scope="module")
def champion_model(mlflow_server) -> str:
    """A registered model whose 'champion' alias holds a version from a run with val_accuracy 0.92."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AIRFLOW_CONN_MLFLOW_DEFAULT", connection_json(mlflow_server.uri))
        result = log_tiny_model(mp, mlflow_server.uri, CHAMPION_METRICS)
        hook = MLflowHook()
        name = unique_name("gate-champion")
        source = hook.registry.resolve_model_source(run_id=result["run_id"], model_uri=result["model_uri"])
        version, _ = hook.registry.register_model_version(name, source, await_ready_timeout=30)
        hook.registry.move_alias(name, "champion", version.version)
    return name


@pytest.fixture(autouse=True)
def _mlflow_conn(mlflow_server, airflow_conn):
    airflow_conn("mlflow_default", connection_json(mlflow_server.uri))


def gate(**kwargs) -> ModelQualityBranchOperator:
    kwargs.setdefault("pass_task_ids", "register")
    kwargs.setdefault("fail_task_ids", ["notify", "cleanup"])
    return ModelQualityBranchOperator(task_id="gate", **kwargs)


def test_one_hook_and_one_connection_look_up_per_gate(champion_model, mlflow_server, monkeypatch):
    looked_up: list[str] = []
    real_get_connection = MLflowHook.get_connection

    def counting_get_connection(conn_id):
        looked_up.append(conn_id)
        return real_get_connection(conn_id)

    monkeypatch.setattr(MLflowHook, "get_connection", staticmethod(counting_get_connection))
    # Candidate metrics read from MLflow and the champion's: two registry reads on the same hook.
    candidate = log_tiny_model(monkeypatch, mlflow_server.uri, {"val_accuracy": 0.95})
    op = gate(
        run_id=candidate["run_id"], champion_model=champion_model, thresholds={"val_accuracy": {"min": 0.9}}
    )

    report = op.quality_report()

    assert report["candidate"]["metrics"]["val_accuracy"] == 0.95 and report["champion"]["version"] == "1"
    assert looked_up == ["mlflow_default"]
    assert op.hook is op.hook


@pytest.mark.parametrize(
    ("candidate_accuracy", "branch", "verdict"),
    [(0.93, ["register"], "PASS"), (0.921, ["notify", "cleanup"], "FAIL")],
)
def test_candidate_must_beat_the_champion_by_min_improvement(
    champion_model, candidate_accuracy, branch, verdict
):
    op = gate(
        metrics={"val_accuracy": candidate_accuracy, "val_loss": 0.2},
        champion_model=champion_model,
        min_improvement={"val_accuracy": 0.005},
    )

    report = op.quality_report()

    assert report["branch"] == branch
    assert report["champion"]["version"] == "1" and report["champion"]["metrics"] == CHAMPION_METRICS
    (check,) = report["checks"]
    assert check["check"] == "vs_champion" and check["metric"] == "val_accuracy"
    assert check["value"] == candidate_accuracy and check["champion_value"] == 0.92
    assert check["required"] == 0.005 and check["verdict"] == verdict
    assert check["improvement"] == pytest.approx(candidate_accuracy - 0.92)
    assert "val_accuracy" in report["table"] and verdict in report["table"]


@pytest.mark.parametrize(
    ("on_no_champion", "branch"), [("pass", ["register"]), ("fail", ["notify", "cleanup"])]
)
def test_no_champion_follows_on_no_champion(on_no_champion, branch):
    op = gate(
        metrics={"val_accuracy": 0.5},
        champion_model=unique_name("never-registered"),
        min_improvement={"val_accuracy": 0.005},
        on_no_champion=on_no_champion,
    )

    report = op.quality_report()

    assert report["branch"] == branch
    assert report["champion"] is None
    assert [c["check"] for c in report["checks"]] == ["champion"]


def test_loss_gate_exceeded_fails_even_when_the_champion_is_beaten(champion_model):
    op = gate(
        metrics={"val_accuracy": 0.99, "val_loss": 0.35},
        thresholds={"val_accuracy": {"min": 0.9}, "val_loss": {"max": 0.3}},
        champion_model=champion_model,
        min_improvement={"val_accuracy": 0.005},
    )

    report = op.quality_report()

    assert report["passed"] is False and report["branch"] == ["notify", "cleanup"]
    verdicts = {(c["metric"], c["check"]): c["verdict"] for c in report["checks"]}
    assert verdicts == {
        ("val_accuracy", "min"): "PASS",
        ("val_loss", "max"): "FAIL",
        ("val_accuracy", "vs_champion"): "PASS",
    }


def test_lower_is_better_loss_compared_relatively(champion_model):
    # Champion val_loss 0.25; 0.2 is 20 % lower, 0.24 only 4 %.
    def report_for(loss: float) -> dict:
        return gate(
            metrics={"val_loss": loss},
            champion_model=champion_model,
            min_improvement={"val_loss": 0.1},
            relative_improvement=True,
        ).quality_report()

    assert report_for(0.2)["passed"] is True
    assert report_for(0.2)["checks"][0]["improvement"] == pytest.approx(0.2)
    assert report_for(0.24)["passed"] is False


def test_missing_metric_is_a_clear_error_or_the_fail_branch(champion_model):
    kwargs = {
        "metrics": {"val_loss": 0.1, "train_loss": 0.05},
        "thresholds": {"val_f1": {"min": 0.8}},
        "champion_model": champion_model,
    }

    with pytest.raises(MissingMetricError) as err:
        gate(**kwargs).quality_report()
    assert "metric 'val_f1' is missing from the candidate's metrics" in str(err.value)
    assert "['train_loss', 'val_loss']" in str(err.value)

    report = gate(on_missing_metric="fail_branch", **kwargs).quality_report()
    assert report["branch"] == ["notify", "cleanup"]
    assert report["checks"][0]["check"] == "missing" and report["checks"][0]["verdict"] == "FAIL"


def test_metric_the_champion_lacks_names_the_champion(champion_model):
    op = gate(metrics={"val_f1": 0.9}, champion_model=champion_model, min_improvement={"val_f1": 0.0})

    with pytest.raises(
        MissingMetricError, match=r"'val_f1' is missing from the metrics of champion version 1"
    ):
        op.quality_report()


def test_candidate_metrics_read_from_its_mlflow_run(champion_model, mlflow_server, monkeypatch):
    candidate = log_tiny_model(monkeypatch, mlflow_server.uri, {"val_accuracy": 0.95, "val_loss": 0.1})
    op = gate(
        run_id=candidate["run_id"], champion_model=champion_model, min_improvement={"val_accuracy": 0.01}
    )

    report = op.quality_report()

    assert report["passed"] is True
    assert report["candidate"] == {
        "run_id": candidate["run_id"],
        "metrics": {"val_accuracy": 0.95, "val_loss": 0.1},
    }


def _scored(run_id: str | None, metrics: dict[str, float]) -> dict:
    """What ``python -m gpu_trainer.evaluate`` writes for ``models:/<name>@champion`` on a holdout."""
    return {
        "schema_version": 1,
        "run_id": run_id,
        "model_uri": "models:/gate-champion@champion",
        "metrics": metrics,
        "params": {"data": "/data/2026-11-20/prepared", "rows": 360, "model_found": bool(metrics)},
        "resumed_from_epoch": None,
    }


def test_like_for_like_gate_compares_with_the_champion_rescored_on_the_candidates_holdout(champion_model):
    holder = MLflowHook().registry.get_champion(champion_model)
    assert holder is not None
    # Recorded 0.92 on its own day; on the candidate's holdout it scores 0.95, so 0.94 is no improvement.
    op = gate(
        metrics={"val_accuracy": 0.94, "val_loss": 0.2},
        run_id="candidate-run",
        champion_model=champion_model,
        champion_metrics=_scored(holder["run_id"], {"val_accuracy": 0.95, "val_loss": 0.15}),
        min_improvement={"val_accuracy": 0.005},
    )

    report = op.quality_report()

    assert report["like_for_like"] is True and report["passed"] is False
    assert report["candidate"]["run_id"] == "candidate-run"
    assert report["champion"]["metrics"] == CHAMPION_METRICS  # as its run recorded them
    rescored = report["champion"]["rescored"]
    assert rescored["metrics"] == {"val_accuracy": 0.95, "val_loss": 0.15}
    assert rescored["run_id"] == holder["run_id"] and rescored["rows"] == 360
    (check,) = report["checks"]
    assert check["champion_value"] == 0.95 and check["champion_recorded_value"] == 0.92
    assert "its own run recorded 0.92" in report["table"]


@pytest.mark.parametrize(
    ("scored_run", "metrics", "message"),
    [
        ("another-run", {"val_accuracy": 0.95}, r"scored on the model of run another-run .* the alias moved"),
        (None, {}, r"champion_metrics is empty but version 1 .* holds alias 'champion'"),
    ],
)
def test_like_for_like_gate_refuses_a_rescore_that_is_not_the_alias_holders(
    champion_model, scored_run, metrics, message
):
    from airflow.exceptions import AirflowException

    op = gate(
        metrics={"val_accuracy": 0.99},
        champion_model=champion_model,
        champion_metrics=_scored(scored_run, metrics),
        min_improvement={"val_accuracy": 0.005},
    )

    with pytest.raises(AirflowException, match=message):
        op.quality_report()


def test_like_for_like_gate_without_a_champion_follows_on_no_champion():
    op = gate(
        metrics={"val_accuracy": 0.95},
        champion_model=unique_name("never-registered"),
        champion_metrics=_scored(None, {}),
        min_improvement={"val_accuracy": 0.005},
    )

    report = op.quality_report()

    assert report["branch"] == ["register"] and report["champion"] is None
    assert report["like_for_like"] is True
    assert [c["check"] for c in report["checks"]] == ["champion"]
