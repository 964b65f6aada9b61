"""The local launcher: command substitution, environment hygiene, log streaming and killing process groups."""

from __future__ import annotations

import os
import sys
import textwrap
import time
from pathlib import Path

import pytest

from airflow_provider_mltrain.launchers.local import (
    LocalLauncher,
    LocalProcess,
    LocalTrainerTimeout,
    child_environment,
    local_command,
)
from gpu_trainer import contract
from tests.fixtures.logs import ListLog
from tests.fixtures.processes import alive, assert_all_gone, run_in_background, wait_for


def spawner(tmp_path: Path, *, ignore_term: bool) -> Path:
    """A trainer that starts a grandchild (like a DataLoader worker) and sleeps."""
    script = tmp_path / "spawner.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import signal, subprocess, sys, time
            if {ignore_term!r}:
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
            child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
            open({str(tmp_path / "pids")!r}, "w").write(f"{{child.pid}}\\n")
            print("started", flush=True)
            time.sleep(600)
            """
        )
    )
    return script


def test_local_command_uses_worker_python():
    assert local_command(["python", "-m", "gpu_trainer.train", "--epochs", "1"]) == [
        sys.executable,
        "-m",
        "gpu_trainer.train",
        "--epochs",
        "1",
    ]
    assert local_command(["torchrun", "--standalone", "-m", "x"])[:3] == [
        sys.executable,
        "-m",
        "torch.distributed.run",
    ]
    assert local_command(["/usr/bin/env", "true"]) == ["/usr/bin/env", "true"]
    with pytest.raises(ValueError, match="empty command"):
        local_command([])


def test_child_environment_withholds_worker_secrets():
    base = {
        "PATH": "/usr/bin",
        "AIRFLOW_CONN_OTHER": "postgres://u:secret@db/x",
        "AIRFLOW_VAR_TOKEN": "t",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": "postgresql://u:pw@db/airflow",
        "AIRFLOW__CORE__FERNET_KEY": "k",
        "MLFLOW_TRACKING_PASSWORD": "worker-own",
    }
    env = child_environment({"MLTRAIN_HYPERPARAMETERS": "{}", "MLFLOW_TRACKING_PASSWORD": "conn-pw"}, base)
    assert env["PATH"] == "/usr/bin"
    assert env["MLTRAIN_HYPERPARAMETERS"] == "{}"
    assert env["MLFLOW_TRACKING_PASSWORD"] == "conn-pw"  # this task's connection, not the worker's
    assert not {k for k in env if k.startswith(("AIRFLOW_CONN_", "AIRFLOW_VAR_", "AIRFLOW__"))}


def test_child_environment_withholds_the_workers_contract_variables():
    # The worker's own MLflow experiment, registry or checkpoint dir must not reach a task that set none.
    base = {
        "PATH": "/usr/bin",
        "MLFLOW_EXPERIMENT_NAME": "worker-exp",
        "MLFLOW_REGISTRY_URI": "http://worker-registry",
        "MLTRAIN_CHECKPOINT_DIR": "/worker/ckpt",
        "MLFLOW_RUN_NAME": "worker-run",
        # What MLflow's own fluent API leaves behind in a worker process (mlflow.set_experiment).
        "MLFLOW_EXPERIMENT_ID": "1",
        "MLFLOW_RUN_ID": "worker-run-id",
    }
    env = child_environment({"MLTRAIN_HYPERPARAMETERS": "{}"}, base)
    assert env == {"PATH": "/usr/bin", "MLTRAIN_HYPERPARAMETERS": "{}", "PYTHONUNBUFFERED": "1"}


def test_streams_output_line_by_line_and_returns_exit_code(tmp_path):
    script = tmp_path / "t.py"
    script.write_text("import sys\nprint('one', flush=True)\nprint('two', flush=True)\nsys.exit(3)\n")
    log = ListLog()
    proc = LocalProcess([sys.executable, str(script)], dict(os.environ), log)
    proc.start()
    assert proc.wait(30) == 3
    assert "[trainer] one" in log.lines and "[trainer] two" in log.lines
    assert list(proc.tail) == ["one", "two"]


@pytest.mark.parametrize("ignore_term", [False, True])
def test_timeout_stops_the_whole_process_group(tmp_path, ignore_term):
    log = ListLog()
    proc = LocalProcess(
        [sys.executable, str(spawner(tmp_path, ignore_term=ignore_term))],
        dict(os.environ),
        log,
        kill_grace_s=0.5,
    )
    proc.start()
    grandchild = int(wait_for(tmp_path / "pids"))
    started = time.monotonic()
    with pytest.raises(LocalTrainerTimeout, match="longer than"):
        proc.wait(1.0)
    assert time.monotonic() - started < 10
    assert proc.proc is not None and not alive(proc.proc.pid)
    deadline = time.monotonic() + 5
    while alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(grandchild), "the trainer's child survived the kill"
    if ignore_term:
        assert any("SIGKILL" in line for line in log.lines)


def test_launcher_gives_the_trainer_a_private_result_path_and_reads_it_back(tmp_path):
    script = tmp_path / "t.py"
    script.write_text(
        textwrap.dedent(
            """
            import os, sys
            from gpu_trainer import contract
            print(contract.result_path(), flush=True)
            result = contract.make_result(run_id="r1", model_uri="file:///m", metrics={"acc": float(sys.argv[1])},
                params={}, resumed_from_epoch=None)
            contract.write_result(contract.result_path(), result)
            sys.exit(int(sys.argv[2]))
            """
        )
    )
    checkpoint_dir = tmp_path / "ckpt" / "dag" / "task"
    env = {contract.ENV_RESULT_PATH: contract.DEFAULT_RESULT_PATH}  # the pod's path: not this machine's
    launcher = LocalLauncher(ListLog(), checkpoint_dir=str(checkpoint_dir), timeout_s=60)

    run = launcher.run(["python", str(script), "0.5", "0"], env)

    assert checkpoint_dir.is_dir()
    assert run.returncode == 0 and run.command[0] == sys.executable
    assert run.result is not None and run.result["metrics"] == {"acc": 0.5}
    result_path = run.tail[0]
    assert result_path != contract.DEFAULT_RESULT_PATH
    assert not os.path.exists(os.path.dirname(result_path))  # removed after reading

    failed = launcher.run(["python", str(script), "0.5", "3"], env)
    assert failed.returncode == 3 and failed.result is None


#: A trainer like ``torchrun --nproc-per-node=1``: it starts its worker in a session of its own, and the
#: worker starts a DataLoader-like child in its group. The worker ignores SIGTERM (busy writing a
#: checkpoint) until SIGKILL; the agent itself exits on SIGTERM, leaving the worker outside its group.
TORCHRUN_LIKE = textwrap.dedent(
    """
    import os, subprocess, sys, time
    pid_dir = sys.argv[1]
    worker = subprocess.Popen(
        [sys.executable, "-c", '''
    import signal, subprocess, sys, time
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    open(sys.argv[1], "w").write(str(child.pid))
    time.sleep(600)
    ''', os.path.join(pid_dir, "child")],
        start_new_session=True,
    )
    open(os.path.join(pid_dir, "worker"), "w").write(str(worker.pid))
    time.sleep(600)
    """
)


@pytest.mark.parametrize("how", ["stop", "timeout"])
def test_kill_reaches_a_worker_in_its_own_session(tmp_path, how):
    """A kill (on_kill) or the timeout leaves no process behind, not even one outside the trainer's group."""
    script = tmp_path / "agent.py"
    script.write_text(TORCHRUN_LIKE)
    log = ListLog()
    launcher = LocalLauncher(
        log,
        checkpoint_dir=str(tmp_path / "ckpt"),
        timeout_s=None if how == "stop" else 3,
        kill_grace_s=0.5,
        max_preemptions=3,  # a kill is never followed by a restart
    )
    runner, outcome = run_in_background(launcher, ["python", str(script), str(tmp_path)])
    pids = [int(wait_for(tmp_path / name, 30)) for name in ("worker", "child")]
    assert launcher._process is not None and launcher._process.proc is not None
    agent = launcher._process.proc.pid
    assert all(alive(pid) for pid in [*pids, agent])
    if how == "stop":
        launcher.stop()
    runner.join(30)

    assert not runner.is_alive()
    if how == "stop":
        assert outcome["run"].returncode != 0 and outcome["run"].preemptions == 0
    else:
        assert "longer than 3s" in str(outcome["error"])
    assert_all_gone([*pids, agent], "a process of the trainer survived the kill")
