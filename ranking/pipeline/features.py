"""Feature assembly for the learned reranker: item, user × item, user and request-context features per candidate.

The tables come from the bundle (written by ``index_builder.feature_tables``);
:func:`assemble` turns one request's candidates into the float32 matrix the
compiled scoring loop reads. NaN marks "unknown" (no price, no history): the
trees route it the way they learned to, so it is never confused with zero.
The same code serves ``Rank``, trains the reranker in the builder and runs
the evaluation, so the three can never disagree about what a feature means.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ranking.bundle.model import RankingModel
from ranking.bundle.schema import CONTEXT_FIELDS, WINDOW_DAYS  # noqa: F401  (WINDOW_DAYS re-exported for the builder)
from ranking.kernels.features import COLUMNS, FeatureKernel
from ranking.kernels.rows import ItemScratch
from ranking.kernels.scoring import TopK, TreeCall

DAY = 86_400
HOUR_BLOCKS = 4  # 6-hour blocks of the (UTC) day: night, morning, afternoon, evening
DAYS_OF_WEEK = 7
KEY_SHIFT = np.int64(1) << np.int64(32)  # item row and timestamp packed in one sortable int64

FEATURE_NAMES = (
    # retrieval
    "als_score",  # user (or session) embedding · item embedding; NaN without one
    "covis_user",  # item-to-item similarity summed over the user's recent items
    "covis_session",  # ... over this session's items
    "session_similarity",  # max cosine between the item and a session item; NaN without a session
    "ease_score",  # EASE item-item weights summed over the user's and session's items; NaN without
    # item
    "popularity",  # all-time distinct users, log-scaled to [0, 1]
    "popularity_7d",  # log1p(distinct events in the 7 days before the request)
    "popularity_30d",  # log1p(... 30 days ...)
    "trend",  # log of the 7-day rate over the 30-day rate
    "item_age_days",  # request time minus the item's first event; NaN if never seen
    "price",  # NaN when unknown
    "segment_popularity",  # popularity in the request's segment (0 outside its top list)
    # user × item
    "category_affinity",  # the user's share of events in the item's categories; NaN without history
    "price_fit",  # |log price - the user's mean log price|; NaN when either is unknown
    "touched_not_consumed",  # the user viewed/clicked/carted it but did not buy it
    # user × item re-purchase (index_builder.repeat), real-time purchases included; NaN unknown user
    "buy_count",  # baskets of the user's with the item (0 never bought)
    "buy_share",  # ... over the user's baskets; NaN for a user who never bought anything
    "days_since_bought",  # request time minus the user's last purchase of it; NaN never bought
    "buy_interval_days",  # the user's own mean interval for it, the item's when bought once; NaN never bought
    "buy_due",  # days_since_bought / buy_interval_days: 1 = due now; NaN never bought
    "in_last_basket",  # the item was in the user's last basket
    "item_repeat_rate",  # share of the item's buyers who bought it again (shrunk to its category)
    "user_repeat_share",  # share of the user's purchase lines that were re-purchases; NaN never bought
    # user
    "user_stage",  # 0 new, 1 developing, 2 established; NaN unknown user
    "user_value",  # log1p(consumed items)
    "user_recency_days",  # request time minus the user's last event; NaN without history
    "user_tenure_days",  # last minus first event
    # context × history
    "hour_item_lift",  # the item's share of events in the request's hour block / everyone's share
    "weekday_item_lift",  # ... on the request's day of week
    "hour_user_share",  # the user's share of own events in the request's hour block; NaN without history
    "rung",  # the ladder rung that retrieved the candidates (1 popular .. 4 one-to-one)
    "days_after_data_end",  # request time minus the bundle's last event: how stale the windows are
    # within-request standing: scores differ in scale from user to user, ranks do not
    "als_rank",  # rank of als_score among this request's candidates, 0 = best, / n; ties share their mean
    "ease_rank",
    "covis_user_rank",
    "popularity_30d_rank",
    # request context × history: NaN without a value in the request, or one the bundle has no column for
    "channel_item_lift",  # the item's share of events on the request's channel / everyone's share
    "device_item_lift",  # ... on its device
    "region_item_lift",  # ... in its region
    "channel_user_share",  # the user's share of own events on the request's channel; NaN without history
    "device_user_share",
    "region_user_share",
)
RANKED = (
    ("als_rank", "als_score"),
    ("ease_rank", "ease_score"),
    ("covis_user_rank", "covis_user"),
    ("popularity_30d_rank", "popularity_30d"),
)
N_FEATURES = len(FEATURE_NAMES)
if COLUMNS != FEATURE_NAMES:  # the compiled kernel writes its columns in this order
    raise ImportError(f"ranking.kernels._features writes {COLUMNS}, the features are {FEATURE_NAMES}: rebuild it")


@dataclass(frozen=True)
class Request:
    """What the features need to know about one request, already resolved by the pipeline."""

    rung: int
    urow: int
    qvec: np.ndarray | None
    seg: int
    session: np.ndarray
    event_time: float | None
    channel: str = ""
    device: str = ""
    region: str = ""
    # Purchases since the bundle's data end (real-time events): item rows and unix seconds.
    purchases: Purchases | None = None


@dataclass(frozen=True)
class Purchases:
    """A user's purchases after the bundle: item rows and their unix seconds, one per event."""

    rows: np.ndarray
    times: np.ndarray

    def __len__(self) -> int:
        return len(self.rows)


