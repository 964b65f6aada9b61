"""Where the worker's time goes in one local-launcher training task, against the trainer run alone.

    .venv/bin/python tests/benchmarks/bench_training_task.py            # 2 rounds, 2 epochs of digits

One ``GPUTrainingPodOperator`` task (local launcher, a real ``mlflow server`` on loopback, digits) runs
under ``dag.test()``; the script stamps the task's phases and prints them, then runs the same trainer
command as a plain subprocess (the baseline: what the task cannot be faster than) and prints the ratio.

Before/after a change: run the script from a ``git worktree`` of the older commit with ``PYTHONPATH``
set to that worktree (so its trainer runs), then from this checkout, back to back on the same machine.

Phases of the task: before launch (pod build, connection lookups), process start to the trainer's first
line (interpreter start and imports), first line to ``done:`` (data, tracking, training, model logging),
``done:`` to the trainer's exit, and exit to the end of ``execute`` (result handling, run link).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

# Airflow reads its home at first import: an isolated one, as the tests' conftest does.
_HOME = os.environ.get("MLTRAIN_BENCH_AIRFLOW_HOME") or tempfile.mkdtemp(prefix="bench-task-airflow-")
os.environ["MLTRAIN_BENCH_AIRFLOW_HOME"] = _HOME
os.environ["AIRFLOW_HOME"] = _HOME
os.environ["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"] = f"sqlite:///{_HOME}/airflow.db"
os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
os.environ["AIRFLOW__CORE__UNIT_TEST_MODE"] = "True"
os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = os.path.join(_HOME, "dags")
os.environ["AIRFLOW__MLTRAIN__LAUNCHER"] = "local"
os.environ["AIRFLOW__MLTRAIN__LOCAL_CHECKPOINT_ROOT"] = os.path.join(_HOME, "checkpoints")
os.makedirs(os.environ["AIRFLOW__CORE__DAGS_FOLDER"], exist_ok=True)


class Stamps:
    """Wall-clock marks of one task run, taken by wrapping the operator's and launcher's steps."""

    def __init__(self) -> None:
        self.marks: dict[str, float] = {}

    def mark(self, name: str) -> None:
        self.marks.setdefault(name, time.perf_counter())


def instrument(stamps: Stamps) -> None:
    """Wrap the steps whose boundaries the phases are measured at (the benchmark only, never the tests)."""
    from airflow_provider_mltrain.launchers import local
    from airflow_provider_mltrain.operators.gpu_training import GPUTrainingPodOperator

    execute, init = GPUTrainingPodOperator.execute, local.LocalProcess.__init__
    start, wait = local.LocalProcess.start, local.LocalProcess.wait

    def timed_execute(self, context):
        stamps.mark("execute")
        try:
            return execute(self, context)
        finally:
            stamps.mark("end")

    def timed_start(self):
        stamps.mark("launch")
        start(self)

    def timed_wait(self, timeout_s=None):
        rc = wait(self, timeout_s)
        stamps.mark("exit")
        return rc

    class Log:
        def __init__(self, inner):
            self.inner = inner

        def info(self, msg, *args):
            if msg == "[trainer] %s":
                stamps.mark("first_line")
                if "done: run" in args[0]:
                    stamps.mark("done")
            self.inner.info(msg, *args)

        def __getattr__(self, name):
            return getattr(self.inner, name)

    def timed_init(self, cmd, env, log, **kwargs):
        init(self, cmd, env, Log(log), **kwargs)

    GPUTrainingPodOperator.execute = timed_execute  # type: ignore[method-assign]
    local.LocalProcess.start = timed_start  # type: ignore[method-assign]
    local.LocalProcess.wait = timed_wait  # type: ignore[method-assign]
    local.LocalProcess.__init__ = timed_init  # type: ignore[method-assign]


def run_task(data: str, epochs: int, round_no: int) -> dict[str, float]:
    from airflow.sdk import DAG

    from airflow_provider_mltrain.operators.gpu_training import GPUTrainingPodOperator
    from airflow_provider_mltrain.testing import run_dag

    stamps = Stamps()
    instrument(stamps)
    with DAG(f"bench_training_task_{round_no}", schedule=None) as dag:
        GPUTrainingPodOperator(
            task_id="train",
            image="unused-locally:1",
            mlflow_conn_id="mlflow_default",
            experiment_name="bench-task",
            arguments=["--data", data],
            hyperparameters={"epochs": epochs, "seed": 1},
        )
    dag_run = run_dag(dag)
    if dag_run.state != "success":
        raise RuntimeError(f"the training task did not succeed: {dag_run.state}")
    m = stamps.marks
    return {
        "before launch (pod build, connections)": m["launch"] - m["execute"],
        "launch -> trainer's first line": m["first_line"] - m["launch"],
        "first line -> done:": m["done"] - m["first_line"],
        "done: -> trainer exit": m["exit"] - m["done"],
        "trainer exit -> end of execute": m["end"] - m["exit"],
        "execute total": m["end"] - m["execute"],
    }


def run_plain(data: str, epochs: int, tracking_uri: str, work: Path) -> dict[str, float]:
    """The baseline: the same trainer command as a plain subprocess, stamped the same way."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "MLFLOW_", "MLTRAIN_"))}
    env.update(
        MLFLOW_TRACKING_URI=tracking_uri,
        MLFLOW_EXPERIMENT_NAME="bench-plain",
        MLTRAIN_HYPERPARAMETERS=f'{{"epochs": {epochs}, "seed": 1}}',
        MLTRAIN_RESULT_PATH=str(work / "plain-result.json"),
        PYTHONUNBUFFERED="1",
        PYTHONPATH=str(REPO),
    )
    start = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "gpu_trainer.train", "--data", data],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    first = done = None
    assert proc.stdout is not None
    for line in proc.stdout:
        now = time.perf_counter()
        first = first or now
        if "done: run" in line:
            done = now
    if proc.wait() != 0 or first is None or done is None:
        raise RuntimeError("the plain trainer run failed")
    end = time.perf_counter()
    return {
        "launch -> trainer's first line": first - start,
        "first line -> done:": done - first,
        "done: -> trainer exit": end - done,
        "total": end - start,
    }


