"""Parquet in, tensors out.

The data is read once (local path or any fsspec URI, e.g. ``s3://``), validated, and kept as two
contiguous tensors per split: batches are index slices of those tensors, never per-row ``__getitem__``
calls, and on CUDA the tensors live in pinned memory so host-to-device copies can overlap compute.
"""

from __future__ import annotations

import dataclasses
import math
import posixpath
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from gpu_trainer.errors import TrainerError

if TYPE_CHECKING:
    import pandas as pd


@dataclasses.dataclass
class Split:
    """One split as tensors: ``features`` float32 (rows, n_features), ``labels`` int64 (rows,)."""

    features: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclasses.dataclass
class Dataset:
    """Train and validation splits plus what the model needs to know about them.

    :param train: the training split.
    :param val: the validation split.
    :param feature_columns: the feature columns, in tensor order.
    :param num_classes: number of classes (max label + 1 over both splits).
    :param separate_val: whether the validation split came from the data (else split off by ``val_fraction``).
    """

    train: Split
    val: Split
    feature_columns: list[str]
    num_classes: int
    separate_val: bool

    @property
    def num_features(self) -> int:
        return len(self.feature_columns)

    def signature(self) -> dict[str, Any]:
        """What a checkpoint records about the data, to refuse resuming on different data."""
        return {
            "train_rows": len(self.train),
            "val_rows": len(self.val),
            "feature_columns": list(self.feature_columns),
            "num_classes": self.num_classes,
        }


def _filesystem(uri: str) -> tuple[Any, str]:
    import fsspec

    fs, path = fsspec.core.url_to_fs(uri)
    return fs, path


def _parquet_files(fs: Any, path: str) -> list[str]:
    return sorted(
        item
        for item in fs.find(path)
        if item.endswith(".parquet") and not posixpath.basename(item).startswith(".")
    )


def discover(uri: str) -> tuple[list[str], list[str], Any]:
    """Find the Parquet files behind ``uri``: (train files, val files, filesystem).

    A directory holding ``train*.parquet`` / ``val*.parquet`` files, or ``train/`` and ``val/``
    subdirectories, has a separate validation split; otherwise every file is training data and the val
    list is empty.

    :param uri: a Parquet file or directory, local or an fsspec URI.
    :raises TrainerError: when nothing is there or no Parquet file is found.
    """
    fs, path = _filesystem(uri)
    try:
        exists = fs.exists(path)
    except Exception as err:  # object stores raise their own types (credentials, DNS, ...)
        raise TrainerError(f"--data {uri!r} cannot be read: {type(err).__name__}: {err}") from err
    if not exists:
        raise TrainerError(f"--data {uri!r} does not exist (expected a Parquet file or a directory of them)")
    if not fs.isdir(path):
        return [path], [], fs
    files = _parquet_files(fs, path)
    if not files:
        raise TrainerError(f"--data {uri!r} holds no .parquet files")
    rel = {item: posixpath.relpath(item, path.rstrip("/")) for item in files}

    def pick(prefix: str) -> list[str]:
        return [item for item, name in rel.items() if name.startswith(prefix)]

    train, val = pick("train"), [*pick("val"), *pick("validation")]
    val = sorted(set(val))
    if train and val:
        return train, val, fs
    return files, [], fs


def _read(fs: Any, files: Sequence[str]) -> pd.DataFrame:
    import pandas as pd
    import pyarrow.parquet as pq

    frames = []
    for item in files:
        try:
            with fs.open(item, "rb") as fh:
                frames.append(pq.read_table(fh).to_pandas())
        except Exception as err:  # pyarrow / object-store errors: report which file and why
            raise TrainerError(f"cannot read Parquet file {item!r}: {type(err).__name__}: {err}") from err
    return pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]


