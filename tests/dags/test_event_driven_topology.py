"""Event-driven runs on the real topology: DatasetEventTrigger in an AssetWatcher (issue 23).

dag-processor, scheduler (LocalExecutor), api-server and **two triggerers** (capacity 1 each) on SQLite, the
moto S3 server on loopback. The probe DAG is scheduled on an asset with two watchers whose triggers differ
(in a threshold both partitions meet) but share a consumer and a 1 s poll interval, so each triggerer runs one of them and both race for every partition,
as two triggerers of an HA deployment would for one watcher during a failover. Each run records the partitions
of its triggering asset events (XCom).

Asserted: a partition landed -> exactly one run, with that partition; the same partition landed again and the
triggerer restarted -> no second run; a second partition -> a second run. "Nothing more happened" is never a
timed wait: a later sentinel partition is listed in the same listing as the re-landed one, so once the sentinel's
run exists, the re-landed partition has been seen. Run it alone with ``pytest -m topology``.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.airflow_topology import (
    AirflowTopology,
    dead_loopback_endpoint,
    free_port,
    isolated_aws_environment,
    start_topology,
)
from tests.fixtures.s3 import S3Server, aws_connection_json

pytestmark = [pytest.mark.topology, pytest.mark.timeout(900)]
pytest_plugins = ["tests.fixtures.s3_conditional"]

DAG_ID = "event_probe"
# The triggerer's line for each trigger it starts: "trigger %s starting" (apache-airflow-core 3.3.2
# airflow/jobs/triggerer_job_runner.py:1591; 3.2.0 :1213).
STARTED = re.compile(r"trigger ID \d+ starting")
PROBE_DAG = textwrap.dedent(
    '''
    """Runs once per complete partition of s3://$EVENT_PROBE_BUCKET/digits/{partition}/ (test DAG)."""
    from __future__ import annotations

    import datetime as dt
    import os

    from airflow.sdk import DAG, Asset, AssetWatcher, task

    from airflow_provider_mltrain.triggers.dataset_event import DatasetEventTrigger

    BUCKET = os.environ["EVENT_PROBE_BUCKET"]


    def watcher(name: str, min_total_bytes: int) -> AssetWatcher:
        return AssetWatcher(
            name=name,
            trigger=DatasetEventTrigger(
                uri=f"s3://{BUCKET}/digits/{{partition}}/*.parquet",
                consumer="event-probe",
                success_marker="_SUCCESS",
                aws_conn_id="aws_default",
                min_total_bytes=min_total_bytes,
                poke_interval=1.0,
            ),
        )


    PARTITIONS = Asset(
        name="event-probe-partitions",
        uri=f"s3://{BUCKET}/digits/",
        watchers=[watcher("probe-a", 1), watcher("probe-b", 2)],
    )

    with DAG(
        dag_id="event_probe",
        schedule=[PARTITIONS],
        start_date=dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc),
        catchup=False,
        max_active_runs=16,
    ):

        @task
        def record(triggering_asset_events=None) -> list[dict]:
            return [event.extra["payload"] for event in triggering_asset_events[PARTITIONS]]

        record()
    '''
)


@pytest.fixture
def topology(
    tmp_path: Path, s3_server: S3Server, monkeypatch: pytest.MonkeyPatch, atomic_conditional_puts: None
) -> Iterator[tuple[AirflowTopology, str]]:
    for var in [name for name in os.environ if name.startswith("AWS_")]:
        monkeypatch.delenv(var)
    bucket = f"events-{uuid.uuid4().hex[:10]}"
    s3_server.client().create_bucket(Bucket=bucket)
    dag_file = tmp_path / "event_probe.py"
    dag_file.write_text(PROBE_DAG)
    with dead_loopback_endpoint() as dead:
        running = start_topology(
            home=tmp_path / "airflow",
            dag_files=[dag_file],
            connections={"aws_default": aws_connection_json(s3_server.endpoint_url)},
            extra_env={
                **isolated_aws_environment(dead, tmp_path),
                "EVENT_PROBE_BUCKET": bucket,
                # The harness turns scheduling off (tests trigger their own runs); asset-triggered runs are
                # scheduling, and the probe DAG has no other schedule.
                "AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": "True",
                # One trigger per triggerer: the two watchers' triggers run on different triggerers.
                "AIRFLOW__TRIGGERER__CAPACITY": "1",
                "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(free_port()),
            },
            dag_ids=[DAG_ID],
        )
        try:
            _start_second_triggerer(running)
            yield running, bucket
        finally:
            running.stop()


def _start_second_triggerer(topology: AirflowTopology) -> None:
    env = {**topology.env, "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(free_port())}
    with open(topology.log_path("triggerer-2"), "wb") as log:
        topology.procs["triggerer-2"] = subprocess.Popen(
            topology.airflow("triggerer"),
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _restart_first_triggerer(topology: AirflowTopology) -> None:
    import psutil

    proc = topology.procs.pop("triggerer")
    parent = psutil.Process(proc.pid)
    tree = [parent, *parent.children(recursive=True)]
    for process in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.terminate()
    psutil.wait_procs(tree, timeout=30)
    proc.wait(timeout=10)
    topology.start("triggerer")


def _land(s3_server: S3Server, bucket: str, partition: str) -> None:
    client = s3_server.client()
    client.put_object(Bucket=bucket, Key=f"digits/{partition}/part-0.parquet", Body=b"x" * 100)
    client.put_object(Bucket=bucket, Key=f"digits/{partition}/_SUCCESS", Body=b"")


def _runs(topology: AirflowTopology) -> list[dict[str, Any]]:
    return topology.request("GET", f"dags/{DAG_ID}/dagRuns", params={"limit": 100})["dag_runs"]


def _recorded(topology: AirflowTopology, run_id: str) -> list[dict[str, Any]]:
    entry = topology.request(
        "GET", f"dags/{DAG_ID}/dagRuns/{run_id}/taskInstances/record/xcomEntries/return_value"
    )
    return entry["value"]


def _wait_for_partition_run(topology: AirflowTopology, partition: str) -> dict[str, Any]:
    """Wait for the run whose triggering events name ``partition``, and for it to succeed."""

    def find() -> dict[str, Any] | None:
        for run in _runs(topology):
            if run["state"] == "success" and partition in {
                p["partition"] for p in _recorded(topology, run["dag_run_id"])
            }:
                return run
            if run["state"] == "failed":
                raise AssertionError(f"run {run['dag_run_id']} failed\n{topology.diagnostics()}")
        return None

    return topology.wait_for(f"a successful run for partition {partition}", find, timeout=300)


def _wait_until_each_triggerer_runs_a_watcher(topology: AirflowTopology) -> None:
    """Both watchers polling, one on each triggerer (capacity 1), so that they race for each partition: they
    list on the same wall-clock ticks (whole seconds)."""
    for name in ("triggerer", "triggerer-2"):
        topology.wait_for(
            f"the {name} to run a watcher's trigger",
            lambda name=name: STARTED.search(topology.log_path(name).read_text(errors="replace")),
            timeout=120,
        )


def test_one_run_per_partition_across_relanding_restart_and_two_triggerers(
    topology: tuple[AirflowTopology, str], s3_server: S3Server
) -> None:
    airflow, bucket = topology
    with airflow.logs_on_failure():
        airflow.request("PATCH", f"dags/{DAG_ID}", json={"is_paused": False})
        _wait_until_each_triggerer_runs_a_watcher(airflow)

        _land(s3_server, bucket, "2026-11-20")
        first = _wait_for_partition_run(airflow, "2026-11-20")
        (event,) = _recorded(airflow, first["dag_run_id"])
        assert event["uri"] == f"s3://{bucket}/digits/2026-11-20/*.parquet"
        assert event["location"] == f"s3://{bucket}/digits/2026-11-20/"
        assert event["fingerprint"].startswith("etag:")
        assert first["run_type"] == "asset_triggered"

        # The same partition again, then a restart of a triggerer, then a sentinel partition: its run proves
        # that listings after the re-landing and the restart happened (one listing shows both partitions).
        _land(s3_server, bucket, "2026-11-20")
        _restart_first_triggerer(airflow)
        # The restarted triggerer (a fresh log) runs its watcher again, with no memory but the claims.
        _wait_until_each_triggerer_runs_a_watcher(airflow)
        _land(s3_server, bucket, "2026-11-21")
        _wait_for_partition_run(airflow, "2026-11-21")

        runs = _runs(airflow)
        partitions = sorted(p["partition"] for run in runs for p in _recorded(airflow, run["dag_run_id"]))
        assert partitions == ["2026-11-20", "2026-11-21"], runs
        assert len(runs) == 2, runs
