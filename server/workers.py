"""Process model: parse the command line, then serve in-process or supervise forked workers.

With ``workers`` > 1 the supervisor reserves the port, loads the bundle once (no gRPC
object exists yet), and forks the workers: they share the port through SO_REUSEPORT,
the bundle's pages copy-on-write (and memory-mapped arrays through the page cache),
and write their metrics to a multiprocess directory that the supervisor alone serves
on ``/metrics``, so the counters add up across workers. SIGTERM/SIGINT/SIGHUP are
forwarded; a worker that dies unexpectedly is replaced.
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time

from server import gc_policy
from server.config import ServerConfig, allowed_cpus
from server.ready import write_ready

log = logging.getLogger("server.workers")
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
_FORWARDED = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def parse_args(argv: list[str] | None) -> ServerConfig:
    p = argparse.ArgumentParser(prog="python -m server", description="Serve the CURRENT one2one bundle over gRPC.")
    p.add_argument("--artifacts", help="artifacts directory holding the versions and CURRENT")
    p.add_argument("--port", type=int, help="gRPC port (0 picks a free one)")
    p.add_argument("--host", help="address to bind")
    p.add_argument("--metrics-port", dest="metrics_port", type=int, help="Prometheus /metrics port (-1: off)")
    p.add_argument("--workers", type=int, help="worker processes (0: one per core)")
    p.add_argument("--config", help="TOML file with a [server] table")
    p.add_argument("--ready-file", dest="ready_file", help="write {grpc_port, metrics_port, pid} here once serving")
    args = p.parse_args(argv)
    flags = {k: v for k, v in vars(args).items() if k != "config"}
    return ServerConfig.load(args.config, flags=flags)


def _reserve_port(host: str, port: int) -> socket.socket:
    """Bind (not listen) a SO_REUSEPORT socket: fixes the port for every worker, and keeps it ours."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


class GroupProcessCollector:
    """process_* metrics for the supervisor and its workers together.

    In multiprocess mode each worker's own process collector is not exported, so the
    supervisor reads /proc for the whole group: CPU seconds, resident memory and open
    file descriptors are summed; start time is the supervisor's, the fd limit the
    largest.
    """

    def __init__(self, worker_pids):
        self.worker_pids = worker_pids

    def collect(self):
        from prometheus_client import ProcessCollector
        from prometheus_client.core import Metric

        merged: dict[str, Metric] = {}
        for pid in [os.getpid(), *self.worker_pids()]:
            try:
                families = list(ProcessCollector(pid=functools.partial(int, pid), registry=None).collect())
            except OSError:
                continue  # a worker that just exited
            for fam in families:
                if fam.name not in merged:
                    merged[fam.name] = fam
                    continue
                base = merged[fam.name]
                for i, sample in enumerate(fam.samples[: len(base.samples)]):
                    old = base.samples[i]
                    if fam.name.endswith("start_time_seconds"):
                        continue
                    value = max(old.value, sample.value) if fam.name.endswith("max_fds") else old.value + sample.value
                    base.samples[i] = old._replace(value=value)
        yield from merged.values()


def _stop_with_parent(parent_pid: int) -> None:
    """Have the kernel send this worker SIGTERM when the supervisor dies.

    A supervisor killed outright (SIGKILL, the OOM killer) cannot stop its workers;
    without this they would go on serving the shared port, unsupervised and
    invisible to the supervisor's metrics, until someone found them. SIGTERM is
    blocked until the worker's handlers are in place, so it then drains cleanly.
    """
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
            log.warning("cannot ask to be stopped with the supervisor", extra={"errno": ctypes.get_errno()})
    if os.getppid() != parent_pid:  # the supervisor died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


def count_listening(ready_r: int, n_workers: int) -> int:
    """Read one byte per forked worker from the pipe each writes to once it listens; returns
    how many did, fewer when the pipe closed first (every writer gone: a worker died before
    listening). Closes ``ready_r``; the caller must have closed its own write end."""
    try:
        for done in range(n_workers):
            if not os.read(ready_r, 1):
                return done
        return n_workers
    finally:
        os.close(ready_r)


def worker_cpus(n_workers: int, allowed: list[int], pin: bool) -> list[int] | None:
    """The CPU each worker slot is pinned to, or None to leave the workers to the scheduler.

    Pinned only with exactly one worker per allowed CPU (the default ``workers``). Each
    worker then keeps its caches on one core (its interpreter, the exact head, the
    trees) instead of being moved between cores under load (the gain measured:
    bench/README.md, "pinned workers"). With fewer workers than
    CPUs a pinned worker could not use an idle core for its gRPC threads; with more,
    two workers would share a core while the scheduler could not balance them.
    """
    if not pin or n_workers < 2 or n_workers != len(allowed):
        return None
    return list(allowed)


def pin_worker(cpus: list[int] | None, slot: int) -> None:
    """In a freshly forked worker (its only thread so far, so every thread it starts
    inherits it): run on ``cpus[slot]``; nothing when :func:`worker_cpus` said None."""
    if cpus is not None:
        os.sched_setaffinity(0, {cpus[slot]})


