"""The trainer's typed configuration and how it is resolved.

Every option comes, in order of precedence, from its command-line flag, from the contract's environment
(``MLTRAIN_HYPERPARAMETERS`` keyed by the flag name with underscores), then from its default. Locations and
run naming (``output``, ``checkpoint_dir``, ``experiment``, ``run_name``) are not hyperparameters: they come
from their flag or their dedicated variable (``MLTRAIN_RESULT_PATH`` ...), and a hyperparameter of that name
is an error, so it can never move the result away from where the operator reads it. Unknown flags and
unknown hyperparameter keys are errors: a typo must not silently train with a default.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from gpu_trainer import contract
from gpu_trainer.errors import CliParser, TrainerError

MODELS = ("mlp", "cnn")
OPTIMIZERS = ("adam", "adamw", "sgd")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything one training run needs.

    :param data: Parquet file or directory, local or an fsspec URI (``s3://...``).
    :param label_column: the column holding integer class ids.
    :param feature_columns: feature columns; empty means every other numeric column.
    :param val_fraction: share of rows held out for validation when the data has no separate split.
    :param model: ``mlp`` (tabular) or ``cnn`` (image-shaped features).
    :param hidden_dim: width of the MLP's hidden layers / the CNN's head.
    :param epochs: total epochs (may grow between a run and its resume).
    :param batch_size: per-process batch size.
    :param lr: learning rate.
    :param optimizer: ``adam``, ``adamw`` or ``sgd``.
    :param weight_decay: weight decay.
    :param seed: random seed (each rank derives its own from it).
    :param precision: ``auto`` (bf16 on CUDA, fp32 on CPU), ``fp32``, ``bf16`` or ``fp16`` (CUDA only).
    :param compile: wrap the model in ``torch.compile``.
    :param num_workers: DataLoader worker processes; 0 iterates the in-memory tensors directly.
    :param checkpoint_dir: where checkpoints go; None disables checkpointing and resume.
    :param checkpoint_every_steps: also checkpoint every N optimizer steps (0: only at epoch ends).
    :param keep_checkpoints: how many checkpoints to keep.
    :param log_every_steps: a progress line every N steps (0: only per epoch).
    :param experiment: MLflow experiment name.
    :param run_name: MLflow run name.
    :param output: where the result JSON goes.
    :param device: ``auto``, ``cpu`` or ``cuda``.
    """

    data: str
    label_column: str = "label"
    feature_columns: tuple[str, ...] = ()
    val_fraction: float = 0.2
    model: str = "mlp"
    hidden_dim: int = 256
    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3
    optimizer: str = "adamw"
    weight_decay: float = 0.0
    seed: int = 0
    precision: str = "auto"
    compile: bool = False
    num_workers: int = 0
    checkpoint_dir: str | None = None
    checkpoint_every_steps: int = 0
    keep_checkpoints: int = 3
    log_every_steps: int = 0
    experiment: str = "mltrain"
    run_name: str | None = None
    output: str = contract.DEFAULT_RESULT_PATH
    device: str = "auto"

    def params(self) -> dict[str, Any]:
        """The configuration as flat, JSON-serializable MLflow params / result params."""
        values = dataclasses.asdict(self)
        values["feature_columns"] = ",".join(self.feature_columns)
        return values


#: Fields whose change alters the math of a run: a checkpoint written under different values is refused.
#: Epochs may grow (train longer), and paths, logging, workers and compile do not change the numbers.
MATH_FIELDS = (
    "label_column",
    "feature_columns",
    "val_fraction",
    "model",
    "hidden_dim",
    "batch_size",
    "lr",
    "optimizer",
    "weight_decay",
    "seed",
    "precision",
)


def _choice(name: str, allowed: Sequence[str]) -> Callable[[Any], str]:
    def convert(value: Any) -> str:
        text = str(value).lower()
        if text not in allowed:
            raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")
        return text

    return convert


def _positive_int(name: str, *, minimum: int = 1) -> Callable[[Any], int]:
    def convert(value: Any) -> int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
        try:
            number = int(value)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}") from err
        if number < minimum:
            raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
        return number

    return convert


def _float(
    name: str, *, low: float, high: float | None = None, low_open: bool = False
) -> Callable[[Any], float]:
    def convert(value: Any) -> float:
        try:
            number = float(value)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{name} must be a number, got {value!r}") from err
        too_low = number <= low if low_open else number < low
        if too_low or (high is not None and number >= high) or number != number:
            bound = f"{'>' if low_open else '>='} {low}" + (f" and < {high}" if high is not None else "")
            raise ValueError(f"{name} must be a number {bound}, got {value!r}")
        return number

    return convert


def _bool(name: str) -> Callable[[Any], bool]:
    def convert(value: Any) -> bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{name} must be a boolean, got {value!r}")

    return convert


def _columns(value: Any) -> tuple[str, ...]:
    if isinstance(value, (list, tuple)):
        return tuple(str(item) for item in value)
    return tuple(part.strip() for part in str(value).split(",") if part.strip())


def _optional_str(value: Any) -> str | None:
    return None if value is None or value == "" else str(value)


