"""Server assembly and lifecycle: create_server, serve (health, metrics, reload, drain), main."""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from concurrent import futures
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server

from one2one.v1 import ranking_pb2, ranking_pb2_grpc
from ranking.errors import RankingError
from server import logs, metrics
from server.config import ServerConfig
from server.interceptors import MetricsInterceptor
from server.model_manager import ModelManager
from server.realtime import Realtime
from server.servicer import RankingServicer

log = logging.getLogger("server")
SERVICE_NAME = ranking_pb2.DESCRIPTOR.services_by_name["RankingService"].full_name


def create_server(config: ServerConfig, models: ModelManager,
                  realtime: "Realtime | None" = None) -> tuple[grpc.Server, int, health.HealthServicer]:
    """A gRPC server with the ranking, health and reflection services, bound but not started.

    Health starts NOT_SERVING; :func:`serve` turns it SERVING once a bundle is loaded.

    Returns
    -------
    (server, port, health_servicer)
        ``port`` is the bound port (useful with ``port=0``).
    """
    options = [
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.max_send_message_length", config.max_message_bytes),
        ("grpc.so_reuseport", 0),
    ]
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=config.max_workers, thread_name_prefix="rank"),
        interceptors=[MetricsInterceptor()],
        options=options,
    )
    ranking_pb2_grpc.add_RankingServiceServicer_to_server(RankingServicer(models, config, realtime), server)
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    port = server.add_insecure_port(f"{config.host}:{config.port}")
    if port == 0:
        raise OSError(f"cannot bind {config.host}:{config.port}")
    return server, port, health_servicer


def _set_serving(health_servicer: health.HealthServicer, serving: bool) -> None:
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, status)


def serve(config: ServerConfig) -> int:
    """Run until SIGTERM/SIGINT, then drain in-flight requests and return the exit code."""
    import faiss

    # One OpenMP thread per query on the request path: requests, not threads, use the cores.
    faiss.omp_set_num_threads(1)
    # Likewise BLAS: the fold-in's k×k products are tiny, and a BLAS pool per call costs
    # 20× the work itself once the cores are busy with other requests.
    from threadpoolctl import threadpool_limits

    threadpool_limits(1, "blas")
    models = ModelManager(config.artifacts, config.ranker_config())
    # Replayed before the port opens, so the first Rank already reflects every logged event.
    realtime = Realtime(config)
    realtime.replay()
    server, port, health_servicer = create_server(config, models, realtime)
    metrics_port = None
    if config.metrics_port >= 0:
        httpd, _ = start_http_server(config.metrics_port, addr=config.metrics_host)
        metrics_port = httpd.server_port
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: stop.set())
    server.start()
    log.info("listening", extra={"grpc_port": port, "metrics_port": metrics_port, "artifacts": config.artifacts})

    def load() -> None:
        if models.load_current():
            _set_serving(health_servicer, True)

    load()
    if not models.loaded:
        log.warning("no servable bundle yet; health stays NOT_SERVING and loading is retried",
                    extra={"artifacts": config.artifacts})
    if config.ready_file:
        tmp = Path(config.ready_file + ".tmp")
        tmp.write_text(json.dumps({"grpc_port": port, "metrics_port": metrics_port, "pid": os.getpid()}))
        os.replace(tmp, config.ready_file)

    while not stop.wait(config.reload_interval_seconds if config.reload_interval_seconds > 0 else None):
        load()

    log.info("draining", extra={"grace_seconds": config.drain_seconds})
    health_servicer.enter_graceful_shutdown()
    metrics.SERVING.set(0)
    server.stop(grace=config.drain_seconds).wait()
    realtime.close()
    log.info("stopped")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m server", description="Serve the CURRENT one2one bundle over gRPC.")
    p.add_argument("--artifacts", help="artifacts directory holding the versions and CURRENT")
    p.add_argument("--port", type=int, help="gRPC port (0 picks a free one)")
    p.add_argument("--host", help="address to bind")
    p.add_argument("--metrics-port", dest="metrics_port", type=int, help="Prometheus /metrics port (-1: off)")
    p.add_argument("--config", help="TOML file with a [server] table")
    p.add_argument("--ready-file", dest="ready_file", help="write {grpc_port, metrics_port, pid} here once listening")
    args = p.parse_args(argv)
    flags = {k: v for k, v in vars(args).items() if k != "config"}
    try:
        config = ServerConfig.load(args.config, flags=flags)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    logs.setup(config.log_level)
    try:
        return serve(config)
    except (OSError, ValueError, RankingError) as exc:
        log.error("cannot start", extra={"error": str(exc)})
        return 1


if __name__ == "__main__":
    sys.exit(main())
