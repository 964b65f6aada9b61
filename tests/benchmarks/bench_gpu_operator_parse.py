"""DAG parse time: 50 GPUTrainingPodOperator tasks vs the same DAG written with plain KubernetesPodOperator.

Both DAG files are written to a temporary folder and parsed by Airflow's own ``DagBag`` (what the DAG
processor does: execute the file, collect and validate its DAGs), alternating between the two files for
many repetitions so machine noise hits both alike. The baseline spells out by hand what the GPU operator
derives: GPU requests/limits, the GPU toleration, node affinity on the GPU product, a memory-backed
/dev/shm and restricted security contexts.

Run: ``.venv/bin/python tests/benchmarks/bench_gpu_operator_parse.py [repetitions]``. Goal: ratio <= 1.05.
"""

from __future__ import annotations

import sys
import tempfile
import textwrap
from pathlib import Path

# Run as a script, so this folder is on sys.path.
from _parse_timing import isolated_airflow_home, rotating_medians

TASKS = 50

GPU_DAG = textwrap.dedent(
    f"""
    import datetime
    from airflow.sdk import DAG
    from airflow_provider_mltrain.operators.gpu_training import GPUTrainingPodOperator

    with DAG("bench_gpu", schedule=None, start_date=datetime.datetime(2026, 1, 1)):
        for i in range({TASKS}):
            GPUTrainingPodOperator(
                task_id=f"train_{{i}}",
                image="ghcr.io/example/trainer:1.0",
                namespace="ml",
                gpus=1,
                gpu_type=["NVIDIA-A100-SXM4-80GB", "NVIDIA-H100-80GB-HBM3"],
                cpu="8",
                memory="32Gi",
                arguments=["--epochs", "10"],
                hyperparameters={{"lr": 0.001 * (i + 1), "batch_size": 64}},
            )
    """
)

KPO_DAG = textwrap.dedent(
    f"""
    import datetime
    from airflow.sdk import DAG
    from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
    from kubernetes.client import models as k8s

    with DAG("bench_kpo", schedule=None, start_date=datetime.datetime(2026, 1, 1)):
        for i in range({TASKS}):
            amounts = {{"cpu": "8", "memory": "32Gi", "nvidia.com/gpu": "1"}}
            KubernetesPodOperator(
                task_id=f"train_{{i}}",
                image="ghcr.io/example/trainer:1.0",
                namespace="ml",
                cmds=["python", "-m", "gpu_trainer.train"],
                arguments=["--epochs", "10"],
                env_vars={{"MLTRAIN_HYPERPARAMETERS": '{{"lr": %s, "batch_size": 64}}' % (0.001 * (i + 1))}},
                container_resources=k8s.V1ResourceRequirements(requests=dict(amounts), limits=dict(amounts)),
                tolerations=[k8s.V1Toleration(key="nvidia.com/gpu", operator="Exists", effect="NoSchedule")],
                affinity=k8s.V1Affinity(
                    node_affinity=k8s.V1NodeAffinity(
                        required_during_scheduling_ignored_during_execution=k8s.V1NodeSelector(
                            node_selector_terms=[
                                k8s.V1NodeSelectorTerm(
                                    match_expressions=[
                                        k8s.V1NodeSelectorRequirement(
                                            key="nvidia.com/gpu.product",
                                            operator="In",
                                            values=["NVIDIA-A100-SXM4-80GB", "NVIDIA-H100-80GB-HBM3"],
                                        )
                                    ]
                                )
                            ]
                        )
                    )
                ),
                volumes=[
                    k8s.V1Volume(
                        name="shm", empty_dir=k8s.V1EmptyDirVolumeSource(medium="Memory", size_limit="32Gi")
                    )
                ],
                volume_mounts=[k8s.V1VolumeMount(name="shm", mount_path="/dev/shm")],
                security_context=k8s.V1PodSecurityContext(
                    run_as_non_root=True, seccomp_profile=k8s.V1SeccompProfile(type="RuntimeDefault")
                ),
                container_security_context=k8s.V1SecurityContext(
                    allow_privilege_escalation=False,
                    capabilities=k8s.V1Capabilities(drop=["ALL"]),
                    run_as_non_root=True,
                    seccomp_profile=k8s.V1SeccompProfile(type="RuntimeDefault"),
                ),
                do_xcom_push=True,
            )
    """
)

# A second, stricter reference: KPO with no Kubernetes model objects at all (it cannot ask for GPUs). The
# hand-written baseline above pays for building ~15 kubernetes.client models per task (each copies the
# client's Configuration); the GPU operator builds them only at execute time, so this shows the cost of
# its own constructor against the cheapest KPO there is.
KPO_BARE_DAG = textwrap.dedent(
    f"""
    import datetime
    from airflow.sdk import DAG
    from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator

    with DAG("bench_kpo_bare", schedule=None, start_date=datetime.datetime(2026, 1, 1)):
        for i in range({TASKS}):
            KubernetesPodOperator(
                task_id=f"train_{{i}}",
                image="ghcr.io/example/trainer:1.0",
                namespace="ml",
                cmds=["python", "-m", "gpu_trainer.train"],
                arguments=["--epochs", "10"],
                env_vars={{"MLTRAIN_HYPERPARAMETERS": '{{"lr": %s, "batch_size": 64}}' % (0.001 * (i + 1))}},
                do_xcom_push=True,
            )
    """
)


def main() -> None:
    repetitions = int(sys.argv[1]) if len(sys.argv) > 1 else 40
    isolated_airflow_home()
    with tempfile.TemporaryDirectory() as tmp:
        files = {
            "gpu": Path(tmp, "dag_gpu.py"),
            "kpo": Path(tmp, "dag_kpo.py"),
            "bare": Path(tmp, "dag_kpo_bare.py"),
        }
        for name, source in (("gpu", GPU_DAG), ("kpo", KPO_DAG), ("bare", KPO_BARE_DAG)):
            files[name].write_text(source)
        stats = rotating_medians(files, repetitions, expected_tasks=TASKS)
    med = {name: median for name, (median, _) in stats.items()}
    print(f"DAG with {TASKS} tasks, {repetitions} rotating repetitions each (DagBag parse):")
    labels = {
        "gpu": "GPUTrainingPodOperator",
        "kpo": "KubernetesPodOperator, same pod by hand",
        "bare": "KubernetesPodOperator, no k8s models",
    }
    for name, label in labels.items():
        print(f"  {label:42s} median {med[name] * 1000:8.2f} ms   (min {stats[name][1] * 1000:.2f} ms)")
    print(f"  ratio GPU / KPO same pod by hand (median) {med['gpu'] / med['kpo']:.3f}   (goal <= 1.05)")
    print(f"  ratio GPU / KPO without k8s models        {med['gpu'] / med['bare']:.3f}")


if __name__ == "__main__":
    main()
