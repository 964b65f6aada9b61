"""``python -m gpu_trainer.evaluate``: score a logged model on a holdout and write the contract result.

``--model-uri`` is anything MLflow resolves (``runs:/<run_id>/model``, ``models:/<name>/<version>``,
``models:/<name>@champion``, ``models:/m-...``). The metrics are ``val_accuracy``, ``val_loss`` and
``val_f1`` on the holdout, written with ``contract.make_result`` like the trainer's.

With ``--allow-missing-model`` a URI that names nothing yet (no such registered model, alias or run) is
not an error: the result has empty metrics and ``params.model_found`` false. A quality gate scoring
``models:/<name>@champion`` before the first champion exists reads that as "no champion yet".
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import sys
from collections.abc import Sequence

import torch

from gpu_trainer import contract, runtime
from gpu_trainer.data import load_holdout
from gpu_trainer.errors import CliParser, TrainerError, one_line, run_cli
from gpu_trainer.metrics import score_split

log = logging.getLogger("gpu_trainer")


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser."""
    parser = CliParser(
        prog="python -m gpu_trainer.evaluate", description="Score a logged model on a holdout."
    )
    parser.add_argument("--model-uri", required=True, help="runs:/<run_id>/model or models:/... URI")
    parser.add_argument(
        "--data", required=True, help="holdout Parquet file or directory (local or fsspec URI)"
    )
    parser.add_argument("--output", default=None, help=f"result path; default: ${contract.ENV_RESULT_PATH}")
    parser.add_argument("--label-column", default="label", help="label column; default: label")
    parser.add_argument("--feature-columns", default="", help="comma-separated feature columns; default: all")
    parser.add_argument("--batch-size", type=int, default=1024, help="evaluation batch size; default: 1024")
    parser.add_argument(
        "--device", choices=("auto", "cpu", "cuda"), default="auto", help="device; default: auto"
    )
    parser.add_argument(
        "--allow-missing-model",
        action="store_true",
        help="a model URI that names nothing yet writes empty metrics (params.model_found false) instead "
        "of failing",
    )
    return parser


#: ``models:/<name>@<alias>``: the one URI form whose missing alias MLflow reports as a bad parameter.
_ALIAS_URI = re.compile(r"models:/(?P<name>[^/@]+)@(?P<alias>[^/@]+)")


def _names_nothing(model_uri: str, err: Exception) -> bool:
    """Whether loading failed because the URI names no model (as opposed to a broken or unreachable one).

    :param model_uri: the URI that failed to load.
    :param err: the error MLflow raised.
    """
    code = getattr(err, "error_code", None)
    if code == "RESOURCE_DOES_NOT_EXIST":
        return True
    match = _ALIAS_URI.fullmatch(model_uri)
    if match is None or code != "INVALID_PARAMETER_VALUE":
        return False
    from mlflow import MlflowClient

    try:
        aliases = MlflowClient().get_registered_model(match["name"]).aliases
    except Exception:  # unreachable or refused: not evidence that the alias is free
        return False
    return match["alias"] not in aliases


def evaluate_model(
    model_uri: str,
    data: str,
    *,
    output: str,
    label_column: str = "label",
    feature_columns: Sequence[str] = (),
    batch_size: int = 1024,
    device: str = "auto",
    allow_missing_model: bool = False,
) -> dict:
    """Load ``model_uri`` from MLflow, score it on ``data`` and write the result to ``output``.

    :param model_uri: the logged model.
    :param data: the holdout.
    :param output: result JSON path.
    :param label_column: the label column.
    :param feature_columns: feature columns; empty means every other numeric column.
    :param batch_size: evaluation batch size.
    :param device: ``auto``, ``cpu`` or ``cuda``.
    :param allow_missing_model: a URI that names no model writes empty metrics instead of failing.
    :raises TrainerError: when the model cannot be loaded or the data is bad.
    """
    import mlflow.pytorch
    from mlflow.models import get_model_info

    split, columns = load_holdout(data, label_column=label_column, feature_columns=feature_columns)
    target = runtime.pick_device(device, runtime.DistInfo())
    try:
        info = get_model_info(model_uri)
        model = mlflow.pytorch.load_model(model_uri)
    except Exception as err:  # MLflow raises many types for "not found" / "not a pytorch model"
        if allow_missing_model and _names_nothing(model_uri, err):
            log.info("%s names no model yet (%s): writing empty metrics", model_uri, one_line(err))
            result = contract.make_result(
                run_id=None,
                model_uri=model_uri,
                metrics={},
                params={"data": data, "rows": len(split), "model_found": False},
                resumed_from_epoch=None,
            )
            contract.write_result(output, result)
            return result
        raise TrainerError(
            f"--model-uri {model_uri!r} cannot be loaded: {type(err).__name__}: {err}"
        ) from err
    model.to(target)
    # A torch.export (pt2) program refuses eval(): it is frozen in the eval mode it was exported in.
    with contextlib.suppress(NotImplementedError):
        model.eval()
    with torch.no_grad():
        width = int(model(split.features[:1].to(target)).shape[1])
    num_classes = max(width, int(split.labels.max().item()) + 1)
    scores = score_split(model, split, num_classes=num_classes, device=target, batch_size=batch_size)
    result = contract.make_result(
        run_id=info.run_id,
        model_uri=model_uri,
        metrics=scores.as_metrics("val_"),
        params={
            "data": data,
            "rows": len(split),
            "features": len(columns),
            "label_column": label_column,
            "model_found": True,
        },
        resumed_from_epoch=None,
    )
    contract.write_result(output, result)
    log.info(
        "%s on %s (%d rows): val_accuracy %.4f val_loss %.4f val_f1 %.4f",
        model_uri,
        data,
        len(split),
        scores.accuracy,
        scores.loss,
        scores.f1,
    )
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (2 with one error line for bad input).

    :param argv: arguments without the program name.
    """
    runtime.setup_logging(runtime.DistInfo())

    def command() -> None:
        args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
        evaluate_model(
            args.model_uri,
            args.data,
            output=args.output or contract.result_path(os.environ),
            label_column=args.label_column,
            feature_columns=[part.strip() for part in args.feature_columns.split(",") if part.strip()],
            batch_size=args.batch_size,
            device=args.device,
            allow_missing_model=args.allow_missing_model,
        )

    return run_cli(command)


if __name__ == "__main__":
    runtime.exit_now(main())
