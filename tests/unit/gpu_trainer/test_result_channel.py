"""The multi-node result channel: the termination message, and the marker line for long results."""

from __future__ import annotations

import json

import pytest

from gpu_trainer import contract

RESULT = contract.make_result(
    run_id="r1",
    model_uri="runs:/r1/model",
    metrics={"val_accuracy": 0.9},
    params={"lr": 0.1},
    resumed_from_epoch=None,
)


def test_termination_message_written_in_place_and_repeated_as_one_log_line(tmp_path, monkeypatch, capsys):
    target = tmp_path / "termination-log"
    target.write_text("")  # the kubelet's bind-mounted file exists before the container starts
    monkeypatch.setattr(contract, "TERMINATION_MESSAGE_PATH", str(target))
    inode = target.stat().st_ino

    contract.write_result(str(target), RESULT)

    assert json.loads(target.read_text()) == RESULT
    assert target.stat().st_ino == inode  # written in place: a rename would fail on the bind mount
    lines = capsys.readouterr().out.splitlines()
    assert contract.parse_result_log_line(["noise", *lines, "after"]) == RESULT


def test_parse_result_log_line_takes_the_last_marker_and_rejects_a_truncated_one():
    stamped = "2026-01-01T00:00:00Z " + contract.RESULT_LOG_MARKER + json.dumps(RESULT)
    assert contract.parse_result_log_line([contract.RESULT_LOG_MARKER + "{}", stamped]) == RESULT
    assert contract.parse_result_log_line(["no marker here"]) is None
    with pytest.raises(ValueError):
        contract.parse_result_log_line([contract.RESULT_LOG_MARKER + '{"run_id": "r'])
