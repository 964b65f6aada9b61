"""DatasetTrigger against a real S3 endpoint (moto server on loopback) through the Amazon provider."""

from __future__ import annotations

import asyncio
import uuid
from datetime import datetime, timedelta, timezone

import pytest

from airflow_provider_mltrain.datasets import s3_client_pool
from airflow_provider_mltrain.triggers.dataset import DatasetTrigger
from tests.fixtures.s3 import FlakyProxy

pytestmark = pytest.mark.anyio


@pytest.fixture
def bucket(s3_server):
    name = f"ds-{uuid.uuid4().hex[:12]}"
    s3_server.client().create_bucket(Bucket=name)
    return name


async def _put(s3_server, bucket: str, key: str, body: bytes = b"0123456789") -> None:
    # boto3 is synchronous: keep it off the loop the trigger under test runs on.
    await asyncio.to_thread(s3_server.client().put_object, Bucket=bucket, Key=key, Body=body)


async def test_not_done_yet_then_fires_with_etags(s3_server, s3_conn, bucket):
    conn_id = s3_conn()
    trigger = DatasetTrigger(
        uri=f"s3://{bucket}/daily/2024-05-01/*.parquet",
        aws_conn_id=conn_id,
        min_objects=2,
        success_marker="_SUCCESS",
        poke_interval=0.1,
    )
    task = asyncio.create_task(anext(trigger.run()))
    await asyncio.sleep(1.0)
    assert not task.done(), "fired on an empty bucket"

    await _put(s3_server, bucket, "daily/2024-05-01/part-0.parquet")
    await _put(s3_server, bucket, "daily/2024-05-01/part-1.parquet", b"x" * 5)
    await _put(s3_server, bucket, "daily/2024-05-02/part-0.parquet")  # another day: not ours
    await asyncio.sleep(0.5)
    assert not task.done(), "fired without the success marker"

    await _put(s3_server, bucket, "daily/2024-05-01/_SUCCESS", b"")
    payload = (await asyncio.wait_for(task, 10)).payload
    assert payload["status"] == "success", payload
    assert [o["uri"] for o in payload["objects"]] == [
        f"s3://{bucket}/daily/2024-05-01/part-0.parquet",
        f"s3://{bucket}/daily/2024-05-01/part-1.parquet",
    ]
    assert payload["total_bytes"] == 15
    assert all(len(o["etag"]) == 32 for o in payload["objects"])  # MD5 ETags, quotes stripped
    assert payload["success_marker"] == f"s3://{bucket}/daily/2024-05-01/_SUCCESS"


async def test_stale_objects_before_modified_after_do_not_count(s3_server, s3_conn, bucket):
    await _put(s3_server, bucket, "d/old.csv")
    # S3 timestamps have 1 s resolution: put the cutoff on the next whole second after "old".
    cutoff = (datetime.now(timezone.utc) + timedelta(seconds=1)).replace(microsecond=0)
    trigger = DatasetTrigger(
        uri=f"s3://{bucket}/d/", aws_conn_id=s3_conn(), modified_after=cutoff.isoformat(), poke_interval=0.1
    )
    task = asyncio.create_task(anext(trigger.run()))
    await asyncio.sleep(1.5)
    assert not task.done(), "yesterday's object was counted"
    await _put(s3_server, bucket, "d/new.csv")
    payload = (await asyncio.wait_for(task, 10)).payload
    assert [o["uri"] for o in payload["objects"]] == [f"s3://{bucket}/d/new.csv"]
    assert payload["stale_objects"] == 1


async def test_missing_bucket_is_an_error_event(s3_conn):
    payload = (
        await asyncio.wait_for(
            anext(DatasetTrigger(uri="s3://no-such-bucket-xyz/d/", aws_conn_id=s3_conn()).run()), 10
        )
    ).payload
    assert payload["status"] == "error"
    assert "'no-such-bucket-xyz' does not exist" in payload["message"]
    assert "NoSuchBucket" in payload["cause"]


async def test_missing_credentials_is_an_error_event(s3_server, bucket, monkeypatch, airflow_conn):
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance-metadata probing
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    airflow_conn(
        "nocreds", f'{{"conn_type": "aws", "extra": {{"endpoint_url": "{s3_server.endpoint_url}"}}}}'
    )
    trigger = DatasetTrigger(uri=f"s3://{bucket}/d/", aws_conn_id="nocreds", max_retries=0)
    payload = (await asyncio.wait_for(anext(trigger.run()), 20)).payload
    assert payload["status"] == "error"
    assert "credentials" in payload["message"]


