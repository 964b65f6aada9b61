"""Baseline for bench_pipeline_parse.py: ml_training_pipeline written without this provider.

The same tasks and Kubernetes settings with Airflow's own operators: S3KeySensor for the data,
KubernetesPodOperator with the GPU resources, toleration, node affinity, /dev/shm, checkpoint PVC,
security contexts and MLflow environment spelled out by hand, BranchPythonOperator for the gate and a
PythonOperator calling the MLflow client for the registration. Not shipped; parsed only.
"""

from __future__ import annotations

import datetime as dt
import itertools
from typing import Any

from airflow.providers.amazon.aws.sensors.s3 import S3KeySensor
from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
from airflow.providers.standard.operators.empty import EmptyOperator
from airflow.providers.standard.operators.python import BranchPythonOperator, PythonOperator
from airflow.sdk import DAG, Param, TaskGroup, get_current_context, task
from kubernetes.client import models as k8s

GPU_TYPES = ["NVIDIA-A100-SXM4-80GB", "NVIDIA-H100-80GB-HBM3"]
AMOUNTS = {"cpu": "8", "memory": "32Gi", "nvidia.com/gpu": "1"}


def _secret_env(name: str) -> k8s.V1EnvVar:
    ref = k8s.V1SecretKeySelector(name="mlflow-credentials", key=name, optional=True)
    return k8s.V1EnvVar(name=name, value_from=k8s.V1EnvVarSource(secret_key_ref=ref))


def _validate(**_: Any) -> None:
    import pandas  # noqa: F401


def _preprocess(**_: Any) -> str:
    import pandas  # noqa: F401

    return "s3://ml-datasets/digits/prepared"


def _pick_best(**context: Any) -> dict[str, Any]:
    results = context["ti"].xcom_pull(task_ids="train")
    return max(results, key=lambda r: r["metrics"]["val_accuracy"])


def _gate(**context: Any) -> str:
    from mlflow import MlflowClient

    best = context["ti"].xcom_pull(task_ids="pick_best")
    params = context["params"]
    ok = best["metrics"]["val_accuracy"] >= params["min_val_accuracy"]
    client = MlflowClient()
    try:
        champion = client.get_model_version_by_alias(params["model_name"], "champion")
        ok = ok and best["metrics"]["val_accuracy"] >= client.get_run(champion.run_id).data.metrics[
            "val_accuracy"
        ] + float(params["min_improvement"])
    except Exception:
        pass
    return "register" if ok else "skip_registration"


def _register(**context: Any) -> dict[str, Any]:
    from mlflow import MlflowClient

    best = context["ti"].xcom_pull(task_ids="pick_best")
    name = context["params"]["model_name"]
    client = MlflowClient()
    version = client.create_model_version(name, best["model_uri"], run_id=best["run_id"])
    client.set_registered_model_alias(name, "champion", version.version)
    return {"name": name, "version": version.version}


