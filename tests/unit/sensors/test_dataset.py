from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from airflow.sdk.exceptions import AirflowException, AirflowSensorTimeout, AirflowSkipException, TaskDeferred

from airflow_provider_mltrain.sensors.dataset import DEFERRAL_GRACE_SECONDS, DatasetSensor
from airflow_provider_mltrain.triggers.dataset import DatasetTrigger


def _write(path: Path, size: int = 4) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * size)


def test_defers_with_the_right_trigger(tmp_path):
    sensor = DatasetSensor(
        task_id="wait",
        uri=f"file://{tmp_path}/d/*.csv",
        min_objects=2,
        success_marker="_SUCCESS",
        modified_after="2024-05-01 00:00:00+00:00",
        poke_interval=15,
        timeout=600,
    )
    before = datetime.now(timezone.utc)
    with pytest.raises(TaskDeferred) as deferred:
        sensor.execute(context={})
    trigger = deferred.value.trigger
    assert isinstance(trigger, DatasetTrigger)
    assert deferred.value.method_name == "execute_complete"
    assert deferred.value.timeout == timedelta(seconds=600 + DEFERRAL_GRACE_SECONDS)
    classpath, kwargs = trigger.serialize()
    deadline = datetime.fromisoformat(kwargs.pop("deadline"))
    assert before + timedelta(seconds=600) <= deadline <= datetime.now(timezone.utc) + timedelta(seconds=600)
    assert classpath == "airflow_provider_mltrain.triggers.dataset.DatasetTrigger"
    assert kwargs == {
        "uri": f"file://{tmp_path}/d/*.csv",
        "aws_conn_id": "aws_default",
        "region_name": None,
        "min_objects": 2,
        "min_total_bytes": 0,
        "success_marker": "_SUCCESS",
        "modified_after": "2024-05-01T00:00:00+00:00",
        "poke_interval": 15.0,
        "max_retries": 5,
        "retry_backoff": 1.0,
    }


def test_data_already_there_returns_without_deferring(tmp_path):
    _write(tmp_path / "d" / "a.csv", 3)
    sensor = DatasetSensor(task_id="wait", uri=f"{tmp_path}/d/")
    result = sensor.execute(context={})
    assert result["total_objects"] == 1 and result["total_bytes"] == 3
    assert result["objects"][0]["uri"] == f"file://{tmp_path}/d/a.csv"


def test_execute_complete_success_timeout_and_error():
    sensor = DatasetSensor(task_id="wait", uri="s3://bkt/d/")
    ok = {
        "status": "success",
        "uri": "s3://bkt/d/",
        "objects": [{"uri": "s3://bkt/d/a", "size": 1, "modified": "2024-05-01T00:00:00+00:00", "etag": "e"}],
        "total_objects": 1,
        "total_bytes": 1,
        "success_marker": None,
        "stale_objects": 0,
    }
    assert sensor.execute_complete({}, ok)["objects"] == ok["objects"]
    with pytest.raises(AirflowSensorTimeout, match="not complete by"):
        sensor.execute_complete({}, {"status": "timeout", "message": "Dataset s3://bkt/d/ not complete by X"})
    with pytest.raises(AirflowException, match="NoSuchBucket"):
        sensor.execute_complete({}, {"status": "error", "message": "boom", "cause": "NoSuchBucket: x"})


def test_soft_fail_turns_a_deferred_timeout_into_a_skip():
    sensor = DatasetSensor(task_id="wait", uri="s3://bkt/d/", soft_fail=True)
    with pytest.raises(AirflowSkipException):
        sensor.resume_execution(
            "execute_complete", {"event": {"status": "timeout", "message": "not complete by X"}}, {}
        )


def test_poke_mode_times_out(tmp_path):
    sensor = DatasetSensor(
        task_id="wait", uri=f"{tmp_path}/empty/", deferrable=False, poke_interval=1, timeout=0.5
    )
    with pytest.raises(AirflowSensorTimeout):
        sensor.execute(context={})


def test_poke_mode_soft_fail_skips(tmp_path):
    sensor = DatasetSensor(
        task_id="wait",
        uri=f"{tmp_path}/empty/",
        deferrable=False,
        poke_interval=1,
        timeout=0.5,
        soft_fail=True,
    )
    with pytest.raises(AirflowSkipException):
        sensor.execute(context={})


def test_poke_mode_returns_matches_as_xcom(tmp_path):
    _write(tmp_path / "d" / "part-0", 8)
    sensor = DatasetSensor(task_id="wait", uri=f"{tmp_path}/d/part-*", deferrable=False, poke_interval=1)
    assert sensor.execute(context={})["total_bytes"] == 8


def test_reschedule_mode_reschedules(tmp_path):
    from airflow.sdk.exceptions import AirflowRescheduleException

    class _TI:
        def get_first_reschedule_date(self, context):
            return None

    sensor = DatasetSensor(
        task_id="wait", uri=f"{tmp_path}/empty/", deferrable=False, mode="reschedule", poke_interval=30
    )
    with pytest.raises(AirflowRescheduleException):
        sensor.execute(context={"ti": _TI()})  # type: ignore[typeddict-item]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"uri": "gs://bkt/d/"}, "unsupported scheme 'gs'"),
        ({"uri": "gs://bkt/{{ ds }}/"}, "unsupported scheme 'gs'"),
        ({"uri": "relative/path"}, "unsupported scheme"),
        ({"uri": "s3://bkt/d/", "min_objects": -2}, "min_objects=-2"),
        ({"uri": "s3://bkt/d/", "min_objects": 0}, "inconsistent"),
        ({"uri": "s3://bkt/d/", "modified_after": "last tuesday"}, "modified_after='last tuesday'"),
        ({"uri": "s3://bkt/d/", "max_retries": -1}, "max_retries=-1"),
        # A marker outside the dataset: another directory's _SUCCESS would complete this dataset.
        ({"uri": "s3://bkt/d/", "success_marker": "../_SUCCESS"}, "success_marker='../_SUCCESS' is invalid"),
        ({"uri": "s3://bkt/d/", "success_marker": "a/../../x"}, "inside it (no '..')"),
        # No busy loop: a floor on the interval between listings.
        (
            {"uri": "s3://bkt/d/", "poke_interval": 0},
            "poke_interval=0 is invalid: expected at least 1 second",
        ),
        (
            {"uri": "s3://bkt/d/", "poke_interval": timedelta(milliseconds=10)},
            "poke_interval=datetime.timedelta",
        ),
    ],
)
def test_bad_input_fails_at_construction(kwargs, message):
    with pytest.raises(ValueError) as err:
        DatasetSensor(task_id="wait", **kwargs)
    assert message in str(err.value)


def test_marker_in_a_subdirectory_and_the_minimum_interval_are_accepted():
    sensor = DatasetSensor(task_id="wait", uri="s3://bkt/d/", success_marker="meta/_SUCCESS", poke_interval=1)
    assert (sensor.success_marker, sensor.poke_interval) == ("meta/_SUCCESS", 1.0)


def test_templated_values_are_accepted_at_construction():
    sensor = DatasetSensor(
        task_id="wait",
        uri="s3://ml-datasets/daily/{{ ds }}/",
        modified_after="{{ data_interval_start }}",
    )
    assert sensor.template_fields == ("uri", "modified_after")
    assert sensor.deferrable is True  # deferrable by default, see the module docstring
