"""The quality gate end to end with ``dag.test()``: train result XCom -> gate -> register or reject."""

from __future__ import annotations

import pytest

from airflow_provider_mltrain.hooks.mlflow import MLflowHook, connection_json
from airflow_provider_mltrain.operators.mlflow_register import MLflowRegisterOperator
from airflow_provider_mltrain.operators.model_quality import ModelQualityBranchOperator
from tests.fixtures.airflow_env import run_dag
from tests.fixtures.mlflow_models import dag_run_xcoms, log_tiny_model, task_states, unique_name


@pytest.mark.parametrize(
    ("val_accuracy", "metrics_as_jinja", "ran", "skipped"),
    [
        pytest.param(0.95, False, "register", "reject", id="pass-xcomarg"),
        pytest.param(0.5, True, "reject", "register", id="fail-jinja-string"),
    ],
)
def test_train_gate_register(
    airflow_db, airflow_conn, mlflow_server, monkeypatch, val_accuracy, metrics_as_jinja, ran, skipped
):
    from airflow.providers.standard.operators.empty import EmptyOperator
    from airflow.sdk import DAG, task

    airflow_conn("mlflow_default", connection_json(mlflow_server.uri))
    name = unique_name("gate-dag")

    with DAG(f"mltrain_quality_gate_{ran}", schedule=None, params={"min_acc": 0.9}) as dag:

        @task
        def train() -> dict:
            # A contract-shaped training result with a real run and logged model behind it.
            return log_tiny_model(
                monkeypatch, mlflow_server.uri, {"val_accuracy": val_accuracy, "val_loss": 0.2}
            )

        result = train()
        metrics = "{{ ti.xcom_pull(task_ids='train')['metrics'] }}" if metrics_as_jinja else result["metrics"]
        gate = ModelQualityBranchOperator(
            task_id="gate",
            metrics=metrics,
            thresholds={"val_accuracy": {"min": "{{ params.min_acc }}"}, "val_loss": {"max": 0.3}},
            champion_model=name,
            min_improvement={"val_accuracy": 0.005},
            pass_task_ids="register",
            fail_task_ids="reject",
        )
        register = MLflowRegisterOperator(
            task_id="register",
            model_name=name,
            run_id=result["run_id"],
            model_uri=result["model_uri"],
            aliases=["champion"],
        )
        reject = EmptyOperator(task_id="reject")
        result >> gate >> [register, reject]

    dag_run = run_dag(dag)

    states = task_states(dag_run)
    assert dag_run.state == "success", states
    assert states[ran] == "success" and states[skipped] == "skipped"
    xcoms = dag_run_xcoms(dag_run)
    report = xcoms[("gate", "quality_report")]
    assert report["passed"] is (ran == "register")
    assert report["candidate"]["metrics"]["val_accuracy"] == val_accuracy
    assert {(c["metric"], c["check"], c["verdict"]) for c in report["checks"]} == {
        ("val_accuracy", "min", "PASS" if val_accuracy >= 0.9 else "FAIL"),
        ("val_loss", "max", "PASS"),
        ("-", "champion", "PASS"),  # the model is not registered yet: no champion, on_no_champion="pass"
    }
    champion = MLflowHook().registry.get_version_by_alias(name, "champion")
    if ran == "register":
        assert xcoms[("register", "return_value")]["version"] == "1"
        assert champion is not None and champion.run_id == xcoms[("train", "return_value")]["run_id"]
    else:
        assert champion is None
