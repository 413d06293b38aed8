"""Units of the servicer module that need no running server."""

from one2one.v1 import ranking_pb2
from ranking import Rung


def test_every_rung_is_the_strategy_of_the_same_name_and_number():
    # The response sets its strategy by the rung's name, so names and numbers must agree.
    for rung in Rung:
        assert ranking_pb2.Strategy.Value(rung.name) == int(rung)
