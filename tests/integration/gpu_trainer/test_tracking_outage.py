"""The MLflow server goes down mid-training: training goes on, metrics arrive once it is back.

The tests share one ``mlflow server`` of their own (not the session one: they stop it and restart it on the
same port with the same database, as a real outage would). The trainer is paused (SIGSTOP) only while the
server is being stopped or started, so the outage falls between known epochs on a loaded machine too.
"""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import urlparse

import pytest
from mlflow.tracking import MlflowClient

from gpu_trainer import checkpoint
from tests.fixtures.mlflow_servers import free_port, start_server, stop_server
from tests.fixtures.trainer_runs import TrainerProcess, run_trainer, trainer_args, trainer_env

EPOCHS = 30
#: A refused connection fails at once and every epoch retries: the test needs no waiting.
OUTAGE_ENV = {
    "MLTRAIN_TRACKING_RETRY_SECONDS": "0",
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "5",
    "MLFLOW_EXPERIMENT_NAME": "outage",
}


class _Server:
    """A tracking server that can go down and come back: same port, same database and artifacts."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.proc, self.uri = start_server(root)
        self.port = urlparse(self.uri).port

    def stop(self) -> None:
        stop_server(self.proc)

    def start(self) -> None:
        if self.proc.poll() is not None:
            self.proc, _ = start_server(self.root, port=self.port)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    one = _Server(tmp_path_factory.mktemp("outage-server"))
    try:
        yield one
    finally:
        one.stop()


@pytest.fixture
def tracking(server: _Server) -> _Server:
    """The shared server, running (a failed test may have left it down)."""
    server.start()
    return server


def _args(digits_dir: Path, tmp_path: Path) -> list[str]:
    return trainer_args(digits_dir, tmp_path, epochs=EPOCHS)


def _metric_steps(uri: str, run_id: str, name: str) -> list[int]:
    return sorted(m.step for m in MlflowClient(tracking_uri=uri).get_metric_history(run_id, name))


def test_training_continues_through_an_outage_and_delivers_metrics_after_restart(
    tmp_path, digits_dir, tracking
):
    uri = tracking.uri
    trainer = TrainerProcess(_args(digits_dir, tmp_path), trainer_env(uri, **OUTAGE_ENV))
    try:
        trainer.wait_for(f"epoch 3/{EPOCHS} train_loss")
        trainer.pause()
        tracking.stop()
        trainer.resume()
        # Training and checkpoints go on while the server is down, with a warning saying so.
        trainer.wait_for("MLflow tracking unreachable")
        trainer.wait_for("train_loss", count=3)
        trainer.wait_for("checkpoint saved")
        trainer.pause()
        during_outage = "".join(trainer.lines)
        epochs_before_restart = during_outage.count(f"/{EPOCHS} train_loss")
        tracking.start()
        trainer.resume()
        output = trainer.finish()

        assert trainer.proc.returncode == 0, output[-4000:]
        assert epochs_before_restart >= 6, during_outage[-3000:]
        assert "MLflow tracking reachable again" in output
        result = json.loads((tmp_path / "result.json").read_text())
        assert result["metrics"]["val_accuracy"] > 0.9
        # Every epoch's metrics are in the run, those logged during the outage included.
        assert _metric_steps(uri, result["run_id"], "val_accuracy") == list(range(1, EPOCHS + 1))
        assert _metric_steps(uri, result["run_id"], "train_loss") == list(range(1, EPOCHS + 1))
        run = MlflowClient(tracking_uri=uri).get_run(result["run_id"])
        assert run.info.status == "FINISHED"
        assert run.data.metrics["val_accuracy"] == result["metrics"]["val_accuracy"]
    finally:
        if trainer.proc.poll() is None:
            trainer.resume()
            trainer.proc.kill()


def test_outage_until_the_end_fails_clearly_and_the_retry_delivers(tmp_path, digits_dir, tracking):
    uri = tracking.uri
    args = _args(digits_dir, tmp_path)
    env = trainer_env(uri, **OUTAGE_ENV)
    trainer = TrainerProcess(args, env)
    try:
        trainer.wait_for(f"epoch 2/{EPOCHS} train_loss")
        trainer.pause()
        tracking.stop()
        trainer.resume()
        output = trainer.finish()
    finally:
        if trainer.proc.poll() is None:
            trainer.proc.kill()

    # Still down at the end: one clear error line, exit status 2, no result, the work kept.
    assert trainer.proc.returncode == 2, output[-4000:]
    assert "gpu_trainer: error: training finished but MLflow tracking at" in output
    assert "val_accuracy=" in output.split("final metrics:")[1]
    assert "a retry of this task resumes from it" in output
    assert not (tmp_path / "result.json").exists()
    latest = checkpoint.load_latest(str(tmp_path / "ckpt"))
    assert latest is not None
    _, state = latest
    assert state["epoch"] == EPOCHS
    assert [row["step"] for row in state["pending_metrics"]] == list(range(3, EPOCHS + 1))

    # The server is back; the retry resumes after the last epoch and delivers what was kept.
    tracking.start()
    retry = run_trainer(args, env)
    assert retry.returncode == 0, retry.stdout[-3000:] + retry.stderr[-3000:]
    assert "resuming from" in retry.stdout + retry.stderr
    assert " train_loss " not in retry.stdout + retry.stderr, "the retry must not train again"
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["run_id"] == state["run_id"]
    assert result["metrics"]["val_accuracy"] > 0.9
    assert _metric_steps(uri, result["run_id"], "val_accuracy") == list(range(1, EPOCHS + 1))


def test_unreachable_at_start_fails_in_one_line_within_the_bounded_retries(tmp_path, digits_dir):
    # Nothing listens on this port. With MLflow's own defaults (7 retries, backoff factor 2) the first call
    # would retry for minutes; the trainer's bounds end it in seconds, well inside run_trainer's timeout.
    uri = f"http://127.0.0.1:{free_port()}"
    env = trainer_env(uri, MLFLOW_EXPERIMENT_NAME="outage")
    proc = run_trainer(_args(digits_dir, tmp_path), env, timeout=90)
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"gpu_trainer: error: cannot start the MLflow run at {uri}:" in proc.stderr
    assert "Traceback" not in proc.stderr
