"""
### Quickstart: one training job, TaskFlow style

The smallest useful DAG: a `@task` picks hyperparameters, `GPUTrainingPodOperator` trains (a GPU pod,
or a local process with `AIRFLOW__MLTRAIN__LAUNCHER=local`), and a `@task` reads the metrics the
trainer sent back through XCom.
"""

from __future__ import annotations

import datetime as dt
import logging
from typing import Any

from airflow.sdk import DAG, Param, task

from airflow_provider_mltrain.operators.gpu_training import GPUTrainingPodOperator

log = logging.getLogger(__name__)

with DAG(
    dag_id="quickstart_taskflow",
    doc_md=__doc__,
    schedule=None,
    start_date=dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc),
    catchup=False,
    tags=["ml", "quickstart"],
    params={"data": Param("s3://ml-datasets/digits/latest/prepared", type="string"), "epochs": 3},
) as dag:

    @task
    def choose_hyperparameters(params: dict[str, Any] | None = None) -> dict[str, Any]:
        return {"lr": 0.003, "batch_size": 64, "epochs": int(params["epochs"]) if params else 3}

    train = GPUTrainingPodOperator(
        task_id="train",
        image="ghcr.io/acme/mltrain-trainer:0.1.0",
        gpus=1,
        mlflow_conn_id="mlflow_default",
        experiment_name="quickstart",
        arguments=["--data", "{{ params.data }}"],
        # s3:// data: pods read this Secret's AWS_* keys (or use service_account_name= with a cloud
        # identity); a local trainer gets the aws_default connection's keys and endpoint instead.
        data_secret="training-data-credentials",
        aws_conn_id="aws_default",
        hyperparameters=choose_hyperparameters(),
    )

    @task
    def report(result: dict[str, Any]) -> float:
        log.info("run %s: %s", result["run_id"], result["metrics"])
        return result["metrics"]["val_accuracy"]

    report(train.output)
