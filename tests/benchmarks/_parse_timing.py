"""Side-by-side DAG-file parse timing shared by the parse benchmarks."""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path


def isolated_airflow_home() -> None:
    """Point Airflow at a throwaway home before it is imported (the benchmarks never touch a real one)."""
    os.environ.setdefault("AIRFLOW_HOME", tempfile.mkdtemp(prefix="bench-airflow-home-"))
    os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
    os.environ.setdefault("AIRFLOW__LOGGING__LOGGING_LEVEL", "WARNING")


def parse_seconds(path: Path, expected_tasks: int | None = None) -> float:
    """Parse one DAG file with Airflow's own ``DagBag`` (what the DAG processor does) and time it.

    :param path: the DAG file.
    :param expected_tasks: when given, the parsed DAG must have this many tasks.
    """
    from airflow.dag_processing.dagbag import DagBag

    started = time.perf_counter()
    bag = DagBag(dag_folder=str(path), safe_mode=False)
    elapsed = time.perf_counter() - started
    tasks = sum(len(dag.tasks) for dag in bag.dags.values())
    if bag.import_errors or not bag.dags or (expected_tasks is not None and tasks != expected_tasks):
        raise SystemExit(f"{path.name} did not parse cleanly: {bag.import_errors or f'{tasks} tasks'}")
    return elapsed


def rotating_medians(files: dict[str, Path], repetitions: int, expected_tasks: int | None = None):
    """Median and minimum parse seconds per file, the order rotated every repetition.

    The first parse of each file is a warm-up (it pays the imports); rotating the order keeps drift
    from favouring any file.

    :param files: label -> DAG file.
    :param repetitions: timed parses per file.
    :param expected_tasks: passed to :func:`parse_seconds`.
    """
    for path in files.values():
        parse_seconds(path, expected_tasks)
    names = list(files)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(repetitions):
        shift = rep % len(names)
        for name in names[shift:] + names[:shift]:
            samples[name].append(parse_seconds(files[name], expected_tasks))
    return {name: (statistics.median(values), min(values)) for name, values in samples.items()}
