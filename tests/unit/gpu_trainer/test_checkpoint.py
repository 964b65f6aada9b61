from __future__ import annotations

import logging
import os

import pytest
import torch

from gpu_trainer import checkpoint, runtime
from gpu_trainer.errors import TrainerError


def _state(step: int) -> dict:
    return {
        "model": {"w": torch.full((2,), float(step))},
        "epoch": step,
        "config": {"lr": 0.1},
        "rng": runtime.rng_state(),
    }


def test_atomic_save_keeps_the_last_k(tmp_path):
    for step in (10, 20, 30, 40):
        checkpoint.save_checkpoint(str(tmp_path), _state(step), global_step=step, keep=2)
    assert sorted(os.listdir(tmp_path)) == ["ckpt-000000030.pt", "ckpt-000000040.pt"]
    path, state = checkpoint.load_latest(str(tmp_path))
    assert path.endswith("ckpt-000000040.pt") and state["epoch"] == 40
    assert torch.equal(state["model"]["w"], torch.full((2,), 40.0))


def test_corrupt_newest_falls_back_with_a_warning(tmp_path, caplog):
    checkpoint.save_checkpoint(str(tmp_path), _state(1), global_step=1, keep=3)
    newest = checkpoint.save_checkpoint(str(tmp_path), _state(2), global_step=2, keep=3)
    with open(newest, "r+b") as fh:
        fh.truncate(40)  # a torn write
    (tmp_path / ".ckpt-abc.tmp").write_bytes(b"half")  # leftovers of a killed save are ignored
    with caplog.at_level(logging.WARNING, logger="gpu_trainer"):
        logging.getLogger("gpu_trainer").propagate = True
        path, state = checkpoint.load_latest(str(tmp_path))
    assert state["epoch"] == 1
    assert any(
        "unreadable" in record.message and "ckpt-000000002.pt" in record.message for record in caplog.records
    )


def test_no_checkpoint_and_all_unreadable(tmp_path):
    assert checkpoint.load_latest(str(tmp_path / "missing")) is None
    (tmp_path / "ckpt-000000005.pt").write_bytes(b"garbage")
    with pytest.raises(TrainerError, match="no readable checkpoint"):
        checkpoint.load_latest(str(tmp_path))


def test_compatibility_ignores_epochs_and_paths_but_not_math():
    saved = {"lr": 0.1, "batch_size": 64, "epochs": 4, "output": "a", "data_signature": {"rows": 3}}
    checkpoint.check_compatible(saved, {**saved, "epochs": 8, "output": "b"}, path="p")
    with pytest.raises(TrainerError, match=r"batch_size: checkpoint=64 now=32; lr: checkpoint=0.1 now=0.2"):
        checkpoint.check_compatible(saved, {**saved, "lr": 0.2, "batch_size": 32}, path="p")
    with pytest.raises(TrainerError, match="data_signature"):
        checkpoint.check_compatible(saved, {**saved, "data_signature": {"rows": 4}}, path="p")


def test_rng_state_round_trips_through_weights_only_load(tmp_path):
    runtime.seed_everything(3)
    state = runtime.rng_state()
    expected = torch.rand(3)
    torch.save({"rng": state}, tmp_path / "rng.pt")
    runtime.seed_everything(99)
    runtime.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True)["rng"])
    assert torch.equal(torch.rand(3), expected)
