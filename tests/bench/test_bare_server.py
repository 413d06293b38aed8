"""The bench's floors: real forked workers on a real port, as the bench starts them."""

import signal
import subprocess
import sys

import grpc
import numpy as np
import pytest

from bench.run import measured_load, start
from one2one.v1 import ranking_pb2 as pb
from one2one.v1.ranking_pb2_grpc import RankingServiceStub
from ranking import Ranker, RankerConfig, RankingModel, RankQuery, Retriever, ServingModel, resolve_current


@pytest.mark.slow
def test_bare_floor_is_ready_only_when_every_worker_listens_and_answers_the_real_shape(tmp_path):
    users = tmp_path / "users.txt"
    users.write_text("u1\nu2\n")
    ready = tmp_path / "ready.json"
    proc, info, _ = start(
        [sys.executable, "-m", "bench.bare_server", "--workers", "2", "--ready-file", str(ready)],
        ready,
        tmp_path / "bare.log",
        timeout=60,
    )
    try:
        assert len(info["worker_pids"]) == 2 and info["pid"] == proc.pid
        # The load generator's first (warm-up) requests go out right after the ready file.
        r = measured_load([proc.pid, *info["worker_pids"]], info["grpc_port"], users, 4, 200, 30)
        assert r["requests"] == 200 and r["errors"] == {} and r["degraded"] == 0
        assert len(r["worker_cpu_shares"]) == 2
        # The canned answer carries no server-time trailer, so no per-request pairing.
        assert r["server"] == {} and r["outside_server"] == {}
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    assert not (tmp_path / "ready.json.tmp").exists()


def _floor(tmp_path, *args):
    ready = tmp_path / "ready.json"
    return start(
        [sys.executable, "-m", "bench.bare_server", "--workers", "1", "--ready-file", str(ready), *args],
        ready,
        tmp_path / "floor.log",
        timeout=120,
    )


def _work_floor(tmp_path, artifacts, work: str, *args):
    """A one-worker work floor on the test bundle, searching as the tests' rankers do."""
    return _floor(
        tmp_path,
        "--artifacts",
        str(artifacts),
        "--work",
        work,
        "--candidates",
        "50",
        "--effort",
        "40",
        "--exact-head-items",
        "64",
        *args,
    )


def _rank(port: int, user_id: str):
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        return RankingServiceStub(ch).Rank(pb.RankRequest(user_id=user_id, num_results=10), timeout=30)


def test_search_floor_answers_the_servers_candidate_search_for_the_user(artifacts, tmp_path):
    m = RankingModel(resolve_current(artifacts), verify=False)
    retriever = Retriever(m.index, ServingModel(m).exact_head(64))
    users = np.flatnonzero(np.asarray(m.user_has_history))[:5]
    proc, info, _ = _work_floor(tmp_path, artifacts, "search")
    try:
        for urow in users:
            slack = m.consumed.row_len(urow)
            rows, _ = retriever.search(np.asarray(m.user_factors[urow], np.float32)[None, :], 50 + slack, 40)
            got = _rank(info["grpc_port"], str(m.users.ids[urow]))
            assert [i.item_id for i in got.items] == m.items.id_of(rows[0][:10])
            assert got.model_version == m.version
        with pytest.raises(grpc.RpcError) as err:
            _rank(info["grpc_port"], "nobody-of-this-shop")
        assert err.value.code() == grpc.StatusCode.NOT_FOUND and "nobody-of-this-shop" in err.value.details()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0


