"""torchrun with two CPU processes (gloo): one result file and one MLflow run, written by rank 0."""

from __future__ import annotations

import subprocess
import sys

from mlflow.tracking import MlflowClient

from gpu_trainer import contract
from tests.fixtures.trainer_runs import REPO_ROOT, trainer_env


def test_torchrun_two_processes_on_cpu(tmp_path, digits_dir):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = tmp_path / "out"
    env = trainer_env(uri, MLFLOW_EXPERIMENT_NAME="ddp")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            "-m",
            "gpu_trainer.train",
            "--data",
            str(digits_dir),
            "--epochs",
            "2",
            "--batch-size",
            "64",
            "--lr",
            "0.003",
            "--checkpoint-dir",
            str(tmp_path / "ckpt"),
            "--output",
            str(out / "result.json"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        cwd=REPO_ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert [path.name for path in out.iterdir()] == ["result.json"]
    result = contract.load_result(str(out / "result.json"))
    assert result["params"]["world_size"] == 2
    assert result["metrics"]["val_accuracy"] > 0.8
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("ddp").experiment_id])
    assert [run.info.run_id for run in runs] == [result["run_id"]]
    # Only rank 0 logs progress: every epoch line comes from it.
    epoch_lines = [line for line in proc.stdout.splitlines() if "train_loss" in line]
    assert len(epoch_lines) == 2 and all("[rank 0]" in line for line in epoch_lines)
