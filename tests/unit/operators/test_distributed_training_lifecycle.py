"""DistributedTrainingOperator's lifecycle over HTTP against the Kubernetes API emulator.

The real ``kubernetes`` client (and ``kubernetes_asyncio`` in the trigger) talks to
``tests/fixtures/k8s_emulator.py``; the test plays the JobSet controller, Kueue and the kubelet through
:class:`Cluster`, which advances the job one step each time the code under test reads it. Poll intervals
are tiny, so each scenario takes well under a second of waiting.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
from typing import Any

import pytest

from airflow_provider_mltrain.operators import _manifests as manifests
from airflow_provider_mltrain.operators._training_job import (
    JOBSET,
    TRAINJOB,
    TrainingJobClient,
    TrainingJobLifecycle,
    WaitPolicy,
)
from airflow_provider_mltrain.operators._triage import GPUTrainingFailure, TriageContext
from airflow_provider_mltrain.operators.distributed_training import DistributedTrainingOperator
from airflow_provider_mltrain.triggers.training_job import TrainingJobTrigger
from gpu_trainer import contract
from tests.fixtures.airflow_env import run_dag
from tests.fixtures.k8s_emulator import KubernetesEmulator, pod_object

RESULT = contract.make_result(
    run_id="run-1",
    model_uri="runs:/run-1/model",
    metrics={"val_accuracy": 0.93, "val_loss": 0.2, "train_loss": 0.1, "val_f1": 0.92},
    params={"lr": 0.1},
    resumed_from_epoch=None,
)
LINEAGE = {"dag_id": "d", "dag_run_id": "manual__1", "task_id": "train", "map_index": -1, "try_number": 1}
TRIAGE = TriageContext(
    gpus=8,
    gpu_resource="nvidia.com/gpu",
    gpu_type=(),
    gpu_type_label="nvidia.com/gpu.product",
    image="registry.example/trainer:1",
    memory="64Gi",
    shm_size="8Gi",
)
FAST = {"poll_interval_s": 0.01, "unschedulable_timeout_s": 0.05}


class Cluster:
    """The JobSet controller, Kueue and the kubelet, scripted: each read of the job runs the next step.

    :param emulator: the API emulator.
    :param plural: ``jobsets`` or ``trainjobs`` (a TrainJob's pods carry the JobSet labels too: Kubeflow
        Trainer runs it as a JobSet of the same name).
    :param nodes: pods per attempt.

    The scripted shortcut of :class:`tests.fixtures.players.jobset.JobSetPlayer` (which plays the Jobs,
    the failure policy and the conditions as upstream does; ``tests/unit/test_players.py`` runs the
    lifecycle against it). What this class still does that the JobSet controller does not: the pods are
    owned by the set itself (no child Jobs), named ``<set>-node-0-<node>-a<attempt>`` (upstream
    ``<job>-<index>-<random>``), recreated on each step, without the ``job-key``/``jobset-uid`` labels;
    a restart writes no ``RestartingJobSet`` condition and no ``replicatedJobsStatus``; ``fail`` takes
    any reason (the operators' manifests always have a failurePolicy, so ``FailedJobs`` never happens
    for them upstream).
    """

    def __init__(self, emulator: KubernetesEmulator, plural: str = "jobsets", nodes: int = 2) -> None:
        self.emu = emulator
        self.plural = plural
        self.nodes = nodes
        self.attempt = 0
        self.steps: list[Any] = []
        emulator.on_read(plural, self._advance)

    def script(self, *steps: Any) -> Cluster:
        self.steps.extend(steps)
        return self

    def _advance(self, emu: KubernetesEmulator, job: dict[str, Any]) -> None:
        if self.steps:
            self.steps.pop(0)(job)

    # -- steps -------------------------------------------------------------------------------------

    @staticmethod
    def wait(job: dict[str, Any]) -> None:
        pass

    def admit(self, job: dict[str, Any]) -> None:
        self.emu.patch(self.plural, job["metadata"]["name"], {"spec": {"suspend": False}})

    def pod_name(self, job: dict[str, Any], node: int) -> str:
        return f"{job['metadata']['name']}-node-0-{node}-a{self.attempt}"

    def pods(
        self, *, phase: str = "Running", state: Any = None, conditions: Any = None, only: int | None = None
    ):
        """Create (or replace) the current attempt's pods with this phase and container state."""

        def step(job: dict[str, Any]) -> None:
            for node in range(self.nodes) if only is None else [only]:
                name = self.pod_name(job, node)
                if self.emu.exists("pods", name):
                    self.emu.delete("pods", name)
                index = {manifests.COMPLETION_INDEX_ANNOTATION: str(node)}
                labels = {
                    "jobset.sigs.k8s.io/jobset-name": job["metadata"]["name"],
                    "jobset.sigs.k8s.io/replicatedjob-name": "node",
                    "jobset.sigs.k8s.io/job-index": "0",
                    "jobset.sigs.k8s.io/restart-attempt": str(self.attempt),
                    **index,
                }
                pod_state = state(node) if callable(state) else state
                self.emu.create(
                    pod_object(
                        name,
                        labels=labels,
                        annotations=index,
                        owner=job,
                        phase=phase,
                        state=pod_state if pod_state is not None else {"running": {}},
                        conditions=conditions,
                    )
                )

        return step

    def restart(self, job: dict[str, Any]) -> None:
        for node in range(self.nodes):
            if self.emu.exists("pods", self.pod_name(job, node)):
                self.emu.delete("pods", self.pod_name(job, node))
        self.attempt += 1
        restarts, counted = self._restarts(job)
        self._set_restarts(job, restarts + 1, counted + 1)
        self.pods()(job)

    def preempt(self, job: dict[str, Any]) -> None:
        """Node 1 is evicted (DisruptionTarget): its Job fails with reason PodFailurePolicy and the
        manifest's rule restarts the set with RestartJobSetAndIgnoreMaxRestarts (restarts + 1, the count
        toward maxRestarts unchanged)."""
        restarts, counted = self._restarts(job)
        self.pods(
            phase="Failed",
            state={"terminated": {"exitCode": contract.PREEMPTED_EXIT_CODE, "reason": "Error"}},
            conditions=[{"type": "DisruptionTarget", "status": "True", "reason": "EvictionByEvictionAPI"}],
            only=1,
        )(job)
        for node in range(self.nodes):
            self.emu.delete("pods", self.pod_name(job, node))
        self.attempt += 1
        self._set_restarts(job, restarts + 1, counted)
        self.pods()(job)

    @staticmethod
    def _restarts(job: dict[str, Any]) -> tuple[int, int]:
        status = job.get("status") or {}
        return int(status.get("restarts") or 0), int(status.get("restartsCountTowardsMax") or 0)

    def _set_restarts(self, job: dict[str, Any], restarts: int, counted: int) -> None:
        """As JobSet serializes them: ``restarts`` always, ``restartsCountTowardsMax`` (omitempty) only when
        non-zero (kubernetes-sigs/jobset@08dfbdfd6827:api/jobset/v1alpha2/jobset_types.go:213-218); a
        merge patch's null removes it."""
        self.emu.patch(
            self.plural,
            job["metadata"]["name"],
            {"status": {"restarts": restarts, "restartsCountTowardsMax": counted or None}},
        )

    def _terminal(self, condition: str, reason: str, message: str) -> dict[str, Any]:
        """A finished set's status as JobSet writes it: the condition with its message, ``terminalState``
        (setJobSetCompletedCondition / setJobSetFailedCondition, kubernetes-sigs/jobset@08dfbdfd6827:
        pkg/controllers/jobset_controller.go:1274-1280, pkg/controllers/failure_policy.go:417-423); a
        TrainJob has no terminalState (kubeflow/trainer@8c0f5059bd51:pkg/apis/trainer/v1alpha1/
        trainjob_types.go:506-525) and copies the condition (plugins/jobset/jobset.go:462-469)."""
        status: dict[str, Any] = {
            "conditions": [{"type": condition, "status": "True", "reason": reason, "message": message}]
        }
        if self.plural == "jobsets":
            status["terminalState"] = "Completed" if condition == "Completed" else "Failed"
        return status

    def finish(self, message: str, log: str = "epoch 3 done\n", condition: str = "Completed"):
        def step(job: dict[str, Any]) -> None:
            done = {"terminated": {"exitCode": 0, "reason": "Completed", "message": message}}
            self.pods(
                phase="Succeeded", state=lambda node: done if node == 0 else {"terminated": {"exitCode": 0}}
            )(job)
            self.emu.set_log(self.pod_name(job, 0), log)
            self.emu.patch(
                self.plural,
                job["metadata"]["name"],
                {"status": self._terminal(condition, "AllJobsCompleted", "jobset completed successfully")},
            )

        return step

    def fail(self, reason: str, message: str, states: dict[int, Any], logs: dict[int, str]):
        def step(job: dict[str, Any]) -> None:
            failed = {"terminated": {"exitCode": 1, "reason": "Error"}}
            self.pods(phase="Failed", state=lambda node: states.get(node, failed))(job)
            for node, log in logs.items():
                self.emu.set_log(self.pod_name(job, node), log)
            self.emu.patch(
                self.plural,
                job["metadata"]["name"],
                {"status": self._terminal("Failed", reason, message)},
            )

        return step


