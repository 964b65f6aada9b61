"""GPUTrainingPodOperator with Kueue (``queue_name=``): the queue label, and a pod Kueue holds behind its
admission scheduling gate is reported as waiting for admission, not failed as unschedulable.

As in test_gpu_training_execute, KubernetesPodOperator's real execute code runs; only the calls that would
reach a cluster are replaced.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from airflow.exceptions import TaskDeferred
from kubernetes.client import models as k8s

from airflow_provider_mltrain.operators._manifests import ADMISSION_GATE, QUEUE_LABEL
from airflow_provider_mltrain.operators._triage import GPUTrainingFailure
from airflow_provider_mltrain.operators.gpu_training import GPUTrainingPodOperator
from tests.fixtures.gpu_operator import (
    IMAGE,
    RESULT,
    FakeCluster,
    assert_valid,
    build,
    make_context,
    status_pod,
)


def make_op(**kwargs: Any) -> GPUTrainingPodOperator:
    kwargs.setdefault("task_id", "train")
    kwargs.setdefault("image", IMAGE)
    kwargs.setdefault("namespace", "ml")
    kwargs.setdefault("gpus", 1)
    kwargs.setdefault("queue_name", "team-a")
    return GPUTrainingPodOperator(**kwargs)


def gated_pod() -> k8s.V1Pod:
    """A pod as Kueue's pod integration leaves it until admission: gated, PodScheduled=False."""
    pod = status_pod(phase="Pending", exit_code=None)
    pod.metadata.labels = {QUEUE_LABEL: "team-a"}
    pod.spec.scheduling_gates = [k8s.V1PodSchedulingGate(name=ADMISSION_GATE)]
    pod.status.container_statuses = None
    pod.status.conditions = [
        k8s.V1PodCondition(
            type="PodScheduled",
            status="False",
            reason="SchedulingGated",
            message="Scheduling is blocked due to non-empty scheduling gates",
        )
    ]
    return pod


def unschedulable_pod() -> k8s.V1Pod:
    return status_pod(
        phase="Pending",
        unschedulable="0/4 nodes are available: 4 Insufficient nvidia.com/gpu.",
        exit_code=None,
    )


def fake_clock(mocker, step: int) -> None:
    clock = iter(range(0, 100_000, step))
    mocker.patch(
        "airflow_provider_mltrain.operators._scheduling.time.monotonic", side_effect=lambda: next(clock)
    )
    mocker.patch("airflow_provider_mltrain.operators._scheduling.time.sleep")


def test_queue_name_is_the_kueue_label_of_a_valid_pod(k8s_hook):
    pod = build(make_op(labels={"team": "vision"}))
    assert_valid(pod)
    assert pod["metadata"]["labels"][QUEUE_LABEL] == "team-a"
    assert pod["metadata"]["labels"]["team"] == "vision"
    assert QUEUE_LABEL not in build(make_op(queue_name=None))["metadata"]["labels"]


@pytest.mark.parametrize("bad", ["Team A", "x" * 64, "-a", 3])
def test_a_bad_queue_name_fails_at_parse(bad):
    with pytest.raises(ValueError, match=r"GPUTrainingPodOperator: invalid queue_name=.*Kueue object name"):
        make_op(queue_name=bad)
    with pytest.raises(ValueError, match="invalid queue_name="):
        GPUTrainingPodOperator.partial(task_id="sweep", image=IMAGE, queue_name=bad)


def test_a_long_admission_wait_is_reported_and_never_fails_as_unschedulable(mocker, capsys):
    """Gated far beyond unschedulable_timeout_seconds; admitted; then it runs and the result returns."""
    op = make_op(
        unschedulable_timeout_seconds=5, schedule_timeout_seconds=3600, startup_check_interval_seconds=0
    )
    cluster = FakeCluster(op, mocker, final=status_pod(), xcom=json.dumps(RESULT))
    reads = iter([gated_pod()] * 20)  # 20 reads x 10 s: 200 s behind the gate
    cluster.pm.read_pod.side_effect = lambda pod: next(reads, status_pod())
    fake_clock(mocker, step=10)

    assert op.execute(make_context()) == RESULT

    # The task log (Airflow's structured logger writes to stdout under pytest): said once, with the queue.
    waiting = [line for line in capsys.readouterr().out.splitlines() if "waiting for admission" in line]
    assert len(waiting) == 1 and "'team-a'" in waiting[0]
    cluster.pm.delete_pod.assert_called_once()  # KPO's ordinary cleanup after success, not a fail-fast


def test_the_unschedulable_clock_starts_after_admission(mocker):
    """Gated for 200 s, then unschedulable: the failure comes unschedulable_timeout_seconds after the
    admission, and says why."""
    op = make_op(
        gpus=8,
        unschedulable_timeout_seconds=30,
        schedule_timeout_seconds=3600,
        startup_check_interval_seconds=0,
    )
    cluster = FakeCluster(op, mocker, final=unschedulable_pod(), xcom=None)
    reads = iter([gated_pod()] * 20)
    seen_unschedulable = []

    def read(pod):
        nxt = next(reads, None)
        if nxt is None:
            seen_unschedulable.append(1)
            return unschedulable_pod()
        return nxt

    cluster.pm.read_pod.side_effect = read
    fake_clock(mocker, step=10)

    with pytest.raises(GPUTrainingFailure, match=r"(?s)no node has 8 free 'nvidia.com/gpu'"):
        op.execute(make_context())
    # 30 s at 10 s a read: the first unschedulable read starts the clock; it expires at the fourth.
    assert len(seen_unschedulable) >= 4


def test_deferrable_defers_at_once_while_the_pod_waits_for_admission(mocker, capsys):
    op = make_op(deferrable=True, unschedulable_timeout_seconds=5)
    cluster = FakeCluster(op, mocker, final=gated_pod(), xcom=None)
    sleep = mocker.patch("airflow_provider_mltrain.operators._scheduling.time.sleep")

    with pytest.raises(TaskDeferred):
        op.execute(make_context())

    sleep.assert_not_called()  # no worker slot held while the queue is full
    cluster.pm.delete_pod.assert_not_called()
    assert "waiting for admission" in capsys.readouterr().out
