"""The Rank pipeline: resolve the user, choose the rung, retrieve, score, apply the rules."""

from __future__ import annotations

import dataclasses
import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from ranking.bundle.model import RankingModel
from ranking.config import (  # re-exported: their home is the light ranking.config
    RankerConfig,
    effective_ann_effort,
    effective_ann_refine,
    effective_second_phase,
)
from ranking.errors import BundleError, FieldViolation, InvalidRequest
from ranking.kernels import scoring
from ranking.kernels.features import Answer, Demotions, RealtimeOffsets
from ranking.kernels.reranker import TreeScorer
from ranking.kernels.scoring import TopK, TreeCall
from ranking.pipeline.budget import Budget, CostModel, RetrievalPlan
from ranking.pipeline.features import FEATURE_NAMES, FeatureTables, Purchases, Request
from ranking.pipeline.query import RankQuery
from ranking.pipeline.serving import ServingModel
from ranking.retrieval.batcher import AnnBatcher
from ranking.retrieval.search import Retriever

if TYPE_CHECKING:
    from ranking.pipeline.overlay import RankOverlay

_NO_ROWS = np.zeros(0, np.int32)
_NO_MASK = np.zeros(0, bool)
FEATURES = ("retrieval", "popularity", "recent_popularity", "segment_popularity")


class Rung(enum.IntEnum):
    """The personalization ladder; numbers match ``one2one.v1.Strategy``."""

    POPULAR = 1
    SEGMENT = 2
    SESSION = 3
    ONE_TO_ONE = 4


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
    applied_rules: list[str] = field(default_factory=list)
    # How the embedding search found the candidates: "exact_head", "ann" or "none".
    retrieval: str = "none"

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
    features: np.ndarray | None
    offsets: np.ndarray | None = None
    offset_parts: dict[str, np.ndarray] = field(default_factory=dict)
    retrieval: str = "none"
    # What the feature kernel is to write when rank() fuses features and scoring (prepare(fuse=True)).
    request: Request | None = None
    # The candidate call's (pool, sources) when rank() is to merge, write and score in one call
    # (prepare(fuse=True) with nothing to apply between them in NumPy): rows and mask are then empty.
    sources: tuple[np.ndarray, dict] | None = None
    # The real-time offsets and the rules' demotions that one call applies after the merge.
    realtime: RealtimeOffsets | None = None
    demotions: Demotions | None = None


class _StageClock:
    """Records how long each stage took, for the per-stage latency metrics."""

    def __init__(self, into: dict[str, float]):
        self.into = into
        self.t = time.perf_counter()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.into[stage] = now - self.t
        self.t = now


def _no_category(include: list[str]) -> FieldViolation:
    return FieldViolation("filter.include_categories", f"no category of the catalog matches {include[:5]}")


