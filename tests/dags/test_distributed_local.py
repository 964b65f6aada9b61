"""DistributedTrainingOperator on the local launcher: the JobSet's own node command run as real torchrun agents.

Two nodes x one process (gloo, CPU) through ``dag.test()`` train digits as well as one node does, log one
MLflow run on the real server and return one result; kill and execution_timeout stop every process of every
node, torchrun's workers (each in a session of its own) and their children included.
"""

from __future__ import annotations

import datetime as dt
import textwrap
import threading
from pathlib import Path

import pytest
from airflow.exceptions import AirflowException

from airflow_provider_mltrain.hooks.mlflow import MLflowHook, connection_json
from airflow_provider_mltrain.operators.distributed_training import DistributedTrainingOperator
from airflow_provider_mltrain.testing import run_dag, xcom_value
from gpu_trainer import contract
from gpu_trainer.digits import write_digits
from tests.fixtures.gpu_operator import make_context
from tests.fixtures.processes import assert_all_gone, wait_for
from tests.fixtures.trainer_scripts import TORCHRUN_PROBE

#: Every node mounts it on a cluster; locally it stands for the shared directory under the checkpoint root.
SHARED_VOLUME = {"claim_name": "ckpt", "mount_path": "/ckpt", "access_mode": "ReadWriteMany"}
#: Enough epochs for both runs to converge (the 2-node run takes half the optimizer steps per epoch).
TRAINER_ARGS = ["--epochs", "8", "--batch-size", "64", "--lr", "0.002", "--seed", "7", "--hidden-dim", "128"]

#: A worker like the trainer's DataLoader-using rank: it starts a child and sleeps, recording both pids.
SLEEPER = textwrap.dedent(
    """
    import os, subprocess, sys, time
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    node = os.environ["GROUP_RANK"]  # torchrun's node rank for its workers
    open(os.path.join(sys.argv[1], f"pids-{node}"), "w").write(f"{os.getpid()} {child.pid}")
    time.sleep(600)
    """
)


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("digits")
    write_digits(str(out))
    return out


