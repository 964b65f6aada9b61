"""End to end: ``dag.test()`` (which runs triggers inline) with data appearing after the DAG started."""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path

import pendulum
import pytest

from tests.fixtures.airflow_env import run_dag

pytestmark = pytest.mark.timeout(180)


def _land_data_later(root: Path, delay: float) -> threading.Thread:
    def land() -> None:
        time.sleep(delay)
        (root / "part-0.csv").write_bytes(b"a" * 10)
        (root / "part-1.csv").write_bytes(b"b" * 20)
        (root / "_SUCCESS").write_bytes(b"")

    thread = threading.Thread(target=land, daemon=True)
    thread.start()
    return thread


def _run_dag(dag_id: str, uri: str, outlet_uri: str, **sensor_kwargs):
    from airflow.sdk import DAG, Asset, task

    from airflow_provider_mltrain.sensors.dataset import DatasetSensor

    seen: dict = {}
    with DAG(dag_id, schedule=None, start_date=pendulum.datetime(2024, 5, 1, tz="UTC"), catchup=False) as dag:
        wait = DatasetSensor(
            task_id="wait_for_data",
            uri=uri,
            success_marker="_SUCCESS",
            min_objects=2,
            poke_interval=1,
            outlets=[Asset(name=f"{dag_id}_data", uri=outlet_uri)],
            **sensor_kwargs,
        )

        @task
        def train(dataset: dict) -> int:
            seen.update(dataset)
            return dataset["total_bytes"]

        train(wait.output)
    dr = run_dag(dag, logical_date=pendulum.datetime(2024, 5, 1, tz="UTC"))
    return dr, seen


def _asset_events(outlet_uri: str):
    from airflow.models.asset import AssetEvent, AssetModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        rows = session.scalars(
            select(AssetEvent)
            .join(AssetModel, AssetEvent.asset_id == AssetModel.id)
            .where(AssetModel.uri == outlet_uri)
        ).all()
        return [dict(e.extra or {}) for e in rows]


def test_deferred_sensor_waits_for_data_then_feeds_training(airflow_db, tmp_path):
    root = tmp_path / "daily" / "2024-05-01"
    root.mkdir(parents=True)
    outlet = f"file://{root}"
    started = time.monotonic()
    lander = _land_data_later(root, delay=3)
    dr, seen = _run_dag(
        f"dataset_sensor_{uuid.uuid4().hex[:8]}",
        uri=str(tmp_path) + "/daily/{{ ds }}/*.csv",
        outlet_uri=outlet,
    )
    lander.join()

    assert dr.state == "success"
    assert time.monotonic() - started >= 3, "the sensor succeeded before the data landed"
    ti = next(t for t in dr.get_task_instances() if t.task_id == "wait_for_data")
    assert ti.state == "success"
    # The rendered template and exactly what matched reached the downstream task through XCom.
    assert [o["uri"] for o in seen["objects"]] == [f"file://{root}/part-0.csv", f"file://{root}/part-1.csv"]
    assert seen["total_bytes"] == 30 and seen["success_marker"] == f"file://{root}/_SUCCESS"
    events = _asset_events(outlet)
    assert len(events) == 1
    assert events[0]["total_objects"] == 2 and events[0]["total_bytes"] == 30


def test_dataset_on_s3_appears_during_the_run(airflow_db, s3_server, s3_conn):
    bucket = f"dag-{uuid.uuid4().hex[:10]}"
    client = s3_server.client()
    client.create_bucket(Bucket=bucket)

    def land() -> None:
        time.sleep(3)
        for key, body in (("part-0.csv", b"a" * 10), ("part-1.csv", b"b" * 20), ("_SUCCESS", b"")):
            client.put_object(Bucket=bucket, Key=f"daily/2024-05-01/{key}", Body=body)

    lander = threading.Thread(target=land, daemon=True)
    lander.start()
    dr, seen = _run_dag(
        f"dataset_sensor_s3_{uuid.uuid4().hex[:8]}",
        uri=f"s3://{bucket}/daily/{{{{ ds }}}}/*.csv",
        outlet_uri=f"s3://{bucket}/daily",
        aws_conn_id=s3_conn(),
    )
    lander.join()
    assert dr.state == "success"
    assert seen["total_objects"] == 2 and all(o["etag"] for o in seen["objects"])
    assert _asset_events(f"s3://{bucket}/daily")[0]["total_bytes"] == 30
