from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from gpu_trainer.data import discover, epoch_indices, iterate_batches, load_dataset, load_holdout
from gpu_trainer.digits import main as digits_main
from gpu_trainer.digits import write_digits
from gpu_trainer.errors import TrainerError


def _frame(n: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {"x1": rng.normal(size=n), "x2": rng.normal(size=n), "name": ["r"] * n, "y": rng.integers(0, 3, n)}
    )


def test_digits_helper_writes_a_stratified_split(tmp_path):
    paths = write_digits(str(tmp_path))
    train, val = (pd.read_parquet(path) for path in paths)
    assert len(train) + len(val) == 1797 and abs(len(val) - 360) <= 1
    assert list(train.columns) == [f"px_{i}" for i in range(64)] + ["label"]
    assert sorted(val["label"].unique()) == list(range(10))
    assert digits_main(["--output", str(tmp_path / "one"), "--single-file"]) == 0
    assert len(pd.read_parquet(tmp_path / "one" / "digits.parquet")) == 1797


def test_separate_split_from_files_or_subdirectories(tmp_path):
    _frame(20).to_parquet(tmp_path / "train-0.parquet")
    _frame(8, 1).to_parquet(tmp_path / "val-0.parquet")
    train, val, _ = discover(str(tmp_path))
    assert [p.rsplit("/", 1)[1] for p in train] == ["train-0.parquet"] and len(val) == 1
    sub = tmp_path / "nested"
    (sub / "train").mkdir(parents=True)
    (sub / "val").mkdir()
    _frame(20).to_parquet(sub / "train" / "part-0.parquet")
    _frame(6, 1).to_parquet(sub / "val" / "part-0.parquet")
    ds = load_dataset(str(sub), label_column="y")
    assert ds.separate_val and len(ds.train) == 20 and len(ds.val) == 6
    assert ds.feature_columns == ["x1", "x2"]  # the string column is not a feature


def test_single_file_is_split_by_val_fraction_deterministically(tmp_path):
    _frame(50).to_parquet(tmp_path / "all.parquet")
    a = load_dataset(str(tmp_path / "all.parquet"), label_column="y", val_fraction=0.2, seed=3)
    b = load_dataset(str(tmp_path / "all.parquet"), label_column="y", val_fraction=0.2, seed=3)
    assert len(a.val) == 10 and len(a.train) == 40 and not a.separate_val
    assert torch.equal(a.val.features, b.val.features)
    assert a.train.features.dtype == torch.float32 and a.train.labels.dtype == torch.int64
    holdout, columns = load_holdout(str(tmp_path / "all.parquet"), label_column="y")
    assert len(holdout) == 50 and columns == ["x1", "x2"]


def test_bad_labels_and_missing_feature_columns(tmp_path):
    frame = _frame(10)
    frame["y"] = frame["y"] - 1  # negative ids
    frame.to_parquet(tmp_path / "neg.parquet")
    with pytest.raises(TrainerError, match="non-negative integer class ids"):
        load_dataset(str(tmp_path / "neg.parquet"), label_column="y")
    _frame(10).to_parquet(tmp_path / "ok.parquet")
    with pytest.raises(TrainerError, match=r"feature column\(s\) \['x9'\] not found"):
        load_dataset(str(tmp_path / "ok.parquet"), label_column="y", feature_columns=["x1", "x9"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(TrainerError, match="holds no .parquet files"):
        load_dataset(str(tmp_path / "empty"))


def test_epoch_indices_shard_like_distributed_sampler_and_replay():
    ranks = [epoch_indices(10, epoch=1, seed=5, rank=r, world_size=2, shuffle=True) for r in range(2)]
    assert sorted(torch.cat(ranks).tolist()) == list(range(10))
    assert torch.equal(ranks[0], epoch_indices(10, epoch=1, seed=5, rank=0, world_size=2, shuffle=True))
    assert not torch.equal(ranks[0], epoch_indices(10, epoch=2, seed=5, rank=0, world_size=2, shuffle=True))


def test_iterate_batches_in_process_and_with_workers_agree():
    from gpu_trainer.data import Split

    split = Split(torch.arange(20, dtype=torch.float32).reshape(10, 2), torch.arange(10))
    order = torch.tensor([9, 8, 7, 6, 5, 4, 3, 2, 1, 0])
    direct = list(iterate_batches(split, order, 4, skip_batches=1))
    assert [y.tolist() for _, y in direct] == [[5, 4, 3, 2], [1, 0]]
    workers = list(iterate_batches(split, order, 4, skip_batches=1, num_workers=1))
    assert all(
        torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(direct, workers, strict=True)
    )


@pytest.mark.parametrize(
    ("n", "world_size", "shuffle"),
    [(10, 1, True), (10, 3, True), (2, 4, True), (1437, 2, False), (7, 2, True)],
)
def test_epoch_indices_equal_distributed_sampler_exactly(n, world_size, shuffle):
    from torch.utils.data.distributed import DistributedSampler

    for rank in range(world_size):
        for epoch in (0, 3):
            sampler = DistributedSampler(
                range(n), num_replicas=world_size, rank=rank, shuffle=shuffle, seed=11
            )
            sampler.set_epoch(epoch)
            ours = epoch_indices(n, epoch=epoch, seed=11, rank=rank, world_size=world_size, shuffle=shuffle)
            assert ours.tolist() == list(sampler)


def test_a_single_class_training_set_is_refused(tmp_path):
    frame = _frame(30)
    frame["y"] = 2
    frame.to_parquet(tmp_path / "one-class.parquet")
    with pytest.raises(TrainerError, match=r"every training row has label 2 in column 'y' \(24 rows\)"):
        load_dataset(str(tmp_path), label_column="y")
    # Two classes are enough.
    frame.loc[:14, "y"] = 0
    frame.to_parquet(tmp_path / "one-class.parquet")
    assert load_dataset(str(tmp_path), label_column="y").num_classes == 3
