"""SIGKILL the trainer mid-run; the restart resumes from its checkpoint, in the same MLflow run."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time

import pytest
from mlflow.tracking import MlflowClient

from gpu_trainer import checkpoint, contract

from .conftest import BASE_ARGS, REPO_ROOT, run_trainer, trainer_env


def test_killed_run_resumes_at_epoch_3_in_the_same_mlflow_run(tmp_path, digits_dir, reference_run):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = trainer_env(uri, MLFLOW_EXPERIMENT_NAME="resume")
    args = [
        "--data",
        str(digits_dir),
        *BASE_ARGS,
        "--checkpoint-dir",
        str(tmp_path / "ckpt"),
        "--output",
        str(tmp_path / "result.json"),
    ]
    proc = subprocess.Popen(
        [sys.executable, "-m", "gpu_trainer.train", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=REPO_ROOT,
    )
    seen = []
    deadline = time.monotonic() + 150
    assert proc.stdout is not None
    for line in proc.stdout:
        seen.append(line)
        if "checkpoint saved" in line and "(epoch 2," in line:
            proc.send_signal(signal.SIGKILL)
            break
        assert time.monotonic() < deadline, "".join(seen)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, "".join(seen)
    assert not (tmp_path / "result.json").exists()
    latest = checkpoint.load_latest(str(tmp_path / "ckpt"))
    assert latest is not None
    _, state = latest
    assert state["epoch"] == 2, "the kill should land before epoch 3 ends"
    killed_run_id = state["run_id"]

    restarted = run_trainer(args, env)
    assert restarted.returncode == 0, restarted.stdout[-3000:] + restarted.stderr[-3000:]
    assert "resuming from" in restarted.stdout
    assert re.search(r"epoch 3/4 train_loss", restarted.stdout)
    assert not re.search(r"epoch [12]/4 train_loss", restarted.stdout)
    result = contract.load_result(str(tmp_path / "result.json"))
    assert result["resumed_from_epoch"] == 2
    assert result["run_id"] == killed_run_id

    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("resume").experiment_id])
    assert [run.info.run_id for run in runs] == [killed_run_id]
    assert sorted({p.step for p in client.get_metric_history(killed_run_id, "val_accuracy")}) == [1, 2, 3, 4]

    # Same seed, same data order, restored optimizer state: the numbers match the uninterrupted run.
    reference = reference_run["result"]["metrics"]
    for name in ("train_loss", "val_loss", "val_accuracy", "val_f1"):
        assert result["metrics"][name] == pytest.approx(reference[name], rel=1e-4, abs=1e-6), name



