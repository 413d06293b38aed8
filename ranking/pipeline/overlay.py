"""The per-request overlay on a bundle: what real-time events, context rules and the experiment
variant change about one Rank (query vector, rung cap, mask, score offsets, explain)."""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from ranking.config import OverlaySettings  # re-exported: its home is the light ranking.config
from ranking.kernels.features import Demotions, RealtimeOffsets
from ranking.pipeline.categories import in_categories
from ranking.pipeline.features import Purchases
from ranking.policy.experiments import FULL, Variant
from ranking.policy.rules import Rule
from ranking.realtime.events import NEGATIVE_EVENT_TYPES, Event
from ranking.realtime.user_state import HeldEvents, HeldPurchases, Weighting, fold_in, item_gram

# The builder stores the Gram matrix in the bundle. A bundle without it (made by hand, or
# by an older builder) gets it computed: up to this many multiply-adds (items × k²) on the
# request that first needs it (tens of ms at most); a larger catalog in a background
# thread (a million items at k=64 take seconds), and until then its requests are served
# without the re-solved vector and skip penalties -- purchases are still excluded.
SYNC_GRAM_LIMIT = 20_000_000
MAX_RECENT = 20
DAY_SECONDS = 86_400
# A customer with fewer events is read by a plain pass over them; with more, through digests.
DIGEST_MIN_EVENTS = 64
_NEGATIVE = frozenset(NEGATIVE_EVENT_TYPES)
_NO_ROWS = np.zeros(0, np.int32)
# The merge's category codes are uint32: bit 0 excludes, bit 1 is the request's own include
# filter (ranking.pipeline.ranker), the rest carry the rules' (RankOverlay.category_codes).
_FIRST_RULE_BIT = 1 << 2
_RULE_BITS = 30
_DEMOTIONS = 32  # the compiled call's demotions: one bit each of a uint32 code

log = logging.getLogger(__name__)


class _ModelCache:
    """Per-model values the fold-in needs, computed once per bundle."""

    def __init__(self, model):
        self.weighting = Weighting.from_manifest(model.manifest)
        self.bundle_end = float(model.manifest.get("data_window", {}).get("end_unix", float("-inf")))
        self.ready = threading.Event()
        self.yty: np.ndarray | None = None
        self.inv_norms: np.ndarray | None = None

    def compute(self, item_factors: np.ndarray, version: str) -> None:
        t0 = time.perf_counter()
        self.yty, self.inv_norms = item_gram(item_factors)
        self.ready.set()
        log.info("fold-in ready", extra={"version": version, "seconds": round(time.perf_counter() - t0, 3)})


_caches: weakref.WeakKeyDictionary[object, _ModelCache] = weakref.WeakKeyDictionary()
_caches_lock = threading.Lock()


def model_cache(model) -> _ModelCache:
    """The model's cache; its Gram matrix may still be on its way (see ``SYNC_GRAM_LIMIT``)."""
    with _caches_lock:
        c = _caches.get(model)
        if c is not None:
            return c
        c = _caches[model] = _ModelCache(model)
        if model.bundle.has_array("item_gram"):
            c.yty, c.inv_norms = model.bundle.array("item_gram"), model.bundle.array("item_inv_norms")
            c.ready.set()
            return c
        n, k = model.item_factors.shape
        if n * k * k <= SYNC_GRAM_LIMIT:
            c.compute(model.item_factors, model.version)
            return c
    threading.Thread(
        target=c.compute, args=(model.item_factors, model.version), name=f"gram-{model.version}", daemon=True
    ).start()
    return c


def category_rows(model, names: tuple[str, ...]) -> np.ndarray:
    ids = model.category_names.lookup(list(names)) if names else np.zeros(0, np.int32)
    return ids[ids >= 0]


