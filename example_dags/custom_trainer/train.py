"""Your own PyTorch training script under the mltrain contract (README: "Your own training code").

Runs as ``python train.py --data DIR`` (DIR holds train.parquet and val.parquet with a ``label`` column) in
place of ``python -m gpu_trainer.train``: the same hyperparameters, resume and result, nothing else to learn.
"""

from __future__ import annotations

import argparse
import os
import tempfile

import mlflow
import mlflow.pytorch
import pandas as pd
import torch
import torch.nn.functional as F

from gpu_trainer import contract

parser = argparse.ArgumentParser()
parser.add_argument("--data", required=True, help="directory with train.parquet and val.parquet")
data = parser.parse_args().data
hp = {"lr": 1e-3, "hidden_dim": 128, "epochs": 5, "batch_size": 64, "seed": 0, **contract.hyperparameters()}
torch.manual_seed(hp["seed"])


def load(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    frame = pd.read_parquet(os.path.join(data, f"{split}.parquet"))
    return torch.tensor(frame.drop(columns="label").values).float(), torch.tensor(frame["label"].values)


(x, y), (vx, vy) = load("train"), load("val")
classes = int(y.max()) + 1
model = torch.nn.Sequential(
    torch.nn.BatchNorm1d(
        x.shape[1]
    ),  # scales raw features inside the model, so the logged model needs no preprocessing
    torch.nn.Linear(x.shape[1], hp["hidden_dim"]),
    torch.nn.ReLU(),
    torch.nn.Linear(hp["hidden_dim"], classes),
)
optimizer = torch.optim.Adam(model.parameters(), lr=hp["lr"])

# Resume: every try of the task gets the same checkpoint directory, so a retry continues the same run.
ckpt_dir = contract.checkpoint_dir() or tempfile.mkdtemp()  # none given: nothing to resume
os.makedirs(ckpt_dir, exist_ok=True)
ckpt = os.path.join(ckpt_dir, "last.pt")
start, run_id, resumed_from = 0, None, None
if os.path.exists(ckpt):
    state = torch.load(ckpt)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    start, run_id, resumed_from = state["epoch"], state["run_id"], state["epoch"]

# MLFLOW_TRACKING_URI and MLFLOW_EXPERIMENT_NAME come from the operator; MLflow reads them itself.
with mlflow.start_run(run_id=run_id, run_name=contract.run_name()) as run:
    mlflow.set_tags(contract.lineage_tags(contract.lineage()))
    if run_id is None:
        mlflow.log_params(hp)
    for epoch in range(start, hp["epochs"]):
        model.train()
        losses = []
        for batch in torch.randperm(len(x)).split(hp["batch_size"]):
            loss = F.cross_entropy(model(x[batch]), y[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        model.eval()
        with torch.no_grad():
            logits = model(vx)
        pred = logits.argmax(1)
        hits = torch.bincount(vy[pred == vy], minlength=classes)
        counted = torch.bincount(pred, minlength=classes) + torch.bincount(vy, minlength=classes)
        metrics = {
            "train_loss": sum(losses) / len(losses),
            "val_loss": F.cross_entropy(logits, vy).item(),
            "val_accuracy": (pred == vy).float().mean().item(),
            "val_f1": (2 * hits / counted.clamp(min=1)).mean().item(),  # macro F1
        }
        mlflow.log_metrics(metrics, step=epoch + 1)
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict()}
        torch.save({**state, "epoch": epoch + 1, "run_id": run.info.run_id}, ckpt + ".tmp")
        os.replace(ckpt + ".tmp", ckpt)  # a kill mid-save never leaves half a checkpoint

    if contract.is_main_process():
        model.eval()  # the logged model predicts (a retry after the last epoch skipped the loop above)
        model_info = mlflow.pytorch.log_model(
            model,
            name="model",
            input_example=vx[:5].numpy(),  # MLflow exports the model by tracing it on this input
            pip_requirements=mlflow.pytorch.get_default_pip_requirements(),
        )
        contract.report_result(
            run_id=run.info.run_id,
            experiment_id=run.info.experiment_id,
            model_uri=model_info.model_uri,
            metrics=mlflow.get_run(run.info.run_id).data.metrics,
            params=hp,
            resumed_from_epoch=resumed_from,
            require_metrics=contract.CLASSIFICATION_METRICS,
        )
