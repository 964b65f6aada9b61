"""The local launcher restarts a trainer preempted from outside, and never one Airflow stopped.

A real subprocess that behaves like the trainer on SIGTERM (checkpoint, exit 143); the SIGTERM comes from
the test (someone else: the OS, a node agent), from :meth:`LocalLauncher.stop` (on_kill) or from the
execution timeout. No torch: these run in every Airflow venv.
"""

from __future__ import annotations

import datetime
import os
import signal
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from airflow.exceptions import AirflowException

from airflow_provider_mltrain.launchers.local import LocalLauncher, LocalRun
from airflow_provider_mltrain.operators._triage import GPUTrainingFailure
from airflow_provider_mltrain.operators.gpu_training import GPUTrainingPodOperator
from gpu_trainer import contract
from tests.fixtures.gpu_operator import make_context
from tests.fixtures.logs import ListLog

#: Appends its pid to argv[1] at each start; on SIGTERM records a checkpoint at step 7 and exits 143;
#: started again with that checkpoint, it reports ``resumed_from_epoch`` 7 and finishes.
PREEMPTIBLE = textwrap.dedent(
    """
    import json, os, signal, sys, time
    from gpu_trainer import contract

    marker = os.path.join(os.environ[contract.ENV_CHECKPOINT_DIR], "checkpoint.json")
    resumed = json.load(open(marker))["step"] if os.path.exists(marker) else None

    def checkpoint_and_exit(signum, frame):
        json.dump({"step": 7}, open(marker, "w"))
        print("SIGTERM: checkpoint at step 7 written; exiting 143", flush=True)
        sys.exit(contract.PREEMPTED_EXIT_CODE)

    signal.signal(signal.SIGTERM, checkpoint_and_exit)
    with open(sys.argv[1], "a") as fh:
        fh.write(f"{os.getpid()}\\n")
    print("training", flush=True)
    if resumed is None:
        time.sleep(600)  # until preempted
    contract.write_result(
        contract.result_path(),
        contract.make_result(
            run_id="r1", model_uri="file:///m", metrics={"val_accuracy": 0.9}, params={},
            resumed_from_epoch=resumed,
        ),
    )
    """
)


