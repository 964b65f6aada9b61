"""The example pipeline's one setting: MLTRAIN_PIPELINE_TRIGGER=scheduled (default) or event (issue 23)."""

from __future__ import annotations

import datetime as dt
import types
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.example_dags import EXAMPLES

PIPELINE = EXAMPLES / "ml_training_pipeline.py"


def _bag(monkeypatch: pytest.MonkeyPatch, **env: str) -> Any:
    from airflow.dag_processing.dagbag import DagBag

    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return DagBag(dag_folder=str(PIPELINE))


def test_scheduled_mode_is_the_default_and_unchanged(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLTRAIN_PIPELINE_TRIGGER", raising=False)
    bag = _bag(monkeypatch)
    assert bag.import_errors == {}
    dag = bag.dags["ml_training_pipeline"]
    assert type(dag.timetable).__name__ == "NullTimetable"
    assert dag.get_task("wait_for_data").uri == (
        "{{ params.data_root }}/{{ params.day or data_day(dag_run) }}/*.parquet"
    )


def test_event_mode_schedules_on_a_watched_partition_asset(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    bag = _bag(monkeypatch, MLTRAIN_PIPELINE_TRIGGER="event", MLTRAIN_PIPELINE_DATA_ROOT=str(tmp_path))
    assert bag.import_errors == {}
    dag = bag.dags["ml_training_pipeline"]
    (asset,) = dag.timetable.asset_condition.objects
    (watcher,) = asset.watchers
    classpath, kwargs = watcher.trigger.serialize()
    assert classpath == "airflow_provider_mltrain.triggers.dataset_event.DatasetEventTrigger"
    assert kwargs["uri"] == f"{tmp_path}/{{partition}}/*.parquet"
    assert kwargs["success_marker"] == "_SUCCESS"
    assert dag.params["data_root"] == str(tmp_path)


def test_event_mode_trains_on_the_newest_triggering_partition(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    bag = _bag(monkeypatch, MLTRAIN_PIPELINE_TRIGGER="event", MLTRAIN_PIPELINE_DATA_ROOT=str(tmp_path))
    dag = bag.dags["ml_training_pipeline"]
    partition_uri = dag.user_defined_macros["partition_uri"]
    (asset,) = dag.timetable.asset_condition.objects

    def event(day: str, minute: int) -> Any:
        payload = {"partition": day, "uri": f"{tmp_path}/{day}/*.parquet"}
        return types.SimpleNamespace(
            extra={"from_trigger": True, "payload": payload},
            timestamp=dt.datetime(2026, 11, 21, 6, minute, tzinfo=dt.timezone.utc),
        )

    params = {"data_root": str(tmp_path), "day": None}
    run = types.SimpleNamespace(
        logical_date=None, run_after=dt.datetime(2026, 11, 22, tzinfo=dt.timezone.utc)
    )
    assert partition_uri({asset: [event("2026-11-21", 5), event("2026-11-20", 1)]}, params, run) == (
        f"{tmp_path}/2026-11-21/*.parquet"
    )
    # A run started by hand in event mode has no triggering event: the day Param's folder, as scheduled.
    assert partition_uri({}, {**params, "day": "2026-11-19"}, run) == f"{tmp_path}/2026-11-19/*.parquet"
    assert partition_uri({}, params, run) == f"{tmp_path}/2026-11-22/*.parquet"


def test_an_unknown_mode_is_a_clear_import_error(monkeypatch: pytest.MonkeyPatch) -> None:
    bag = _bag(monkeypatch, MLTRAIN_PIPELINE_TRIGGER="sqs")
    (message,) = bag.import_errors.values()
    assert "MLTRAIN_PIPELINE_TRIGGER='sqs' is invalid" in message
