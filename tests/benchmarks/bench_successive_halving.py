"""Successive halving against the full grid over the same configurations and ``max_epochs`` (issue 13).

    .venv/bin/python tests/benchmarks/bench_successive_halving.py          # 9 configs, eta 3, 1..9 epochs

Both sweeps run under ``dag.test()`` with the local launcher, the bundled trainer on digits and a real
``mlflow server`` on loopback: ``successive_halving(n_configs=9, eta=3, min_epochs=1, max_epochs=9)``,
then the baseline, one ``GPUTrainingPodOperator`` per configuration for ``max_epochs`` (``expand``).
Printed for each: trainer epochs (counted from the ``val_accuracy`` points the trainer logged to
MLflow, one per epoch trained; a resumed trial continues its run), trainer processes, wall time, and
the best ``val_accuracy``. Goal: at most a third of the grid's epochs, best within 0.005 of the grid's.
A table, not a timed assertion.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

# Airflow reads its home at first import: an isolated one, as the tests' conftest does.
_HOME = tempfile.mkdtemp(prefix="bench-sh-airflow-")
os.environ["AIRFLOW_HOME"] = _HOME
os.environ["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"] = f"sqlite:///{_HOME}/airflow.db"
os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
os.environ["AIRFLOW__CORE__UNIT_TEST_MODE"] = "True"
os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = os.path.join(_HOME, "dags")
os.environ["AIRFLOW__MLTRAIN__LAUNCHER"] = "local"
os.environ["AIRFLOW__MLTRAIN__LOCAL_CHECKPOINT_ROOT"] = os.path.join(_HOME, "checkpoints")
os.makedirs(os.environ["AIRFLOW__CORE__DAGS_FOLDER"], exist_ok=True)

#: Nine configurations (the grid of these lists) that differ in how fast and how far they learn digits.
SEARCH_SPACE = {"lr": [0.0003, 0.003, 0.03], "hidden_dim": [8, 32, 128]}
METRIC = "val_accuracy"


def _trainer(data: str, experiment: str, task_id: str) -> Any:
    from airflow_provider_mltrain.operators.gpu_training import GPUTrainingPodOperator

    return GPUTrainingPodOperator.partial(
        task_id=task_id,
        image="unused-locally:1",
        mlflow_conn_id="mlflow_default",
        experiment_name=experiment,
        arguments=["--data", data],
        retries=0,
    )


def run_sweep(
    kind: str, data: str, n_configs: int, eta: int, min_epochs: int, max_epochs: int
) -> dict[str, Any]:
    """One sweep under ``dag.test()``; returns its trials' run ids, best value and wall time."""
    from airflow.sdk import DAG

    from airflow_provider_mltrain._search_space import sample_configs
    from airflow_provider_mltrain.sweeps import successive_halving
    from airflow_provider_mltrain.testing import run_dag, xcom_value

    experiment = f"bench-{kind}-{os.getpid()}"
    with DAG(f"bench_{kind}", schedule=None) as dag:
        if kind == "halving":
            successive_halving(
                group_id="tune",
                trainer=_trainer(data, experiment, "train"),
                search_space=SEARCH_SPACE,
                n_configs=n_configs,
                eta=eta,
                min_epochs=min_epochs,
                max_epochs=max_epochs,
                metric=METRIC,
                seed=0,
            )
        else:
            configs = sample_configs(SEARCH_SPACE, n_configs, seed=0)
            _trainer(data, experiment, "train").expand(
                hyperparameters=[{**c, "epochs": max_epochs} for c in configs]
            )
    start = time.perf_counter()
    dag_run = run_dag(dag)
    wall = time.perf_counter() - start
    if dag_run.state != "success":
        raise RuntimeError(f"the {kind} sweep did not succeed: {dag_run.state}")
    if kind == "halving":
        best = xcom_value(dag_run, "tune.best")
        run_ids = [row["run_id"] for row in best["leaderboard"] if row["run_id"]]
        processes = sum(
            1
            for ti in dag_run.get_task_instances()
            if ti.task_id.startswith("tune.round_") and ti.state == "success"
        )
        best_value, best_params = best["metrics"][METRIC], best["params"]
        # How far each configuration got: (epochs, value at its last round, status).
        per_config = {
            _config_key(row["params"]): (row["epochs"], row[METRIC], row["status"])
            for row in best["leaderboard"]
        }
    else:
        results = [xcom_value(dag_run, "train", map_index=i) for i in range(n_configs)]
        run_ids = [r["run_id"] for r in results]
        processes = len(results)
        top = max(results, key=lambda r: r["metrics"][METRIC])
        best_value, best_params = top["metrics"][METRIC], top["params"]
        per_config = {
            _config_key(r["params"]): (max_epochs, r["metrics"][METRIC], "finished") for r in results
        }
    return {
        "run_ids": run_ids,
        "processes": processes,
        "wall": wall,
        "best": best_value,
        "best_config": {k: best_params.get(k) for k in SEARCH_SPACE},
        "per_config": per_config,
    }


