"""End to end: the trainer on real digits data, tracked in a SQLite MLflow store, then scored again."""

from __future__ import annotations

import json
import re

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from gpu_trainer import contract
from gpu_trainer.evaluate import main as evaluate_main


def test_mlp_learns_digits_and_writes_a_valid_result(reference_run):
    result = contract.validate_result(
        reference_run["result"], require_metrics=contract.CLASSIFICATION_METRICS
    )
    assert result["metrics"]["val_accuracy"] >= 0.90
    assert result["metrics"]["val_f1"] >= 0.88
    assert result["metrics"]["train_loss"] < 0.5
    assert result["resumed_from_epoch"] is None
    assert result["model_uri"] == f"runs:/{result['run_id']}/model"
    assert result["params"]["epochs"] == 4 and result["params"]["seed"] == 7
    # One plain progress line per epoch, with loss, throughput and ETA; no carriage-return bars.
    lines = [
        line for line in reference_run["stdout"].splitlines() if re.search(r"epoch \d/4 train_loss", line)
    ]
    assert len(lines) == 4
    assert all("samples/s" in line and "eta" in line for line in lines)
    assert "\r" not in reference_run["stdout"]


def test_metrics_params_tags_and_figures_land_in_mlflow(reference_run):
    client = MlflowClient(tracking_uri=reference_run["tracking_uri"])
    run = client.get_run(reference_run["result"]["run_id"])
    assert run.info.status == "FINISHED"
    # Reported, so the operator's run link needs no MLflow request.
    assert reference_run["result"]["experiment_id"] == run.info.experiment_id
    for name in ("train_loss", "val_loss", "val_accuracy", "val_f1", "samples_per_s"):
        history = client.get_metric_history(run.info.run_id, name)
        assert sorted(point.step for point in history) == [1, 2, 3, 4], name
    assert run.data.metrics["val_accuracy"] == pytest.approx(
        reference_run["result"]["metrics"]["val_accuracy"]
    )
    assert run.data.params["optimizer"] == "adamw"
    assert run.data.params["lr"] == "0.002"
    expected_tags = contract.lineage_tags(reference_run["lineage"])
    assert {key: run.data.tags.get(key) for key in expected_tags} == expected_tags
    artifacts = {item.path for item in client.list_artifacts(run.info.run_id, "figures")}
    assert artifacts == {"figures/loss_curves.png", "figures/confusion_matrix.png"}


def test_evaluate_scores_the_logged_model_like_the_trainer(reference_run, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", reference_run["tracking_uri"])
    digits = reference_run["result"]["params"]["data"]
    output = tmp_path / "eval.json"
    assert (
        evaluate_main(
            ["--model-uri", reference_run["result"]["model_uri"], "--data", digits, "--output", str(output)]
        )
        == 0
    )
    scored = contract.load_result(str(output))
    assert scored["run_id"] == reference_run["result"]["run_id"]
    # The holdout is the val split the trainer validated on: same model, same rows, same numbers.
    assert scored["metrics"]["val_accuracy"] == pytest.approx(
        reference_run["result"]["metrics"]["val_accuracy"]
    )
    assert scored["metrics"]["val_loss"] == pytest.approx(
        reference_run["result"]["metrics"]["val_loss"], rel=1e-4
    )


def test_trains_against_a_real_tracking_server_and_registers_the_result(
    mlflow_server, digits_dir, tmp_path, monkeypatch
):
    from gpu_trainer.train import main as train_main

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    monkeypatch.setenv(
        contract.ENV_HYPERPARAMETERS, json.dumps({"epochs": 2, "batch_size": 128, "lr": 0.003})
    )
    monkeypatch.setenv(contract.ENV_RESULT_PATH, str(tmp_path / "result.json"))
    monkeypatch.setenv(contract.ENV_EXPERIMENT_NAME, "server-test")
    monkeypatch.setenv(contract.ENV_RUN_NAME, "server-run")
    assert train_main(["--data", str(digits_dir), "--model", "cnn"]) == 0
    result = contract.load_result(str(tmp_path / "result.json"))
    assert result["params"]["model"] == "cnn" and result["params"]["epochs"] == 2
    assert result["metrics"]["val_accuracy"] > 0.5
    client = MlflowClient(tracking_uri=mlflow_server.uri)
    run = client.get_run(result["run_id"])
    assert run.info.run_name == "server-run"
    assert run.data.params["batch_size"] == "128"
    # What the register operator will do with the result: it must give a version tied to this run.
    version = mlflow.register_model(result["model_uri"], "digits-cnn")
    assert version.run_id == result["run_id"]
    assert client.get_model_version("digits-cnn", version.version).status == "READY"
