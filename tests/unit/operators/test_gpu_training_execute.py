"""GPUTrainingPodOperator's execute paths, synchronous and deferrable, with the Kubernetes API mocked.

The operator runs KubernetesPodOperator's real ``execute_sync`` / ``execute_async`` / ``trigger_reentry``
/ ``cleanup`` code; only the calls that would reach a cluster (the pod manager, the client, the hook,
pod creation and lookup) are replaced.
"""

from __future__ import annotations

import json
from typing import Any
from unittest import mock

import pytest
from airflow.exceptions import AirflowException, TaskDeferred
from airflow.providers.cncf.kubernetes.utils.pod_manager import PodLaunchFailedException
from kubernetes.client import models as k8s

from airflow_provider_mltrain.operators._triage import GPUTrainingFailure
from airflow_provider_mltrain.operators.gpu_training import GPUTrainingPodOperator
from gpu_trainer import contract
from tests.fixtures.gpu_operator import IMAGE, RESULT, FakeCluster, make_context, pushed, status_pod


def make_op(**kwargs: Any) -> GPUTrainingPodOperator:
    kwargs.setdefault("task_id", "train")
    kwargs.setdefault("image", IMAGE)
    kwargs.setdefault("namespace", "ml")
    kwargs.setdefault("gpus", 1)
    return GPUTrainingPodOperator(**kwargs)


@pytest.fixture(params=["sync", "deferrable"])
def mode(request) -> str:
    return request.param


def run(op: GPUTrainingPodOperator, context: dict[str, Any], mode: str) -> Any:
    """Run the operator the way the task runner would, in either mode."""
    if mode == "sync":
        return op.execute(context)
    with pytest.raises(TaskDeferred) as deferred:
        op.execute(context)
    assert deferred.value.method_name == "trigger_reentry"
    event = {"status": "success", "namespace": "ml", "name": "train-abc", "message": "done"}
    final = op.pod_manager.await_pod_completion.return_value
    if not container_ok(final):
        event = {"status": "failed", "namespace": "ml", "name": "train-abc", "message": "Container failed"}
    return getattr(op, deferred.value.method_name)(context, event)


def container_ok(pod: k8s.V1Pod) -> bool:
    for cs in pod.status.container_statuses or []:
        if cs.name == "base":
            return bool(cs.state.terminated and cs.state.terminated.exit_code == 0)
    return False


def deferrable_op(mode: str, **kwargs: Any) -> GPUTrainingPodOperator:
    # A real pod starts in Pending: the created pod object carries no status yet.
    return make_op(deferrable=(mode == "deferrable"), **kwargs)


# -- results -------------------------------------------------------------------------------------------


def test_result_is_validated_and_pushed(mocker, mode):
    op = deferrable_op(mode)
    cluster = FakeCluster(op, mocker, final=status_pod(), xcom=json.dumps(RESULT))
    context = make_context()
    result = run(op, context, mode)
    assert result == RESULT
    xcoms = pushed(context)
    assert xcoms["run_id"] == "abc123"
    assert xcoms["model_uri"] == "runs:/abc123/model"
    assert xcoms["metrics"]["val_accuracy"] == pytest.approx(0.97)
    # The pod that was submitted carries the contract.
    env = {e.name: e.value for e in cluster.created[0].spec.containers[0].env}
    assert env[contract.ENV_RESULT_PATH] == "/airflow/xcom/return.json"
    cluster.pm.delete_pod.assert_called()  # cleaned up after success


def test_deferrable_pod_already_finished_still_returns_result(mocker):
    """KPO runs trigger_reentry inline when the pod finished before deferral and drops its value."""
    op = make_op(deferrable=True)
    final = status_pod()
    FakeCluster(op, mocker, final=final, xcom=json.dumps(RESULT))
    mocker.patch.object(op, "get_or_create_pod", return_value=final)
    context = make_context()
    assert op.execute(context) == RESULT
    assert pushed(context)["run_id"] == "abc123"


def test_missing_result_fails_clearly(mocker, mode):
    op = deferrable_op(mode)
    FakeCluster(op, mocker, final=status_pod(), xcom=None)
    with pytest.raises(AirflowException, match=r"no result at /airflow/xcom/return.json.*schema_version"):
        run(op, make_context(), mode)


def test_malformed_json_result_fails_clearly(mocker, mode):
    op = deferrable_op(mode)
    FakeCluster(op, mocker, final=status_pod(), xcom="{not json")
    with pytest.raises(AirflowException, match=r"not valid JSON.*expected a JSON object with keys"):
        run(op, make_context(), mode)


