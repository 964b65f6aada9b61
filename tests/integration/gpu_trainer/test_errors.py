"""Bad inputs fail with exit status 2 and one clear line naming the problem."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from gpu_trainer import contract
from gpu_trainer.train import main
from tests.fixtures.trainer_runs import REPO_ROOT, trainer_env


def _error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("gpu_trainer: error: ")
    return err[0]


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    for name in (contract.ENV_HYPERPARAMETERS, contract.ENV_CHECKPOINT_DIR, contract.ENV_LINEAGE):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'never-used.db'}")
    return tmp_path


def test_missing_data(clean_env, capsys):
    assert main(["--data", str(clean_env / "nope"), "--output", str(clean_env / "r.json")]) == 2
    line = _error_line(capsys)
    assert "nope" in line and "does not exist" in line


def test_missing_label_column(clean_env, digits_dir, capsys):
    assert (
        main(["--data", str(digits_dir), "--label-column", "target", "--output", str(clean_env / "r.json")])
        == 2
    )
    line = _error_line(capsys)
    assert "label column 'target' not found" in line and "--label-column" in line


def test_nan_features(clean_env, capsys):
    frame = pd.DataFrame({"a": [1.0, np.nan, 3.0, 4.0], "b": [1.0, 2.0, 3.0, 4.0], "label": [0, 1, 0, 1]})
    frame.to_parquet(clean_env / "bad.parquet")
    assert main(["--data", str(clean_env / "bad.parquet"), "--output", str(clean_env / "r.json")]) == 2
    line = _error_line(capsys)
    assert "NaN" in line and "['a']" in line


def test_unknown_option(clean_env, capsys):
    assert main(["--data", "x", "--learning-rate", "0.1"]) == 2
    line = _error_line(capsys)
    assert "--learning-rate" in line


def test_bad_option_value_names_the_option(clean_env, capsys):
    assert main(["--data", "x", "--optimizer", "lion"]) == 2
    line = _error_line(capsys)
    assert "--optimizer" in line and "lion" in line and "adamw" in line


def test_unknown_hyperparameter_key(clean_env, monkeypatch, capsys):
    monkeypatch.setenv(contract.ENV_HYPERPARAMETERS, json.dumps({"learning_rate": 0.1}))
    assert main(["--data", "x"]) == 2
    line = _error_line(capsys)
    assert "learning_rate" in line and contract.ENV_HYPERPARAMETERS in line


def test_unreadable_checkpoint(clean_env, digits_dir, capsys):
    ckpt = clean_env / "ckpt"
    ckpt.mkdir()
    (ckpt / "ckpt-000000023.pt").write_bytes(b"not a checkpoint")
    assert (
        main(
            ["--data", str(digits_dir), "--checkpoint-dir", str(ckpt), "--output", str(clean_env / "r.json")]
        )
        == 2
    )
    line = _error_line(capsys)
    assert "no readable checkpoint" in line and str(ckpt) in line


def test_command_line_exit_status_and_single_stderr_line(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "gpu_trainer.train",
            "--data",
            str(tmp_path / "missing.parquet"),
            "--output",
            str(tmp_path / "r.json"),
        ],
        env=trainer_env(f"sqlite:///{tmp_path / 'm.db'}"),
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO_ROOT,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"gpu_trainer: error: --data {str(tmp_path / 'missing.parquet')!r} does not exist "
        "(expected a Parquet file or a directory of them)"
    ]
