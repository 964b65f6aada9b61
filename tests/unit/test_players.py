"""The JobSet and Trainer players write what the upstream controllers write, for the manifests the
operators generate, read back through the real lifecycle over HTTP."""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest
from kubernetes.client import models as k8s

from airflow_provider_mltrain.operators import _manifests as manifests
from airflow_provider_mltrain.operators._training_job import (
    JOBSET,
    TrainingJobClient,
    TrainingJobLifecycle,
    WaitPolicy,
)
from airflow_provider_mltrain.operators._triage import GPUTrainingFailure
from tests.fixtures.k8s_emulator import KubernetesEmulator
from tests.fixtures.players import jobset as js_player
from tests.fixtures.players.jobset import JobSetPlayer
from tests.fixtures.players.trainer import TrainerPlayer
from tests.unit.operators.test_distributed_training_lifecycle import FAST, LINEAGE, RESULT, TRIAGE


def _manifest(max_restarts: int = 0, nodes: int = 2) -> dict[str, Any]:
    pod_spec = k8s.V1PodSpec(
        containers=[k8s.V1Container(name=manifests.NODE_NAME, image="img")], restart_policy="Never"
    )
    return manifests.jobset(
        name="train-abc",
        namespace=None,
        labels=manifests.task_labels(LINEAGE),
        pod_labels={},
        pod_spec=pod_spec,
        num_nodes=nodes,
        max_restarts=max_restarts,
        suspend=False,
    )


def _lifecycle(**policy: Any) -> TrainingJobLifecycle:
    from airflow.providers.cncf.kubernetes.hooks.kubernetes import KubernetesHook

    client = TrainingJobClient(KubernetesHook(conn_id="kubernetes_default").get_conn(), JOBSET, "default")
    return TrainingJobLifecycle(
        client, WaitPolicy(**{**FAST, **policy}), TRIAGE, logging.getLogger("lifecycle")
    )


def _run(manifest: dict[str, Any], **policy: Any) -> dict[str, Any]:
    lifecycle = _lifecycle(**policy)
    name = lifecycle.start(manifest, manifests.task_labels(LINEAGE))
    return lifecycle.conclude(lifecycle.wait(name))


def test_preemption_restart_leaves_restarts_count_towards_max_absent(k8s_emulator: KubernetesEmulator):
    player = JobSetPlayer(k8s_emulator)
    player.script(
        player.run, player.preempt(node=1), player.preempt(node=0), player.succeed(json.dumps(RESULT))
    )

    assert _run(_manifest(max_restarts=0), max_preemptions=5) == RESULT

    # failure_policy.go: RestartJobSetAndIgnoreMaxRestarts never counts; restartsCountTowardsMax is omitempty.
    restarted = [s for s in player.statuses if s["restarts"]]
    assert restarted and all("restartsCountTowardsMax" not in s for s in restarted)
    assert player.statuses[-1]["restarts"] == 2
    restarting = [c for c in player.statuses[2]["conditions"] if c["type"] == "RestartingJobSet"]
    assert restarting[0]["reason"] == f"FailurePolicy_{manifests.PREEMPTION_RULE_NAME}"
    final = k8s_emulator.get("jobsets", "train-abc")["status"]
    assert final["terminalState"] == "Completed"
    assert {"type": "Completed", "status": "True", "reason": "AllJobsCompleted"}.items() <= {
        k: v for c in final["conditions"] if c["type"] == "Completed" for k, v in c.items()
    }.items()


def test_pods_carry_the_jobset_and_job_labels(k8s_emulator: KubernetesEmulator):
    k8s_emulator.create(_manifest())
    player = JobSetPlayer(k8s_emulator)
    player.script(player.run)
    player.step(k8s_emulator.get("jobsets", "train-abc"))
    pods = player.pods()
    assert [p["metadata"]["labels"][js_player.COMPLETION_INDEX] for p in pods] == ["0", "1"]
    labels = pods[0]["metadata"]["labels"]
    assert labels[js_player.JOBSET_NAME] == "train-abc"
    assert labels[js_player.REPLICATED_JOB_NAME] == "node"
    assert labels[js_player.JOB_INDEX] == "0" and labels[js_player.RESTART_ATTEMPT] == "0"
    assert len(labels[js_player.JOB_KEY]) == 40
    assert pods[0]["metadata"]["ownerReferences"][0]["kind"] == "Job"
    assert pods[0]["metadata"]["name"].startswith("train-abc-node-0-0-")


