"""``checkpoint_key``: one checkpoint directory per DAG run and key, whichever task, map index or try uses it."""

from __future__ import annotations

import pytest

from gpu_trainer import contract
from tests.fixtures.gpu_operator import RUN_ID, build, env_of, op_

KEYED = "s3://bucket/ckpt/train_dag/manual__2026-01-01T00_00_00_00_00/checkpoint_key=tune-trial_007"


def test_keyed_dir_is_shared_by_every_task_map_index_and_try_of_the_run(k8s_hook):
    dirs = {
        env_of(
            build(
                op_(task_id=task_id, checkpoint_uri="s3://bucket/ckpt", checkpoint_key="tune-trial_007"),
                task_id=task_id,
                map_index=map_index,
                try_number=try_number,
            )
        )[contract.ENV_CHECKPOINT_DIR]
        for task_id, map_index, try_number in [
            ("tune.round_1", 7, 1),
            ("tune.round_2", 2, 1),
            ("tune.round_2", 2, 3),
        ]
    }
    assert RUN_ID == "manual__2026-01-01T00:00:00+00:00"
    assert dirs == {KEYED}
    other = build(op_(checkpoint_uri="s3://bucket/ckpt", checkpoint_key="tune-trial_008"), map_index=7)
    assert env_of(other)[contract.ENV_CHECKPOINT_DIR] == KEYED.replace("007", "008")


@pytest.mark.parametrize("key", ["../other", "a/b", "", ".hidden", "x" * 129, 7])
def test_bad_key_fails_at_parse_naming_it(key):
    with pytest.raises(ValueError, match=r"invalid checkpoint_key=.*one path segment"):
        op_(checkpoint_key=key)


def test_rendered_key_is_checked_when_the_pod_is_built(k8s_hook):
    op = op_(checkpoint_key="{{ params.trial }}")  # a template: checked after rendering
    op.checkpoint_key = "../../etc"
    with pytest.raises(ValueError, match=r"invalid checkpoint_key='../../etc'"):
        build(op)
