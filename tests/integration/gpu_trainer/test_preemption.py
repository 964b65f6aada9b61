"""SIGTERM mid-epoch: the trainer finishes the step, checkpoints it, marks the MLflow run KILLED and exits
143; the restart continues at the next sample of the same run and ends where an uninterrupted run does."""

from __future__ import annotations

import re
import signal
import socket
import time

import pytest
from mlflow.tracking import MlflowClient

from gpu_trainer import checkpoint, contract
from tests.fixtures.trainer_runs import (
    DDP_EPOCHS,
    TORCHRUN_TWO_PROCESSES,
    TrainerProcess,
    ddp_trainer_args,
    run_trainer,
    trainer_args,
    trainer_env,
)

METRICS = ("train_loss", "val_loss", "val_accuracy", "val_f1")
#: The line a preempted rank 0 logs: the step, its place in the epoch and how long the checkpoint took.
SIGTERM_LINE = re.compile(
    r"SIGTERM: checkpoint at step (?P<step>\d+) \(epoch (?P<epoch>\d+), step (?P<in_epoch>\d+)/(?P<steps>\d+)\) "
    r"written in (?P<seconds>[\d.]+) s \((?P<after>[\d.]+) s after the signal\); exiting 143"
)
PROGRESS_LINE = re.compile(r"epoch (\d+)/\d+ step (\d+)/\d+ loss")


def _sigterm_report(output: str) -> re.Match[str]:
    match = SIGTERM_LINE.search(output)
    assert match, output[-4000:]
    return match


def test_sigterm_mid_epoch_checkpoints_that_step_and_the_restart_ends_equal(
    tmp_path, digits_dir, reference_run
):
    uri = reference_run["tracking_uri"]  # its store, a new experiment: no second database to create
    env = trainer_env(uri, MLFLOW_EXPERIMENT_NAME="preempted")
    # A progress line every step: the test signals at a known point, the output shows the last step run.
    args = [*trainer_args(digits_dir, tmp_path), "--log-every-steps", "1"]
    # With a DataLoader worker, and the signal sent to the whole process group (`kill -TERM -<pgid>`).
    trainer = TrainerProcess([*args, "--num-workers", "1"], env)
    try:
        trainer.wait_for("epoch 2/4 step 3/")
        trainer.signal_group(signal.SIGTERM)
        output = trainer.finish(timeout=120)
    finally:
        trainer.kill()

    assert trainer.proc.returncode == contract.PREEMPTED_EXIT_CODE, output[-4000:]
    assert not (tmp_path / "result.json").exists()
    report = _sigterm_report(output)
    step, in_epoch = int(report["step"]), int(report["in_epoch"])
    assert float(report["seconds"]) < 30 and float(report["after"]) >= float(report["seconds"])
    # Nothing trained is lost: the last step that ran (its progress line) is the one checkpointed.
    ran = PROGRESS_LINE.findall(output[: report.start()])
    assert ran[-1] == (report["epoch"], str(in_epoch)), ran[-3:]

    latest = checkpoint.load_latest(str(tmp_path / "ckpt"))
    assert latest is not None
    path, state = latest
    assert path.endswith(checkpoint.checkpoint_name(step))
    assert (state["global_step"], state["epoch"] + 1, state["step_in_epoch"]) == (
        step,
        int(report["epoch"]),
        in_epoch,
    )
    assert state["partial"]["count"] == min(in_epoch * 64, 1437)  # 1437 rows, batches of 64
    client = MlflowClient(tracking_uri=uri)
    killed = client.get_run(state["run_id"])
    assert killed.info.status == "KILLED"

    restarted = run_trainer(args, env)
    assert restarted.returncode == 0, restarted.stdout[-3000:] + restarted.stderr[-3000:]
    assert f"step {in_epoch} of the next (global step {step})" in restarted.stdout
    # The restart trains from the next step on: no step of the interrupted epoch runs twice.
    epoch, steps = int(report["epoch"]), int(report["steps"])
    next_step = (epoch, in_epoch + 1) if in_epoch < steps else (epoch + 1, 1)
    replayed = PROGRESS_LINE.findall(restarted.stdout)
    assert replayed[0] == tuple(map(str, next_step)), replayed[:3]
    result = contract.load_result(str(tmp_path / "result.json"))
    assert result["run_id"] == state["run_id"]
    continued = client.get_run(state["run_id"])
    assert continued.info.status == "FINISHED"
    runs = client.search_runs([client.get_experiment_by_name("preempted").experiment_id])
    assert [run.info.run_id for run in runs] == [state["run_id"]]
    # Each epoch's metrics once: the epochs before the signal from the first attempt, the rest after.
    assert [m.step for m in client.get_metric_history(state["run_id"], "val_accuracy")] == [1, 2, 3, 4]

    reference = reference_run["result"]["metrics"]
    for name in METRICS:
        assert result["metrics"][name] == pytest.approx(reference[name], rel=1e-4, abs=1e-6), name