def _jobset(name: str = "train-abc", *, suspend: bool = False, labels: dict[str, str] | None = None) -> dict:
    # A JobSet the CRD and JobSet's webhook admit (the emulator runs both on create).
    pod_spec = {"containers": [{"name": "node", "image": "img"}], "restartPolicy": "Never"}
    template = {"spec": {"template": {"spec": pod_spec}}}
    spec: dict[str, Any] = {"replicatedJobs": [{"name": "node", "replicas": 1, "template": template}]}
    if suspend:
        spec["suspend"] = True
    return {
        "apiVersion": "jobset.x-k8s.io/v1alpha2",
        "kind": "JobSet",
        "metadata": {"name": name, "labels": labels or manifests.task_labels(LINEAGE)},
        "spec": spec,
    }


def _lifecycle(kind=JOBSET, **policy: Any) -> TrainingJobLifecycle:
    from airflow.providers.cncf.kubernetes.hooks.kubernetes import KubernetesHook

    client = TrainingJobClient(KubernetesHook(conn_id="kubernetes_default").get_conn(), kind, "default")
    return TrainingJobLifecycle(
        client, WaitPolicy(**{**FAST, **policy}), TRIAGE, logging.getLogger("lifecycle")
    )


def _run(lifecycle: TrainingJobLifecycle, manifest: dict) -> dict:
    name = lifecycle.start(manifest, manifests.task_labels(LINEAGE))
    return lifecycle.conclude(lifecycle.wait(name))


