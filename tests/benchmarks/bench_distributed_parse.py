"""DAG parse time: 50 DistributedTrainingOperator tasks vs 50 GPUTrainingPodOperator tasks.

The same training parameters in both DAG files (GPUs, GPU types, CPU, memory, hyperparameters, a shared
checkpoint location); the distributed one adds 2 nodes, a Kueue queue and a priority class. Both files are
parsed by Airflow's own ``DagBag``, alternating for many repetitions so machine noise hits both alike. The
manifest is built at execute time only, so parsing pays for the constructor's checks alone.

Run: ``.venv/bin/python tests/benchmarks/bench_distributed_parse.py [repetitions]``. Goal: ratio <= 1.05.
"""

from __future__ import annotations

import sys
import tempfile
import textwrap
from pathlib import Path

# Run as a script, so this folder is on sys.path.
from _parse_timing import isolated_airflow_home, rotating_medians

TASKS = 50

COMMON = """
                image="ghcr.io/example/trainer:1.0",
                namespace="ml",
                gpus=8,
                gpu_type=["NVIDIA-A100-SXM4-80GB", "NVIDIA-H100-80GB-HBM3"],
                cpu="64",
                memory="512Gi",
                arguments=["--epochs", "10"],
                checkpoint_uri="s3://bucket/checkpoints",
                hyperparameters={"lr": 0.001 * (i + 1), "batch_size": 64},"""

DISTRIBUTED_DAG = textwrap.dedent(
    f"""
    import datetime
    from airflow.sdk import DAG
    from airflow_provider_mltrain.operators.distributed_training import DistributedTrainingOperator

    with DAG("bench_distributed", schedule=None, start_date=datetime.datetime(2026, 1, 1)):
        for i in range({TASKS}):
            DistributedTrainingOperator(
                task_id=f"train_{{i}}",{COMMON}
                num_nodes=2,
                queue_name="team-a",
                priority_class="high",
            )
    """
)

GPU_DAG = textwrap.dedent(
    f"""
    import datetime
    from airflow.sdk import DAG
    from airflow_provider_mltrain.operators.gpu_training import GPUTrainingPodOperator

    with DAG("bench_gpu", schedule=None, start_date=datetime.datetime(2026, 1, 1)):
        for i in range({TASKS}):
            GPUTrainingPodOperator(
                task_id=f"train_{{i}}",{COMMON}
                queue_name="team-a",
            )
    """
)


def main() -> None:
    repetitions = int(sys.argv[1]) if len(sys.argv) > 1 else 40
    isolated_airflow_home()
    with tempfile.TemporaryDirectory() as tmp:
        files = {"distributed": Path(tmp, "dag_distributed.py"), "gpu": Path(tmp, "dag_gpu.py")}
        files["distributed"].write_text(DISTRIBUTED_DAG)
        files["gpu"].write_text(GPU_DAG)
        stats = rotating_medians(files, repetitions, expected_tasks=TASKS)
    med = {name: median for name, (median, _) in stats.items()}
    print(f"DAG with {TASKS} tasks, {repetitions} rotating repetitions each (DagBag parse):")
    labels = {"distributed": "DistributedTrainingOperator (2 nodes)", "gpu": "GPUTrainingPodOperator"}
    for name, label in labels.items():
        print(f"  {label:40s} median {med[name] * 1000:8.2f} ms   (min {stats[name][1] * 1000:.2f} ms)")
    print(
        f"  ratio Distributed / GPUTrainingPodOperator (median) {med['distributed'] / med['gpu']:.3f}"
        "   (goal <= 1.05)"
    )


if __name__ == "__main__":
    main()
