"""The server's one typed configuration, from defaults, a TOML file, the environment and flags."""

from __future__ import annotations

import dataclasses
import os
import sys
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ranking import (
    EventLimits,
    EventLogSettings,
    OverlaySettings,
    QueryLimits,
    RankerConfig,
    UserStateSettings,
    settings_main,
    settings_table,
)

ENV_PREFIX = "ONE2ONE_"
# How a boolean setting may be spelt in the environment (TOML has its own true/false).
_BOOLS = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}


def _setting(default: Any, help: str, shown: str | None = None) -> Any:
    """A field with its default and the one line the docs table shows (``shown``: the default as
    the table writes it, where the value itself says too little)."""
    return field(default=default, metadata={"help": help} | ({"default": shown} if shown else {}))


def allowed_cpus() -> list[int]:
    """The CPUs this process may run on (a container's cpuset, ``taskset``), in order."""
    return sorted(os.sched_getaffinity(0))


@dataclass
class ServerConfig:
    """Every server setting with its default; docs/operations.md's table is generated from these.

    Precedence, lowest first: these defaults, the ``[server]`` table of ``--config``,
    ``ONE2ONE_<NAME>`` environment variables, command-line flags.
    """

    artifacts: str = _setting("", "directory with the bundle versions and `CURRENT`", shown="(required)")
    host: str = _setting("127.0.0.1", "gRPC bind address")
    port: int = _setting(50051, "gRPC port (0 picks a free one)")
    metrics_port: int = _setting(9464, "Prometheus endpoint port (`-1` turns it off)")
    metrics_host: str = _setting("127.0.0.1", "Prometheus endpoint bind address")
    max_workers: int = _setting(
        16,
        "threads handling RPCs other than Rank (health, reflection, admin, "
        "RecordEvents), and Rank too when `rank_threads` is 0",
    )
    rank_threads: int = _setting(
        2,
        "threads handling Rank, per worker, taking calls in arrival order; the wait "
        "for one counts against the budget (stage `queue`). 0: Rank on the "
        "`max_workers` threads",
    )
    max_message_bytes: int = _setting(1 << 20, "larger requests are refused with `RESOURCE_EXHAUSTED`")
    request_read_timeout_seconds: float = _setting(
        2.0,
        "a call whose request message has not fully arrived this long after its headers is cancelled, "
        "freeing its handler thread (a stalled client must not hold every thread; see Slow clients); 0: never",
    )
    default_budget_ms: float = _setting(50.0, "budget of a request that sets none")
    max_budget_ms: float = _setting(500.0, "cap on any request's budget")
    reply_margin_ms: float = _setting(2.0, "kept back from the gRPC deadline to send the reply")
    drain_seconds: float = _setting(10.0, "grace period for in-flight requests on SIGTERM")
    drain_notice_seconds: float = _setting(
        0.0,
        "after SIGTERM, health says `NOT_SERVING` but calls are still "
        "served this long, so load balancers move away first",
    )
    max_connection_age_seconds: float = _setting(
        300.0,
        "a client connection older than this is asked to reconnect (HTTP/2 GOAWAY; its calls in flight "
        "get `drain_seconds` to finish), so connections spread again over the worker processes and over pods "
        "added since (see Processes); 0: never",
    )
    reload_interval_seconds: float = _setting(
        5.0, "how often `CURRENT` is checked for a new bundle (0: never; SIGHUP and `ReloadBundle` still work)"
    )
    bundle_max_age_hours: float = _setting(
        48.0,
        "a served bundle built longer ago than this is stale (exported "
        "as `one2one_bundle_max_age_seconds`; the stale-bundle alert reads it)",
    )
    # The pipeline's settings: defaults are RankerConfig's own (ranking.config).
    n_candidates: int = _setting(RankerConfig.n_candidates, "candidates retrieved by ANN search")
    popular_candidates: int = _setting(RankerConfig.popular_candidates, "popular items added to the candidates")
    ann_effort: int = _setting(
        RankerConfig.ann_effort,
        "search effort on the request path: HNSW efSearch, IVF nprobe. 0: the bundle's own, which "
        "its builder chose as the lowest reaching the recall target (see Retrieval); any other value wins over it",
    )
    ann_refine: float = _setting(
        RankerConfig.ann_refine,
        "a query the exact head cannot prove asks the ANN index for `n_candidates` x this many items and keeps "
        "the best `n_candidates` by the exact inner product with the item factors (recovers what a quantised "
        "index such as SQ8 misorders; 1: none). 0: the bundle's own, which its builder chose with the effort "
        "as the cheapest pair reaching the recall target (see Retrieval); any value >= 1 wins over it",
    )
    second_phase_candidates: int = _setting(
        RankerConfig.second_phase_candidates,
        "phased scoring: a first phase (a prefix of every bag of the reranker, chosen by the builder) "
        "scores every candidate, the full model only the best this many. -1: the bundle's own "
        "(`phases.second_phase_candidates` in its manifest); 0: one phase, the full model over every "
        "candidate. A bundle whose measured scoring is over its share of `default_budget_ms` gets it cut "
        "to fit (see The request budget)",
    )
    exact_head_items: int = _setting(
        RankerConfig.exact_head_items,
        "items of largest norm searched exactly "
        "first; the ANN index answers only the queries this search cannot prove "
        "exact (0: ANN only). See Retrieval",
    )
    max_results: int = _setting(QueryLimits.max_results, "`num_results` above this is clamped")
    log_level: str = _setting("INFO", "JSON logs on stderr")
    ready_file: str = _setting("", "write `{grpc_port, metrics_port, pid, worker_pids}` here once serving")
    workers: int = _setting(
        0, "worker processes sharing the port (0: one per CPU the server may run on; 1: no supervisor)"
    )
    pin_workers: bool = _setting(
        True, "with exactly one worker per allowed CPU, pin each worker to its own CPU (see Processes)"
    )
    ann_batch_size: int = _setting(
        RankerConfig.ann_batch_size, "micro-batch up to this many concurrent ANN queries into one search (1: off)"
    )
    max_concurrent_ranks: int = _setting(
        1,
        "Rank pipelines one worker runs at once (0: no limit); the rest "
        "wait, the wait counting against their budget (stage `queue`), "
        "because a worker's in-flight requests share its GIL",
    )
    gil_switch_interval_us: float = _setting(
        500.0,
        "longest a thread waits for the GIL while another computes "
        "(Python's default is 5000: a request or gRPC thread waiting "
        "behind a busy pipeline then overran a 10 ms budget)",
    )
    ann_batch_wait_us: float = _setting(
        RankerConfig.ann_batch_wait_us,
        "longest a batch leader waits for company (never more than a tenth of its budget)",
    )
    debug_delay_us_per_candidate: str = _setting(
        "", "test/debug only: `retrieve:100,features:50` adds artificial work per candidate"
    )
    debug_rank_delay_ms: float = _setting(
        0.0,
        "test/debug only: every Rank waits this long inside its budget (a slow dependency); never set in production",
    )
    # Real-time events and experiments (RecordEvents, user state, rules, arms); defaults are
    # the library's own sections (ranking.config, ranking.realtime.events).
    event_log_dir: str = _setting(
        "",
        "the durable event log (segments `<n>.log`), next to (never inside) the "
        "artifacts; replayed into user state at start",
        shown="(none: `<artifacts>-events`)",
    )
    event_log_fsync: str = _setting(
        EventLogSettings.fsync,
        "`always`: fsync before RecordEvents returns OK; "
        "`interval`: every `event_log_fsync_interval_seconds`; `never`: the OS "
        "decides",
    )
    event_log_fsync_interval_seconds: float = _setting(
        EventLogSettings.fsync_interval_seconds, "period of the background fsync under `interval`"
    )
    event_log_segment_bytes: int = _setting(EventLogSettings.segment_bytes, "a new segment is started beyond this size")
    event_types: str = _setting(",".join(EventLimits.event_types), "event types RecordEvents accepts")
    max_events_per_batch: int = _setting(
        EventLimits.max_events_per_batch, "larger RecordEvents batches are `INVALID_ARGUMENT`"
    )
    max_event_future_seconds: float = _setting(
        EventLimits.max_future_seconds, "an event time further ahead of the server clock is rejected"
    )
    user_state_max_users: int = _setting(
        UserStateSettings.max_users,
        "customers whose recent events are held in memory (`local` store; least recently used evicted, "
        "their events stay in the log); purchases are never evicted",
    )
    user_state_max_events: int = _setting(UserStateSettings.max_events_per_user, "most recent events kept per user")
    skip_penalty: float = _setting(
        OverlaySettings.skip_penalty,
        "score subtracted from items as similar "
        "(cosine) as possible to a skipped/disliked one, in units of the model's "
        "score spread (the standard deviation of candidate scores, measured at "
        "warm-up)",
    )
    interest_boost: float = _setting(
        OverlaySettings.interest_boost,
        "score added to the candidate most similar "
        "(cosine) to an item the user engaged with since the bundle was built (not "
        "to that item itself), scaled linearly down to 0 for the least similar "
        "candidate; same units",
    )
    experiments_file: str = _setting("", "TOML with `[[experiments]]` and `[[rules]]` (see docs/api.md)")
    log_all_impressions: bool = _setting(False, "log every Rank response, not only those in an experiment")
    attribution_max_requests: int = _setting(
        100_000, "recent request ids remembered to attribute events to arms in the metrics (`local` store)"
    )
    event_store: str = _setting(
        "local",
        "`local`: the event log under `event_log_dir` and each process's memory (route a customer to one "
        "pod); or a `redis://` / `rediss://` URL (Redis or Valkey; `?prefix=` names the keys) that every "
        "pod shares: events, customer state, impressions and attribution",
    )
    event_store_shards: int = _setting(
        8, "stream keys events are spread over by a hash of the customer (fixed once the store holds events)"
    )
    event_store_timeout_ms: float = _setting(
        10.0,
        "Rank's read of a customer's real-time state from a shared store; past it the Rank answers without "
        "real-time state (`realtime` in `degraded_stages`)",
    )
    event_store_write_timeout_ms: float = _setting(
        2000.0, "RecordEvents' transaction on a shared store; past it the batch is UNAVAILABLE"
    )
    event_store_retry_seconds: float = _setting(
        1.0, "after a failed read, Ranks skip the shared store this long before trying it again"
    )
    event_store_key_ttl_seconds: float = _setting(
        90 * 86_400.0,
        "a customer's state in a shared store expires this long after their last event; keep it above the "
        "time between builds (the server warns when the served bundle is older)",
    )
    event_store_held_purchases: int = _setting(
        100_000,
        "purchases each process keeps between Ranks from a shared store (about 0.5 KB each), of customers "
        "with 64 or more: their next Rank reads only what was written since; 0: every Rank reads them whole",
    )
    attribution_ttl_seconds: float = _setting(
        7 * 86_400.0, "how long a shared store remembers the arm a request was served, for attribution"
    )

    # Security: TLS, callers and roles, load shedding (server.security, server.guard, server.shedding).
    tls_cert_file: str = _setting(
        "", "PEM certificate chain for the gRPC port; with `tls_key_file`, TLS on (re-read when the files change)"
    )
    tls_key_file: str = _setting("", "PEM private key (unencrypted) of `tls_cert_file`")
    tls_client_ca_file: str = _setting(
        "", "PEM CA bundle that signs client certificates (needs `require_client_auth`; re-read when it changes)"
    )
    require_client_auth: bool = _setting(
        False,
        "mTLS: refuse connections without a client certificate signed by `tls_client_ca_file`; its CN or SAN "
        "identifies the caller (`certificate` in the callers file)",
    )
    auth_tokens_file: str = _setting(
        "",
        "callers file (TOML `[[callers]]`: name, roles, `token_sha256` and/or `certificate`); every call but "
        "health must then present a listed token or certificate with the method's role. Re-read on change",
    )
    health_port: int = _setting(
        -1,
        "a second, plaintext port serving only `grpc.health.v1`, for probes that cannot do TLS or "
        "tokens (the kubelet's gRPC probe); `-1`: off, 0 picks a free one",
    )
    allow_insecure: bool = _setting(
        False,
        "let the server bind a non-loopback `host` with neither TLS nor caller authentication "
        "(it refuses to start otherwise)",
    )
    reflection: bool = _setting(
        False, "serve gRPC server reflection (lists every service; callers need any role when auth is on)"
    )
    metrics_tls_cert_file: str = _setting(
        "", "PEM certificate chain for the metrics endpoint; with `metrics_tls_key_file`, HTTPS (re-read on change)"
    )
    metrics_tls_key_file: str = _setting("", "PEM private key (unencrypted) of `metrics_tls_cert_file`")
    metrics_tls_client_ca_file: str = _setting(
        "", "PEM CA bundle: scrapers must present a client certificate it signed"
    )
    max_concurrent_calls: int = _setting(
        64,
        "calls one worker holds at once, running or waiting for a thread (health not counted); "
        "more are answered `RESOURCE_EXHAUSTED` at once (0: no limit)",
    )
    max_queued_ranks: int = _setting(
        32,
        "Rank calls one worker lets wait for a free Rank thread; more are answered "
        "`RESOURCE_EXHAUSTED` at once instead of waiting out their deadline (0: no limit)",
    )
    max_calls_per_role: str = _setting(
        "events:8,admin:2",
        "per-role ceilings on the calls one worker holds at once (`role:n`, roles `rank`, `events`, "
        "`admin`), so one kind of caller cannot take every slot or thread from the others",
    )

    @property
    def tls_enabled(self) -> bool:
        return bool(self.tls_cert_file and self.tls_key_file)

    @property
    def auth_enabled(self) -> bool:
        """Callers are authenticated: by a callers file, or by a client certificate (mTLS)."""
        return bool(self.auth_tokens_file) or self.require_client_auth

    @property
    def metrics_tls_enabled(self) -> bool:
        return bool(self.metrics_tls_cert_file and self.metrics_tls_key_file)

    def role_limits(self) -> dict[str, int]:
        """``max_calls_per_role`` parsed: {"events": 8, "admin": 2}."""
        out: dict[str, int] = {}
        for part in filter(None, (p.strip() for p in self.max_calls_per_role.split(","))):
            role, sep, value = part.partition(":")
            role = role.strip()
            try:
                if not sep or role not in ("rank", "events", "admin") or role in out:
                    raise ValueError
                out[role] = int(value)
                if out[role] < 1:
                    raise ValueError
            except ValueError:
                raise ValueError(
                    f"max_calls_per_role entry {part!r} must be <role>:<n>, role one of rank, events, admin "
                    "(each once), n >= 1"
                ) from None
        return out

    @classmethod
    def load(
        cls,
        path: str | Path | None = None,
        env: Mapping[str, str] | None = None,
        flags: Mapping[str, Any] | None = None,
    ) -> ServerConfig:
        """Build the configuration; raises ValueError naming the bad key and its source."""
        cfg = cls()
        if path:
            with open(path, "rb") as fh:
                doc = tomllib.load(fh)
            cfg._apply(doc.get("server", doc), f"config file {path}")
        env = os.environ if env is None else env
        from_env = {
            f.name: env[ENV_PREFIX + f.name.upper()]
            for f in dataclasses.fields(cls)
            if ENV_PREFIX + f.name.upper() in env
        }
        cfg._apply(from_env, "environment", parse_strings=True)
        cfg._apply({k: v for k, v in (flags or {}).items() if v is not None}, "command line")
        cfg.validate()
        return cfg

    def _apply(self, values: Mapping[str, Any], source: str, parse_strings: bool = False) -> None:
        known = {f.name for f in dataclasses.fields(self)}
        for key, value in values.items():
            if key not in known:
                raise ValueError(f"unknown server setting {key!r} in {source}; known: {', '.join(sorted(known))}")
            default = getattr(type(self)(), key)
            try:
                if isinstance(default, bool):
                    value = value if isinstance(value, bool) else _BOOLS[str(value).strip().lower()]
                elif isinstance(default, int):
                    value = int(value)
                elif isinstance(default, float):
                    value = float(value)
                else:
                    value = str(value)
            except (TypeError, ValueError, KeyError):
                raise ValueError(
                    f"server setting {key!r} from {source} must be {type(default).__name__}, got {value!r}"
                ) from None
            setattr(self, key, value)

    def validate(self) -> None:
        problems = []
        if not self.artifacts:
            problems.append("artifacts is required (--artifacts DIR or ONE2ONE_ARTIFACTS)")
        if not 0 <= self.port < 65536:
            problems.append(f"port {self.port} is out of range")
        if not -1 <= self.metrics_port < 65536:
            problems.append(f"metrics_port {self.metrics_port} is out of range (-1 disables metrics)")
        if self.default_budget_ms <= 0 or self.max_budget_ms <= 0:
            problems.append("default_budget_ms and max_budget_ms must be > 0")
        if self.drain_seconds < 0 or self.drain_notice_seconds < 0:
            problems.append("drain_seconds and drain_notice_seconds must be >= 0")
        if self.max_connection_age_seconds < 0:
            problems.append(f"max_connection_age_seconds {self.max_connection_age_seconds} must be >= 0 (0: never)")
        if self.debug_rank_delay_ms < 0:
            problems.append("debug_rank_delay_ms must be >= 0 (0 turns it off)")
        if self.max_workers < 1:
            problems.append("max_workers must be >= 1")
        if self.request_read_timeout_seconds < 0:
            problems.append(f"request_read_timeout_seconds {self.request_read_timeout_seconds} must be >= 0 (0: never)")
        if self.rank_threads < 0:
            problems.append(f"rank_threads {self.rank_threads} must be >= 0 (0: Rank on the max_workers threads)")
        if self.workers < 0:
            problems.append(f"workers {self.workers} must be >= 0 (0: one per core)")
        if self.gil_switch_interval_us <= 0:
            problems.append("gil_switch_interval_us must be > 0")
        if self.max_concurrent_ranks < 0:
            problems.append(f"max_concurrent_ranks {self.max_concurrent_ranks} must be >= 0 (0: no limit)")
        if self.ann_effort < 0:
            problems.append(f"ann_effort {self.ann_effort} must be >= 0 (0: the bundle's tuned effort)")
        if not (self.ann_refine == 0 or self.ann_refine >= 1):
            problems.append(f"ann_refine {self.ann_refine} must be 0 (the bundle's) or >= 1 (1: no re-ranking)")
        if self.second_phase_candidates < -1:
            problems.append(
                f"second_phase_candidates {self.second_phase_candidates} must be >= -1 "
                "(-1: the bundle's own, 0: one phase)"
            )
        if self.exact_head_items < 0:
            problems.append(f"exact_head_items {self.exact_head_items} must be >= 0 (0: ANN search only)")
        if self.ann_batch_size < 1 or self.ann_batch_wait_us < 0:
            problems.append("ann_batch_size must be >= 1 and ann_batch_wait_us >= 0")
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            problems.append("tls_cert_file and tls_key_file go together: set both or neither")
        if bool(self.metrics_tls_cert_file) != bool(self.metrics_tls_key_file):
            problems.append("metrics_tls_cert_file and metrics_tls_key_file go together: set both or neither")
        if self.metrics_tls_client_ca_file and not self.metrics_tls_enabled:
            problems.append("metrics_tls_client_ca_file needs metrics_tls_cert_file and metrics_tls_key_file")
        if self.require_client_auth and not (self.tls_enabled and self.tls_client_ca_file):
            problems.append("require_client_auth needs tls_cert_file, tls_key_file and tls_client_ca_file")
        if self.tls_client_ca_file and not self.require_client_auth:
            problems.append(
                "tls_client_ca_file is only used with require_client_auth = true (gRPC verifies client "
                "certificates only when it requires them)"
            )
        if not -1 <= self.health_port < 65536:
            problems.append(f"health_port {self.health_port} is out of range (-1 turns it off)")
        if self.max_concurrent_calls < 0 or self.max_queued_ranks < 0:
            problems.append("max_concurrent_calls and max_queued_ranks must be >= 0 (0: no limit)")
        try:
            self.role_limits()
        except ValueError as exc:
            problems.append(str(exc))
        try:
            self.debug_delays()
        except ValueError as exc:
            problems.append(str(exc))
        from ranking import FSYNC_POLICIES

        if self.event_log_fsync not in FSYNC_POLICIES:
            problems.append(f"event_log_fsync must be one of {', '.join(FSYNC_POLICIES)}, got {self.event_log_fsync!r}")
        if self.event_log_segment_bytes < 1024:
            problems.append("event_log_segment_bytes must be >= 1024")
        if not self.event_type_list():
            problems.append("event_types must name at least one event type")
        for name in (
            "max_events_per_batch",
            "user_state_max_users",
            "user_state_max_events",
            "attribution_max_requests",
        ):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1")
        if self.event_log_fsync_interval_seconds <= 0:
            problems.append("event_log_fsync_interval_seconds must be > 0")
        if self.event_store != "local":
            from ranking import split_store_url

            try:
                split_store_url(self.event_store)
            except ValueError as exc:
                problems.append(f"event_store: {exc}")
        if self.event_store_shards < 1:
            problems.append(f"event_store_shards {self.event_store_shards} must be >= 1")
        for name in (
            "event_store_timeout_ms",
            "event_store_write_timeout_ms",
            "event_store_key_ttl_seconds",
            "attribution_ttl_seconds",
        ):
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be > 0")
        if self.event_store_retry_seconds < 0:
            problems.append("event_store_retry_seconds must be >= 0")
        if self.event_store_held_purchases < 0:
            problems.append(f"event_store_held_purchases {self.event_store_held_purchases} must be >= 0 (0: none)")
        if self.skip_penalty < 0 or self.interest_boost < 0:
            problems.append("skip_penalty and interest_boost must be >= 0")
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def n_workers(self) -> int:
        """Worker processes to run: ``workers``, or one per CPU this process may run on when 0."""
        return self.workers or len(allowed_cpus())

    def debug_delays(self) -> dict[str, float]:
        """``debug_delay_us_per_candidate`` parsed: "retrieve:100,features:50" (test/debug only)."""
        out: dict[str, float] = {}
        for part in filter(None, (p.strip() for p in self.debug_delay_us_per_candidate.split(","))):
            stage, sep, value = part.partition(":")
            try:
                if not sep or stage not in ("retrieve", "features"):
                    raise ValueError
                out[stage] = float(value)
            except ValueError:
                raise ValueError(
                    f"debug_delay_us_per_candidate entry {part!r} must be retrieve:<us> or features:<us>"
                ) from None
        return out

    def event_type_list(self) -> tuple[str, ...]:
        return tuple(t.strip().lower() for t in self.event_types.split(",") if t.strip())

    def event_log_path(self) -> Path:
        # Next to the artifacts, not inside: whatever prunes old bundle versions there must
        # never be able to take the event log with them.
        if self.event_log_dir:
            return Path(self.event_log_dir)
        artifacts = Path(self.artifacts).resolve()
        return artifacts.parent / f"{artifacts.name}-events"

    def ranker_config(self) -> RankerConfig:
        return RankerConfig(
            n_candidates=self.n_candidates,
            popular_candidates=self.popular_candidates,
            ann_effort=self.ann_effort,
            ann_refine=self.ann_refine,
            second_phase_candidates=self.second_phase_candidates,
            # A bundle's scoring is fitted to what a request that sets no budget may spend.
            scoring_budget_ms=self.default_budget_ms,
            exact_head_items=self.exact_head_items,
            limits=QueryLimits(max_results=self.max_results),
            debug_delay_us_per_candidate=self.debug_delays(),
            # A batch never gathers more queries than may run at once (a leader would wait for nobody).
            ann_batch_size=min(self.ann_batch_size, self.max_concurrent_ranks or self.ann_batch_size),
            ann_batch_wait_us=self.ann_batch_wait_us,
        )


def config_table_markdown() -> str:
    """The configuration table of docs/operations.md, generated from the fields' help (``make docs``)."""
    return settings_table(ServerConfig)


def main(argv: list[str] | None = None) -> int:
    """``python -m server.config --markdown [FILE]``: print the settings table, or rewrite it in FILE."""
    return settings_main(ServerConfig, "server.config", sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
