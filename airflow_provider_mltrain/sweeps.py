"""Adaptive hyperparameter sweeps: successive halving over mapped training rounds.

:func:`successive_halving` builds a TaskGroup: ``sample`` draws the configurations, ``round_1`` trains
all of them for ``min_epochs`` (one mapped training task per configuration), ``select_1`` keeps the best
``1/eta``, ``round_2`` trains the survivors on to ``eta`` times the epochs, resuming each survivor's own
checkpoint (the training operator's ``checkpoint_key``), and so on; ``best`` ranks the last round and
returns the winner's result with the leaderboard. The number of rounds is fixed when the DAG is parsed;
how many trials each round runs is decided while it runs.

Importing this module costs what importing the operators costs: the arithmetic is standard library,
mlflow is imported only inside the ranking tasks.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from airflow_provider_mltrain import _halving, _search_space
from airflow_provider_mltrain._halving import Round, bad_argument, plan_rounds, planned_epochs

if TYPE_CHECKING:
    from airflow.sdk import TaskGroup
    from airflow.sdk.definitions.mappedoperator import OperatorPartial
    from airflow.sdk.definitions.xcom_arg import XComArg

    from airflow_provider_mltrain.hooks.mlflow import MLflowHook

log = logging.getLogger(__name__)

#: The hyperparameter through which each round's epoch budget reaches the trainer (the contract's channel).
EPOCHS_HYPERPARAMETER = "epochs"
#: Arguments of the trainer's ``partial()`` that the sweep sets per trial.
SWEEP_ARGUMENTS = ("hyperparameters", "checkpoint_key")


def successive_halving(
    group_id: str,
    trainer: OperatorPartial,
    search_space: dict[str, Any],
    n_configs: int,
    *,
    eta: int = 3,
    min_epochs: int = 1,
    max_epochs: int,
    metric: str = "val_accuracy",
    mode: str = "max",
    seed: int | None = 0,
    min_successful: int = 1,
) -> XComArg:
    """A successive-halving sweep as a TaskGroup; returns the ``best`` task's output.

    Rounds: epoch budgets ``min_epochs * eta**k`` while under ``max_epochs``, then ``max_epochs``;
    round 1 runs ``n_configs`` trials, each later round the best ``1/eta`` of the previous round's plan
    (at least one). A survivor resumes its own checkpoint, so it trains only the new epochs. A trial that
    fails (after its retries) is dropped with a log line; a round with fewer than ``min_successful``
    successful trials fails the sweep. Call it inside a ``DAG`` context.

    On Kubernetes, give the trainer ``checkpoint_volume=`` or ``checkpoint_uri=``: without one, each
    pod's checkpoints vanish with it and a survivor trains its budget from the start (still correct,
    only dearer). The local launcher keeps them under ``[mltrain] local_checkpoint_root``.

    :param group_id: the TaskGroup's id; the tasks are ``<group_id>.sample``, ``.round_<k>``,
        ``.select_<k>`` and ``.best``.
    :param trainer: a training operator's ``.partial(...)`` (``GPUTrainingPodOperator`` or another with a
        ``checkpoint_key`` parameter), without ``hyperparameters`` or ``checkpoint_key``: the sweep maps
        those. Its ``task_id`` is replaced by ``round_<k>``. With ``mlflow_conn_id`` the sweep gets a
        parent MLflow run with every trial's run as its child, the leaderboard and a plot.
    :param search_space: hyperparameter -> a list of choices, ``{"uniform": [a, b]}``,
        ``{"loguniform": [a, b]}`` or ``{"int": [a, b]}``. Lists only with ``n_configs`` equal to the
        number of combinations trains exactly the grid. ``epochs`` is the sweep's to set.
    :param n_configs: configurations in round 1.
    :param eta: keep the best ``1/eta`` each round and multiply the epochs by ``eta`` (>= 2).
    :param min_epochs: the epochs of round 1.
    :param max_epochs: the epochs of the last round (the winner's total).
    :param metric: the result metric to rank by (``result["metrics"][metric]``).
    :param mode: ``"max"`` (higher is better) or ``"min"``.
    :param seed: seeds the random draws (None: different configurations in every DAG run).
    :param min_successful: successful trials each round needs (capped at the round's size).
    :returns: the best trial's result (``run_id``, ``model_uri``, ``metrics``, ``params``, ...) plus
        ``trial``, ``leaderboard`` (every trial, best first), ``trained_epochs`` (the epochs the
        successful tries trained, from their ``resumed_from_epoch``) and ``parent_run_id`` (None without
        MLflow).
    :raises ValueError: at parse time, naming the argument, for a bad search space or budget.
    """
    from airflow.sdk import TaskGroup

    rounds = plan_rounds(n_configs, eta, min_epochs, max_epochs)
    space = _search_space.check_search_space(search_space, reserved=(EPOCHS_HYPERPARAMETER,))
    _search_space.check_n_configs(space, n_configs)
    metric = _halving.check_metric(metric)
    mode = _halving.check_mode(mode)
    if isinstance(min_successful, bool) or not isinstance(min_successful, int) or min_successful < 1:
        raise bad_argument("min_successful", min_successful, "expected an int >= 1")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise bad_argument("seed", seed, "expected an int or None")
    _check_trainer(trainer, space)

    settings = _Settings(
        group_id=group_id,
        rounds=rounds,
        metric=metric,
        mode=mode,
        min_successful=min_successful,
        mlflow_conn_id=trainer.kwargs.get("mlflow_conn_id"),
        description={
            "search_space": space,
            "n_configs": n_configs,
            "eta": eta,
            "min_epochs": min_epochs,
            "max_epochs": max_epochs,
            "metric": metric,
            "mode": mode,
            "seed": seed,
            "planned_epochs": planned_epochs(rounds),
        },
    )
    with TaskGroup(group_id) as group:
        settings.task_ids = {
            name: group.child_id(name)
            for name in (
                "sample",
                "best",
                *(f"{kind}_{r.number}" for r in rounds for kind in ("round", "select")),
            )
        }
        trials = _sample_task(space, n_configs, seed, rounds[0].epochs, group_id)
        for current in rounds:
            training = _round_partial(trainer, group, f"round_{current.number}").expand_kwargs(trials)
            if current is rounds[-1]:
                best = _best_task(settings)
                training >> best
                break
            trials = _select_task(settings, current, rounds[current.number])
            training >> trials
    trainer._expand_called = True  # its copies were mapped; the template itself never is
    return best


def _check_trainer(trainer: Any, space: dict[str, Any]) -> None:
    """A ``partial()`` of a training operator that has a ``checkpoint_key`` and leaves the sweep's arguments."""
    operator_class = getattr(trainer, "operator_class", None)
    kwargs = getattr(trainer, "kwargs", None)
    if operator_class is None or not isinstance(kwargs, dict) or not hasattr(trainer, "expand_kwargs"):
        raise bad_argument(
            "trainer",
            trainer,
            "expected a training operator's .partial(...), e.g. GPUTrainingPodOperator.partial",
        )
    if getattr(trainer, "_expand_called", False):
        raise bad_argument("trainer", trainer, "this partial() was already expanded; pass a fresh one")
    if "checkpoint_key" not in getattr(operator_class, "template_fields", ()):
        raise bad_argument(
            "trainer",
            trainer,
            f"{operator_class.__name__} has no checkpoint_key parameter, so survivors could not resume",
        )
    set_here = [name for name in SWEEP_ARGUMENTS if kwargs.get(name) is not None]
    if set_here:
        raise bad_argument(
            "trainer", trainer, f"leave {set_here} out of partial(): the sweep sets them per trial"
        )
    from airflow_provider_mltrain.operators import _pod_spec

    # The bundled trainer refuses unknown hyperparameters: fail the DAG file now, not every trial later.
    names = {name: None for name in space} | {EPOCHS_HYPERPARAMETER: None}
    try:
        _pod_spec.check_trainer_hyperparameters(names, kwargs.get("cmds"))
    except ValueError as err:
        detail = str(err).split("; ", 1)[-1]  # the operator's "invalid hyperparameters={...}" is ours
        raise bad_argument("search_space", sorted(space), detail) from err


class _Settings:
    """What the sweep's tasks share (fixed at parse time)."""

    def __init__(
        self,
        *,
        group_id: str,
        rounds: tuple[Round, ...],
        metric: str,
        mode: str,
        min_successful: int,
        mlflow_conn_id: str | None,
        description: dict[str, Any],
    ) -> None:
        self.group_id = group_id
        self.rounds = rounds
        self.metric = metric
        self.mode = mode
        self.min_successful = min_successful
        self.mlflow_conn_id = mlflow_conn_id
        self.description = description
        self.task_ids: dict[str, str] = {}

    def input_task(self, round_number: int) -> str:
        """The task whose output lists round ``round_number``'s trials."""
        return self.task_ids["sample" if round_number == 1 else f"select_{round_number - 1}"]


def _round_partial(trainer: OperatorPartial, group: TaskGroup, name: str) -> OperatorPartial:
    """A copy of the user's ``partial()`` that becomes round ``name`` of the group when expanded."""
    kwargs = dict(trainer.kwargs)
    kwargs["task_id"] = group.child_id(name)
    kwargs["task_group"] = group
    kwargs["dag"] = kwargs.get("dag") or group.dag
    return type(trainer)(operator_class=trainer.operator_class, kwargs=kwargs, params=trainer.params)


def _trial_input(config: dict[str, Any], epochs: int, key: str) -> dict[str, Any]:
    """One mapped training task's arguments: the configuration with its epoch budget, and its key."""
    return {"hyperparameters": {**config, EPOCHS_HYPERPARAMETER: epochs}, "checkpoint_key": key}


def _sample_task(
    space: dict[str, Any], n_configs: int, seed: int | None, epochs: int, group_id: str
) -> XComArg:
    from airflow.sdk import task

    @task(task_id="sample")
    def sample() -> list[dict[str, Any]]:
        """Round 1's trials: every configuration with the first epoch budget and its checkpoint key."""
        configs = _search_space.sample_configs(space, n_configs, seed)
        width = max(3, len(str(n_configs - 1)))
        prefix = _key_prefix(group_id)
        trials = [_trial_input(c, epochs, f"{prefix}trial_{i:0{width}d}") for i, c in enumerate(configs)]
        for trial in trials:
            log.info("%s: %s", trial["checkpoint_key"], trial["hyperparameters"])
        return trials

    return sample()


def _key_prefix(group_id: str) -> str:
    """Keys carry the group id so two sweeps of one DAG run never share a checkpoint."""
    from airflow_provider_mltrain.operators import _pod_spec

    return f"{_pod_spec.path_segment(group_id.replace('.', '-'))}-"


def _select_task(settings: _Settings, current: Round, following: Round) -> XComArg:
    from airflow.sdk import task

    @task(task_id=f"select_{current.number}", trigger_rule="all_done")
    def select() -> list[dict[str, Any]]:
        """Rank this round's trials; the best ``following.trials`` go on with ``following.epochs``."""
        keys, configs, results = _pull_round(settings, current.number)
        ranked = _rank(settings, current.number, keys, results)
        kept = ranked[: following.trials]
        for place, (key, result) in enumerate(ranked, start=1):
            log.info(
                "round %d #%d %s %s=%.6g %s",
                current.number,
                place,
                key,
                settings.metric,
                _halving.metric_value(result, settings.metric),
                f"-> round {following.number}" if place <= following.trials else "pruned",
            )
        _track_round(settings, ranked)
        return [_trial_input(configs[key], following.epochs, key) for key, _ in kept]

    return select()


def _best_task(settings: _Settings) -> XComArg:
    from airflow.sdk import task

    @task(task_id="best", trigger_rule="all_done")
    def best() -> dict[str, Any]:
        """Rank the last round; return the winner with the leaderboard, and report to MLflow."""
        last = settings.rounds[-1].number
        history: dict[str, dict[str, Any]] = {}
        trained_epochs = 0
        ranked: list[tuple[str, dict[str, Any]]] = []
        for current in settings.rounds:
            keys, configs, results = _pull_round(settings, current.number)
            for key, result in zip(keys, results, strict=True):
                entry = history.setdefault(key, {"trial": key, "params": configs[key], "curve": []})
                value = _halving.metric_value(result, settings.metric) if result is not None else None
                entry["status"] = "failed" if value is None else "pruned"
                entry["last_round"] = current.number
                if value is not None:
                    entry["curve"].append((current.epochs, value))
                    entry["result"] = result
                    trained_epochs += current.epochs - int(result.get("resumed_from_epoch") or 0)
            if current.number == last:
                ranked = _rank(settings, current.number, keys, results)
        for key, _ in ranked:
            history[key]["status"] = "finished"
        leaderboard = _leaderboard(settings, history, [key for key, _ in ranked])
        best_key, best_result = ranked[0]
        log.info(
            "best: %s %s=%.6g after %d epochs; %d trainer epochs in all (planned %d)",
            best_key,
            settings.metric,
            _halving.metric_value(best_result, settings.metric),
            settings.rounds[-1].epochs,
            trained_epochs,
            settings.description["planned_epochs"],
        )
        parent = _track_round(
            settings,
            ranked,
            final={
                "leaderboard": leaderboard,
                "curves": {key: entry["curve"] for key, entry in history.items()},
                "metrics": {
                    f"best_{settings.metric}": _halving.metric_value(best_result, settings.metric) or 0.0,
                    "trained_epochs": float(trained_epochs),
                },
            },
        )
        return {
            **best_result,
            "trial": best_key,
            "leaderboard": leaderboard,
            "trained_epochs": trained_epochs,
            "parent_run_id": parent,
        }

    return best()


def _pull_round(
    settings: _Settings, round_number: int
) -> tuple[list[str], dict[str, dict[str, Any]], list[Any]]:
    """A round's trial keys (map index order), their configurations and results (None where one failed)."""
    from airflow.providers.common.compat.sdk import AirflowFailException
    from airflow.sdk import get_current_context

    ti = get_current_context()["ti"]
    source = settings.input_task(round_number)
    inputs = ti.xcom_pull(task_ids=source)
    if not inputs:
        raise AirflowFailException(
            f"round {round_number} has no trials: {source} returned none (it failed; see its log)"
        )
    inputs = [inputs[i] for i in range(len(inputs))]
    keys = [str(trial["checkpoint_key"]) for trial in inputs]
    configs = {
        str(trial["checkpoint_key"]): {
            k: v for k, v in trial["hyperparameters"].items() if k != EPOCHS_HYPERPARAMETER
        }
        for trial in inputs
    }
    round_task = settings.task_ids[f"round_{round_number}"]
    # Pull only the trials that succeeded: a pull of a failed one's missing XCom is logged as an error.
    states = ti.get_task_states(dag_id=ti.dag_id, task_ids=[round_task], run_ids=[ti.run_id])
    succeeded = {name for name, state in states.get(ti.run_id, {}).items() if state == "success"}
    results = [
        ti.xcom_pull(task_ids=round_task, map_indexes=index) if f"{round_task}_{index}" in succeeded else None
        for index in range(len(keys))
    ]
    return keys, configs, results


def _rank(
    settings: _Settings, round_number: int, keys: list[str], results: list[Any]
) -> list[tuple[str, dict[str, Any]]]:
    from airflow.providers.common.compat.sdk import AirflowFailException

    try:
        return _halving.rank_round(
            round_number,
            keys,
            results,
            metric=settings.metric,
            mode=settings.mode,
            min_successful=settings.min_successful,
        )
    except RuntimeError as err:
        _track_failure(settings)
        # No retry: ranking the same failed trials again gives the same answer.
        raise AirflowFailException(str(err)) from err


def _leaderboard(
    settings: _Settings, history: dict[str, dict[str, Any]], finishers: list[str]
) -> list[dict[str, Any]]:
    """Every trial, best first: finishers by the metric, then the others by how far they got and their metric."""
    sign = -1.0 if settings.mode == "max" else 1.0

    def order(key: str) -> tuple[int, int, float, str]:
        curve = history[key]["curve"]
        if key in finishers:
            return (0, finishers.index(key), 0.0, key)
        if not curve:
            return (2, 0, 0.0, key)
        epochs, value = curve[-1]
        return (1, -epochs, sign * value, key)

    rows = []
    for rank, key in enumerate(sorted(history, key=order), start=1):
        entry = history[key]
        result = entry.get("result") or {}
        rows.append(
            {
                "rank": rank,
                "trial": key,
                "status": entry["status"],
                "round": entry["last_round"],
                "epochs": entry["curve"][-1][0] if entry["curve"] else 0,
                settings.metric: entry["curve"][-1][1] if entry["curve"] else None,
                "run_id": result.get("run_id"),
                "params": entry["params"],
            }
        )
    return rows


def _mlflow_hook(settings: _Settings) -> MLflowHook | None:
    if not settings.mlflow_conn_id:
        return None
    from airflow_provider_mltrain.hooks.mlflow import MLflowHook

    return MLflowHook(settings.mlflow_conn_id)


def _sweep_id(settings: _Settings) -> tuple[str, str]:
    from airflow.sdk import get_current_context

    context = get_current_context()
    dag_id, run_id = context["ti"].dag_id, context["run_id"]
    return f"{dag_id}/{run_id}/{settings.group_id}", f"{dag_id}.{settings.group_id}@{run_id}"


def _track_round(
    settings: _Settings, ranked: list[tuple[str, dict[str, Any]]], final: dict[str, Any] | None = None
) -> str | None:
    """Make the round's trial runs children of the sweep's parent run; with ``final``, report and end it.

    Tracking is a record of the sweep, not part of its decision: a tracking failure is a warning.
    """
    hook = _mlflow_hook(settings)
    if hook is None or not ranked:
        return None
    from airflow_provider_mltrain import _sweep_tracking as tracking

    try:
        client = hook.get_conn()
        sweep_id, run_name = _sweep_id(settings)
        experiment_id = tracking.experiment_of(client, ranked[0][1])
        parent = tracking.parent_run(client, experiment_id, sweep_id, run_name, _params(settings))
        tracking.adopt_trials(client, parent, [(key, str(result["run_id"])) for key, result in ranked])
        if final is not None:
            tracking.report(
                client,
                parent,
                leaderboard=final["leaderboard"],
                plot_svg=tracking.plot_svg(final["curves"], settings.metric, run_name),
                metrics=final["metrics"],
                host_creds=hook.host_creds,
            )
        return parent
    except Exception as err:
        log.warning("could not record the sweep in MLflow (%s): %s", settings.mlflow_conn_id, err)
        return None


def _track_failure(settings: _Settings) -> None:
    """End the parent run as FAILED when a round fails (if the sweep has one yet)."""
    hook = _mlflow_hook(settings)
    if hook is None:
        return
    from airflow_provider_mltrain import _sweep_tracking as tracking

    try:
        client = hook.get_conn()
        sweep_id, _ = _sweep_id(settings)
        quoted = sweep_id.replace("'", "\\'")
        for run in client.search_runs(
            [e.experiment_id for e in client.search_experiments()],
            filter_string=f"tags.`{tracking.SWEEP_TAG}` = '{quoted}'",
            max_results=1,
        ):
            client.set_terminated(run.info.run_id, status="FAILED")
    except Exception as err:
        log.warning("could not mark the sweep's MLflow run failed: %s", err)


def _params(settings: _Settings) -> dict[str, Any]:
    import json

    return {
        key: json.dumps(value, sort_keys=True) if isinstance(value, (dict, list)) else value
        for key, value in settings.description.items()
    }
