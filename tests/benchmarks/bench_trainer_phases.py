"""Where one trainer process's time goes, phase by phase, against a plain PyTorch loop (issue 24).

    .venv/bin/python tests/benchmarks/bench_trainer_phases.py                        # this checkout
    .venv/bin/python tests/benchmarks/bench_trainer_phases.py --before /work/main    # + an older checkout

Each round runs, one after the other on the same machine: a plain PyTorch loop (a separate script
process: imports, the same Parquet data, the same model, optimizer, batches and epochs, a ``torch.save``
checkpoint per epoch and a JSON result, nothing else), then ``python -m gpu_trainer.train`` as the tests
and the local launcher run it (digits, a local MLflow SQLite store as ``make demo`` uses, a checkpoint
directory), once with ``--before``'s code (``PYTHONPATH`` set to that checkout) and once with this
checkout's. Rounds interleave the variants, so load on a shared machine hits all of them alike; the
table shows each phase's median over the rounds. A warm-up run of each variant (not counted) creates
the MLflow store and fills the page cache.

The trainer's phases are timed by wrapping its steps in the child process (the benchmark only): the
interpreter and imports (process start to ``gpu_trainer.train`` imported), data load, model and
optimizer build, the MLflow run start (MLflow's import, the run, params), the epochs (training,
validation, checkpoint hand-off and metric logging), the wait for the last checkpoint, model logging
(figures and ``log_model``), result and run end, and the rest (restore, logging set-up, exit).
"Fixed cost" is everything but the epochs. A table, not a timed assertion.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]

#: The trainer tests' configuration (tests/fixtures/trainer_runs.py BASE_ARGS).
EPOCHS, BATCH_SIZE, LR, SEED, HIDDEN = 4, 64, 0.002, 7, 128

PHASES = [
    "interpreter + imports",
    "data load",
    "model + optimizer build",
    "MLflow run start",
    "epochs (training)",
    "checkpoint (final wait)",
    "model logging",
    "result + run end",
    "other (restore, exit)",
]


def _now() -> float:
    return time.time()


# ---- child: the instrumented trainer ------------------------------------------------------------------


def child_trainer(argv: list[str]) -> int:
    """Run the trainer's ``main`` with its steps wrapped; phase seconds go to ``$BENCH_PHASES_OUT``."""
    t0 = float(os.environ["BENCH_T0"])
    spent: dict[str, float] = dict.fromkeys(PHASES, 0.0)
    from gpu_trainer import checkpoint, contract, tracking, train

    spent["interpreter + imports"] = _now() - t0

    def timed(owner: Any, name: str, phase: str) -> None:
        inner = getattr(owner, name)

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            start = _now()
            try:
                return inner(*args, **kwargs)
            finally:
                spent[phase] += _now() - start

        setattr(owner, name, wrapper)

    timed(train, "load_dataset", "data load")
    timed(train, "build_model", "model + optimizer build")
    timed(train, "_make_optimizer", "model + optimizer build")
    timed(train, "_start_tracking", "MLflow run start")
    timed(train, "_run_epoch", "epochs (training)")
    timed(checkpoint.CheckpointWriter, "wait", "checkpoint (final wait)")
    timed(tracking.Tracker, "log_figures", "model logging")
    timed(tracking.Tracker, "log_model", "model logging")
    timed(contract, "write_result", "result + run end")
    timed(tracking.Tracker, "end", "result + run end")

    def report() -> None:
        total = _now() - t0
        spent["other (restore, exit)"] = total - sum(
            v for k, v in spent.items() if k != "other (restore, exit)"
        )
        Path(os.environ["BENCH_PHASES_OUT"]).write_text(json.dumps(spent))

    # The trainer ends with os._exit after the at-exit handlers (runtime.exit_now): report from one.
    atexit.register(report)
    train.runtime.exit_now(train.main(argv))


# ---- child: the plain loop ----------------------------------------------------------------------------