# -- the lifecycle ------------------------------------------------------------------------------------


def test_kueue_admission_pulling_restart_and_result(k8s_emulator, caplog):
    cluster = Cluster(k8s_emulator)
    cluster.script(
        cluster.wait,
        cluster.admit,
        cluster.pods(phase="Pending", state={"waiting": {"reason": "ContainerCreating"}}),
        cluster.pods(),
        cluster.restart,
        cluster.finish(json.dumps(RESULT), log="leader: epoch 3 val_accuracy 0.93\n"),
    )
    queued = _jobset(suspend=True)
    queued["metadata"]["labels"][manifests.QUEUE_LABEL] = "team-a"
    caplog.set_level(logging.INFO, logger="lifecycle")

    assert _run(_lifecycle(max_restarts=2), queued) == RESULT

    log = caplog.text
    states = [
        "waiting for admission (Kueue queue 'team-a')",
        "pulling image (0 of 2 pods running)",
        "running (2 pods)",
        "restart 1 of 2: every node resumes from the shared checkpoint",
        "finished",
    ]
    positions = [log.index(f"JobSet train-abc: {state}") for state in states[:3]]
    assert positions == sorted(positions)
    assert states[3] in log and "JobSet train-abc: finished" in log
    assert "leader: epoch 3 val_accuracy 0.93" in log  # the leader's log tail reached the task log
    assert k8s_emulator.count("POST", "/jobsets") == 1


def test_failure_names_the_node_and_cause_and_restarts_exhausted(k8s_emulator):
    cluster = Cluster(k8s_emulator)
    oom = {"terminated": {"exitCode": 137, "reason": "OOMKilled"}}
    cluster.script(
        cluster.pods(),
        cluster.fail(
            "ReachedMaxRestarts",
            "jobset failed due to reaching max number of restarts",
            states={1: oom},
            # The leader only saw the echo: its collective timed out when node 1 died.
            logs={
                0: "[Rank 0] Watchdog caught collective operation timeout: WorkNCCL(SeqNum=9)\n",
                1: "step 40\n",
            },
        ),
    )
    cluster.attempt = 2
    k8s_emulator.create(_jobset())
    # Two counted restarts, as JobSet writes them (restartsCountTowardsMax is present once non-zero).
    k8s_emulator.patch("jobsets", "train-abc", {"status": {"restarts": 2, "restartsCountTowardsMax": 2}})

    lifecycle = _lifecycle(max_restarts=2)
    with pytest.raises(GPUTrainingFailure) as failure:
        lifecycle.conclude(lifecycle.wait("train-abc"))

    message = str(failure.value)
    assert "JobSet train-abc failed (ReachedMaxRestarts: jobset failed" in message
    assert "Restarts exhausted: 2 of max_restarts=2 used" in message
    assert "Node 1 (pod train-abc-node-0-1-a2): Training container was OOMKilled" in message
    assert "raise memory=" in message


def test_nccl_timeout_alone_is_named_with_its_fix(k8s_emulator):
    cluster = Cluster(k8s_emulator)
    nccl = "RuntimeError: NCCL error in: ProcessGroupNCCL.cpp:1970, remote process exited or there was a network error\n"
    cluster.script(cluster.fail("FailedJobs", "job node-0 failed", states={}, logs={0: nccl, 1: nccl}))
    k8s_emulator.create(_jobset())
    lifecycle = _lifecycle()
    with pytest.raises(GPUTrainingFailure, match=r"(?s)Node 0 .*collective operation.*NCCL_DEBUG=INFO"):
        lifecycle.conclude(lifecycle.wait("train-abc"))


def test_admission_timeout_fails_clearly_and_deletes_the_job(k8s_emulator):
    queued = _jobset(suspend=True)
    queued["metadata"]["labels"][manifests.QUEUE_LABEL] = "team-a"
    lifecycle = _lifecycle(admission_timeout_s=0.05)
    with pytest.raises(GPUTrainingFailure) as failure:
        _run(lifecycle, queued)
    assert "was not admitted within admission_timeout_seconds=0.05 (Kueue queue 'team-a')" in str(
        failure.value
    )
    assert "kubectl get workloads" in str(failure.value)
    assert k8s_emulator.deletions == [("jobsets", "default", "train-abc", "Foreground")]
    assert not k8s_emulator.exists("jobsets", "train-abc")


