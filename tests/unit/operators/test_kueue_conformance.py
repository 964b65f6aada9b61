"""Kueue as it really behaves, for JobSet and TrainJob: what its Workload says reaches the task log, a queue
it cannot use fails fast, and a Kueue preemption counts toward max_preemptions (issue 20, defect 4).

The Workload is written by :class:`tests.fixtures.players.kueue.KueuePlayer` (Kueue's job integration and
scheduler, citing kubernetes-sigs/kueue); JobSet and the kubelet are the scripted :class:`Cluster` of the
lifecycle tests. Both waits run: the synchronous loop over ``kubernetes`` and the trigger over
``kubernetes_asyncio``, against the API emulator.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import pytest

from airflow_provider_mltrain.operators import _manifests as manifests
from airflow_provider_mltrain.operators._training_job import JOBSET, TRAINJOB, TrainingJobLifecycle
from airflow_provider_mltrain.operators._triage import GPUTrainingFailure
from tests.fixtures.k8s_emulator import KubernetesEmulator
from tests.fixtures.players.kueue import KueuePlayer, workload_name
from tests.unit.operators.test_distributed_training_lifecycle import (
    LINEAGE,
    RESULT,
    Cluster,
    _jobset,
    _lifecycle,
    _trigger,
)

GRACE = {"queue_grace_s": 0.05}


def queued(name: str = "train-abc", queue: str = "team-a") -> dict[str, Any]:
    job = _jobset(name, suspend=True)
    job["metadata"]["labels"][manifests.QUEUE_LABEL] = queue
    return job


def queued_trainjob(name: str = "train-abc", queue: str = "team-a") -> dict[str, Any]:
    return {
        "apiVersion": "trainer.kubeflow.org/v1alpha1",
        "kind": "TrainJob",
        "metadata": {
            "name": name,
            "labels": {**manifests.task_labels(LINEAGE), manifests.QUEUE_LABEL: queue},
        },
        "spec": {"runtimeRef": {"name": "torch-distributed"}, "suspend": True, "trainer": {"numNodes": 2}},
    }


def wait_sync(lifecycle: TrainingJobLifecycle, manifest: dict[str, Any]) -> dict[str, Any]:
    name = lifecycle.start(manifest, manifests.task_labels(LINEAGE))
    return lifecycle.wait(name)


def wait_deferred(emulator: KubernetesEmulator, manifest: dict[str, Any], kind=JOBSET, **policy: Any) -> dict:
    """The deferrable path: the operator's start (a create), then the trigger's run until its event."""
    name = _lifecycle(kind, **policy).start(manifest, manifests.task_labels(LINEAGE))
    trigger = _trigger(name, kind)
    trigger.policy.update(policy)

    async def first() -> dict[str, Any]:
        return (await asyncio.wait_for(trigger.run().__anext__(), timeout=20)).payload

    return asyncio.run(first())


def wait(
    mode: str, emulator: KubernetesEmulator, manifest: dict[str, Any], kind=JOBSET, **policy: Any
) -> dict:
    if mode == "sync":
        return wait_sync(_lifecycle(kind, **policy), manifest)
    return wait_deferred(emulator, manifest, kind, **policy)


def logged(caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]) -> str:
    return caplog.text + "".join(capfd.readouterr())


@pytest.fixture(params=["sync", "deferrable"])
def mode(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(autouse=True)
def _info_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)


# -- the player follows Kueue ----------------------------------------------------------------------------


def test_the_workload_is_named_labelled_and_owned_as_kueue_does(k8s_emulator):
    player = KueuePlayer(k8s_emulator)
    created = _lifecycle().client.create(queued())
    [workload] = k8s_emulator.list("workloads")
    uid = created["metadata"]["uid"]
    assert workload["metadata"]["name"] == workload_name("train-abc", uid, "JobSet", "jobset.x-k8s.io")
    assert (
        workload["metadata"]["name"].startswith("jobset-train-abc-")
        and len(workload["metadata"]["name"]) == 22
    )
    assert workload["metadata"]["labels"] == {"kueue.x-k8s.io/job-uid": uid}
    [owner] = workload["metadata"]["ownerReferences"]
    assert (owner["kind"], owner["uid"], owner["controller"]) == ("JobSet", uid, True)
    assert workload["spec"]["queueName"] == "team-a"
    assert "status" not in workload  # nothing said yet: every status field is omitempty
    player.admit("train-abc")
    status = k8s_emulator.get("workloads", workload["metadata"]["name"])["status"]
    assert [c["type"] for c in status["conditions"]] == ["QuotaReserved", "Admitted"]
    assert status["admission"]["clusterQueue"] == "cluster-a"
    assert k8s_emulator.get("jobsets", "train-abc")["spec"]["suspend"] is False


# -- what Kueue says reaches the task log ------------------------------------------------------------------


def test_waiting_for_quota_logs_kueues_reason_and_message(k8s_emulator, mode, caplog, capfd):
    player = KueuePlayer(k8s_emulator)
    cluster = Cluster(k8s_emulator)
    cluster.script(
        player.step("pend"),
        *[cluster.wait] * 3,
        player.step("admit"),
        cluster.pods(),
        cluster.finish(json.dumps(RESULT)),
    )
    end = wait(mode, k8s_emulator, queued(), **GRACE)
    assert end["status"] == "succeeded"
    assert _lifecycle().conclude(end) == RESULT
    assert (
        "JobSet train-abc: waiting for admission (Kueue queue 'team-a': WaitingForQuota: couldn't assign "
        "flavors to pod set node: insufficient unused quota for nvidia.com/gpu in flavor default-flavor, 8 more "
        "needed)"
    ) in logged(caplog, capfd)


# -- a queue Kueue cannot use fails fast ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("player_kwargs", "queue", "said"),
    [
        ({}, "team-typo", "Misconfigured: LocalQueue team-typo doesn't exist"),
        ({"stopped_local_queues": ["team-a"]}, "team-a", "Suspended: LocalQueue team-a is inactive"),
        (
            {"inactive_cluster_queues": ["cluster-a"]},
            "team-a",
            "Suspended: ClusterQueue cluster-a is inactive",
        ),
        ({"legacy": True}, "team-typo", "Inadmissible: LocalQueue team-typo doesn't exist"),
    ],
    ids=["missing-local-queue", "stopped-local-queue", "inactive-cluster-queue", "kueue-before-0.19"],
)
def test_a_queue_kueue_cannot_use_fails_fast_naming_it(
    k8s_emulator, mode, caplog, capfd, player_kwargs, queue, said
):
    KueuePlayer(k8s_emulator, **player_kwargs)
    Cluster(k8s_emulator).script()  # Kueue never admits it: no JobSet step runs

    end = wait(mode, k8s_emulator, queued(queue=queue), **GRACE)

    assert end["status"] == "kueue_blocked"
    with pytest.raises(GPUTrainingFailure) as failure:
        _lifecycle().conclude(end)
    message = str(failure.value)
    assert f"JobSet train-abc cannot be admitted by Kueue (queue {queue!r}): {said}" in message
    assert "kubectl get localqueues" in message
    assert [d for d in k8s_emulator.deletions if d[0] == "jobsets"] == [
        ("jobsets", "default", "train-abc", "Foreground")
    ]
    assert k8s_emulator.list("workloads") == []  # the Workload went with its owner
    # While it waited, the log said why.
    assert f"waiting for admission (Kueue queue {queue!r}: {said})" in logged(caplog, capfd)


def test_a_blocked_queue_that_recovers_within_the_grace_is_admitted(k8s_emulator):
    """A LocalQueue applied right after the DAG: Kueue re-evaluates the Workload and admits it."""
    player = KueuePlayer(k8s_emulator, local_queues={})
    cluster = Cluster(k8s_emulator)

    def queue_created(job: dict[str, Any]) -> None:
        player.local_queues["team-a"] = "cluster-a"
        player.pend(job["metadata"]["name"], "PendingEvaluation", "Workload is pending evaluation")

    cluster.script(
        cluster.wait, queue_created, player.step("admit"), cluster.pods(), cluster.finish(json.dumps(RESULT))
    )
    end = wait_sync(_lifecycle(queue_grace_s=60.0), queued())
    assert end["status"] == "succeeded"


# -- a Kueue preemption is a preemption ------------------------------------------------------------------------


def test_a_kueue_preemption_is_counted_and_logged_and_the_job_resumes(k8s_emulator, mode, caplog, capfd):
    player = KueuePlayer(k8s_emulator)
    cluster = Cluster(k8s_emulator)
    cluster.script(
        player.step("admit"),
        cluster.pods(),
        player.step("preempt"),  # suspended again: its pods go, back in the queue
        *[cluster.wait] * 3,
        player.step("admit"),
        cluster.pods(),
        cluster.finish(json.dumps(RESULT)),
    )

    end = wait(mode, k8s_emulator, queued(), max_preemptions=3, admission_timeout_s=30.0, **GRACE)

    assert (end["status"], end["preemptions"]) == ("succeeded", 1)
    assert _lifecycle().conclude(end) == RESULT
    log = logged(caplog, capfd)
    assert (
        "; preempted by Kueue: Preempted: Preempted to accommodate a workload (UID: "
        "5c0e6a57-0000-4000-8000-000000000001, JobUID: UNKNOWN) due to prioritization in the ClusterQueue"
    ) in log
    assert "; preemption 1 of max_preemptions=3 in this try: re-queued" in log
    assert "not admitted within" not in log
    assert "node set preempted" not in log


@pytest.mark.parametrize("kind", [JOBSET, TRAINJOB], ids=["jobset", "trainjob"])
def test_kueue_preemptions_past_max_preemptions_fail_and_delete_the_job(k8s_emulator, mode, kind):
    plural = kind.plural
    player = KueuePlayer(k8s_emulator, plural)
    cluster = Cluster(k8s_emulator, plural=plural)
    cluster.script(
        player.step("admit"),
        cluster.pods(),
        player.step("preempt"),
        player.step("admit"),
        cluster.pods(),
        player.step("preempt"),
        *[cluster.wait] * 200,
    )
    manifest = queued() if kind is JOBSET else queued_trainjob()

    end = wait(mode, k8s_emulator, manifest, kind, max_preemptions=1, admission_timeout_s=1.0, **GRACE)

    assert end["status"] == "preemptions_exhausted"
    with pytest.raises(GPUTrainingFailure) as failure:
        _lifecycle(kind).conclude(end)
    message = str(failure.value)
    assert (
        f"{kind.kind} train-abc: was preempted 2 times in this try (2 by Kueue, last: Preempted: " in message
    )
    assert "max_preemptions=1 is spent, so the job was deleted" in message
    assert [d for d in k8s_emulator.deletions if d[0] == plural] == [
        (plural, "default", "train-abc", "Foreground")
    ]


def test_waiting_for_re_admission_has_its_own_message_and_clock(k8s_emulator, mode):
    """admission_timeout_seconds counts from the re-queue; the failure says it was preempted, not that it
    never got in."""
    player = KueuePlayer(k8s_emulator)
    cluster = Cluster(k8s_emulator)
    cluster.script(player.step("admit"), cluster.pods(), player.step("preempt"), *[cluster.wait] * 500)

    end = wait(mode, k8s_emulator, queued(), max_preemptions=3, admission_timeout_s=0.2, **GRACE)

    assert end["status"] == "admission_timeout"
    assert end["message"].startswith(
        "JobSet train-abc was preempted by Kueue (Preempted: Preempted to accommodate a workload"
    )
    assert "and not re-admitted within admission_timeout_seconds=0.2" in end["message"]


def test_a_reattached_jobs_earlier_kueue_preemptions_are_not_this_trys(k8s_emulator, caplog):
    player = KueuePlayer(k8s_emulator)
    lifecycle = _lifecycle(max_preemptions=1)
    lifecycle.client.create(queued("train-try1"))
    for _ in range(2):  # an earlier try saw two Kueue preemptions
        player.admit("train-try1")
        player.preempt("train-try1")
    cluster = Cluster(k8s_emulator)
    cluster.script(player.step("admit"), cluster.pods(), cluster.finish(json.dumps(RESULT)))

    end = wait_sync(lifecycle, queued("train-try2"))

    assert "Re-attaching to JobSet train-try1" in caplog.text
    assert lifecycle.preemptions_before == 2
    assert (end["status"], end["preemptions"]) == ("succeeded", 2)


# -- the operator, through dag.test() ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("deferrable", "backend"),
    [(False, "jobset"), (True, "trainjob")],
    ids=["sync-jobset", "deferrable-trainjob"],
)
def test_dag_run_with_a_mistyped_queue_fails_in_seconds_naming_it(
    airflow_db, k8s_emulator, monkeypatch, caplog, capfd, deferrable, backend
):
    import datetime

    from airflow.sdk import DAG

    from airflow_provider_mltrain.operators import _kueue as kueue
    from airflow_provider_mltrain.operators.distributed_training import DistributedTrainingOperator
    from tests.fixtures.airflow_env import run_dag

    monkeypatch.setattr(kueue, "QUEUE_GRACE_S", 0.1)
    plural = "trainjobs" if backend == "trainjob" else "jobsets"
    KueuePlayer(k8s_emulator, plural)
    with DAG(f"kueue_typo_{backend}", schedule=None, start_date=datetime.datetime(2026, 1, 1)) as dag:
        DistributedTrainingOperator(
            task_id="train",
            image="registry.example/trainer:1",
            num_nodes=2,
            checkpoint_uri="s3://bucket/ckpt",
            poll_interval=0.01,
            launcher="kubernetes",
            backend=backend,
            deferrable=deferrable,
            queue_name="team-typo",
            retries=0,
        )

    dag_run = run_dag(dag)

    assert dag_run.get_task_instance("train").state == "failed"
    log = logged(caplog, capfd)
    assert (
        "cannot be admitted by Kueue (queue 'team-typo'): Misconfigured: LocalQueue team-typo doesn't exist"
        in log
    )
    assert k8s_emulator.list(plural) == []


# -- the reading, on Workloads as Kueue writes them --------------------------------------------------------------


@pytest.mark.parametrize(
    ("reason", "message", "blocked"),
    [
        ("Misconfigured", "ClusterQueue cluster-a doesn't exist", True),
        ("Suspended", "ClusterQueue cluster-a is stopped", True),
        (
            "ExceedsMaxQuota",
            "couldn't assign flavors to pod set node: insufficient quota for nvidia.com/gpu",
            True,
        ),
        ("Deactivated", "The workload is deactivated", True),
        ("Inadmissible", "LocalQueue team-a is stopped", True),  # Kueue < 0.19
        ("Inadmissible", "ClusterQueue cluster-a not found", True),
        ("Inadmissible", "couldn't assign flavors to pod set node", False),
        (
            "WaitingForQuota",
            "insufficient unused quota for nvidia.com/gpu in flavor a100, 8 more needed",
            False,
        ),
        ("PendingEvaluation", "Workload is pending evaluation in the scheduling queue", False),
        ("NoMatchingFlavor", "couldn't assign flavors", False),
        ("Pending", "couldn't assign flavors", False),
    ],
)
def test_which_quota_reserved_reasons_are_blockers(reason, message, blocked):
    from airflow_provider_mltrain.operators import _kueue as kueue

    workload = {
        "status": {
            "conditions": [{"type": "QuotaReserved", "status": "False", "reason": reason, "message": message}]
        }
    }
    seen = kueue.view(workload)
    assert (seen.pending, seen.blocked, seen.admitted) == (f"{reason}: {message}", blocked, False)


def test_reads_survive_a_kueue_without_v1beta2_a_missing_role_and_a_blip():
    from airflow_provider_mltrain.operators import _kueue as kueue

    reader = kueue.WorkloadReader()
    assert reader.version == "v1beta2"
    assert reader.failed(404, "Not Found") is True  # Kueue < 0.15: v1beta1 only
    assert reader.version == "v1beta1"
    owned = {"metadata": {"name": "w", "ownerReferences": [{"uid": "u1"}]}}
    assert (
        reader.found([owned, {"metadata": {"name": "other", "ownerReferences": [{"uid": "u2"}]}}], "u1")
        == owned
    )
    assert reader.failed(500, "Internal Server Error") is False  # a blip: the last Workload read still counts
    assert (reader.last("u1"), reader.last("u2"), reader.problem) == (owned, None, None)
    assert reader.failed(403, "Forbidden") is False
    assert reader.version is None  # no more reads
    said = reader.say_problem()
    assert said is not None and said.startswith("403 Forbidden") and "workloads.kueue.x-k8s.io" in said
    assert reader.say_problem() is None  # once


def test_a_queue_drained_under_a_running_job_is_no_preemption_and_fails_fast(
    k8s_emulator, mode, caplog, capfd
):
    """stopPolicy HoldAndDrain: Kueue evicts (LocalQueueStopped) and does not re-queue; the job is not
    counted as preempted and the task fails naming the stopped queue."""
    player = KueuePlayer(k8s_emulator)
    cluster = Cluster(k8s_emulator)
    cluster.script(
        player.step("admit"), cluster.pods(), player.step("stop_local_queue"), *[cluster.wait] * 500
    )

    end = wait(mode, k8s_emulator, queued(), max_preemptions=0, **GRACE)

    assert (end["status"], end["preemptions"]) == ("kueue_blocked", 0)
    assert (
        "cannot be admitted by Kueue (queue 'team-a'): Suspended: LocalQueue team-a is stopped"
        in end["message"]
    )
    assert "preempted by Kueue" not in logged(caplog, capfd)
