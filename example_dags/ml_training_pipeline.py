"""
### ML training pipeline: data arrives -> sweep -> pick best -> quality gate -> register -> notify

The production pipeline of `airflow-provider-mltrain`, end to end:

1. **wait_for_data** (`DatasetSensor`, deferrable): the day's Parquet files and their `_SUCCESS`
   marker under `{{ params.data_root }}/<ds>/`. Waiting costs a triggerer slot, not a worker.
2. **data_preparation**: *validate* (label column, no missing values, every class present) and
   *preprocess* (stratified train/val split, features left raw) into `<ds>/prepared/`. The
   trainer fits the feature scaling on the train split and logs it inside the model, so the
   registered model scores raw features.
3. **hyperparameter_grid** -> **train** (`GPUTrainingPodOperator.partial().expand()`): one GPU pod
   per combination, each an MLflow run; a retried pod resumes from its checkpoint.
4. **pick_best**: the run with the best `val_accuracy`, with a comparison of all of them in the log.
5. **score_champion** (`python -m gpu_trainer.evaluate` in a `GPUTrainingPodOperator`): the model
   holding the `champion` alias scored on today's val split, so the gate compares like for like.
   **quality_gate** (`ModelQualityBranchOperator`): absolute gates and the improvement over the
   re-scored champion (its report shows the recorded and re-scored numbers); -> **register**
   (`MLflowRegisterOperator`, alias `champion`) or **skip_registration**.
6. **notify**: runs whichever branch was taken and reports the decision.

The same file runs on Kubernetes and on a laptop. What differs is configuration, not code:
the launcher (`AIRFLOW__MLTRAIN__LAUNCHER=local` runs trainers as local processes), the
`mlflow_default` connection (a tracking server or a local SQLite store) and the `data_root` Param
(`s3://...` or `file://...`). Kubernetes settings live in `KUBERNETES` below.

**Data access**: every `s3://` read and write goes through the `aws_default` connection (its
credentials and `endpoint_url`), never the worker's environment: the sensor, *validate* and
*preprocess* use it directly, a local trainer gets it in its own environment, and training pods read
the `data_secret` Secret (or use a service account with a cloud identity).

**Running it**: there is no schedule (`schedule=None`), so unpausing starts nothing; trigger a run
with a configuration, e.g.
`airflow dags trigger ml_training_pipeline --logical-date 2026-11-20 --conf '{"data_root": "s3://my-bucket/digits"}'`
(the REST API: `POST /api/v2/dags/ml_training_pipeline/dagRuns` with `logical_date` and `conf`).
The run trains on the `<data_root>/<day>/` folder, where the day is the `day` Param, else the run's
logical date, else the day it was triggered. For a daily pipeline set `schedule="@daily"`.

**Event-driven instead**: with `MLTRAIN_PIPELINE_TRIGGER=event` (an environment variable every Airflow
component reads when it parses this file; or edit `PIPELINE_TRIGGER` below) a run starts when a day's
partition under `MLTRAIN_PIPELINE_DATA_ROOT` (default `s3://ml-datasets/digits`) is complete: an
`AssetWatcher` with a `DatasetEventTrigger` lists the partitions on the triggerer and fires once per new
`<day>/` with its `_SUCCESS` marker. The run reads the partition from its triggering asset event;
`wait_for_data` then succeeds on its first check. A run triggered by hand in this mode still trains on the
`day` Param's folder.
"""

from __future__ import annotations

import datetime as dt
import itertools
import logging
import os
from typing import Any

from airflow.providers.standard.operators.empty import EmptyOperator
from airflow.sdk import DAG, Asset, AssetWatcher, Param, TaskGroup, get_current_context, task

from airflow_provider_mltrain.operators.gpu_training import GPUTrainingPodOperator
from airflow_provider_mltrain.operators.mlflow_register import MLflowRegisterOperator
from airflow_provider_mltrain.operators.model_quality import ModelQualityBranchOperator
from airflow_provider_mltrain.sensors.dataset import DatasetSensor
from airflow_provider_mltrain.triggers.dataset_event import DatasetEventTrigger

