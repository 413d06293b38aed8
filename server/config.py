"""The server's one typed configuration, from defaults, a TOML file, the environment and flags."""
from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

ENV_PREFIX = "ONE2ONE_"
# How a boolean setting may be spelt in the environment (TOML has its own true/false).
_BOOLS = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}


def allowed_cpus() -> list[int]:
    """The CPUs this process may run on (a container's cpuset, ``taskset``), in order."""
    return sorted(os.sched_getaffinity(0))


@dataclass
class ServerConfig:
    """Every server setting with its default; the README's table is generated from these.

    Precedence, lowest first: these defaults, the ``[server]`` table of ``--config``,
    ``ONE2ONE_<NAME>`` environment variables, command-line flags.
    """

    artifacts: str = ""
    host: str = "127.0.0.1"
    port: int = 50051
    metrics_port: int = 9464
    metrics_host: str = "127.0.0.1"
    max_workers: int = 16
    rank_threads: int = 2
    max_message_bytes: int = 1 << 20
    default_budget_ms: float = 50.0
    max_budget_ms: float = 500.0
    reply_margin_ms: float = 2.0
    drain_seconds: float = 10.0
    drain_notice_seconds: float = 0.0
    max_connection_age_seconds: float = 300.0
    reload_interval_seconds: float = 5.0
    bundle_max_age_hours: float = 48.0
    n_candidates: int = 200
    popular_candidates: int = 50
    ann_effort: int = 128
    exact_head_items: int = 16384
    max_results: int = 100
    log_level: str = "INFO"
    ready_file: str = ""
    workers: int = 0
    pin_workers: bool = True
    ann_batch_size: int = 1
    max_concurrent_ranks: int = 1
    gil_switch_interval_us: float = 500.0
    ann_batch_wait_us: float = 300.0
    debug_delay_us_per_candidate: str = ""
    debug_rank_delay_ms: float = 0.0
    # Real-time events and experiments (RecordEvents, user state, rules, arms).
    event_log_dir: str = ""  # "": <artifacts>-events, next to the artifacts directory
    event_log_fsync: str = "always"
    event_log_fsync_interval_seconds: float = 1.0
    event_log_segment_bytes: int = 64 << 20
    event_types: str = "view,click,add_to_cart,purchase,rating,skip,dislike"
    max_events_per_batch: int = 1000
    max_event_future_seconds: float = 300.0
    user_state_ttl_seconds: float = 7 * 86_400.0
    user_state_max_users: int = 100_000
    user_state_max_events: int = 200
    skip_penalty: float = 3.0
    interest_boost: float = 2.0
    experiments_file: str = ""
    log_all_impressions: bool = False
    attribution_max_requests: int = 100_000

    @classmethod
    def load(cls, path: str | Path | None = None, env: Mapping[str, str] | None = None,
             flags: Mapping[str, Any] | None = None) -> "ServerConfig":
        """Build the configuration; raises ValueError naming the bad key and its source."""
        cfg = cls()
        if path:
            with open(path, "rb") as fh:
                doc = tomllib.load(fh)
            cfg._apply(doc.get("server", doc), f"config file {path}")
        env = os.environ if env is None else env
        from_env = {f.name: env[ENV_PREFIX + f.name.upper()] for f in dataclasses.fields(cls)
                    if ENV_PREFIX + f.name.upper() in env}
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
                raise ValueError(f"server setting {key!r} from {source} must be {type(default).__name__}, "
                                 f"got {value!r}") from None
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
        if self.rank_threads < 0:
            problems.append(f"rank_threads {self.rank_threads} must be >= 0 (0: Rank on the max_workers threads)")
        if self.workers < 0:
            problems.append(f"workers {self.workers} must be >= 0 (0: one per core)")
        if self.gil_switch_interval_us <= 0:
            problems.append("gil_switch_interval_us must be > 0")
        if self.max_concurrent_ranks < 0:
            problems.append(f"max_concurrent_ranks {self.max_concurrent_ranks} must be >= 0 (0: no limit)")
        if self.exact_head_items < 0:
            problems.append(f"exact_head_items {self.exact_head_items} must be >= 0 (0: ANN search only)")
        if self.ann_batch_size < 1 or self.ann_batch_wait_us < 0:
            problems.append("ann_batch_size must be >= 1 and ann_batch_wait_us >= 0")
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
        for name in ("max_events_per_batch", "user_state_max_users", "user_state_max_events",
                     "attribution_max_requests"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1")
        if self.user_state_ttl_seconds <= 0 or self.event_log_fsync_interval_seconds <= 0:
            problems.append("user_state_ttl_seconds and event_log_fsync_interval_seconds must be > 0")
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
                raise ValueError(f"debug_delay_us_per_candidate entry {part!r} must be "
                                 "retrieve:<us> or features:<us>") from None
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

    def ranker_config(self):
        from ranking import QueryLimits, RankerConfig

        return RankerConfig(
            n_candidates=self.n_candidates,
            popular_candidates=self.popular_candidates,
            ann_effort=self.ann_effort,
            exact_head_items=self.exact_head_items,
            limits=QueryLimits(max_results=self.max_results),
            debug_delay_us_per_candidate=self.debug_delays(),
            # A batch never gathers more queries than may run at once (a leader would wait for nobody).
            ann_batch_size=min(self.ann_batch_size, self.max_concurrent_ranks or self.ann_batch_size),
            ann_batch_wait_us=self.ann_batch_wait_us,
        )
