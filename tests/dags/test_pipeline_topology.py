"""The example pipeline on the real topology, as a deployment runs it (issue 15).

Four ``airflow`` processes (dag-processor, scheduler with the LocalExecutor, triggerer, api-server) on
SQLite, the real ``mlflow server`` and the moto S3 server on loopback, the local training launcher. The
run is triggered through the REST API, its sensor is watched deferring on the triggerer, the day's data
lands on S3 only afterwards, and once the run succeeds the registered champion is loaded with MLflow's
own client and scored on raw held-out digits it never saw.

Credentials for S3 exist only in the ``aws_default`` connection: every process (this one included) has
``AWS_ENDPOINT_URL`` pointing at a dead loopback port and no AWS keys, so any S3 access that bypasses the
connection fails at once. Run it alone with ``pytest -m topology``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from airflow_provider_mltrain.hooks.mlflow import connection_json
from tests.fixtures.airflow_topology import (
    FINISHED_TASK_STATES,
    AirflowTopology,
    dead_loopback_endpoint,
    isolated_aws_environment,
    start_topology,
)
from tests.fixtures.mlflow_servers import MlflowServer
from tests.fixtures.s3 import S3Server, aws_connection_json

pytestmark = [pytest.mark.topology, pytest.mark.timeout(1200)]

PIPELINE = Path(__file__).resolve().parents[2] / "example_dags" / "ml_training_pipeline.py"
DAG_ID = "ml_training_pipeline"
LOGICAL_DATE = "2026-11-20T06:00:00+00:00"
DS = "2026-11-20"

# Loads the champion the way a model consumer would (MLflow's client, by alias, in a fresh process that
# has never seen Airflow) and scores it on raw features: no scaling, exactly as the Parquet holds them.
SCORE_CHAMPION = """
import json, sys
import mlflow.pyfunc, numpy as np, pandas as pd
from mlflow import MlflowClient
model_name, holdout = sys.argv[1], sys.argv[2]
model_uri = f"models:/{model_name}@champion"
version = MlflowClient().get_model_version_by_alias(model_name, "champion")
frame = pd.read_parquet(holdout)
labels = frame.pop("label").to_numpy()
predicted = np.asarray(mlflow.pyfunc.load_model(model_uri).predict(frame))
if predicted.ndim == 2 and predicted.shape[1] > 1:  # per-class scores
    predicted = predicted.argmax(axis=1)