def window_counts_at(item_event_keys: np.ndarray, t: int, days: int, n_items: int) -> np.ndarray:
    """Events of every item in the ``days`` before ``t`` (float32, one per item row), from the
    sorted ``item row << 32 | unix seconds`` keys: what a request at ``t`` sees per candidate."""
    keys = np.asarray(item_event_keys)
    when = keys & (KEY_SHIFT - 1)
    inside = (when >= max(t - days * DAY, 0)) & (when < max(t, 0))
    return np.bincount((keys[inside] >> 32).astype(np.int64), minlength=n_items).astype(np.float32)


@dataclass(frozen=True)
class _ContextTable:
    """One context field's vocabulary and its item lifts / user shares (``index_builder.feature_tables``).

    Columns follow ``values`` (most frequent first); a last "other" column exists when the
    build capped the vocabulary, and then takes every value outside it.
    """

    index: dict[str, int]
    other: int  # the "other" column, -1 when the vocabulary was not capped
    item_lift: np.ndarray  # (n_items, n_columns) float16
    user_share: np.ndarray  # (n_users, n_columns) float16, NaN for users without a known value

    @classmethod
    def load(cls, bundle, field: str) -> _ContextTable:
        values = [str(v) for v in bundle.array(f"context_{field}_values")]
        item_lift = bundle.array(f"item_{field}_lift")
        other = len(values) if item_lift.shape[1] > len(values) else -1
        return cls({v: j for j, v in enumerate(values)}, other, item_lift, bundle.array(f"user_{field}_share"))

    def column(self, value: str) -> int:
        """The column of a request's value; -1 when it has none or the build saw no history for it."""
        value = value.strip()  # as the offline reader trims the logged values
        if not value:
            return -1
        return self.index.get(value, self.other)


class FeatureTables:
    """A request's feature rows through the compiled kernel: it holds the bundle's tables, this
    the context vocabularies a request's values are resolved against."""

    def __init__(self, model: RankingModel, scratch: ItemScratch, kernel: FeatureKernel):
        b = model.bundle
        # Every table is there: the bundle's schema (ranking.bundle.schema) was checked at load.
        self.context = {f: _ContextTable.load(b, f) for f in CONTEXT_FIELDS}
        self.data_end = int(model.manifest["data_window"]["end_unix"])
        self.model = model
        self.scratch = scratch
        self.kernel = kernel
        # A request at or after the data end sees the same windows for every item (the
        # bundle knows nothing later), which is every request a server answers: the
        # builder counted those once, so serving reads them instead of searching keys.
        self._t_end = self.data_end + 1

    # -- the matrix ------------------------------------------------------------------
    def assemble(self, req: Request, cands: np.ndarray) -> np.ndarray:
        """The (n_candidates, N_FEATURES) float32 matrix of one request, written by the
        compiled kernel (:class:`ranking.kernels.features.FeatureKernel`) in one call.

        Parameters
        ----------
        req : Request
        cands : np.ndarray
            Distinct item rows.
        """
        X = np.empty((len(cands), N_FEATURES), dtype=np.float32)
        if len(cands):
            with self.scratch.index(cands) as index:
                self.kernel.fill(X, index, **self.request_args(req))
        return X

    def assemble_and_score(self, req: Request, cands: np.ndarray, call: TreeCall) -> tuple[np.ndarray, TopK, int]:
        """The matrix, and the top-k of the tree-scoring ``call`` over it, in one compiled call.

        Returns
        -------
        (X, TopK, int)
            The matrix, the answer and the CLOCK_MONOTONIC nanoseconds at which the matrix
            was written (the end of the features stage).
        """
        X = np.empty((len(cands), N_FEATURES), dtype=np.float32)
        with self.scratch.index(cands) as index:
            top, filled_ns = self.kernel.fill_score(X, index, call, **self.request_args(req))
        return X, top, filled_ns

    def request_args(self, req: Request) -> dict:
        """The kernel's request arguments."""
        # Without an event time (offline callers only: the server fills in its clock) the
        # request is taken to come just after the bundle's data.
        t = int(req.event_time) if req.event_time is not None else self._t_end
        # The bundle knows nothing after its data end: a later request sees the last windows it has.
        t_pop = min(t, self._t_end)
        purchases = req.purchases
        return {
            "rung": req.rung,
            "urow": req.urow,
            "seg": req.seg,
            "t": t,
            "t_pop": t_pop,
            "at_end": t_pop == self._t_end,
            "block": (t // 3600) % 24 // (24 // HOUR_BLOCKS),
            "weekday": (t // DAY + 3) % 7,  # 1970-01-01 was a Thursday; Monday = 0
            "qvec": req.qvec,
            "session": req.session,
            "context_columns": tuple(self.context[f].column(getattr(req, f)) for f in CONTEXT_FIELDS),
            "purchases": (purchases.rows, purchases.times) if purchases is not None and len(purchases) else None,
        }
