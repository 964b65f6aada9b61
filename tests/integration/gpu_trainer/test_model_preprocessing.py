"""The logged model carries its preprocessing: MLflow's own pyfunc client scores raw features."""

from __future__ import annotations

from pathlib import Path

import mlflow.pyfunc
import numpy as np
import pandas as pd
import torch
from mlflow.models import get_model_info

from gpu_trainer import checkpoint


def _raw_split(digits_dir, name: str) -> tuple[np.ndarray, np.ndarray]:
    frame = pd.read_parquet(digits_dir / f"{name}.parquet")
    return frame.drop(columns=["label"]).to_numpy(np.float32), frame["label"].to_numpy()


def test_pyfunc_model_scores_raw_held_out_digits(reference_run, digits_dir, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", reference_run["tracking_uri"])
    features, labels = _raw_split(digits_dir, "val")
    # Raw pixel intensities 0..16, no scaling anywhere before the model.
    assert features.max() == 16.0

    model = mlflow.pyfunc.load_model(reference_run["result"]["model_uri"])
    scores = np.asarray(model.predict(features))

    assert scores.shape == (len(labels), 10)
    assert (scores.argmax(axis=1) == labels).mean() >= 0.90


def test_model_standardizes_with_train_split_statistics_kept_in_checkpoints(reference_run, digits_dir):
    train_features, _ = _raw_split(digits_dir, "train")
    val_features, _ = _raw_split(digits_dir, "val")
    path, state = checkpoint.load_latest(str(reference_run["root"] / "ckpt"))
    mean, std = state["model"]["standardize.mean"], state["model"]["standardize.std"]

    # Fitted on the train split only (the val split's statistics differ), saved with the weights so a
    # resumed run and the logged model apply exactly the same scaling.
    assert torch.allclose(mean, torch.from_numpy(train_features.mean(axis=0)), atol=1e-4)
    assert not torch.allclose(mean, torch.from_numpy(val_features.mean(axis=0)), atol=1e-3)
    # Constant pixels (always 0 in the corners) keep a unit scale instead of dividing by zero.
    assert torch.all(std[train_features.std(axis=0) == 0] == 1.0)


def test_logged_model_pins_torch_without_local_version_label(reference_run, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", reference_run["tracking_uri"])
    requirements = mlflow.pyfunc.get_model_dependencies(reference_run["result"]["model_uri"])
    pins = [line.strip() for line in Path(requirements).read_text().splitlines() if line.strip()]
    torch_pin = next(pin for pin in pins if pin.startswith("torch=="))

    assert torch_pin == f"torch=={torch.__version__.split('+')[0]}"
    assert any(pin.startswith("cloudpickle==") for pin in pins)
    assert get_model_info(reference_run["result"]["model_uri"]).signature is not None
    # MLflow warns about a local version label ("+cpu") only when it pins torch itself.
    assert "local version label" not in reference_run["stdout"]