@dataclass
class RankOverlay:
    """What a :class:`~ranking.pipeline.ranker.Ranker` applies on top of the bundle for one request."""

    variant: Variant = FULL
    user_vector: np.ndarray | None = None
    n_realtime_events: int = 0
    exclude_rows: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    negative_rows: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    # Items the user engaged with since the bundle was built, oldest first: the pipeline
    # treats them as session items, so the reranker's session features and the
    # co-visitation candidates follow what the user did a minute ago.
    recent_rows: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    # Purchases since the bundle (every variant): the re-purchase features count them.
    purchases: Purchases | None = None
    rules: list[Rule] = field(default_factory=list)
    settings: OverlaySettings = field(default_factory=OverlaySettings)

    @property
    def applied_rules(self) -> list[str]:
        return [r.name for r in self.rules]

    def rules_adjust_candidates(self) -> bool:
        """Whether the rules need NumPy between the merge and the features: more masks than the
        merge's category codes can carry (:meth:`category_codes`) or more demotions than the
        compiled call takes (:meth:`demotions`). False: the ranker merges, writes and scores the
        candidates in one compiled call, the rules' masks applied in the merge and the
        real-time offsets and demotions computed there."""
        return sum(bool(r.demote_categories) for r in self.rules) > _DEMOTIONS or not self.masks_in_merge()

    def demotions(self, model) -> Demotions | None:
        """The rules' demotions for the compiled call to apply as :meth:`offsets` does; None
        when no rule demotes, or when more do than the call takes (:meth:`offsets` applies them)."""
        rules = [r for r in self.rules if r.demote_categories]
        if not rules or len(rules) > _DEMOTIONS:
            return None
        codes = np.zeros(len(model.category_names), np.uint32)
        for b, rule in enumerate(rules):
            codes[category_rows(model, rule.demote_categories)] |= np.uint32(1 << b)
        amounts = np.array([r.demote_by for r in rules], np.float32)
        return Demotions(codes, amounts, tuple(f"rule:{r.name}" for r in rules))

    def _masking_rules(self) -> list[Rule]:
        return [r for r in self.rules if r.suppress or r.exclude_categories or r.only_categories]

    def masks_in_merge(self) -> bool:
        """Whether the merge applies the masking rules (:meth:`category_codes` carries them all)."""
        rules = self._masking_rules()
        return sum(bool(r.only_categories) for r in rules) + any(r.suppress for r in rules) <= _RULE_BITS

    def category_codes(self, model, codes: np.ndarray | None, include_bits: int) -> tuple[np.ndarray | None, int]:
        """The merge's category codes (per category: bit 0 excludes it, and an item must carry
        every bit of ``include_bits``, OR-ed over its categories, to stay) with the masking
        rules folded in, so that the merge masks what :meth:`rule_mask` would: a rule's excluded
        categories get bit 0; each rule's allowed categories get a bit of their own that every
        item must carry; a suppressing rule a bit no category has. Unchanged when no rule masks
        or when the rules need more bits than the codes have (:meth:`rule_mask` then applies them).
        """
        rules = self._masking_rules()
        if not rules or not self.masks_in_merge():
            return codes, include_bits
        out = np.zeros(len(model.category_names), np.uint32) if codes is None else codes.copy()
        bit = _FIRST_RULE_BIT
        for rule in rules:
            if rule.exclude_categories:
                out[category_rows(model, rule.exclude_categories)] |= np.uint32(1)
            if rule.only_categories:
                out[category_rows(model, rule.only_categories)] |= np.uint32(bit)
                include_bits |= bit
                bit <<= 1
        if any(r.suppress for r in rules):
            include_bits |= bit
        return out, include_bits

    def realtime_offsets(self, model) -> RealtimeOffsets | None:
        """What the real-time skip penalty and interest boost need, for the compiled call to
        compute them as :meth:`offsets` does; None when neither applies (no skips, no recent
        items or no boost, a variant without context, or the fold-in not ready)."""
        skips = self.negative_rows
        recent = self.recent_rows if self.settings.interest_boost > 0 else _NO_ROWS
        if not (len(skips) or len(recent)) or not self.variant.use_context:
            return None
        cache = model_cache(model)
        if not cache.ready.is_set() or cache.inv_norms is None:
            return None
        return RealtimeOffsets(skips, recent, cache.inv_norms, self.settings.skip_penalty, self.settings.interest_boost)

    def rule_mask(self, model, cands: np.ndarray) -> np.ndarray | None:
        """Candidates the exclusion/restriction/suppress rules exclude; None when no rule does.

        The real-time exclusions (``exclude_rows``) are the ranker's to apply, with the
        request's own, in the compiled candidate call.
        """
        mask = None
        for rule in self.rules:
            if not (rule.suppress or rule.exclude_categories or rule.only_categories):
                continue
            if mask is None:
                mask = np.zeros(len(cands), dtype=bool)
            if rule.suppress:
                mask[:] = True
            if rule.exclude_categories:
                mask |= in_categories(model, cands, category_rows(model, rule.exclude_categories))
            if rule.only_categories:
                mask |= ~in_categories(model, cands, category_rows(model, rule.only_categories))
        return mask

    def offsets(self, model, cands: np.ndarray) -> tuple[np.ndarray | None, dict[str, np.ndarray]]:
        """Per-candidate score offsets and, by source, what each added (for explain).

        Returns
        -------
        (offsets, parts)
            ``offsets`` float32 of len(cands), or None when nothing applies; ``parts`` maps
            ``"realtime_skip"`` and ``"rule:<name>"`` to their per-candidate arrays.
        """
        parts: dict[str, np.ndarray] = {}
        realtime = self.realtime_offsets(model)
        inv_norms = realtime.inv_norms if realtime is not None else None
        cf = None  # the candidates' unit factors, gathered once for both real-time offsets
        if len(cands) and len(self.negative_rows) and inv_norms is not None:
            cf = np.asarray(model.item_factors[cands], dtype=np.float32) * inv_norms[cands, None]
            nf = (
                np.asarray(model.item_factors[self.negative_rows], dtype=np.float32)
                * inv_norms[self.negative_rows, None]
            )
            sim = np.clip((cf @ nf.T).max(axis=1), 0.0, 1.0)
            # The skipped item itself has no factor when the build never saw it; push it down anyway.
            sim[np.isin(cands, self.negative_rows)] = 1.0
            parts["realtime_skip"] = (-self.settings.skip_penalty * sim).astype(np.float32)
        if len(cands) and len(self.recent_rows) and inv_norms is not None and self.settings.interest_boost > 0:
            if cf is None:
                cf = np.asarray(model.item_factors[cands], dtype=np.float32) * inv_norms[cands, None]
            rf = np.asarray(model.item_factors[self.recent_rows], dtype=np.float32) * inv_norms[self.recent_rows, None]
            sim = np.clip((cf @ rf.T).max(axis=1), 0.0, 1.0)
            sim[np.isin(cands, self.recent_rows)] = 0.0
            # Relative to this request's candidates: the closest get the whole boost, the
            # farthest none, whatever the embedding's baseline similarity is.
            lo, hi = float(sim.min()), float(sim.max())
            rel = (sim - lo) / (hi - lo) if hi > lo else np.zeros_like(sim)
            parts["realtime_interest"] = (self.settings.interest_boost * rel).astype(np.float32)
        for rule in self.rules:
            if rule.demote_categories and len(cands):
                hit = in_categories(model, cands, category_rows(model, rule.demote_categories))
                parts[f"rule:{rule.name}"] = np.where(hit, -rule.demote_by, 0.0).astype(np.float32)
        if not parts:
            return None, parts
        total = np.zeros(len(cands), np.float32)
        for part in parts.values():
            total += part
        return total, parts


