"""Bring your own trainer: ``example_dags/custom_trainer/train.py`` in the example pipeline, unchanged.

The production example DAG runs with only its training command swapped for the plain-PyTorch script:
a sweep on the local launcher, the quality gate and the registration against the real MLflow server.
Then the script is run again on one trial's checkpoint directory, as a retry would, and resumes.
"""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys

import pytest

from airflow_provider_mltrain.hooks.mlflow import connection_json
from airflow_provider_mltrain.testing import run_dag, xcom_value
from gpu_trainer import contract
from tests.fixtures.example_dags import EXAMPLES, land_day, load_example_dag

CUSTOM_TRAINER = EXAMPLES / "custom_trainer" / "train.py"


@pytest.fixture
def pipeline(airflow_db, airflow_conn, mlflow_server, monkeypatch, tmp_path):
    """The example pipeline on the embedded default (local launcher, the real MLflow server), with the
    plain-PyTorch script as its training command."""
    monkeypatch.setenv("AIRFLOW__MLTRAIN__LAUNCHER", "local")
    monkeypatch.setenv("AIRFLOW__MLTRAIN__LOCAL_CHECKPOINT_ROOT", str(tmp_path / "checkpoints"))
    airflow_conn("mlflow_default", connection_json(mlflow_server.uri))
    dag = load_example_dag("ml_training_pipeline")
    # The one change a team makes: their script instead of the bundled trainer (on Kubernetes, their image
    # and this command).
    dag.get_task("train").partial_kwargs["cmds"] = ["python", str(CUSTOM_TRAINER)]
    return dag


def test_custom_trainer_in_the_example_pipeline_then_resumes(pipeline, mlflow_server, tmp_path, monkeypatch):
    from airflow_provider_mltrain.hooks.mlflow import MLflowHook

    logical_date = dt.datetime(2026, 11, 21, 6, tzinfo=dt.timezone.utc)
    day = land_day(tmp_path / "data", "2026-11-21")
    model_name = f"custom-trainer-{tmp_path.name}"
    conf = {
        "data_root": f"file://{tmp_path / 'data'}",
        "model_name": model_name,
        "experiment_name": f"custom-{tmp_path.name}",
        "epochs": 4,
        "learning_rates": [0.01],
        "hidden_dims": [32, 64],
    }

    dag_run = run_dag(pipeline, logical_date=logical_date, run_conf=conf)

    assert dag_run.state == "success", {ti.task_id: ti.state for ti in dag_run.get_task_instances()}
    assert dag_run.get_task_instance("register").state == "success"
    client = MLflowHook().get_conn()
    results = [xcom_value(dag_run, "train", map_index=i) for i in range(2)]
    for result in results:
        assert contract.validate_result(result, require_metrics=contract.CLASSIFICATION_METRICS) == result
        run = client.get_run(result["run_id"])
        # The run is where the operator said: its experiment, its name, the Airflow lineage as tags.
        assert run.info.experiment_id == result["experiment_id"]
        assert run.info.run_name.startswith("ml_training_pipeline.train.")
        assert run.data.tags["airflow.dag_run_id"] == dag_run.run_id
        assert run.data.metrics["val_accuracy"] == result["metrics"]["val_accuracy"]
        assert result["resumed_from_epoch"] is None
    # The run link is built from the reported experiment id.
    link = xcom_value(dag_run, "train", key="mlflow_run_url", map_index=0)
    assert link.endswith(f"/experiments/{results[0]['experiment_id']}/runs/{results[0]['run_id']}")
    champion = client.get_model_version_by_alias(model_name, "champion")
    assert champion.run_id in {r["run_id"] for r in results}
    assert client.get_run(champion.run_id).data.metrics["val_accuracy"] >= 0.9
    # The next DAG run's score_champion step scores it with the bundled evaluator, like any champion.
    from gpu_trainer.evaluate import main as evaluate_main

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    scored_path = tmp_path / "champion.json"
    champion_uri = f"models:/{model_name}@champion"
    assert (
        evaluate_main(
            ["--model-uri", champion_uri, "--data", str(day / "prepared"), "--output", str(scored_path)]
        )
        == 0
    )
    scored = contract.load_result(str(scored_path))
    reported = next(r for r in results if r["run_id"] == champion.run_id)
    assert scored["metrics"]["val_accuracy"] == pytest.approx(reported["metrics"]["val_accuracy"])

    # A retry of trial 0 finds its checkpoint: same run, continued from epoch 4 to 5.
    checkpoint_dir = next((tmp_path / "checkpoints" / "ml_training_pipeline" / "train").glob("*/map_0"))
    env = contract.trainer_environment(
        hyperparameters={**results[0]["params"], "epochs": 5},
        checkpoint_dir=str(checkpoint_dir),
        result_path=str(tmp_path / "retry.json"),
        mlflow={contract.ENV_TRACKING_URI: mlflow_server.uri},
    )
    prepared = day / "prepared"
    proc = subprocess.run(
        [sys.executable, str(CUSTOM_TRAINER), "--data", str(prepared)],
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(CUSTOM_TRAINER.parents[2]), **env},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    retried = json.loads((tmp_path / "retry.json").read_text())
    assert retried["resumed_from_epoch"] == 4 and retried["run_id"] == results[0]["run_id"]
    steps = [m.step for m in client.get_metric_history(retried["run_id"], "val_accuracy")]
    assert steps == [1, 2, 3, 4, 5]
