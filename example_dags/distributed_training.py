"""
### Distributed training: 2 nodes x 8 GPUs on JobSet, queued by Kueue -> quality gate -> register

One training task too big for one node: `DistributedTrainingOperator` submits a JobSet (one Indexed Job of
2 pods, each with 8 GPUs, every pod running `torchrun -m gpu_trainer.train`) to the Kueue LocalQueue
`team-a`, waits for admission and for the run, and returns the trainer's result (global rank 0's). Then
the same tail as the production pipeline: **quality_gate** (`ModelQualityBranchOperator`: absolute gates
and the improvement over the `champion`) -> **register** (`MLflowRegisterOperator`) or
**skip_registration**.

Every node must see the same checkpoints (a restart of the set resumes from them): `checkpoint_volume`
is a ReadWriteMany PVC (or pass `checkpoint_uri="s3://..."`). `backend="trainjob"` submits a Kubeflow
Trainer TrainJob instead (the `torch-distributed` runtime).

**On a laptop**: `AIRFLOW__MLTRAIN__LAUNCHER=local` runs the manifest's own node command on this machine:
2 torchrun agents x `nproc_per_node` processes (CPU and gloo without GPUs), each node with the
`PET_*` placement the cluster would give it. `nproc_per_node` defaults to `gpus`, so that is 2 x 8 processes;
on a small machine add `"nproc_per_node": 1` to `CLUSTER` (the tests run it so). Trigger with
`{"data": "/path/to/prepared"}`.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from airflow.providers.standard.operators.empty import EmptyOperator
from airflow.sdk import DAG, Param

from airflow_provider_mltrain.operators.distributed_training import DistributedTrainingOperator
from airflow_provider_mltrain.operators.mlflow_register import MLflowRegisterOperator
from airflow_provider_mltrain.operators.model_quality import ModelQualityBranchOperator

# The cluster's side in one place. The local launcher still builds (and so validates) the JobSet from it.
CLUSTER: dict[str, Any] = {
    "namespace": "ml-training",
    "image": "ghcr.io/acme/mltrain-trainer:0.1.0",
    "backend": "jobset",
    "num_nodes": 2,
    "gpus": 8,
    "gpu_type": ["NVIDIA-H100-80GB-HBM3", "NVIDIA-A100-SXM4-80GB"],
    "cpu": "64",
    "memory": "512Gi",
    # Kueue: the LocalQueue and the WorkloadPriorityClass. The JobSet is created suspended; Kueue starts
    # it when the queue's quota has room for all 16 GPUs at once (gang admission).
    "queue_name": "team-a",
    "priority_class": "training-high",
    # How long to wait for that quota before failing (and deleting the JobSet).
    "admission_timeout_seconds": 6 * 3600,
    # A failed node restarts the whole set (up to 3 times); each restart resumes from the checkpoint.
    "max_restarts": 3,
    "checkpoint_volume": {
        "claim_name": "training-checkpoints-rwx",
        "mount_path": "/mltrain/checkpoints",
        "access_mode": "ReadWriteMany",
    },
    "mlflow_secret": "mlflow-credentials",
    "data_secret": "training-data-credentials",
}
MLFLOW_CONN_ID = "mlflow_default"

with DAG(
    dag_id="distributed_training",
    description="Multi-node training on JobSet with Kueue, gated on quality, registered in MLflow.",
    doc_md=__doc__,
    schedule=None,
    start_date=dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc),
    catchup=False,
    max_active_runs=1,
    tags=["ml", "training", "distributed", "kueue"],
    default_args={
        "owner": "ml-platform",
        "retries": 1,
        "retry_delay": dt.timedelta(minutes=5),
        # The queue wait counts too: admission_timeout_seconds fails first when the quota never frees up.
        "execution_timeout": dt.timedelta(hours=12),
    },
    params={
        "data": Param("s3://ml-datasets/digits/latest/prepared", type="string"),
        "model_name": Param("digits-classifier-distributed", type="string"),
        "experiment_name": Param("digits-distributed", type="string"),
        "epochs": Param(5, type="integer", minimum=1),
        "min_val_accuracy": Param(0.90, type="number", minimum=0, maximum=1),
        "max_val_loss": Param(0.5, type="number", minimum=0),
    },
) as dag:
    train = DistributedTrainingOperator(
        task_id="train",
        **CLUSTER,
        mlflow_conn_id=MLFLOW_CONN_ID,
        experiment_name="{{ params.experiment_name }}",
        arguments=["--data", "{{ params.data }}", "--epochs", "{{ params.epochs }}"],
        # A local trainer reads s3:// data with this connection's keys; pods use data_secret.
        aws_conn_id="aws_default",
    )

    quality_gate = ModelQualityBranchOperator(
        task_id="quality_gate",
        metrics=train.output["metrics"],
        run_id=train.output["run_id"],
        thresholds={
            "val_accuracy": {"min": "{{ params.min_val_accuracy }}"},
            "val_loss": {"max": "{{ params.max_val_loss }}"},
        },
        champion_model="{{ params.model_name }}",
        champion_alias="champion",
        pass_task_ids="register",
        fail_task_ids="skip_registration",
        mlflow_conn_id=MLFLOW_CONN_ID,
    )
    register = MLflowRegisterOperator(
        task_id="register",
        model_name="{{ params.model_name }}",
        run_id=train.output["run_id"],
        model_uri=train.output["model_uri"],
        aliases=["champion"],
        tags={"airflow_dag_run": "{{ run_id }}", "num_nodes": str(CLUSTER["num_nodes"])},
        mlflow_conn_id=MLFLOW_CONN_ID,
    )
    skip_registration = EmptyOperator(task_id="skip_registration")

    quality_gate >> [register, skip_registration]
