"""Trainer throughput vs a minimal plain PyTorch loop: same model, data, batch size and optimizer.

    .venv/bin/python tests/benchmarks/bench_trainer_throughput.py                    # CPU, MLP
    python tests/benchmarks/bench_trainer_throughput.py --device cuda --precision bf16 \\
        --model mlp --repeat 4000 --batch-size 8192 --hidden-dim 8192 --peak-tflops 989  # H100 bf16 dense

(On CUDA, pick a compute-bound config: the digits CNN is 8x8 images and launch-bound at ~1% MFU.)

The trainer runs with MLflow logging (a SQLite store in a temp dir) and per-epoch checkpointing on;
its figure is training samples over the wall time of its whole epoch loop (training, the per-epoch
validation pass, checkpoint writes and metric logging). The baseline does the same training and the
same per-epoch validation pass and nothing else. Both are the best of ``--rounds`` runs. On CUDA the
script also reports model FLOPs utilisation: 3 x forward FLOPs per sample x samples/s over the peak.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def make_data(root: Path, repeat: int) -> str:
    """Digits, the train split tiled ``repeat`` times (bigger epochs, same real data)."""
    import pandas as pd

    from gpu_trainer.digits import write_digits

    write_digits(str(root))
    train = pd.read_parquet(root / "train.parquet")
    pd.concat([train] * repeat, ignore_index=True).to_parquet(root / "train.parquet", index=False)
    return str(root)


def plain_loop(args: argparse.Namespace, data: str) -> float:
    """The baseline: a textbook loop over in-memory tensors; returns training samples/s."""
    import torch
    import torch.nn.functional as F

    from gpu_trainer.data import load_dataset
    from gpu_trainer.metrics import score_split
    from gpu_trainer.models import build_model

    device = torch.device(args.device)
    ds = load_dataset(data)
    torch.manual_seed(0)
    model = build_model(args.model, ds.num_features, ds.num_classes, args.hidden_dim)
    model.standardize.fit(ds.train.features)
    model.to(device)
    fused = {"fused": True} if device.type == "cuda" else {}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, **fused)
    x_all, y_all = ds.train.features.to(device), ds.train.labels.to(device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.precision)
    n = len(ds.train)
    start = time.perf_counter()
    for _epoch in range(args.epochs):
        model.train()
        order = torch.randperm(n, device=device)
        for idx in torch.split(order, args.batch_size):
            with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                loss = F.cross_entropy(model(x_all[idx]).float(), y_all[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        model.eval()
        score_split(model, ds.val, num_classes=ds.num_classes, device=device, autocast_dtype=dtype)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return n * args.epochs / (time.perf_counter() - start)


def trainer(args: argparse.Namespace, data: str, work: Path, round_no: int) -> tuple[float, float]:
    """The real trainer with tracking and checkpointing; returns (samples/s, forward FLOPs per sample)."""
    from gpu_trainer.config import TrainConfig
    from gpu_trainer.models import build_model, flops_per_sample
    from gpu_trainer.train import train

    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"
    cfg = TrainConfig(
        data=data,
        model=args.model,
        hidden_dim=args.hidden_dim,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=1e-3,
        precision=args.precision,
        device=args.device,
        compile=args.compile,
        checkpoint_dir=str(work / f"ckpt-{round_no}"),
        output=str(work / f"result-{round_no}.json"),
        experiment="bench",
    )
    outcome = train(cfg, environ={})
    flops = flops_per_sample(build_model(args.model, 64, 10, args.hidden_dim), 64)
    return outcome.samples_trained / outcome.loop_seconds, flops


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument(
        "--precision",
        choices=("fp32", "bf16", "fp16"),
        default=None,
        help="default: fp32 on CPU, bf16 on CUDA",
    )
    parser.add_argument("--model", choices=("mlp", "cnn"), default="mlp")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--hidden-dim", type=int, default=512)
    parser.add_argument("--repeat", type=int, default=20, help="tile the digits train split this many times")
    parser.add_argument("--rounds", type=int, default=2, help="best of this many runs of each")
    parser.add_argument("--compile", action="store_true", help="torch.compile in the trainer")
    parser.add_argument(
        "--peak-tflops", type=float, default=989.0, help="dense bf16 peak for MFU (H100 SXM: 989)"
    )
    args = parser.parse_args()
    args.precision = args.precision or ("bf16" if args.device == "cuda" else "fp32")

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: CUDA is not available on this machine", file=sys.stderr)
        return 2
    torch.set_num_threads(torch.get_num_threads())
    with tempfile.TemporaryDirectory(prefix="bench-trainer-") as tmp:
        work = Path(tmp)
        data = make_data(work / "data", args.repeat)
        plain, tracked, flops = 0.0, 0.0, 0.0
        for round_no in range(args.rounds):
            plain = max(plain, plain_loop(args, data))
            rate, flops = trainer(args, data, work, round_no)
            tracked = max(tracked, rate)
    print(
        f"config: device={args.device} precision={args.precision} model={args.model} hidden={args.hidden_dim} "
        f"batch={args.batch_size} epochs={args.epochs} train_rows={1437 * args.repeat} threads={torch.get_num_threads()}"
    )
    print(f"plain PyTorch loop         : {plain:12.0f} samples/s")
    print(f"gpu_trainer (MLflow+ckpt)  : {tracked:12.0f} samples/s")
    print(f"ratio trainer/plain        : {tracked / plain:12.3f}  (goal >= 0.95)")
    if args.device == "cuda":
        for name, rate in (("plain", plain), ("trainer", tracked)):
            mfu = 3.0 * flops * rate / (args.peak_tflops * 1e12)
            print(f"MFU {name:8s} (peak {args.peak_tflops:g} TFLOPS): {100 * mfu:6.2f} %")
    return 0


if __name__ == "__main__":
    sys.exit(main())
