"""torchrun with two CPU processes (gloo): one result file and one MLflow run, written by rank 0."""

from __future__ import annotations

from mlflow.tracking import MlflowClient

from tests.fixtures.trainer_runs import DDP_EPOCHS


def test_torchrun_two_processes_on_cpu(ddp_reference_run):
    root = ddp_reference_run["root"]
    result = ddp_reference_run["result"]
    assert sorted(path.name for path in root.iterdir() if path.suffix == ".json") == ["result.json"]
    assert result["params"]["world_size"] == 2
    assert result["metrics"]["val_accuracy"] > 0.8
    client = MlflowClient(tracking_uri=ddp_reference_run["tracking_uri"])
    runs = client.search_runs([client.get_experiment_by_name("ddp").experiment_id])
    assert [run.info.run_id for run in runs] == [result["run_id"]]
    # Only rank 0 logs progress: every epoch line comes from it.
    epoch_lines = [line for line in ddp_reference_run["stdout"].splitlines() if "train_loss" in line]
    assert len(epoch_lines) == DDP_EPOCHS and all("[rank 0]" in line for line in epoch_lines)
