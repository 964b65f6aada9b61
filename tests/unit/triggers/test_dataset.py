from __future__ import annotations

import asyncio
import os
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from airflow.triggers.base import TriggerEvent

from airflow_provider_mltrain.datasets.completeness import (
    parse_modified_after,
    validate_completeness_thresholds,
)
from airflow_provider_mltrain.datasets.location import parse_dataset_uri
from airflow_provider_mltrain.triggers.dataset import DatasetTrigger

pytestmark = pytest.mark.anyio

CLASSPATH = "airflow_provider_mltrain.triggers.dataset.DatasetTrigger"


def _write(path: Path, size: int = 10, mtime: float | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * size)
    if mtime is not None:
        os.utime(path, (mtime, mtime))
    return path


async def _event(trigger: DatasetTrigger, timeout: float = 10) -> dict:
    event = await asyncio.wait_for(anext(trigger.run()), timeout)
    assert isinstance(event, TriggerEvent)
    return event.payload


def test_serialize_is_exact_and_round_trips():
    kwargs = {
        "uri": "s3://ml-datasets/daily/2024-05-01/*.parquet",
        "aws_conn_id": "aws_ml",
        "region_name": "eu-west-1",
        "min_objects": 3,
        "min_total_bytes": 1024,
        "success_marker": "_SUCCESS",
        "modified_after": "2024-05-01T00:00:00+00:00",
        "poke_interval": 30.0,
        "deadline": "2024-05-02T00:00:00+00:00",
        "max_retries": 4,
        "retry_backoff": 0.5,
    }
    trigger = DatasetTrigger(**kwargs)
    assert trigger.serialize() == (CLASSPATH, kwargs)
    classpath, again = DatasetTrigger(**trigger.serialize()[1]).serialize()
    assert (classpath, again) == (CLASSPATH, kwargs)


@pytest.mark.parametrize(
    ("uri", "scheme", "bucket", "root"),
    [
        ("s3://bkt/daily/2024-05-01/", "s3", "bkt", "daily/2024-05-01/"),
        ("s3://bkt/daily/2024-05-01/*.parquet", "s3", "bkt", "daily/2024-05-01/"),
        ("s3://bkt/daily/2024-05-01", "s3", "bkt", "daily/2024-05-01/"),
        ("file:///data/daily/part-*.csv", "file", "", "/data/daily/"),
        ("/data/daily/", "file", "", "/data/daily/"),
    ],
)
def test_parse_dataset_uri(uri, scheme, bucket, root):
    loc = parse_dataset_uri(uri)
    assert (loc.scheme, loc.bucket, loc.root) == (scheme, bucket, root)


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("gs://bkt/x/", "unsupported scheme 'gs'"),
        ("hdfs://nn/x", "unsupported scheme 'hdfs'"),
        ("data/daily/", "unsupported scheme ''"),
        ("s3:///key", "expected s3://<bucket>"),
        ("file://host/data", "absolute path"),
        ("", "non-empty"),
    ],
)
def test_parse_dataset_uri_rejects(uri, message):
    with pytest.raises(ValueError, match="uri=") as err:
        parse_dataset_uri(uri)
    assert message in str(err.value)


def test_glob_semantics():
    star = parse_dataset_uri("s3://bkt/d/*.parquet").regex
    assert star.fullmatch("d/a.parquet")
    assert not star.fullmatch("d/sub/a.parquet")  # * stays within one segment
    assert parse_dataset_uri("s3://bkt/d/**/*.parquet").regex.fullmatch("d/sub/deeper/a.parquet")
    plain = parse_dataset_uri("s3://bkt/d/x").regex
    assert plain.fullmatch("d/x") and plain.fullmatch("d/x/part-0")
    assert not plain.fullmatch("d/xy")  # a prefix match of the name is not the dataset
    assert parse_dataset_uri("s3://bkt/d/part-[0-9].csv").regex.fullmatch("d/part-7.csv")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"min_objects": -1}, "min_objects=-1"),
        ({"min_objects": True}, "min_objects=True"),
        ({"min_total_bytes": "1GB"}, "min_total_bytes='1GB'"),
        ({"success_marker": "*/_SUCCESS"}, "success_marker="),
        ({"min_objects": 0}, "inconsistent"),
    ],
)
def test_validate_completeness_thresholds(kwargs, message):
    args = {"min_objects": 1, "min_total_bytes": 0, "success_marker": None, **kwargs}
    with pytest.raises(ValueError, match="invalid|inconsistent") as err:
        validate_completeness_thresholds(**args)
    assert message in str(err.value)


def test_parse_modified_after():
    assert parse_modified_after("2024-05-01 00:00:00+00:00") == datetime(2024, 5, 1, tzinfo=timezone.utc)
    assert parse_modified_after("2024-05-01T00:00:00") == datetime(2024, 5, 1, tzinfo=timezone.utc)
    with pytest.raises(ValueError, match="modified_after='yesterday'"):
        parse_modified_after("yesterday")


