"""Admission: at most N Rank pipelines at once per worker, the wait inside the budget."""

import contextlib
import threading
import time

import pytest

from ranking import Budget
from server.admission import Admission
from server.config import ServerConfig


@pytest.mark.parametrize("limit", [1, 2])
def test_over_the_limit_waits_until_a_slot_is_freed(limit):
    adm = Admission(limit)
    all_inside, release, waited = threading.Barrier(limit + 1), threading.Event(), []

    def holder():
        with adm.slot(Budget.unlimited()):
            all_inside.wait(10)
            release.wait(10)

    def second():
        with adm.slot(Budget.unlimited()) as (w, admitted):
            assert admitted
            waited.append(w)

    holders = [threading.Thread(target=holder) for _ in range(limit)]
    for t in holders:
        t.start()
    all_inside.wait(10)  # every slot is taken
    late = threading.Thread(target=second)
    late.start()
    late.join(0.2)
    assert late.is_alive() and not waited  # blocked while the slots are held
    release.set()
    for t in holders:
        t.join(10)
    late.join(10)
    assert len(waited) == 1 and waited[0] >= 0.2


@pytest.mark.parametrize("limit", [1, 2])
def test_a_wait_never_outlasts_the_budget_and_the_slot_is_not_lost(limit):
    adm = Admission(limit)
    with contextlib.ExitStack() as held:
        for _ in range(limit):
            held.enter_context(adm.slot(Budget.unlimited()))
        budget = Budget.start(1000)
        with adm.slot(budget) as (waited, admitted):
            # Gave up waiting with a fifth of the budget left: the reserve for the cheapest path.
            assert not admitted and 0.79 <= waited < 0.95  # generous upper bound: a shared machine
    # Both slots given back properly: the next caller gets in at once.
    with adm.slot(Budget.start(1)) as (waited, admitted):
        assert admitted and waited < 0.5


def _spent(total_ms: float, spent_ms: float) -> Budget:
    """A budget of ``total_ms`` whose request arrived ``spent_ms`` ago."""
    return Budget.start(total_ms, now_ns=time.monotonic_ns() - int(spent_ms * 1e6))


@pytest.mark.parametrize("limit", [0, 1, 2])
def test_a_request_that_spent_its_budget_before_the_slot_takes_none(limit):
    adm = Admission(limit)
    # A 10 ms budget keeps 2 ms for the cheapest path: 8.5 ms spent waiting for a thread
    # leaves only the reserve, and no slot is taken, however many are free.
    queued = _spent(10, 8.5)
    assert Admission.reserve_ms(queued) == 2.0 and Admission.waited_out(queued)
    with adm.slot(queued) as (waited, admitted):
        assert not admitted and waited == 0.0
        # It held none: every slot is still there for the next request.
        with contextlib.ExitStack() as held:
            for _ in range(limit or 3):
                assert held.enter_context(adm.slot(Budget.start(10)))[1]
    # Still more than the reserve left, or a budget that is all reserve (1 ms at least),
    # or none at all: ranked as the time allows.
    assert not Admission.waited_out(_spent(10, 7.5))
    assert not Admission.waited_out(_spent(1, 0.9)) and not Admission.waited_out(_spent(0, 0.0))
    assert Admission.waited_out(_spent(2, 1.2)) and not Admission.waited_out(Budget.unlimited())


def test_no_limit_never_waits():
    adm = Admission(0)
    with adm.slot(Budget.unlimited()) as a, adm.slot(Budget.unlimited()) as b:
        assert a == (0.0, True) and b == (0.0, True)


def test_negative_limits_are_refused():
    with pytest.raises(ValueError, match="admission limit"):
        Admission(-1)
    with pytest.raises(ValueError, match="max_concurrent_ranks -1 must be >= 0"):
        ServerConfig(artifacts="x", max_concurrent_ranks=-1).validate()


def test_micro_batches_never_gather_more_than_may_run_at_once():
    assert ServerConfig(ann_batch_size=8, max_concurrent_ranks=1).ranker_config().ann_batch_size == 1
    assert ServerConfig(ann_batch_size=8, max_concurrent_ranks=4).ranker_config().ann_batch_size == 4
    assert ServerConfig(ann_batch_size=8, max_concurrent_ranks=0).ranker_config().ann_batch_size == 8
