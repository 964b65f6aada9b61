"""The multi-node local launcher without torch: the manifest's node command, each node's environment, node 0's
result, a failed node failing (or restarting) the set, and kill reaching every process of every node."""

from __future__ import annotations

import json
import os
import sys
import textwrap
from pathlib import Path

import pytest

from airflow_provider_mltrain.launchers.local_nodes import (
    LocalNodesLauncher,
    gpu_slices,
    node_command,
    node_environment,
    visible_gpus,
)
from gpu_trainer import contract
from tests.fixtures.logs import ListLog
from tests.fixtures.processes import alive, assert_all_gone, run_in_background, wait_for

#: A node that reports its torchrun settings and, on node 0, writes the result; ``fail_node`` fails one node
#: (on its first attempt only, when a marker directory is given).
NODE_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    from gpu_trainer import contract

    rank = int(os.environ[contract.ENV_NODE_RANK])
    names = (*contract.TORCHRUN_ENV_VARS, "RANK", "EXTRA", "CUDA_VISIBLE_DEVICES")
    print(json.dumps({name: os.environ.get(name) for name in names}))
    fail_node, marker_dir = int(sys.argv[1]), sys.argv[2]
    first_try = not os.path.exists(os.path.join(marker_dir, f"tried-{rank}"))
    open(os.path.join(marker_dir, f"tried-{rank}"), "w").close()
    if rank == fail_node and first_try:
        sys.exit(7)
    if rank == 0:
        contract.write_result(os.environ[contract.ENV_RESULT_PATH], contract.make_result(
            run_id="r", model_uri="file:///m", metrics={"node": float(rank)}, params={}, resumed_from_epoch=None))
    """
)


def jobset(command: list[str], args: list[str], env: list[dict]) -> dict:
    """The shape of a JobSet's node container (what DistributedTrainingOperator.build_manifest returns)."""
    container = {"name": "node", "image": "trainer:1", "command": command, "args": args, "env": env}
    pod = {"spec": {"containers": [{"name": "sidecar", "command": ["sleep"]}, container]}}
    return {
        "apiVersion": "jobset.x-k8s.io/v1alpha2",
        "kind": "JobSet",
        "spec": {"replicatedJobs": [{"name": "node", "template": {"spec": {"template": pod}}}]},
    }


