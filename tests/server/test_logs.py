"""The log sampler that keeps per-request warnings to one line an interval."""

import json
import logging
import time

import pytest

from server.logs import JsonFormatter, Sampler, request_context


def test_sampler_lets_one_through_per_interval_and_counts_the_rest():
    s = Sampler(0.2)
    assert s.take() == 0  # the first one passes, nothing held back before it
    assert [s.take() for _ in range(4)] == [None] * 4
    time.sleep(0.25)
    assert s.take() == 4  # the next one to pass says how many were held back
    assert s.take() is None
    time.sleep(0.25)
    assert s.take() == 1


def test_lines_inside_a_request_carry_its_id_and_lines_after_it_do_not():
    fmt = JsonFormatter()

    def line() -> dict:
        return json.loads(fmt.format(logging.LogRecord("t", logging.INFO, "f", 1, "m", (), None)))

    with request_context("r1"):
        assert line()["request_id"] == "r1"
        with request_context("r2"):  # nested: the inner id, then the outer one back
            assert line()["request_id"] == "r2"
        assert line()["request_id"] == "r1"
    assert "request_id" not in line()
    with pytest.raises(RuntimeError), request_context("r3"):
        raise RuntimeError("handler failed")
    assert "request_id" not in line()  # reset on the way out of a failed request too