@dataclass(frozen=True)
class _Digest:
    """A run of one customer's events, oldest first, as one bundle sees it: the known events
    after its data end as arrays, and what the overlay needs of them per distinct item."""

    rows: np.ndarray  # int64 item rows, in the run's order
    times: np.ndarray  # float64 unix seconds
    base: np.ndarray  # float64 weights before time decay (Weighting.base_weights)
    uniq: np.ndarray  # int64 distinct rows, ascending
    inverse: np.ndarray  # intp: each event's position in uniq
    bought_rows: np.ndarray  # int32 purchases, the first and last of each item and day
    bought_times: np.ndarray  # int64 their unix seconds
    exclude_rows: np.ndarray  # int32 sorted: bought items the bundle does not offer again
    negative_rows: np.ndarray  # int32 sorted: items of negative events
    last_rows: np.ndarray  # int64: positive items by their latest event, oldest first, the last MAX_RECENT
    last_index: np.ndarray  # intp: that latest event's index in the run

    def __len__(self) -> int:
        return len(self.rows)


_I64, _I32 = np.zeros(0, np.int64), np.zeros(0, np.int32)
_NO_EVENTS = _Digest(
    _I64, np.zeros(0), np.zeros(0), _I64, np.zeros(0, np.intp), _I32, _I64, _I32, _I32, _I64, np.zeros(0, np.intp)
)