def test_a_first_crash_with_max_restarts_0_is_reached_max_restarts(k8s_emulator: KubernetesEmulator):
    player = JobSetPlayer(k8s_emulator)
    player.script(player.run, player.crash(node=1, exit_code=1, log="Traceback: boom\n"))

    with pytest.raises(GPUTrainingFailure):
        _run(_manifest(max_restarts=0))

    status = k8s_emulator.get("jobsets", "train-abc")["status"]
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    # The rule matches only PodFailurePolicy; a crash is BackoffLimitExceeded: the default RestartJobSet with
    # restartsCountTowardsMax 0 >= maxRestarts 0 fails the set (failure_policy.go:226-233).
    assert failed["reason"] == "ReachedMaxRestarts"
    assert failed["message"] == (
        "jobset failed due to reaching max number of restarts (first failed job: train-abc-node-0)"
    )
    assert status["restarts"] == 0 and "restartsCountTowardsMax" not in status
    assert status["terminalState"] == "Failed"
    job = k8s_emulator.get("jobs", "train-abc-node-0")
    assert job["status"]["conditions"][0]["reason"] == "BackoffLimitExceeded"


def test_a_preemption_fails_the_node_job_by_its_pod_failure_policy(k8s_emulator: KubernetesEmulator):
    k8s_emulator.create(_manifest(max_restarts=1))
    player = JobSetPlayer(k8s_emulator)
    player.script(player.run, player.preempt(node=1))
    js = k8s_emulator.get("jobsets", "train-abc")
    player.step(js)
    old = player.node_pod(1)["metadata"]["name"]
    player.step(js)
    status = k8s_emulator.get("jobsets", "train-abc")["status"]
    assert status["restarts"] == 1 and "restartsCountTowardsMax" not in status
    assert not k8s_emulator.exists("pods", old)  # the previous attempt's Jobs went in the foreground
    assert {p["metadata"]["labels"][js_player.RESTART_ATTEMPT] for p in player.pods()} == {"1"}


def _trainjob(nodes: int = 2) -> dict[str, Any]:
    container = k8s.V1Container(name=manifests.NODE_NAME, image="img", command=["python", "-m", "train"])
    pod_spec = k8s.V1PodSpec(containers=[container], restart_policy="Never")
    return manifests.trainjob(
        name="train-abc",
        namespace=None,
        labels=manifests.task_labels(LINEAGE),
        pod_labels={},
        pod_spec=pod_spec,
        container=container,
        num_nodes=nodes,
        nproc_per_node=1,
        runtime_ref="torch-distributed",
        runtime_kind="ClusterTrainingRuntime",
        suspend=False,
    )


def test_trainjob_with_initializers_reports_the_trainer_leaders_result(k8s_emulator: KubernetesEmulator):
    from airflow.providers.cncf.kubernetes.hooks.kubernetes import KubernetesHook

    from airflow_provider_mltrain.operators._training_job import TRAINJOB

    player = TrainerPlayer(k8s_emulator, initializers=("dataset-initializer", "model-initializer"))
    player.script(player.jobset.run, player.jobset.succeed(json.dumps(RESULT), log="leader log\n"))
    client = TrainingJobClient(KubernetesHook(conn_id="kubernetes_default").get_conn(), TRAINJOB, "default")
    lifecycle = TrainingJobLifecycle(client, WaitPolicy(**FAST), TRIAGE, logging.getLogger("lifecycle"))
    name = lifecycle.start(_trainjob(), manifests.task_labels(LINEAGE))

    # Fails before the fix of issue 20's defect 5: the leader picked was an initializer's pod.
    assert lifecycle.conclude(lifecycle.wait(name)) == RESULT

    # The initializers' pods have job index 0 and completion index 0 too.
    indexed = {
        p["metadata"]["labels"][js_player.REPLICATED_JOB_NAME]
        for p in k8s_emulator.list("pods")
        if p["metadata"]["labels"][js_player.JOB_INDEX] == "0"
        and p["metadata"]["labels"][js_player.COMPLETION_INDEX] == "0"
    }
    assert indexed == {"dataset-initializer", "model-initializer", "node"}
    status = k8s_emulator.get("trainjobs", "train-abc")["status"]
    complete = next(c for c in status["conditions"] if c["type"] == "Complete")
    assert (complete["reason"], complete["message"]) == ("AllJobsCompleted", "jobset completed successfully")
    assert [j["name"] for j in status["jobsStatus"]] == ["dataset-initializer", "model-initializer", "node"]
    assert k8s_emulator.get("jobsets", "train-abc")["metadata"]["ownerReferences"][0]["kind"] == "TrainJob"


