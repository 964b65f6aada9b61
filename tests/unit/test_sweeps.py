"""Successive halving at parse time: the rounds' arithmetic, the search space, the argument checks.

No training and no task runs here (they are in ``tests/dags/test_successive_halving.py``), so this file
runs in the lowest-versions environment too.
"""

from __future__ import annotations

import datetime
import logging

import pytest

from airflow_provider_mltrain._halving import Round, plan_rounds, planned_epochs, rank_round
from airflow_provider_mltrain._search_space import check_search_space, sample_configs
from airflow_provider_mltrain._sweep_tracking import plot_svg
from airflow_provider_mltrain.operators.gpu_training import GPUTrainingPodOperator
from airflow_provider_mltrain.sweeps import successive_halving


@pytest.mark.parametrize(
    ("n", "eta", "low", "high", "expected", "epochs"),
    [
        # The example: 27 configs, thirds, 1 -> 3 -> 9 epochs: 27 + 9*2 + 3*6 = 63 of a grid's 243.
        (27, 3, 1, 9, [(27, 1, 1), (9, 3, 2), (3, 9, 6)], 63),
        # The benchmark's: 9 configs, 1 -> 3 -> 9: 9 + 3*2 + 1*6 = 21 of a grid's 81.
        (9, 3, 1, 9, [(9, 1, 1), (3, 3, 2), (1, 9, 6)], 21),
        # max_epochs not a power of eta: the last round still ends at max_epochs.
        (8, 2, 1, 10, [(8, 1, 1), (4, 2, 1), (2, 4, 2), (1, 8, 4), (1, 10, 2)], 8 + 4 + 4 + 4 + 2),
        (10, 3, 2, 5, [(10, 2, 2), (3, 5, 3)], 20 + 9),
        # min == max: one round, a plain sweep.
        (5, 3, 4, 4, [(5, 4, 4)], 20),
        # Fewer configs than eta: one survivor from round 1 on.
        (2, 4, 1, 16, [(2, 1, 1), (1, 4, 3), (1, 16, 12)], 2 + 3 + 12),
    ],
)
def test_round_sizes_and_epoch_budgets(n, eta, low, high, expected, epochs):
    rounds = plan_rounds(n, eta, low, high)
    assert [(r.trials, r.epochs, r.new_epochs) for r in rounds] == expected
    assert [r.number for r in rounds] == list(range(1, len(expected) + 1))
    assert rounds[-1].epochs == high
    assert planned_epochs(rounds) == epochs


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n_configs": 0}, "invalid n_configs=0; expected an int >= 1"),
        ({"eta": 1}, "invalid eta=1; expected an int >= 2"),
        ({"min_epochs": 5, "max_epochs": 4}, "invalid min_epochs=5; expected at most max_epochs=4"),
        ({"min_epochs": 0}, "invalid min_epochs=0; expected an int >= 1"),
        ({"mode": "maximize"}, "invalid mode='maximize'; expected one of ['max', 'min']"),
        (
            {"search_space": {"lr": {"normal": [0, 1]}}},
            "invalid search_space['lr']={'normal': [0, 1]}; unknown",
        ),
        ({"search_space": {"lr": {"loguniform": [0, 1]}}}, "with 0 < low < high"),
        ({"search_space": {"lr": {"uniform": [1, 1]}}}, "with low < high"),
        ({"search_space": {"hidden_dim": {"int": [64.0, 128]}}}, "with ints, low <= high"),
        ({"search_space": {"lr": []}}, "invalid search_space['lr']=[]"),
        ({"search_space": {"lr": [0.1], "epochs": [1, 2]}}, "'epochs' is set by the sweep"),
        ({"search_space": {"lr": [0.1, 0.2]}, "n_configs": 3}, "expected at most 2"),
        ({"min_successful": 0}, "invalid min_successful=0"),
    ],
)
def test_bad_arguments_fail_at_parse_naming_the_argument(kwargs, message):
    from airflow.sdk import DAG

    arguments = {
        "search_space": {"lr": {"loguniform": [1e-4, 1e-1]}, "hidden_dim": [64, 128]},
        "n_configs": 9,
        "eta": 3,
        "min_epochs": 1,
        "max_epochs": 9,
        **kwargs,
    }
    with DAG("sh_bad", schedule=None, start_date=datetime.datetime(2026, 1, 1)):
        trainer = GPUTrainingPodOperator.partial(task_id="train", image="trainer:1")
        with pytest.raises(ValueError, match="successive_halving: ") as err:
            successive_halving("tune", trainer, **arguments)
        trainer._expand_called = True
    assert message in str(err.value)


