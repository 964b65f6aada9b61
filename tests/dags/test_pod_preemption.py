"""A preempted pod costs no retry: real ``dag.test()`` of GPUTrainingPodOperator against the API emulator.

The task has ``retries=0``. Its first pod is preempted (the kubelet player in
:mod:`tests.fixtures.pod_kubelet` sets ``DisruptionTarget`` / ``PreemptionByScheduler`` and phase ``Failed``
through the emulator); the operator starts a replacement for the same checkpoint directory and the task
succeeds on try 1, synchronous and deferrable (there ``dag.test()`` runs the real ``KubernetesPodTrigger``).
"""

from __future__ import annotations

import datetime

import pytest

from airflow_provider_mltrain.operators.gpu_training import GPUTrainingPodOperator
from airflow_provider_mltrain.testing import run_dag, xcom_value
from gpu_trainer import contract
from tests.fixtures.gpu_operator import IMAGE
from tests.fixtures.pod_kubelet import RESULT, Kubelet, serve_xcom_from_pods


def _dag(deferrable: bool, max_preemptions: int):
    from airflow.sdk import DAG

    with DAG("pod_preemption", schedule=None, start_date=datetime.datetime(2026, 1, 1)) as dag:
        GPUTrainingPodOperator(
            task_id="train",
            image=IMAGE,
            namespace="default",
            kubernetes_conn_id="kubernetes_default",
            retries=0,
            deferrable=deferrable,
            max_preemptions=max_preemptions,
            get_logs=False,
            unschedulable_timeout_seconds=None,
            base_container_status_polling_interval=0.02,
            poll_interval=0.05,
        )
    return dag


@pytest.mark.parametrize("deferrable", [False, True], ids=["sync", "deferrable"])
def test_preempted_pod_is_replaced_within_try_one(airflow_db, k8s_emulator, monkeypatch, deferrable):
    serve_xcom_from_pods(k8s_emulator, monkeypatch)
    kubelet = Kubelet(k8s_emulator, ["preempted", "succeeded"])

    dag_run = run_dag(_dag(deferrable, max_preemptions=3))

    ti = dag_run.get_task_instance("train")
    assert (dag_run.state, ti.state, ti.try_number) == ("success", "success", 1)
    assert xcom_value(dag_run, "train") == RESULT
    assert len(kubelet.created) == 2
    first, second = kubelet.created
    assert first["metadata"]["labels"]["try_number"] == second["metadata"]["labels"]["try_number"] == "1"
    assert len(set(kubelet.checkpoint_dirs())) == 1
    # The pod XCom names the pod that produced the result.
    assert xcom_value(dag_run, "train", key="pod_name") == second["metadata"]["name"]
    assert k8s_emulator.list("pods") == []


def test_limit_exceeded_fails_try_one(airflow_db, k8s_emulator, monkeypatch, caplog, capfd):
    serve_xcom_from_pods(k8s_emulator, monkeypatch)
    kubelet = Kubelet(k8s_emulator, ["preempted", "preempted"])

    dag_run = run_dag(_dag(False, max_preemptions=1))

    ti = dag_run.get_task_instance("train")
    assert (dag_run.state, ti.state, ti.try_number) == ("failed", "failed", 1)
    assert len(kubelet.created) == 2
    assert contract.ENV_CHECKPOINT_DIR in {
        e["name"] for e in kubelet.created[1]["spec"]["containers"][0]["env"]
    }
    log = caplog.text + "".join(capfd.readouterr())
    assert "after 1 replacement pod(s) in this try: max_preemptions=1 is spent" in log