def test_unschedulable_fails_fast_and_deletes_unless_a_node_is_coming(k8s_emulator):
    no_gpu = [
        {
            "type": "PodScheduled",
            "status": "False",
            "reason": "Unschedulable",
            "message": "0/3 nodes are available: 3 Insufficient nvidia.com/gpu.",
        }
    ]
    cluster = Cluster(k8s_emulator)
    cluster.script(cluster.pods(phase="Pending", state=None, conditions=no_gpu))
    k8s_emulator.create(_jobset())
    lifecycle = _lifecycle()
    with pytest.raises(GPUTrainingFailure) as failure:
        lifecycle.conclude(lifecycle.wait("train-abc"))
    assert "Training pod cannot be scheduled: 0/3 nodes are available: 3 Insufficient nvidia.com/gpu." in str(
        failure.value
    )
    assert "pod train-abc-node-0-0-a0 of JobSet train-abc: gave up after 0.05s unschedulable" in str(
        failure.value
    )
    assert k8s_emulator.deletions[0] == ("jobsets", "default", "train-abc", "Foreground")

    # The same, but the cluster autoscaler is adding a node: the wait goes on until the job runs.
    k8s_emulator.reset()
    cluster = Cluster(k8s_emulator)
    pending = cluster.pods(phase="Pending", state=None, conditions=no_gpu)
    cluster.script(pending, *[cluster.wait] * 12, cluster.pods(), cluster.finish(json.dumps(RESULT)))
    k8s_emulator.create(_jobset())
    k8s_emulator.create(
        {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"name": "scale-up"},
            "involvedObject": {"kind": "Pod", "name": "train-abc-node-0-0-a0"},
            "reason": "TriggeredScaleUp",
        }
    )
    assert _lifecycle().conclude(_lifecycle().wait("train-abc")) == RESULT
    assert not [deleted for deleted in k8s_emulator.deletions if deleted[0] == "jobsets"]


def test_image_pull_backoff_fails_with_the_image_named(k8s_emulator):
    cluster = Cluster(k8s_emulator)
    backoff = {"waiting": {"reason": "ImagePullBackOff", "message": "manifest unknown"}}
    cluster.script(cluster.pods(phase="Pending", state=backoff))
    k8s_emulator.create(_jobset())
    lifecycle = _lifecycle()
    with pytest.raises(
        GPUTrainingFailure, match=r"Training image 'registry.example/trainer:1' cannot be pulled"
    ):
        lifecycle.conclude(lifecycle.wait("train-abc"))
    assert not k8s_emulator.exists("jobsets", "train-abc")


def test_retry_reattaches_to_the_running_job_and_replaces_a_finished_one(k8s_emulator, caplog):
    caplog.set_level(logging.INFO, logger="lifecycle")
    k8s_emulator.create(_jobset("train-try1"))
    other_task = _jobset("other", labels={**manifests.task_labels(LINEAGE), "task_id": "other"})
    k8s_emulator.create(other_task)
    lifecycle = _lifecycle()

    assert lifecycle.start(_jobset("train-try2"), manifests.task_labels(LINEAGE)) == "train-try1"
    assert k8s_emulator.count("POST", "/jobsets") == 0
    assert "Re-attaching to JobSet train-try1" in caplog.text

    k8s_emulator.patch(
        "jobsets", "train-try1", {"status": {"conditions": [{"type": "Failed", "status": "True"}]}}
    )
    assert lifecycle.start(_jobset("train-try2"), manifests.task_labels(LINEAGE)) == "train-try2"
    assert k8s_emulator.deletions == [("jobsets", "default", "train-try1", "Foreground")]
    assert [job["metadata"]["name"] for job in k8s_emulator.list("jobsets")] == ["other", "train-try2"]


def test_result_over_4_kib_is_read_from_the_marker_log_line(k8s_emulator):
    big = {**RESULT, "params": {f"p{i}": "x" * 40 for i in range(120)}}
    text = json.dumps(big, sort_keys=True)
    assert len(text) > contract.TERMINATION_MESSAGE_LIMIT
    log = f"training...\n{contract.RESULT_LOG_MARKER}{text}\nexiting\n"
    cluster = Cluster(k8s_emulator)
    # The kubelet keeps the termination message's last 4 KiB: not JSON any more.
    cluster.script(cluster.finish(text[-contract.TERMINATION_MESSAGE_LIMIT :], log=log))
    k8s_emulator.create(_jobset())
    lifecycle = _lifecycle()
    assert lifecycle.conclude(lifecycle.wait("train-abc")) == big


@pytest.mark.parametrize(
    ("message", "log", "expected"),
    [
        (
            "",
            "no marker\n",
            r"leader pod train-abc-node-0-0-a0 reported no result: its termination message is empty",
        ),
        (
            '{"run_id": 3}',
            "",
            r"trainer result does not follow the contract: missing keys .*termination message",
        ),
        ("", f"{contract.RESULT_LOG_MARKER}{{not json\n", r"trainer result in .* is not valid JSON"),
    ],
)
def test_missing_or_malformed_result_fails_clearly(k8s_emulator, message, log, expected):
    cluster = Cluster(k8s_emulator)
    cluster.script(cluster.finish(message, log=log))
    k8s_emulator.create(_jobset())
    lifecycle = _lifecycle()
    with pytest.raises(Exception, match=expected):
        lifecycle.conclude(lifecycle.wait("train-abc"))


