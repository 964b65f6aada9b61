"""The MLflow run link uses the experiment id the trainer reported, and asks MLflow only when it is absent."""

from __future__ import annotations

from typing import Any

from airflow_provider_mltrain.hooks.mlflow import connection_json
from airflow_provider_mltrain.links.mlflow import MLflowRunLink
from airflow_provider_mltrain.operators.gpu_training import GPUTrainingPodOperator
from gpu_trainer import contract

# Nothing listens on the discard port: a request to MLflow would fail and leave the link empty.
UNREACHABLE = "http://127.0.0.1:9"


class _TaskInstance:
    def __init__(self) -> None:
        self.pushed: dict[str, Any] = {}

    def xcom_push(self, key: str, value: Any) -> None:
        self.pushed[key] = value


def _link_for(result: dict[str, Any]) -> str:
    op = GPUTrainingPodOperator(task_id="train", image="trainer:1", mlflow_conn_id="mlflow_unreachable")
    ti = _TaskInstance()
    op._persist_run_link({"ti": ti}, result)
    return ti.pushed[MLflowRunLink.key]


def test_the_reported_experiment_id_builds_the_link_without_asking_mlflow(airflow_conn, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    airflow_conn("mlflow_unreachable", connection_json(UNREACHABLE))
    result = contract.make_result(
        run_id="abc", model_uri=None, metrics={}, params={}, resumed_from_epoch=None, experiment_id="7"
    )
    assert _link_for(result) == f"{UNREACHABLE}/#/experiments/7/runs/abc"


def test_an_older_trainers_result_falls_back_to_asking_mlflow(airflow_conn, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    airflow_conn("mlflow_unreachable", connection_json(UNREACHABLE))
    result = contract.make_result(
        run_id="abc", model_uri=None, metrics={}, params={}, resumed_from_epoch=None
    )
    # It asked (the unreachable server is the proof): the link stays empty and the task goes on.
    assert _link_for(result) == ""
