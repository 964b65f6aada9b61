"""A pod Kueue preempts is replaced, back in the queue, without spending a retry (issue 20, defect 3).

Kueue's pod integration does not set ``DisruptionTarget``: it marks the pod ``TerminationTarget`` (reason
``WorkloadEvictedDueToPreempted``) and deletes it. :class:`tests.fixtures.players.kueue.KueuePlayer` plays
Kueue (the webhook's admission gate, the Workload, admission, the preemption), the
:class:`tests.fixtures.pod_kubelet.Kubelet` runs the pods and ends a deleted one after SIGTERM, and
GPUTrainingPodOperator runs KubernetesPodOperator's real code against the API emulator, sync and deferrable.
"""

from __future__ import annotations

import asyncio

import pytest
from airflow.exceptions import TaskDeferred
from kubernetes.client import models as k8s

from airflow_provider_mltrain.operators import _kueue as kueue
from airflow_provider_mltrain.operators._manifests import QUEUE_LABEL
from airflow_provider_mltrain.operators._preemption import disruption_of, stopped_by_kueue
from airflow_provider_mltrain.operators._triage import GPUTrainingFailure
from airflow_provider_mltrain.operators.gpu_training import GPUTrainingPodOperator
from tests.fixtures.gpu_operator import IMAGE, make_context
from tests.fixtures.k8s_emulator import KubernetesEmulator
from tests.fixtures.players.kueue import ADMISSION_GATE, KueuePlayer
from tests.fixtures.pod_kubelet import RESULT, Kubelet, serve_xcom_from_pods
from tests.unit.operators.test_gpu_training_preemption import _first_event, logged, run

PREEMPTED = (
    "WorkloadEvictedDueToPreempted: Preempted to accommodate a workload (UID: "
    "5c0e6a57-0000-4000-8000-000000000001, JobUID: UNKNOWN) due to prioritization in the ClusterQueue"
)


@pytest.fixture
def xcom_from_pod(k8s_emulator: KubernetesEmulator, monkeypatch: pytest.MonkeyPatch) -> None:
    serve_xcom_from_pods(k8s_emulator, monkeypatch)


