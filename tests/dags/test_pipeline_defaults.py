"""The example pipeline's scheduling defaults: nothing a user trying it trips on."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from types import SimpleNamespace

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "example_dags"


@pytest.fixture(scope="module")
def pipeline(airflow_db):
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(EXAMPLES / "ml_training_pipeline.py"))
    assert bag.import_errors == {}
    return bag.get_dag("ml_training_pipeline")


def test_unpausing_starts_nothing_and_a_manual_run_does_not_queue_behind_a_scheduled_one(pipeline):
    assert type(pipeline.timetable).__name__ == "NullTimetable"
    assert pipeline.schedule is None


def test_the_sensor_waits_hours_not_half_a_day_and_retries_errors(pipeline):
    sensor = pipeline.get_task("wait_for_data")
    assert sensor.timeout <= dt.timedelta(hours=6).total_seconds()
    # A missing bucket or refused credentials fail one try, not the run: time to fix the connection.
    assert sensor.retries >= 1 and sensor.retry_delay >= dt.timedelta(minutes=1)


def test_the_day_folder_without_a_logical_date_is_the_day_the_run_was_triggered():
    import importlib.util

    spec = importlib.util.spec_from_file_location("pipeline_module", EXAMPLES / "ml_training_pipeline.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    triggered = dt.datetime(2026, 11, 21, 9, 30, tzinfo=dt.timezone.utc)

    assert module._data_day(SimpleNamespace(logical_date=None, run_after=triggered)) == "2026-11-21"
    logical = dt.datetime(2026, 11, 20, tzinfo=dt.timezone.utc)
    assert module._data_day(SimpleNamespace(logical_date=logical, run_after=triggered)) == "2026-11-20"
