"""Helpers for the operations tests: system tools, a real Prometheus, bounded Rank load."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import grpc
import pytest

from one2one.v1 import ranking_pb2 as pb
from one2one.v1 import ranking_pb2_grpc
from ranking import MANIFEST, set_current

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"


def require_tool(name: str) -> str:
    """Path of a system tool; skips locally when missing, fails under CI=true.

    CI installs Debian's ``prometheus`` package (``make deps-system``), so a missing
    tool there is a broken setup, not a reason to skip.
    """
    path = shutil.which(name)
    if path:
        return path
    message = f"{name} not found on PATH; `make deps-system` installs it (Debian package prometheus)"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def publish_copy(src: Path, root: Path, version: str, mutate=None) -> Path:
    """Publish a copy of version directory ``src`` under ``root`` as ``version``, the way the
    builder does: write under a hidden name, rename into place, then swap CURRENT."""
    tmp = root / f".tmp-{version}"
    shutil.copytree(src, tmp)
    manifest = json.loads((tmp / MANIFEST).read_text())
    manifest["version"] = version
    (tmp / MANIFEST).write_text(json.dumps(manifest))
    if mutate:
        mutate(tmp)
    os.rename(tmp, root / version)
    set_current(root, version)
    return root / version


def corrupt_an_array(path: Path) -> None:
    target = path / "item_popularity.npy"
    data = bytearray(target.read_bytes())
    data[-1] ^= 0xFF
    target.write_bytes(data)


def future_schema(path: Path) -> None:
    manifest = json.loads((path / MANIFEST).read_text())
    manifest["schema_version"] = 999
    (path / MANIFEST).write_text(json.dumps(manifest))


def write_config(path: Path, **settings) -> list[str]:
    lines = ["[server]"] + [f"{k} = {json.dumps(v)}" for k, v in settings.items()]
    path.write_text("\n".join(lines) + "\n")
    return ["--config", str(path)]


def start_one_process(artifacts: Path, workdir: Path, extra: list[str] | None = None):
    """``server.demo.start_server`` pinned to one serving process (``ONE2ONE_WORKERS=1``).

    These tests assert exact per-process counts (one reload, one refusal) and call the
    admin RPC of the one process that reloads; a build without worker processes ignores
    the variable (unknown ONE2ONE_* names are not settings).
    """
    from server.demo import start_server

    saved = os.environ.get("ONE2ONE_WORKERS")
    os.environ["ONE2ONE_WORKERS"] = "1"
    try:
        return start_server(artifacts, workdir, extra)
    finally:
        if saved is None:
            del os.environ["ONE2ONE_WORKERS"]
        else:
            os.environ["ONE2ONE_WORKERS"] = saved


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(metrics_port: int) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()


def sample(text: str, name: str, default: float | None = None) -> float:
    """The value of one exposition line, e.g. ``one2one_serving`` or ``x_total{a="b"}``."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    if default is not None:
        return default
    raise AssertionError(f"{name} not in /metrics")


