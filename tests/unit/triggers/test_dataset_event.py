"""DatasetEventTrigger: its async generator run directly against a tmp dir and the moto S3 server."""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from airflow_provider_mltrain.datasets.claims import CLAIM_PREFIX
from airflow_provider_mltrain.datasets.listing_coordinator import coordinator
from airflow_provider_mltrain.triggers.dataset_event import SHARED_STREAMS, DatasetEventTrigger

pytestmark = pytest.mark.anyio

CLASSPATH = "airflow_provider_mltrain.triggers.dataset_event.DatasetEventTrigger"
pytest_plugins = ["tests.fixtures.s3_conditional"]


def _land(root: Path, partition: str, files: int = 1, marker: bool = True) -> None:
    directory = root / partition
    directory.mkdir(parents=True, exist_ok=True)
    for i in range(files):
        (directory / f"part-{i}.parquet").write_bytes(b"x" * 10)
    if marker:
        (directory / "_SUCCESS").write_bytes(b"")


def _local(root: Path, **kwargs: Any) -> DatasetEventTrigger:
    kwargs.setdefault("consumer", "digits")
    kwargs.setdefault("success_marker", "_SUCCESS")
    kwargs.setdefault("poke_interval", 1)
    return DatasetEventTrigger(uri=f"{root}/{{partition}}/*.parquet", **kwargs)


async def _events(trigger: DatasetEventTrigger, count: int, timeout: float = 15) -> list[dict[str, Any]]:
    """The first ``count`` events of the trigger's run()."""
    found: list[dict[str, Any]] = []
    gen = trigger.run()

    async def collect() -> None:
        async for event in gen:
            found.append(event.payload)
            if len(found) == count:
                return

    try:
        await asyncio.wait_for(collect(), timeout)
    finally:
        await gen.aclose()
    return found


def test_serialize_round_trips() -> None:
    trigger = DatasetEventTrigger(
        uri="s3://b/digits/{partition}/*.parquet",
        consumer="digits-daily",
        success_marker="_SUCCESS",
        settle_seconds=30,
        modified_after="2026-11-01T00:00:00+00:00",
    )
    classpath, kwargs = trigger.serialize()
    assert classpath == CLASSPATH
    assert kwargs == {
        "uri": "s3://b/digits/{partition}/*.parquet",
        "consumer": "digits-daily",
        "aws_conn_id": "aws_default",
        "region_name": None,
        "min_objects": 1,
        "min_total_bytes": 0,
        "success_marker": "_SUCCESS",
        "settle_seconds": 30,
        "modified_after": "2026-11-01T00:00:00+00:00",
        "poke_interval": 60.0,
    }
    assert DatasetEventTrigger(**kwargs).serialize() == (classpath, kwargs)


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"uri": "s3://b/digits/*.parquet"}, "exactly one {partition}"),
        ({"uri": "s3://b/*/{partition}/"}, "must be fixed"),
        ({"uri": "s3://b/{partition}x/"}, "must end a path segment"),
        ({"uri": "gs://b/{partition}/"}, "unsupported scheme"),
        ({"consumer": "a/b"}, "consumer='a/b' is invalid"),
        ({"settle_seconds": -1}, "settle_seconds=-1 is invalid"),
        ({"poke_interval": 0.1}, "poke_interval=0.1 is invalid"),
        ({"min_objects": 0, "success_marker": None}, "inconsistent"),
    ],
)
def test_bad_arguments_name_the_parameter(kwargs: dict[str, Any], needle: str) -> None:
    arguments = {"uri": "s3://b/d/{partition}/", "consumer": "c", "success_marker": "_SUCCESS", **kwargs}
    with pytest.raises(ValueError, match=needle.replace("{", r"\{").replace("(", r"\(")):
        DatasetEventTrigger(**arguments)


async def test_local_fires_once_per_complete_partition_with_location_and_fingerprint(tmp_path: Path) -> None:
    _land(tmp_path, "2026-11-19", marker=False)  # no marker yet: not complete
    trigger = _local(tmp_path)
    task = asyncio.create_task(_events(trigger, 1))
    await asyncio.sleep(1.5)
    assert not task.done(), "fired for a partition without its success marker"
    _land(tmp_path, "2026-11-20")
    (event,) = await task
    marker = tmp_path / "2026-11-20" / "_SUCCESS"
    assert event["partition"] == "2026-11-20"
    assert event["uri"] == f"{tmp_path}/2026-11-20/*.parquet"
    assert event["location"] == f"file://{tmp_path}/2026-11-20/"
    assert event["fingerprint"].startswith("mtime:")
    assert event["success_marker"] == f"file://{marker}"
    assert (event["total_objects"], event["total_bytes"]) == (1, 10)
    claim = json.loads((tmp_path / "2026-11-20" / f"{CLAIM_PREFIX}digits").read_text())
    assert claim["fingerprint"] == event["fingerprint"]


