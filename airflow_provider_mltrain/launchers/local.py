"""The local launcher: run the trainer as a subprocess of the worker, with the pod's contract.

For laptops, demos and CI: the same command, the same environment variables and the same result file as
the pod, but no cluster. The child gets its own process group so a kill (``on_kill``, an execution timeout)
stops the trainer and everything it started (DataLoader workers, torchrun's ranks), not just the leader.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any

from airflow.providers.common.compat.sdk import conf

from gpu_trainer import contract

#: Seconds between SIGTERM and SIGKILL: time for the trainer to save a checkpoint.
DEFAULT_KILL_GRACE_S = 10.0
#: Environment variables of the worker that never reach the trainer, which gets what a pod would: other
#: connections and variables, Airflow settings (database URL, fernet and JWT keys), every MLflow and contract
#: variable of the worker (its credentials, and also what MLflow itself leaves in os.environ: in-process
#: ``mlflow.set_experiment`` sets MLFLOW_EXPERIMENT_ID, which a later trainer would otherwise inherit and
#: fail on, or log into the wrong experiment), and its own AWS identity and endpoint (keys, profile,
#: AWS_ENDPOINT_URL[_S3], and fsspec's FSSPEC_S3_* settings, which s3fs would prefer to the task's). The
#: trainer gets this task's MLflow connection and contract, and with aws_conn_id this task's data store only.
_WITHHELD_PREFIXES = (
    "AIRFLOW__",
    "AIRFLOW_CONN_",
    "AIRFLOW_VAR_",
    "_AIRFLOW",
    "MLFLOW_",
    "MLTRAIN_",
    "AWS_",
    "FSSPEC_S3_",
)


class LocalTrainerTimeout(TimeoutError):
    """The trainer ran past its deadline and was stopped."""


def local_command(cmds: Sequence[str]) -> list[str]:
    """The command with the worker's Python for a leading ``python`` (and ``torchrun``).

    :param cmds: the pod's command (container ``command`` + ``args``).
    """
    cmd = list(cmds)
    if not cmd:
        raise ValueError("local launcher: empty command")
    if cmd[0] in ("python", "python3") or cmd[0].startswith("python3."):
        cmd[0] = sys.executable
    elif cmd[0] == "torchrun":
        cmd[:1] = [sys.executable, "-m", "torch.distributed.run"]
    return cmd


def child_environment(
    contract_env: Mapping[str, str], base: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The worker's environment minus what belongs to other tasks, plus this task's contract.

    :param contract_env: the pod's literal environment plus the connection's variables.
    :param base: the environment to start from; ``os.environ`` when None.
    """
    source = os.environ if base is None else base
    env = {key: value for key, value in source.items() if not key.startswith(_WITHHELD_PREFIXES)}
    env.update(contract_env)
    # Line-buffered output so the task log follows the trainer as it goes.
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