log = logging.getLogger(__name__)

# How runs start, the one setting: "scheduled" (runs by hand or on a schedule; wait_for_data waits inside the
# run) or "event" (a run per newly complete day partition of EVENT_DATA_ROOT). Read at parse time, so set it
# alike for every component (dag-processor, scheduler, workers), as any configuration.
PIPELINE_TRIGGER = os.environ.get("MLTRAIN_PIPELINE_TRIGGER", "scheduled")
if PIPELINE_TRIGGER not in ("scheduled", "event"):
    raise ValueError(
        f"MLTRAIN_PIPELINE_TRIGGER={PIPELINE_TRIGGER!r} is invalid: expected 'scheduled' (the default) or 'event'."
    )
# Event mode watches one data root, known at parse time (a watcher is deployed with the DAG).
EVENT_DATA_ROOT = os.environ.get("MLTRAIN_PIPELINE_DATA_ROOT", "s3://ml-datasets/digits").rstrip("/")

# Everything the cluster needs to know, in one place. The local launcher ignores it (but still
# builds and validates the pod spec, so a mistake here fails on a laptop too).
KUBERNETES: dict[str, Any] = {
    "namespace": "ml-training",
    "image": "ghcr.io/acme/mltrain-trainer:0.1.0",
    "gpus": 1,
    "gpu_type": ["NVIDIA-A100-SXM4-80GB", "NVIDIA-H100-80GB-HBM3"],
    "cpu": "8",
    "memory": "32Gi",
    "mlflow_secret": "mlflow-credentials",
    # S3 credentials (and endpoint/region) for the trainer: a Secret with AWS_ACCESS_KEY_ID /
    # AWS_SECRET_ACCESS_KEY (/ AWS_SESSION_TOKEN / AWS_ENDPOINT_URL / AWS_DEFAULT_REGION) keys. With a
    # cloud identity instead (IRSA, workload identity) drop it and set "service_account_name".
    "data_secret": "training-data-credentials",
    # Mounted at the image's checkpoint directory (/mltrain/checkpoints) unless mount_path says otherwise.
    "checkpoint_volume": {"claim_name": "training-checkpoints"},
}

# Scoring the champion needs no GPU: the same image and credentials, a CPU-sized pod.
SCORING: dict[str, Any] = {
    **{key: KUBERNETES[key] for key in ("namespace", "image", "mlflow_secret", "data_secret")},
    "cpu": "2",
    "memory": "8Gi",
}

MLFLOW_CONN_ID = "mlflow_default"
AWS_CONN_ID = "aws_default"
LABEL_COLUMN = "label"


def _storage_path(uri: str) -> Any:
    """``uri`` as an Airflow ``ObjectStoragePath``: ``s3://`` through the ``aws_default`` connection (its
    credentials and ``endpoint_url``, never the worker's environment), ``file://`` and plain paths as is."""
    from airflow.sdk import ObjectStoragePath

    if uri.startswith("s3://"):
        return ObjectStoragePath(uri, conn_id=AWS_CONN_ID)
    return ObjectStoragePath(uri if "://" in uri else f"file://{uri}")


def _read_parquet(uri: str) -> Any:
    """Read one Parquet object (``s3://`` or local)."""
    import pandas as pd

    with _storage_path(uri).open("rb") as fh:
        return pd.read_parquet(fh)


def _write_parquet(frame: Any, uri: str) -> None:
    """Write ``frame`` as one Parquet object (``s3://`` or local; local directories are created)."""
    path = _storage_path(uri)
    if not uri.startswith("s3://"):
        path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as fh:
        frame.to_parquet(fh, index=False)


def _data_day(dag_run: Any) -> str:
    """The day folder a run reads: its logical date's, or for a manual run without one the day it ran."""
    return (dag_run.logical_date or dag_run.run_after).strftime("%Y-%m-%d")