with DAG(
    dag_id="ml_training_pipeline_plain",
    schedule="@daily",
    start_date=dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc),
    catchup=False,
    max_active_runs=1,
    tags=["ml", "training", "mlflow", "gpu"],
    default_args={
        "owner": "ml-platform",
        "retries": 2,
        "retry_delay": dt.timedelta(minutes=2),
        "execution_timeout": dt.timedelta(hours=2),
    },
    params={
        "data_root": Param("s3://ml-datasets/digits", type="string"),
        "model_name": Param("digits-classifier", type="string"),
        "experiment_name": Param("digits-daily", type="string"),
        "epochs": Param(5, type="integer", minimum=1),
        "learning_rates": Param([0.003, 0.001], type="array"),
        "hidden_dims": Param([128, 256], type="array"),
        "min_val_accuracy": Param(0.90, type="number", minimum=0, maximum=1),
        "max_val_loss": Param(0.5, type="number", minimum=0),
        "min_improvement": Param(0.005, type="number"),
    },
    render_template_as_native_obj=True,
) as dag:
    wait_for_data = S3KeySensor(
        task_id="wait_for_data",
        bucket_key="{{ params.data_root }}/{{ ds }}/_SUCCESS",
        aws_conn_id="aws_default",
        deferrable=True,
        poke_interval=60,
        timeout=dt.timedelta(hours=12).total_seconds(),
        retries=0,
    )
    with TaskGroup("data_preparation") as data_preparation:
        validate = PythonOperator(task_id="validate", python_callable=_validate)
        preprocess = PythonOperator(task_id="preprocess", python_callable=_preprocess)
        validate >> preprocess

    @task
    def hyperparameter_grid() -> list[dict[str, Any]]:
        params = get_current_context()["params"]
        data = "{{ ti.xcom_pull(task_ids='data_preparation.preprocess') }}"
        return [
            ["--data", data, "--lr", str(lr), "--hidden-dim", str(hidden), "--epochs", str(params["epochs"])]
            for lr, hidden in itertools.product(params["learning_rates"], params["hidden_dims"])
        ]

    train = KubernetesPodOperator.partial(
        task_id="train",
        namespace="ml-training",
        image="ghcr.io/acme/mltrain-trainer:0.1.0",
        cmds=["python", "-m", "gpu_trainer.train"],
        container_resources=k8s.V1ResourceRequirements(requests=dict(AMOUNTS), limits=dict(AMOUNTS)),
        tolerations=[k8s.V1Toleration(key="nvidia.com/gpu", operator="Exists", effect="NoSchedule")],
        affinity=k8s.V1Affinity(
            node_affinity=k8s.V1NodeAffinity(
                required_during_scheduling_ignored_during_execution=k8s.V1NodeSelector(
                    node_selector_terms=[
                        k8s.V1NodeSelectorTerm(
                            match_expressions=[
                                k8s.V1NodeSelectorRequirement(
                                    key="nvidia.com/gpu.product", operator="In", values=GPU_TYPES
                                )
                            ]
                        )
                    ]
                )
            )
        ),
        volumes=[
            k8s.V1Volume(
                name="shm", empty_dir=k8s.V1EmptyDirVolumeSource(medium="Memory", size_limit="32Gi")
            ),
            k8s.V1Volume(
                name="checkpoints",
                persistent_volume_claim=k8s.V1PersistentVolumeClaimVolumeSource(
                    claim_name="training-checkpoints"
                ),
            ),
        ],
        volume_mounts=[
            k8s.V1VolumeMount(name="shm", mount_path="/dev/shm"),
            k8s.V1VolumeMount(name="checkpoints", mount_path="/checkpoints"),
        ],
        security_context=k8s.V1PodSecurityContext(
            run_as_non_root=True,
            run_as_user=1000,
            fs_group=1000,
            seccomp_profile=k8s.V1SeccompProfile(type="RuntimeDefault"),
        ),
        container_security_context=k8s.V1SecurityContext(
            allow_privilege_escalation=False,
            capabilities=k8s.V1Capabilities(drop=["ALL"]),
            run_as_non_root=True,
            seccomp_profile=k8s.V1SeccompProfile(type="RuntimeDefault"),
        ),
        env_vars=[
            k8s.V1EnvVar(name="MLFLOW_TRACKING_URI", value="https://mlflow.example.com"),
            k8s.V1EnvVar(name="MLFLOW_EXPERIMENT_NAME", value="{{ params.experiment_name }}"),
            _secret_env("MLFLOW_TRACKING_USERNAME"),
            _secret_env("MLFLOW_TRACKING_PASSWORD"),
        ],
        do_xcom_push=True,
        max_active_tis_per_dag=4,
    ).expand(arguments=hyperparameter_grid())

    pick_best = PythonOperator(task_id="pick_best", python_callable=_pick_best)
    quality_gate = BranchPythonOperator(task_id="quality_gate", python_callable=_gate)
    register = PythonOperator(task_id="register", python_callable=_register)
    skip_registration = EmptyOperator(task_id="skip_registration")
    notify = EmptyOperator(task_id="notify", trigger_rule="none_failed_min_one_success")

    wait_for_data >> data_preparation >> train >> pick_best >> quality_gate >> [register, skip_registration]
    [register, skip_registration] >> notify