def wait_for(predicate, timeout: float = 30.0, what: str = "condition", every: float = 0.1):
    """Poll ``predicate`` until it returns something truthy; fail with ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(every)


class Prometheus:
    """A real ``prometheus`` on 127.0.0.1 with its own storage, scraping ``targets`` every second.

    Parameters
    ----------
    workdir : Path
        Holds the config and the TSDB; removed with the test's tmp_path.
    targets : dict
        ``job -> ["127.0.0.1:port", ...]``.
    rule_files : list of Path
        Rule files to load (evaluated every second here).
    """

    def __init__(self, workdir: Path, targets: dict[str, list[str]], rule_files: list[Path] = ()):
        binary = require_tool("prometheus")
        self.port = free_port()
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        jobs = [
            {
                "job_name": job,
                "scrape_interval": "1s",
                "scrape_timeout": "900ms",
                "static_configs": [{"targets": addrs}],
            }
            for job, addrs in targets.items()
        ]
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(p) for p in rule_files],
            "scrape_configs": jobs,
        }
        cfg = workdir / "prometheus.yml"
        cfg.write_text(json.dumps(config))  # JSON is YAML
        self.log = open(workdir / "prometheus.log", "w")
        self.proc = subprocess.Popen(
            [
                binary,
                f"--config.file={cfg}",
                f"--storage.tsdb.path={workdir / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--storage.tsdb.retention.time=1h",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        wait_for(self._ready, 60, "prometheus to be ready")

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(
                f"prometheus exited with {self.proc.returncode}: "
                f"{(self.workdir / 'prometheus.log').read_text()[-2000:]}"
            )
        try:
            return urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=2).status == 200
        except OSError:
            return False

    def api(self, path: str, **params) -> dict:
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        try:
            body = urllib.request.urlopen(url, timeout=30).read()
        except urllib.error.HTTPError as exc:  # 400/422 carry the PromQL error in the body
            body = exc.read()
        return json.loads(body)

    def wait_targets_up(self, n: int, timeout: float = 60.0) -> None:
        """Wait for ``n`` targets to have been scraped successfully (Prometheus applies new
        targets a few seconds after it starts)."""

        def up():
            targets = self.api("targets")["data"]["activeTargets"]
            return len(targets) == n and all(t["health"] == "up" for t in targets)

        wait_for(up, timeout, f"{n} scrape targets to be up", every=0.25)

    def query(self, expr: str) -> dict:
        """``/api/v1/query`` at now: ``{"status", "data"|"error", ...}``."""
        return self.api("query", query=expr)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


class RankLoad:
    """A small, bounded Rank load from a few client threads, recording every outcome.

    Parameters
    ----------
    target : str
        ``host:port`` of the gRPC server.
    requests : list of RankRequest
        Sent round-robin.
    threads : int
        Concurrent clients.
    pause : float
        Seconds each client waits between calls (0: none).
    max_requests : int
        Hard cap on the number of calls, so a test's load is bounded whatever happens.
    metadata : tuple of (key, value), optional
        Sent with every call (e.g. ``authorization``).
    """

    def __init__(
        self,
        target: str,
        requests: list[pb.RankRequest],
        threads: int = 3,
        max_requests: int = 20000,
        timeout: float = 10.0,
        pause: float = 0.0,
        metadata: tuple[tuple[str, str], ...] = (),
    ):
        self.channel = grpc.insecure_channel(target)
        self.metadata = metadata
        self.stub = ranking_pb2_grpc.RankingServiceStub(self.channel)
        self.requests = requests
        self.timeout = timeout
        self.pause = pause
        self.max_requests = max_requests
        self.lock = threading.Lock()
        self.sent = 0
        self.outcomes: list[tuple[float, float, str, str]] = []  # (start, seconds, code, model_version)
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]

    def _next(self, i: int) -> pb.RankRequest | None:
        with self.lock:
            if self.sent >= self.max_requests:
                return None
            self.sent += 1
            return self.requests[(self.sent + i) % len(self.requests)]

    def _run(self, i: int) -> None:
        while not self._stop.is_set():
            req = self._next(i)
            if req is None:
                return
            t0 = time.monotonic()
            try:
                resp = self.stub.Rank(req, timeout=self.timeout, metadata=self.metadata)
                code, version = "OK", resp.model_version
            except grpc.RpcError as exc:
                code, version = exc.code().name, ""
            with self.lock:
                self.outcomes.append((t0, time.monotonic() - t0, code, version))
            if self.pause:
                self._stop.wait(self.pause)

    def __enter__(self) -> RankLoad:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=60)
        self.channel.close()

    def snapshot(self) -> list[tuple[float, float, str, str]]:
        with self.lock:
            return list(self.outcomes)


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (no interpolation), ``q`` in [0, 100]."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, round(q / 100.0 * len(ordered) + 0.5) - 1))
    return ordered[k]