def _compact_purchases(rows: np.ndarray, times: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The purchases the feature kernel needs to give the answer all of them give: one of
    each item and day, and each item's first and last.

    The kernel's re-purchase features and buy-again source read of an item's purchases only
    its distinct days (the baskets, and whether one is the latest day of all), its first and
    its last time (the interval); of all purchases, their distinct days. Those are unchanged,
    and what the kernel sorts per Rank is bounded by the items' days, not the purchases.
    """
    if not len(rows):
        return rows.astype(np.int32), times
    order = np.lexsort((times, rows))
    r, t = rows[order], times[order]
    day = t // DAY_SECONDS  # floor, as the kernel's _day
    new_item = r[1:] != r[:-1]
    first_of_day = np.concatenate(([True], new_item | (day[1:] != day[:-1])))
    keep = first_of_day | np.concatenate((new_item, [True]))  # and the item's last
    return r[keep].astype(np.int32), t[keep]


def _digest(model, cache: _ModelCache, events: Sequence[Event]) -> _Digest:
    """The digest of ``events`` (in their order); O(events) in Python, once per run."""
    w = cache.weighting
    evs = [e for e in events if e.timestamp > cache.bundle_end]
    n = len(evs)
    # Each distinct item id looked up once: a heavy buyer repeats the same items.
    ids: dict[str, int] = {}
    codes = np.fromiter((ids.setdefault(e.item_id, len(ids)) for e in evs), np.int64, n)
    id_rows = model.items.lookup(list(ids)).astype(np.int64) if ids else np.zeros(0, np.int64)
    known = np.flatnonzero(id_rows[codes] >= 0) if n else np.zeros(0, np.intp)
    rows = id_rows[codes][known]
    types = [e.event_type for e in evs]
    times = np.fromiter((e.timestamp for e in evs), np.float64, n)[known]
    base = w.base_weights(types, np.fromiter((e.value for e in evs), np.float64, n))[known]
    consumed = set(w.consumed_event_types)
    is_buy = np.array([t in consumed for t in types], dtype=bool)[known]
    is_negative = np.array([t in _NEGATIVE for t in types], dtype=bool)[known]
    bought = rows[is_buy]
    bought_rows, bought_times = _compact_purchases(bought, times[is_buy].astype(np.int64))
    uniq, inverse = np.unique(rows, return_inverse=True)
    # Positive items by their latest event in time order (a run handed in out of order is
    # read as the overlay always read it: positives by time, the sums in the given order).
    positive = np.flatnonzero(~is_negative)
    positive = positive[np.argsort(times[positive], kind="stable")]
    latest_first, first_seen = np.unique(rows[positive][::-1], return_index=True)
    latest = len(positive) - 1 - first_seen
    pick = np.argsort(latest)[-MAX_RECENT:]
    return _Digest(
        rows=rows,
        times=times,
        base=base,
        uniq=uniq,
        inverse=inverse.reshape(-1),
        bought_rows=bought_rows,
        bought_times=bought_times,
        exclude_rows=np.unique(bought[model.item_reoffer[bought] == 0]).astype(np.int32),
        negative_rows=np.unique(rows[is_negative]).astype(np.int32),
        last_rows=latest_first[pick],
        last_index=positive[latest[pick]],
    )


def _merge_purchases(old: _Digest, tail: _Digest) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_compact_purchases` of both runs' purchases, ``tail``'s at or after ``old``'s in
    time, from what each kept: the items ``tail`` bought are compacted anew (an item's earlier
    days keep their first purchase, its last is now ``tail``'s), the others are as ``old`` kept
    them; both parts are sorted by item and time and share no item, so they interleave by item."""
    if not len(tail.bought_rows):
        return old.bought_rows, old.bought_times
    touched = np.isin(old.bought_rows, tail.bought_rows)
    rows, times = _compact_purchases(
        np.concatenate((old.bought_rows[touched], tail.bought_rows)),
        np.concatenate((old.bought_times[touched], tail.bought_times)),
    )
    rest = ~touched
    at = np.searchsorted(old.bought_rows[rest], rows)
    return np.insert(old.bought_rows[rest], at, rows), np.insert(old.bought_times[rest], at, times)


def _extended(model, cache: _ModelCache, old: _Digest, tail: Sequence[Event]) -> _Digest:
    """The digest of a run that continues ``old``'s with ``tail`` (every event of it at or after
    ``old``'s last in time): equal, array by array and bit for bit, to :func:`_digest` of the
    whole run. Python touches the new events only; the rest is NumPy over the customer's
    distinct items and kept purchases, and one copy of the per-event arrays.

    Exact because the digest keeps no sums: the per-event arrays (rows, times, weights before
    decay) are elementwise and concatenate; the distinct rows are a union, every event's
    position in them re-read; kept purchases, exclusions and negatives are as
    :func:`_merge_purchases` and unions give them; and the latest positive items are
    ``tail``'s then ``old``'s not bought again, since ``tail``'s events sort after ``old``'s
    (a stable sort by time keeps ``old``'s first at equal times).
    """
    t = _digest(model, cache, tail)
    if not len(t):
        return old
    if not len(old):
        return t
    n = len(old)
    at = np.searchsorted(old.uniq, t.uniq)
    known = at < len(old.uniq)
    known[known] = old.uniq[at[known]] == t.uniq[known]
    if known.all():
        uniq, inverse = old.uniq, np.concatenate((old.inverse, at[t.inverse]))
    else:
        uniq = np.union1d(old.uniq, t.uniq)
        inverse = np.concatenate(
            (np.searchsorted(uniq, old.uniq)[old.inverse], np.searchsorted(uniq, t.uniq)[t.inverse])
        )
    bought_rows, bought_times = _merge_purchases(old, t)
    stays = ~np.isin(old.last_rows, t.last_rows)
    return _Digest(
        rows=np.concatenate((old.rows, t.rows)),
        times=np.concatenate((old.times, t.times)),
        base=np.concatenate((old.base, t.base)),
        uniq=uniq,
        inverse=inverse,
        bought_rows=bought_rows,
        bought_times=bought_times,
        exclude_rows=np.union1d(old.exclude_rows, t.exclude_rows).astype(np.int32),
        negative_rows=np.union1d(old.negative_rows, t.negative_rows).astype(np.int32),
        last_rows=np.concatenate((old.last_rows[stays], t.last_rows))[-MAX_RECENT:],
        last_index=np.concatenate((old.last_index[stays], t.last_index + n))[-MAX_RECENT:],
    )


def _held_digest(model, cache: _ModelCache, held: HeldPurchases) -> _Digest:
    """The digest of a customer's held purchases, made on the first Rank after they changed:
    extended from the snapshot they continue when that one has this bundle's digest (the
    common case: a purchase after the last, the customer ranked in between), else anew."""
    d = held.memo.get(model)
    if isinstance(d, _Digest):
        return d
    base = held.extends
    old = base.memo.get(model) if base is not None else None
    if base is not None and isinstance(old, _Digest):
        d = _extended(model, cache, old, held.events[len(base.events) :])
    else:
        d = _digest(model, cache, held.events)
    held.memo[model] = d
    # This snapshot's digest is what a later one extends; the earlier snapshot can go.
    held.release_extends()
    return d


def _recent(a: _Digest, b: _Digest, ins: np.ndarray) -> np.ndarray:
    """The positive items by their latest event, oldest first, at most MAX_RECENT, of the two
    runs merged (``a``'s event k lands before ``b``'s ``ins[k]``); only each run's own latest
    MAX_RECENT can be among them."""
    rows = np.concatenate((a.last_rows, b.last_rows))
    at = np.concatenate((ins[a.last_index] + a.last_index, b.last_index + np.searchsorted(ins, b.last_index, "right")))
    out: list[int] = []
    seen: set[int] = set()
    for i in np.argsort(at)[::-1].tolist():
        r = int(rows[i])
        if r not in seen:
            seen.add(r)
            out.append(r)
            if len(out) == MAX_RECENT:
                break
    return np.array(out[::-1], dtype=np.int32)


def _per_event(
    ov: RankOverlay, model, cache: _ModelCache, user_id: str, events: Sequence[Event], now: float, variant: Variant
) -> RankOverlay:
    """:func:`build_overlay` by one pass over a few events (below ``DIGEST_MIN_EVENTS``, where
    the digest's arrays cost more than plain Python)."""
    w = cache.weighting
    events = [e for e in events if e.timestamp > cache.bundle_end]
    if not events:
        return ov
    rows = model.items.lookup([e.item_id for e in events])
    known = np.flatnonzero(rows >= 0)
    if not len(known):
        return ov
    rows = rows[known].astype(np.int64)
    evs = [events[i] for i in known]
    # Event types are matched in plain Python: a customer has a few events, for which NumPy's
    # string arrays and isin cost more than the fold-in itself.
    types = [e.event_type for e in evs]
    consumed = set(w.consumed_event_types)
    is_buy = np.array([t in consumed for t in types], dtype=bool)
    timestamps = np.array([e.timestamp for e in evs], dtype=np.float64)
    bought = rows[is_buy]
    # A purchase ends the need for an item the bundle's policy does not offer again (a durable);
    # a staple stays, and the re-purchase features see it was just bought.
    ov.exclude_rows = np.unique(bought[model.item_reoffer[bought] == 0]).astype(np.int32)
    ov.purchases = Purchases(bought.astype(np.int32), timestamps[is_buy].astype(np.int64))
    yty = cache.yty if variant.use_context and cache.ready.is_set() else None
    if yty is None:
        return ov
    ov.n_realtime_events = len(evs)
    is_negative = np.array([t in _NEGATIVE for t in types], dtype=bool)
    ov.negative_rows = np.unique(rows[is_negative]).astype(np.int32)
    positive = rows[~is_negative][np.argsort(timestamps[~is_negative], kind="stable")]
    # Most recent occurrence of each item, oldest first, at most MAX_RECENT.
    last = {int(r): i for i, r in enumerate(positive)}
    ov.recent_rows = np.array(sorted(last, key=last.__getitem__)[-MAX_RECENT:], dtype=np.int32)
    weights = w.weights(types, np.array([e.value for e in evs], dtype=np.float64), timestamps, now)
    # Summed per distinct item (ascending rows) in event order; a dictionary, not np.unique's
    # sort, for a customer's few events.
    row_list = rows.tolist()
    distinct = sorted(set(row_list))
    position = {r: i for i, r in enumerate(distinct)}
    uniq = np.array(distinct, dtype=np.int64)
    summed = np.bincount([position[r] for r in row_list], weights=weights, minlength=len(uniq))
    return _fold_in(ov, model, w, yty, user_id, uniq, summed)


def _fold_in(
    ov: RankOverlay, model, w: Weighting, yty: np.ndarray, user_id: str, uniq: np.ndarray, summed: np.ndarray
) -> RankOverlay:
    """``ov`` with the customer's re-solved vector from their events' summed weights per
    distinct item (``uniq``), where any is nonzero on an item with a factor."""
    keep = (summed != 0) & np.any(np.asarray(model.item_factors[uniq], dtype=np.float32) != 0, axis=1)
    if not keep.any():
        return ov
    urow = model.users.row(user_id)
    prior = None
    if urow >= 0 and model.user_has_history[urow]:
        prior = np.asarray(model.user_factors[urow], dtype=np.float64)
    vec = fold_in(model.item_factors, yty, uniq[keep], w.alpha * summed[keep], w.regularization, prior)
    if np.all(np.isfinite(vec)) and np.any(vec != 0):
        ov.user_vector = vec
    return ov


def build_overlay(
    model,
    user_id: str,
    events: Sequence[Event] | HeldEvents,
    now: float,
    variant: Variant = FULL,
    rules: list[Rule] | None = None,
    settings: OverlaySettings | None = None,
) -> RankOverlay:
    """The overlay of one request from the user's recent events.

    Events at or before the end of the bundle's data window are already in the bundle
    and are left out. Items the bundle does not know are ignored. Purchases (the bundle's
    ``consumed_event_types``) of items its re-purchase policy does not offer again are
    excluded in every variant, and every purchase feeds the re-purchase features; the re-solved vector and the
    skip penalties only where the variant uses context.

    A customer's held purchases (``events`` as :class:`~ranking.realtime.user_state.HeldEvents`)
    are read through a digest made once per bundle until they change: a Rank then costs what
    their distinct items cost (and a vectorised pass over the purchases' weights), however many
    purchases the customer made since the bundle. The overlay is the one the merged list gives.

    Parameters
    ----------
    model : RankingModel
    user_id : str
    events : list of Event, or HeldEvents
        The user's unexpired events, oldest first, from the
        :class:`~ranking.realtime.user_state.UserStateStore` (``held`` or ``events``).
    now : float
        Unix seconds (time decay of the events' weights).
    variant : Variant
    rules : list of Rule
        The context rules matching this request.
    settings : OverlaySettings

    Returns
    -------
    RankOverlay
    """
    ov = RankOverlay(variant=variant, rules=list(rules or []), settings=settings or OverlaySettings())
    if not len(events):
        return ov
    cache = model_cache(model)
    if len(events) < DIGEST_MIN_EVENTS:
        return _per_event(
            ov, model, cache, user_id, events.merged() if isinstance(events, HeldEvents) else events, now, variant
        )
    if isinstance(events, HeldEvents):
        a = _digest(model, cache, events.recent)
        b = _held_digest(model, cache, events.purchases) if len(events.purchases) else None
    else:
        a, b = _digest(model, cache, events), None
    if b is None or not len(b):
        a, b = _NO_EVENTS, a
    if not len(a) + len(b):
        return ov
    # The two runs merged as the one list held.merged() gives: a's events before b's at equal times.
    ins = np.searchsorted(b.times, a.times, side="left")
    ov.exclude_rows = np.union1d(a.exclude_rows, b.exclude_rows).astype(np.int32)
    # The kernel reads purchases in any order (it sorts them by item and time).
    ov.purchases = Purchases(
        np.concatenate((b.bought_rows, a.bought_rows)), np.concatenate((b.bought_times, a.bought_times))
    )
    yty = cache.yty if variant.use_context and cache.ready.is_set() else None
    if yty is None:
        return ov
    w = cache.weighting
    ov.n_realtime_events = len(a) + len(b)
    ov.negative_rows = np.union1d(a.negative_rows, b.negative_rows).astype(np.int32)
    ov.recent_rows = _recent(a, b, ins) if len(a) else b.last_rows.astype(np.int32)
    # Summed per distinct item (ascending rows) in event order: the same sums, bit for bit,
    # as a pass over the merged list.
    if len(a):
        uniq = np.union1d(b.uniq, a.uniq)
        inverse = np.insert(np.searchsorted(uniq, b.uniq)[b.inverse], ins, np.searchsorted(uniq, a.uniq)[a.inverse])
        weights = w.decayed(np.insert(b.base, ins, a.base), np.insert(b.times, ins, a.times), now)
    else:
        uniq, inverse, weights = b.uniq, b.inverse, w.decayed(b.base, b.times, now)
    summed = np.bincount(inverse, weights=weights, minlength=len(uniq))
    return _fold_in(ov, model, w, yty, user_id, uniq, summed)
