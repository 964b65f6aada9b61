"""Turn scikit-learn's bundled digits dataset (real 8x8 handwritten digits, no download) into Parquet.

``python -m gpu_trainer.digits --output DIR`` writes ``DIR/train.parquet`` and ``DIR/val.parquet``
(or one ``DIR/digits.parquet`` with ``--single-file``): 64 pixel columns ``px_0 .. px_63`` and ``label``.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence


def write_digits(
    output: str, *, val_fraction: float = 0.2, seed: int = 0, single_file: bool = False
) -> list[str]:
    """Write the digits dataset as Parquet; returns the written paths.

    :param output: a directory (created if needed).
    :param val_fraction: share of rows in ``val.parquet`` (stratified by label).
    :param seed: seeds the split.
    :param single_file: write one ``digits.parquet`` instead of a train/val pair.
    """
    import pandas as pd
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    bunch = load_digits()
    frame = pd.DataFrame(
        bunch.data.astype("float32"), columns=[f"px_{i}" for i in range(bunch.data.shape[1])]
    )
    frame["label"] = bunch.target.astype("int64")
    os.makedirs(output, exist_ok=True)
    if single_file:
        path = os.path.join(output, "digits.parquet")
        frame.to_parquet(path, index=False)
        return [path]
    train, val = train_test_split(frame, test_size=val_fraction, random_state=seed, stratify=frame["label"])
    paths = [os.path.join(output, "train.parquet"), os.path.join(output, "val.parquet")]
    train.reset_index(drop=True).to_parquet(paths[0], index=False)
    val.reset_index(drop=True).to_parquet(paths[1], index=False)
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point.

    :param argv: arguments without the program name.
    """
    parser = argparse.ArgumentParser(prog="python -m gpu_trainer.digits", description=__doc__)
    parser.add_argument("--output", required=True, help="output directory")
    parser.add_argument("--val-fraction", type=float, default=0.2, help="validation share; default: 0.2")
    parser.add_argument("--seed", type=int, default=0, help="split seed; default: 0")
    parser.add_argument("--single-file", action="store_true", help="write one digits.parquet (no val split)")
    args = parser.parse_args(argv)
    for path in write_digits(
        args.output, val_fraction=args.val_fraction, seed=args.seed, single_file=args.single_file
    ):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
