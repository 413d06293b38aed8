"""Server assembly and lifecycle: create_server, serve (health, metrics, hot reload, drain), main.

Lifecycle, in order: bind and start; health NOT_SERVING until a bundle is loaded;
the loop reloads when ``CURRENT`` changes (polled every ``reload_interval_seconds``),
on SIGHUP, or on ``AdminService.ReloadBundle``, always off the request path; SIGTERM
or SIGINT turns health NOT_SERVING, keeps serving for ``drain_notice_seconds`` so
load balancers move away, stops accepting, lets in-flight requests finish for up to
``drain_seconds`` and returns 0.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from one2one.v1 import admin_pb2, admin_pb2_grpc, ranking_pb2, ranking_pb2_grpc
from server import gc_policy, metrics, security
from server.admin import AdminServicer
from server.config import ServerConfig
from server.guard import GuardInterceptor
from server.interceptors import CallInterceptor
from server.model_manager import ModelManager
from server.ready import write_ready
from server.realtime import Realtime
from server.servicer import RankingServicer
from server.shedding import CountedPool, LoadShedder
from server.stall_guard import StallGuard

log = logging.getLogger("server")
SERVICE_NAME = ranking_pb2.DESCRIPTOR.services_by_name["RankingService"].full_name
ADMIN_SERVICE_NAME = admin_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name
# Health service name for liveness probes: SERVING while the process answers at all, even
# before its first bundle, so an orchestrator restarts hung processes, not waiting ones.
# "" and RankingService say whether Rank can answer (readiness).
LIVENESS_SERVICE = "liveness"
# How often the serve loop looks at its signal flags: the delay before a SIGTERM or
# SIGHUP is acted on.
_TICK_SECONDS = 0.05


def one_openmp_thread() -> None:
    """One OpenMP thread per query for the calling thread: requests, not threads, use the cores.

    ``omp_set_num_threads`` sets the calling thread's own value: a thread that never
    called it (every gRPC handler thread) searches with one OpenMP thread per core. That
    made a 16k-item flat search 1.8x slower alone, and under load its spinning helper
    threads took the core another worker needed. So every request thread calls this first.
    """
    import faiss

    faiss.omp_set_num_threads(1)


def request_executor(
    max_workers: int, name: str = "rpc", stall_guard: StallGuard | None = None
) -> futures.ThreadPoolExecutor:
    """Threads that handle RPCs, each set to one OpenMP thread before its first request; with a
    ``stall_guard``, a call whose request stalls is cancelled rather than holding its thread."""
    if stall_guard is not None:
        return stall_guard.executor(max_workers, name, initializer=one_openmp_thread)
    return futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix=name, initializer=one_openmp_thread)


def call_handling(config: ServerConfig) -> tuple[futures.ThreadPoolExecutor, list[grpc.ServerInterceptor]]:
    """The server's default handler pool and its interceptors: every call timed and counted
    (server.interceptors), its caller checked and its pool chosen with room (server.guard).

    Rank runs on its own few threads, taking calls in arrival order; health, reflection,
    admin and RecordEvents on the server's pool, so no stream or slow call holds up Rank and
    no burst of Rank calls holds up a health check (docs/operations.md, "Processes").
    Refused and shed calls are answered on two threads of their own, never behind the work
    they refuse. A client whose request never finishes arriving would hold its handler
    thread for as long as its connection lives (server.stall_guard): all three pools are the
    stall guard's, and the shedder counts calls on those very pools, so a stalled call is
    cancelled after ``request_read_timeout_seconds`` wherever the guard sent it, and its
    room is given back.

    Raises
    ------
    ValueError, OSError
        The callers file is missing or invalid.
    """
    stalls = StallGuard(config.request_read_timeout_seconds, on_cancel=metrics.RPC_STALLED.inc)
    server_pool = request_executor(config.max_workers, stall_guard=stalls)
    rank_pool = request_executor(config.rank_threads, "rank", stalls) if config.rank_threads else server_pool
    refusal_pool = stalls.executor(2, "refuse")
    return server_pool, [CallInterceptor(), make_guard(config, server_pool, rank_pool, refusal_pool)]


def create_server(
    config: ServerConfig, models: ModelManager, reuse_port: bool = False, realtime: Realtime | None = None
) -> tuple[grpc.Server, int, health.HealthServicer]:
    """A gRPC server with the ranking, admin, health (and, if configured, reflection) services,
    behind the guard (server.guard), bound but not started.

    Health starts NOT_SERVING; :func:`serve` turns it SERVING once a bundle is loaded.

    Returns
    -------
    (server, port, health_servicer)
        ``port`` is the bound port (useful with ``port=0``).
    """
    options = [
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.max_send_message_length", config.max_message_bytes),
        # Worker processes share one port; a lone server refuses to share it by mistake.
        ("grpc.so_reuseport", 1 if reuse_port else 0),
    ]
    if config.max_connection_age_seconds > 0:
        # The kernel assigns each new connection to a worker process (SO_REUSEPORT), and a
        # client's channel keeps one connection for as long as it lives: without an age,
        # a client stays on the worker (and the pod) it first reached. Past this age
        # (gRPC adds ±10% jitter) the client is sent GOAWAY and reconnects; calls in
        # flight on the old connection get drain_seconds to finish.
        options += [
            ("grpc.max_connection_age_ms", int(config.max_connection_age_seconds * 1000)),
            ("grpc.max_connection_age_grace_ms", int(config.drain_seconds * 1000)),
        ]
    server_pool, interceptors = call_handling(config)
    server = grpc.server(server_pool, interceptors=interceptors, options=options)
    ranking_pb2_grpc.add_RankingServiceServicer_to_server(RankingServicer(models, config, realtime), server)
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    health_servicer.set(LIVENESS_SERVICE, health_pb2.HealthCheckResponse.SERVING)
    admin_pb2_grpc.add_AdminServiceServicer_to_server(
        AdminServicer(models, on_loaded=lambda: _set_serving(health_servicer, True)), server
    )
    if config.reflection:
        reflection.enable_server_reflection(
            (SERVICE_NAME, ADMIN_SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )
    address = f"{config.host}:{config.port}"
    if config.tls_enabled:
        port = server.add_secure_port(address, security.grpc_server_credentials(config, _count_file_reload))
    else:
        port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot bind {address}")
    return server, port, health_servicer


def create_probe_server(
    config: ServerConfig, health_servicer: health.HealthServicer, reuse_port: bool = False
) -> tuple[grpc.Server, int] | None:
    """The plaintext health-only server on ``health_port`` (None when it is -1), bound, not started.

    The kubelet's gRPC probe speaks neither TLS nor tokens; this port shows it the same
    health answers as the main port and nothing else.
    """
    if config.health_port < 0:
        return None
    # Its two threads are guarded against stalled requests like the main port's.
    stalls = StallGuard(config.request_read_timeout_seconds, on_cancel=metrics.RPC_STALLED.inc)
    probe = grpc.server(stalls.executor(2, "probe"), options=[("grpc.so_reuseport", 1 if reuse_port else 0)])
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, probe)
    port = probe.add_insecure_port(f"{config.host}:{config.health_port}")
    if port == 0:
        raise OSError(f"cannot bind {config.host}:{config.health_port} (health_port)")
    return probe, port


def _count_file_reload(kind: str, result: str) -> None:
    metrics.SECURITY_FILE_RELOADS.labels(kind, result).inc()


def make_guard(
    config: ServerConfig,
    server_pool: futures.ThreadPoolExecutor,
    rank_pool: futures.ThreadPoolExecutor,
    refusal_pool: futures.ThreadPoolExecutor,
) -> GuardInterceptor:
    """The interceptor that checks callers and sheds load, with a counted pool per role (views
    of ``server_pool`` and ``rank_pool``: the shedder counts calls on the very threads, stall
    guard included, that run them), refusing on ``refusal_pool``.

    Raises
    ------
    ValueError, OSError
        The callers file is missing or invalid.
    """
    roles = ("rank", "events", "admin", "other")
    pools = {role: CountedPool(rank_pool if role == "rank" else server_pool) for role in roles}
    shedder = LoadShedder(pools, config.max_concurrent_calls, config.role_limits(), config.max_queued_ranks)
    callers = security.Callers(config.auth_tokens_file, _count_file_reload) if config.auth_tokens_file else None
    metrics.init_security_label_sets(auth=callers is not None or config.require_client_auth)
    return GuardInterceptor(
        callers,
        certificates=config.require_client_auth,
        shedder=shedder,
        refusal_pool=refusal_pool,
        count_refusal=lambda method, reason: metrics.AUTH_REFUSALS.labels(method, reason).inc(),
        count_shed=lambda method, reason: metrics.RPC_SHED.labels(method, reason).inc(),
    )


def _set_serving(health_servicer: health.HealthServicer, serving: bool) -> None:
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, status)


def _in_flight() -> int:
    return int(sum(s.value for fam in metrics.RPC_IN_FLIGHT.collect() for s in fam.samples))


def drain(server: grpc.Server, health_servicer: health.HealthServicer, config: ServerConfig) -> None:
    """Health NOT_SERVING, a notice period still serving, stop accepting, wait for in-flight calls.

    Calls still running after ``drain_seconds`` are cancelled; the process exits 0 either way,
    because a drain that hit its deadline is an orderly shutdown, not a crash.
    """
    log.info(
        "draining",
        extra={
            "notice_seconds": config.drain_notice_seconds,
            "grace_seconds": config.drain_seconds,
            "in_flight": _in_flight(),
        },
    )
    metrics.SERVING.set(0)
    health_servicer.enter_graceful_shutdown()  # NOT_SERVING for every service, and it stays so
    if config.drain_notice_seconds > 0:
        time.sleep(config.drain_notice_seconds)
    done = server.stop(grace=config.drain_seconds)
    t0 = time.monotonic()
    done.wait()
    log.info("stopped", extra={"drain_seconds": round(time.monotonic() - t0, 3), "in_flight": _in_flight()})


def serve(config: ServerConfig, preloaded=None, reuse_port: bool = False, on_ready=None) -> int:
    """Run until SIGTERM/SIGINT, then drain in-flight requests and return the exit code.

    ``preloaded`` (a ServingModel built before a fork), ``reuse_port`` and
    ``on_ready`` (called with the bound port once listening) serve the worker
    processes of :mod:`server.workers`.
    """
    # The main thread warms and reloads bundles; the RPC threads set their own (request_executor).
    one_openmp_thread()
    # Like OpenMP, BLAS: the fold-in's k×k products are tiny, and a BLAS pool per call costs
    # 20× the work itself once the cores are busy with other requests.
    from threadpoolctl import threadpool_limits

    threadpool_limits(1, "blas")
    # A thread waiting for the GIL gets it after at most this long: at Python's default
    # 5 ms, a request waiting behind a busy pipeline (or a gRPC thread) overran a 10 ms
    # budget by several ms.
    sys.setswitchinterval(config.gil_switch_interval_us / 1e6)
    metrics.set_config(config)
    gc_pauses = gc_policy.PauseWatch(metrics.GC_PAUSES)
    models = ModelManager(config.artifacts, config.ranker_config(), preloaded=preloaded)
    # Replayed before the port opens, so the first Rank already reflects every logged event.
    realtime = Realtime(config)
    realtime.replay()
    server, port, health_servicer = create_server(config, models, reuse_port=reuse_port, realtime=realtime)
    probe = create_probe_server(config, health_servicer, reuse_port=reuse_port)
    metrics_port = None
    if config.metrics_port >= 0:
        metrics_port = security.start_metrics_server(config, on_reload=_count_file_reload)
    # Signal handlers only set plain flags, which the loop below reads every tick. They
    # must not take a lock: a handler runs on the main thread between bytecodes, and
    # setting a threading.Event while the main thread holds that Event's lock (inside
    # its wait) can deadlock the loop (a SIGHUP was once never acted on, under load).
    flags = {"stop": False, "reload": False}

    def on_stop(_signum, _frame):
        flags["stop"] = True

    def on_reload(_signum, _frame):
        flags["reload"] = True

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_stop)
    signal.signal(signal.SIGHUP, on_reload)
    # A worker process starts with these blocked (server.workers); deliver any held now.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT, signal.SIGHUP})
    server.start()
    if probe is not None:
        probe[0].start()
    log.info(
        "listening",
        extra={
            "grpc_port": port,
            "health_port": probe[1] if probe else None,
            "metrics_port": metrics_port,
            "artifacts": config.artifacts,
            "tls": config.tls_enabled,
            "client_certificates": config.require_client_auth,
            "callers_file": config.auth_tokens_file or None,
        },
    )

    def load(trigger: str, force: bool = False) -> None:
        if models.reload(trigger, force).result == "loaded":
            _set_serving(health_servicer, True)

    load("startup")
    # The server, its threads, the replayed real-time state and the bundle live as long as
    # the process (or until the next reload): out of the collector's way (server.gc_policy).
    gc_policy.freeze()
    frozen_version = models.version
    gc_pauses.flush()
    if not models.loaded:
        log.warning(
            "no servable bundle yet; health stays NOT_SERVING until a poll, SIGHUP or ReloadBundle loads one",
            extra={"artifacts": config.artifacts},
        )
    if on_ready is not None:
        on_ready(port)
    if config.ready_file:
        write_ready(
            config.ready_file,
            {
                "grpc_port": port,
                "metrics_port": metrics_port,
                "health_port": probe[1] if probe else None,
                "pid": os.getpid(),
            },
        )

    interval = config.reload_interval_seconds
    next_poll = time.monotonic() + interval
    while not flags["stop"]:
        time.sleep(_TICK_SECONDS)
        gc_pauses.flush()
        realtime.tick()
        if models.version != frozen_version:  # loaded since, by any trigger (admin RPCs too)
            gc_policy.freeze()
            frozen_version = models.version
        if flags["stop"]:
            break
        if flags["reload"]:
            flags["reload"] = False
            load("signal", force=True)
        elif interval > 0 and time.monotonic() >= next_poll:
            load("poll")
            next_poll = time.monotonic() + interval

    drain(server, health_servicer, config)
    if probe is not None:  # answered NOT_SERVING through the drain; now it goes too
        probe[0].stop(None)
    realtime.close()
    gc_pauses.close()
    return 0
