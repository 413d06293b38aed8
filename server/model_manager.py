"""Holds the ranker being served and swaps in a newly loaded, verified, warmed bundle atomically."""

from __future__ import annotations

import datetime as _dt
import json
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from ranking import (
    CURRENT,
    MANIFEST,
    SCHEMA_VERSION,
    BundleError,
    Ranker,
    RankerConfig,
    RankingError,
    RankingModel,
    ServingModel,
    Unavailable,
    resolve_current,
)
from server import metrics

log = logging.getLogger(__name__)


class BundleRefused(Exception):
    """A bundle could not be served; ``reason`` is one of ``metrics.LOAD_FAILURE_REASONS``."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class ReloadOutcome:
    """What one reload attempt did.

    ``result`` is ``"loaded"`` (a new bundle is served), ``"unchanged"`` (CURRENT names
    the bundle already served, or one already refused and unchanged since), ``"refused"``
    (the old bundle, if any, keeps serving) or ``"none"`` (nothing published yet).
    """

    result: str
    version: str = ""
    serving_version: str = ""
    reason: str = ""
    error: str = ""
    seconds: float = 0.0


class ModelManager:
    """The current :class:`~ranking.pipeline.ranker.Ranker`, replaced whole, never mutated.

    Requests take a reference with :meth:`current` and finish on it even if a new
    bundle is swapped in meanwhile; the old ranker is released when the last of them
    drops it. Loading, verifying and warming happen on the caller's thread (the serve
    loop or an admin RPC), never on a request's.

    Parameters
    ----------
    artifacts : Path
        The directory holding the bundle versions and ``CURRENT``.
    ranker_config : RankerConfig
        Pipeline settings for every ranker built.
    """

    def __init__(self, artifacts: Path | str, ranker_config: RankerConfig, preloaded: ServingModel | None = None):
        self.artifacts = Path(artifacts)
        self.ranker_config = ranker_config
        # A model the supervisor loaded (and readied to serve) before forking: its pages are
        # shared copy-on-write.
        self._preloaded = preloaded
        self._ranker: Ranker | None = None
        self._lock = threading.Lock()
        # (path, manifest mtime) of the last refused bundle: a poll does not re-verify
        # the same broken bundle every few seconds; a signal or admin reload does.
        self._refused: tuple[Path, int] | None = None
        self.last_outcome: ReloadOutcome | None = None
        self.loaded_at: float = 0.0

    def current(self) -> Ranker:
        """The ranker to serve with; raises Unavailable while no bundle is loaded."""
        ranker = self._ranker
        if ranker is None:
            # The client is told no more than that: the artifacts path is the operator's (logs, /admin).
            raise Unavailable("no bundle loaded yet")
        return ranker

    @property
    def loaded(self) -> bool:
        return self._ranker is not None

    @property
    def version(self) -> str:
        ranker = self._ranker
        return ranker.model.version if ranker is not None else ""

    def load_current(self, trigger: str = "poll", force: bool = False) -> bool:
        """Load the bundle CURRENT names, if it is not already served; see :meth:`reload`."""
        return self.reload(trigger, force).result == "loaded"

    def reload(self, trigger: str = "poll", force: bool = False) -> ReloadOutcome:
        """Load, verify and warm the bundle CURRENT names, then swap it in atomically.

        Parameters
        ----------
        trigger : str
            What asked for the reload, one of ``metrics.RELOAD_TRIGGERS``.
        force : bool
            Retry a bundle that was refused before even if it has not changed.

        Returns
        -------
        ReloadOutcome
            A refused bundle is logged and counted; the one being served, if any, stays.
        """
        with self._lock:
            outcome = self._reload_locked(trigger, force)
            # A poll that finds nothing new is not an attempt worth reporting: it would
            # hide the last refusal from GetStatus a few seconds later.
            if trigger != "poll" or outcome.result in ("loaded", "refused"):
                self.last_outcome = outcome
            return outcome

    def _reload_locked(self, trigger: str, force: bool) -> ReloadOutcome:
        serving = self.version
        if not (self.artifacts / CURRENT).exists() and self._ranker is None:
            return ReloadOutcome("none", serving_version=serving, error=f"nothing published under {self.artifacts} yet")
        t0 = time.perf_counter()
        try:
            path = self._resolve()
            if self._ranker is not None and self._ranker.model.bundle.path == path:
                self._refused = None
                metrics.BUNDLE_REFUSED.set(0)
                return ReloadOutcome("unchanged", version=serving, serving_version=serving)
            stamp = self._stamp(path)
            if not force and self._refused == (path, stamp):
                return ReloadOutcome(
                    "unchanged", version=path.name, serving_version=serving, error="refused before and unchanged since"
                )
            ranker = self._build(path)
        except BundleRefused as exc:
            seconds = time.perf_counter() - t0
            metrics.BUNDLE_LOAD_FAILURES.labels(exc.reason).inc()
            metrics.BUNDLE_RELOADS.labels(trigger, "refused").inc()
            metrics.BUNDLE_REFUSED.set(1)
            try:
                refused_path = resolve_current(self.artifacts)
                self._refused = (refused_path, self._stamp(refused_path))
            except BundleError:
                self._refused = None
            log.error(
                "refused bundle",
                extra={
                    "artifacts": str(self.artifacts),
                    "reason": exc.reason,
                    "error": str(exc),
                    "trigger": trigger,
                    "still_serving": serving or None,
                },
            )
            return ReloadOutcome(
                "refused",
                version=self._refused[0].name if self._refused else "",
                serving_version=serving,
                reason=exc.reason,
                error=str(exc),
                seconds=seconds,
            )
        seconds = time.perf_counter() - t0
        old = self._ranker
        self._ranker = ranker  # the swap: one reference assignment, atomic under the GIL
        self._refused = None
        self.loaded_at = time.time()
        self._publish_metrics(ranker, old, seconds, trigger)
        m = ranker.model
        log.info(
            "serving bundle",
            extra={
                "version": m.version,
                "previous": old.model.version if old else None,
                "items": m.n_items,
                "users": m.n_users,
                "load_seconds": round(seconds, 3),
                "trigger": trigger,
                "ann_effort": ranker.ann_effort,
                "ann_effort_source": ranker.ann_effort_source,
                "ann_refine": ranker.ann_refine,
                "ann_refine_source": ranker.ann_refine_source,
                "scoring_us_per_candidate": (
                    round(ranker.scoring_seconds_per_candidate * 1e6, 3)
                    if ranker.scoring_seconds_per_candidate is not None
                    else None
                ),
                "first_phase_trees": ranker.first_phase_trees,
                "second_phase_candidates": ranker.second_phase_candidates,
                "second_phase_source": ranker.second_phase_source,
            },
        )
        if ranker.second_phase_cut:
            n = self.ranker_config.n_candidates
            log.warning(
                "bundle scoring over budget: second phase cut to fit",
                extra={
                    "version": m.version,
                    "budget_ms": self.ranker_config.scoring_budget_ms,
                    "n_candidates": n,
                    "one_phase_scoring_ms": round(ranker.scoring_ms(n, 0), 4),
                    "second_phase_candidates": ranker.second_phase_candidates,
                    "phased_scoring_ms": round(ranker.scoring_ms(n, ranker.second_phase_candidates), 4),
                },
            )
        return ReloadOutcome("loaded", version=m.version, serving_version=m.version, seconds=seconds)

    def _resolve(self) -> Path:
        try:
            return resolve_current(self.artifacts)
        except BundleError as exc:
            raise BundleRefused("missing", str(exc)) from None

    @staticmethod
    def _stamp(path: Path) -> int:
        try:
            return (path / MANIFEST).stat().st_mtime_ns
        except OSError:
            return 0

    def _build(self, path: Path) -> Ranker:
        # The schema is checked first and on its own so that an old server meeting a
        # newer bundle says "incompatible", not "corrupt".
        try:
            schema = json.loads((path / MANIFEST).read_text(encoding="utf-8")).get("schema_version")
        except (OSError, ValueError) as exc:
            raise BundleRefused("corrupt", f"{path / MANIFEST} cannot be read: {exc}") from None
        if schema != SCHEMA_VERSION:
            raise BundleRefused(
                "incompatible", f"{path} has schema version {schema!r}; this server reads {SCHEMA_VERSION}"
            )
        pre, self._preloaded = self._preloaded, None
        try:
            model = (
                pre
                if pre is not None and pre.model.bundle.path == path
                else ServingModel(RankingModel(path, verify=True))
            )
        except (BundleError, OSError, ValueError, KeyError, RuntimeError) as exc:
            raise BundleRefused("corrupt", f"{path}: {exc}") from None
        try:
            ranker = Ranker(model, self.ranker_config)
        except BundleError as exc:
            raise BundleRefused("incompatible", str(exc)) from None
        try:
            # Off the request path: fault in the index, exercise every rung, seed the cost model.
            ranker.warm()
        except (RankingError, ValueError, IndexError, RuntimeError) as exc:
            raise BundleRefused("warmup", f"{path} loads but cannot rank: {exc!r}") from None
        return ranker

    def _publish_metrics(self, ranker: Ranker, old: Ranker | None, seconds: float, trigger: str) -> None:
        m = ranker.model
        if old is not None and old.model.version != m.version:
            # Zero first: with multiprocess metrics remove() leaves the value in the
            # process's file, where it would keep reading 1.
            metrics.BUNDLE_INFO.labels(old.model.version).set(0)
            metrics.BUNDLE_INFO.remove(old.model.version)
        metrics.BUNDLE_INFO.labels(m.version).set(1)
        created = m.manifest.get("created_at")
        if created:
            metrics.BUNDLE_BUILD_TIME.set(_dt.datetime.fromisoformat(created).timestamp())
        metrics.BUNDLE_LOAD_TIME.set(self.loaded_at)
        metrics.BUNDLE_LOAD_DURATION.set(seconds)
        metrics.BUNDLE_RELOADS.labels(trigger, "loaded").inc()
        metrics.BUNDLE_REFUSED.set(0)
        metrics.SERVING.set(1)
        for source in ("bundle", "config", "default"):
            metrics.ANN_EFFORT.labels(source).set(ranker.ann_effort if source == ranker.ann_effort_source else 0)
            metrics.ANN_REFINE.labels(source).set(ranker.ann_refine if source == ranker.ann_refine_source else 0)
        if ranker.scoring_seconds_per_candidate is not None:
            metrics.SCORING_CANDIDATE_SECONDS.set(ranker.scoring_seconds_per_candidate)
        metrics.SCORING_TREES.set(ranker.scoring_trees)
        metrics.FIRST_PHASE_TREES.set(ranker.first_phase_trees)
        metrics.SECOND_PHASE_CANDIDATES.set(ranker.second_phase_candidates)
        metrics.SECOND_PHASE_CUT.set(1 if ranker.second_phase_cut else 0)
        if ranker.phase_seconds_per_candidate is not None:
            for phase, seconds in zip(("first", "second"), ranker.phase_seconds_per_candidate):
                metrics.PHASE_CANDIDATE_SECONDS.labels(phase).set(seconds)