def _to_split(frame: pd.DataFrame, feature_columns: list[str], label_column: str, where: str) -> Split:
    features = frame[feature_columns].to_numpy(dtype=np.float32, copy=True)
    bad = ~np.isfinite(features)
    if bad.any():
        rows, cols = np.nonzero(bad)
        columns = sorted({feature_columns[c] for c in cols})
        raise TrainerError(
            f"{where}: {int(bad.sum())} NaN/infinite feature value(s) in column(s) {columns[:10]} "
            f"(first at row {int(rows[0])}); clean or impute the data first"
        )
    raw_labels = frame[label_column].to_numpy()
    try:
        labels = raw_labels.astype(np.float64)
    except (TypeError, ValueError) as err:
        raise TrainerError(
            f"{where}: label column {label_column!r} must hold non-negative integer class ids, "
            f"got values like {raw_labels[:3].tolist()}"
        ) from err
    if not np.all(np.isfinite(labels)) or np.any(labels < 0) or np.any(labels != np.round(labels)):
        raise TrainerError(
            f"{where}: label column {label_column!r} must hold non-negative integer class ids "
            f"(no NaN), got values like {raw_labels[:3].tolist()}"
        )
    return Split(torch.from_numpy(features), torch.from_numpy(labels.astype(np.int64)))


def _columns(frame: pd.DataFrame, label_column: str, feature_columns: Sequence[str], where: str) -> list[str]:
    if label_column not in frame.columns:
        raise TrainerError(
            f"{where}: label column {label_column!r} not found (--label-column); columns are {list(frame.columns)[:20]}"
        )
    if feature_columns:
        missing = [name for name in feature_columns if name not in frame.columns]
        if missing:
            raise TrainerError(f"{where}: feature column(s) {missing} not found (--feature-columns)")
        return list(feature_columns)
    numeric = [
        str(name) for name, dtype in frame.dtypes.items() if name != label_column and (dtype.kind in "biuf")
    ]
    if not numeric:
        raise TrainerError(f"{where}: no numeric feature columns besides the label {label_column!r}")
    return numeric


def load_dataset(
    uri: str,
    *,
    label_column: str = "label",
    feature_columns: Sequence[str] = (),
    val_fraction: float = 0.2,
    seed: int = 0,
) -> Dataset:
    """Read Parquet data into in-memory tensors with a train/validation split.

    :param uri: a Parquet file or directory, local or an fsspec URI.
    :param label_column: the label column (non-negative integer class ids).
    :param feature_columns: feature columns; empty means every other numeric column.
    :param val_fraction: share held out for validation when there is no separate split.
    :param seed: seeds the held-out split so every rank and every resume sees the same split.
    :raises TrainerError: for missing data, a missing label column, NaN features or bad labels.
    """
    train_files, val_files, fs = discover(uri)
    train_frame = _read(fs, train_files)
    columns = _columns(train_frame, label_column, feature_columns, uri)
    if val_files:
        val_frame = _read(fs, val_files)
        _columns(val_frame, label_column, columns, f"{uri} (validation files)")
        train = _to_split(train_frame, columns, label_column, uri)
        val = _to_split(val_frame, columns, label_column, f"{uri} (validation files)")
    else:
        everything = _to_split(train_frame, columns, label_column, uri)
        n = len(everything)
        n_val = max(1, round(n * val_fraction))
        if n - n_val < 1:
            raise TrainerError(
                f"--data {uri!r} has {n} row(s): too few to hold out val_fraction={val_fraction}"
            )
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        val_idx, train_idx = order[:n_val], order[n_val:]
        train = Split(everything.features[train_idx], everything.labels[train_idx])
        val = Split(everything.features[val_idx], everything.labels[val_idx])
    if len(train) == 0 or len(val) == 0:
        raise TrainerError(f"--data {uri!r}: the train and validation splits must both have rows")
    classes = torch.unique(train.labels)
    if len(classes) < 2:
        # One class trains a constant predictor that reports a meaningless accuracy; never useful.
        raise TrainerError(
            f"--data {uri!r}: every training row has label {int(classes[0].item())} in column "
            f"{label_column!r} ({len(train)} rows): a classifier needs at least two classes "
            "(check the label column and how the data was filtered)"
        )
    num_classes = int(max(train.labels.max().item(), val.labels.max().item())) + 1
    return Dataset(train, val, columns, num_classes, separate_val=bool(val_files))