def task_in_fresh_worker(data: str, epochs: int, round_no: int) -> dict[str, float]:
    """One task in a new interpreter, as a worker runs each task (nothing imported by an earlier task)."""
    out = subprocess.run(
        [sys.executable, __file__, "--one-task", data, "--epochs", str(epochs), "--round", str(round_no)],
        env=os.environ,
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode != 0:
        raise RuntimeError(f"the task run failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2, help="report the best (fastest) round of each")
    parser.add_argument("--one-task", metavar="DATA", help=argparse.SUPPRESS)
    parser.add_argument("--round", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one_task:
        # Quiet: the parent reads the last line.
        print(json.dumps(run_task(args.one_task, args.epochs, args.round)))
        return 0

    from airflow.utils import db

    from airflow_provider_mltrain.hooks.mlflow import connection_json
    from gpu_trainer.digits import write_digits
    from tests.fixtures.mlflow_servers import start_server, stop_server

    db.resetdb(skip_init=False)
    work = Path(tempfile.mkdtemp(prefix="bench-task-"))
    (work / "mlflow").mkdir()
    server, uri = start_server(work / "mlflow")
    try:
        os.environ["AIRFLOW_CONN_MLFLOW_DEFAULT"] = connection_json(uri)
        data = str(work / "digits")
        write_digits(data)
        tasks = [task_in_fresh_worker(data, args.epochs, n) for n in range(args.rounds)]
        plains = [run_plain(data, args.epochs, uri, work) for _ in range(args.rounds)]
    finally:
        stop_server(server)
    task = min(tasks, key=lambda t: t["execute total"])
    plain = min(plains, key=lambda t: t["total"])
    print(f"config: digits, {args.epochs} epochs, best of {args.rounds}, cpu threads={os.cpu_count()}")
    print("one training task under dag.test() (local launcher, mlflow server on loopback):")
    for name, seconds in task.items():
        print(f"  {name:40s} {seconds:7.2f} s")
    print("the same trainer as a plain subprocess (baseline):")
    for name, seconds in plain.items():
        print(f"  {name:40s} {seconds:7.2f} s")
    overhead = task["execute total"] - plain["total"]
    print(f"task overhead over the plain trainer      {overhead:7.2f} s")
    print(f"ratio task/plain                          {task['execute total'] / plain['total']:7.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