# -- the lifecycle against the players (issue 20: status as the upstream controllers write it) ----------


def test_admission_pulling_running_a_counted_restart_and_the_result(k8s_emulator: KubernetesEmulator, caplog):
    player = JobSetPlayer(k8s_emulator)
    player.script(
        player.wait,
        player.admit,
        player.pending(),
        player.run,
        player.crash(node=1, exit_code=1, log="Traceback: CUDA error\n"),
        player.succeed(json.dumps(RESULT), log="leader: epoch 3 val_accuracy 0.93\n"),
    )
    queued = _manifest(max_restarts=2)
    queued["spec"]["suspend"] = True
    queued["metadata"]["labels"][manifests.QUEUE_LABEL] = "team-a"
    caplog.set_level(logging.INFO, logger="lifecycle")

    assert _run(queued, max_restarts=2) == RESULT

    log = caplog.text
    states = [
        "waiting for admission (Kueue queue 'team-a')",
        "pulling image (0 of 2 pods running)",
        "running (2 pods)",
    ]
    positions = [log.index(f"JobSet train-abc: {state}") for state in states]
    assert positions == sorted(positions)
    assert "restart 1 of 2" in log and "JobSet train-abc: finished" in log
    assert "leader: epoch 3 val_accuracy 0.93" in log
    suspended = [c for c in player.statuses[0]["conditions"] if c["type"] == "Suspended"]
    assert (suspended[0]["status"], suspended[0]["reason"]) == ("True", "SuspendedJobs")
    final = k8s_emulator.get("jobsets", "train-abc")["status"]
    assert (final["restarts"], final["restartsCountTowardsMax"]) == (1, 1)


def test_max_preemptions_holds_with_max_restarts_0(k8s_emulator: KubernetesEmulator):
    """Issue 20, defect 2: JobSet leaves restartsCountTowardsMax out while it is 0, so two preemptions read
    {"restarts": 2}; they are preemptions, and max_preemptions=1 ends the try."""
    player = JobSetPlayer(k8s_emulator)
    # The set completes in the end: code that does not count the preemptions returns the result (the
    # test fails) rather than polling for ever.
    waits = [player.wait] * 20
    player.script(
        player.run, player.preempt(node=1), player.preempt(node=0), *waits, player.succeed(json.dumps(RESULT))
    )

    with pytest.raises(GPUTrainingFailure, match="max_preemptions=1 is spent"):
        _run(_manifest(max_restarts=0), max_preemptions=1)


def test_a_first_attempt_crash_says_the_node_and_cause_not_restarts(k8s_emulator: KubernetesEmulator):
    """Issue 20, defect 6: with maxRestarts 0 a first crash is ReachedMaxRestarts; no restart happened."""
    player = JobSetPlayer(k8s_emulator)
    oom = {"exitCode": 137, "reason": "OOMKilled"}
    player.script(
        player.run, player.crash(node=1, exit_code=oom["exitCode"], reason=oom["reason"], log="step 3\n")
    )

    with pytest.raises(GPUTrainingFailure) as failure:
        _run(_manifest(max_restarts=0))

    message = str(failure.value)
    assert "Restarts exhausted" not in message
    assert "Node 1 (pod train-abc-node-0-1-" in message and "OOMKilled" in message
