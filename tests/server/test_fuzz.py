"""Fuzzing a real server from outside (issue 22): random and mutated valid messages for Rank,
RecordEvents and AdminService, raw garbage bytes on the port and broken HTTP/2. A fixed seed
and a fixed number of cases, so CI runs the same cases every time.

Pass: no call answers UNKNOWN or INTERNAL, none outlives its deadline, the server stays up
and answers health, and its resident memory grows by less than a bound. The figures (cases,
codes seen, RSS before and after) are printed (``pytest -s``) and written to
``$FUZZ_REPORT`` when set.
"""

from __future__ import annotations

import collections
import json
import os
import random
import signal
import socket
import struct
import time

import grpc
import h2.config
import h2.connection
import h2.exceptions
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from grpc_health.v1 import health_pb2, health_pb2_grpc
from h2_raw import grpc_frame, grpc_headers

from one2one.v1 import admin_pb2, ranking_pb2
from server.demo import start_server, wait_serving

SEED = 22
CASES = {"Rank": 700, "RecordEvents": 300, "Admin": 40, "garbage_payload": 300, "raw_tcp": 40, "broken_http2": 60}
DEADLINE = 3.0
FORBIDDEN = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL, grpc.StatusCode.DEADLINE_EXCEEDED}
RSS_BOUND_BYTES = 64 << 20
RANK = "/one2one.v1.RankingService/Rank"
EVENTS = "/one2one.v1.RankingService/RecordEvents"
ADMIN = "/one2one.v1.AdminService/"