async def test_restarted_trigger_does_not_fire_again_and_a_relanding_is_not_new(tmp_path: Path) -> None:
    _land(tmp_path, "2026-11-20")
    (first,) = await _events(_local(tmp_path), 1)
    _land(tmp_path, "2026-11-20", files=2)  # landed again on top: the claim is still there
    _land(tmp_path, "2026-11-21")
    # A new instance is what a restarted triggerer runs: it has no memory, only the claims.
    events = await _events(_local(tmp_path), 1)
    assert [e["partition"] for e in events] == ["2026-11-21"], (first, events)


async def test_settle_seconds_waits_for_the_writer_to_stop(tmp_path: Path) -> None:
    _land(tmp_path, "2026-11-20")
    task = asyncio.create_task(_events(_local(tmp_path, settle_seconds=3600), 1))
    await asyncio.sleep(2.5)
    assert not task.done(), "fired for a partition written to seconds ago"
    an_hour_ago = time.time() - 3601
    for path in (tmp_path / "2026-11-20").iterdir():
        os.utime(path, (an_hour_ago, an_hour_ago))
    (event,) = await task
    assert event["partition"] == "2026-11-20"


async def test_another_consumer_gets_the_same_partition_once_too(tmp_path: Path) -> None:
    _land(tmp_path, "2026-11-20")
    (a,) = await _events(_local(tmp_path, consumer="model-a"), 1)
    (b,) = await _events(_local(tmp_path, consumer="model-b"), 1)
    assert a["partition"] == b["partition"] == "2026-11-20"
    assert a["claim"] != b["claim"]


