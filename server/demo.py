"""The demo `make demo` runs: start the real server on a free port, ask it to rank for a few
people, print what it answers, and shut it down gracefully."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import pyarrow.csv as pacsv
from grpc_health.v1 import health_pb2, health_pb2_grpc

from one2one.v1 import ranking_pb2, ranking_pb2_grpc


def start_server(
    artifacts: Path,
    workdir: Path,
    extra: list[str] | None = None,
    timeout: float = 60.0,
    env: dict[str, str] | None = None,
    event_log_dir: Path | None = None,
) -> tuple[subprocess.Popen, dict]:
    """Start ``python -m server`` on free ports; returns the process and its ready-file data.

    The server's event log is ``event_log_dir`` (default ``workdir/events``: every started
    server gets its own, since one log has one writer); ``env`` adds environment variables.
    """
    ready = workdir / "ready.json"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "server",
            "--artifacts",
            str(artifacts),
            "--port",
            "0",
            "--metrics-port",
            "0",
            "--ready-file",
            str(ready),
            *(extra or []),
        ],
        stderr=open(workdir / "server.log", "w"),
        env={**os.environ, "ONE2ONE_EVENT_LOG_DIR": str(event_log_dir or workdir / "events"), **(env or {})},
    )
    deadline = time.monotonic() + timeout
    while not ready.exists():
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}; see {workdir / 'server.log'}")
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"server not ready after {timeout}s; see {workdir / 'server.log'}")
        time.sleep(0.05)
    return proc, json.loads(ready.read_text())


def wait_serving(channel: grpc.Channel, timeout: float = 30.0) -> None:
    stub = health_pb2_grpc.HealthStub(channel)
    deadline = time.monotonic() + timeout
    while True:
        status = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status
        if status == health_pb2.HealthCheckResponse.SERVING:
            return
        if time.monotonic() > deadline:
            raise RuntimeError("server never became SERVING")
        time.sleep(0.1)


def realtime_demo(stub, title: dict, cats: dict) -> None:
    """RecordEvents changes the next Rank: a purchase disappears, clicks steer a new visitor."""

    def show(label, resp):
        print(f"\n== {label}: {ranking_pb2.Strategy.Name(resp.strategy)}")
        for rank, it in enumerate(resp.items, 1):
            print(f"  {rank}. {title.get(it.item_id, it.item_id)} ({cats.get(it.item_id, '')})")

    before = stub.Rank(ranking_pb2.RankRequest(user_id="1", num_results=3), timeout=5)
    bought = before.items[0].item_id
    stub.RecordEvents(
        ranking_pb2.RecordEventsRequest(
            events=[
                ranking_pb2.Event(
                    user_id="1", item_id=bought, event_type="purchase", value=12.0, request_id=before.request_id
                )
            ]
        ),
        timeout=5,
    )
    show(
        f"user 1 after buying {title.get(bought, bought)!r} (RecordEvents)",
        stub.Rank(ranking_pb2.RankRequest(user_id="1", num_results=3), timeout=5),
    )
    clicks = [ranking_pb2.Event(user_id="visitor-42", item_id=i, event_type="click") for i in ("1", "71", "95", "588")]
    resp = stub.RecordEvents(
        ranking_pb2.RecordEventsRequest(
            events=clicks + [ranking_pb2.Event(user_id="visitor-42", item_id="1", event_type="teleport")]
        ),
        timeout=5,
    )
    print(
        f"\n== RecordEvents: {resp.accepted_count} accepted, rejected: "
        + "; ".join(f"#{r.index} {r.field}: {r.reason}" for r in resp.rejections)
    )
    show(
        "anonymous visitor-42 after clicking four children's films",
        stub.Rank(ranking_pb2.RankRequest(user_id="visitor-42", num_results=5), timeout=5),
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m server.demo", description=__doc__)
    p.add_argument("--artifacts", type=Path, required=True)
    p.add_argument("--items", type=Path, required=True, help="items file, for titles")
    a = p.parse_args(argv)
    items = pacsv.read_csv(
        a.items, convert_options=pacsv.ConvertOptions(column_types={"item_id": "string"})
    ).to_pydict()
    title = dict(zip(items["item_id"], items.get("title") or items["item_id"]))
    cats = dict(zip(items["item_id"], items.get("category") or [""] * len(items["item_id"])))

    with tempfile.TemporaryDirectory() as tmp:
        # A fresh event log per demo run (in the temporary directory), so every run starts from the bundle alone.
        proc, ready = start_server(a.artifacts, Path(tmp))
        try:
            channel = grpc.insecure_channel(f"127.0.0.1:{ready['grpc_port']}")
            wait_serving(channel)
            stub = ranking_pb2_grpc.RankingServiceStub(channel)
            asks = [
                ("user 1, one-to-one", ranking_pb2.RankRequest(user_id="1", num_results=5, explain=True)),
                (
                    "user 1, only Comedy",
                    ranking_pb2.RankRequest(
                        user_id="1", num_results=5, filter=ranking_pb2.Filter(include_categories=["Comedy"])
                    ),
                ),
                ("user 405, one-to-one", ranking_pb2.RankRequest(user_id="405", num_results=5)),
                (
                    "new visitor who just looked at Star Wars and Return of the Jedi",
                    ranking_pb2.RankRequest(num_results=5, context=ranking_pb2.Context(session_item_ids=["50", "181"])),
                ),
                (
                    "new visitor, woman aged 25",
                    ranking_pb2.RankRequest(
                        num_results=5, context=ranking_pb2.Context(attributes={"gender": "F", "age": "25"})
                    ),
                ),
                ("anonymous, nothing known", ranking_pb2.RankRequest(num_results=5)),
            ]
            for label, req in asks:
                t0 = time.perf_counter()
                resp = stub.Rank(req, timeout=5)
                ms = (time.perf_counter() - t0) * 1000
                print(
                    f"\n== {label}: {ranking_pb2.Strategy.Name(resp.strategy)}"
                    f"{' (' + resp.fallback_reason + ')' if resp.fallback_reason else ''}"
                    f", model {resp.model_version}, {ms:.1f} ms"
                )
                for rank, it in enumerate(resp.items, 1):
                    why = ""
                    if it.contributions:
                        top = sorted(it.contributions.items(), key=lambda kv: -abs(kv[1]))[:2]
                        why = "  [" + ", ".join(f"{k} {v:+.2f}" for k, v in top) + "]"
                    print(
                        f"  {rank}. {title.get(it.item_id, it.item_id)} ({cats.get(it.item_id, '')})"
                        f"  score {it.score:.3f}{why}"
                    )
            realtime_demo(stub, title, cats)
            channel.close()
        finally:
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(timeout=30)
        print(f"\nserver drained and exited with code {code}")
        return 0 if code == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
