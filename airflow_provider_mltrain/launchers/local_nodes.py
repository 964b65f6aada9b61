"""The multi-node local launcher: every node of a JobSet or TrainJob as a torchrun agent on this machine.

Each node runs exactly the command and literal environment of the manifest's ``node`` container, with
torchrun's rendezvous settings (:data:`gpu_trainer.contract.TORCHRUN_ENV_VARS`) set the way the cluster sets
them: the node's rank, the node and process counts, and the leader at 127.0.0.1 on a free port (and with
GPUs, each node its own share of this machine's). So the manifest's own command line is exercised for real,
down to the gloo (CPU) or NCCL rendezvous.

Like the cluster engines, a failed node fails the whole set: the other nodes are stopped, and with
``max_restarts`` every node starts again (JobSet's ``failurePolicy.maxRestarts``), resuming from the shared
checkpoint directory. A kill stops every process of every node: torchrun starts each worker in a session
of its own, so the launcher also tracks the agents' descendants and stops their process groups.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

from airflow_provider_mltrain.launchers.local import (
    DEFAULT_KILL_GRACE_S,
    LocalProcess,
    LocalRun,
    LocalTrainerTimeout,
    child_environment,
    local_command,
    stop_process_groups,
)
from airflow_provider_mltrain.operators._manifests import NODE_NAME
from gpu_trainer import contract

#: Where the nodes rendezvous on this machine.
LOCAL_MASTER_ADDR = "127.0.0.1"
#: The worker's own torchrun placement (an Airflow worker started under torchrun, a test run inside one):
#: a node gets its placement from the launcher only.
_TORCHRUN_PLACEMENT_VARS = (
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "ROLE_RANK",
    "ROLE_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
)
_TORCHRUN_PLACEMENT_PREFIXES = ("PET_", "TORCHELASTIC_")
#: Seconds between checks of the nodes' exit codes.
_POLL_S = 0.1


@dataclasses.dataclass(frozen=True)
class NodeCommand:
    """What every node of a manifest runs.

    :param command: the container's ``command`` followed by its ``args``.
    :param env: the container's literal variables (``value``, not ``valueFrom``), without torchrun's
        rendezvous settings and the contract's variables, which the launcher sets for this machine.
    """

    command: list[str]
    env: dict[str, str]


def node_command(manifest: Mapping[str, Any]) -> NodeCommand:
    """The ``node`` container's command and literal environment, from a JobSet or TrainJob manifest.

    :param manifest: what ``DistributedTrainingOperator.build_manifest()`` returns.
    :raises ValueError: when the manifest has no ``node`` container or no command.
    """
    kind = manifest.get("kind")
    spec = manifest.get("spec") or {}
    if kind == "JobSet":
        jobs = [job for job in spec.get("replicatedJobs") or [] if job.get("name") == NODE_NAME]
        if not jobs:
            raise ValueError(f"JobSet manifest has no replicated job named {NODE_NAME!r}")
        pod_spec = jobs[0]["template"]["spec"]["template"]["spec"]
        containers = [c for c in pod_spec.get("containers") or [] if c.get("name") == NODE_NAME]
        if not containers:
            raise ValueError(
                f"JobSet manifest's {NODE_NAME!r} pod template has no container named {NODE_NAME!r}"
            )
        container = containers[0]
    elif kind == "TrainJob":
        container = spec.get("trainer") or {}
    else:
        raise ValueError(f"local multi-node launcher: manifest kind {kind!r}; allowed: 'JobSet', 'TrainJob'")
    command = [*(container.get("command") or []), *(container.get("args") or [])]
    if not command:
        raise ValueError(f"{kind} manifest's {NODE_NAME!r} container has no command")
    owned = set(contract.TORCHRUN_ENV_VARS) | set(contract.TRAINER_ENV_VARS)
    env = {
        item["name"]: str(item["value"])
        for item in container.get("env") or []
        if item.get("value") is not None and item["name"] not in owned
    }
    return NodeCommand(command=command, env=env)


def free_port(host: str = LOCAL_MASTER_ADDR) -> int:
    """A TCP port nothing listens on now (the leader's rendezvous binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def node_environment(
    env: Mapping[str, str],
    *,
    node_rank: int,
    num_nodes: int,
    nproc_per_node: int,
    master_port: int,
    result_path: str,
    base: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """One node's complete environment: the worker's (minus secrets and torchrun placement), the trainer's
    variables, this node's private result path and torchrun's rendezvous settings.

    :param env: the trainer's variables (the manifest's literal ones plus the contract's).
    :param node_rank: this node's index, 0 for the leader.
    :param num_nodes: how many nodes the job has.
    :param nproc_per_node: torchrun workers per node.
    :param master_port: the leader's rendezvous port on 127.0.0.1.
    :param result_path: where this node's global rank 0 (on node 0 only) writes the result.
    :param base: the environment to start from; ``os.environ`` when None.
    """
    source = os.environ if base is None else base
    clean = {
        key: value
        for key, value in source.items()
        if key not in _TORCHRUN_PLACEMENT_VARS and not key.startswith(_TORCHRUN_PLACEMENT_PREFIXES)
    }
    return child_environment(
        {
            **env,
            contract.ENV_RESULT_PATH: result_path,
            contract.ENV_NNODES: str(num_nodes),
            contract.ENV_NPROC_PER_NODE: str(nproc_per_node),
            contract.ENV_NODE_RANK: str(node_rank),
            contract.ENV_MASTER_ADDR: LOCAL_MASTER_ADDR,
            contract.ENV_MASTER_PORT: str(master_port),
        },
        clean,
    )


def visible_gpus(environ: Mapping[str, str] | None = None) -> list[str]:
    """This machine's GPUs as ``CUDA_VISIBLE_DEVICES`` entries: the worker's own ``CUDA_VISIBLE_DEVICES``
    when set, else one index per GPU ``nvidia-smi -L`` lists (none without ``nvidia-smi``).

    :param environ: the worker's environment; ``os.environ`` when None.
    """
    source = os.environ if environ is None else environ
    if "CUDA_VISIBLE_DEVICES" in source:
        return [device.strip() for device in source["CUDA_VISIBLE_DEVICES"].split(",") if device.strip()]
    program = shutil.which("nvidia-smi", path=source.get("PATH"))
    if program is None:
        return []
    try:
        listing = subprocess.run([program, "-L"], capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return []
    count = sum(1 for line in listing.stdout.splitlines() if line.startswith("GPU "))
    return [str(index) for index in range(count)]


def gpu_slices(num_nodes: int, gpus_per_node: int, available: Sequence[str]) -> list[str] | None:
    """Each node's ``CUDA_VISIBLE_DEVICES``: GPUs of its own, as each pod has on the cluster (otherwise
    every node's local rank 0 would pick ``cuda:0``, and NCCL refuses two ranks on one GPU).

    :param num_nodes: how many nodes.
    :param gpus_per_node: GPUs each node asks for (the operator's ``gpus``).
    :param available: this machine's GPUs (:func:`visible_gpus`).
    :returns: one entry per node; None when nothing is split (no GPUs asked for or seen, or one node).
    :raises ValueError: when the nodes together ask for more GPUs than this machine shows.
    """
    if gpus_per_node == 0 or num_nodes == 1 or not available:
        return None
    needed = num_nodes * gpus_per_node
    if len(available) < needed:
        raise ValueError(
            f"launcher='local': num_nodes={num_nodes} x gpus={gpus_per_node} needs {needed} GPUs (each node "
            f"its own, as on the cluster) but this machine shows {len(available)} ({','.join(available)}); "
            "lower num_nodes or gpus, or set gpus=0 to train on CPUs"
        )
    return [
        ",".join(available[rank * gpus_per_node : (rank + 1) * gpus_per_node]) for rank in range(num_nodes)
    ]


class _NodeLog:
    """A logger that puts the node's rank in front of every line (``[node 1] [trainer] ...``)."""

    def __init__(self, log: Any, node_rank: int) -> None:
        self.log = log
        self.prefix = f"[node {node_rank}] "

    def info(self, msg: str, *args: Any) -> None:
        self.log.info(self.prefix + msg, *args)

    def warning(self, msg: str, *args: Any) -> None:
        self.log.warning(self.prefix + msg, *args)


@dataclasses.dataclass(frozen=True)
class LocalNodesRun(LocalRun):
    """How a local multi-node run ended (the last attempt, after any restarts).

    ``returncode`` and ``tail`` are the failed node's (the first to fail), else node 0's; ``result`` is
    node 0's result file, where global rank 0 wrote it.

    :param returncodes: every node's exit code, by node rank.
    :param failed_node: the rank of the node that failed first; None when all succeeded.
    :param restarts: how many times every node was restarted.
    """

    returncodes: list[int | None] = dataclasses.field(default_factory=list)
    failed_node: int | None = None
    restarts: int = 0


class LocalNodesLauncher:
    """Run ``num_nodes`` torchrun agents on this machine, the way a JobSet or TrainJob runs its nodes.

    :param log: where the nodes' output lines go (a logger: ``info``/``warning``), each with its node rank.
    :param checkpoint_dir: the checkpoint directory every node shares (created if missing).
    :param num_nodes: how many nodes (torchrun agents) to start.
    :param nproc_per_node: torchrun workers per node (``PET_NPROC_PER_NODE``).
    :param timeout_s: seconds all attempts together may run; None waits forever.
    :param kill_grace_s: seconds between SIGTERM and SIGKILL on stop, timeout or a failed node.
    :param max_restarts: how many times a failed node restarts every node (JobSet's
        ``failurePolicy.maxRestarts``); each attempt resumes from the checkpoint directory.
    :param gpus_per_node: GPUs each node asks for: with several nodes each gets that many of this
        machine's GPUs as its ``CUDA_VISIBLE_DEVICES`` (:func:`gpu_slices`).
    """

    def __init__(
        self,
        log: Any,
        *,
        checkpoint_dir: str,
        num_nodes: int,
        nproc_per_node: int,
        timeout_s: float | None = None,
        kill_grace_s: float = DEFAULT_KILL_GRACE_S,
        max_restarts: int = 0,
        gpus_per_node: int = 0,
    ) -> None:
        if num_nodes < 1:
            raise ValueError(f"num_nodes={num_nodes!r}: must be >= 1")
        if nproc_per_node < 1:
            raise ValueError(f"nproc_per_node={nproc_per_node!r}: must be >= 1")
        if max_restarts < 0:
            raise ValueError(f"max_restarts={max_restarts!r}: must be >= 0")
        self.log = log
        self.checkpoint_dir = checkpoint_dir
        self.num_nodes = num_nodes
        self.nproc_per_node = nproc_per_node
        self.timeout_s = timeout_s
        self.kill_grace_s = kill_grace_s
        self.max_restarts = max_restarts
        self.gpus_per_node = gpus_per_node
        self._processes: list[LocalProcess] = []
        # Reentrant: Airflow calls on_kill (stop) from a signal handler, which may run in this thread while
        # it holds the lock to start the nodes.
        self._lock = threading.RLock()
        # Set by stop(): no node starts, and none restarts, after it (one launcher per task execution).
        self._stopped = False

    def run(self, cmds: Sequence[str], env: Mapping[str, str]) -> LocalNodesRun:
        """Run every node to its end (restarting all of them on a failure, up to ``max_restarts``).

        :param cmds: the node container's command (``command`` + ``args``), normally ``torchrun ...``.
        :param env: the trainer's variables (the manifest's literal ones plus the contract's).
        :raises LocalTrainerTimeout: when the nodes ran past ``timeout_s`` (they were stopped).
        :raises gpu_trainer.contract.ContractError: when every node exited 0 but node 0 wrote no valid
            result.
        :raises ValueError: when the nodes ask for more GPUs than this machine shows.
        """
        cmd = local_command(cmds)
        gpus = gpu_slices(self.num_nodes, self.gpus_per_node, visible_gpus())
        if self.num_nodes > 1 and cmd[1:3] != ["-m", "torch.distributed.run"]:
            self.log.warning(
                "Local launcher: the node command %s does not start with torchrun: each of the %d nodes "
                "runs it on its own and only torchrun reads the %s settings",
                list(cmds),
                self.num_nodes,
                "/".join(contract.TORCHRUN_ENV_VARS),
            )
        os.makedirs(self.checkpoint_dir, exist_ok=True)
        deadline = None if self.timeout_s is None else time.monotonic() + self.timeout_s
        restarts = 0
        while True:
            outcome = self._attempt(cmd, env, deadline, restarts, gpus)
            if outcome.failed_node is None or self._stopped or restarts >= self.max_restarts:
                return outcome
            restarts += 1
            self.log.warning(
                "Local launcher: node %d exited with code %s; restarting all %d nodes (restart %d of %d) "
                "from the checkpoint in %s",
                outcome.failed_node,
                outcome.returncode,
                self.num_nodes,
                restarts,
                self.max_restarts,
                self.checkpoint_dir,
            )

    def _attempt(
        self,
        cmd: list[str],
        env: Mapping[str, str],
        deadline: float | None,
        restarts: int,
        gpus: list[str] | None,
    ) -> LocalNodesRun:
        result_dir = tempfile.mkdtemp(prefix="mltrain-result-")
        # One result path per node, as each pod has its own: only node 0's counts.
        result_paths = [
            os.path.join(result_dir, f"node-{rank}", "return.json") for rank in range(self.num_nodes)
        ]
        master_port = free_port()
        processes = []
        for rank, path in enumerate(result_paths):
            os.makedirs(os.path.dirname(path))
            node_env = node_environment(
                env,
                node_rank=rank,
                num_nodes=self.num_nodes,
                nproc_per_node=self.nproc_per_node,
                master_port=master_port,
                result_path=path,
            )
            if gpus is not None:
                node_env["CUDA_VISIBLE_DEVICES"] = gpus[rank]
            processes.append(
                LocalProcess(cmd, node_env, _NodeLog(self.log, rank), kill_grace_s=self.kill_grace_s)
            )
        try:
            with self._lock:
                self._processes = processes
                for process in processes:
                    if self._stopped:  # killed before or while the nodes start (a handler in this thread)
                        break
                    process.start()
            if self._stopped:
                self._stop_processes(processes)
                return LocalNodesRun(
                    command=cmd,
                    returncode=-signal.SIGTERM,
                    tail=[],
                    result=None,
                    returncodes=[process.proc.poll() if process.proc else None for process in processes],
                    restarts=restarts,
                )
            codes, failed = self._wait(processes, deadline)
            for process in processes:
                process.wait()  # every node has exited: this only collects the last output lines
            shown = processes[failed if failed is not None else 0]
            result = None
            if failed is None:
                for rank, path in enumerate(result_paths[1:], start=1):
                    if os.path.exists(path):
                        self.log.warning(
                            "Local launcher: node %d wrote a result too; only node 0's (global rank 0) counts",
                            rank,
                        )
                result = contract.load_result(result_paths[0])
            return LocalNodesRun(
                command=cmd,
                returncode=codes[failed if failed is not None else 0] or 0,
                tail=list(shown.tail),
                result=result,
                returncodes=codes,
                failed_node=failed,
                restarts=restarts,
            )
        finally:
            with self._lock:
                self._processes = []
            shutil.rmtree(result_dir, ignore_errors=True)

    def _wait(
        self, processes: list[LocalProcess], deadline: float | None
    ) -> tuple[list[int | None], int | None]:
        """Wait until every node exited 0, or one failed (then stop the others).

        :returns: every node's exit code, and the rank of the first node that failed (None if none).
        """
        try:
            while True:
                codes = [process.proc.poll() if process.proc is not None else None for process in processes]
                failed = next((rank for rank, code in enumerate(codes) if code not in (None, 0)), None)
                if failed is not None:
                    if any(code is None for code in codes):
                        self.log.warning(
                            "Local launcher: node %d exited with code %s: stopping the other nodes",
                            failed,
                            codes[failed],
                        )
                        self._stop_processes(processes)
                    return [process.proc.poll() if process.proc else None for process in processes], failed
                if all(code == 0 for code in codes):
                    return codes, None
                if deadline is not None and time.monotonic() > deadline:
                    self._stop_processes(processes)
                    raise LocalTrainerTimeout(
                        f"{len(processes)} nodes ran longer than {self.timeout_s:.0f}s (execution_timeout) "
                        "and were stopped"
                    )
                time.sleep(_POLL_S)
        except LocalTrainerTimeout:
            raise
        except BaseException:
            # Airflow's own execution_timeout arrives as an exception in this thread: never orphan a node.
            self._stop_processes(processes)
            raise

    def stop(self) -> None:
        """Stop every process of every node (SIGTERM, then SIGKILL); no restart follows."""
        with self._lock:
            self._stopped = True
            processes = list(self._processes)
        self._stop_processes(processes)

    def _stop_processes(self, processes: list[LocalProcess]) -> None:
        """Stop every node's process group and every process in it or below it
        (:func:`~airflow_provider_mltrain.launchers.local.stop_process_groups`)."""
        started = [process.proc for process in processes if process.proc is not None]
        live = [proc for proc in started if proc.poll() is None]
        if live:
            self.log.warning(
                "Local launcher: stopping %d node process groups %s", len(live), [proc.pid for proc in live]
            )
        stop_process_groups(started, self.kill_grace_s)
