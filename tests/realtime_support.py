"""Real-time test helpers: a restartable real server process with its own event log (or a
shared store), events in the API's form, and readings of /metrics."""

from __future__ import annotations

import os
import signal
import time
import urllib.request

import grpc
import numpy as np
from google.protobuf.timestamp_pb2 import Timestamp
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from prometheus_client.parser import text_string_to_metric_families

from one2one.v1 import ranking_pb2 as pb
from one2one.v1 import ranking_pb2_grpc
from server.demo import start_server, wait_serving

EXPERIMENTS = """
[[rules]]
name = "no_cross_sell_during_support"
when = { support_case_open = "true" }
exclude_categories = ["cat1", "cat2"]

[[rules]]
name = "email_demotes_cat0"
when = { channel = "email" }
demote_categories = ["cat0"]
demote_by = 5.0

[[experiments]]
name = "ladder"
salt = "s1"
control = "one_to_one"
arms = [
  { name = "popular", variant = "POPULAR", weight = 1 },
  { name = "one_to_one", variant = "ONE_TO_ONE", weight = 1 },
]
[experiments.target]
channels = ["web"]
"""


class Server:
    """A real `python -m server` process with its own event log, restartable on the same log."""

    def __init__(self, artifacts, workdir, fsync="always", settings: str = "", env: dict | None = None):
        self.artifacts, self.workdir, self.env = artifacts, workdir, env
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "experiments.toml").write_text(EXPERIMENTS)
        (workdir / "server.toml").write_text(
            f'[server]\nexperiments_file = "{workdir / "experiments.toml"}"\n'
            f'event_log_fsync = "{fsync}"\nreload_interval_seconds = 0\n{settings}'
        )
        self.runs = 0
        self.start()

    def start(self):
        self.runs += 1
        run_dir = self.workdir / f"run{self.runs}"
        run_dir.mkdir()
        self.proc, self.ready = start_server(
            self.artifacts,
            run_dir,
            event_log_dir=self.workdir / "events",
            extra=["--config", str(self.workdir / "server.toml")],
            env=self.env,
        )
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.ready['grpc_port']}")
        wait_serving(self.channel)
        self.stub = ranking_pb2_grpc.RankingServiceStub(self.channel)

    def kill9(self):
        """SIGKILL the supervisor and every worker: no drain, no close, no final fsync."""
        self.channel.close()
        for pid in self.ready.get("worker_pids", []):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.kill()
        self.proc.wait(timeout=30)
        for pid in self.ready.get("worker_pids", []):
            wait_gone(pid)

    def stop(self):
        self.channel.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)

    def metrics(self) -> str:
        return (
            urllib.request.urlopen(f"http://127.0.0.1:{self.ready['metrics_port']}/metrics", timeout=5).read().decode()
        )


def wait_gone(pid: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.02)
    raise AssertionError(f"process {pid} still alive after SIGKILL")


def sample(text: str, name: str, labels: dict[str, str]) -> float:
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and s.labels == labels:
                return s.value
    raise AssertionError(f"{name}{labels} not in /metrics")


def ts(seconds: float) -> Timestamp:
    t = Timestamp()
    t.FromNanoseconds(int(seconds * 1e9))
    return t


def ev(user, item, kind, value=0.0, request_id="", when=None):
    e = pb.Event(user_id=user, item_id=item, event_type=kind, value=value, request_id=request_id)
    if when is not None:
        e.event_time.CopyFrom(ts(when))
    return e


def ids(resp):
    return [it.item_id for it in resp.items]


def category_share(resp, cat_of, c):
    return float(np.mean([cat_of[i] == c for i in ids(resp)]))


def bad_request_fields(err: grpc.RpcError) -> dict[str, str]:
    """The field violations an INVALID_ARGUMENT carries (google.rpc.BadRequest), by field."""
    status = rpc_status.from_call(err)
    assert status is not None, "INVALID_ARGUMENT must carry google.rpc.Status details"
    out = {}
    for detail in status.details:
        br = error_details_pb2.BadRequest()
        assert detail.Unpack(br)
        out.update({v.field: v.description for v in br.field_violations})
    return out
