"""DAG-file parse time of example_dags/ml_training_pipeline.py vs the same pipeline in plain Airflow.

The baseline (``baseline_dags/ml_training_pipeline_plain.py``) has the same tasks written with
KubernetesPodOperator (GPU resources, toleration, affinity, shm, PVC, security contexts and MLflow
environment by hand), S3KeySensor, BranchPythonOperator and PythonOperator. Both files are parsed by
``DagBag`` in one process, alternating, many times.

Run: ``.venv/bin/python tests/benchmarks/bench_pipeline_parse.py [repetitions]``. Goal: ratio <= 1.05.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, so this folder is on sys.path.
from _parse_timing import isolated_airflow_home, rotating_medians

HERE = Path(__file__).resolve().parent
FILES = {
    "provider": HERE.parents[1] / "example_dags" / "ml_training_pipeline.py",
    "plain": HERE / "baseline_dags" / "ml_training_pipeline_plain.py",
}


def main() -> None:
    repetitions = int(sys.argv[1]) if len(sys.argv) > 1 else 30
    isolated_airflow_home()
    stats = rotating_medians(FILES, repetitions)
    print(f"ml_training_pipeline, {repetitions} rotating repetitions each (DagBag parse of the file):")
    for name, label in (
        ("provider", "with this provider's operators"),
        ("plain", "plain KPO/BranchPythonOperator"),
    ):
        median, best = stats[name]
        print(f"  {label:34s} median {median * 1000:8.2f} ms   (min {best * 1000:.2f} ms)")
    print(
        f"  ratio provider / plain (median) {stats['provider'][0] / stats['plain'][0]:.3f}   (goal <= 1.05)"
    )


if __name__ == "__main__":
    main()