@pytest.fixture
def local_root(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("AIRFLOW__MLTRAIN__LAUNCHER", "local")
    root = tmp_path / "checkpoints"
    monkeypatch.setenv("AIRFLOW__MLTRAIN__LOCAL_CHECKPOINT_ROOT", str(root))
    return root


def test_two_nodes_train_like_one_log_one_run_and_return_one_result(
    airflow_db, airflow_conn, mlflow_server, local_root, digits, tmp_path
):
    from airflow.sdk import DAG

    airflow_conn("mlflow_default", connection_json(mlflow_server.uri))
    experiment = f"multinode-{tmp_path.name}"
    with DAG("distributed_local", schedule=None, catchup=False) as dag:
        for nodes in (1, 2):
            DistributedTrainingOperator(
                task_id=f"train_{nodes}_nodes",
                num_nodes=nodes,
                arguments=["--data", str(digits), *TRAINER_ARGS],
                mlflow_conn_id="mlflow_default",
                experiment_name=f"{experiment}-{nodes}",
                checkpoint_volume=SHARED_VOLUME,
                # A literal variable of the manifest reaches every node (and keeps 2 cores from thrashing).
                env_vars={"OMP_NUM_THREADS": "1"},
            )

    dag_run = run_dag(dag, logical_date=dt.datetime(2026, 11, 27, tzinfo=dt.timezone.utc))

    assert dag_run.state == "success", {ti.task_id: ti.state for ti in dag_run.get_task_instances()}
    one = xcom_value(dag_run, "train_1_nodes")
    two = xcom_value(dag_run, "train_2_nodes")
    for result, world_size in ((one, 1), (two, 2)):
        assert contract.validate_result(result, require_metrics=contract.CLASSIFICATION_METRICS) == result
        assert result["params"]["world_size"] == world_size
        assert xcom_value(dag_run, f"train_{world_size}_nodes", key="run_id") == result["run_id"]
    assert abs(two["metrics"]["val_accuracy"] - one["metrics"]["val_accuracy"]) <= 0.02
    assert two["metrics"]["val_accuracy"] > 0.9
    client = MLflowHook().get_conn()
    runs = client.search_runs([client.get_experiment_by_name(f"{experiment}-2").experiment_id])
    assert [run.info.run_id for run in runs] == [two["run_id"]]
    assert runs[0].data.params["world_size"] == "2"
    assert runs[0].data.tags["airflow.dag_run_id"] == dag_run.run_id
    # Both nodes shared one checkpoint directory under the local checkpoint root.
    assert len({path.parent for path in local_root.rglob("ckpt-*.pt") if "train_2_nodes" in str(path)}) == 1


def test_two_nodes_of_two_processes_rendezvous_with_the_manifests_command(tmp_path, local_root):
    script = tmp_path / "probe.py"
    script.write_text(TORCHRUN_PROBE)
    op = DistributedTrainingOperator(
        task_id="train",
        launcher="local",
        num_nodes=2,
        nproc_per_node=2,
        cmds=["python", str(script)],  # the manifest runs it as `torchrun <script>`
        checkpoint_volume=SHARED_VOLUME,
        env_vars={"OMP_NUM_THREADS": "1"},
    )

    result = op.execute(make_context())

    assert result["metrics"] == {"world_size": 4.0}
    # torchrun placed node k's workers as global ranks 2k and 2k+1; node 0 holds rank 0, which reported.
    assert result["params"]["ranks"] == [
        {
            "RANK": rank,
            "LOCAL_RANK": rank % 2,
            "GROUP_RANK": rank // 2,
            "WORLD_SIZE": 4,
            "LOCAL_WORLD_SIZE": 2,
        }
        for rank in range(4)
    ]
    assert result["params"]["node_rank_env"] == "0"


def test_a_failed_node_is_named_and_triaged_after_max_restarts(tmp_path, local_root):
    script = tmp_path / "oom.py"
    script.write_text(
        "import os, sys, time\n"
        "if os.environ['GROUP_RANK'] == '1':\n"
        "    print('torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB', flush=True)\n"
        "    sys.exit(1)\n"
        "time.sleep(600)\n"
    )
    op = DistributedTrainingOperator(
        task_id="train",
        launcher="local",
        num_nodes=2,
        cmds=["python", str(script)],
        checkpoint_volume=SHARED_VOLUME,
        max_restarts=1,
        local_kill_grace_seconds=1,
    )

    with pytest.raises(AirflowException) as failure:
        op.execute(make_context())

    message = str(failure.value)
    assert "out of GPU memory" in message
    assert "node 1 of 2 exited with code 1 (after 1 of max_restarts=1 restarts)" in message


def sleeper_op(tmp_path: Path, **kwargs) -> DistributedTrainingOperator:
    script = tmp_path / "sleeper.py"
    script.write_text(SLEEPER)
    return DistributedTrainingOperator(
        task_id="train",
        launcher="local",
        num_nodes=2,
        cmds=["python", str(script)],
        arguments=[str(tmp_path)],
        checkpoint_volume=SHARED_VOLUME,
        local_kill_grace_seconds=1,
        **kwargs,
    )


def sleeper_pids(tmp_path: Path) -> list[int]:
    return [int(pid) for node in (0, 1) for pid in wait_for(tmp_path / f"pids-{node}", 60).split()]


def test_on_kill_stops_every_process_of_every_node(tmp_path, local_root):
    op = sleeper_op(tmp_path, max_restarts=2)  # a kill is never followed by a restart
    errors: list[BaseException] = []

    def target() -> None:
        try:
            op.execute(make_context())
        except BaseException as err:
            errors.append(err)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    workers = sleeper_pids(tmp_path)
    launcher = op._local_nodes
    assert launcher is not None
    agents = [process.proc.pid for process in launcher._processes if process.proc is not None]
    assert len(agents) == 2

    op.on_kill()
    thread.join(60)

    assert not thread.is_alive()
    assert errors and "exited with code" in str(errors[0]) and "after 0 of max_restarts=2" in str(errors[0])
    assert_all_gone(workers + agents, "a process of a node survived the kill", timeout=10)


def test_execution_timeout_stops_every_process_of_every_node(tmp_path, local_root):
    op = sleeper_op(tmp_path, execution_timeout=dt.timedelta(seconds=20))
    errors: list[BaseException] = []
    thread = threading.Thread(target=lambda: _record(errors, op), daemon=True)
    thread.start()
    workers = sleeper_pids(tmp_path)
    thread.join(90)

    assert not thread.is_alive()
    assert errors and isinstance(errors[0], AirflowException) and "execution_timeout" in str(errors[0])
    assert_all_gone(workers, "a process of a node survived the kill", timeout=10)


def _record(errors: list[BaseException], op: DistributedTrainingOperator) -> None:
    try:
        op.execute(make_context())
    except BaseException as err:
        errors.append(err)
