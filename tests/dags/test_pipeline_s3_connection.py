"""The example pipeline on S3 with the credentials only in the Airflow connection.

The day's data lands on the moto S3 server; ``aws_default`` holds its endpoint and keys. The test
process's own ``AWS_ENDPOINT_URL``/``AWS_ENDPOINT_URL_S3`` point at a dead loopback port and no AWS keys
are set, so anything that bypasses the connection (pandas on ``s3://`` without options, a trainer
that inherits the worker's environment) fails fast instead of reaching the public endpoint. The sensor,
*validate* and *preprocess* (write included) and a local-launcher trainer all reach the data.
"""

from __future__ import annotations

import datetime as dt
import uuid

import pytest

from airflow_provider_mltrain.hooks.mlflow import connection_json
from airflow_provider_mltrain.testing import run_dag, xcom_value
from tests.fixtures.example_dags import load_example_dag
from tests.fixtures.s3 import free_port


@pytest.fixture
def s3_only_through_the_connection(s3_server, s3_conn, monkeypatch):
    """A bucket on moto reachable with the aws_default connection only; returns the bucket name."""
    dead = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", dead)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", dead)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    s3_conn("aws_default")
    bucket = f"digits-{uuid.uuid4().hex[:12]}"
    s3_server.client().create_bucket(Bucket=bucket)
    return bucket


def test_the_environment_alone_cannot_reach_the_data(s3_only_through_the_connection):
    """The guard works: pandas on s3:// without the connection fails (the dead endpoint, no keys)."""
    import pandas as pd

    with pytest.raises(Exception):  # noqa: B017 - botocore/aiohttp raise their own connection errors
        pd.read_parquet(f"s3://{s3_only_through_the_connection}/nothing.parquet")


def test_pipeline_reads_and_writes_s3_through_the_connection(
    s3_only_through_the_connection, s3_server, airflow_db, airflow_conn, mlflow_server, monkeypatch, tmp_path
):
    from gpu_trainer.digits import write_digits

    bucket = s3_only_through_the_connection
    monkeypatch.setenv("AIRFLOW__MLTRAIN__LAUNCHER", "local")
    monkeypatch.setenv("AIRFLOW__MLTRAIN__LOCAL_CHECKPOINT_ROOT", str(tmp_path / "checkpoints"))
    airflow_conn("mlflow_default", connection_json(mlflow_server.uri))
    client = s3_server.client()
    (local,) = write_digits(str(tmp_path / "day"), single_file=True)
    client.upload_file(local, bucket, "digits/2026-11-20/part-0.parquet")
    client.put_object(Bucket=bucket, Key="digits/2026-11-20/_SUCCESS", Body=b"")
    conf = {
        "data_root": f"s3://{bucket}/digits",
        "model_name": f"digits-s3-{tmp_path.name}",
        "experiment_name": f"s3-{tmp_path.name}",
        "epochs": 1,
        "learning_rates": [0.003],
        "hidden_dims": [64],
    }

    dag_run = run_dag(
        load_example_dag("ml_training_pipeline"),
        logical_date=dt.datetime(2026, 11, 20, 6, tzinfo=dt.timezone.utc),
        run_conf=conf,
    )

    assert dag_run.get_task_instance("data_preparation.preprocess").state == "success"
    prepared = client.list_objects_v2(Bucket=bucket, Prefix="digits/2026-11-20/prepared/")
    assert sorted(o["Key"].rsplit("/", 1)[1] for o in prepared.get("Contents", [])) == [
        "train.parquet",
        "val.parquet",
    ]
    assert dag_run.get_task_instance("train", map_index=0).state == "success", "the local trainer"
    result = xcom_value(dag_run, "train", map_index=0)
    assert result["params"]["data"] == f"s3://{bucket}/digits/2026-11-20/prepared"
    assert result["metrics"]["val_accuracy"] > 0.5
    assert dag_run.state == "success"
