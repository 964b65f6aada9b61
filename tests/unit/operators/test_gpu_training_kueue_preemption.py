"""A pod Kueue preempts is replaced, back in the queue, without spending a retry (issue 20, defect 3).

Kueue's pod integration does not set ``DisruptionTarget``: it marks the pod ``TerminationTarget`` (reason
``WorkloadEvictedDueToPreempted``) and deletes it. :class:`tests.fixtures.players.kueue.KueuePlayer` plays
Kueue (the webhook's admission gate, the Workload, admission, the preemption), the
:class:`tests.fixtures.pod_kubelet.Kubelet` runs the pods and ends a deleted one after SIGTERM, and
GPUTrainingPodOperator runs KubernetesPodOperator's real code against the API emulator, sync and deferrable.
"""

from __future__ import annotations

import pytest
from kubernetes.client import models as k8s

from airflow_provider_mltrain.operators import _kueue as kueue
from airflow_provider_mltrain.operators._manifests import QUEUE_LABEL
from airflow_provider_mltrain.operators._preemption import disruption_of, stopped_by_kueue
from airflow_provider_mltrain.operators._triage import GPUTrainingFailure
from tests.fixtures.gpu_operator import make_context
from tests.fixtures.k8s_emulator import KubernetesEmulator
from tests.fixtures.players.kueue import ADMISSION_GATE, KueuePlayer
from tests.fixtures.pod_kubelet import RESULT, Kubelet, serve_xcom_from_pods
from tests.unit.operators.test_gpu_training_preemption import logged, run

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
