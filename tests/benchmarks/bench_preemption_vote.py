"""The cost of agreeing on a SIGTERM under DDP: a DDP loop with no vote vs a blocking vote per step vs the
trainer's :class:`gpu_trainer.preemption.StopVote` (asynchronous, read one step later).

    .venv/bin/python tests/benchmarks/bench_preemption_vote.py            # 2 CPU processes, gloo

It starts torchrun on itself. Each worker trains the digits MLP (train split tiled ``--repeat`` times) with
DDP for ``--steps`` steps per mode, the modes interleaved, best of ``--rounds``; rank 0 prints samples/s and
the ratio of each mode to the loop without a vote (1.0 = free).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

MODES = ("no vote", "blocking vote", "StopVote (async)")


def _blocking_vote(local: bool) -> bool:
    """The obvious way: an all-reduce (MAX) of the local flag after every step, waited for at once."""
    import torch
    import torch.distributed as dist

    flag = torch.tensor([1 if local else 0], dtype=torch.int32)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    from gpu_trainer.data import epoch_indices, load_dataset
    from gpu_trainer.models import build_model
    from gpu_trainer.preemption import StopNotice, StopVote

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    ds = load_dataset(args.data)
    torch.manual_seed(0)
    core = build_model("mlp", ds.num_features, ds.num_classes, args.hidden_dim)
    model = torch.nn.parallel.DistributedDataParallel(core)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    order = epoch_indices(len(ds.train), epoch=0, seed=0, rank=rank, world_size=world, shuffle=True)
    batches = list(torch.split(order, args.batch_size))
    notice = StopNotice()  # never signalled: the cost of asking, not of stopping

    def run(mode: str) -> float:
        vote = StopVote(notice, group=dist.group.WORLD)
        dist.barrier()
        start = time.perf_counter()
        for step in range(args.steps):
            idx = batches[step % len(batches)]
            loss = F.cross_entropy(model(ds.train.features[idx]), ds.train.labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if mode == MODES[1]:
                _blocking_vote(notice.requested)
            elif mode == MODES[2]:
                vote.after_step()
        vote.settle()
        dist.barrier()
        return args.steps * args.batch_size * world / (time.perf_counter() - start)

    best = dict.fromkeys(MODES, 0.0)
    run(MODES[0])  # warm-up
    for _round in range(args.rounds):
        for mode in MODES:
            best[mode] = max(best[mode], run(mode))
    if rank == 0:
        print(
            f"config: world={world} backend=gloo hidden={args.hidden_dim} batch={args.batch_size} "
            f"steps={args.steps} rounds={args.rounds} threads={torch.get_num_threads()}"
        )
        for mode in MODES:
            print(
                f"{mode:18s}: {best[mode]:10.0f} samples/s  ratio vs no vote {best[mode] / best[MODES[0]]:.3f}"
            )
    dist.destroy_process_group()


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--hidden-dim", type=int, default=128)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return 0
    from gpu_trainer.digits import write_digits

    with tempfile.TemporaryDirectory(prefix="bench-vote-") as tmp:
        write_digits(tmp)
        env = dict(os.environ, OMP_NUM_THREADS="1")
        return subprocess.call(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                f"--nproc_per_node={args.nproc}",
                __file__,
                "--worker",
                "--data",
                tmp,
                "--steps",
                str(args.steps),
                "--rounds",
                str(args.rounds),
                "--batch-size",
                str(args.batch_size),
                "--hidden-dim",
                str(args.hidden_dim),
            ],
            env=env,
        )


if __name__ == "__main__":
    sys.exit(main())
