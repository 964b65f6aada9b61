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
from tests.fixtures.trainer_runs import REPO_ROOT, run_trainer, trainer_args, trainer_env


def test_killed_run_resumes_at_epoch_3_in_the_same_mlflow_run(tmp_path, digits_dir, reference_run):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = trainer_env(uri, MLFLOW_EXPERIMENT_NAME="resume")
    args = trainer_args(digits_dir, tmp_path)
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


def test_resume_from_a_mid_epoch_checkpoint_replays_the_rest_of_the_epoch(tmp_path, digits_dir, monkeypatch):
    from gpu_trainer.train import main

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.delenv(contract.ENV_HYPERPARAMETERS, raising=False)
    common = [
        "--data",
        str(digits_dir),
        "--epochs",
        "1",
        "--checkpoint-every-steps",
        "10",
        "--keep-checkpoints",
        "5",
    ]
    assert main([*common, "--checkpoint-dir", str(tmp_path / "a"), "--output", str(tmp_path / "a.json")]) == 0
    names = sorted(path.name for path in (tmp_path / "a").iterdir())
    assert names == ["ckpt-000000010.pt", "ckpt-000000020.pt", "ckpt-000000023.pt"]
    # Keep only the step-20 checkpoint: as if the process died 3 steps before the end of the epoch.
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "ckpt-000000020.pt").write_bytes((tmp_path / "a" / "ckpt-000000020.pt").read_bytes())
    assert main([*common, "--checkpoint-dir", str(tmp_path / "b"), "--output", str(tmp_path / "b.json")]) == 0
    first = contract.load_result(str(tmp_path / "a.json"))
    resumed = contract.load_result(str(tmp_path / "b.json"))
    assert resumed["resumed_from_epoch"] == 0 and resumed["run_id"] == first["run_id"]
    for name in ("train_loss", "val_loss", "val_accuracy", "val_f1"):
        assert resumed["metrics"][name] == pytest.approx(first["metrics"][name], rel=1e-5), name
