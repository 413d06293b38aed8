"""The log sampler that keeps per-request warnings to one line an interval."""

import time

from server.logs import Sampler


def test_sampler_lets_one_through_per_interval_and_counts_the_rest():
    s = Sampler(0.2)
    assert s.take() == 0  # the first one passes, nothing held back before it
    assert [s.take() for _ in range(4)] == [None] * 4
    time.sleep(0.25)
    assert s.take() == 4  # the next one to pass says how many were held back
    assert s.take() is None
    time.sleep(0.25)
    assert s.take() == 1
