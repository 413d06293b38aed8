"""Admission: at most N Rank pipelines at once per worker, the wait inside the budget."""
import threading

import pytest

from ranking.budget import Budget
from server.admission import Admission
from server.config import ServerConfig


def test_over_the_limit_waits_until_a_slot_is_freed():
    adm = Admission(1)
    inside, release, waited = threading.Event(), threading.Event(), []

    def holder():
        with adm.slot(Budget.unlimited()):
            inside.set()
            release.wait(10)

    def second():
        with adm.slot(Budget.unlimited()) as w:
            waited.append(w)

    t1 = threading.Thread(target=holder)
    t1.start()
    assert inside.wait(10)
    t2 = threading.Thread(target=second)
    t2.start()
    t2.join(0.2)
    assert t2.is_alive() and not waited  # blocked while the slot is held
    release.set()
    t1.join(10)
    t2.join(10)
    assert len(waited) == 1 and waited[0] >= 0.2


def test_a_wait_never_outlasts_the_budget_and_the_slot_is_not_lost():
    adm = Admission(1)
    with adm.slot(Budget.unlimited()):
        budget = Budget.start(50)
        with adm.slot(budget) as waited:
            # Ran without a slot once the budget was spent waiting.
            assert budget.expired() and waited >= 0.05
    # Both slots given back properly: the next caller gets in at once.
    with adm.slot(Budget.start(1)) as waited:
        assert waited < 0.5


def test_no_limit_never_waits():
    adm = Admission(0)
    with adm.slot(Budget.unlimited()) as a, adm.slot(Budget.unlimited()) as b:
        assert a == 0.0 and b == 0.0


def test_negative_limits_are_refused():
    with pytest.raises(ValueError, match="admission limit"):
        Admission(-1)
    with pytest.raises(ValueError, match="max_concurrent_ranks -1 must be >= 0"):
        ServerConfig(artifacts="x", max_concurrent_ranks=-1).validate()


def test_micro_batches_never_gather_more_than_may_run_at_once():
    assert ServerConfig(ann_batch_size=8, max_concurrent_ranks=1).ranker_config().ann_batch_size == 1
    assert ServerConfig(ann_batch_size=8, max_concurrent_ranks=4).ranker_config().ann_batch_size == 4
    assert ServerConfig(ann_batch_size=8, max_concurrent_ranks=0).ranker_config().ann_batch_size == 8
