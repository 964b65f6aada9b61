"""``python -m gpu_trainer.evaluate`` for a champion that may not exist yet (``--allow-missing-model``)."""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from gpu_trainer import contract
from gpu_trainer.evaluate import main as evaluate_main


@pytest.fixture
def store(reference_run, monkeypatch) -> MlflowClient:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", reference_run["tracking_uri"])
    return MlflowClient(tracking_uri=reference_run["tracking_uri"])


@pytest.mark.parametrize("registered", [False, True], ids=["no-registered-model", "no-alias-holder"])
def test_missing_champion_writes_empty_metrics_with_the_flag(store, digits_dir, tmp_path, registered):
    name = f"eval-missing-{registered}-{tmp_path.name}"
    if registered:
        store.create_registered_model(name)
    output = tmp_path / "eval.json"
    args = ["--model-uri", f"models:/{name}@champion", "--data", str(digits_dir), "--output", str(output)]

    assert evaluate_main([*args, "--allow-missing-model"]) == 0

    result = contract.load_result(str(output))
    assert result["metrics"] == {} and result["run_id"] is None
    assert result["model_uri"] == f"models:/{name}@champion"
    assert result["params"]["model_found"] is False and result["params"]["rows"] == 360


def test_missing_champion_without_the_flag_is_one_error_line(store, digits_dir, tmp_path, capsys):
    uri = f"models:/eval-absent-{tmp_path.name}@champion"
    output = tmp_path / "eval.json"

    assert evaluate_main(["--model-uri", uri, "--data", str(digits_dir), "--output", str(output)]) == 2

    assert f"--model-uri {uri!r} cannot be loaded" in capsys.readouterr().err
    assert not output.exists()


def test_flag_does_not_hide_a_model_that_exists(store, reference_run, digits_dir, tmp_path):
    output = tmp_path / "eval.json"
    uri = reference_run["result"]["model_uri"]
    args = ["--model-uri", uri, "--data", str(digits_dir), "--output", str(output), "--allow-missing-model"]

    assert evaluate_main(args) == 0

    result = contract.load_result(str(output))
    assert result["params"]["model_found"] is True
    assert result["run_id"] == reference_run["result"]["run_id"]
    assert result["metrics"]["val_accuracy"] == pytest.approx(
        reference_run["result"]["metrics"]["val_accuracy"]
    )