def test_trainer_must_leave_the_mapped_arguments_and_know_the_hyperparameters():
    from airflow.sdk import DAG

    with DAG("sh_trainer", schedule=None, start_date=datetime.datetime(2026, 1, 1)):
        preset = GPUTrainingPodOperator.partial(task_id="a", image="t:1", hyperparameters={"lr": 0.1})
        with pytest.raises(ValueError, match=r"invalid trainer=.*leave \['hyperparameters'\] out"):
            successive_halving("tune", preset, {"lr": [0.1]}, 1, max_epochs=1)
        bundled = GPUTrainingPodOperator.partial(task_id="b", image="t:1")
        # The bundled trainer (default command) has no 'learning_rate': caught now, not in every trial.
        with pytest.raises(
            ValueError,
            match=r"invalid search_space=\['learning_rate'\]; unknown key\(s\) \['learning_rate'\] for the bundled",
        ):
            successive_halving("tune2", bundled, {"learning_rate": [0.1]}, 1, max_epochs=1)
        with pytest.raises(ValueError, match="invalid trainer=.*expected a training operator's .partial"):
            successive_halving("tune3", GPUTrainingPodOperator, {"lr": [0.1]}, 1, max_epochs=1)
        preset._expand_called = bundled._expand_called = True


def test_task_group_shape_and_round_tasks_keep_the_trainer_settings():
    from airflow.sdk import DAG

    with DAG("sh_shape", schedule=None, start_date=datetime.datetime(2026, 1, 1)) as dag:
        best = successive_halving(
            "tune",
            GPUTrainingPodOperator.partial(task_id="train", image="t:1", gpus=1, retries=2),
            {"lr": {"loguniform": [1e-4, 1e-1]}, "hidden_dim": [64, 128]},
            n_configs=9,
            eta=3,
            min_epochs=1,
            max_epochs=9,
        )
    assert best.operator.task_id == "tune.best"
    assert sorted(dag.task_ids) == sorted(
        [
            "tune.sample",
            "tune.round_1",
            "tune.select_1",
            "tune.round_2",
            "tune.select_2",
            "tune.round_3",
            "tune.best",
        ]
    )
    round_2 = dag.get_task("tune.round_2")
    assert round_2.partial_kwargs["gpus"] == 1
    assert round_2.partial_kwargs["retries"] == 2
    assert round_2.upstream_task_ids == {"tune.select_1"}
    assert dag.get_task("tune.select_1").trigger_rule == "all_done"
    assert dag.get_task("tune.best").upstream_task_ids == {"tune.round_3"}


def test_grid_when_lists_only_and_n_equals_its_size():
    space = {"lr": [0.1, 0.01], "hidden_dim": [64, 128, 256]}
    assert sample_configs(space, 6, seed=0) == [
        {"lr": lr, "hidden_dim": h} for lr in (0.1, 0.01) for h in (64, 128, 256)
    ]
    subset = sample_configs(space, 4, seed=0)
    assert len({tuple(c.values()) for c in subset}) == 4  # distinct combinations
    assert subset == sample_configs(space, 4, seed=0) != sample_configs(space, 4, seed=1)


def test_random_draws_are_seeded_and_inside_their_bounds():
    space = check_search_space(
        {
            "lr": {"loguniform": [1e-4, 1e-1]},
            "dropout": {"uniform": [0.0, 0.5]},
            "depth": {"int": [1, 3]},
            "act": ["relu", "gelu"],
        }
    )
    configs = sample_configs(space, 50, seed=7)
    assert configs == sample_configs(space, 50, seed=7)
    assert all(1e-4 <= c["lr"] <= 1e-1 and 0.0 <= c["dropout"] <= 0.5 for c in configs)
    assert {c["depth"] for c in configs} == {1, 2, 3}
    assert {c["act"] for c in configs} == {"relu", "gelu"}
    # Log-uniform: about as many draws below 1e-2.5 as above it.
    below = sum(c["lr"] < 10**-2.5 for c in configs)
    assert 15 <= below <= 35


def test_ranking_drops_failed_trials_with_a_log_line_and_enforces_min_successful(caplog):
    results = [{"metrics": {"loss": 0.5}}, None, {"metrics": {"loss": 0.2}}, {"metrics": {}}]
    keys = ["t0", "t1", "t2", "t3"]
    with caplog.at_level(logging.WARNING):
        ranked = rank_round(2, keys, results, metric="loss", mode="min", min_successful=2)
    assert [key for key, _ in ranked] == ["t2", "t0"]
    assert "round 2: trial t1 failed (map index 1): dropped from the ranking" in caplog.text
    assert "round 2: trial t3 reported no finite 'loss'" in caplog.text
    with pytest.raises(
        RuntimeError,
        match="round 2: 2 of 4 trials succeeded with a 'loss' metric, fewer than min_successful=3",
    ):
        rank_round(2, keys, results, metric="loss", mode="min", min_successful=3)


def test_plot_has_a_line_per_trial_that_reported():
    svg = plot_svg({"t0": [(1, 0.5), (3, 0.7)], "t1": [(1, 0.4)], "t2": []}, "val_accuracy", "sweep <1>")
    assert svg.startswith("<svg") and svg.rstrip().endswith("</svg>")
    assert svg.count("<polyline") == 2
    assert "<title>t0</title>" in svg and "sweep &lt;1&gt;" in svg


def test_round_dataclass_is_what_plan_returns():
    assert plan_rounds(1, 2, 1, 1) == (Round(number=1, trials=1, epochs=1, new_epochs=1),)