def supervise(config: ServerConfig) -> int:
    """Fork ``config.n_workers`` workers and run until a stop signal; returns the exit code."""
    mp_dir = tempfile.mkdtemp(prefix="one2one-metrics-")
    os.environ[MULTIPROC_ENV] = mp_dir  # before prometheus_client is first imported
    from prometheus_client import CollectorRegistry, multiprocess

    from ranking import BundleError, RankingModel, ServingModel, resolve_current
    from server import logs

    # server.app (and with it server.metrics) is imported in the workers only: a metric
    # created in the supervisor would be aggregated as a live process that never serves.
    logs.setup(config.log_level)
    reserved = _reserve_port(config.host, config.port)
    port = reserved.getsockname()[1]
    reserved_health = _reserve_port(config.host, config.health_port) if config.health_port >= 0 else None
    health_port = reserved_health.getsockname()[1] if reserved_health else None
    worker_config = ServerConfig(
        **{**vars(config), "port": port, "metrics_port": -1, "ready_file": "", "health_port": health_port or -1}
    )
    t0 = time.perf_counter()
    preloaded = None
    try:
        preloaded = ServingModel(RankingModel(resolve_current(config.artifacts), verify=True))
        if config.exact_head_items > 0:
            preloaded.exact_head(config.exact_head_items)  # shared by the workers, like the index
    except (BundleError, OSError, ValueError, RuntimeError) as exc:
        # Workers keep retrying on their own; health stays NOT_SERVING until one loads.
        log.warning("no servable bundle before forking", extra={"error": str(exc)})
    load_s = time.perf_counter() - t0

    cpus = worker_cpus(config.n_workers, allowed_cpus(), config.pin_workers)
    # What every worker inherits, out of the collector's way before the fork: a full
    # collection in a worker would otherwise also write to each of these objects' pages,
    # copying them from the supervisor's (server.gc_policy).
    gc_policy.freeze()
    ready_r, ready_w = os.pipe()
    workers: dict[int, int] = {}  # pid -> slot
    supervisor_pid = os.getpid()

    def spawn(slot: int, replacing: bool = False) -> None:
        pid = os.fork()
        if pid == 0:  # the worker
            os.close(ready_r)
            code = 1
            try:
                # Held back until serve() has its handlers: a stop during start-up then
                # drains cleanly instead of killing the worker half-started.
                signal.pthread_sigmask(signal.SIG_BLOCK, _FORWARDED)
                _stop_with_parent(supervisor_pid)
                pin_worker(cpus, slot)
                from server import app, metrics

                if replacing:
                    # Counted by the new worker: the supervisor writes no metric of its own
                    # (see above), and a counter outlives the process that wrote it.
                    metrics.WORKER_REPLACEMENTS.inc()
                code = app.serve(
                    worker_config, preloaded=preloaded, reuse_port=True, on_ready=lambda _port: os.write(ready_w, b"r")
                )
            except BaseException:  # a worker must never fall back into the supervisor's code
                log.exception("worker failed", extra={"slot": slot})
            finally:
                os._exit(code)
        workers[pid] = slot

    for slot in range(config.n_workers):
        spawn(slot)
    os.close(ready_w)
    if count_listening(ready_r, config.n_workers) < config.n_workers:
        log.error("a worker exited before listening")

    metrics_port = None
    if config.metrics_port >= 0:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        registry.register(GroupProcessCollector(lambda: list(workers)))
        from server.security import start_metrics_server

        # No reload counter here: the supervisor creates no metric of its own (see above).
        metrics_port = start_metrics_server(config, registry=registry)
    log.info(
        "workers started",
        extra={
            "grpc_port": port,
            "metrics_port": metrics_port,
            "workers": len(workers),
            "cpus": cpus,
            "preload_seconds": round(load_s, 3),
        },
    )
    if config.ready_file:
        write_ready(
            config.ready_file,
            {
                "grpc_port": port,
                "metrics_port": metrics_port,
                "health_port": health_port,
                "pid": os.getpid(),
                "worker_pids": sorted(workers),
            },
        )

    stopping = False
    pending: list[int] = []
    signal.signal(signal.SIGCHLD, lambda *_: None)  # wake sigwait-less sleep below

    def forward(signum, _frame):
        nonlocal stopping
        if signum in (signal.SIGTERM, signal.SIGINT):
            stopping = True
        pending.append(signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)

    exit_code = 0
    while workers:
        while pending:
            signum = pending.pop(0)
            for pid in workers:
                try:
                    os.kill(pid, signal.SIGTERM if signum == signal.SIGINT else signum)
                except ProcessLookupError:
                    pass
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if pid == 0:
            time.sleep(0.05)
            continue
        slot = workers.pop(pid)
        code = os.waitstatus_to_exitcode(status)
        multiprocess.mark_process_dead(pid)
        if stopping:
            exit_code = exit_code or (0 if code == 0 else 1)
            continue
        log.error("worker died; replacing it", extra={"pid": pid, "slot": slot, "exit_code": code})
        spawn(slot, replacing=True)
    reserved.close()
    if reserved_health is not None:
        reserved_health.close()
    shutil.rmtree(mp_dir, ignore_errors=True)
    log.info("stopped", extra={"exit_code": exit_code})
    return exit_code


def main(argv: list[str] | None = None) -> int:
    try:
        config = parse_args(argv)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from server import logs, security

    logs.setup(config.log_level)
    problem = security.exposure_problem(config)
    if problem:
        log.error(problem, extra={"host": config.host})
        return 1
    try:
        security.check_files(config)
    except (ValueError, OSError) as exc:
        log.error("cannot start", extra={"error": str(exc)})
        return 1
    security.log_exposure(config)
    if config.n_workers > 1:
        return supervise(config)
    from ranking import RankingError
    from server import app

    try:
        return app.serve(config)
    except (OSError, ValueError, RankingError) as exc:  # e.g. an unreadable event log or experiments file
        log.error("cannot start", extra={"error": str(exc)})
        return 1
