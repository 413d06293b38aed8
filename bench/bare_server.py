"""The floors: a RankingService doing only part of what a Rank request needs.

``--work framework`` (the framework floor) answers a canned response of the real shape.
With a bundle (``--artifacts``) three work floors do the work of a Rank, one part more at
each, and nothing around it (no budget, rules, real-time state, metrics or logs):

- ``search``: the request's user vector and the same candidate search the server runs
  for it (exact head first, then the ANN index; as many candidates, the same effort);
  it answers the first 10 candidates;
- ``score``: that search, then the bundle's scorer (the learned trees) over a feature
  matrix the size of a served request's, taken in turn from matrices the real pipeline
  computed at start-up for users of the bundle (the features themselves are not
  computed per request); it answers that matrix's top 10. It scores as the server does:
  phased (the first phase over every candidate, the full model over the best
  ``--second-phase``) when the bundle records phases and the second phase is on.
- ``features``: that search, then the one compiled call the server makes after its
  search (``Ranker.fill_score``: the candidate sources merged, the exclusions applied,
  every candidate's feature row written and scored, the top 10 kept) on requests the
  pipeline prepared at start-up for users of the bundle, taken in turn. More of them than
  the score floor's matrices (``FEATURE_POOL_USERS``), drawn across the bundle's users, so
  that the per-customer rows the call reads (history, co-visitation and EASE rows, the
  customer's tables) are as far from the cache as a live request's.
  Between this floor and the score floor: what computing the features costs; between it
  and the server, the Python service around the work (resolving the request and its rung,
  real-time state, rules, budget, metrics, logs, the response).

``--effort 0`` and ``--second-phase -1`` take the bundle's own choices, as the server does;
the bench passes the values the server it compares with reports, so both do the same work.

Same process model as the real server (forked workers sharing the port through
SO_REUSEPORT, pinned to their CPUs by the same rule, the same thread pool; a bundle is
loaded before the fork, as the server's supervisor does), so the difference in
throughput between two floors is what the work added between them costs, and between
the last floor and the server, what the service around that work costs.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
from pathlib import Path

from server.config import ServerConfig, allowed_cpus
from server.ready import write_ready
from server.workers import count_listening, pin_worker, worker_cpus

WORK = ("framework", "search", "score", "features")
POOL_USERS = 64  # feature matrices prepared at start-up for the "score" floor
# Requests prepared at start-up for the "features" floor, drawn across the bundle's users.
FEATURE_POOL_USERS = 1024


class Work:
    """The search (and scoring) of one Rank request on a loaded bundle, as the server does it.

    Parameters
    ----------
    artifacts : Path
        A bundle root with ``CURRENT``.
    level : str
        "search", "score" or "features".
    n_candidates, effort, head_items : int
        The server's ``n_candidates``, ``ann_effort`` (0: the bundle's) and ``exact_head_items``.
    batch_size, batch_wait_us : int, float
        The server's ``ann_batch_size`` and ``ann_batch_wait_us``: concurrent requests'
        searches micro-batched as the server's are.
    second_phase : int
        The server's ``second_phase_candidates`` (-1: the bundle's; 0: one phase).
    """

    def __init__(
        self,
        artifacts: Path,
        level: str,
        n_candidates: int,
        effort: int,
        head_items: int,
        batch_size: int = 1,
        batch_wait_us: float = 0.0,
        second_phase: int = -1,
    ):
        import numpy as np

        from ranking import Ranker, RankerConfig, RankingModel, RankQuery, resolve_current

        m = RankingModel(resolve_current(artifacts), verify=False)
        # The server's own pipeline object: its search (retriever and micro-batcher) serves
        # both floors, and its prepare() makes the score floor's matrices.
        self.ranker = Ranker(
            m,
            RankerConfig(
                n_candidates=n_candidates,
                ann_effort=effort,
                exact_head_items=head_items,
                ann_batch_size=batch_size,
                ann_batch_wait_us=batch_wait_us,
                second_phase_candidates=second_phase,
            ),
        )
        self.model, self.level = m, level
        self.pool: list[tuple] = []
        self.prepared: list = []
        if level == "features":
            rows = np.flatnonzero(np.asarray(m.user_has_history))
            if len(rows) > FEATURE_POOL_USERS:
                rows = np.random.default_rng(0).choice(rows, FEATURE_POOL_USERS, replace=False)
            for row in rows:
                prep = self.ranker.prepare(RankQuery(user_id=str(m.users.ids[row])), fuse=True)
                if prep.sources is not None:  # a rung the call serves (not the cheapest path)
                    self.prepared.append(prep)
            if not self.prepared:
                raise SystemExit(f"{artifacts}: no user with history to prepare requests from")
        if level == "score":
            for row in np.flatnonzero(np.asarray(m.user_has_history))[:POOL_USERS]:
                prep = self.ranker.prepare(RankQuery(user_id=str(m.users.ids[row])))
                self.pool.append((prep.rows, prep.mask, prep.features))
            if not self.pool:
                raise SystemExit(f"{artifacts}: no user with history to prepare feature matrices from")
        self.served = 0

    def answer(self, user_id: str) -> tuple[list[str], list[float]]:
        """Item ids and scores of the top 10 for ``user_id``."""
        import numpy as np

        m, cfg = self.model, self.ranker.config
        urow = m.users.row(user_id)
        if urow < 0:
            raise KeyError(user_id)
        slack = min(m.consumed.row_len(urow), cfg.max_consumed_slack)
        rows, _ = self.ranker.ann.search(
            np.asarray(m.user_factors[urow], dtype=np.float32), cfg.n_candidates + slack, self.ranker.ann_effort
        )
        if self.level == "search":
            first = rows[rows >= 0][:10]
            return m.items.id_of(first), [1.0 - i / 10 for i in range(len(first))]
        if self.level == "features":
            prep = self.prepared[self.served % len(self.prepared)]
            self.served += 1  # racy between threads, as below
            ans = self.ranker.fill_score(prep, 10)
            return m.items.id_of(ans.rows[ans.top.indices]), [float(s) for s in ans.top.scores]
        cands, mask, feats = self.pool[self.served % len(self.pool)]
        self.served += 1  # racy between threads; any matrix of the pool will do
        # The server's scoring call without a deadline: phased when its ranker is.
        top = self.ranker.scorer.score_topk(feats, mask, 10, n_second=self.ranker.second_phase_candidates)
        return m.items.id_of(cands[top.indices]), [float(s) for s in top.scores]


def serve_one(port: int, max_workers: int, listening: int, work: Work | None = None) -> None:
    """Serve in this (forked) process; one byte on the pipe ``listening`` once the port is open."""
    import grpc

    from one2one.v1 import ranking_pb2 as pb
    from one2one.v1 import ranking_pb2_grpc
    from server.app import request_executor

    canned = pb.RankResponse(
        items=[pb.RankedItem(item_id=f"item{i:07d}", score=1.0 - i / 10) for i in range(10)],
        request_id="0" * 32,
        model_version="bare",
        strategy=pb.ONE_TO_ONE,
    )

    class Bare(ranking_pb2_grpc.RankingServiceServicer):
        def Rank(self, request, context):
            if work is None:
                return canned
            try:
                ids, scores = work.answer(request.user_id)
            except KeyError:
                context.abort(grpc.StatusCode.NOT_FOUND, f"user_id {request.user_id!r} is not in the bundle")
            return pb.RankResponse(
                items=[pb.RankedItem(item_id=i, score=s) for i, s in zip(ids, scores)],
                request_id="0" * 32,
                model_version=work.model.version,
                strategy=pb.ONE_TO_ONE,
            )

    # The server's RPC threads: each runs FAISS on one OpenMP thread (the setting is per thread).
    server = grpc.server(request_executor(max_workers), options=[("grpc.so_reuseport", 1)])
    ranking_pb2_grpc.add_RankingServiceServicer_to_server(Bare(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    os.write(listening, b"1")
    os.close(listening)
    signal.signal(signal.SIGTERM, lambda *_: server.stop(1))
    server.wait_for_termination()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.bare_server", description=__doc__)
    p.add_argument("--workers", type=int, default=len(allowed_cpus()))
    p.add_argument("--max-workers", type=int, default=16, help="threads per process, as the real server")
    p.add_argument("--ready-file", required=True)
    p.add_argument("--work", choices=WORK, default="framework", help="what each request does (module docstring)")
    p.add_argument("--artifacts", type=Path, help="bundle root, for --work search, score or features")
    p.add_argument("--candidates", type=int, default=ServerConfig.n_candidates, help="the server's n_candidates")
    p.add_argument(
        "--effort", type=int, default=ServerConfig.ann_effort, help="the server's ann_effort (0: the bundle's)"
    )
    p.add_argument(
        "--second-phase",
        type=int,
        default=ServerConfig.second_phase_candidates,
        help="the server's second_phase_candidates (-1: the bundle's; 0: one phase)",
    )
    p.add_argument(
        "--exact-head-items", type=int, default=ServerConfig.exact_head_items, help="the server's exact_head_items"
    )
    p.add_argument(
        "--ann-batch-size", type=int, default=ServerConfig.ann_batch_size, help="the server's ann_batch_size"
    )
    p.add_argument(
        "--ann-batch-wait-us", type=float, default=ServerConfig.ann_batch_wait_us, help="the server's ann_batch_wait_us"
    )
    a = p.parse_args(argv)
    if (a.work == "framework") != (a.artifacts is None):
        p.error("--artifacts goes with a work floor (--work search, score or features), and only with one")
    work = (
        Work(
            a.artifacts,
            a.work,
            a.candidates,
            a.effort,
            a.exact_head_items,
            a.ann_batch_size,
            a.ann_batch_wait_us,
            a.second_phase,
        )
        if a.artifacts
        else None
    )
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    pids = []
    cpus = worker_cpus(a.workers, allowed_cpus(), pin=True)
    readable, writable = os.pipe()
    for slot in range(a.workers):
        pid = os.fork()
        if pid == 0:
            try:
                os.close(readable)
                pin_worker(cpus, slot)
                serve_one(port, a.max_workers, writable, work)
            finally:
                os._exit(0)
        pids.append(pid)
    os.close(writable)

    def stop(*_):
        for pid in pids:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:  # exited already
                pass

    signal.signal(signal.SIGTERM, stop)
    started = count_listening(readable, a.workers)
    if started < a.workers:
        stop()
        raise SystemExit(f"a bare worker exited before listening ({started} of {a.workers} started)")
    write_ready(a.ready_file, {"grpc_port": port, "pid": os.getpid(), "worker_pids": pids})
    for pid in pids:
        os.waitpid(pid, 0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