predicted = predicted.reshape(-1).astype("int64")
print(json.dumps({
    "accuracy": float((predicted == labels).mean()),
    "rows": int(len(labels)),
    "dag_run": version.tags.get("airflow_dag_run"),
}))
"""


@pytest.fixture
def isolated_aws(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, str]]:
    """This process and the Airflow processes: no AWS keys, ``AWS_ENDPOINT_URL`` refusing connections."""
    for var in [name for name in os.environ if name.startswith("AWS_")]:
        monkeypatch.delenv(var)
    with dead_loopback_endpoint() as dead:
        env = isolated_aws_environment(dead, tmp_path)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        yield env


@pytest.fixture
def topology(
    tmp_path: Path, mlflow_server: MlflowServer, s3_server: S3Server, isolated_aws: dict[str, str]
) -> Iterator[AirflowTopology]:
    running = start_topology(
        home=tmp_path / "airflow",
        dag_files=[PIPELINE],
        connections={
            "mlflow_default": connection_json(mlflow_server.uri),
            # The moto credentials live here and nowhere else.
            "aws_default": aws_connection_json(s3_server.endpoint_url),
        },
        extra_env={
            **isolated_aws,
            "AIRFLOW__MLTRAIN__LAUNCHER": "local",
            "AIRFLOW__MLTRAIN__LOCAL_CHECKPOINT_ROOT": str(tmp_path / "checkpoints"),
        },
        dag_ids=[DAG_ID],
    )
    try:
        yield running
    finally:
        running.stop()


def _sensor_deferred_on_triggerer(topology: AirflowTopology, run_id: str) -> dict[str, Any] | None:
    ti = topology.task_instance(DAG_ID, run_id, "wait_for_data")
    if ti["state"] in FINISHED_TASK_STATES:
        raise AssertionError(f"wait_for_data ended {ti['state']!r} before any data landed")
    # ``triggerer_job`` is set once a triggerer process has claimed the sensor's trigger.
    return ti if ti["state"] == "deferred" and ti.get("triggerer_job") else None


def _score_champion(mlflow_server: MlflowServer, model_name: str, holdout: str) -> dict[str, Any]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("MLFLOW_TRACKING_")}
    env["MLFLOW_TRACKING_URI"] = mlflow_server.uri
    result = subprocess.run(
        [sys.executable, "-c", SCORE_CHAMPION, model_name, holdout],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, f"loading or scoring the champion failed:\n{result.stderr[-5000:]}"
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_pipeline_runs_on_the_real_topology_and_registers_a_champion_that_scores_raw_data(
    topology: AirflowTopology, s3_server: S3Server, mlflow_server: MlflowServer, tmp_path: Path
) -> None:
    from gpu_trainer.digits import write_digits

    started = time.monotonic()
    suffix = uuid.uuid4().hex[:10]
    bucket = f"topology-{suffix}"
    model_name = f"digits-classifier-{suffix}"
    run_id = f"manual__topology_{suffix}"
    s3 = s3_server.client()
    s3.create_bucket(Bucket=bucket)
    # The day's data is the train share; the held-out share never reaches the pipeline.
    day_data, holdout = write_digits(str(tmp_path / "digits"), val_fraction=0.2, seed=7)
    conf = {
        "data_root": f"s3://{bucket}/digits",
        "model_name": model_name,
        "experiment_name": f"topology-{suffix}",
        "epochs": 5,
        "learning_rates": [0.003],
        "hidden_dims": [64, 128],
    }

    with topology.logs_on_failure():
        topology.request("PATCH", f"dags/{DAG_ID}", json={"is_paused": False})
        topology.request(
            "POST",
            f"dags/{DAG_ID}/dagRuns",
            json={"dag_run_id": run_id, "logical_date": LOGICAL_DATE, "conf": conf},
        )
        sensor = topology.wait_for(
            "wait_for_data to defer onto the triggerer",
            lambda: _sensor_deferred_on_triggerer(topology, run_id),
            timeout=300,
        )
        deferred_after = time.monotonic() - started
        # Airflow 3.3 fails a deferred task whose trigger fires before the scheduler has drained the
        # executor's "success" event for the worker that exited on defer() (apache/airflow#66374, #71580,
        # #72716). A real day's data lands long after that; here it lands as soon as the scheduler has
        # logged that event.
        topology.wait_for_log(
            "scheduler",
            f"TaskInstance Finished: dag_id={DAG_ID}, task_id=wait_for_data, run_id={run_id},",
            timeout=120,
        )

        s3.upload_file(day_data, bucket, f"digits/{DS}/digits.parquet")
        s3.put_object(Bucket=bucket, Key=f"digits/{DS}/_SUCCESS", Body=b"")
        finished = topology.wait_for_run(DAG_ID, run_id, timeout=900)
        finished_after = time.monotonic() - started
        states = topology.task_states(DAG_ID, run_id)

        assert sensor["trigger"]["classpath"].endswith("DatasetTrigger")
        assert sensor["triggerer_job"]["job_type"] == "TriggererJob"
        assert finished["state"] == "success", states
        assert states["wait_for_data"] == "success"
        assert states["train[0]"] == states["train[1]"] == "success"
        assert states["register"] == "success" and states["skip_registration"] == "skipped"

    scored = _score_champion(mlflow_server, model_name, holdout)
    print(
        f"topology: started in {topology.startup_s:.0f} s; sensor deferred {deferred_after:.0f} s after the "
        f"trigger, run finished {finished_after:.0f} s after it; champion loaded and scored in "
        f"{time.monotonic() - started - finished_after:.0f} s: accuracy {scored['accuracy']:.4f} on "
        f"{scored['rows']} raw held-out rows"
    )
    assert scored["dag_run"] == run_id
    assert scored["accuracy"] >= 0.90