# -- the trigger --------------------------------------------------------------------------------------


def _trigger(name: str = "train-abc", kind=JOBSET) -> TrainingJobTrigger:
    return TrainingJobTrigger(
        name=name,
        namespace="default",
        group=kind.group,
        version=kind.version,
        plural=kind.plural,
        kind=kind.kind,
        policy=WaitPolicy(**FAST).serialize(),
    )


def test_trigger_serializes_to_its_classpath_and_kwargs():
    assert _trigger().serialize() == (
        "airflow_provider_mltrain.triggers.training_job.TrainingJobTrigger",
        {
            "name": "train-abc",
            "namespace": "default",
            "group": "jobset.x-k8s.io",
            "version": "v1alpha2",
            "plural": "jobsets",
            "kind": "JobSet",
            "policy": {
                "poll_interval_s": 0.01,
                "admission_timeout_s": None,
                "unschedulable_timeout_s": 0.05,
                "max_restarts": 0,
                "max_preemptions": None,
                "queue_grace_s": 60.0,
            },
            "kubernetes_conn_id": "kubernetes_default",
            "config_file": None,
            "cluster_context": None,
            "preemptions_before": 0,
        },
    )


def test_trigger_waits_while_running_then_fires_once_the_trainjob_completes(k8s_emulator):
    """The deferrable wait: run() stays pending while the job runs, fires on Complete, and the operator's
    side (conclude, as in execute_complete) reads the result."""
    k8s_emulator.create(
        {
            "apiVersion": "trainer.kubeflow.org/v1alpha1",
            "kind": "TrainJob",
            "metadata": {"name": "train-abc", "labels": manifests.task_labels(LINEAGE)},
            "spec": {"runtimeRef": {"name": "torch-distributed"}},
        }
    )
    cluster = Cluster(k8s_emulator, plural="trainjobs")
    cluster.script(cluster.pods())

    async def scenario() -> dict:
        task = asyncio.ensure_future(_trigger(kind=TRAINJOB).run().__anext__())
        for _ in range(200):  # until the trigger has read the job once: its pods run
            if not cluster.steps:
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.2)
        assert not task.done()  # running: no event yet
        cluster.finish(json.dumps(RESULT), condition="Complete")(k8s_emulator.get("trainjobs", "train-abc"))
        event = await asyncio.wait_for(task, timeout=10)
        return event.payload

    payload = asyncio.run(scenario())
    assert payload["status"] == "succeeded"
    assert payload["name"] == "train-abc"
    assert _lifecycle(TRAINJOB).conclude(payload) == RESULT


def test_trigger_reports_a_vanished_job_and_an_admission_timeout(k8s_emulator):
    async def first(trigger: TrainingJobTrigger) -> dict:
        return (await asyncio.wait_for(trigger.run().__anext__(), timeout=10)).payload

    assert asyncio.run(first(_trigger("absent")))["status"] == "gone"
    k8s_emulator.create(_jobset(suspend=True))
    trigger = _trigger()
    trigger.policy["admission_timeout_s"] = 0.05
    payload = asyncio.run(first(trigger))
    assert payload["status"] == "admission_timeout"
    with pytest.raises(GPUTrainingFailure, match="was not admitted within"):
        _lifecycle().conclude(payload)
    assert k8s_emulator.deletions == [("jobsets", "default", "train-abc", "Foreground")]


def test_trigger_gives_up_on_an_unschedulable_pod_unless_the_autoscaler_scales_up(k8s_emulator):
    no_gpu = [
        {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": "Insufficient gpu"}
    ]
    cluster = Cluster(k8s_emulator)
    cluster.script(cluster.pods(phase="Pending", state=None, conditions=no_gpu))
    k8s_emulator.create(_jobset())

    async def first() -> dict:
        return (await asyncio.wait_for(_trigger().run().__anext__(), timeout=10)).payload

    payload = asyncio.run(first())
    assert (payload["status"], payload["pod"]) == ("unschedulable", "train-abc-node-0-0-a0")
    # The autoscaler's event for that pod: the trigger keeps waiting, and fires when the job finishes.
    k8s_emulator.create(
        {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"name": "scale-up"},
            "involvedObject": {"kind": "Pod", "name": "train-abc-node-0-0-a0"},
            "reason": "TriggeredScaleUp",
        }
    )
    cluster.script(*[cluster.wait] * 10, cluster.pods(), cluster.finish(json.dumps(RESULT)))
    assert asyncio.run(first())["status"] == "succeeded"


# -- the operator, through dag.test() -----------------------------------------------------------------


def _operator(**kwargs: Any) -> DistributedTrainingOperator:
    defaults: dict[str, Any] = {
        "task_id": "train",
        "image": "registry.example/trainer:1",
        "num_nodes": 2,
        "checkpoint_uri": "s3://bucket/ckpt",
        "poll_interval": 0.01,
        "launcher": "kubernetes",
    }
    return DistributedTrainingOperator(**{**defaults, **kwargs})