def _race(make: Any, count: int) -> list[list[dict[str, Any]]]:
    """Run ``count`` triggers, each in its own thread and event loop (as separate triggerers would), until
    each has listed a few times; returns each one's events."""
    results: list[list[dict[str, Any]]] = [[] for _ in range(count)]
    start = threading.Barrier(count)

    def one(i: int) -> None:
        async def main() -> None:
            trigger = make()
            gen = trigger.run()
            start.wait()

            async def collect() -> None:
                async for event in gen:
                    results[i].append(event.payload)

            try:
                await asyncio.wait_for(collect(), 4)
            except asyncio.TimeoutError:  # listed for 4 s: long enough for every trigger to see every day
                pass
            finally:
                await gen.aclose()

        asyncio.run(main())

    threads = [threading.Thread(target=one, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def test_local_racing_triggerers_fire_each_partition_once(tmp_path: Path) -> None:
    for day in ("2026-11-20", "2026-11-21", "2026-11-22"):
        _land(tmp_path, day)
    results = _race(lambda: _local(tmp_path), 4)
    fired = sorted(e["partition"] for events in results for e in events)
    assert fired == ["2026-11-20", "2026-11-21", "2026-11-22"], results


@pytest.fixture
def bucket(s3_server: Any) -> str:
    name = f"events-{uuid.uuid4().hex[:12]}"
    s3_server.client().create_bucket(Bucket=name)
    return name


def _land_s3(s3_server: Any, bucket: str, partition: str, marker: bool = True) -> None:
    client = s3_server.client()
    client.put_object(Bucket=bucket, Key=f"digits/{partition}/part-0.parquet", Body=b"x" * 10)
    if marker:
        client.put_object(Bucket=bucket, Key=f"digits/{partition}/_SUCCESS", Body=b"")


def _s3(bucket: str, conn_id: str, **kwargs: Any) -> DatasetEventTrigger:
    kwargs.setdefault("consumer", "digits")
    return DatasetEventTrigger(
        uri=f"s3://{bucket}/digits/{{partition}}/*.parquet",
        aws_conn_id=conn_id,
        success_marker="_SUCCESS",
        poke_interval=1,
        **kwargs,
    )


async def test_s3_not_done_yet_then_fires_with_the_marker_etag(
    s3_server: Any, s3_conn: Any, bucket: str
) -> None:
    trigger = _s3(bucket, s3_conn())
    task = asyncio.create_task(_events(trigger, 1))
    await asyncio.to_thread(_land_s3, s3_server, bucket, "2026-11-19", False)
    await asyncio.sleep(1.5)
    assert not task.done(), "fired without the success marker"
    await asyncio.to_thread(_land_s3, s3_server, bucket, "2026-11-20")
    (event,) = await task
    head = s3_server.client().head_object(Bucket=bucket, Key="digits/2026-11-20/_SUCCESS")
    etag, modified = head["ETag"].strip('"'), head["LastModified"]
    assert event["fingerprint"] == f"etag:{etag}@{modified.isoformat()}"
    assert event["uri"] == f"s3://{bucket}/digits/2026-11-20/*.parquet"
    assert event["location"] == f"s3://{bucket}/digits/2026-11-20/"
    assert event["claim"] == f"s3://{bucket}/digits/2026-11-20/{CLAIM_PREFIX}digits"
    body = s3_server.client().get_object(Bucket=bucket, Key=f"digits/2026-11-20/{CLAIM_PREFIX}digits")
    assert json.loads(body["Body"].read())["fingerprint"] == event["fingerprint"]


async def test_s3_restart_and_relanding_fire_nothing_new(s3_server: Any, s3_conn: Any, bucket: str) -> None:
    conn_id = s3_conn()
    await asyncio.to_thread(_land_s3, s3_server, bucket, "2026-11-20")
    (first,) = await _events(_s3(bucket, conn_id), 1)
    await asyncio.to_thread(_land_s3, s3_server, bucket, "2026-11-20")  # landed again: a new marker ETag
    await asyncio.to_thread(_land_s3, s3_server, bucket, "2026-11-21")
    events = await _events(_s3(bucket, conn_id), 1)
    assert [e["partition"] for e in events] == ["2026-11-21"], (first, events)


def test_s3_racing_triggerers_fire_each_partition_once(
    s3_server: Any, s3_conn: Any, bucket: str, atomic_conditional_puts: None
) -> None:
    conn_id = s3_conn()
    for day in ("2026-11-20", "2026-11-21", "2026-11-22"):
        _land_s3(s3_server, bucket, day)
    results = _race(lambda: _s3(bucket, conn_id), 4)
    fired = sorted(e["partition"] for events in results for e in events)
    assert fired == ["2026-11-20", "2026-11-21", "2026-11-22"], results


async def test_watchers_of_one_bucket_share_one_listing(s3_server: Any, s3_conn: Any, bucket: str) -> None:
    conn_id = s3_conn()
    await asyncio.to_thread(_land_s3, s3_server, bucket, "2026-11-20")
    before = coordinator().s3_requests, coordinator().s3_calls
    triggers = [_s3(bucket, conn_id, consumer=f"model-{i}") for i in range(20)]
    results = await asyncio.gather(*(_events(t, 1) for t in triggers))
    assert all(r[0]["partition"] == "2026-11-20" for r in results)
    requests, calls = coordinator().s3_requests - before[0], coordinator().s3_calls - before[1]
    assert requests >= 20 and calls < requests / 5, (requests, calls)


@pytest.mark.skipif(not SHARED_STREAMS, reason="Airflow < 3.3 has no shared streams")
async def test_shared_stream_one_poll_feeds_every_watcher(tmp_path: Path) -> None:
    from airflow.triggers.shared_stream import SharedStreamManager

    _land(tmp_path, "2026-11-20")
    triggers = [_local(tmp_path, consumer=f"model-{i}") for i in range(3)]
    assert len({t.shared_stream_key() for t in triggers}) == 1
    manager = SharedStreamManager()
    polls_before = coordinator().local_requests

    async def first_event(i: int, trigger: DatasetEventTrigger) -> dict[str, Any]:
        stream = manager.subscribe(trigger_id=i, trigger=trigger, key=trigger.shared_stream_key())
        try:
            async for event in trigger.filter_shared_stream(stream):
                return event.payload
        finally:
            await manager.unsubscribe(i, trigger.shared_stream_key())
        raise AssertionError("the shared stream ended")

    payloads = await asyncio.wait_for(
        asyncio.gather(*(first_event(i, t) for i, t in enumerate(triggers))), 15
    )
    assert sorted(p["consumer"] for p in payloads) == ["model-0", "model-1", "model-2"]
    # One poll loop for the three watchers, not three.
    assert coordinator().local_requests - polls_before <= 2
    await manager.stop_all()