def test_torchrun_ranks_stop_at_the_same_step_and_the_restart_ends_equal(
    tmp_path, digits_dir, ddp_reference_run
):
    uri = ddp_reference_run["tracking_uri"]
    env = trainer_env(uri, MLFLOW_EXPERIMENT_NAME="ddp-preempted")
    args = [*ddp_trainer_args(digits_dir, tmp_path), "--log-every-steps", "1"]
    trainer = TrainerProcess(args, env, launcher=TORCHRUN_TWO_PROCESSES)
    try:
        trainer.wait_for(f"[rank 0] epoch 1/{DDP_EPOCHS} step 3/")
        # As `kill -TERM -<pgid>` would: torchrun and both workers get it, and torchrun forwards it again.
        trainer.signal_group(signal.SIGTERM)
        output = trainer.finish(timeout=120)
    finally:
        trainer.kill()

    # torchrun reports a SIGTERM it received as a failure of its own (status 1); the workers exited 143.
    assert trainer.proc.returncode != 0
    report = _sigterm_report(output)
    step = int(report["step"])
    assert re.search(rf"\[rank 1\] SIGTERM: stopped after step {step} with every rank", output), output[
        -4000:
    ]
    assert "second SIGTERM" not in output
    assert not (tmp_path / "result.json").exists()

    latest = checkpoint.load_latest(str(tmp_path / "ckpt"))
    assert latest is not None
    _, state = latest
    assert state["global_step"] == step
    # One checkpoint holding both ranks at that step: each trained the same number of batches.
    counts = [rank["partial"]["count"] for rank in state["ranks"]]
    assert counts == [int(report["in_epoch"]) * 64] * 2
    client = MlflowClient(tracking_uri=uri)
    assert client.get_run(state["run_id"]).info.status == "KILLED"

    restarted = TrainerProcess(args, env, launcher=TORCHRUN_TWO_PROCESSES)
    try:
        restarted_output = restarted.finish(timeout=240)
    finally:
        restarted.kill()
    assert restarted.proc.returncode == 0, restarted_output[-4000:]
    assert f"global step {step})" in restarted_output
    result = contract.load_result(str(tmp_path / "result.json"))
    assert result["run_id"] == state["run_id"]
    assert client.get_run(state["run_id"]).info.status == "FINISHED"
    # Each rank resumed its own running loss: the epoch's train_loss matches the uninterrupted run too.
    reference = ddp_reference_run["result"]["metrics"]
    for name in METRICS:
        assert result["metrics"][name] == pytest.approx(reference[name], rel=1e-4, abs=1e-6), name


def test_a_second_sigterm_ends_a_trainer_that_cannot_reach_a_step(tmp_path, digits_dir):
    # A tracking server that accepts connections and never answers: the trainer stays in start-up,
    # inside an HTTP call, so the first SIGTERM's checkpoint never comes.
    hung = socket.socket()
    hung.bind(("127.0.0.1", 0))
    hung.listen(8)
    env = trainer_env(
        f"http://127.0.0.1:{hung.getsockname()[1]}",
        MLFLOW_HTTP_REQUEST_TIMEOUT="120",
        MLFLOW_HTTP_REQUEST_MAX_RETRIES="0",
    )
    trainer = TrainerProcess(trainer_args(digits_dir, tmp_path), env)
    try:
        trainer.wait_for("loading")
        time.sleep(1.0)  # into the hung call
        # The same notice twice within a moment (process group + torchrun's forwarding): still one.
        trainer.proc.send_signal(signal.SIGTERM)
        trainer.proc.send_signal(signal.SIGTERM)
        time.sleep(1.5)
        assert trainer.proc.poll() is None, "".join(trainer.lines)
        sent = time.monotonic()
        trainer.proc.send_signal(signal.SIGTERM)
        output = trainer.finish(timeout=30)
        took = time.monotonic() - sent
    finally:
        trainer.kill()
        hung.close()

    assert trainer.proc.returncode == -signal.SIGTERM, output[-4000:]
    assert "second SIGTERM: stopping now, without a checkpoint" in output
    assert took < 10, took
    assert not (tmp_path / "ckpt").exists()