def load_holdout(
    uri: str, *, label_column: str = "label", feature_columns: Sequence[str] = ()
) -> tuple[Split, list[str]]:
    """Read a holdout set: every row of ``uri``, or only its validation files when it has a split.

    :param uri: a Parquet file or directory, local or an fsspec URI.
    :param label_column: the label column.
    :param feature_columns: feature columns; empty means every other numeric column.
    :raises TrainerError: for missing data, a missing label column, NaN features or bad labels.
    """
    train_files, val_files, fs = discover(uri)
    frame = _read(fs, val_files or train_files)
    columns = _columns(frame, label_column, feature_columns, uri)
    return _to_split(frame, columns, label_column, uri), columns


def pin(split: Split) -> Split:
    """Page-lock a split's tensors so ``.to(cuda, non_blocking=True)`` is a true async copy."""
    return Split(split.features.pin_memory(), split.labels.pin_memory())


def epoch_indices(
    n: int, *, epoch: int, seed: int, rank: int, world_size: int, shuffle: bool
) -> torch.Tensor:
    """This rank's sample order for one epoch, exactly as ``DistributedSampler`` would give it.

    Derived from (seed, epoch) alone, so a resumed run replays the same order as an uninterrupted one.

    :param n: dataset size.
    :param epoch: zero-based epoch.
    :param seed: the run's seed.
    :param rank: this process's rank.
    :param world_size: number of processes.
    :param shuffle: shuffle (training) or keep order (evaluation).
    """
    # DistributedSampler's own algorithm (drop_last=False), on tensors: its __iter__ goes through a
    # Python list of n ints, about a second per epoch at a few million rows, time the GPU sits idle.
    if shuffle:
        generator = torch.Generator()
        generator.manual_seed(seed + epoch)
        order = torch.randperm(n, generator=generator)
    else:
        order = torch.arange(n)
    total = math.ceil(n / world_size) * world_size
    padding = total - n
    if padding:
        order = torch.cat([order, order.repeat(math.ceil(padding / n))[:padding]])
    return order[rank:total:world_size].clone()


class _BatchView(torch.utils.data.Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Each item is a whole batch (one fancy-indexing gather), for DataLoader workers."""

    def __init__(self, split: Split, batches: list[torch.Tensor]) -> None:
        self.split = split
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = self.batches[index]
        return self.split.features[idx], self.split.labels[idx]


def iterate_batches(
    split: Split,
    indices: torch.Tensor,
    batch_size: int,
    *,
    skip_batches: int = 0,
    num_workers: int = 0,
    pin_memory: bool = False,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(features, labels)`` batches in ``indices`` order.

    :param split: the split to read.
    :param indices: sample order (see :func:`epoch_indices`).
    :param batch_size: batch size; the last batch may be smaller.
    :param skip_batches: batches to skip (mid-epoch resume).
    :param num_workers: 0 gathers in this process; more uses DataLoader workers.
    :param pin_memory: pin batches produced by workers (CUDA).
    """
    batches = list(torch.split(indices, batch_size))[skip_batches:]
    if num_workers <= 0:
        for idx in batches:
            yield split.features[idx], split.labels[idx]
        return
    loader = torch.utils.data.DataLoader(
        _BatchView(split, batches),
        batch_size=None,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=False,
        worker_init_fn=_ignore_sigterm,
    )
    yield from loader


def _ignore_sigterm(worker_id: int) -> None:
    """A DataLoader worker leaves SIGTERM to the trainer: sent to the whole process group
    (``kill -TERM -<pgid>``) it would otherwise kill the workers, and a batch the trainer still needs
    before it stops (under torchrun the ranks stop a step after the signal) would never come. The workers
    end with the loader, or with the trainer (they watch it)."""
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
