"""The Rank pipeline: resolve the user, choose the rung, retrieve, score, apply the rules."""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import numpy as np

from ranking import scoring
from ranking.budget import Budget
from ranking.errors import BundleError, FieldViolation, InvalidRequest
from ranking.features import FEATURE_NAMES, FeatureTables, Request
from ranking.model import Csr, RankingModel
from ranking.query import QueryLimits, RankQuery
from ranking.retrieval import ann_search, unique_in_order

FEATURES = ("retrieval", "popularity", "recent_popularity", "segment_popularity")


class Rung(enum.IntEnum):
    """The personalization ladder; numbers match ``one2one.v1.Strategy``."""

    POPULAR = 1
    SEGMENT = 2
    SESSION = 3
    ONE_TO_ONE = 4


@dataclass(frozen=True)
class RankerConfig:
    """Online pipeline settings; every default is written down here once."""

    n_candidates: int = 200
    popular_candidates: int = 50
    ann_effort: int = 128
    max_consumed_slack: int = 1000
    covis_candidates: int = 100
    limits: QueryLimits = field(default_factory=QueryLimits)


@dataclass
class RankResult:
    """What the pipeline answers; the server turns it into a ``RankResponse``."""

    item_ids: list[str]
    scores: list[float]
    rung: Rung
    model_version: str
    fallback_reason: str = ""
    degraded_stages: list[str] = field(default_factory=list)
    contributions: list[dict[str, float]] | None = None
    n_candidates: int = 0
    n_scored: int = 0
    stage_seconds: dict[str, float] = field(default_factory=dict)

    @property
    def degraded(self) -> bool:
        return bool(self.degraded_stages)


@dataclass
class Prepared:
    """One request up to scoring: the rung, candidate rows, their mask and feature matrix."""

    rung: Rung
    reason: str
    urow: int
    rows: np.ndarray
    mask: np.ndarray
    features: np.ndarray