@pytest.mark.parametrize(
    ("deferrable", "backend", "condition"),
    [(False, "jobset", "Completed"), (True, "trainjob", "Complete")],
    ids=["sync-jobset", "deferrable-trainjob"],
)
def test_dag_run_returns_the_leaders_result(airflow_db, k8s_emulator, deferrable, backend, condition):
    from airflow.sdk import DAG

    from airflow_provider_mltrain.testing import xcom_value

    plural = "trainjobs" if backend == "trainjob" else "jobsets"
    cluster = Cluster(k8s_emulator, plural=plural)
    cluster.script(cluster.admit, cluster.pods(), cluster.finish(json.dumps(RESULT), condition=condition))
    with DAG(f"distributed_{backend}", schedule=None, start_date=datetime.datetime(2026, 1, 1)) as dag:
        _operator(backend=backend, deferrable=deferrable, queue_name="team-a")

    dag_run = run_dag(dag)

    assert dag_run.get_task_instance("train").state == "success"
    assert xcom_value(dag_run, "train") == RESULT
    assert xcom_value(dag_run, "train", "run_id") == "run-1"
    assert xcom_value(dag_run, "train", "metrics") == RESULT["metrics"]
    [created] = k8s_emulator.list(plural)
    assert created["metadata"]["labels"][manifests.QUEUE_LABEL] == "team-a"
    assert created["metadata"]["labels"]["dag_id"] == f"distributed_{backend}"
    assert k8s_emulator.count("POST", f"/{plural}") == 1


def test_kill_and_deferred_timeout_delete_the_job_with_foreground_propagation(k8s_emulator):
    op = _operator()
    k8s_emulator.create(_jobset("train-try1"))
    op._job_name = "train-try1"
    op.on_kill()
    assert k8s_emulator.deletions == [("jobsets", "default", "train-try1", "Foreground")]

    # Deferred past execution_timeout: Airflow resumes the task with "__fail__"; the job goes first.
    k8s_emulator.create(_jobset("train-try2"))

    class _TI:
        dag_id, task_id, map_index, try_number = LINEAGE["dag_id"], "train", -1, 2

    from airflow.models.trigger import TriggerFailureReason
    from airflow.sdk.exceptions import TaskDeferralTimeout

    with pytest.raises(TaskDeferralTimeout):
        op.resume_execution(
            "__fail__",
            {"error": TriggerFailureReason.TRIGGER_TIMEOUT},
            {"ti": _TI(), "run_id": LINEAGE["dag_run_id"]},
        )
    assert k8s_emulator.deletions[-1] == ("jobsets", "default", "train-try2", "Foreground")


def test_execution_timeout_deletes_the_running_job(airflow_db, k8s_emulator):
    from airflow.sdk import DAG

    cluster = Cluster(k8s_emulator)
    cluster.script(cluster.admit, cluster.pods())  # then it runs for ever
    with DAG("distributed_timeout", schedule=None, start_date=datetime.datetime(2026, 1, 1)) as dag:
        _operator(execution_timeout=datetime.timedelta(seconds=2), deferrable=False)

    dag_run = run_dag(dag)

    assert dag_run.get_task_instance("train").state == "failed"
    [deleted] = [d for d in k8s_emulator.deletions if d[0] == "jobsets"]
    assert deleted[3] == "Foreground"
    assert k8s_emulator.list("jobsets") == []
    assert k8s_emulator.list("pods") == []  # the pods named the JobSet as their owner


# -- preemption (issue 11) -----------------------------------------------------------------------------


def test_a_preempted_restart_does_not_spend_max_restarts(k8s_emulator, caplog):
    """Two preemptions and one crash with max_restarts=1: the preemptions are counted apart, the task
    succeeds, and the log tells which restart was which."""
    cluster = Cluster(k8s_emulator)
    cluster.script(
        cluster.pods(),
        cluster.preempt,
        cluster.restart,  # a crash: this one counts toward max_restarts
        cluster.preempt,
        cluster.finish(json.dumps(RESULT)),
    )
    caplog.set_level(logging.INFO, logger="lifecycle")

    assert _run(_lifecycle(max_restarts=1, max_preemptions=3), _jobset()) == RESULT

    log = caplog.text
    first = log.index("node set preempted; restart 1, 1 of 3 preemptions (not counted toward max_restarts=1)")
    crash = log.index("restart 1 of 1 (and 1 after preemptions)")
    second = log.index("node set preempted; restart 3, 2 of 3 preemptions")
    assert first < crash < second
    assert [d for d in k8s_emulator.deletions if d[0] == "jobsets"] == []


def test_max_preemptions_exceeded_fails_naming_the_count_and_deletes_the_jobset(k8s_emulator):
    cluster = Cluster(k8s_emulator)
    cluster.script(cluster.pods(), cluster.preempt, cluster.preempt, *[cluster.wait] * 50)
    lifecycle = _lifecycle(max_restarts=5, max_preemptions=1)

    with pytest.raises(GPUTrainingFailure) as err:
        _run(lifecycle, _jobset())

    message = str(err.value)
    assert "a node was preempted (evicted, drained or its node shut down) 2 times in this try" in message
    assert "max_preemptions=1 is spent, so the job was deleted" in message
    assert [d for d in k8s_emulator.deletions if d[0] == "jobsets"] == [
        ("jobsets", "default", "train-abc", "Foreground")
    ]