class Ranker:
    """Ranks items for one request against one loaded model.

    Parameters
    ----------
    model : RankingModel or ServingModel
        The bundle to serve from; the ranker never mutates it. Given a RankingModel, the
        ranker builds its own ServingModel; the server passes the one its supervisor
        built before forking.
    config : RankerConfig
        Pipeline settings.
    reranker_features : bool
        Compute the reranker's features even though the bundle scores linearly
        (the builder does this to collect training rows from a bundle that has no
        reranker yet).
    """

    def __init__(
        self, model: RankingModel | ServingModel, config: RankerConfig | None = None, *, reranker_features: bool = False
    ):
        self.serving = model if isinstance(model, ServingModel) else ServingModel(model)
        model = self.model = self.serving.model
        self.config = config or RankerConfig()
        self.scorer = self.serving.scorer
        self.feature_names = self.serving.feature_names
        self.scratch = self.serving.scratch
        # Candidate merging and exclusions run in the compiled kernel, whatever the scorer.
        self.kernel = self.serving.feature_kernel()
        self.tables: FeatureTables | None = None
        if reranker_features:
            self.tables = FeatureTables(model, self.scratch, self.kernel)
        if self.scorer.kind == "trees":
            # The trees index columns by position: the names must be exactly ours, in order.
            if tuple(self.feature_names) != FEATURE_NAMES:
                raise BundleError(
                    f"bundle {model.version} was trained on features {self.feature_names}; "
                    f"this code computes {list(FEATURE_NAMES)}: rebuild the bundle"
                )
            self.tables = FeatureTables(model, self.scratch, self.kernel)
            self._feature_pos = []
        if self.scorer.kind != "trees":
            missing = [f for f in self.feature_names if f not in FEATURES]
            if missing:
                raise BundleError(f"bundle {model.version} scores features this code does not compute: {missing}")
            self._feature_pos = [FEATURES.index(f) for f in self.feature_names]
        self.costs = CostModel()
        # The operator's ann_effort, else the one the builder tuned for this bundle's recall.
        self.ann_effort, self.ann_effort_source = effective_ann_effort(self.config, model.manifest)
        n_head = self.config.exact_head_items
        # The operator's ann_refine, else the one the builder tuned with the effort (1: none).
        self.ann_refine, self.ann_refine_source = effective_ann_refine(self.config, model.manifest)
        head = self.serving.exact_head(n_head) if n_head > 0 else None
        retriever = Retriever(model.index, head, model.item_factors, self.ann_refine)
        self.ann = AnnBatcher(retriever, self.config.ann_batch_size, self.config.ann_batch_wait_us)
        # Offsets (rules, real-time signals) are given in units of the model's typical
        # score spread among a request's candidates, measured by warm(): a penalty of 1
        # then means the same for a linear model and for trees.
        self.offset_scale = 1.0
        self.scoring_seconds_per_candidate: float | None = None
        # Trees walked per candidate (0: the linear scorer), for the operator's view of the cost.
        trees = getattr(self.scorer, "trees", None)
        self.scoring_trees = int(trees.n_trees) if trees is not None else 0
        # Phased scoring: the first phase's trees (a prefix of every bag) over every candidate,
        # the full model over the best second_phase_candidates (0: one phase). Without the
        # bundle's split there is no first phase to run.
        self.phases = getattr(self.scorer, "phases", None)
        self.first_phase_trees = self.phases.n_first if self.phases is not None else 0
        n_second, self.second_phase_source = effective_second_phase(self.config, model.manifest)
        self.second_phase_candidates = n_second if self.phases is not None else 0
        # Seconds per candidate of the first phase and of the trees the second adds, measured by
        # warm(); None until then or without phases.
        self.phase_seconds_per_candidate: tuple[float, float] | None = None
        # True when warm() found the bundle's scoring over config.scoring_budget_ms and cut
        # second_phase_candidates to fit.
        self.second_phase_cut = False

    def warm(self, n_requests: int = 16) -> None:
        """Answer typical requests before serving: faults in the arrays and the index,
        exercises every rung (a bundle that loads but cannot rank fails here, not on a
        request) and seeds the cost model the budget planner uses."""
        m = self.model
        users = np.flatnonzero(np.asarray(m.user_has_history[: max(n_requests * 4, 1)]))[:n_requests]
        for row in users:
            self.rank(RankQuery(user_id=str(m.users.ids[row])))
        if m.n_items:
            self.rank(RankQuery(session_item_ids=m.items.id_of(np.arange(min(2, m.n_items)))))
        self.rank(RankQuery())
        spreads, per_candidate, first_phase = [], [], []
        for row in users[:8]:
            prep = self.prepare(RankQuery(user_id=str(m.users.ids[row])))
            ok = ~prep.mask
            if prep.features is not None and ok.sum() > 1:
                feats = np.ascontiguousarray(prep.features[ok])
                scores = self.scorer.score_topk(feats, None, int(ok.sum())).scores
                spreads.append(float(np.std(scores)))
                # The bundle's scoring cost on this machine: the fastest of a few repeats
                # (the least disturbed by other work), per candidate scored.
                best = np.inf
                for _ in range(3):
                    t0 = time.perf_counter()
                    self.scorer.score_topk(feats, None, 10)
                    best = min(best, time.perf_counter() - t0)
                per_candidate.append(best / len(feats))
                if self.phases is not None:
                    # The first phase alone: phased with one row in the second.
                    best = np.inf
                    for _ in range(3):
                        t0 = time.perf_counter()
                        self.scorer.score_topk(feats, None, 1, n_second=1)
                        best = min(best, time.perf_counter() - t0)
                    first_phase.append(best / len(feats))
        if spreads and np.median(spreads) > 0:
            self.offset_scale = float(np.median(spreads))
        # Seconds to score one candidate (median over the warm-up users), and so one request at
        # n_candidates; None when no warm-up user had features to score.
        self.scoring_seconds_per_candidate = float(np.median(per_candidate)) if per_candidate else None
        if self.phases is not None and first_phase:
            first = min(float(np.median(first_phase)), self.scoring_seconds_per_candidate or 0.0)
            self.phase_seconds_per_candidate = (first, max((self.scoring_seconds_per_candidate or 0.0) - first, 0.0))
        self._fit_scoring_budget()

    def scoring_ms(self, n: int, n_second: int) -> float:
        """Estimated milliseconds to score ``n`` candidates with ``n_second`` in the second phase
        (0: one phase), from the costs warm() measured; 0 before warm()."""
        full = (self.scoring_seconds_per_candidate or 0.0) * 1e3
        if self.phase_seconds_per_candidate is None or n_second <= 0 or n_second >= n:
            return full * n
        first, rest = self.phase_seconds_per_candidate
        return (first * n + rest * n_second) * 1e3

    def _fit_scoring_budget(self) -> None:
        """Cut the second phase when the bundle's scoring is over ``config.scoring_budget_ms``.

        The cost model's plan lets the work after resolving use ``safety * budget`` (less its
        fixed part); scoring gets what the other per-candidate work (retrieval, features) leaves
        of it at ``n_candidates``. A model over that share still serves: phased, with the second
        phase as large as fits (at least one candidate), and ``second_phase_cut`` set.
        """
        budget_ms, n = self.config.scoring_budget_ms, self.config.n_candidates
        costs = self.costs
        if budget_ms <= 0 or self.scoring_seconds_per_candidate is None or costs.per_candidate_ms is None:
            return
        if self.phase_seconds_per_candidate is None:
            return
        current = self.second_phase_candidates
        other_ms = max(costs.per_candidate_ms * n - self.scoring_ms(n, current), 0.0)
        share_ms = budget_ms * costs.safety - (costs.fixed_ms or 0.0) - other_ms
        fit, cut = costs.plan_second_phase(share_ms / costs.safety, n, current, *self._phase_ms())
        if cut:
            self.second_phase_candidates = fit
            self.second_phase_cut = True

    def _phase_ms(self) -> tuple[float, float]:
        first, rest = self.phase_seconds_per_candidate or (0.0, 0.0)
        return first * 1e3, rest * 1e3

    def _debug_delay(self, stage: str, n: int) -> None:
        us = self.config.debug_delay_us_per_candidate.get(stage)
        if us:
            time.sleep(us * n / 1e6)

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

    def _resolve(
        self, q: RankQuery, max_rung: Rung = Rung.ONE_TO_ONE, user_vector: np.ndarray | None = None
    ) -> tuple[Rung, str, int, np.ndarray | None, int, np.ndarray]:
        """Choose the highest rung that can serve.

        Returns (rung, reason, user row, query vector, segment, session rows).

        ``max_rung`` caps the ladder (an experiment arm); ``user_vector`` is the user's vector
        re-solved from real-time events, which serves ONE_TO_ONE even for a user the bundle
        does not know (an anonymous session with events of its own).
        """
        m = self.model
        urow = m.users.row(q.user_id)
        session = _NO_ROWS
        if q.session_item_ids:
            session = m.items.lookup(q.session_item_ids)
            session = session[session >= 0]
        if max_rung >= Rung.ONE_TO_ONE and user_vector is not None:
            return Rung.ONE_TO_ONE, "", urow, user_vector, -1, session
        if urow >= 0 and m.user_has_history[urow] and max_rung >= Rung.ONE_TO_ONE:
            return Rung.ONE_TO_ONE, "", urow, np.asarray(m.user_factors[urow], dtype=np.float32), -1, session
        reason = "no_user_id" if not q.user_id else ("unknown_user" if urow < 0 else "no_history")
        if max_rung < Rung.ONE_TO_ONE and urow >= 0 and m.user_has_history[urow]:
            reason = "variant"
        if len(session) and max_rung >= Rung.SESSION:
            vec = np.asarray(m.item_factors[session], dtype=np.float32)
            # Recent items weigh more: the session says what the visitor wants now.
            w = np.linspace(0.5, 1.0, len(session), dtype=np.float32)
            qvec = (vec * w[:, None]).sum(axis=0)
            # Items the bundle never saw an event of have no factors: a session of only those
            # says nothing, and a zero vector would rank every item alike.
            if qvec.any():
                return Rung.SESSION, reason, urow, qvec, self._segment_for(urow, q.attributes), session
        seg = self._segment_for(urow, q.attributes)
        if seg >= 0 and max_rung >= Rung.SEGMENT:
            return Rung.SEGMENT, reason, urow, None, seg, session
        return Rung.POPULAR, reason, urow, None, -1, session

    # -- candidates and exclusions ------------------------------------------------
    def _candidates(
        self,
        q: RankQuery,
        rung: Rung,
        urow: int,
        personal: int,
        qvec: np.ndarray | None,
        seg: int,
        session: np.ndarray,
        purchases: Purchases | None,
        overlay: RankOverlay | None,
        n_candidates: int,
        effort: int,
        remaining_ms: float = float("inf"),
    ) -> tuple[np.ndarray, dict, str]:
        """The candidate call's arguments but the segment, session and purchases (which the
        request carries to the features too): the pool and the other sources' counts and the
        exclusions; and how the embedding search found the pool ("exact_head", "ann", "none").

        Python resolves the request's small arrays and runs the embedding search; one compiled
        call (:meth:`ranking.kernels.features.FeatureKernel.candidates`) merges every source and
        applies the exclusions. The sources: the search's rows (or the caller's own candidates,
        alone), the segment's and everyone's popular items; with the reranker's tables the
        extra sources of ``personal``'s history and the session (the due purchases on the
        ONE_TO_ONE rung, co-visitation neighbours, recent popularity, EASE), each shrunk with
        the budget's plan as the search is. Excluded: what ``urow`` consumed, the request's
        and real-time exclusions, the session's own items on the SESSION rung, and the
        request's category and price filters.
        """
        m, cfg = self.model, self.config
        pool: np.ndarray = _NO_ROWS
        path, searched = "none", False
        if q.candidate_item_ids:
            pool = m.items.lookup(q.candidate_item_ids)
        elif qvec is not None and effort > 0:  # effort 0: the cheapest plan, no search
            slack = min(m.consumed.row_len(urow), cfg.max_consumed_slack) if urow >= 0 else 0
            pool, exact = self.ann.search(qvec, n_candidates + slack, effort, remaining_ms)
            path, searched = ("exact_head" if exact else "ann"), True
        sources: dict = {}
        if not q.candidate_item_ids:
            sources = {
                "n_seg": n_candidates if seg >= 0 else 0,
                "n_popular": min(cfg.popular_candidates, n_candidates) if searched or seg >= 0 else n_candidates,
            }
            if self.tables is not None:
                scale = n_candidates / max(cfg.n_candidates, 1)
                n_covis = max(1, int(cfg.covis_candidates * scale))
                sources |= {
                    "source_user": personal,
                    "n_covis": n_covis,
                    "n_recent_popular": max(1, int(cfg.popular_candidates * scale)),
                    "n_ease": n_covis,
                }
                if rung == Rung.ONE_TO_ONE and cfg.buy_again_candidates > 0:
                    sources |= {
                        "n_again": max(1, int(cfg.buy_again_candidates * scale)),
                        "t": int(q.event_time) if q.event_time is not None else self.tables.data_end + 1,
                    }
        excluded = [m.items.lookup(q.exclude_item_ids)] if q.exclude_item_ids else []
        if rung == Rung.SESSION and len(session):
            excluded.append(session)
        if overlay is not None and len(overlay.exclude_rows):
            excluded.append(overlay.exclude_rows)
        sources |= {
            "mask_user": urow,
            "exclude": np.concatenate(excluded) if excluded else _NO_ROWS,
            **self._category_filter(q, overlay),
            "min_price": q.min_price,
            "max_price": q.max_price,
        }
        return pool, sources, path

    def _merge(
        self, pool: np.ndarray, sources: dict, seg: int, session: np.ndarray, purchases: Purchases | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """The candidates of :meth:`_candidates`' arguments, merged, and which to exclude, in one
        compiled call (the request's first of two when something applies before the features)."""
        return self.kernel.candidates(
            self.scratch,
            pool,
            seg=seg,
            session=session,
            purchases=(purchases.rows, purchases.times) if purchases is not None else None,
            **sources,
        )

    def _category_filter(self, q: RankQuery, overlay: RankOverlay | None = None) -> dict:
        """The request's category filters as the kernel's codes: bit 0 excludes, bit 1 must be
        present; then the overlay's masking rules folded in (``RankOverlay.category_codes``)."""
        codes, include = self._request_codes(q)
        if overlay is not None and overlay.rules:
            codes, include = overlay.category_codes(self.model, codes, include)
        return {} if codes is None else {"category_codes": codes, "include_bits": include}

    def violations(self, q: RankQuery) -> list[FieldViolation]:
        """Every problem of ``q``, none when it can be ranked: its fields' (``RankQuery.validate``)
        and an include filter that names no category of this bundle's catalogue."""
        out = []
        try:
            q.validate(self.config.limits)
        except InvalidRequest as exc:
            out.extend(exc.violations)
        if q.include_categories and not (self.model.category_names.lookup(q.include_categories) >= 0).any():
            out.append(_no_category(q.include_categories))
        return out

    def _request_codes(self, q: RankQuery) -> tuple[np.ndarray | None, int]:
        if not q.include_categories and not q.exclude_categories:
            return None, 0
        m = self.model
        codes = np.zeros(len(m.category_names), np.uint32)
        include = 0
        if q.include_categories:
            ids = m.category_names.lookup(q.include_categories)
            if not (ids >= 0).any():
                raise InvalidRequest([_no_category(q.include_categories)])
            codes[ids[ids >= 0]] |= np.uint32(2)
            include = 2
        if q.exclude_categories:
            ids = m.category_names.lookup(q.exclude_categories)
            codes[ids[ids >= 0]] |= np.uint32(1)
        return codes, include

    # -- features --------------------------------------------------------------
    def _score(
        self,
        prep: Prepared,
        k: int,
        budget: Budget,
        offsets: np.ndarray | None,
        clock: _StageClock,
        timings: dict[str, float],
    ) -> tuple[TopK, np.ndarray | None, bool]:
        """The top-k of candidates already merged (and their features, when written here), and
        whether the second phase was cut to the time left."""
        cands, mask, feats = prep.rows, prep.mask, prep.features
        n_second, cut = self.second_phase_candidates, False
        if self.phase_seconds_per_candidate is not None and budget.deadline_ns:
            n_second, cut = self.costs.plan_second_phase(budget.remaining_ms(), len(cands), n_second, *self._phase_ms())
        if prep.request is not None:
            # One compiled call writes the features and scores them (ranking.kernels.features).
            scorer = self.scorer
            assert self.tables is not None and isinstance(scorer, TreeScorer)
            call = TreeCall.prepare(
                len(cands),
                len(FEATURE_NAMES),
                scorer.trees,
                scorer.phases,
                mask,
                k,
                n_second,
                offsets,
                budget.deadline_ns,
            )
            feats, top, filled_ns = self.tables.assemble_and_score(prep.request, cands, call)
            now = time.perf_counter()
            scored_s = max(time.monotonic_ns() - filled_ns, 0) / 1e9
            timings["features"] = max(now - clock.t - scored_s, 0.0)
            timings["score"] = scored_s
            clock.t = now
        else:
            assert feats is not None
            top = self.scorer.score_topk(
                feats, mask, k, offsets=offsets, deadline_ns=budget.deadline_ns, n_second=n_second
            )
            clock.lap("score")
        return top, feats, cut

    def fill_score(self, prep: Prepared, k: int, budget: Budget | None = None) -> Answer:
        """The candidates of ``prep`` (from ``prepare(fuse=True)``, with ``sources`` set)
        merged, their features written and scored, the top ``k`` kept, in one compiled call
        (``ranking.kernels.features.FeatureKernel.candidates_fill_score``) under ``budget``'s
        deadline: the work of a Rank between the search and the response."""
        if prep.sources is None or prep.request is None or self.tables is None:
            raise ValueError("fill_score takes a request prepared with fuse=True that left its sources to the call")
        scorer = self.scorer
        assert isinstance(scorer, TreeScorer)
        budget = budget or Budget.unlimited()
        pool, sources = prep.sources
        plan = None
        if self.phase_seconds_per_candidate is not None and budget.deadline_ns:
            plan = (*self._phase_ms(), self.costs.safety)
        return self.kernel.candidates_fill_score(
            self.scratch,
            pool,
            self.tables.request_args(prep.request),
            trees=scorer.trees,
            phases=scorer.phases,
            k=k,
            n_second=self.second_phase_candidates,
            deadline_ns=budget.deadline_ns,
            plan=plan,
            realtime=prep.realtime,
            offset_scale=self.offset_scale,
            demotions=prep.demotions,
            **sources,
        )

    def _merge_fill_score(
        self, prep: Prepared, k: int, budget: Budget, clock: _StageClock, timings: dict[str, float]
    ) -> Answer:
        """:meth:`fill_score`, its stages timed from the call's own clock."""
        ans = self.fill_score(prep, k, budget)
        end_ns, now = time.monotonic_ns(), time.perf_counter()
        total = now - clock.t
        if ans.top is None:
            timings["retrieve"] = total
        else:
            scored = max(end_ns - ans.filled_ns, 0) / 1e9
            filled = max(ans.filled_ns - ans.merged_ns, 0) / 1e9
            timings["retrieve"] = max(total - scored - filled, 0.0)
            timings["features"] = filled
            timings["score"] = scored
        clock.t = now
        return ans

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

    def prepare(
        self,
        q: RankQuery,
        clock: _StageClock | None = None,
        *,
        overlay: RankOverlay | None = None,
        plan: RetrievalPlan | None = None,
        budget: Budget | None = None,
        fuse: bool = False,
    ) -> Prepared:
        """Resolve, retrieve, mask and compute features: everything before scoring.

        The builder trains the reranker on exactly these rows and features, and the
        evaluation ranks through :meth:`rank`, so the three share one code path.
        ``overlay`` (real-time state, rules, experiment variant), ``plan`` (the budget's
        candidate count and effort) and ``budget`` (features are skipped once it has
        run out: ``features`` is then None) come from :meth:`rank`. With ``fuse`` (trees
        only) the features are left to :meth:`rank`, which has the kernel write and score
        them in one call: ``features`` is None and ``request`` says what to write.
        """
        clock = clock or _StageClock({})
        cfg = self.config
        if overlay is None:
            rung, reason, urow, qvec, seg, session = self._resolve(q)
        else:
            rung, reason, urow, qvec, seg, session = self._resolve(
                q, Rung(overlay.variant.max_rung), overlay.user_vector
            )
        if overlay is not None and len(overlay.recent_rows):
            # What the user did since the bundle counts as this session's items.
            session = self.scratch.unique_in_order(np.concatenate([session, overlay.recent_rows]))
        clock.lap("resolve")
        n_cands, effort = (plan.n_candidates, plan.effort) if plan else (cfg.n_candidates, self.ann_effort)
        remaining = budget.remaining_ms() if budget else float("inf")
        purchases = overlay.purchases if overlay is not None else None
        # A variant capped below the user's rung (an experiment's POPULAR or SEGMENT arm) ranks
        # as the lower rung would for a visitor: the user's history feeds neither candidates
        # nor features, only the exclusions, so an arm measures what its rung is worth.
        personal = -1 if reason == "variant" else urow
        if personal < 0:
            purchases = None
        pool, sources, path = self._candidates(
            q, rung, urow, personal, qvec, seg, session, purchases, overlay, n_cands, effort, remaining
        )
        scoring = (budget is None or not budget.expired()) and (plan is None or plan.score)
        if (
            fuse
            and scoring
            and self.tables is not None
            and self.scorer.kind == "trees"
            and not self.config.debug_delay_us_per_candidate
            and (overlay is None or not overlay.rules_adjust_candidates())
        ):
            # Nothing to apply between the merge and the features in NumPy: rank() does both, the
            # real-time offsets, the rules' demotions and the scoring in one compiled call.
            request = Request(
                int(rung), personal, qvec, seg, session, q.event_time, q.channel, q.device, q.region, purchases
            )
            realtime = overlay.realtime_offsets(self.model) if overlay is not None else None
            demotions = overlay.demotions(self.model) if overlay is not None else None
            return Prepared(
                rung,
                reason,
                urow,
                _NO_ROWS,
                _NO_MASK,
                None,
                None,
                {},
                path,
                request,
                (pool, sources),
                realtime,
                demotions,
            )
        cands, mask = self._merge(pool, sources, seg, session, purchases)
        self._debug_delay("retrieve", len(cands))
        offsets: np.ndarray | None = None
        offset_parts: dict[str, np.ndarray] = {}
        if overlay is not None:
            # The masking rules were applied in the merge, unless they need more bits than the codes have.
            rules = None if overlay.masks_in_merge() else overlay.rule_mask(self.model, cands)
            if rules is not None:
                mask |= rules
            offsets, offset_parts = overlay.offsets(self.model, cands)
        clock.lap("retrieve")
        feats = None
        if scoring and (budget is None or not budget.expired()):
            if self.tables is not None:
                request = Request(
                    int(rung), personal, qvec, seg, session, q.event_time, q.channel, q.device, q.region, purchases
                )
                if fuse and self.scorer.kind == "trees":
                    self._debug_delay("features", len(cands))
                    return Prepared(rung, reason, urow, cands, mask, None, offsets, offset_parts, path, request)
                feats = self.tables.assemble(request, cands)
            else:
                feats = self._features(cands, qvec, seg)
            self._debug_delay("features", len(cands))
            clock.lap("features")
        return Prepared(rung, reason, urow, cands, mask, feats, offsets, offset_parts, path)

    # -- rank ------------------------------------------------------------------
    def rank(
        self, q: RankQuery, budget: Budget | None = None, overlay: RankOverlay | None = None, *, cheapest: bool = False
    ) -> RankResult:
        """Rank items for one request.

        Parameters
        ----------
        q : RankQuery
            The request in domain form.
        budget : Budget, optional
            The request's deadline; unlimited when not given.
        overlay : RankOverlay, optional
            Real-time events, context rules and experiment variant for this request
            (see :mod:`ranking.pipeline.overlay`); none when not given.
        cheapest : bool
            Answer by the cheapest path whatever the budget says: no ANN search, a
            minimal candidate set from the precomputed lists, no features or scoring
            (a request that waited too long for a pipeline slot).

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
        try:
            k = q.validate(self.config.limits)
        except InvalidRequest:
            raise InvalidRequest(self.violations(q)) from None
        timings: dict[str, float] = {}
        clock = _StageClock(timings)

        if overlay is not None and not overlay.variant.use_context:
            # A variant without context ranks as if the request carried none.
            q = dataclasses.replace(q, session_item_ids=[], attributes={}, channel="", device="", region="")
        # Degradation order when time is short (docs/operations.md, "The request budget"):
        # 1. fewer candidates and less ANN effort ("retrieve"), planned from learned costs;
        # 2. fewer candidates scored by the full model: the second phase of phased scoring
        #    shrinks to what the remaining time affords ("second_phase"), and stops at the
        #    deadline;
        # 3. fewer candidates scored: the scoring loop stops at the deadline ("score");
        # 4. no scoring at all: candidates in retrieval order ("retrieval_order").
        if cheapest:
            plan = RetrievalPlan(self.costs.min_candidates, 0, True, score=False)
        else:
            plan = self.costs.plan(budget.remaining_ms(), self.config.n_candidates, self.ann_effort)
        degraded = ["retrieve"] if plan.cut else []
        started = time.perf_counter()
        prep = self.prepare(q, clock, overlay=overlay, plan=plan, budget=budget, fuse=True)
        rung, reason, cands, mask, feats = prep.rung, prep.reason, prep.rows, prep.mask, prep.features
        offsets, offset_parts = prep.offsets, prep.offset_parts
        if offsets is not None and self.offset_scale != 1.0:
            offsets = offsets * np.float32(self.offset_scale)
            offset_parts = {name: part * np.float32(self.offset_scale) for name, part in offset_parts.items()}
        scored: tuple[TopK, np.ndarray | None, bool] | None = None
        if prep.sources is not None:
            # One compiled call merged, planned the second phase, wrote the features and scored;
            # its answer stands even if the deadline passed during it (its loop stopped there).
            fused = self._merge_fill_score(prep, k, budget, clock, timings)
            cands, mask, offsets, offset_parts = fused.rows, fused.mask, fused.offsets, fused.offset_parts
            if fused.top is not None:  # None: the deadline had passed once they were merged
                scored = fused.top, fused.features, fused.second_cut
        elif (feats is not None or prep.request is not None) and not budget.expired():
            scored = self._score(prep, k, budget, offsets, clock, timings)
        if scored is None:
            order = np.linspace(1.0, 0.0, len(cands), endpoint=False, dtype=np.float32)
            if offsets is not None:
                # Rules and real-time demotions still hold when there is no time to score.
                order = order + offsets
            top = scoring.topk(order, mask, k)
            degraded.append("retrieval_order")
            feats = None
        else:
            top, feats, cut = scored
            if cut:
                degraded.append("second_phase")
            if top.second_cut and "second_phase" not in degraded:
                degraded.append("second_phase")
            if top.n_scored < len(cands):
                degraded.append("score")
            else:
                self.costs.observe(len(cands), 0.0, (time.perf_counter() - started) * 1000.0)

        rows = cands.take(top.indices)
        contributions = None
        if q.explain and feats is not None:
            contrib, bias = self.scorer.contributions(feats[top.indices])
            contributions = [
                {**{name: float(v) for name, v in zip(self.feature_names, row)}, "bias": float(b)}
                for row, b in zip(contrib, bias)
            ]
            for name, part in offset_parts.items():
                for c, v in zip(contributions, part[top.indices]):
                    c[name] = float(v)
        return RankResult(
            item_ids=m.items.id_of(rows),
            scores=top.scores.tolist(),  # Python floats, as float() of each
            rung=rung,
            model_version=m.version,
            fallback_reason=reason,
            degraded_stages=degraded,
            contributions=contributions,
            n_candidates=len(cands),
            n_scored=int(top.n_scored),
            stage_seconds=timings,
            applied_rules=overlay.applied_rules if overlay is not None else [],
            retrieval=prep.retrieval,
        )