def rss_bytes(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


class Gen:
    """Random field values that hit the edges: empty, at and past each limit, odd characters."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        # Strings drawn once (generating each afresh made the run minutes long): every length
        # around each limit, in several alphabets.
        self.texts = [
            "".join(rng.choices(alphabet, k=n))
            for n in (0, 1, 5, 63, 64, 65, 255, 256, 257, 1000, 4000)
            for alphabet in ("abc123", "\x00\t\n ", "äöü€😀\u202e", "-_./:")
        ]

    def text(self) -> str:
        return self.rng.choice(self.texts)

    def ids(self) -> list[str]:
        r = self.rng
        n = r.choice([0, 1, 3, 99, 100, 101, r.randrange(0, 12000)])
        pool = [str(r.randrange(0, 300)) for _ in range(5)] + ["", self.text()]
        return r.choices(pool, k=n)

    def number(self) -> float:
        r = self.rng
        return r.choice([0.0, -1.0, 1.5, 1e38, -1e38, float("inf"), float("nan"), r.uniform(-100, 1e6)])

    def int32(self) -> int:
        r = self.rng
        return r.choice([0, 1, -1, 10, 100, 101, 2**31 - 1, -(2**31), r.randrange(-1000, 100000)])

    def timestamp(self) -> Timestamp | None:
        r = self.rng
        if r.random() < 0.4:
            return None
        seconds = r.choice([0, -1, 10**12, -(10**12), 253_402_300_799, 253_402_300_800, int(time.time())])
        nanos = r.choice([0, -1, 10**9, 999_999_999, r.randrange(0, 10**9)])
        return Timestamp(seconds=seconds, nanos=nanos)

    def context(self) -> ranking_pb2.Context:
        r = self.rng
        ctx = ranking_pb2.Context(channel=self.text(), device=self.text(), region=self.text())
        ctx.session_item_ids.extend(self.ids()[: r.choice([0, 5, 101, 3000])])
        for _ in range(r.choice([0, 1, 64, 65, 200])):
            ctx.attributes[self.text()[:300]] = self.text()
        ts = self.timestamp()
        if ts is not None:
            ctx.event_time.CopyFrom(ts)
        return ctx

    def rank(self) -> ranking_pb2.RankRequest:
        r = self.rng
        req = ranking_pb2.RankRequest(
            user_id=r.choice([str(r.randrange(0, 400)), self.text()]),
            num_results=self.int32(),
            budget_ms=self.int32(),
            explain=r.random() < 0.3,
            variant=r.choice(["", "POPULAR", "ONE_TO_ONE_NO_CONTEXT", self.text()]),
        )
        if r.random() < 0.7:
            req.context.CopyFrom(self.context())
        req.candidate_item_ids.extend(self.ids() if r.random() < 0.3 else [])
        req.exclude_item_ids.extend(self.ids() if r.random() < 0.3 else [])
        if r.random() < 0.4:
            req.filter.include_categories.extend(self.ids()[:50])
            req.filter.exclude_categories.extend(self.ids()[:50])
            req.filter.min_price, req.filter.max_price = self.number(), self.number()
        return req

    def events(self) -> ranking_pb2.RecordEventsRequest:
        r = self.rng
        out = ranking_pb2.RecordEventsRequest()
        for _ in range(r.choice([0, 1, 3, 20, 1000, 1001])):
            odd = r.random() < 0.1  # most events plain, so big batches stay under the message limit
            ev = ranking_pb2.Event(
                user_id=self.text() if odd else f"fz{r.randrange(50)}",
                item_id=r.choice([str(r.randrange(300)), self.text()]) if odd else str(r.randrange(300)),
                event_type=r.choice(["click", "purchase", "skip", "VIEW ", self.text()]),
                value=self.number(),
                request_id=r.choice(["", self.text()]) if odd else "",
            )
            ts = self.timestamp()
            if ts is not None:
                ev.event_time.CopyFrom(ts)
            if odd and r.random() < 0.5:
                ev.context.CopyFrom(self.context())
            out.events.append(ev)
        return out

    def mutate(self, data: bytes) -> bytes:
        """Byte-level damage to a serialized message: flips, inserts, deletes, cuts, splices."""
        r = self.rng
        b = bytearray(data)
        for _ in range(r.randrange(1, 6)):
            op = r.randrange(5)
            if op == 0 and b:
                b[r.randrange(len(b))] ^= 1 << r.randrange(8)
            elif op == 1:
                b[r.randrange(len(b) + 1) : 0] = bytes(r.randrange(256) for _ in range(r.randrange(1, 12)))
            elif op == 2 and b:
                i = r.randrange(len(b))
                del b[i : i + r.randrange(1, 16)]
            elif op == 3 and b:
                del b[r.randrange(len(b)) :]
            else:
                b += bytes([r.choice([0x0A, 0x12, 0x1A, 0x22]), 0xFF, 0xFF, 0xFF, 0xFF, 0x0F])
        return bytes(b)


def raw_tcp(port: int, rng: random.Random) -> None:
    """Garbage bytes on the port: random, a truncated preface, HTTP/1.1, a TLS ClientHello start."""
    payloads = [
        bytes(rng.randrange(256) for _ in range(rng.randrange(1, 4096))),
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"[: rng.randrange(1, 24)],
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(rng.randrange(256) for _ in range(64)),
    ]
    with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE) as s:
        s.sendall(rng.choice(payloads))
        try:
            s.recv(4096)
        except (TimeoutError, ConnectionResetError):
            pass


def broken_http2(port: int, rng: random.Random) -> None:
    """A real preface and SETTINGS, then frames a conforming client never sends."""
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, validate_outbound_headers=False))
    conn.initiate_connection()
    head = conn.data_to_send()
    kind = rng.randrange(6)

    def frame(ftype: int, flags: int, sid: int, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload))[1:] + bytes([ftype, flags]) + struct.pack(">I", sid) + payload

    if kind == 0:  # DATA on a stream that was never opened
        tail = frame(0x0, 0x1, 1, grpc_frame(b"\x0a\x01x"))
    elif kind == 1:  # HEADERS whose HPACK block is garbage
        tail = frame(0x1, 0x4 | 0x1, 1, bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64))))
    elif kind == 2:  # a frame claiming 16 MB, then nothing
        tail = struct.pack(">I", 1 << 24)[1:] + b"\x00\x00\x00\x00\x00\x01"
    elif kind == 3:  # a valid call whose gRPC prefix announces 4 GB
        conn.send_headers(1, grpc_headers(RANK))
        conn.send_data(1, b"\x00\xff\xff\xff\xff" + b"x" * 10, end_stream=True)
        tail = b""
    elif kind == 4:  # window update of 0 and an unknown frame type, then RST of an idle stream
        tail = frame(0x8, 0, 0, b"\x00\x00\x00\x00") + frame(0xEE, 0, 0, b"zz") + frame(0x3, 0, 7, b"\x00\x00\x00\x08")
    else:  # a call with a compressed-flag message while no compression was negotiated
        conn.send_headers(1, grpc_headers(RANK))
        conn.send_data(1, b"\x01" + struct.pack(">I", 3) + b"abc", end_stream=True)
        tail = b""
    with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE) as s:
        s.sendall(head + conn.data_to_send() + tail)
        try:
            s.recv(65536)
        except (TimeoutError, ConnectionResetError):
            pass


@pytest.mark.slow
def test_fuzz_never_crashes_never_unknown_or_internal_and_memory_stays_bounded(artifacts, tmp_path):
    (tmp_path / "server.toml").write_text("[server]\nworkers = 1\nreload_interval_seconds = 0\n")
    proc, ready = start_server(artifacts, tmp_path, extra=["--config", str(tmp_path / "server.toml")])
    rng = random.Random(SEED)
    gen = Gen(rng)
    codes: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    bad: list[str] = []
    t0 = time.monotonic()
    try:
        channel = grpc.insecure_channel(
            f"127.0.0.1:{ready['grpc_port']}", options=[("grpc.max_send_message_length", 8 << 20)]
        )
        wait_serving(channel)
        raw = {
            path: channel.unary_unary(path, request_serializer=None, response_deserializer=None)
            for path in (RANK, EVENTS, ADMIN + "ReloadBundle", ADMIN + "GetStatus")
        }

        def call(kind: str, path: str, payload: bytes) -> None:
            started = time.monotonic()
            try:
                raw[path](payload, timeout=DEADLINE)
                code = grpc.StatusCode.OK
            except grpc.RpcError as exc:
                code = exc.code()
                if code in FORBIDDEN:
                    bad.append(f"{kind} {path}: {code.name} {exc.details()!r} payload={payload[:80]!r}")
            if time.monotonic() - started > DEADLINE + 1.0:
                bad.append(f"{kind} {path}: answered after {time.monotonic() - started:.1f} s")
            codes[kind][code.name] += 1

        # Warm up with valid calls, then measure where memory starts.
        for i in range(50):
            call("warmup", RANK, ranking_pb2.RankRequest(user_id=str(i)).SerializeToString())
        rss_before = rss_bytes(proc.pid)

        for _ in range(CASES["Rank"]):
            data = gen.rank().SerializeToString()
            call("Rank", RANK, gen.mutate(data) if rng.random() < 0.4 else data)
        for _ in range(CASES["RecordEvents"]):
            data = gen.events().SerializeToString()
            call("RecordEvents", EVENTS, gen.mutate(data) if rng.random() < 0.4 else data)
        for _ in range(CASES["Admin"]):
            method = rng.choice(["GetStatus", "ReloadBundle"])
            msg = admin_pb2.GetStatusRequest() if method == "GetStatus" else admin_pb2.ReloadBundleRequest()
            data = msg.SerializeToString() if rng.random() < 0.5 else gen.mutate(b"\x0a\x03abc")
            call("Admin", ADMIN + method, data)
        for _ in range(CASES["garbage_payload"]):
            data = bytes(rng.randrange(256) for _ in range(rng.choice([1, 7, 100, 5000, rng.randrange(1, 2000)])))
            call("garbage_payload", rng.choice([RANK, EVENTS, ADMIN + "GetStatus"]), data)
        for _ in range(CASES["raw_tcp"]):
            raw_tcp(ready["grpc_port"], rng)
            codes["raw_tcp"]["sent"] += 1
        for _ in range(CASES["broken_http2"]):
            broken_http2(ready["grpc_port"], rng)
            codes["broken_http2"]["sent"] += 1

        # Still alive and answering, on this channel and on a new one.
        assert proc.poll() is None, "the server died"
        health = health_pb2_grpc.HealthStub(channel)
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == health_pb2.HealthCheckResponse.SERVING
        for i in range(50):
            call("after", RANK, ranking_pb2.RankRequest(user_id=str(i)).SerializeToString())
        assert codes["after"] == {"OK": 50}
        rss_after = rss_bytes(proc.pid)
        channel.close()
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)
    report = {
        "seed": SEED,
        "cases": dict(CASES),
        "total_cases": sum(CASES.values()),
        "codes": {k: dict(v) for k, v in codes.items()},
        "rss_before_bytes": rss_before,
        "rss_after_bytes": rss_after,
        "rss_delta_bytes": rss_after - rss_before,
        "seconds": round(time.monotonic() - t0, 1),
        "failures": bad,
    }
    print("\nfuzz report:", json.dumps(report, indent=1))
    if os.environ.get("FUZZ_REPORT"):
        with open(os.environ["FUZZ_REPORT"], "w") as fh:
            json.dump(report, fh, indent=1)
    assert proc.returncode == 0, f"the server exited with {proc.returncode} on SIGTERM"
    assert not bad, "\n".join(bad[:20])
    assert rss_after - rss_before < RSS_BOUND_BYTES, report