def started_pids(path: Path, count: int, timeout: float = 20) -> list[int]:
    """The pids of the first ``count`` trainer starts (waits for them)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pids = [int(line) for line in path.read_text().split()] if path.exists() else []
        if len(pids) >= count:
            return pids
        time.sleep(0.05)
    raise AssertionError(f"fewer than {count} trainer starts in {path}")


def in_thread(fn: Any) -> tuple[threading.Thread, list[Any]]:
    out: list[Any] = []

    def target() -> None:
        try:
            out.append(fn())
        except BaseException as err:
            out.append(err)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, out


@pytest.fixture
def trainer(tmp_path: Path) -> tuple[list[str], Path]:
    script = tmp_path / "preemptible.py"
    script.write_text(PREEMPTIBLE)
    pids = tmp_path / "pids"
    return ["python", str(script), str(pids)], pids


def test_preempted_trainer_is_restarted_and_resumes(tmp_path, trainer):
    cmd, pids = trainer
    log = ListLog()
    checkpoint_dir = tmp_path / "ckpt"
    launcher = LocalLauncher(log, checkpoint_dir=str(checkpoint_dir), timeout_s=60, max_preemptions=3)
    thread, out = in_thread(lambda: launcher.run(cmd, {contract.ENV_CHECKPOINT_DIR: str(checkpoint_dir)}))

    os.kill(started_pids(pids, 1)[0], signal.SIGTERM)  # not from Airflow: a preemption
    thread.join(30)

    run = out[0]
    assert isinstance(run, LocalRun), run
    assert run.returncode == 0 and run.preemptions == 1
    assert run.result is not None and run.result["resumed_from_epoch"] == 7
    assert len(started_pids(pids, 2)) == 2
    assert (
        "Local launcher: the trainer exited 143 after a SIGTERM that did not come from Airflow (preempted); "
        f"restarting it, 1 of 3, from the checkpoint in {checkpoint_dir}"
    ) in log.lines


def test_stop_is_for_good_no_restart(tmp_path, trainer):
    cmd, pids = trainer
    checkpoint_dir = str(tmp_path / "ckpt")
    launcher = LocalLauncher(ListLog(), checkpoint_dir=checkpoint_dir, max_preemptions=3, kill_grace_s=5)
    thread, out = in_thread(lambda: launcher.run(cmd, {contract.ENV_CHECKPOINT_DIR: checkpoint_dir}))
    started_pids(pids, 1)

    launcher.stop()  # on_kill: the trainer checkpoints and exits 143, which must not resurrect it
    thread.join(30)

    run = out[0]
    assert isinstance(run, LocalRun), run
    assert run.returncode == contract.PREEMPTED_EXIT_CODE and run.preemptions == 0
    time.sleep(0.3)
    assert len(pids.read_text().split()) == 1


def test_stop_between_two_runs_starts_nothing(tmp_path, trainer):
    launcher = LocalLauncher(ListLog(), checkpoint_dir=str(tmp_path / "ckpt"), max_preemptions=3)
    launcher.stop()
    cmd, pids = trainer
    run = launcher.run(cmd, {})
    assert run.returncode == -signal.SIGTERM and not pids.exists()


def local_op(cmd: list[str], **kwargs: Any) -> GPUTrainingPodOperator:
    return GPUTrainingPodOperator(
        task_id="train", cmds=cmd, launcher="local", local_kill_grace_seconds=5, **kwargs
    )


@pytest.fixture
def local_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "root"
    monkeypatch.setenv("AIRFLOW__MLTRAIN__LOCAL_CHECKPOINT_ROOT", str(root))
    return root


def test_operator_with_max_preemptions_zero_fails_naming_the_count(local_root, trainer):
    cmd, pids = trainer
    op = local_op(cmd, max_preemptions=0)
    thread, out = in_thread(lambda: op.execute(make_context()))
    os.kill(started_pids(pids, 1)[0], signal.SIGTERM)
    thread.join(30)
    assert isinstance(out[0], GPUTrainingFailure)
    assert "Local trainer was preempted 1 time(s)" in str(out[0])
    assert "max_preemptions=0 restarts are spent" in str(out[0])


def test_operator_execution_timeout_is_not_a_preemption(local_root, trainer):
    cmd, pids = trainer
    op = local_op(cmd, max_preemptions=3, execution_timeout=datetime.timedelta(seconds=2))
    with pytest.raises(AirflowException, match="execution_timeout"):
        op.execute(make_context())
    time.sleep(0.3)
    assert len(pids.read_text().split()) == 1


def test_operator_on_kill_is_not_a_preemption(local_root, trainer):
    cmd, pids = trainer
    op = local_op(cmd, max_preemptions=3)
    thread, out = in_thread(lambda: op.execute(make_context()))
    started_pids(pids, 1)
    op.on_kill()
    thread.join(30)
    assert isinstance(out[0], AirflowException) and "exited with code 143" in str(out[0])
    time.sleep(0.3)
    assert len(pids.read_text().split()) == 1


@pytest.mark.parametrize("value", [-1, 1.5, True, "3", None])
def test_max_preemptions_is_checked_at_parse(value):
    with pytest.raises(ValueError, match=rf"invalid max_preemptions={value!r}; expected an int >= 0"):
        GPUTrainingPodOperator(task_id="t", image="i", max_preemptions=value)
    with pytest.raises(ValueError, match="invalid max_preemptions"):
        GPUTrainingPodOperator.partial(task_id="t2", image="i", max_preemptions=value)


def test_default_grace_period_leaves_time_for_a_checkpoint():
    op = GPUTrainingPodOperator(task_id="t", image="i")
    assert op.termination_grace_period == 120 and op.max_preemptions == 3
    assert (
        sys.modules["airflow_provider_mltrain.operators._preemption"].DEFAULT_TERMINATION_GRACE_PERIOD_S
        == 120
    )
