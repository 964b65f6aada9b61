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


def test_background_writer_saves_what_was_submitted_not_what_training_did_next(tmp_path):
    saved: list[tuple[str, int]] = []
    writer = checkpoint.CheckpointWriter(
        str(tmp_path), keep=2, on_saved=lambda path, state: saved.append((path, state["epoch"]))
    )
    live = _state(1)
    writer.submit(live, global_step=1)
    live["model"]["w"].add_(100.0)  # the next optimizer step mutates the live tensors in place
    live["epoch"] = 99
    writer.submit(_state(2), global_step=2)
    writer.submit(_state(3), global_step=3)
    writer.wait()

    assert [epoch for _, epoch in saved] == [1, 2, 3]  # in order, one at a time
    assert sorted(os.listdir(tmp_path)) == ["ckpt-000000002.pt", "ckpt-000000003.pt"]
    assert not os.path.exists(saved[0][0])  # pruned (keep=2)
    path, state = checkpoint.load_latest(str(tmp_path))
    assert state["epoch"] == 3 and torch.equal(state["model"]["w"], torch.full((2,), 3.0))


def test_background_writer_snapshot_is_isolated_from_later_mutation(tmp_path):
    writer = checkpoint.CheckpointWriter(str(tmp_path), keep=1)
    live = _state(7)
    writer.submit(live, global_step=7)
    live["model"]["w"].fill_(-1.0)
    writer.wait()
    _, state = checkpoint.load_latest(str(tmp_path))
    assert torch.equal(state["model"]["w"], torch.full((2,), 7.0))


def test_background_writer_failure_is_raised_on_the_training_thread(tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the checkpoint directory should be")
    writer = checkpoint.CheckpointWriter(str(blocker), keep=1)
    writer.submit(_state(1), global_step=1)
    with pytest.raises(TrainerError, match=r"writing a checkpoint to .*not-a-dir failed"):
        writer.wait()
    writer.wait()  # reported once


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_snapshot_reuses_pinned_buffers_and_copies_every_tensor(device):
    pinned: dict = {}
    live = {"model": {"w": torch.arange(4.0, device=device)}, "history": [{"loss": 1.0}], "step": 3}

    first = checkpoint.snapshot(live, pinned)
    if device == "cuda":
        torch.cuda.synchronize()
    live["model"]["w"].mul_(10)
    live["history"].append({"loss": 0.5})

    assert first["model"]["w"].device.type == "cpu"
    assert first["model"]["w"].tolist() == [0.0, 1.0, 2.0, 3.0]
    assert first["history"] == [{"loss": 1.0}] and first["step"] == 3
    second = checkpoint.snapshot(live, pinned)
    if device == "cuda":
        torch.cuda.synchronize()
        assert second["model"]["w"].is_pinned() and second["model"]["w"] is first["model"]["w"]
    assert second["model"]["w"].tolist() == [0.0, 10.0, 20.0, 30.0]
