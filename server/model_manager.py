"""Holds the ranker being served and swaps in a newly loaded bundle atomically."""
from __future__ import annotations

import datetime as _dt
import logging
import threading
import time
from pathlib import Path

from ranking.bundle import resolve_current
from ranking.errors import BundleError, Unavailable
from ranking.model import RankingModel
from ranking.pipeline import Ranker, RankerConfig
from server import metrics

log = logging.getLogger(__name__)


class ModelManager:
    """The current :class:`~ranking.pipeline.Ranker`, replaced whole, never mutated.

    Requests take a reference with :meth:`current` and finish on it even if a new
    bundle is swapped in meanwhile.
    """

    def __init__(self, artifacts: Path | str, ranker_config: RankerConfig,
                 preloaded: RankingModel | None = None):
        self.artifacts = Path(artifacts)
        self.ranker_config = ranker_config
        # A model the supervisor loaded before forking: its pages are shared copy-on-write.
        self._preloaded = preloaded
        self._ranker: Ranker | None = None
        self._lock = threading.Lock()

    def current(self) -> Ranker:
        """The ranker to serve with; raises Unavailable while no bundle is loaded."""
        ranker = self._ranker
        if ranker is None:
            raise Unavailable(f"no bundle loaded yet from {self.artifacts}")
        return ranker

    @property
    def loaded(self) -> bool:
        return self._ranker is not None

    def load_current(self) -> bool:
        """Load the bundle CURRENT names, if it is not already served.

        Returns
        -------
        bool
            True when a new bundle was swapped in. A bad bundle is refused (logged and
            counted); the one being served, if any, stays.
        """
        with self._lock:
            try:
                path = resolve_current(self.artifacts)
                if self._ranker is not None and self._ranker.model.bundle.path == path:
                    return False
                t0 = time.perf_counter()
                pre, self._preloaded = self._preloaded, None
                model = pre if pre is not None and pre.bundle.path == path else RankingModel(path, verify=True)
                ranker = Ranker(model, self.ranker_config)
                # Off the request path: touch the index and learn stage costs before the swap.
                ranker.warm()
                load_s = time.perf_counter() - t0
            except (BundleError, OSError, ValueError, RuntimeError) as exc:
                metrics.BUNDLE_LOAD_FAILURES.inc()
                log.error("refused bundle", extra={"artifacts": str(self.artifacts), "error": str(exc),
                                                   "still_serving": self._ranker.model.version if self._ranker else None})
                return False
            old = self._ranker
            self._ranker = ranker
        m = ranker.model
        if old is not None:
            metrics.BUNDLE_INFO.remove(old.model.version)
        metrics.BUNDLE_INFO.labels(m.version).set(1)
        created = m.manifest.get("created_at")
        if created:
            metrics.BUNDLE_BUILD_TIME.set(_dt.datetime.fromisoformat(created).timestamp())
        metrics.BUNDLE_LOAD_TIME.set(time.time())
        metrics.BUNDLE_LOAD_DURATION.set(load_s)
        metrics.SERVING.set(1)
        log.info("serving bundle", extra={"version": m.version, "items": m.n_items, "users": m.n_users,
                                          "load_seconds": round(load_s, 3)})
        return True
