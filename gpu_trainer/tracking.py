"""MLflow tracking for rank 0: the run (new or resumed), metrics, lineage tags, figures and the model.

A tracking outage must not stop training: HTTP calls to the server are bounded (see
:func:`bound_tracking_requests`), metrics that cannot be delivered are buffered (and kept in checkpoints)
and delivered once the server answers again.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator, Mapping, MutableMapping, Sequence
from typing import Any

import numpy as np
import torch

from gpu_trainer import contract
from gpu_trainer.errors import TrainerError, one_line

log = logging.getLogger("gpu_trainer")

#: MLflow's own HTTP settings, as defaults for the trainer process. MLflow's defaults (120 s timeout,
#: 7 retries with exponential backoff) leave the GPUs idle for minutes per call while the server is down;
#: these bound one tracking call to about half a minute against a hung server and seconds against a
#: refused connection. Set the variables in the pod to override them.
TRACKING_HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
}
#: Seconds before the first retry while the tracking server is unreachable (default, and the variable that
#: overrides it; trainer-only tuning, so it lives here rather than in the operator contract). The wait
#: doubles after each failed attempt up to the maximum: against a hung server each attempt can block
#: training for the whole bounded call, so a long outage must cost a small share of the time.
DEFAULT_TRACKING_RETRY_SECONDS = 30.0
MAX_TRACKING_RETRY_SECONDS = 600.0
ENV_TRACKING_RETRY_SECONDS = "MLTRAIN_TRACKING_RETRY_SECONDS"
#: MLflow's log_batch accepts at most 1000 metrics per request.
_BATCH_METRICS = 1000


def bound_tracking_requests(environ: MutableMapping[str, str]) -> None:
    """Bound MLflow's HTTP timeouts and retries in ``environ`` unless already set there.

    Call it with ``os.environ`` in the trainer process only (its entry point), never in a process that
    hosts other work.

    :param environ: the trainer process's environment.
    """
    for name, value in TRACKING_HTTP_DEFAULTS.items():
        environ.setdefault(name, value)


def tracking_retry_seconds(environ: Mapping[str, str]) -> float:
    """Seconds between delivery attempts during an outage, from ``MLTRAIN_TRACKING_RETRY_SECONDS``.

    :param environ: the environment to read.
    :raises TrainerError: when the value is not a number >= 0.
    """
    raw = environ.get(ENV_TRACKING_RETRY_SECONDS)
    if not raw:
        return DEFAULT_TRACKING_RETRY_SECONDS
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    if not seconds >= 0:
        raise TrainerError(f"{ENV_TRACKING_RETRY_SECONDS}={raw!r}: expected seconds >= 0")
    return seconds


class TrackingUnavailable(TrainerError):
    """The tracking server stayed unreachable until the end of training."""


class Tracker:
    """A thin wrapper over ``mlflow`` fluent calls for one run.

    :param experiment: the experiment name (created if missing).
    :param run_name: the run's display name (new runs only).
    :param resume_run_id: continue this run (from a checkpoint) instead of starting one.
    :param lineage: the parsed ``MLTRAIN_LINEAGE``; recorded as ``airflow.*`` tags.
    :param pending_metrics: metric rows a previous try could not deliver (from its checkpoint); sent first.
    :param retry_seconds: while the server is unreachable, wait this long before the next delivery attempt
        (doubling per failed attempt, up to ``MAX_TRACKING_RETRY_SECONDS``).
    """

    def __init__(
        self,
        *,
        experiment: str,
        run_name: str | None,
        resume_run_id: str | None,
        lineage: Mapping[str, Any],
        pending_metrics: Sequence[Mapping[str, Any]] = (),
        retry_seconds: float = DEFAULT_TRACKING_RETRY_SECONDS,
    ) -> None:
        import mlflow

        self._mlflow = mlflow
        self._pending: list[dict[str, Any]] = [dict(row) for row in pending_metrics]
        self._retry_seconds = retry_seconds
        self._backoff = retry_seconds
        self._next_attempt = 0.0
        self._unreachable_since: float | None = None
        from mlflow.exceptions import MlflowException

        tags = contract.lineage_tags(lineage)
        tags["mltrain.trainer"] = "gpu_trainer"
        try:
            # The tags go with the run's creation (or, resuming, MLflow's one batch call for them) instead
            # of a set_tags call of their own: one tracking round trip less per trainer process
            # (tests/benchmarks/bench_trainer_phases.py, "MLflow run start").
            run = self._start(experiment, run_name, resume_run_id, tags)
        except MlflowException as err:
            # Nothing trained yet, so nothing is lost: fail in one line (bounded by the HTTP limits above)
            # rather than train a run whose metrics have nowhere to go.
            raise TrainerError(
                f"cannot start the MLflow run at {mlflow.get_tracking_uri()}: {one_line(err)[:500]}"
            ) from err
        self.run_id: str = run.info.run_id
        self.experiment_id: str = run.info.experiment_id
        self.resumed = run.info.run_id == resume_run_id
        # The run as it started (its params among them): a resumed run's params are read from it rather
        # than fetched again.
        self._started_params: dict[str, str] = dict(run.data.params) if self.resumed else {}

    def _start(
        self, experiment: str, run_name: str | None, resume_run_id: str | None, tags: Mapping[str, str]
    ) -> Any:
        self._mlflow.set_experiment(experiment)
        if resume_run_id:
            try:
                run = self._mlflow.start_run(run_id=resume_run_id, tags=dict(tags))
                log.info("continuing MLflow run %s", resume_run_id)
                return run
            except Exception as err:  # deleted run or a different tracking server: keep training, say so
                log.warning("cannot continue MLflow run %s (%s); starting a new run", resume_run_id, err)
        return self._mlflow.start_run(run_name=run_name, tags=dict(tags))

    def log_params(self, params: Mapping[str, Any], tags: Mapping[str, str] | None = None) -> None:
        """Log params once; a resumed run keeps those it has (MLflow params are immutable) and adds new ones.

        :param params: name -> value (None is logged as an empty string).
        :param tags: more tags to set in the same call.
        """
        from mlflow.entities import Param, RunTag

        existing = self._started_params
        fresh = {
            key: ("" if value is None else value) for key, value in params.items() if key not in existing
        }
        changed = {
            key: value for key, value in params.items() if key in existing and str(value) != existing[key]
        }
        # e.g. epochs grown on resume: params cannot be overwritten, so record the new value as a tag.
        all_tags = {f"mltrain.resumed.{key}": str(value) for key, value in changed.items()}
        all_tags.update(tags or {})
        if fresh or all_tags:
            # One log_batch for params and tags, not a call for each kind (bench_trainer_phases.py).
            self._client().log_batch(
                self.run_id,
                params=[Param(key, str(value)) for key, value in fresh.items()],
                tags=[RunTag(key, str(value)) for key, value in all_tags.items()],
                synchronous=True,
            )

    def _client(self) -> Any:
        from mlflow.tracking import MlflowClient

        return MlflowClient()

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Queue one row of metrics and deliver what is queued; never raises for an unreachable server.

        :param metrics: name -> value.
        :param step: the step (epoch) they belong to.
        """
        self._pending.append(
            {"step": int(step), "timestamp": int(time.time() * 1000), "metrics": dict(metrics)}
        )
        self.flush()

    def pending_metrics(self) -> list[dict[str, Any]]:
        """Metric rows not delivered yet, as plain values (they go into checkpoints)."""
        return [dict(row, metrics=dict(row["metrics"])) for row in self._pending]

    def flush(self, *, force: bool = False) -> bool:
        """Deliver the queued metric rows; True when nothing is left undelivered.

        While the server is unreachable an attempt is made at most every ``retry_seconds`` (unless
        ``force``), so training pays for one bounded call per interval, not one per epoch.

        :param force: try now, even within the retry interval.
        """
        if not self._pending:
            return True
        now = time.monotonic()
        if not force and now < self._next_attempt:
            return False
        try:
            self._send(self._pending)
        except Exception as err:
            self._next_attempt = now + self._backoff
            if self._unreachable_since is None:
                self._unreachable_since = now
            log.warning(
                "MLflow tracking unreachable (%s); training continues, %d metric row(s) buffered "
                "(kept in checkpoints), next attempt in %.0f s",
                one_line(err)[:300],
                len(self._pending),
                self._backoff,
            )
            self._backoff = min(self._backoff * 2, max(MAX_TRACKING_RETRY_SECONDS, self._retry_seconds))
            return False
        if self._unreachable_since is not None:
            log.warning(
                "MLflow tracking reachable again after %.0f s: delivered %d buffered metric row(s)",
                now - self._unreachable_since,
                len(self._pending),
            )
        self._unreachable_since = None
        self._backoff = self._retry_seconds
        self._pending.clear()
        return True

    def require_delivered(self, *, kept_in: str | None, final_metrics: Mapping[str, float]) -> None:
        """At the end of training: deliver everything queued, or fail saying where the work is kept.

        :param kept_in: the checkpoint directory holding the trained state and the undelivered rows.
        :param final_metrics: the final metrics, repeated in the error so they are never only in a file.
        :raises TrackingUnavailable: when the server is still unreachable.
        """
        if self.flush(force=True):
            return
        where = (
            f"the trained model, final metrics and undelivered rows are in the checkpoint under {kept_in}: "
            "a retry of this task resumes from it (no retraining) and delivers them"
            if kept_in
            else "no checkpoint directory is set, so a retry trains again"
        )
        shown = ", ".join(f"{name}={value:.4g}" for name, value in sorted(final_metrics.items()))
        raise TrackingUnavailable(
            f"training finished but MLflow tracking at {self._mlflow.get_tracking_uri()} is still "
            f"unreachable ({len(self._pending)} metric row(s) not delivered; final metrics: {shown}); "
            f"{where}"
        )

    def _send(self, rows: Sequence[Mapping[str, Any]]) -> None:
        from mlflow.entities import Metric

        metrics = [
            Metric(key=name, value=float(value), timestamp=int(row["timestamp"]), step=int(row["step"]))
            for row in rows
            for name, value in row["metrics"].items()
        ]
        client = self._client()
        for start in range(0, len(metrics), _BATCH_METRICS):
            client.log_batch(self.run_id, metrics=metrics[start : start + _BATCH_METRICS], synchronous=True)

    def set_tag(self, key: str, value: str) -> None:
        self._mlflow.set_tag(key, value)

    def log_figures(self, history: Sequence[Mapping[str, float]], confusion: np.ndarray) -> None:
        """Log the loss curves and the validation confusion matrix as PNG figures."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        epochs = [int(row["epoch"]) for row in history]
        ax.plot(epochs, [row["train_loss"] for row in history], marker="o", label="train_loss")
        ax.plot(epochs, [row["val_loss"] for row in history], marker="o", label="val_loss")
        ax.set_xlabel("epoch")
        ax.set_ylabel("loss")
        ax.set_title("Loss curves")
        ax.legend()
        fig.tight_layout()
        self._mlflow.log_figure(fig, "figures/loss_curves.png")
        plt.close(fig)

        fig, ax = plt.subplots(figsize=(5, 5))
        image = ax.imshow(confusion, cmap="Blues")
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title("Validation confusion matrix")
        size = confusion.shape[0]
        if size <= 20:
            for i in range(size):
                for j in range(size):
                    ax.text(j, i, str(int(confusion[i, j])), ha="center", va="center", fontsize=7)
        fig.colorbar(image, ax=ax)
        fig.tight_layout()
        self._mlflow.log_figure(fig, "figures/confusion_matrix.png")
        plt.close(fig)

    def log_model(self, model: torch.nn.Module, example: torch.Tensor) -> str:
        """Log the model with a signature and an input example; returns a registrable model URI.

        The URI is ``runs:/<run_id>/model``: MLflow 3 resolves it to the logged model when registering
        (``mlflow.register_model``), and it keeps the run visible in the registry's lineage.
        """
        import mlflow.pytorch
        from mlflow.models import infer_signature

        model = model.to("cpu").float().eval()
        inputs = example.to("cpu", torch.float32).numpy()
        with torch.no_grad():
            outputs = model(example.to("cpu", torch.float32)).numpy()
        # The model is exported (torch.export) on the CPU, so it loads on any machine. MLflow validates the
        # input example by loading it on its default device, CUDA when present, where a CPU export cannot
        # go: point that check at the CPU for the duration of the call.
        requirements = model_pip_requirements()
        with _environ(MLFLOW_DEFAULT_PREDICTION_DEVICE="cpu"), _known_packages(requirements):
            mlflow.pytorch.log_model(
                model,
                name="model",
                signature=infer_signature(inputs, outputs),
                input_example=inputs,
                pip_requirements=requirements,
            )
        return f"runs:/{self.run_id}/model"

    def end(self, status: str = "FINISHED") -> None:
        self._mlflow.end_run(status=status)

    def end_quietly(self, status: str) -> None:
        """End the run on a failure path: an unreachable server must not hide the error being raised."""
        try:
            self._mlflow.end_run(status=status)
        except Exception as err:
            log.warning("could not mark MLflow run %s %s (%s)", self.run_id, status, one_line(err)[:300])


def model_pip_requirements() -> list[str]:
    """The logged model's pip requirements: torch and cloudpickle pinned to the installed releases.

    Spelled out instead of ``mlflow.pytorch.get_default_pip_requirements()``, which warns on every model
    about torch's local version label (``+cpu``, ``+cu128``) before dropping it. Explicit requirements
    also skip MLflow's slow import-tracing inference of the environment.
    """
    from importlib.metadata import version

    return [f"{package}=={version(package).split('+', 1)[0]}" for package in ("torch", "cloudpickle")]


@contextlib.contextmanager
def _known_packages(requirements: Sequence[str]) -> Iterator[None]:
    """Spare ``log_model`` MLflow's scan of every installed distribution's files.

    Even with explicit requirements, MLflow checks each against the environment (twice: when it writes
    them and when it loads the model back to validate the input example), and to do so builds a map of
    every importable module to its distribution (``importlib_metadata.packages_distributions()``): about
    a second on a small environment, the largest part of model logging after the export
    (tests/benchmarks/bench_trainer_phases.py, "model logging"). That map only serves to find a
    module's ``__version__`` when a distribution has no metadata; our requirements name distributions
    that have it, so the map is seeded with them for the call (the check itself still runs, by
    ``importlib.metadata.version``), then reset so a later caller in the process scans as before.

    :param requirements: the model's pip requirements (``name==version``).
    """
    try:
        from mlflow.utils import requirements_utils
    except ImportError:  # pragma: no cover - MLflow without the module: nothing to seed
        yield
        return
    if getattr(requirements_utils, "_MODULES_TO_PACKAGES", ()) is not None:
        yield  # already built in this process (or another MLflow layout): leave it alone
        return
    names = ["mlflow", *(req.split("==", 1)[0] for req in requirements)]
    seeded: Any = {name: [name] for name in names}
    requirements_utils._MODULES_TO_PACKAGES = seeded
    try:
        yield
    finally:
        requirements_utils._MODULES_TO_PACKAGES = None


@contextlib.contextmanager
def _environ(**values: str) -> Iterator[None]:
    """Set environment variables for a block, then restore them exactly."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, old in saved.items():
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old
