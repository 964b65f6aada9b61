"""A preempted local trainer resumes within the same try: real ``dag.test()``, the real trainer, real MLflow.

The SIGTERM comes from outside Airflow (the test, as a node agent or the OS would send it) once the real
``gpu_trainer.train`` runs (as soon as it handles SIGTERM, so the test does not race a 1-second training): the trainer checkpoints and exits 143, the local launcher starts it
again on the same checkpoint directory, and the task succeeds on try 1 with ``retries=0``. With
``max_preemptions=0`` the same SIGTERM fails the task with a message naming the count.
"""

from __future__ import annotations

import datetime
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from airflow_provider_mltrain.hooks.mlflow import connection_json
from airflow_provider_mltrain.operators.gpu_training import GPUTrainingPodOperator
from airflow_provider_mltrain.testing import run_dag, xcom_value

HYPERPARAMETERS = {"epochs": 2, "batch_size": 32, "hidden_dim": 32, "seed": 7}
#: SIGTERM's bit in /proc/<pid>/status SigCgt (the signals a process catches): bit 15 - 1.
_SIGTERM_BIT = 1 << (signal.SIGTERM - 1)


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from gpu_trainer.digits import write_digits

    out = tmp_path_factory.mktemp("digits")
    write_digits(str(out))
    return out


def _trainer_pid(timeout: float = 60) -> int:
    """The running ``gpu_trainer.train`` process started by this test process's launcher."""
    import psutil

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for child in psutil.Process().children(recursive=True):
            try:
                if "gpu_trainer.train" in " ".join(child.cmdline()):
                    return child.pid
            except psutil.NoSuchProcess:
                continue
        time.sleep(0.05)
    raise AssertionError("the trainer process never started")


def _catches_sigterm(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as fh:
            caught = next(line for line in fh if line.startswith("SigCgt:"))
    except (FileNotFoundError, StopIteration):
        return False
    return bool(int(caught.split()[1], 16) & _SIGTERM_BIT)


def _preempt_once() -> threading.Thread:
    """In the background: SIGTERM the trainer once, as soon as it handles SIGTERM (its entry point
    installs the handler before anything slow; it then stops after its first optimizer step)."""

    def preempt() -> None:
        pid = _trainer_pid()
        deadline = time.monotonic() + 60
        while not _catches_sigterm(pid):
            assert time.monotonic() < deadline, "the trainer never installed its SIGTERM handler"
            time.sleep(0.01)
        os.kill(pid, signal.SIGTERM)

    thread = threading.Thread(target=preempt, daemon=True)
    thread.start()
    return thread


def _dag(digits: Path, **operator_kwargs: Any) -> Any:
    from airflow.sdk import DAG

    with DAG("local_preemption", schedule=None, start_date=datetime.datetime(2026, 1, 1)) as dag:
        GPUTrainingPodOperator(
            task_id="train",
            launcher="local",
            retries=0,
            hyperparameters={**HYPERPARAMETERS, "data": str(digits)},
            mlflow_conn_id="mlflow_default",
            experiment_name="local-preemption",
            **operator_kwargs,
        )
    return dag


@pytest.fixture
def local_env(airflow_db, airflow_conn, mlflow_server, tmp_path, monkeypatch) -> Path:
    root = tmp_path / "checkpoints"
    monkeypatch.setenv("AIRFLOW__MLTRAIN__LOCAL_CHECKPOINT_ROOT", str(root))
    airflow_conn("mlflow_default", connection_json(mlflow_server.uri))
    return root


def test_sigterm_from_outside_resumes_within_try_one(local_env, digits, capfd):
    preempter = _preempt_once()

    dag_run = run_dag(_dag(digits, max_preemptions=3))

    preempter.join(5)
    ti = dag_run.get_task_instance("train")
    assert (dag_run.state, ti.state, ti.try_number) == ("success", "success", 1)
    result = xcom_value(dag_run, "train")
    # The second start resumed from the SIGTERM checkpoint, mid-way through the first epoch (index 0).
    assert result["resumed_from_epoch"] == 0
    log = "".join(capfd.readouterr())
    assert "SIGTERM: checkpoint at step 1 (epoch 1, step 1/45)" in log
    assert "restarting it, 1 of 3, from the checkpoint in" in log


def test_max_preemptions_zero_fails_naming_the_count(local_env, digits, capfd):
    preempter = _preempt_once()

    dag_run = run_dag(_dag(digits, max_preemptions=0))

    preempter.join(5)
    ti = dag_run.get_task_instance("train")
    assert (dag_run.state, ti.state, ti.try_number) == ("failed", "failed", 1)
    log = "".join(capfd.readouterr())
    assert "Local trainer was preempted 1 time(s)" in log
    assert "max_preemptions=0 restarts are spent" in log