# Event mode: the asset whose watcher starts a run per complete day partition. Only built in event mode: an
# Asset with a URI makes Airflow load every provider's URI handlers at parse time (the Amazon provider's
# imports boto3), which a scheduled deployment should not pay on each parse.
DAY_PARTITIONS = (
    None
    if PIPELINE_TRIGGER != "event"
    else Asset(
        name="digits-day-partitions",
        uri=f"{EVENT_DATA_ROOT}/",
        watchers=[
            AssetWatcher(
                name="digits-day-complete",
                trigger=DatasetEventTrigger(
                    uri=f"{EVENT_DATA_ROOT}/{{partition}}/*.parquet",
                    success_marker="_SUCCESS",
                    min_objects=1,
                    # Each day is trained on once by this pipeline, whichever triggerer sees it first.
                    consumer="ml_training_pipeline",
                    aws_conn_id=AWS_CONN_ID,
                    poke_interval=float(os.environ.get("MLTRAIN_PIPELINE_POKE_INTERVAL", "60")),
                ),
            )
        ],
    )
)


def _partition_uri(triggering_asset_events: Any, params: dict[str, Any], dag_run: Any) -> str:
    """The dataset a run trains on: the partition of its triggering asset event (the newest, if Airflow
    folded several into one run), or for a run started by hand the ``day`` Param's folder."""
    events = (
        list(triggering_asset_events.get(DAY_PARTITIONS, ()))
        if triggering_asset_events and DAY_PARTITIONS is not None
        else []
    )
    payloads = [e.extra.get("payload") or {} for e in sorted(events, key=lambda e: e.timestamp)]
    payloads = [p for p in payloads if p.get("uri")]
    if not payloads:
        return f"{params['data_root']}/{params['day'] or _data_day(dag_run)}/*.parquet"
    if len(payloads) > 1:
        log.warning(
            "%d partitions landed before this run started; training on the newest, %s (not on %s)",
            len(payloads),
            payloads[-1]["partition"],
            ", ".join(p["partition"] for p in payloads[:-1]),
        )
    return payloads[-1]["uri"]


