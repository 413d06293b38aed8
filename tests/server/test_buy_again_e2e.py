"""Buy again over a real server: a purchase recorded through RecordEvents updates the
customer's re-purchase state at once (a just-bought staple stays on offer but is not due; a
just-bought durable is excluded) and the same holds after kill -9 and a restart."""

from __future__ import annotations

import os
import signal
import time

import grpc
import numpy as np
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from tests_support import SMALL_BUILD

from index_builder.build import build
from index_builder.config import BuildConfig
from index_builder.synthetic import make_grocery, write_shop
from one2one.v1 import ranking_pb2 as pb
from one2one.v1 import ranking_pb2_grpc
from ranking import Ranker, RankingModel, RankQuery
from server.demo import start_server, wait_serving

pytestmark = pytest.mark.slow
DAY = 86_400


def _ts(seconds: float) -> Timestamp:
    t = Timestamp()
    t.FromNanoseconds(int(seconds * 1e9))
    return t


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    # The data ends a day before now: the server's clock and the events' times agree with it.
    days = 120
    shop = make_grocery(
        n_users=250, n_items=160, n_categories=8, days=days, seed=11, start_unix=int(time.time()) - (days + 1) * DAY
    )
    files = write_shop(shop, tmp_path_factory.mktemp("grocery"), "csv")
    out = tmp_path_factory.mktemp("grocery_art")
    overrides = {k: v for k, v in SMALL_BUILD.items() if k != "repeat_policy"} | {"ladder_report": False}
    build(files["events"], files["items"], files["users"], out, BuildConfig.load(overrides=overrides), False)
    return out


def _pick(artifacts, now):
    """A customer, a staple in their top 10 now, and a durable in their top 50."""
    model = RankingModel(next(p for p in artifacts.iterdir() if p.is_dir()))
    ranker = Ranker(model)
    reoffer = np.asarray(model.item_reoffer) > 0
    for row in np.flatnonzero(np.asarray(model.user_has_history)):
        uid = str(model.users.ids[row])
        res = ranker.rank(RankQuery(user_id=uid, num_results=50, event_time=now))
        rows = model.items.lookup(res.item_ids)
        bought = set(
            model.bundle.array("user_buy_items")[
                model.bundle.array("user_buy_indptr")[row] : model.bundle.array("user_buy_indptr")[row + 1]
            ].tolist()
        )
        staples = [r for r in rows[:10] if reoffer[r] and int(r) in bought]
        durables = [r for r in rows if not reoffer[r]]
        if staples and durables:
            return uid, str(model.items.ids[staples[0]]), str(model.items.ids[durables[0]])
    raise AssertionError("no customer with a due staple and a durable on offer")


class Pod:
    def __init__(self, artifacts, workdir, events):
        self.runs = 0
        self.artifacts, self.workdir, self.events = artifacts, workdir, events
        self.start()

    def start(self):
        self.runs += 1
        run = self.workdir / f"run{self.runs}"
        run.mkdir()
        self.proc, self.ready = start_server(self.artifacts, run, event_log_dir=self.events)
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.ready['grpc_port']}")
        wait_serving(self.channel)
        self.stub = ranking_pb2_grpc.RankingServiceStub(self.channel)

    def kill9(self):
        self.channel.close()
        for pid in [*self.ready.get("worker_pids", []), self.proc.pid]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(timeout=30)

    def stop(self):
        self.channel.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)

    def rank(self, user, when, k=10, candidates=()):
        req = pb.RankRequest(user_id=user, num_results=k, candidate_item_ids=list(candidates))
        req.context.event_time.CopyFrom(_ts(when))
        return [it.item_id for it in self.stub.Rank(req, timeout=10).items]


def test_a_recorded_purchase_updates_buy_again_at_once_and_across_kill_9(bundle, tmp_path):
    now = time.time()
    user, staple, durable = _pick(bundle, now)
    pod = Pod(bundle, tmp_path, tmp_path / "events")
    try:
        assert staple in pod.rank(user, now)
        assert durable in pod.rank(user, now, k=50)
        events = [
            pb.Event(user_id=user, item_id=item, event_type="purchase", value=3.5, event_time=_ts(now))
            for item in (staple, durable)
        ]
        assert pod.stub.RecordEvents(pb.RecordEventsRequest(events=events), timeout=10).accepted_count == 2

        def check():
            later = now + 60
            top = pod.rank(user, later)
            # Just bought: no longer due, so it leaves the top; still on offer (not excluded).
            assert staple not in top
            assert pod.rank(user, later, candidates=[staple]) == [staple]
            # The durable is gone for good.
            assert durable not in pod.rank(user, later, k=50)
            assert pod.rank(user, later, candidates=[durable]) == []

        check()
        pod.kill9()
        pod.start()
        check()
    finally:
        pod.stop()