def test_trigger_enforces_max_preemptions_too(k8s_emulator, caplog, capfd):
    """The deferrable wait counts preemptions the same way; the worker's conclude deletes the JobSet."""
    cluster = Cluster(k8s_emulator)
    cluster.script(cluster.pods(), cluster.preempt, *[cluster.wait] * 50)
    k8s_emulator.create(_jobset())
    trigger = _trigger()
    trigger.policy["max_preemptions"] = 0
    caplog.set_level(logging.INFO)

    async def first() -> dict:
        return (await asyncio.wait_for(trigger.run().__anext__(), timeout=10)).payload

    payload = asyncio.run(first())
    assert (payload["status"], payload["preemptions"]) == ("preemptions_exhausted", 1)
    log = caplog.text + "".join(capfd.readouterr())
    assert "node set preempted (1 in this try); max_preemptions=0" in log
    assert "of 0 preemptions" not in log
    with pytest.raises(GPUTrainingFailure, match=r"preempted .* 1 times in this try: max_preemptions=0"):
        _lifecycle().conclude(payload)
    assert [d for d in k8s_emulator.deletions if d[0] == "jobsets"] == [
        ("jobsets", "default", "train-abc", "Foreground")
    ]


def test_a_reattached_jobsets_earlier_preemptions_are_not_this_trys(k8s_emulator, caplog):
    """A retry that re-attaches to a JobSet preempted twice in an earlier try has its own max_preemptions."""
    running = _jobset()
    running["status"] = {"restarts": 2}  # two preemptions: restartsCountTowardsMax 0 is omitted
    k8s_emulator.create(running)
    cluster = Cluster(k8s_emulator)
    cluster.attempt = 2
    cluster.script(cluster.pods(), cluster.preempt, cluster.finish(json.dumps(RESULT)))
    caplog.set_level(logging.INFO, logger="lifecycle")

    assert _run(_lifecycle(max_preemptions=1), _jobset()) == RESULT

    assert "Re-attaching to JobSet train-abc" in caplog.text
    assert "node set preempted; restart 3, 1 of 1 preemptions" in caplog.text
    assert k8s_emulator.count("POST", "/jobsets") == 0  # re-attached: no JobSet created


@pytest.mark.parametrize("deferrable", [False, True], ids=["sync", "deferrable"])
def test_dag_run_survives_preemptions_with_max_restarts_0_on_try_1(airflow_db, k8s_emulator, deferrable):
    from airflow.sdk import DAG

    from airflow_provider_mltrain.testing import xcom_value

    cluster = Cluster(k8s_emulator)
    cluster.script(cluster.pods(), cluster.preempt, cluster.preempt, cluster.finish(json.dumps(RESULT)))
    with DAG(
        f"distributed_preempted_{deferrable}", schedule=None, start_date=datetime.datetime(2026, 1, 1)
    ) as dag:
        _operator(deferrable=deferrable, max_restarts=0, retries=0)

    dag_run = run_dag(dag)

    ti = dag_run.get_task_instance("train")
    assert (ti.state, ti.try_number) == ("success", 1)
    assert xcom_value(dag_run, "train") == RESULT
    [jobset] = k8s_emulator.list("jobsets")
    # As JobSet writes it: restartsCountTowardsMax 0 is omitted.
    assert (jobset["status"]["restarts"], "restartsCountTowardsMax" in jobset["status"]) == (2, False)
    assert k8s_emulator.count("POST", "/jobsets") == 1  # restarted in place, never recreated
    # What makes the JobSet controller restart without counting: the rule on the Job's PodFailurePolicy.
    [rule] = jobset["spec"]["failurePolicy"]["rules"]
    assert (rule["action"], rule["onJobFailureReasons"]) == (
        "RestartJobSetAndIgnoreMaxRestarts",
        ["PodFailurePolicy"],
    )


def test_dag_run_fails_try_1_once_max_preemptions_is_spent(airflow_db, k8s_emulator, caplog, capfd):
    from airflow.sdk import DAG

    cluster = Cluster(k8s_emulator)
    cluster.script(cluster.pods(), cluster.preempt, cluster.preempt, *[cluster.wait] * 50)
    with DAG("distributed_preempted_limit", schedule=None, start_date=datetime.datetime(2026, 1, 1)) as dag:
        _operator(deferrable=False, max_preemptions=1, retries=0)

    dag_run = run_dag(dag)

    ti = dag_run.get_task_instance("train")
    assert (ti.state, ti.try_number) == ("failed", 1)
    log = caplog.text + "".join(capfd.readouterr())
    assert "2 times in this try: max_preemptions=1 is spent" in log
    assert [d[3] for d in k8s_emulator.deletions if d[0] == "jobsets"] == ["Foreground"]
    assert k8s_emulator.list("jobsets") == []


# -- upstream-shaped status (issue 20) ----------------------------------------------------------------


