"""The trainer on two nodes of one process each (two torchrun agents over gloo, started by the local multi-node
launcher the way JobSet starts them): rank 0 alone tracks, checkpoints and reports; every rank resumes from the
same checkpoint; ranks that see different checkpoints stop with a clear error instead of hanging."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

from mlflow.tracking import MlflowClient

from airflow_provider_mltrain.launchers.local_nodes import LocalNodesLauncher
from gpu_trainer import checkpoint
from tests.fixtures.logs import ListLog
from tests.fixtures.trainer_runs import trainer_env

#: Small and fixed: both runs of a test must agree on every field that changes the math.
ARGS = ["--epochs", "2", "--batch-size", "64", "--lr", "0.002", "--seed", "7", "--hidden-dim", "32"]


def run_two_nodes(tmp_path, digits_dir, command, *, epochs: int, experiment: str = "multinode"):
    lines = ListLog()
    launcher = LocalNodesLauncher(
        lines, checkpoint_dir=str(tmp_path / "ckpt"), num_nodes=2, nproc_per_node=1, timeout_s=240
    )
    env = trainer_env(f"sqlite:///{tmp_path / 'mlflow.db'}", MLFLOW_EXPERIMENT_NAME=experiment)
    args = [*ARGS, "--data", str(digits_dir)]
    args[args.index("--epochs") + 1] = str(epochs)
    return launcher.run([*command, *args], env), lines


def test_two_nodes_track_once_and_every_rank_resumes_from_the_same_checkpoint(tmp_path, digits_dir):
    trainer = ["torchrun", "-m", "gpu_trainer.train", "--checkpoint-dir", str(tmp_path / "ckpt")]

    first, first_lines = run_two_nodes(tmp_path, digits_dir, trainer, epochs=1)
    assert first.returncode == 0, "\n".join(first_lines.lines[-40:])
    second, second_lines = run_two_nodes(tmp_path, digits_dir, trainer, epochs=2)
    assert second.returncode == 0, "\n".join(second_lines.lines[-40:])

    assert first.result is not None and second.result is not None
    assert second.result["params"]["world_size"] == 2
    assert second.result["resumed_from_epoch"] == 1
    assert second.result["run_id"] == first.result["run_id"]  # the resumed run continues the same MLflow run
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("multinode").experiment_id])
    assert [run.info.run_id for run in runs] == [first.result["run_id"]]
    assert [m.step for m in client.get_metric_history(first.result["run_id"], "val_accuracy")] == [1, 2]
    # Rank 0 alone logs progress, and it runs on node 0.
    epoch_lines = [line for line in second_lines.lines if "train_loss" in line]
    assert len(epoch_lines) == 1 and epoch_lines[0].startswith("[node 0] ") and "[rank 0]" in epoch_lines[0]
    # Both epochs' steps in the checkpoints: rank 1 did not start over (it would have hung rank 0 or
    # trained an epoch more).
    steps = [int(path[-12:-3]) for path in checkpoint.list_checkpoints(str(tmp_path / "ckpt"))]
    assert max(steps) == 2 * min(steps)


def test_ranks_that_see_different_checkpoints_stop_with_a_clear_error(tmp_path, digits_dir):
    # Node-local checkpoint directories (what an emptyDir or a ReadWriteOnce volume per node gives):
    # node 0's holds a checkpoint, node 1's is empty.
    per_node = f'exec {sys.executable} -m gpu_trainer.train --checkpoint-dir "$0/node-$PET_NODE_RANK" "$@"'
    command = ["torchrun", "--no-python", "sh", "-c", per_node, str(tmp_path)]
    (tmp_path / "node-1").mkdir()
    one_node = LocalNodesLauncher(
        ListLog(), checkpoint_dir=str(tmp_path / "ckpt"), num_nodes=1, nproc_per_node=1, timeout_s=240
    )
    env = trainer_env(f"sqlite:///{tmp_path / 'mlflow.db'}", MLFLOW_EXPERIMENT_NAME="local-dirs")
    seeded = one_node.run([*command, *ARGS, "--epochs", "1", "--data", str(digits_dir)], env)
    assert seeded.returncode == 0 and checkpoint.list_checkpoints(str(tmp_path / "node-0"))

    run, lines = run_two_nodes(tmp_path, digits_dir, command, epochs=2, experiment="local-dirs")

    assert run.returncode != 0 and run.result is None
    text = "\n".join(lines.lines)
    assert "the ranks see different checkpoints" in text, text[-4000:]
    assert "rank 0: ckpt-" in text and "rank 1: none" in text
    assert "ReadWriteMany" in text


def test_a_preempted_node_restarts_the_set_which_resumes_from_the_shared_checkpoint(tmp_path, digits_dir):
    # Slow enough to be stopped mid-run: small batches, twelve epochs (about a second each on 2 cores).
    args = [*ARGS, "--data", str(digits_dir), "--checkpoint-dir", str(tmp_path / "ckpt")]
    args[args.index("--epochs") + 1] = "12"
    args[args.index("--batch-size") + 1] = "8"
    lines = ListLog()
    launcher = LocalNodesLauncher(
        lines,
        checkpoint_dir=str(tmp_path / "ckpt"),
        num_nodes=2,
        nproc_per_node=1,
        timeout_s=400,
        max_restarts=1,
    )
    env = trainer_env(f"sqlite:///{tmp_path / 'mlflow.db'}", MLFLOW_EXPERIMENT_NAME="preempted")
    outcome: dict = {}
    runner = threading.Thread(
        target=lambda: outcome.update(run=launcher.run(["torchrun", "-m", "gpu_trainer.train", *args], env))
    )
    runner.start()
    deadline = time.monotonic() + 240
    while not checkpoint.list_checkpoints(str(tmp_path / "ckpt")) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert checkpoint.list_checkpoints(str(tmp_path / "ckpt")), "\n".join(lines.lines[-40:])
    # The kubelet's SIGTERM to node 1's container (its torchrun agent), as when that node is reclaimed.
    os.kill(launcher._processes[1].proc.pid, signal.SIGTERM)
    runner.join(400)

    run = outcome["run"]
    assert run.returncode == 0, "\n".join(lines.lines[-60:])
    assert run.restarts == 1 and run.result is not None
    assert any("restarting all 2 nodes (restart 1 of 1)" in line for line in lines.lines)
    assert run.result["resumed_from_epoch"] is not None and run.result["params"]["world_size"] == 2
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("preempted").experiment_id])
    assert [r.info.run_id for r in runs] == [run.result["run_id"]]  # the restart continued the same run
    history = client.get_metric_history(run.result["run_id"], "val_accuracy")
    assert sorted({m.step for m in history}) == list(range(1, 13))