#: field -> converter; the single place that validates a value whatever its source.
CONVERTERS: dict[str, Callable[[Any], Any]] = {
    "data": str,
    "label_column": str,
    "feature_columns": _columns,
    "val_fraction": _float("val_fraction", low=0.0, high=1.0, low_open=True),
    "model": _choice("model", MODELS),
    "hidden_dim": _positive_int("hidden_dim"),
    "epochs": _positive_int("epochs"),
    "batch_size": _positive_int("batch_size"),
    "lr": _float("lr", low=0.0, low_open=True),
    "optimizer": _choice("optimizer", OPTIMIZERS),
    "weight_decay": _float("weight_decay", low=0.0),
    "seed": _positive_int("seed", minimum=0),
    "precision": _choice("precision", PRECISIONS),
    "compile": _bool("compile"),
    "num_workers": _positive_int("num_workers", minimum=0),
    "checkpoint_dir": _optional_str,
    "checkpoint_every_steps": _positive_int("checkpoint_every_steps", minimum=0),
    "keep_checkpoints": _positive_int("keep_checkpoints"),
    "log_every_steps": _positive_int("log_every_steps", minimum=0),
    "experiment": str,
    "run_name": _optional_str,
    "output": str,
    "device": _choice("device", ("auto", "cpu", "cuda")),
}

HELP = {
    "data": "Parquet file or directory (local path or fsspec URI such as s3://bucket/prefix)",
    "label_column": "label column (integer class ids); default: label",
    "feature_columns": "comma-separated feature columns; default: every other numeric column",
    "val_fraction": "validation share when the data has no separate val split; default: 0.2",
    "model": "mlp (tabular) or cnn (image-shaped features); default: mlp",
    "hidden_dim": "hidden width; default: 256",
    "epochs": "total epochs; default: 10",
    "batch_size": "per-process batch size; default: 64",
    "lr": "learning rate; default: 1e-3",
    "optimizer": "adam, adamw or sgd; default: adamw",
    "weight_decay": "weight decay; default: 0",
    "seed": "random seed; default: 0",
    "precision": "auto, fp32, bf16 or fp16 (CUDA only); default: auto (bf16 on CUDA, fp32 on CPU)",
    "compile": "compile the model with torch.compile",
    "num_workers": "DataLoader worker processes; default: 0 (iterate in-memory tensors)",
    "checkpoint_dir": f"checkpoint directory (resumes from it); default: ${contract.ENV_CHECKPOINT_DIR}",
    "checkpoint_every_steps": "also checkpoint every N steps; default: 0 (epoch ends only)",
    "keep_checkpoints": "checkpoints to keep; default: 3",
    "log_every_steps": "progress line every N steps; default: 0 (per epoch)",
    "experiment": f"MLflow experiment; default: ${contract.ENV_EXPERIMENT_NAME} or mltrain",
    "run_name": f"MLflow run name; default: ${contract.ENV_RUN_NAME}",
    "output": f"result JSON path; default: ${contract.ENV_RESULT_PATH} or {contract.DEFAULT_RESULT_PATH}",
    "device": "auto, cpu or cuda; default: auto",
}

#: Fields with a dedicated contract variable, consulted when their flag is not given (never hyperparameters).
ENV_FALLBACKS = {
    "output": contract.ENV_RESULT_PATH,
    "checkpoint_dir": contract.ENV_CHECKPOINT_DIR,
    "experiment": contract.ENV_EXPERIMENT_NAME,
    "run_name": contract.ENV_RUN_NAME,
}


def build_parser(prog: str = "python -m gpu_trainer.train") -> argparse.ArgumentParser:
    """The command-line parser; every flag defaults to None so the environment can fill it.

    :param prog: program name shown in ``--help``.
    """
    parser = CliParser(prog=prog, description="Train a classifier on Parquet data and log it to MLflow.")
    for field in dataclasses.fields(TrainConfig):
        flag = "--" + field.name.replace("_", "-")
        if field.name == "compile":
            parser.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=None, help=HELP[field.name]
            )
        else:
            parser.add_argument(flag, dest=field.name, default=None, help=HELP[field.name])
    return parser


def resolve_config(argv: Sequence[str] | None, environ: Mapping[str, str]) -> TrainConfig:
    """Resolve the configuration from flags, then the contract's environment, then defaults.

    :param argv: command-line arguments (without the program name).
    :param environ: the environment (``os.environ`` in ``main``).
    :raises TrainerError: naming the option, the value and what is allowed.
    """
    args = vars(build_parser().parse_args(argv))
    try:
        hyperparameters = contract.parse_hyperparameters(environ.get(contract.ENV_HYPERPARAMETERS))
    except contract.ContractError as err:
        raise TrainerError(str(err)) from err
    try:
        contract.check_reserved_hyperparameters(hyperparameters)
    except contract.ContractError as err:
        flags = [f"--{name.replace('_', '-')}" for name in sorted(contract.RESERVED_HYPERPARAMETERS)]
        raise TrainerError(
            f"{contract.ENV_HYPERPARAMETERS}: {err}; running the trainer by hand, use {'/'.join(flags)}"
        ) from err
    known = {field.name for field in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(hyperparameters) - known)
    if unknown:
        raise TrainerError(
            f"unknown hyperparameter(s) {unknown} in {contract.ENV_HYPERPARAMETERS}; "
            f"allowed: {sorted(known - set(contract.RESERVED_HYPERPARAMETERS))}"
        )
    values: dict[str, Any] = {}
    for name in sorted(known):
        if args.get(name) is not None:
            raw, source = args[name], "--" + name.replace("_", "-")
        elif name in hyperparameters:
            raw, source = hyperparameters[name], f"{contract.ENV_HYPERPARAMETERS}[{name!r}]"
        elif name in ENV_FALLBACKS and environ.get(ENV_FALLBACKS[name]):
            raw, source = environ[ENV_FALLBACKS[name]], ENV_FALLBACKS[name]
        else:
            continue
        try:
            values[name] = CONVERTERS[name](raw)
        except ValueError as err:
            raise TrainerError(f"{source}: {err}") from err
    if "data" not in values:
        raise TrainerError(
            f"--data is required (a Parquet file or directory), or 'data' in {contract.ENV_HYPERPARAMETERS}"
        )
    return TrainConfig(**values)