def test_node_command_from_a_jobset_keeps_only_the_literal_user_env():
    env = [
        {"name": "EXTRA", "value": "1"},
        {
            "name": contract.ENV_NODE_RANK,
            "valueFrom": {"fieldRef": {"fieldPath": "metadata.annotations['x']"}},
        },
        {"name": contract.ENV_MASTER_ADDR, "value": "js-node-0-0.js"},
        {"name": contract.ENV_HYPERPARAMETERS, "value": "{}"},
        {"name": contract.ENV_TRACKING_PASSWORD, "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}},
    ]
    node = node_command(jobset(["torchrun"], ["-m", "gpu_trainer.train", "--epochs", "1"], env))
    assert node.command == ["torchrun", "-m", "gpu_trainer.train", "--epochs", "1"]
    assert node.env == {"EXTRA": "1"}


def test_node_command_from_a_trainjob_and_bad_manifests():
    manifest = {
        "kind": "TrainJob",
        "spec": {"trainer": {"command": ["torchrun", "train.py"], "env": [{"name": "A", "value": "b"}]}},
    }
    assert node_command(manifest).command == ["torchrun", "train.py"]
    assert node_command(manifest).env == {"A": "b"}
    with pytest.raises(ValueError, match="kind 'Deployment'; allowed: 'JobSet', 'TrainJob'"):
        node_command({"kind": "Deployment"})
    with pytest.raises(ValueError, match="no replicated job named 'node'"):
        node_command({"kind": "JobSet", "spec": {"replicatedJobs": []}})
    with pytest.raises(ValueError, match="has no command"):
        node_command({"kind": "TrainJob", "spec": {"trainer": {}}})


def test_node_environment_replaces_the_workers_torchrun_placement():
    base = {"PATH": "/bin", "RANK": "3", "PET_NODE_RANK": "9", "MASTER_ADDR": "elsewhere", "AIRFLOW__X": "y"}
    env = node_environment(
        {"EXTRA": "1"},
        node_rank=1,
        num_nodes=2,
        nproc_per_node=4,
        master_port=1234,
        result_path="/r",
        base=base,
    )
    assert env == {
        "PATH": "/bin",
        "EXTRA": "1",
        "PYTHONUNBUFFERED": "1",
        contract.ENV_RESULT_PATH: "/r",
        contract.ENV_NNODES: "2",
        contract.ENV_NPROC_PER_NODE: "4",
        contract.ENV_NODE_RANK: "1",
        contract.ENV_MASTER_ADDR: "127.0.0.1",
        contract.ENV_MASTER_PORT: "1234",
    }


def run_nodes(
    tmp_path: Path, *, fail_node: int = -1, max_restarts: int = 0, num_nodes: int = 3, gpus_per_node: int = 0
):
    script = tmp_path / "node.py"
    script.write_text(NODE_SCRIPT)
    log = ListLog()
    launcher = LocalNodesLauncher(
        log,
        checkpoint_dir=str(tmp_path / "ckpt"),
        num_nodes=num_nodes,
        nproc_per_node=2,
        timeout_s=60,
        kill_grace_s=1,
        max_restarts=max_restarts,
        gpus_per_node=gpus_per_node,
    )
    env = {"EXTRA": "x", "PYTHONPATH": os.getcwd()}
    return launcher.run(["python", str(script), str(fail_node), str(tmp_path)], env), log


def node_settings(log: ListLog) -> dict[int, dict]:
    """What each node printed (NODE_SCRIPT's first line), by node rank."""
    seen = {}
    for line in log.lines:
        for rank in range(3):
            prefix = f"[node {rank}] [trainer] "
            if line.startswith(prefix) and line.endswith("}"):
                seen[rank] = json.loads(line[len(prefix) :])
    return seen


def test_every_node_gets_its_rank_and_node_0s_result_is_returned(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")  # GPUs are split only when a node asks for some
    run, log = run_nodes(tmp_path)

    assert run.returncode == 0 and run.returncodes == [0, 0, 0] and run.failed_node is None
    assert run.result is not None and run.result["run_id"] == "r"
    seen = node_settings(log)
    ports = {settings[contract.ENV_MASTER_PORT] for settings in seen.values()}
    assert len(ports) == 1 and int(ports.pop()) > 0
    for rank, settings in seen.items():
        assert settings[contract.ENV_NODE_RANK] == str(rank)
        assert settings[contract.ENV_NNODES] == "3" and settings[contract.ENV_NPROC_PER_NODE] == "2"
        assert settings[contract.ENV_MASTER_ADDR] == "127.0.0.1"
        assert settings["RANK"] is None and settings["EXTRA"] == "x"
        assert settings["CUDA_VISIBLE_DEVICES"] == "0,1"  # the worker's, unchanged
    assert sorted(seen) == [0, 1, 2]
    assert (tmp_path / "ckpt").is_dir()


def test_a_failed_node_fails_the_set_with_its_exit_code(tmp_path):
    run, log = run_nodes(tmp_path, fail_node=1, num_nodes=2)

    assert run.failed_node == 1 and run.returncode == 7 and run.result is None
    assert run.restarts == 0


def test_max_restarts_restarts_every_node(tmp_path):
    run, log = run_nodes(tmp_path, fail_node=1, max_restarts=2, num_nodes=2)

    assert run.returncode == 0 and run.restarts == 1 and run.result is not None
    assert any("restarting all 2 nodes (restart 1 of 2)" in line for line in log.lines)


def test_each_node_gets_gpus_of_its_own(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5,6,7,GPU-abc")
    run, log = run_nodes(tmp_path, num_nodes=2, gpus_per_node=2)

    assert run.returncode == 0
    assert {rank: s["CUDA_VISIBLE_DEVICES"] for rank, s in node_settings(log).items()} == {0: "3,5", 1: "6,7"}

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2")
    with pytest.raises(ValueError, match=r"num_nodes=2 x gpus=2 needs 4 GPUs .* shows 3 \(0,1,2\)"):
        run_nodes(tmp_path, num_nodes=2, gpus_per_node=2)


def test_visible_gpus_from_nvidia_smi_or_none(tmp_path):
    fake = tmp_path / "nvidia-smi"
    fake.write_text(
        "#!/bin/sh\necho 'GPU 0: NVIDIA H100 (UUID: GPU-1)'\necho 'GPU 1: NVIDIA H100 (UUID: GPU-2)'\n"
    )
    fake.chmod(0o755)
    assert visible_gpus({"PATH": str(tmp_path)}) == ["0", "1"]
    assert visible_gpus({"PATH": str(tmp_path / "none")}) == []
    assert visible_gpus({"PATH": str(tmp_path), "CUDA_VISIBLE_DEVICES": ""}) == []
    assert gpu_slices(2, 1, []) is None  # no GPUs here: the nodes train on CPUs
    assert gpu_slices(1, 8, ["0"]) is None  # one node: nothing to split
    assert gpu_slices(2, 0, ["0", "1"]) is None


#: A node like a torchrun agent: it starts its worker in a session of its own, which then starts a child
#: (a DataLoader worker) in the worker's group; all three sleep. The worker ignores
#: SIGTERM, as a worker busy writing a checkpoint would until SIGKILL.
AGENT_SCRIPT = textwrap.dedent(
    """
    import os, subprocess, sys, time
    pid_dir = sys.argv[1]
    rank = os.environ["PET_NODE_RANK"]
    worker = subprocess.Popen(
        [sys.executable, "-c", '''
    import signal, subprocess, sys, time
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    open(sys.argv[1], "w").write(str(child.pid))
    time.sleep(600)
    ''', os.path.join(pid_dir, f"child-{rank}")],
        start_new_session=True,
    )
    open(os.path.join(pid_dir, f"worker-{rank}"), "w").write(str(worker.pid))
    print("agent up", flush=True)
    time.sleep(600)
    """
)


@pytest.mark.parametrize("how", ["stop", "timeout"])
def test_kill_stops_every_process_of_every_node(tmp_path, how):
    script = tmp_path / "agent.py"
    script.write_text(AGENT_SCRIPT)
    launcher = LocalNodesLauncher(
        ListLog(),
        checkpoint_dir=str(tmp_path / "ckpt"),
        num_nodes=2,
        nproc_per_node=1,
        timeout_s=None if how == "stop" else 4,
        kill_grace_s=0.5,
        max_restarts=3,  # a kill is never followed by a restart
    )
    runner, outcome = run_in_background(launcher, ["python", str(script), str(tmp_path)])
    pids = [int(wait_for(tmp_path / f"{kind}-{rank}", 30)) for kind in ("worker", "child") for rank in (0, 1)]
    agents = [process.proc.pid for process in launcher._processes if process.proc is not None]
    assert len(agents) == 2 and all(alive(pid) for pid in pids + agents)
    if how == "stop":
        launcher.stop()
    runner.join(30)

    assert not runner.is_alive()
    if how == "stop":
        assert outcome["run"].returncode != 0 and outcome["run"].restarts == 0
    else:
        assert "ran longer than 4s" in str(outcome["error"])
    assert_all_gone(pids + agents, "a process of a node survived the kill")


def test_node_python_is_the_workers(tmp_path):
    run, _log = run_nodes(tmp_path, num_nodes=1)
    assert run.command[0] == sys.executable


def test_a_launcher_stopped_before_it_runs_starts_no_node(tmp_path):
    launcher = LocalNodesLauncher(
        ListLog(), checkpoint_dir=str(tmp_path / "ckpt"), num_nodes=2, nproc_per_node=1
    )
    launcher.stop()

    run = launcher.run(["python", "-c", f"open({str(tmp_path / 'started')!r}, 'w')"], {})

    assert run.returncode != 0 and run.result is None and run.returncodes == [None, None]
    assert not (tmp_path / "started").exists()
