"""``gpu_trainer.preemption``: a SIGTERM becomes a notice the training loop acts on, not a death."""

from __future__ import annotations

import os
import signal
import threading

import pytest

from gpu_trainer import contract
from gpu_trainer.preemption import StopNotice, StopVote


@pytest.fixture
def previous_handler():
    """A SIGTERM handler of the test's own, put back afterwards: what an in-process caller would have."""
    seen: list[int] = []
    saved = signal.signal(signal.SIGTERM, lambda signum, frame: seen.append(signum))
    try:
        yield seen
    finally:
        signal.signal(signal.SIGTERM, saved)


def test_sigterm_sets_the_notice_a_quick_repeat_is_the_same_notice_and_uninstall_restores(previous_handler):
    notice = StopNotice().install()
    assert not notice.requested
    os.kill(os.getpid(), signal.SIGTERM)  # Python runs the handler before the next line
    assert notice.requested
    first = notice.received_at
    os.kill(os.getpid(), signal.SIGTERM)  # within the duplicate window: no second notice, no exit
    assert notice.received_at == first
    notice.uninstall()
    os.kill(os.getpid(), signal.SIGTERM)
    assert previous_handler == [signal.SIGTERM]


def test_the_vote_of_a_single_process_is_its_own_notice(previous_handler):
    notice = StopNotice().install()
    try:
        vote = StopVote(notice)
        assert not vote.after_step() and not vote.settle()
        os.kill(os.getpid(), signal.SIGTERM)
        assert vote.after_step() and vote.settle()
    finally:
        notice.uninstall()
    # No notice (the trainer called in-process): never stops.
    assert not StopVote(None).after_step()


def test_install_off_the_main_thread_is_refused():
    errors: list[BaseException] = []

    def install() -> None:
        try:
            StopNotice().install()
        except RuntimeError as err:
            errors.append(err)

    thread = threading.Thread(target=install)
    thread.start()
    thread.join()
    assert len(errors) == 1 and "main thread" in str(errors[0])


def test_the_preempted_exit_status_is_what_a_shell_reports_for_sigterm():
    assert contract.PREEMPTED_EXIT_CODE == 128 + signal.SIGTERM
