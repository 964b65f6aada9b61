"""Real runs with real logged models on the test session's MLflow server, for registry and gate tests."""

from __future__ import annotations

import uuid
from typing import Any

import pytest


def unique_name(prefix: str) -> str:
    """A registered model name no other test of the session uses (the server is shared)."""
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def log_tiny_model(
    monkeypatch: pytest.MonkeyPatch,
    tracking_uri: str,
    metrics: dict[str, float],
    *,
    experiment: str = "mltrain-operator-tests",
    name: str = "model",
) -> dict[str, Any]:
    """Log a run with ``metrics`` and a tiny pyfunc model the way a trainer does (``log_model``).

    :return: a contract-shaped training result (``run_id``, ``model_uri`` as ``log_model`` returns it,
        ``metrics``, ...).
    """
    import mlflow
    import mlflow.pyfunc

    class Identity(mlflow.pyfunc.PythonModel):
        def predict(
            self, context, model_input, params=None
        ):  # untyped: typed hints make MLflow infer a schema
            return model_input

    # The fluent API reads the tracking URI from the environment; monkeypatch undoes it after the test.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)
    mlflow.set_experiment(experiment)
    with mlflow.start_run() as run:
        mlflow.log_metrics(metrics)
        # pip_requirements=[] skips dependency inference, which takes ~20 s and matters nothing here.
        info = mlflow.pyfunc.log_model(name=name, python_model=Identity(), pip_requirements=[])
    return {
        "schema_version": 1,
        "run_id": run.info.run_id,
        "model_uri": info.model_uri,
        "metrics": dict(metrics),
        "params": {},
        "resumed_from_epoch": None,
    }


def dag_run_xcoms(dag_run: Any) -> dict[tuple[str, str], Any]:
    """Every XCom a ``dag.test()`` run pushed, as ``{(task_id, key): value}``."""
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    with create_session() as session:
        rows = session.scalars(XComModel.get_many(run_id=dag_run.run_id, dag_ids=dag_run.dag_id)).all()
        return {(row.task_id, row.key): XComModel.deserialize_value(row) for row in rows}


def task_states(dag_run: Any) -> dict[str, str | None]:
    """``{task_id: state}`` of a ``dag.test()`` run."""
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        tis = session.scalars(
            select(TaskInstance).where(
                TaskInstance.dag_id == dag_run.dag_id, TaskInstance.run_id == dag_run.run_id
            )
        ).all()
        return {ti.task_id: getattr(ti.state, "value", ti.state) for ti in tis}
