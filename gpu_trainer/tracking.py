"""MLflow tracking for rank 0: the run (new or resumed), metrics, lineage tags, figures and the model."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from gpu_trainer import contract

log = logging.getLogger("gpu_trainer")


class Tracker:
    """A thin wrapper over ``mlflow`` fluent calls for one run.

    :param experiment: the experiment name (created if missing).
    :param run_name: the run's display name (new runs only).
    :param resume_run_id: continue this run (from a checkpoint) instead of starting one.
    :param lineage: the parsed ``MLTRAIN_LINEAGE``; recorded as ``airflow.*`` tags.
    """

    def __init__(
        self,
        *,
        experiment: str,
        run_name: str | None,
        resume_run_id: str | None,
        lineage: Mapping[str, Any],
    ) -> None:
        import mlflow

        self._mlflow = mlflow
        mlflow.set_experiment(experiment)
        run = None
        if resume_run_id:
            try:
                run = mlflow.start_run(run_id=resume_run_id)
                log.info("continuing MLflow run %s", resume_run_id)
            except Exception as err:  # deleted run or a different tracking server: keep training, say so
                log.warning("cannot continue MLflow run %s (%s); starting a new run", resume_run_id, err)
        if run is None:
            run = mlflow.start_run(run_name=run_name)
        self.run_id: str = run.info.run_id
        self.resumed = run.info.run_id == resume_run_id
        tags = contract.lineage_tags(lineage)
        tags["mltrain.trainer"] = "gpu_trainer"
        mlflow.set_tags(tags)

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log params once; a resumed run keeps those it has (MLflow params are immutable) and adds new ones."""
        existing = self._mlflow.get_run(self.run_id).data.params if self.resumed else {}
        fresh = {
            key: ("" if value is None else value) for key, value in params.items() if key not in existing
        }
        changed = {
            key: value for key, value in params.items() if key in existing and str(value) != existing[key]
        }
        if fresh:
            self._mlflow.log_params(fresh)
        if changed:
            # e.g. epochs grown on resume: params cannot be overwritten, so record the new value as a tag.
            self._mlflow.set_tags({f"mltrain.resumed.{key}": str(value) for key, value in changed.items()})

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        self._mlflow.log_metrics(dict(metrics), step=step)

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
        with _environ(MLFLOW_DEFAULT_PREDICTION_DEVICE="cpu"):
            mlflow.pytorch.log_model(
                model,
                name="model",
                signature=infer_signature(inputs, outputs),
                input_example=inputs,
                # Explicit requirements skip MLflow's slow import-tracing inference of the environment.
                pip_requirements=mlflow.pytorch.get_default_pip_requirements(),
            )
        return f"runs:/{self.run_id}/model"

    def end(self, status: str = "FINISHED") -> None:
        self._mlflow.end_run(status=status)


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