def _config_key(params: dict[str, Any]) -> tuple[Any, ...]:
    """A configuration's identity in both sweeps' results (the trainer reports its params back)."""
    return tuple(params.get(name) for name in SEARCH_SPACE)


def trainer_epochs(run_ids: list[str]) -> int:
    """Epochs the trainer ran, counted from MLflow: one ``val_accuracy`` point per epoch per run."""
    from airflow_provider_mltrain.hooks.mlflow import MLflowHook

    client = MLflowHook("mlflow_default").get_conn()
    return sum(len(client.get_metric_history(run_id, METRIC)) for run_id in run_ids)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--eta", type=int, default=3)
    parser.add_argument("--min-epochs", type=int, default=1)
    parser.add_argument("--max-epochs", type=int, default=9)
    args = parser.parse_args()
    n_configs = 9

    from airflow.utils import db

    from airflow_provider_mltrain._halving import plan_rounds, planned_epochs
    from airflow_provider_mltrain.hooks.mlflow import connection_json
    from gpu_trainer.digits import write_digits
    from tests.fixtures.mlflow_servers import start_server, stop_server

    db.resetdb(skip_init=False)
    work = Path(tempfile.mkdtemp(prefix="bench-sh-"))
    (work / "mlflow").mkdir()
    server, uri = start_server(work / "mlflow")
    try:
        os.environ["AIRFLOW_CONN_MLFLOW_DEFAULT"] = connection_json(uri)
        data = str(work / "digits")
        write_digits(data)
        rows = {}
        for kind in ("halving", "grid"):
            sweep = run_sweep(kind, data, n_configs, args.eta, args.min_epochs, args.max_epochs)
            sweep["epochs"] = trainer_epochs(sweep["run_ids"])
            rows[kind] = sweep
    finally:
        stop_server(server)

    rounds = plan_rounds(n_configs, args.eta, args.min_epochs, args.max_epochs)
    sh, grid = rows["halving"], rows["grid"]
    print(
        f"config: digits, {n_configs} configs {SEARCH_SPACE}, eta={args.eta}, epochs {args.min_epochs}.."
        f"{args.max_epochs}, rounds {[(r.trials, r.epochs) for r in rounds]}, cpu threads={os.cpu_count()}"
    )
    print(
        f"{'sweep':24s} {'trainer epochs':>14s} {'processes':>9s} {'wall s':>8s} {'best ' + METRIC:>18s}  best config"
    )
    for name, row in (("successive halving", sh), ("full grid (baseline)", grid)):
        print(
            f"{name:24s} {row['epochs']:14d} {row['processes']:9d} {row['wall']:8.1f} {row['best']:18.4f}  "
            f"{row['best_config']}"
        )
    print(f"per configuration {tuple(SEARCH_SPACE)}: halving (epochs, {METRIC}, status) | grid at max_epochs")
    for config in sorted(grid["per_config"], key=lambda c: -grid["per_config"][c][1]):
        epochs, value, status = sh["per_config"].get(config, (0, None, "missing"))
        shown = "-" if value is None else f"{value:.4f}"
        print(f"  {config!s:24s} {epochs:2d} {shown:>7s} {status:9s} | {grid['per_config'][config][1]:.4f}")
    print(f"planned halving epochs (arithmetic)  {planned_epochs(rounds)}")
    print(f"ratio epochs halving/grid            {sh['epochs'] / grid['epochs']:.3f}  (goal <= 0.333)")
    print(f"ratio wall halving/grid              {sh['wall'] / grid['wall']:.3f}")
    print(f"best {METRIC} grid - halving        {grid['best'] - sh['best']:+.4f}  (goal <= 0.005)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