def test_preemptions_with_max_restarts_0_are_counted_from_a_status_without_restarts_count_towards_max(
    k8s_emulator, caplog
):
    """JobSet omits restartsCountTowardsMax while it is 0: {"restarts": 2} is two preemptions, not two
    counted restarts, so max_preemptions applies and the log never says "restart 2 of 0"."""
    cluster = Cluster(k8s_emulator)
    cluster.script(cluster.pods(), cluster.preempt, cluster.preempt, *[cluster.wait] * 50)
    caplog.set_level(logging.INFO, logger="lifecycle")

    with pytest.raises(GPUTrainingFailure, match="2 times in this try: max_preemptions=1 is spent"):
        _run(_lifecycle(max_restarts=0, max_preemptions=1), _jobset())

    assert [d for d in k8s_emulator.deletions if d[0] == "jobsets"] == [
        ("jobsets", "default", "train-abc", "Foreground")
    ]
    assert "node set preempted; restart 1, 1 of 1 preemptions" in caplog.text
    assert "restart 2 of 0" not in caplog.text and "restart 0 of 0" not in caplog.text


def _initializer_pod(job: dict[str, Any], replicated_job: str, phase: str) -> dict[str, Any]:
    """A TrainJob initializer's pod as JobSet labels it: job index 0 and completion index 0, like node 0."""
    index = {manifests.COMPLETION_INDEX_ANNOTATION: "0"}
    terminated = {"terminated": {"exitCode": 0, "reason": "Completed", "message": "dataset ready"}}
    return pod_object(
        f"{job['metadata']['name']}-{replicated_job}-0-0",
        labels={
            "jobset.sigs.k8s.io/jobset-name": job["metadata"]["name"],
            "jobset.sigs.k8s.io/replicatedjob-name": replicated_job,
            "jobset.sigs.k8s.io/job-index": "0",
            "jobset.sigs.k8s.io/restart-attempt": "0",
            **index,
        },
        annotations=index,
        owner=job,
        phase=phase,
        container=replicated_job,
        state=terminated if phase == "Succeeded" else {"running": {}},
    )


def test_a_trainjob_with_initializers_reads_the_result_from_the_trainers_node_0(k8s_emulator, caplog):
    """The initializer pods have job index 0 and completion index 0 too: the leader is picked by the
    trainer's replicated job (label jobset.sigs.k8s.io/replicatedjob-name=node), and while only the
    initializers run the log says so instead of counting their pods as nodes."""
    trainjob = k8s_emulator.create(
        {
            "apiVersion": "trainer.kubeflow.org/v1alpha1",
            "kind": "TrainJob",
            "metadata": {"name": "train-abc", "labels": manifests.task_labels(LINEAGE)},
            "spec": {"runtimeRef": {"name": "torch-distributed"}},
        }
    )
    # Sorted by name, the initializers' pods come before the node pods in every list the API returns.
    for initializer in ("dataset-initializer", "model-initializer"):
        k8s_emulator.create(_initializer_pod(trainjob, initializer, "Running"))

    def initializers_done(job: dict[str, Any]) -> None:
        for initializer in ("dataset-initializer", "model-initializer"):
            k8s_emulator.delete("pods", f"train-abc-{initializer}-0-0")
            k8s_emulator.create(_initializer_pod(job, initializer, "Succeeded"))

    cluster = Cluster(k8s_emulator, plural="trainjobs")
    cluster.script(
        cluster.wait,
        initializers_done,
        cluster.pods(),
        cluster.finish(json.dumps(RESULT), condition="Complete"),
    )
    caplog.set_level(logging.INFO, logger="lifecycle")
    lifecycle = _lifecycle(TRAINJOB)

    assert lifecycle.conclude(lifecycle.wait("train-abc")) == RESULT
    assert "initializers running: dataset-initializer, model-initializer" in caplog.text
    assert "Leader pod train-abc-node-0-0-a0" in caplog.text


def test_a_first_attempt_crash_with_max_restarts_0_claims_no_restarts(k8s_emulator):
    """With maxRestarts 0 JobSet fails any non-preemption failure with ReachedMaxRestarts (failure_policy.go
    :226-231): the task's error says the node and the cause, and that no restart happened."""
    cluster = Cluster(k8s_emulator)
    oom = {"terminated": {"exitCode": 137, "reason": "OOMKilled"}}
    cluster.script(
        cluster.pods(),
        cluster.fail(
            "ReachedMaxRestarts",
            # constants.go:52 and messageWithFirstFailedJob (failure_policy.go:469-471).
            "jobset failed due to reaching max number of restarts (first failed job: train-abc-node-0)",
            states={1: oom},
            logs={0: "[Rank 0] Watchdog caught collective operation timeout\n", 1: "step 3\n"},
        ),
    )
    k8s_emulator.create(_jobset())
    lifecycle = _lifecycle(max_restarts=0)

    with pytest.raises(GPUTrainingFailure) as failure:
        lifecycle.conclude(lifecycle.wait("train-abc"))

    message = str(failure.value)
    assert "JobSet train-abc failed on its first attempt, with no restart: max_restarts=0" in message
    assert "Restarts exhausted" not in message
    assert "Node 1 (pod train-abc-node-0-1-a0): Training container was OOMKilled" in message
