"""Units of the servicer module that need no running server."""

from one2one.v1 import ranking_pb2
from ranking import Rung


def test_every_rung_is_the_strategy_of_the_same_name_and_number():
    # The response sets its strategy by the rung's name, so names and numbers must agree.
    for rung in Rung:
        assert ranking_pb2.Strategy.Value(rung.name) == int(rung)


def test_an_untimed_request_happens_now_by_the_servers_clock():
    # Regression: untimed requests were taken to come just after the bundle's data end, so a
    # day-old bundle served every elapsed-time feature at 0 where training saw real gaps.
    import time

    from google.protobuf.timestamp_pb2 import Timestamp

    from server.servicer import query_from_proto

    before = time.time()
    q = query_from_proto(ranking_pb2.RankRequest(user_id="u1"))
    assert q.event_time is not None and before <= q.event_time <= time.time()
    assert query_from_proto(ranking_pb2.RankRequest(user_id="u1"), now=1_700_000_123.0).event_time == 1_700_000_123.0
    given = ranking_pb2.RankRequest(
        user_id="u1", context=ranking_pb2.Context(event_time=Timestamp(seconds=1_600_000_000))
    )
    assert query_from_proto(given, now=1_700_000_123.0).event_time == 1_600_000_000