def rows_match_any(csr: Csr, rows: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """For each row, whether any of its entries is in ``ids`` (vectorised)."""
    if len(rows) == 0 or len(ids) == 0:
        return np.zeros(len(rows), dtype=bool)
    starts = csr.indptr[rows].astype(np.int64)
    lengths = csr.indptr[rows + 1].astype(np.int64) - starts
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(len(rows), dtype=bool)
    owner = np.repeat(np.arange(len(rows)), lengths)
    offsets = np.arange(total) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    hits = np.isin(csr.indices[starts[owner] + offsets], ids)
    return np.bincount(owner[hits], minlength=len(rows)) > 0


class _StageClock:
    """Records how long each stage took, for the per-stage latency metrics."""

    def __init__(self, into: dict[str, float]):
        self.into = into
        self.t = time.perf_counter()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.into[stage] = now - self.t
        self.t = now


class Ranker:
    """Ranks items for one request against one loaded model.

    Parameters
    ----------
    model : RankingModel
        The bundle to serve from; the ranker never mutates it.
    config : RankerConfig
        Pipeline settings.
    reranker_features : bool
        Compute the reranker's features even though the bundle scores linearly
        (the builder does this to collect training rows from a bundle that has no
        reranker yet).
    """

    def __init__(self, model: RankingModel, config: RankerConfig | None = None, *,
                 reranker_features: bool = False):
        self.model = model
        self.config = config or RankerConfig()
        self.scorer = model.scorer
        self.tables: FeatureTables | None = None
        if reranker_features:
            self.tables = FeatureTables(model)
        if self.scorer.kind == "trees":
            # The trees index columns by position: the names must be exactly ours, in order.
            if tuple(model.feature_names) != FEATURE_NAMES:
                raise BundleError(f"bundle {model.version} was trained on features {model.feature_names}; "
                                  f"this code computes {list(FEATURE_NAMES)}: rebuild the bundle")
            self.tables = FeatureTables(model)
            self._feature_pos = []
        if self.scorer.kind != "trees":
            missing = [f for f in model.feature_names if f not in FEATURES]
            if missing:
                raise BundleError(f"bundle {model.version} scores features this code does not compute: {missing}")
            self._feature_pos = [FEATURES.index(f) for f in model.feature_names]

    # -- resolve ---------------------------------------------------------------
    def _segment_for(self, urow: int, attributes: dict[str, str]) -> int:
        m = self.model
        if urow >= 0 and m.user_segment[urow] >= 0:
            return int(m.user_segment[urow])
        keys = m.segments.keys(attributes) if attributes else []
        if keys:
            rows = m.segment_keys.lookup(keys)
            for r in rows:
                if r >= 0:
                    return int(r)
        return -1

    def _resolve(self, q: RankQuery) -> tuple[Rung, str, int, np.ndarray | None, int, np.ndarray]:
        """Choose the highest rung that can serve; returns (rung, reason, user row, query vector, segment, session rows)."""
        m = self.model
        urow = m.users.row(q.user_id)
        session = m.items.lookup(q.session_item_ids) if q.session_item_ids else np.zeros(0, np.int32)
        session = session[session >= 0]
        if urow >= 0 and m.user_has_history[urow]:
            return Rung.ONE_TO_ONE, "", urow, np.asarray(m.user_factors[urow], dtype=np.float32), -1, session
        reason = "no_user_id" if not q.user_id else ("unknown_user" if urow < 0 else "no_history")
        if len(session):
            vec = np.asarray(m.item_factors[session], dtype=np.float32)
            # Recent items weigh more: the session says what the visitor wants now.
            w = np.linspace(0.5, 1.0, len(session), dtype=np.float32)
            qvec = (vec * w[:, None]).sum(axis=0)
            return Rung.SESSION, reason, urow, qvec, self._segment_for(urow, q.attributes), session
        seg = self._segment_for(urow, q.attributes)
        if seg >= 0:
            return Rung.SEGMENT, reason, urow, None, seg, session
        return Rung.POPULAR, reason, urow, None, -1, session

    # -- retrieve --------------------------------------------------------------
    def _retrieve(self, q: RankQuery, rung: Rung, urow: int, qvec: np.ndarray | None, seg: int) -> np.ndarray:
        m, cfg = self.model, self.config
        if q.candidate_item_ids:
            return unique_in_order(m.items.lookup(q.candidate_item_ids))
        pools = []
        if qvec is not None:
            slack = 0
            if urow >= 0:
                slack = min(int(m.consumed.indptr[urow + 1] - m.consumed.indptr[urow]), cfg.max_consumed_slack)
            _, rows = ann_search(m.index, qvec[None, :], cfg.n_candidates + slack, cfg.ann_effort)
            pools.append(rows[0])
        if seg >= 0:
            pools.append(m.segment_popular.row(seg)[: cfg.n_candidates])
        n_pop = cfg.popular_candidates if pools else cfg.n_candidates
        pools.append(m.popular_items[:n_pop])
        return unique_in_order(np.concatenate(pools))

    # -- rules -----------------------------------------------------------------
    def _mask(self, q: RankQuery, rung: Rung, urow: int, cands: np.ndarray, session: np.ndarray) -> np.ndarray:
        m = self.model
        mask = np.zeros(len(cands), dtype=bool)
        if urow >= 0:
            mask |= np.isin(cands, m.consumed.row(urow))
        if q.exclude_item_ids:
            mask |= np.isin(cands, m.items.lookup(q.exclude_item_ids))
        if rung == Rung.SESSION and len(session):
            mask |= np.isin(cands, session)
        if q.include_categories:
            ids = m.category_names.lookup(q.include_categories)
            unknown = [c for c, i in zip(q.include_categories, ids) if i < 0]
            if len(unknown) == len(ids):
                raise InvalidRequest([FieldViolation(
                    "filter.include_categories", f"no category of the catalog matches {unknown[:5]}")])
            mask |= ~rows_match_any(m.item_categories, cands, ids[ids >= 0])
        if q.exclude_categories:
            ids = m.category_names.lookup(q.exclude_categories)
            mask |= rows_match_any(m.item_categories, cands, ids[ids >= 0])
        if q.min_price > 0 or q.max_price > 0:
            price = m.item_price[cands]
            ok = np.isfinite(price)
            if q.min_price > 0:
                ok &= price >= q.min_price
            if q.max_price > 0:
                ok &= price <= q.max_price
            mask |= ~ok
        return mask

    # -- features --------------------------------------------------------------
    def _features(self, cands: np.ndarray, qvec: np.ndarray | None, seg: int) -> np.ndarray:
        m = self.model
        full = np.zeros((len(cands), len(FEATURES)), dtype=np.float32)
        if len(cands) == 0:
            return full[:, self._feature_pos]
        if qvec is not None:
            dots = np.asarray(m.item_factors[cands], dtype=np.float32) @ qvec
            scale = float(np.max(np.abs(dots))) if len(dots) else 0.0
            # Scale per request so the embedding score is comparable across users.
            full[:, 0] = dots / scale if scale > 0 else 0.0
        full[:, 1] = m.item_popularity[cands]
        full[:, 2] = m.item_recent_popularity[cands]
        if seg >= 0:
            seg_items = m.segment_popular.row(seg)
            seg_scores = m.segment_popular.row_values(seg)
            order = np.argsort(seg_items, kind="stable")
            pos = np.searchsorted(seg_items[order], cands)
            pos = np.minimum(pos, max(len(seg_items) - 1, 0))
            if len(seg_items):
                hit = seg_items[order][pos] == cands
                full[:, 3] = np.where(hit, seg_scores[order][pos], 0.0)
        return full[:, self._feature_pos]

    def _more_candidates(self, q: RankQuery, urow: int, session: np.ndarray, cands: np.ndarray) -> np.ndarray:
        """Add the reranker's extra sources: neighbours of the user's recent and session items, recent popularity."""
        if self.tables is None or q.candidate_item_ids:
            return cands
        t, cfg = self.tables, self.config
        sources = np.concatenate([t.user_recent_items(urow) if urow >= 0 else np.zeros(0, np.int32), session])
        covis, _ = t.covis_from(sources.astype(np.int32))
        pools = [cands, covis[: cfg.covis_candidates], t.recent_popular_items[: cfg.popular_candidates]]
        ease = t.ease_all(t.history(urow, session))
        if ease is not None:
            n = min(cfg.covis_candidates, len(ease))
            pools.append(np.argpartition(-ease, n - 1)[:n].astype(np.int32))
        return unique_in_order(np.concatenate(pools).astype(np.int32))

    def prepare(self, q: RankQuery, clock: "_StageClock | None" = None) -> "Prepared":
        """Resolve, retrieve, mask and compute features: everything before scoring.

        The builder trains the reranker on exactly these rows and features, and the
        evaluation ranks through :meth:`rank`, so the three share one code path.
        """
        clock = clock or _StageClock({})
        rung, reason, urow, qvec, seg, session = self._resolve(q)
        clock.lap("resolve")
        cands = self._retrieve(q, rung, urow, qvec, seg)
        cands = self._more_candidates(q, urow, session, cands)
        mask = self._mask(q, rung, urow, cands, session)
        clock.lap("retrieve")
        if self.tables is not None:
            feats = self.tables.assemble(Request(int(rung), urow, qvec, seg, session, q.event_time), cands)
        else:
            feats = self._features(cands, qvec, seg)
        clock.lap("features")
        return Prepared(rung, reason, urow, cands, mask, feats)

    # -- rank ------------------------------------------------------------------
    def rank(self, q: RankQuery, budget: Budget | None = None) -> RankResult:
        """Rank items for one request.

        Parameters
        ----------
        q : RankQuery
            The request in domain form.
        budget : Budget, optional
            The request's deadline; unlimited when not given.

        Returns
        -------
        RankResult

        Raises
        ------
        InvalidRequest
            A field of ``q`` is malformed.
        """
        budget = budget or Budget.unlimited()
        m = self.model
        k = q.validate(self.config.limits)
        timings: dict[str, float] = {}
        clock = _StageClock(timings)

        prep = self.prepare(q, clock)
        rung, reason, cands, mask, feats = prep.rung, prep.reason, prep.rows, prep.mask, prep.features
        top = self.scorer.score_topk(feats, mask, k, deadline_ns=budget.deadline_ns)
        clock.lap("score")

        degraded = ["score"] if top.n_scored < len(cands) else []
        rows = cands[top.indices]
        contributions = None
        if q.explain:
            contrib, bias = self.scorer.contributions(feats[top.indices])
            contributions = [
                {**{name: float(v) for name, v in zip(m.feature_names, row)}, "bias": float(b)}
                for row, b in zip(contrib, bias)
            ]
        return RankResult(
            item_ids=m.items.id_of(rows),
            scores=[float(s) for s in top.scores],
            rung=rung,
            model_version=m.version,
            fallback_reason=reason,
            degraded_stages=degraded,
            contributions=contributions,
            n_candidates=len(cands),
            n_scored=int(top.n_scored),
            stage_seconds=timings,
        )
