"""A preempted training pod is replaced, not failed: GPUTrainingPodOperator over HTTP against the emulator.

The operator runs KubernetesPodOperator's real code with the real ``kubernetes`` client (and, deferrable,
the real ``KubernetesPodTrigger`` with ``kubernetes_asyncio``) against the Kubernetes API emulator
(:mod:`tests.fixtures.k8s_emulator`). The test plays scheduler and kubelet
(:class:`tests.fixtures.pod_kubelet.Kubelet`): it binds each created pod to a node, runs it, and ends it the
way the scenario says (a ``DisruptionTarget`` eviction, a node shutdown, the pod vanishing with its node, a
crash, success). Only the XCom read is replaced (an ``exec`` the emulator does not serve; see
:func:`tests.fixtures.pod_kubelet.serve_xcom_from_pods`).
"""

from __future__ import annotations

import asyncio
import re
from typing import Any

import pytest
from airflow.exceptions import AirflowException, TaskDeferred

from airflow_provider_mltrain.operators._preemption import PREEMPTIONS_EVENT_KEY
from airflow_provider_mltrain.operators._triage import GPUTrainingFailure
from airflow_provider_mltrain.operators.gpu_training import GPUTrainingPodOperator
from tests.fixtures.gpu_operator import IMAGE, make_context
from tests.fixtures.k8s_emulator import KubernetesEmulator
from tests.fixtures.pod_kubelet import RESULT, Kubelet, serve_xcom_from_pods


@pytest.fixture
def xcom_from_pod(k8s_emulator: KubernetesEmulator, monkeypatch: pytest.MonkeyPatch) -> None:
    serve_xcom_from_pods(k8s_emulator, monkeypatch)


def make_op(**kwargs: Any) -> GPUTrainingPodOperator:
    kwargs.setdefault("max_preemptions", 3)
    return GPUTrainingPodOperator(
        task_id="train",
        image=IMAGE,
        namespace="default",
        kubernetes_conn_id="kubernetes_default",
        get_logs=False,
        unschedulable_timeout_seconds=None,
        base_container_status_polling_interval=0.02,
        startup_check_interval_seconds=1,
        poll_interval=0.05,
        **kwargs,
    )


async def _first_event(trigger: Any) -> dict[str, Any]:
    async for event in trigger.run():
        return event.payload
    raise AssertionError("the trigger ended without an event")


def run_deferrable(context: dict[str, Any], **kwargs: Any) -> tuple[Any, list[dict[str, Any]]]:
    """Execute, then for each deferral run the real trigger and resume a NEW operator object with its
    event, as the triggerer and the task runner do. Returns the result and the deferrals' trigger kwargs."""
    deferrals: list[dict[str, Any]] = []
    op = make_op(deferrable=True, **kwargs)
    step: Any = lambda: op.execute(context)  # noqa: E731
    for _ in range(10):
        try:
            return step(), deferrals
        except TaskDeferred as deferred:
            assert deferred.method_name == "trigger_reentry"
            deferrals.append(dict(deferred.trigger.trigger_kwargs))
            event = asyncio.run(asyncio.wait_for(_first_event(deferred.trigger), timeout=30))
            resumed = make_op(deferrable=True, **kwargs)
            step = lambda resumed=resumed, event=event: resumed.trigger_reentry(context, event)  # noqa: E731
    raise AssertionError("more than 10 deferrals")


def run(mode: str, context: dict[str, Any], **kwargs: Any) -> Any:
    if mode == "sync":
        return make_op(**kwargs).execute(context)
    return run_deferrable(context, **kwargs)[0]


def logged(caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]) -> str:
    """The task log, wherever Airflow's logging sends it (stdlib records or structlog's stdout)."""
    return caplog.text + "".join(capfd.readouterr())


@pytest.fixture(params=["sync", "deferrable"])
def mode(request: pytest.FixtureRequest) -> str:
    return request.param


def test_preempted_pod_is_replaced_and_the_try_succeeds(k8s_emulator, xcom_from_pod, mode, caplog, capfd):
    kubelet = Kubelet(k8s_emulator, ["preempted", "succeeded"])
    context = make_context(try_number=1)
    caplog.set_level("WARNING")

    result = run(mode, context)

    assert result == RESULT
    assert len(kubelet.created) == 2
    first, second = kubelet.created
    # A fresh pod for the same task instance and checkpoint: same labels (try_number 1 both), new name.
    assert second["metadata"]["name"] != first["metadata"]["name"]
    assert second["metadata"]["labels"] == first["metadata"]["labels"]
    assert first["metadata"]["labels"]["try_number"] == "1"
    dirs = kubelet.checkpoint_dirs()
    assert dirs[0] == dirs[1]
    # The preempted pod is gone, whatever on_finish_action says; so is the finished one (delete_pod).
    assert not k8s_emulator.exists("pods", first["metadata"]["name"])
    assert ("pods", "default", first["metadata"]["name"]) in [d[:3] for d in k8s_emulator.deletions]
    log = logged(caplog, capfd)
    # The scheduler deletes its victim: the operator reads why from its DisruptionTarget condition, or, when
    # the kubelet's final delete came first, from the scheduler's "Preempted" event on it.
    assert re.search(
        rf"Pod {first['metadata']['name']} was preempted \(PreemptionByScheduler: Preempted (in order to "
        rf"admit critical pod|by pod [0-9a-f-]+ on node spot-node-0)\); starting replacement 1 of 3 from the "
        rf"checkpoint in {re.escape(dirs[0])}",
        log,
    )
    # Without a PVC or URI the checkpoint was on the pod's emptyDir: the log says the replacement starts over.
    assert f"emptyDir that died with pod {first['metadata']['name']}" in log


