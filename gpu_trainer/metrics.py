"""Classification metrics computed with torch alone (loss, accuracy, macro F1, confusion matrix)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from gpu_trainer.data import Split


@dataclasses.dataclass
class Evaluation:
    """Metrics of one pass over a split."""

    loss: float
    accuracy: float
    f1: float
    confusion: np.ndarray

    def as_metrics(self, prefix: str = "val_") -> dict[str, float]:
        return {f"{prefix}loss": self.loss, f"{prefix}accuracy": self.accuracy, f"{prefix}f1": self.f1}


def confusion_matrix(labels: torch.Tensor, preds: torch.Tensor, num_classes: int) -> np.ndarray:
    """Rows are true classes, columns predicted ones."""
    flat = labels.to(torch.int64) * num_classes + preds.to(torch.int64)
    counts = torch.bincount(flat.cpu(), minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes).numpy()


def macro_f1(confusion: np.ndarray) -> float:
    """Macro F1 over the classes that occur in the labels or the predictions (as scikit-learn does)."""
    tp = np.diag(confusion).astype(np.float64)
    fp = confusion.sum(axis=0) - tp
    fn = confusion.sum(axis=1) - tp
    present = (confusion.sum(axis=0) + confusion.sum(axis=1)) > 0
    denominator = 2 * tp + fp + fn
    f1 = np.divide(2 * tp, denominator, out=np.zeros_like(tp), where=denominator > 0)
    return float(f1[present].mean()) if present.any() else 0.0


@torch.no_grad()
def score_split(
    model: Callable[[torch.Tensor], torch.Tensor],
    split: Split,
    *,
    num_classes: int,
    device: torch.device,
    batch_size: int = 1024,
    autocast_dtype: torch.dtype | None = None,
) -> Evaluation:
    """Score ``model`` on a split.

    :param model: the model, already in eval mode and on ``device``.
    :param split: features and labels.
    :param num_classes: classes (for the confusion matrix).
    :param device: where to compute.
    :param batch_size: evaluation batch size.
    :param autocast_dtype: bf16/fp16 autocast, or None.
    """
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    preds = []
    for start in range(0, len(split), batch_size):
        x = split.features[start : start + batch_size].to(device, non_blocking=True)
        y = split.labels[start : start + batch_size].to(device, non_blocking=True)
        with torch.autocast(
            device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None
        ):
            logits = model(x)
        logits = logits.float()
        if logits.shape[1] < num_classes:
            # A model trained on fewer classes than the holdout has: pad so unseen labels count as errors.
            logits = F.pad(logits, (0, num_classes - logits.shape[1]), value=-1e9)
        loss_sum += F.cross_entropy(logits, y, reduction="sum").double()
        preds.append(logits.argmax(dim=1))
    predicted = torch.cat(preds).cpu()
    labels = split.labels.cpu()
    width = max(num_classes, int(predicted.max().item()) + 1)
    confusion = confusion_matrix(labels, predicted, width)
    return Evaluation(
        loss=float(loss_sum.item() / len(split)),
        accuracy=float((predicted == labels).double().mean().item()),
        f1=macro_f1(confusion),
        confusion=confusion,
    )
