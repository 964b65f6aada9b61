"""
### Adaptive sweep: successive halving, each survivor resuming its own checkpoint

Nine configurations train for 1 epoch; the best third go on to 3 epochs, resuming their checkpoints;
the best of those to 9. That is 9 + 3 x 2 + 1 x 6 = 21 trainer epochs where the grid over the same nine
configurations pays 9 x 9 = 81. Every trial is a child run of one parent MLflow run holding the
leaderboard and a plot of the metric against epochs. Point `data` at a Parquet file or directory
(`s3://...` in the cluster, a local path with the local launcher).

On Kubernetes, keep checkpoints on a PVC (`checkpoint_volume=`) or under a URI (`checkpoint_uri=`):
a pod's own emptyDir vanishes with it, and survivors would start over.
"""

from __future__ import annotations

import datetime as dt
import logging
from typing import Any

from airflow.sdk import DAG, Param, task

from airflow_provider_mltrain.operators.gpu_training import GPUTrainingPodOperator
from airflow_provider_mltrain.sweeps import successive_halving

log = logging.getLogger(__name__)

with DAG(
    dag_id="adaptive_sweep",
    doc_md=__doc__,
    schedule=None,
    start_date=dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc),
    catchup=False,
    max_active_runs=1,
    tags=["ml", "training", "sweep"],
    default_args={"owner": "ml-platform", "retries": 1, "retry_delay": dt.timedelta(minutes=1)},
    params={
        "data": Param("s3://ml-datasets/digits/latest/prepared", type="string"),
        "experiment_name": Param("digits-tuning", type="string"),
    },
) as dag:
    best = successive_halving(
        group_id="tune",
        trainer=GPUTrainingPodOperator.partial(
            task_id="train",  # each round is tune.round_<k>
            image="ghcr.io/acme/mltrain-trainer:0.1.0",
            namespace="ml-training",
            gpus=1,
            mlflow_conn_id="mlflow_default",
            experiment_name="{{ params.experiment_name }}",
            arguments=["--data", "{{ params.data }}"],
            data_secret="training-data-credentials",
            aws_conn_id="aws_default",
        ),
        # The rounds are fixed when the DAG is parsed, so the search space is code, not a Param.
        search_space={"lr": {"loguniform": [1e-4, 1e-1]}, "hidden_dim": [64, 128, 256]},
        n_configs=9,
        eta=3,
        min_epochs=1,
        max_epochs=9,
        metric="val_accuracy",
        mode="max",
        seed=0,
    )

    @task
    def report(best: dict[str, Any]) -> str:
        """Log the leaderboard; hand the winner's model URI on (e.g. to a quality gate and registration)."""
        for row in best["leaderboard"]:
            log.info(
                "#%d %s %-8s after %d epochs val_accuracy=%s %s",
                row["rank"],
                row["trial"],
                row["status"],
                row["epochs"],
                row["val_accuracy"],
                row["params"],
            )
        return str(best["model_uri"])

    report(best)