class LocalProcess:
    """One trainer subprocess in its own process group.

    :param cmd: the command (no shell).
    :param env: the child's complete environment.
    :param log: where each output line goes (a logger: ``info``/``warning``).
    :param cwd: working directory.
    :param kill_grace_s: seconds between SIGTERM and SIGKILL.
    """

    def __init__(
        self,
        cmd: Sequence[str],
        env: Mapping[str, str],
        log: Any,
        *,
        cwd: str | None = None,
        kill_grace_s: float = DEFAULT_KILL_GRACE_S,
    ) -> None:
        self.cmd = list(cmd)
        self.env = dict(env)
        self.log = log
        self.cwd = cwd
        self.kill_grace_s = kill_grace_s
        self.proc: subprocess.Popen[str] | None = None
        self.tail: deque[str] = deque(maxlen=50)
        self._reader: threading.Thread | None = None

    def _pump(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            line = line.rstrip("\n")
            self.tail.append(line)
            self.log.info("[trainer] %s", line)

    def start(self) -> None:
        self.log.info("Local launcher: running %s", self.cmd)
        self.proc = subprocess.Popen(
            self.cmd,
            env=self.env,
            cwd=self.cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            errors="replace",
            bufsize=1,
            start_new_session=True,  # own process group: kill reaches the trainer's children too
        )
        self._reader = threading.Thread(target=self._pump, name="mltrain-local-log", daemon=True)
        self._reader.start()

    def wait(self, timeout_s: float | None = None) -> int:
        """Wait for the trainer; on timeout (or any interruption) stop its process group.

        :param timeout_s: seconds to wait; None waits forever.
        :raises LocalTrainerTimeout: when the deadline passed.
        """
        assert self.proc is not None
        try:
            rc = self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired as err:
            self.stop()
            raise LocalTrainerTimeout(
                f"trainer ran longer than {timeout_s:.0f}s (execution_timeout) and was stopped"
            ) from err
        except BaseException:
            # Airflow's own execution_timeout arrives as an exception in this thread: never orphan the child.
            self.stop()
            raise
        if self._reader is not None:
            self._reader.join(timeout=5)
        return rc

    def stop(self) -> None:
        """SIGTERM the process group, then SIGKILL it and every descendant after the grace period."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        self.log.warning("Local launcher: stopping trainer process group %s", proc.pid)
        if stop_process_groups([proc], self.kill_grace_s):
            self.log.warning(
                "Local launcher: trainer ignored SIGTERM for %.0fs, sending SIGKILL", self.kill_grace_s
            )


def stop_process_groups(procs: Sequence[subprocess.Popen[Any]], kill_grace_s: float) -> bool:
    """SIGTERM each process group, wait ``kill_grace_s`` for all, then SIGKILL what is left.

    Only the leaders' groups get SIGTERM: torchrun forwards it to its workers once (a second SIGTERM would
    cut short the checkpoint a trainer writes on the first). A process in a session of its own (torchrun
    starts each worker with ``start_new_session``) is outside the leader's group, so the descendants found
    while the leaders lived get SIGKILL too, with their groups: nothing outlives the task.

    :param procs: the leaders, each started with ``start_new_session=True``.
    :param kill_grace_s: seconds between SIGTERM and SIGKILL.
    :returns: whether anything was still running when the grace period ran out.
    """
    if not procs:
        return False
    descendants = _descendants([proc.pid for proc in procs])
    for proc in procs:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGTERM)
    grace_end = time.monotonic() + kill_grace_s
    outlived = True
    while time.monotonic() < grace_end:
        if any(proc.poll() is None for proc in procs):
            descendants |= _descendants([proc.pid for proc in procs if proc.poll() is None])
        elif not any(_alive(pid) for pid in descendants):
            outlived = False
            break
        time.sleep(0.05)
    own_group = os.getpgid(0)
    # The leader may be gone while its children linger: the groups get SIGKILL either way.
    for proc in procs:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
    for pid in descendants:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            group = os.getpgid(pid)
            if group != own_group:
                os.killpg(group, signal.SIGKILL)
            os.kill(pid, signal.SIGKILL)
    for proc in procs:
        proc.wait()
    return outlived


def _descendants(pids: Sequence[int]) -> set[int]:
    """Every living descendant of ``pids`` (children first started in sessions of their own included)."""
    import psutil

    found: set[int] = set()
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            found.update(child.pid for child in psutil.Process(pid).children(recursive=True))
    return found


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def local_checkpoint_root() -> str:
    """Where local trainers keep checkpoints: ``[mltrain] local_checkpoint_root``, else under AIRFLOW_HOME."""
    root = conf.get("mltrain", "local_checkpoint_root", fallback=None)
    if not root:
        home = os.environ.get("AIRFLOW_HOME") or tempfile.gettempdir()
        root = os.path.join(home, "mltrain", "checkpoints")
    return os.path.expanduser(root)


@dataclasses.dataclass(frozen=True)
class LocalRun:
    """How one local trainer run ended.

    :param command: the command that ran (with the worker's Python).
    :param returncode: the trainer's exit code.
    :param tail: its last output lines.
    :param result: the validated result file (:func:`gpu_trainer.contract.load_result`); None unless the
        exit code is 0.
    :param preemptions: how often the trainer exited
        :data:`~gpu_trainer.contract.PREEMPTED_EXIT_CODE` on a SIGTERM that was not the launcher's (each
        restarted it, up to ``max_preemptions``; the last one may have ended the run).
    """

    command: list[str]
    returncode: int
    tail: list[str]
    result: dict[str, Any] | None
    preemptions: int = 0


class LocalLauncher:
    """Run one trainer as a subprocess of the worker, the way a pod would run it.

    The caller gives the pod's command and the trainer's environment; the launcher swaps in the worker's
    Python, withholds the worker's own secrets (:func:`child_environment`), creates the checkpoint
    directory, points ``MLTRAIN_RESULT_PATH`` at a private temporary file and reads the result back.

    :param log: where the trainer's output lines go (a logger: ``info``/``warning``).
    :param checkpoint_dir: the trainer's checkpoint directory on this machine (created if missing).
    :param timeout_s: seconds the trainer may run, restarts included; None waits forever.
    :param kill_grace_s: seconds between SIGTERM and SIGKILL on stop or timeout.
    :param max_preemptions: how often a trainer that exits
        :data:`~gpu_trainer.contract.PREEMPTED_EXIT_CODE` after a SIGTERM that did not come from
        :meth:`stop` (or the timeout) is started again, with the same command, environment and checkpoint
        directory, so it resumes from the checkpoint it wrote on that SIGTERM.
    """

    def __init__(
        self,
        log: Any,
        *,
        checkpoint_dir: str,
        timeout_s: float | None = None,
        kill_grace_s: float = DEFAULT_KILL_GRACE_S,
        max_preemptions: int = 0,
    ) -> None:
        self.log = log
        self.checkpoint_dir = checkpoint_dir
        self.timeout_s = timeout_s
        self.kill_grace_s = kill_grace_s
        self.max_preemptions = max_preemptions
        self._process: LocalProcess | None = None
        # Set by stop() before it signals: a trainer that then exits 143 was stopped by Airflow (on_kill,
        # execution_timeout), not preempted, and is never started again.
        self._stopped = False
        self._lock = threading.Lock()

    def run(self, cmds: Sequence[str], env: Mapping[str, str]) -> LocalRun:
        """Run the trainer to its end.

        :param cmds: the pod's command (container ``command`` + ``args``).
        :param env: the trainer's variables (the pod's literal ones plus the contract's).
        :raises LocalTrainerTimeout: when it ran past ``timeout_s`` (it was stopped).
        :raises gpu_trainer.contract.ContractError: when it exited 0 without a valid result file.
        """
        cmd = local_command(cmds)
        os.makedirs(self.checkpoint_dir, exist_ok=True)
        result_dir = tempfile.mkdtemp(prefix="mltrain-result-")
        result_path = os.path.join(result_dir, "return.json")
        child_env = child_environment({**env, contract.ENV_RESULT_PATH: result_path})
        deadline = None if self.timeout_s is None else time.monotonic() + self.timeout_s
        preemptions = 0
        try:
            while True:
                process = LocalProcess(cmd, child_env, self.log, kill_grace_s=self.kill_grace_s)
                with self._lock:
                    if self._stopped:
                        # stop() came between two runs: the restart it would have raced never starts.
                        return LocalRun(command=cmd, returncode=-signal.SIGTERM, tail=[], result=None)
                    self._process = process
                    process.start()
                remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
                try:
                    rc = process.wait(remaining)
                except LocalTrainerTimeout as err:
                    raise LocalTrainerTimeout(
                        f"trainer ran longer than {self.timeout_s:.0f}s (execution_timeout) and was stopped"
                    ) from err
                if rc == contract.PREEMPTED_EXIT_CODE and not self._stopped:
                    preemptions += 1
                    if preemptions <= self.max_preemptions:
                        self.log.warning(
                            "Local launcher: the trainer exited %s after a SIGTERM that did not come from "
                            "Airflow (preempted); restarting it, %s of %s, from the checkpoint in %s",
                            rc,
                            preemptions,
                            self.max_preemptions,
                            self.checkpoint_dir,
                        )
                        continue
                result = contract.load_result(result_path) if rc == 0 else None
                tail = list(process.tail)
                return LocalRun(command=cmd, returncode=rc, tail=tail, result=result, preemptions=preemptions)
        finally:
            self._process = None
            shutil.rmtree(result_dir, ignore_errors=True)

    def stop(self) -> None:
        """Stop the trainer for good (SIGTERM, then SIGKILL to its process group): no restart follows."""
        with self._lock:
            self._stopped = True
            process = self._process
        if process is not None:
            process.stop()