@pytest.fixture(params=["sync", "deferrable"])
def mode(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.mark.parametrize("ending", ["kueue_preempted", "kueue_preempted_gone"])
def test_a_kueue_preemption_gets_a_replacement_pod_back_in_the_queue(
    k8s_emulator, xcom_from_pod, mode, ending, caplog, capfd
):
    """``kueue_preempted_gone``: the pod is gone before the operator looks again; Kueue's Stopped event
    on it still says it was preempted."""
    kueue = KueuePlayer(k8s_emulator, "pods", admit_on_read=True)
    kubelet = Kubelet(k8s_emulator, [ending, "succeeded"], kueue=kueue)
    caplog.set_level("WARNING")

    result = run(mode, make_context(try_number=1), queue_name="team-a")

    assert result == RESULT
    first, second = kubelet.created
    # The replacement is queued like the first: same labels (the queue's included), gated by Kueue's
    # webhook until Kueue admitted it, a Workload of its own.
    assert second["metadata"]["labels"] == first["metadata"]["labels"]
    assert second["metadata"]["labels"][QUEUE_LABEL] == "team-a"
    assert kueue.admitted == [first["metadata"]["name"], second["metadata"]["name"]]
    assert ADMISSION_GATE in {gate["name"] for gate in kueue.gated[second["metadata"]["name"]]}
    assert not k8s_emulator.exists("pods", first["metadata"]["name"])
    assert (
        f"Pod {first['metadata']['name']} was preempted ({PREEMPTED}; preemptor path: /cluster-a; preemptee "
        "path: /cluster-a); starting replacement 1 of 3 from the checkpoint"
    ) in logged(caplog, capfd)


def test_kueue_preemptions_count_toward_max_preemptions(k8s_emulator, xcom_from_pod, mode):
    kueue = KueuePlayer(k8s_emulator, "pods", admit_on_read=True)
    kubelet = Kubelet(k8s_emulator, ["kueue_preempted", "kueue_preempted"], kueue=kueue)
    with pytest.raises(
        GPUTrainingFailure, match=r"\(WorkloadEvictedDueToPreempted: .* max_preemptions=1 is spent"
    ):
        run(mode, make_context(), queue_name="team-a", max_preemptions=1)
    assert len(kubelet.created) == 2


# -- which Kueue terminations are disruptions -----------------------------------------------------------------


def _terminated(reason: str) -> k8s.V1Pod:
    condition = k8s.V1PodCondition(type="TerminationTarget", status="True", reason=reason, message="by Kueue")
    return k8s.V1Pod(
        metadata=k8s.V1ObjectMeta(name="train-abc"),
        status=k8s.V1PodStatus(phase="Failed", conditions=[condition]),
    )


@pytest.mark.parametrize("reason", kueue.REQUEUE_EVICTION_REASONS)
def test_an_eviction_kueue_requeues_is_a_disruption(reason):
    found = disruption_of(_terminated(f"WorkloadEvictedDueTo{reason}"))
    assert found is not None and found.reason == f"WorkloadEvictedDueTo{reason}"


@pytest.mark.parametrize(
    "reason",
    [
        "WorkloadDeleted",
        "NotAdmitted",
        "NoMatchingWorkload",
        "WorkloadEvictedDueToLocalQueueStopped",
        "WorkloadEvictedDueToClusterQueueStopped",
        "WorkloadEvictedDueToDeactivated",
    ],
)
def test_a_kueue_stop_that_is_not_requeued_is_not_a_disruption(reason):
    """Someone deleted the Workload, drained the queue or deactivated it: a replacement would not run."""
    assert disruption_of(_terminated(reason)) is None


def test_the_stopped_event_of_a_gone_pod_names_a_preemption_only():
    preempted = k8s.CoreV1Event(
        metadata=k8s.V1ObjectMeta(name="e"),
        involved_object=k8s.V1ObjectReference(name="train-abc"),
        reason="Stopped",
        message="Preempted to accommodate a workload (UID: x, JobUID: y) due to Fair Sharing within the cohort",
    )
    deleted = k8s.CoreV1Event(
        metadata=k8s.V1ObjectMeta(name="e"),
        involved_object=k8s.V1ObjectReference(name="train-abc"),
        reason="Stopped",
        message="Workload is deleted",
    )
    found = stopped_by_kueue("train-abc", [deleted, preempted])
    assert found is not None and found.reason == "WorkloadEvictedDueToPreempted"
    assert stopped_by_kueue("train-abc", [deleted]) is None


# -- the pod's Workload: a queue Kueue cannot use fails fast (defect 4, pod integration) ------------------------


def run_watched(mode: str, queue: str) -> None:
    """Execute with the scheduling watch on (unschedulable_timeout_seconds set), which reads the Workload."""
    op = GPUTrainingPodOperator(
        task_id="train",
        image=IMAGE,
        namespace="default",
        get_logs=False,
        queue_name=queue,
        unschedulable_timeout_seconds=30,
        startup_check_interval_seconds=1,
        poll_interval=0.05,
        deferrable=mode == "deferrable",
    )
    try:
        op.execute(make_context())
    except (
        TaskDeferred
    ) as deferred:  # not expected: the watch stays on the worker while Kueue reports a blocker
        asyncio.run(asyncio.wait_for(_first_event(deferred.trigger), timeout=5))
        raise AssertionError("deferred although Kueue reported a blocker") from None


@pytest.mark.parametrize(
    ("player_kwargs", "queue", "said"),
    [
        ({}, "team-typo", "Misconfigured: LocalQueue team-typo doesn't exist"),
        ({"stopped_local_queues": ["team-a"]}, "team-a", "Suspended: LocalQueue team-a is inactive"),
    ],
    ids=["missing-local-queue", "stopped-local-queue"],
)
def test_a_queued_pod_kueue_cannot_admit_fails_fast_naming_the_queue(
    k8s_emulator, xcom_from_pod, mode, monkeypatch, caplog, capfd, player_kwargs, queue, said
):
    monkeypatch.setattr(kueue, "QUEUE_GRACE_S", 0.5)
    KueuePlayer(k8s_emulator, "pods", admit_on_read=True, **player_kwargs)
    kubelet = Kubelet(k8s_emulator, ["succeeded"])
    caplog.set_level("INFO")

    with pytest.raises(GPUTrainingFailure) as failure:
        run_watched(mode, queue)

    [pod] = kubelet.created
    assert f"Pod {pod['metadata']['name']} cannot be admitted by Kueue (queue {queue!r}): {said}" in str(
        failure.value
    )
    assert f"Kueue queue {queue!r}: {said}" in logged(caplog, capfd)
    assert k8s_emulator.list("pods") == []  # deleted: Kueue would admit it later for nobody