def test_score_floor_answers_the_learned_scorers_top10_of_a_matrix_the_pipeline_prepared(artifacts, tmp_path):
    m = RankingModel(resolve_current(artifacts), verify=False)
    ranker = Ranker(m, RankerConfig(n_candidates=50, ann_effort=40, exact_head_items=64))
    assert ranker.scorer.kind == "trees"
    first = int(np.flatnonzero(np.asarray(m.user_has_history))[0])
    prep = ranker.prepare(RankQuery(user_id=str(m.users.ids[first])))
    top = ranker.scorer.score_topk(prep.features, prep.mask, 10)
    proc, info, _ = _work_floor(tmp_path, artifacts, "score")
    try:
        # The first request of the one worker scores the pool's first matrix (its first user's),
        # whoever asks: the floor times the scorer, it does not compute features per request.
        got = _rank(info["grpc_port"], str(m.users.ids[first + 1]))
        assert [i.item_id for i in got.items] == m.items.id_of(prep.rows[top.indices])
        assert np.allclose([i.score for i in got.items], top.scores)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0


def test_score_floor_scores_phased_as_the_server_does_when_given_its_second_phase(artifacts, tmp_path):
    m = RankingModel(resolve_current(artifacts), verify=False)
    ranker = Ranker(m, RankerConfig(n_candidates=50, ann_effort=40, exact_head_items=64))
    assert ranker.phases is not None and ranker.second_phase_source == "bundle"
    first = int(np.flatnonzero(np.asarray(m.user_has_history))[0])
    prep = ranker.prepare(RankQuery(user_id=str(m.users.ids[first])))
    # Fewer rows in the second phase than answered: the rest keep first-phase scores, so the
    # phased answer differs from the one-phase one and the test can tell which was run.
    phased = ranker.scorer.score_topk(prep.features, prep.mask, 10, n_second=3)
    one = ranker.scorer.score_topk(prep.features, prep.mask, 10)
    assert not np.allclose(phased.scores, one.scores)
    proc, info, _ = _work_floor(tmp_path, artifacts, "score", "--second-phase", "3")
    try:
        got = _rank(info["grpc_port"], str(m.users.ids[first]))
        assert [i.item_id for i in got.items] == m.items.id_of(prep.rows[phased.indices])
        assert np.allclose([i.score for i in got.items], phased.scores)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0


def test_features_floor_answers_the_servers_fused_call_on_a_request_the_pipeline_prepared(artifacts, tmp_path):
    m = RankingModel(resolve_current(artifacts), verify=False)
    ranker = Ranker(m, RankerConfig(n_candidates=50, ann_effort=40, exact_head_items=64))
    first = int(np.flatnonzero(np.asarray(m.user_has_history))[0])
    query = RankQuery(user_id=str(m.users.ids[first]))
    prep = ranker.prepare(query, fuse=True)
    assert prep.sources is not None and len(prep.rows) == 0  # merged, written and scored by the call
    ans = ranker.fill_score(prep, 10)
    # The call is the server's work after its search: its top 10 is what rank() serves.
    served = ranker.rank(query)
    assert m.items.id_of(ans.rows[ans.top.indices]) == served.item_ids
    assert np.allclose(ans.top.scores, served.scores)
    with pytest.raises(ValueError, match="prepared with fuse=True"):
        ranker.fill_score(ranker.prepare(query), 10)
    proc, info, _ = _work_floor(tmp_path, artifacts, "features")
    try:
        # The bundle has fewer users than the floor's pool: every one with history, in row
        # order, so the first request (whoever asks) is answered for the first user's request.
        got = _rank(info["grpc_port"], str(m.users.ids[first + 1]))
        assert [i.item_id for i in got.items] == served.item_ids
        assert np.allclose([i.score for i in got.items], served.scores)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0


@pytest.mark.parametrize(
    "args, message",
    [
        (["--work", "search"], "--artifacts goes with a work floor"),
        (["--artifacts", "somewhere"], "--artifacts goes with a work floor"),
        (["--work", "sort"], "invalid choice: 'sort'"),
    ],
)
def test_floor_refuses_work_without_a_bundle_and_a_bundle_without_work(tmp_path, args, message):
    done = subprocess.run(
        [sys.executable, "-m", "bench.bare_server", "--ready-file", str(tmp_path / "r.json"), *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and message in done.stderr
    assert not (tmp_path / "r.json").exists()