def test_deferrable_count_travels_through_the_trigger(k8s_emulator, xcom_from_pod, caplog, capfd):
    kubelet = Kubelet(k8s_emulator, ["preempted", "preempted", "succeeded"])
    volume = {"claim_name": "checkpoints", "mount_path": "/ckpt"}
    result, deferrals = run_deferrable(make_context(), max_preemptions=2, checkpoint_volume=volume)
    assert result == RESULT
    dirs = kubelet.checkpoint_dirs()
    assert len(set(dirs)) == 1 and dirs[0].startswith("/ckpt/")
    log = logged(caplog, capfd)
    assert "starting replacement 2 of 2 from the checkpoint in /ckpt/" in log
    assert "emptyDir" not in log
    # The first trigger carries no count; each replacement's trigger carries the count so far.
    assert [d.get(PREEMPTIONS_EVENT_KEY) for d in deferrals] == [None, 1, 2]


def test_limit_exceeded_fails_clearly_naming_the_count(k8s_emulator, xcom_from_pod, mode):
    kubelet = Kubelet(k8s_emulator, ["preempted", "preempted"])
    with pytest.raises(
        GPUTrainingFailure, match=r"after 1 replacement pod\(s\) in this try: max_preemptions=1"
    ):
        run(mode, make_context(), max_preemptions=1)
    assert len(kubelet.created) == 2
    assert k8s_emulator.list("pods") == []


def test_max_preemptions_zero_fails_on_the_first(k8s_emulator, xcom_from_pod):
    kubelet = Kubelet(k8s_emulator, ["preempted", "succeeded"])
    with pytest.raises(GPUTrainingFailure, match=r"max_preemptions=0 is spent"):
        run("sync", make_context(), max_preemptions=0)
    assert len(kubelet.created) == 1


@pytest.mark.parametrize("ending", ["node_shutdown", "vanished_with_node"])
def test_node_shutdown_and_vanished_node_are_preemptions(
    k8s_emulator, xcom_from_pod, ending, mode, caplog, capfd
):
    kubelet = Kubelet(k8s_emulator, [ending, "succeeded"])
    caplog.set_level("WARNING")
    assert run(mode, make_context()) == RESULT
    assert len(kubelet.created) == 2
    reason = (
        "Terminated: Pod was terminated in response to imminent node shutdown."
        if ending == "node_shutdown"
        else ("PodVanishedWithNode: the pod and its node spot-node-0 are gone from the cluster")
    )
    assert f"was preempted ({reason}); starting replacement 1 of 3" in logged(caplog, capfd)


@pytest.mark.parametrize("ending", ["crashed", "vanished"])
def test_a_crash_or_a_deleted_pod_on_a_live_node_is_not_replaced(k8s_emulator, xcom_from_pod, ending, mode):
    kubelet = Kubelet(k8s_emulator, [ending, "succeeded"])
    with pytest.raises(AirflowException) as failure:
        run(mode, make_context())
    assert not isinstance(failure.value, GPUTrainingFailure) or "preempted" not in str(failure.value)
    assert len(kubelet.created) == 1


def test_a_preempted_pod_gone_before_it_was_read_is_told_by_the_schedulers_event(
    k8s_emulator, xcom_from_pod, mode, caplog, capfd
):
    """The scheduler deletes its victim; when the kubelet's final delete comes before the operator reads the
    pod (its node still there), the scheduler's "Preempted" event is what tells a preemption from a pod
    someone deleted: the pod is replaced and the try succeeds."""
    kubelet = Kubelet(k8s_emulator, ["preempted_gone", "succeeded"])
    caplog.set_level("WARNING")

    assert run(mode, make_context(try_number=1)) == RESULT

    assert len(kubelet.created) == 2
    assert k8s_emulator.exists("nodes", "spot-node-0", namespace="")  # its node stayed
    first = kubelet.created[0]["metadata"]["name"]
    assert re.search(
        rf"Pod {first} was preempted \(PreemptionByScheduler: Preempted by pod [0-9a-f-]+ on node spot-node-0\);"
        r" starting replacement 1 of 3",
        logged(caplog, capfd),
    )