with DAG(
    dag_id="ml_training_pipeline",
    description="Daily digits classifier: wait for data, sweep on GPUs, gate on quality, register.",
    doc_md=__doc__,
    # Manual runs only, so a user trying the DAG is not surprised: with "@daily", unpausing it starts a
    # run for the last interval at once, whose sensor waits for a day that may never land while the
    # user's own triggered run queues behind it (max_active_runs=1). For production set "@daily".
    schedule=[DAY_PARTITIONS] if DAY_PARTITIONS is not None else None,
    start_date=dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc),
    catchup=False,
    # One sweep at a time: the GPUs are the limit, and runs of one model would race for "champion".
    max_active_runs=1,
    tags=["ml", "training", "mlflow", "gpu"],
    default_args={
        "owner": "ml-platform",
        "retries": 2,
        "retry_delay": dt.timedelta(minutes=2),
        "execution_timeout": dt.timedelta(hours=2),
    },
    params={
        "data_root": Param(
            EVENT_DATA_ROOT if PIPELINE_TRIGGER == "event" else "s3://ml-datasets/digits",
            type="string",
            description="where daily folders land",
        ),
        "day": Param(
            None,
            type=["null", "string"],
            description="the <data_root>/<day>/ folder to train on (YYYY-MM-DD); default: the run's logical date",
        ),
        "model_name": Param("digits-classifier", type="string", description="registered model name"),
        "experiment_name": Param("digits-daily", type="string"),
        "epochs": Param(5, type="integer", minimum=1),
        "learning_rates": Param([0.003, 0.001], type="array", description="swept"),
        "hidden_dims": Param([128, 256], type="array", description="swept"),
        "min_val_accuracy": Param(0.90, type="number", minimum=0, maximum=1),
        "max_val_loss": Param(0.5, type="number", minimum=0),
        "min_improvement": Param(0.005, type="number", description="over the champion's val_accuracy"),
    },
    render_template_as_native_obj=True,
    user_defined_macros={"data_day": _data_day, "partition_uri": _partition_uri},
) as dag:
    wait_for_data = DatasetSensor(
        task_id="wait_for_data",
        uri=(
            "{{ partition_uri(triggering_asset_events, params, dag_run) }}"
            if PIPELINE_TRIGGER == "event"
            else "{{ params.data_root }}/{{ params.day or data_day(dag_run) }}/*.parquet"
        ),
        success_marker="_SUCCESS",
        min_objects=1,
        aws_conn_id=AWS_CONN_ID,
        poke_interval=60,
        # Deferred, the wait costs a triggerer slot, not a worker; a day that has not landed in 6 hours
        # fails the run with what was missing (a timeout is final: retries do not restart the wait).
        timeout=dt.timedelta(hours=6).total_seconds(),
        # Errors (a missing bucket, refused credentials) fail the try with the cause in the log; two
        # retries 5 minutes apart leave time to fix the connection or create the bucket.
        retries=2,
        retry_delay=dt.timedelta(minutes=5),
    )

    with TaskGroup("data_preparation") as data_preparation:

        @task
        def validate(found: dict[str, Any]) -> list[str]:
            """Check every file before paying for GPUs: label column, no missing values, all classes."""
            uris = [obj["uri"] for obj in found["objects"]]
            for uri in uris:
                frame = _read_parquet(uri)
                if LABEL_COLUMN not in frame.columns:
                    raise ValueError(
                        f"{uri}: no {LABEL_COLUMN!r} column (columns: {list(frame.columns)[:10]})"
                    )
                if frame.isna().any().any():
                    raise ValueError(f"{uri}: {int(frame.isna().sum().sum())} missing values")
                log.info("%s: %d rows, %d classes", uri, len(frame), frame[LABEL_COLUMN].nunique())
            return uris

        @task
        def preprocess(uris: list[str]) -> str:
            """Split train/val (stratified) into ``<ds>/prepared/``, features left raw.

            No scaling here: the trainer fits its standardization on the train split and logs it as
            part of the model, so the registered model scores raw features as they arrive.
            """
            import pandas as pd
            from sklearn.model_selection import train_test_split

            frame = pd.concat([_read_parquet(uri) for uri in uris], ignore_index=True)
            train, val = train_test_split(frame, test_size=0.2, random_state=0, stratify=frame[LABEL_COLUMN])
            out = uris[0].rsplit("/", 1)[0] + "/prepared"
            path = out.removeprefix("file://")
            _write_parquet(train, f"{path}/train.parquet")
            _write_parquet(val, f"{path}/val.parquet")
            log.info("prepared %d train / %d val rows in %s", len(train), len(val), out)
            return path

        prepared = preprocess(validate(wait_for_data.output))

    @task
    def hyperparameter_grid() -> list[dict[str, Any]]:
        """The sweep: every combination of the swept Params (one training pod each)."""
        params = get_current_context()["params"]
        return [
            {"lr": lr, "hidden_dim": hidden, "epochs": params["epochs"], "model": "mlp", "seed": 42}
            for lr, hidden in itertools.product(params["learning_rates"], params["hidden_dims"])
        ]

    train = GPUTrainingPodOperator.partial(
        task_id="train",
        **KUBERNETES,
        mlflow_conn_id=MLFLOW_CONN_ID,
        # A local trainer reads s3:// data with this connection's credentials (in its own environment);
        # pods read KUBERNETES["data_secret"].
        aws_conn_id=AWS_CONN_ID,
        experiment_name="{{ params.experiment_name }}",
        arguments=["--data", "{{ ti.xcom_pull(task_ids='data_preparation.preprocess') }}"],
        max_active_tis_per_dag=4,
    ).expand(hyperparameters=hyperparameter_grid())

    @task(multiple_outputs=True)
    def pick_best(results: list[dict[str, Any]]) -> dict[str, Any]:
        """The run with the best val_accuracy (ties: lower val_loss); logs the whole leaderboard."""
        # Index instead of iterating: iterating a lazy XCom sequence probes one past its end, which the
        # Airflow API client logs as an error.
        results = [results[i] for i in range(len(results))]
        ranked = sorted(results, key=lambda r: (-r["metrics"]["val_accuracy"], r["metrics"]["val_loss"]))
        log.info("%-34s %-8s %-10s %12s %9s", "run_id", "lr", "hidden_dim", "val_accuracy", "val_loss")
        for result in ranked:
            p, m = result["params"], result["metrics"]
            log.info(
                "%-34s %-8s %-10s %12.4f %9.4f",
                result["run_id"],
                p.get("lr"),
                p.get("hidden_dim"),
                m["val_accuracy"],
                m["val_loss"],
            )
        best = ranked[0]
        return {
            "run_id": best["run_id"],
            "model_uri": best["model_uri"],
            "metrics": best["metrics"],
            "params": best["params"],
            "leaderboard": [{"run_id": r["run_id"], **r["metrics"]} for r in ranked],
        }

    best = pick_best(train.output)

    # Like for like: the champion scored on today's holdout, where the data is (a pod, or a local process
    # with the local launcher), so the gate compares two models on the same rows instead of today's
    # challenger with numbers the champion got on its own day's data. Before the first champion exists
    # the scorer writes empty metrics, which the gate reads as "no champion yet".
    score_champion = GPUTrainingPodOperator(
        task_id="score_champion",
        **SCORING,
        mlflow_conn_id=MLFLOW_CONN_ID,
        aws_conn_id=AWS_CONN_ID,
        cmds=["python", "-m", "gpu_trainer.evaluate"],
        arguments=[
            "--model-uri",
            "models:/{{ params.model_name }}@champion",
            "--data",
            "{{ ti.xcom_pull(task_ids='data_preparation.preprocess') }}",
            "--allow-missing-model",
        ],
    )

    quality_gate = ModelQualityBranchOperator(
        task_id="quality_gate",
        metrics=best["metrics"],
        run_id=best["run_id"],
        thresholds={
            "val_accuracy": {"min": "{{ params.min_val_accuracy }}"},
            "val_loss": {"max": "{{ params.max_val_loss }}"},
        },
        champion_model="{{ params.model_name }}",
        champion_alias="champion",
        champion_metrics=score_champion.output,
        min_improvement={"val_accuracy": "{{ params.min_improvement }}"},
        pass_task_ids="register",
        fail_task_ids="skip_registration",
        mlflow_conn_id=MLFLOW_CONN_ID,
    )

    register = MLflowRegisterOperator(
        task_id="register",
        model_name="{{ params.model_name }}",
        run_id=best["run_id"],
        model_uri=best["model_uri"],
        aliases=["champion"],
        tags={"airflow_dag_run": "{{ run_id }}"},
        description="Best of the {{ ds }} sweep (ml_training_pipeline).",
        mlflow_conn_id=MLFLOW_CONN_ID,
    )
    skip_registration = EmptyOperator(task_id="skip_registration")

    @task(trigger_rule="none_failed_min_one_success")
    def notify(best: dict[str, Any]) -> dict[str, Any]:
        """Report what happened, whichever branch ran (swap the log for Slack/e-mail in production)."""
        ti = get_current_context()["ti"]
        report = ti.xcom_pull(task_ids="quality_gate", key="quality_report")
        registered = ti.xcom_pull(task_ids="register")
        summary = {
            "best_run_id": best["run_id"],
            "best_params": best["params"],
            "best_metrics": best["metrics"],
            "registered": registered,
            "quality_report": report,
        }
        if registered:
            log.info(
                "registered %s version %s as %s",
                registered["name"],
                registered["version"],
                registered["aliases"],
            )
        else:
            log.info("quality gate failed: nothing registered")
        return summary

    # The training pods read the prepared data through a template, which adds no dependency by itself.
    wait_for_data >> data_preparation
    prepared >> [train, score_champion]
    quality_gate >> [register, skip_registration] >> notify(best)