def test_result_breaking_contract_fails_clearly(mocker, mode):
    op = deferrable_op(mode)
    bad = dict(RESULT, metrics={"val_accuracy": "high"})
    del bad["model_uri"]
    FakeCluster(op, mocker, final=status_pod(), xcom=json.dumps(bad))
    with pytest.raises(
        AirflowException, match=r"missing keys \['model_uri'\].*metrics must be finite numbers"
    ):
        run(op, make_context(), mode)


# -- triage --------------------------------------------------------------------------------------------


def test_oomkilled(mocker, mode):
    op = deferrable_op(mode, memory="8Gi")
    FakeCluster(
        op, mocker, final=status_pod(phase="Failed", exit_code=137, terminated_reason="OOMKilled"), xcom=None
    )
    with pytest.raises(GPUTrainingFailure, match=r"(?s)OOMKilled.*8Gi.*raise memory="):
        run(op, make_context(), mode)


def test_cuda_out_of_memory_in_logs(mocker, mode):
    op = deferrable_op(mode)
    logs = ["epoch 1", "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"]
    cluster = FakeCluster(op, mocker, final=status_pod(phase="Failed", exit_code=1), xcom=None, logs=logs)
    with pytest.raises(GPUTrainingFailure, match=r"(?s)out of GPU memory.*lower the batch size"):
        run(op, make_context(), mode)
    cluster.pm.read_pod_logs.assert_called()
    assert cluster.pm.read_pod_logs.call_args.kwargs["tail_lines"] == 50


def test_unknown_failure_keeps_kpo_error(mocker, mode):
    op = deferrable_op(mode)
    FakeCluster(
        op, mocker, final=status_pod(phase="Failed", exit_code=2), xcom=None, logs=["ValueError: boom"]
    )
    with pytest.raises(AirflowException, match="returned a failure|Container failed") as err:
        run(op, make_context(), mode)
    assert not isinstance(err.value, GPUTrainingFailure)


def test_image_pull_error_sync(mocker):
    op = make_op(unschedulable_timeout_seconds=None)
    pending = status_pod(
        phase="Pending", waiting_reason="ErrImagePull", waiting_message="manifest unknown", exit_code=None
    )
    cluster = FakeCluster(op, mocker, final=pending, xcom=None)
    cluster.pm.await_pod_start.side_effect = PodLaunchFailedException("Image cannot be pulled")
    with pytest.raises(
        GPUTrainingFailure, match=r"(?s)ghcr.io/example/trainer:1.0.*cannot be pulled.*image_pull_secrets"
    ):
        op.execute(make_context())


def test_image_pull_error_deferrable(mocker):
    op = make_op(deferrable=True)
    pending = status_pod(phase="Pending", waiting_reason="ImagePullBackOff", exit_code=None)
    FakeCluster(op, mocker, final=pending, xcom=None)
    context = make_context()
    with pytest.raises(TaskDeferred):
        op.execute(context)
    event = {"status": "failed", "namespace": "ml", "name": "train-abc", "message": "Image cannot be pulled"}
    with pytest.raises(GPUTrainingFailure, match=r"cannot be pulled \(ImagePullBackOff"):
        op.trigger_reentry(context, event)


def fake_clock(mocker, step: int = 1) -> None:
    """A monotonic clock that advances ``step`` seconds per reading, and sleeps that return at once."""
    clock = iter(range(0, 10_000, step))
    mocker.patch(
        "airflow_provider_mltrain.operators._scheduling.time.monotonic", side_effect=lambda: next(clock)
    )
    mocker.patch("airflow_provider_mltrain.operators._scheduling.time.sleep")


def test_unschedulable_gpu_fails_fast(mocker, mode):
    """Insufficient GPUs: fail after unschedulable_timeout_seconds, not the (long) schedule timeout. In
    deferrable mode the worker watches scheduling before it defers, so the trigger never gets the pod."""
    op = deferrable_op(
        mode,
        gpus=8,
        startup_timeout_seconds=3600,
        schedule_timeout_seconds=3600,
        unschedulable_timeout_seconds=5,
        startup_check_interval_seconds=0,
    )
    pending = status_pod(
        phase="Pending",
        unschedulable="0/4 nodes are available: 4 Insufficient nvidia.com/gpu.",
        exit_code=None,
    )
    cluster = FakeCluster(op, mocker, final=pending, xcom=None)
    fake_clock(mocker)

    with pytest.raises(
        GPUTrainingFailure, match=r"(?s)cannot be scheduled.*no node has 8 free 'nvidia.com/gpu'"
    ):
        op.execute(make_context())  # the failure itself, not TaskDeferred

    cluster.pm.await_pod_start.assert_not_called()  # never went into KPO's long wait
    cluster.pm.delete_pod.assert_called_once()


