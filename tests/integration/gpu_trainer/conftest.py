"""Fixtures for the trainer's integration tests: real digits data and one reference training run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from gpu_trainer.digits import write_digits
from tests.fixtures.trainer_runs import (
    REPO_ROOT,
    TORCHRUN_TWO_PROCESSES,
    ddp_trainer_args,
    run_trainer,
    trainer_args,
    trainer_env,
)


@pytest.fixture(autouse=True)
def _mlflow_uri_from_environment():
    """Let ``MLFLOW_TRACKING_URI`` decide, as in the container: undo any ``mlflow.set_tracking_uri``
    another test in this process made, and leave none behind."""
    from mlflow.tracking._tracking_service import utils

    saved = utils._tracking_uri
    utils._tracking_uri = None
    yield
    utils._tracking_uri = saved


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """scikit-learn's digits as train.parquet / val.parquet."""
    out = tmp_path_factory.mktemp("digits")
    write_digits(str(out))
    return out


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory: pytest.TempPathFactory, digits_dir: Path) -> dict:
    """An uninterrupted 4-epoch run on a SQLite store; returns paths and the result."""
    root = tmp_path_factory.mktemp("reference-run")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    lineage = {
        "dag_id": "train_dag",
        "run_id": "manual__1",
        "task_id": "train",
        "map_index": -1,
        "try_number": 1,
    }
    env = trainer_env(uri, MLTRAIN_LINEAGE=json.dumps(lineage), MLFLOW_EXPERIMENT_NAME="reference")
    proc = run_trainer(trainer_args(digits_dir, root), env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {
        "root": root,
        "tracking_uri": uri,
        "result": json.loads((root / "result.json").read_text()),
        "stdout": proc.stdout,
        "lineage": lineage,
    }


@pytest.fixture(scope="session")
def ddp_reference_run(tmp_path_factory: pytest.TempPathFactory, digits_dir: Path) -> dict:
    """An uninterrupted torchrun run, two CPU processes (gloo); returns paths, output and the result."""
    root = tmp_path_factory.mktemp("ddp-reference-run")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    env = trainer_env(uri, MLFLOW_EXPERIMENT_NAME="ddp")
    proc = subprocess.run(
        [
            sys.executable,
            *TORCHRUN_TWO_PROCESSES,
            "-m",
            "gpu_trainer.train",
            *ddp_trainer_args(digits_dir, root),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO_ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return {
        "root": root,
        "tracking_uri": uri,
        "result": json.loads((root / "result.json").read_text()),
        "stdout": proc.stdout,
    }