def child_plain(data: str, work: str) -> int:
    """The baseline: a textbook loop doing the trainer's training and nothing else."""
    t0 = float(os.environ["BENCH_T0"])
    spent: dict[str, float] = dict.fromkeys(PHASES, 0.0)
    import pandas as pd
    import torch
    import torch.nn.functional as F

    from gpu_trainer.models import build_model

    mark = _now()
    spent["interpreter + imports"] = mark - t0

    def tensors(name: str) -> tuple[torch.Tensor, torch.Tensor]:
        frame = pd.read_parquet(os.path.join(data, name))
        x = torch.from_numpy(frame.drop(columns="label").to_numpy(dtype="float32"))
        return x, torch.from_numpy(frame["label"].to_numpy(dtype="int64"))

    (x_train, y_train), (x_val, y_val) = tensors("train.parquet"), tensors("val.parquet")
    spent["data load"] = _now() - mark
    mark = _now()
    torch.manual_seed(SEED)
    model = build_model("mlp", x_train.shape[1], 10, HIDDEN)
    model.standardize.fit(x_train)
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    spent["model + optimizer build"] = _now() - mark
    ckpt = 0.0
    mark = _now()
    for epoch in range(EPOCHS):
        model.train()
        order = torch.randperm(len(y_train))
        for idx in torch.split(order, BATCH_SIZE):
            loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            accuracy = float((model(x_val).argmax(1) == y_val).float().mean())
        start = _now()
        torch.save(
            {"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch + 1},
            os.path.join(work, "plain-ckpt.pt"),
        )
        ckpt += _now() - start
    spent["epochs (training)"] = _now() - mark - ckpt
    spent["checkpoint (final wait)"] = ckpt
    mark = _now()
    Path(work, "plain-result.json").write_text(json.dumps({"val_accuracy": accuracy}))
    spent["result + run end"] = _now() - mark

    def report() -> None:
        spent["other (restore, exit)"] = (_now() - t0) - sum(spent.values())
        Path(os.environ["BENCH_PHASES_OUT"]).write_text(json.dumps(spent))

    atexit.register(report)
    return 0


# ---- parent ---------------------------------------------------------------------------------------------


def run_child(kind: str, code: Path, data: str, work: Path, tracking_uri: str, tag: str) -> dict[str, float]:
    """One child process (``kind`` is ``plain`` or ``trainer``) with ``code`` first on ``PYTHONPATH``."""
    out = work / f"phases-{tag}.json"
    run_dir = work / tag
    run_dir.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "MLTRAIN_", "AIRFLOW"))}
    env.update(
        PYTHONPATH=str(code),
        PYTHONUNBUFFERED="1",
        OMP_NUM_THREADS="1",
        MLFLOW_TRACKING_URI=tracking_uri,
        BENCH_PHASES_OUT=str(out),
    )
    if kind == "plain":
        extra = ["--plain", data, str(run_dir)]
    else:
        extra = [
            "--trainer",
            "--data",
            data,
            *("--epochs", str(EPOCHS), "--batch-size", str(BATCH_SIZE), "--lr", str(LR)),
            *("--seed", str(SEED), "--hidden-dim", str(HIDDEN)),
            *("--checkpoint-dir", str(run_dir / "ckpt"), "--output", str(run_dir / "result.json")),
        ]
    env["BENCH_T0"] = repr(_now())
    proc = subprocess.run(
        [sys.executable, __file__, *extra], env=env, cwd=run_dir, capture_output=True, text=True, check=False
    )
    if proc.returncode != 0 or not out.exists():
        raise RuntimeError(f"{tag} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    phases = json.loads(out.read_text())
    phases["total"] = sum(phases.values())
    phases["fixed cost (all but epochs)"] = phases["total"] - phases["epochs (training)"]
    return phases


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=5, help="median of this many runs of each variant")
    parser.add_argument("--before", type=Path, help="another checkout whose trainer to run side by side")
    parser.add_argument("--plain", nargs=2, metavar=("DATA", "WORK"), help=argparse.SUPPRESS)
    parser.add_argument("--trainer", action="store_true", help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args()
    if args.plain:
        return child_plain(*args.plain)
    if args.trainer:
        return child_trainer(rest)

    sys.path.insert(0, str(REPO))
    from gpu_trainer.digits import write_digits

    variants: list[tuple[str, str, Path]] = [("plain loop", "plain", REPO)]
    if args.before:
        variants.append(("trainer before", "trainer", args.before.resolve()))
    variants.append(("trainer (this)", "trainer", REPO))
    results: dict[str, list[dict[str, float]]] = {name: [] for name, _, _ in variants}
    with tempfile.TemporaryDirectory(prefix="bench-phases-") as tmp:
        work = Path(tmp)
        data = str(work / "digits")
        write_digits(data)
        tracking_uri = f"sqlite:///{work / 'mlflow.db'}"
        for round_no in range(args.rounds + 1):  # round 0: warm-up, not counted
            for name, kind, code in variants:
                tag = f"{name.split()[0]}-{'before' if 'before' in name else 'this'}-{round_no}"
                phases = run_child(kind, code, data, work, tracking_uri, tag)
                if round_no:
                    results[name].append(phases)
            print(f"round {round_no}/{args.rounds} done", file=sys.stderr, flush=True)
    rows = [*PHASES, "total", "fixed cost (all but epochs)"]
    names = [name for name, _, _ in variants]
    print(
        f"config: digits, mlp hidden {HIDDEN}, {EPOCHS} epochs x batch {BATCH_SIZE}, MLflow SQLite store, "
        f"median of {args.rounds} interleaved rounds, cpus={os.cpu_count()}, "
        f"load avg {os.getloadavg()[0]:.1f}"
    )
    print(f"{'phase (s)':32s}" + "".join(f"{name:>16s}" for name in names))
    medians = {
        name: {row: statistics.median(r[row] for r in results[name]) for row in rows} for name in names
    }
    for row in rows:
        print(f"{row:32s}" + "".join(f"{medians[name][row]:16.2f}" for name in names))
    this, plain = medians["trainer (this)"], medians["plain loop"]
    print(f"fixed cost over the plain loop's total  {this['total'] - plain['total']:8.2f} s")
    if args.before:
        before = medians["trainer before"]
        ratio = this["fixed cost (all but epochs)"] / before["fixed cost (all but epochs)"]
        print(f"fixed cost ratio this/before            {ratio:8.3f}  (goal <= 0.333)")
        print(f"total ratio this/before                 {this['total'] / before['total']:8.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