def test_unschedulable_waits_while_autoscaler_scales_up(mocker):
    op = make_op(gpus=1, unschedulable_timeout_seconds=1, startup_check_interval_seconds=0)
    pending = status_pod(
        phase="Pending", unschedulable="0/1 nodes: 1 Insufficient nvidia.com/gpu.", exit_code=None
    )
    running = status_pod()
    cluster = FakeCluster(op, mocker, final=running, xcom=json.dumps(RESULT))
    reads = iter([pending, pending, pending])
    cluster.pm.read_pod.side_effect = lambda pod: next(reads, running)
    cluster.pm.read_pod_events.return_value = mock.MagicMock(
        items=[mock.MagicMock(reason="TriggeredScaleUp")]
    )
    fake_clock(mocker, step=5)
    assert op.execute(make_context()) == RESULT


def test_deferrable_defers_at_once_while_the_autoscaler_adds_a_node(mocker):
    op = make_op(deferrable=True, gpus=1, unschedulable_timeout_seconds=600)
    pending = status_pod(
        phase="Pending", unschedulable="0/1 nodes: 1 Insufficient nvidia.com/gpu.", exit_code=None
    )
    cluster = FakeCluster(op, mocker, final=pending, xcom=None)
    cluster.pm.read_pod_events.return_value = mock.MagicMock(
        items=[mock.MagicMock(reason="TriggeredScaleUp")]
    )
    sleep = mocker.patch("airflow_provider_mltrain.operators._scheduling.time.sleep")

    with pytest.raises(TaskDeferred):
        op.execute(make_context())

    sleep.assert_not_called()
    cluster.pm.delete_pod.assert_not_called()


def test_gpu_type_unmatched_deferrable(mocker):
    """Fast failure off: the trigger times out on scheduling; the error still names gpu_type and the fix."""
    op = make_op(deferrable=True, gpu_type=["NVIDIA-H200"], unschedulable_timeout_seconds=None)
    pending = status_pod(
        phase="Pending",
        unschedulable="0/3 nodes are available: 3 node(s) didn't match Pod's node affinity/selector.",
        exit_code=None,
    )
    FakeCluster(op, mocker, final=pending, xcom=None)
    context = make_context()
    with pytest.raises(TaskDeferred):
        op.execute(context)
    event = {"status": "timeout", "namespace": "ml", "name": "train-abc", "message": "Pod took too long"}
    with pytest.raises(
        GPUTrainingFailure, match=r"(?s)nvidia.com/gpu.product in \['NVIDIA-H200'\].*kubectl get nodes"
    ):
        op.trigger_reentry(context, event)


def test_mlflow_link_never_fails_the_task(mocker, airflow_conn):
    from airflow_provider_mltrain.hooks.mlflow import connection_json

    # A UI URL pointing nowhere: building the link fails, the task does not.
    airflow_conn("mlflow_down", connection_json("http://127.0.0.1:9", ui_url="http://127.0.0.1:9"))
    op = make_op(mlflow_conn_id="mlflow_down")
    FakeCluster(op, mocker, final=status_pod(), xcom=json.dumps(RESULT))
    mocker.patch.dict(
        "os.environ", {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "2"}
    )
    context = make_context()
    assert op.execute(context) == RESULT
    # An empty link (not an error when Airflow resolves the task's links), never a broken URL.
    assert pushed(context)["mlflow_run_url"] == ""


def test_one_mlflow_connection_lookup_per_execution(mocker, airflow_conn, mode):
    from airflow_provider_mltrain.hooks.mlflow import MLflowHook, connection_json

    # The pod's tracking URI, the credentials warning and the run link all need the connection.
    airflow_conn("mlflow_once", connection_json("http://127.0.0.1:9", ui_url="http://127.0.0.1:9"))
    op = deferrable_op(mode, mlflow_conn_id="mlflow_once")
    assert "mlflow_hook" not in vars(op)  # nothing is built at DAG parse
    real_lookup = MLflowHook.get_connection
    lookups = mocker.patch.object(MLflowHook, "get_connection", side_effect=real_lookup)
    result = {**RESULT, "experiment_id": "7"}  # the link needs no request to MLflow
    FakeCluster(op, mocker, final=status_pod(), xcom=json.dumps(result))
    context = make_context()

    assert run(op, context, mode)["run_id"] == "abc123"
    assert pushed(context)["mlflow_run_url"] == "http://127.0.0.1:9/#/experiments/7/runs/abc123"
    assert lookups.call_count == 1
