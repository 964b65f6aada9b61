"""The main job on the embedded default: ``ml_training_pipeline`` end to end, twice (``make demo``).

Everything lives under ``.demo/`` (wiped at the start): an Airflow home on SQLite, a local MLflow store
(SQLite + artifact directory), and a day of real training data (scikit-learn's digits as Parquet)
landed where the DAG's sensor waits for it. Trainers run as local processes (the local launcher), on
the CPU here and on a GPU where there is one. The first run registers the first ``champion``; the
second trains again and shows the quality gate's decision against it.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / ".demo"
MODEL_NAME = "digits-classifier"


def prepare_environment() -> dict[str, str]:
    """Isolated Airflow + MLflow configuration; must run before Airflow is imported."""
    shutil.rmtree(DEMO, ignore_errors=True)
    (DEMO / "airflow").mkdir(parents=True)
    mlflow_uri = f"sqlite:///{DEMO / 'mlflow.db'}"
    settings = {
        "AIRFLOW_HOME": str(DEMO / "airflow"),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{DEMO / 'airflow' / 'airflow.db'}",
        "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "example_dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__LOGGING__LOGGING_LEVEL": "WARNING",
        # The two settings that make the production DAG run on a laptop: trainers as local processes,
        # MLflow in a local store.
        "AIRFLOW__MLTRAIN__LAUNCHER": "local",
        "AIRFLOW__MLTRAIN__LOCAL_CHECKPOINT_ROOT": str(DEMO / "checkpoints"),
        "AIRFLOW_CONN_MLFLOW_DEFAULT": json.dumps({"conn_type": "mlflow", "host": mlflow_uri}),
    }
    os.environ.update(settings)
    # MLflow puts a SQLite store's artifacts under ./mlruns of the process that creates the experiment.
    os.chdir(DEMO)
    return settings


def land_data(ds: str) -> Path:
    """A day of digits as Parquet, with the ``_SUCCESS`` marker written last, as an upload job would."""
    from gpu_trainer.digits import write_digits

    day = DEMO / "data" / ds
    write_digits(str(day), single_file=True)
    (day / "_SUCCESS").write_text("")
    return day


def run_pipeline(dag: Any, logical_date: dt.datetime, conf: dict[str, Any]) -> dict[str, Any]:
    """One ``dag.test()`` run; returns the ``notify`` task's summary."""
    from airflow_provider_mltrain.testing import run_dag, xcom_value

    dag_run = run_dag(dag, logical_date=logical_date, run_conf=conf)
    if dag_run.state != "success":
        raise SystemExit(f"ml_training_pipeline run {dag_run.run_id} ended {dag_run.state}")
    return xcom_value(dag_run, "notify")


def print_summary(title: str, summary: dict[str, Any]) -> None:
    print(f"\n=== {title} ===")
    print(f"best run        {summary['best_run_id']}")
    params = summary["best_params"]
    print(
        "hyperparameters "
        + ", ".join(f"{k}={params[k]}" for k in ("lr", "hidden_dim", "epochs") if k in params)
    )
    print("metrics         " + ", ".join(f"{k}={v:.4f}" for k, v in sorted(summary["best_metrics"].items())))
    report = summary.get("quality_report") or {}
    verdict = "PASSED" if report.get("passed") else "FAILED"
    print(f"quality gate    {verdict} -> {', '.join(report.get('branch', []))}")
    champion = report.get("champion")
    recorded = (champion or {}).get("metrics", {}).get("val_accuracy")
    rescored = ((champion or {}).get("rescored") or {}).get("metrics", {}).get("val_accuracy")
    if champion and recorded is not None and rescored is not None:
        print(
            f"champion        v{champion['version']} val_accuracy recorded {recorded:.4f}, "
            f"on this run's holdout {rescored:.4f}"
        )
    print("\n".join("                " + line for line in str(report.get("table", "")).splitlines()))
    registered = summary.get("registered")
    if registered:
        print(
            f"registered      {registered['name']} v{registered['version']} aliases={registered['aliases']} "
            f"(previous champion: {registered.get('previous_champion')})"
        )
    else:
        print("registered      nothing (the gate chose the skip branch)")


def main() -> int:
    started = time.monotonic()
    settings = prepare_environment()
    sys.path.insert(0, str(ROOT))

    from airflow.dag_processing.dagbag import DagBag
    from airflow.utils import db

    db.resetdb(skip_init=False)
    bag = DagBag(dag_folder=str(ROOT / "example_dags" / "ml_training_pipeline.py"))
    if bag.import_errors:
        raise SystemExit(f"example DAG failed to import: {bag.import_errors}")
    dag = bag.get_dag("ml_training_pipeline")

    now = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
    ds = now.strftime("%Y-%m-%d")
    day = land_data(ds)
    print(f"landed digits for {ds} in {day}")
    conf = {"data_root": f"file://{DEMO / 'data'}", "model_name": MODEL_NAME, "epochs": 4}

    first = run_pipeline(dag, now, conf)
    print_summary("run 1: first champion", first)
    second = run_pipeline(dag, now + dt.timedelta(minutes=1), conf)
    print_summary("run 2: challenger vs champion", second)

    elapsed = time.monotonic() - started
    print(f"\nfinished in {elapsed:.0f} s. Open the MLflow UI on this store with:")
    print(
        f"  {ROOT / '.venv' / 'bin' / 'mlflow'} ui --backend-store-uri {json.loads(settings['AIRFLOW_CONN_MLFLOW_DEFAULT'])['host']} \\"
    )
    print(f"      --default-artifact-root {DEMO / 'mlruns'} --port 5000")
    return 0


if __name__ == "__main__":
    sys.exit(main())