async def test_not_done_yet_then_fires_with_matched_objects(tmp_path):
    trigger = DatasetTrigger(
        uri=f"file://{tmp_path}/daily/*.csv", min_objects=2, success_marker="_SUCCESS", poke_interval=0.05
    )
    task = asyncio.create_task(anext(trigger.run()))
    await asyncio.sleep(0.3)
    assert not task.done(), "the trigger fired before any data existed"

    _write(tmp_path / "daily" / "a.csv", 5)
    _write(tmp_path / "daily" / "b.csv", 7)
    _write(tmp_path / "daily" / "notes.txt", 100)  # does not match the glob
    await asyncio.sleep(0.3)
    assert not task.done(), "fired without the success marker"

    _write(tmp_path / "daily" / "_SUCCESS", 0)
    payload = (await asyncio.wait_for(task, 5)).payload
    assert payload["status"] == "success"
    assert [o["uri"] for o in payload["objects"]] == [
        f"file://{tmp_path}/daily/a.csv",
        f"file://{tmp_path}/daily/b.csv",
    ]
    assert payload["total_objects"] == 2 and payload["total_bytes"] == 12
    assert payload["success_marker"] == f"file://{tmp_path}/daily/_SUCCESS"
    assert payload["objects"][0]["etag"] is None
    datetime.fromisoformat(payload["objects"][0]["modified"])


async def test_partial_data_below_thresholds_does_not_fire(tmp_path):
    _write(tmp_path / "d" / "part-0", 10)
    trigger = DatasetTrigger(
        uri=str(tmp_path / "d") + "/", min_objects=2, min_total_bytes=25, poke_interval=0.05
    )
    task = asyncio.create_task(anext(trigger.run()))
    _write(tmp_path / "d" / "part-1", 10)  # 2 objects, but only 20 bytes
    await asyncio.sleep(0.3)
    assert not task.done()
    _write(tmp_path / "d" / "sub" / "part-2", 10)  # a trailing / includes subdirectories
    payload = (await asyncio.wait_for(task, 5)).payload
    assert payload["total_objects"] == 3 and payload["total_bytes"] == 30


async def test_stale_objects_do_not_count(tmp_path):
    cutoff = datetime.now(timezone.utc) - timedelta(minutes=5)
    yesterday = (cutoff - timedelta(days=1)).timestamp()
    _write(tmp_path / "d" / "old-0.csv", mtime=yesterday)
    _write(tmp_path / "d" / "old-1.csv", mtime=yesterday)
    _write(tmp_path / "d" / "_SUCCESS", 0, mtime=yesterday)  # yesterday's marker does not count either
    trigger = DatasetTrigger(
        uri=f"{tmp_path}/d/*.csv",
        min_objects=1,
        success_marker="_SUCCESS",
        modified_after=cutoff.isoformat(),
        poke_interval=0.05,
    )
    task = asyncio.create_task(anext(trigger.run()))
    await asyncio.sleep(0.3)
    assert not task.done()
    _write(tmp_path / "d" / "new.csv", 3)
    await asyncio.sleep(0.2)
    assert not task.done(), "a stale success marker was accepted"
    _write(tmp_path / "d" / "_SUCCESS", 0)
    payload = (await asyncio.wait_for(task, 5)).payload
    assert [o["uri"].rsplit("/", 1)[1] for o in payload["objects"]] == ["new.csv"]
    assert payload["stale_objects"] == 2


async def test_absolute_deadline_survives_a_triggerer_restart(tmp_path):
    deadline = (datetime.now(timezone.utc) + timedelta(seconds=0.6)).isoformat()
    first = DatasetTrigger(uri=f"{tmp_path}/never/", poke_interval=10, deadline=deadline)
    # The "restart": the triggerer rebuilds the trigger from its serialized kwargs a little later.
    task = asyncio.create_task(anext(first.run()))
    await asyncio.sleep(0.2)
    task.cancel()
    resumed = DatasetTrigger(**first.serialize()[1])
    started = time.monotonic()
    payload = await _event(resumed, timeout=5)
    # Waited only what was left of the original deadline (~0.4 s), not a fresh timeout, and not
    # a full poke_interval either.
    assert time.monotonic() - started < 1.5
    assert payload["status"] == "timeout"
    assert "0/1 objects" in payload["message"]


async def test_local_listing_runs_off_the_event_loop(tmp_path, mocker):
    to_thread = mocker.spy(asyncio, "to_thread")
    _write(tmp_path / "d" / "a", 1)
    payload = await _event(DatasetTrigger(uri=f"{tmp_path}/d/", poke_interval=0.05))
    assert payload["status"] == "success"
    assert to_thread.call_count >= 1