async def test_transient_503s_are_survived(s3_server, s3_conn, bucket):
    await _put(s3_server, bucket, "d/a.csv")
    with FlakyProxy(s3_server.endpoint_url, failures=3) as proxy:
        trigger = DatasetTrigger(
            uri=f"s3://{bucket}/d/", aws_conn_id=s3_conn("flaky_s3", proxy.endpoint_url), retry_backoff=0.05
        )
        payload = (await asyncio.wait_for(anext(trigger.run()), 10)).payload
    assert payload["status"] == "success", payload
    assert payload["total_objects"] == 1
    assert proxy.requests == 4  # three 503s, one success: the trigger (not botocore) retried


async def test_persistent_503s_end_in_an_error_event_with_the_cause(s3_server, s3_conn, bucket):
    with FlakyProxy(s3_server.endpoint_url, failures=100) as proxy:
        trigger = DatasetTrigger(
            uri=f"s3://{bucket}/d/",
            aws_conn_id=s3_conn("down_s3", proxy.endpoint_url),
            max_retries=2,
            retry_backoff=0.05,
        )
        payload = (await asyncio.wait_for(anext(trigger.run()), 10)).payload
    assert payload["status"] == "error"
    assert "3 consecutive transient failures" in payload["message"]
    assert "SlowDown" in payload["cause"]
    assert proxy.requests == 3


async def test_triggers_share_one_client_per_connection(s3_server, s3_conn, bucket):
    conn_id = s3_conn()
    triggers = [
        DatasetTrigger(uri=f"s3://{bucket}/t{i}/", aws_conn_id=conn_id, poke_interval=0.1) for i in range(20)
    ]
    tasks = [asyncio.create_task(anext(t.run())) for t in triggers]
    await asyncio.sleep(1.0)
    assert s3_client_pool.open_client_count() == 1
    for i in range(20):
        await _put(s3_server, bucket, f"t{i}/x")
    events = await asyncio.wait_for(asyncio.gather(*tasks), 10)
    assert [e.payload["status"] for e in events] == ["success"] * 20
    assert s3_client_pool.open_client_count() == 0  # the last trigger out closed it


async def test_sibling_datasets_are_polled_with_one_listing_per_cycle(s3_server, s3_conn, bucket):
    """50 triggers under one parent prefix: a poll cycle costs one ListObjectsV2, not fifty."""
    from airflow_provider_mltrain.datasets.listing_coordinator import coordinator

    with FlakyProxy(s3_server.endpoint_url, failures=0) as proxy:
        conn_id = s3_conn("counted_s3", proxy.endpoint_url)
        triggers = [
            DatasetTrigger(
                uri=f"s3://{bucket}/daily/ds-{i:02d}/",
                aws_conn_id=conn_id,
                success_marker="_SUCCESS",
                poke_interval=0.5,
            )
            for i in range(50)
        ]
        tasks = [asyncio.create_task(anext(t.run())) for t in triggers]
        await asyncio.sleep(1.6)  # the immediate first poll plus about three aligned cycles
        assert not any(t.done() for t in tasks)
        waiting_requests = proxy.requests
        for i in range(50):
            await _put(s3_server, bucket, f"daily/ds-{i:02d}/part-0.parquet")
            await _put(s3_server, bucket, f"daily/ds-{i:02d}/_SUCCESS", b"")
        events = await asyncio.wait_for(asyncio.gather(*tasks), 10)

    assert [e.payload["status"] for e in events] == ["success"] * 50
    assert [e.payload["objects"][0]["uri"] for e in events] == [
        f"s3://{bucket}/daily/ds-{i:02d}/part-0.parquet" for i in range(50)
    ]
    # 50 triggers x 4 polls would be 200 requests listed one by one.
    assert waiting_requests <= 8, waiting_requests
    stats = coordinator()
    assert stats.s3_requests >= 200 and stats.s3_calls < stats.s3_requests / 10


async def test_missing_bucket_reaches_every_coalesced_trigger(s3_conn):
    conn_id = s3_conn()
    triggers = [
        DatasetTrigger(uri=f"s3://no-such-bucket-mltrain/d{i}/", aws_conn_id=conn_id) for i in range(5)
    ]
    events = await asyncio.wait_for(asyncio.gather(*(anext(t.run()) for t in triggers)), 10)
    assert [e.payload["status"] for e in events] == ["error"] * 5
    assert all("does not exist" in e.payload["message"] for e in events)
