"""
### Hyperparameter sweep: map, reduce to the best, log a comparison

One `GPUTrainingPodOperator` per hyperparameter combination (dynamic task mapping), each its own
MLflow run; `compare` ranks them and returns the best. Point `data` at a Parquet file or directory
(`s3://...` in the cluster, a local path with the local launcher).

Every combination pays for every epoch here; `adaptive_sweep.py` stops the bad ones early (successive halving).
"""

from __future__ import annotations

import datetime as dt
import itertools
import logging
from typing import Any

from airflow.sdk import DAG, Param, get_current_context, task

from airflow_provider_mltrain.operators.gpu_training import GPUTrainingPodOperator

log = logging.getLogger(__name__)

with DAG(
    dag_id="hyperparameter_sweep",
    doc_md=__doc__,
    schedule=None,
    start_date=dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc),
    catchup=False,
    max_active_runs=1,
    tags=["ml", "training", "sweep"],
    default_args={"owner": "ml-platform", "retries": 1, "retry_delay": dt.timedelta(minutes=1)},
    params={
        "data": Param("s3://ml-datasets/digits/latest/prepared", type="string"),
        "experiment_name": Param("digits-sweep", type="string"),
        "epochs": Param(5, type="integer", minimum=1),
        "learning_rates": Param([0.01, 0.003, 0.001], type="array"),
        "batch_sizes": Param([64, 128], type="array"),
        "metric": Param("val_accuracy", type="string", description="what 'best' means (higher is better)"),
    },
) as dag:

    @task
    def grid() -> list[dict[str, Any]]:
        """Every combination of the swept Params."""
        params = get_current_context()["params"]
        return [
            {"lr": lr, "batch_size": batch_size, "epochs": params["epochs"], "seed": 42}
            for lr, batch_size in itertools.product(params["learning_rates"], params["batch_sizes"])
        ]

    train = GPUTrainingPodOperator.partial(
        task_id="train",
        image="ghcr.io/acme/mltrain-trainer:0.1.0",
        namespace="ml-training",
        gpus=1,
        mlflow_conn_id="mlflow_default",
        experiment_name="{{ params.experiment_name }}",
        arguments=["--data", "{{ params.data }}"],
        # s3:// data: pods read this Secret's AWS_* keys (or use service_account_name= with a cloud
        # identity); a local trainer gets the aws_default connection's keys and endpoint instead.
        data_secret="training-data-credentials",
        aws_conn_id="aws_default",
    ).expand(hyperparameters=grid())

    @task
    def compare(results: list[dict[str, Any]]) -> dict[str, Any]:
        """Rank the runs on the chosen metric and return the best result."""
        metric = get_current_context()["params"]["metric"]
        # Index instead of iterating: iterating a lazy XCom sequence probes one past its end (logged as an error).
        results = [results[i] for i in range(len(results))]
        ranked = sorted(results, key=lambda r: r["metrics"][metric], reverse=True)
        for rank, result in enumerate(ranked, start=1):
            log.info(
                "#%d %s=%.4f params=%s run=%s",
                rank,
                metric,
                result["metrics"][metric],
                {k: result["params"].get(k) for k in ("lr", "batch_size")},
                result["run_id"],
            )
        return ranked[0]

    compare(train.output)
