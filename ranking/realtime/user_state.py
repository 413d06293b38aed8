"""Per-user real-time state: recent events with a TTL and an LRU bound, and the ALS fold-in
that turns them into this user's vector for the next Rank."""

from __future__ import annotations

import collections
import heapq
import threading
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from ranking.config import UserStateSettings
from ranking.realtime.events import NEGATIVE_EVENT_TYPES, Event

DAY = 86_400.0


@dataclass(frozen=True)
class Weighting:
    """How events become ALS confidences: the bundle's own build settings, so that a
    folded-in vector lives in the same space as the trained ones."""

    event_weights: dict[str, float]
    value_event_types: tuple[str, ...]
    value_scale: float
    default_event_weight: float
    consumed_event_types: tuple[str, ...]
    half_life_days: float
    regularization: float
    alpha: float

    @classmethod
    def from_manifest(cls, manifest: dict) -> Weighting:
        """Read the settings the bundle was built with (``manifest["config"]``)."""
        c = manifest.get("config", {})
        return cls(
            event_weights={k: float(v) for k, v in c.get("event_weights", {}).items()},
            value_event_types=tuple(c.get("value_event_types", ["rating"])),
            value_scale=float(c.get("value_scale", 5.0)),
            default_event_weight=float(c.get("default_event_weight", 1.0)),
            consumed_event_types=tuple(c.get("consumed_event_types", ["purchase", "rating"])),
            half_life_days=float(c.get("half_life_days", 120.0)),
            regularization=float(c.get("regularization", 0.05)),
            alpha=float(c.get("alpha", 1.0)),
        )

    def weights(self, types: Sequence[str], values: np.ndarray, timestamps: np.ndarray, now: float) -> np.ndarray:
        """:meth:`weight` for many events at once (float64), one dictionary lookup per distinct type.

        The types are matched in plain Python: a Rank's customer has a few events, for which
        NumPy's string ``unique`` and ``isin`` cost more than the rest of the overlay.
        """
        return self.decayed(self.base_weights(types, values), timestamps, now)

    def base_weights(self, types: Sequence[str], values: np.ndarray) -> np.ndarray:
        """Each event's weight before time decay (float64): what :meth:`decayed` turns into
        :meth:`weights`, kept apart so a customer's held purchases are weighed once, not per Rank."""
        # weight() at age 0 decays by exactly 1.0.
        per_type = {t: self.weight(Event("", "", str(t), 0.0, 1.0), 0.0) for t in set(types)}
        w = np.array([per_type[t] for t in types], dtype=np.float64)
        if self.value_event_types:
            # weight() above used value 1.0; scale by the real value as the builder does.
            value_types = set(self.value_event_types)
            is_value = np.array([t in value_types for t in types], dtype=bool)
            v = np.where(values > 0, values, self.value_scale / 2)
            w = np.where(is_value, w * v, w)
        return w

    def decayed(self, base: np.ndarray, timestamps: np.ndarray, now: float) -> np.ndarray:
        """:meth:`base_weights` decayed to ``now`` by each event's age."""
        age_days = np.maximum(now - timestamps, 0.0) / DAY
        return base * 0.5 ** (age_days / self.half_life_days)

    def weight(self, ev: Event, now: float) -> float:
        """The event's weight as the builder computes it (type weight, value scaling, time decay)."""
        w = self.event_weights.get(ev.event_type, self.default_event_weight)
        if ev.event_type in NEGATIVE_EVENT_TYPES and ev.event_type not in self.event_weights:
            # A dislike the build never saw still means "not this": weigh it like a skip.
            w = self.event_weights.get("skip", -1.0)
        if ev.event_type in self.value_event_types:
            value = ev.value if ev.value > 0 else self.value_scale / 2
            w = w * value / self.value_scale
        age_days = max(now - ev.timestamp, 0.0) / DAY
        return float(w * 0.5 ** (age_days / self.half_life_days))


_GRAM_CHUNK = 65_536


def row_norms(vectors: np.ndarray, chunk: int = _GRAM_CHUNK) -> np.ndarray:
    """Euclidean norm of every row (float64 out), a chunk at a time so a memory-mapped
    million-row matrix never needs a full-size temporary. Summed in the factors' float32:
    20x faster than converting to float64 at a million rows, within 1.5e-7 of it."""
    out = np.empty(len(vectors), np.float64)
    for i in range(0, len(vectors), chunk):
        block = np.asarray(vectors[i : i + chunk], np.float32)
        out[i : i + chunk] = np.sqrt(np.einsum("ij,ij->i", block, block))
    return out


def item_gram(item_factors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """What fold-in and cosine similarity need of the item factors: (Y^T Y as float64, 1/|y| as float32).

    The builder stores both in the bundle (a million items at k=64 take seconds, too long
    for a server's start); float32 products summed in float64 per chunk are 7× faster than
    a float64 copy of the whole matrix, and within 1e-7 of it.
    """
    k = item_factors.shape[1]
    yty = np.zeros((k, k))
    for start in range(0, item_factors.shape[0], _GRAM_CHUNK):
        c = np.asarray(item_factors[start : start + _GRAM_CHUNK], dtype=np.float32)
        yty += c.T @ c
    norms = row_norms(item_factors).astype(np.float32)
    inv_norms = np.where(norms > 0, 1.0 / np.maximum(norms, 1e-12), 0.0).astype(np.float32)
    return yty, inv_norms


def fold_in(
    item_factors: np.ndarray,
    yty: np.ndarray,
    rows: np.ndarray,
    confidence: np.ndarray,
    regularization: float,
    prior: np.ndarray | None = None,
) -> np.ndarray:
    """Solve one user's ALS vector against fixed item factors (implicit-feedback ALS).

    The normal equations are implicit's (Hu, Koren, Volinsky 2008), including its
    handling of negative confidence (preference 0, weight ``|c|``)::

        (YᵀY + λI + Σᵢ (|cᵢ| - 1) yᵢyᵢᵀ) x = P x₀ + Σ_{cᵢ>0} cᵢ yᵢ,    P = YᵀY + λI

    With ``prior`` x₀ = 0 this is exactly a from-scratch fold-in (what
    ``implicit``'s ``recalculate_user`` computes). For a user the bundle already
    knows, x₀ is their trained vector and ``P x₀`` stands in for the right-hand side
    of their training history (whose confidences the bundle does not keep): the old
    vector acts as a prior and the new events move it.

    Parameters
    ----------
    item_factors : np.ndarray, shape (n_items, k)
    yty : np.ndarray, shape (k, k)
        ``item_factors.T @ item_factors`` in float64 (cached per model).
    rows : np.ndarray of int
        Item rows, unique.
    confidence : np.ndarray of float
        ``alpha × summed weight`` per row; negative for net-negative items.
    regularization : float
    prior : np.ndarray, shape (k,), optional

    Returns
    -------
    np.ndarray
        float32 vector of length k.
    """
    k = yty.shape[0]
    p = yty + regularization * np.eye(k)
    y = np.asarray(item_factors[rows], dtype=np.float64)
    c = np.asarray(confidence, dtype=np.float64)
    a = p + (y.T * (np.abs(c) - 1.0)) @ y
    b = y.T @ np.where(c > 0, c, 0.0)
    if prior is not None:
        b = b + p @ np.asarray(prior, dtype=np.float64)
    return np.linalg.solve(a, b).astype(np.float32)


def _time(ev: Event) -> float:
    return ev.timestamp


class HeldPurchases:
    """A customer's held purchases at one moment, oldest first (arrival order among equal times).

    Immutable: the store makes a new one when the customer's purchases change, so what is
    derived from it can be kept in ``memo`` (keyed by whatever it was derived for, held
    weakly: the overlay keeps its per-bundle digest there) and is dropped with it.

    ``extends`` names an earlier snapshot of the same customer that this one continues, so
    that what was derived from it (its ``memo``) can be extended by the new events instead
    of derived anew. The contract, which is all a reader may rely on: ``events[:n]``, with
    ``n = len(extends.events)``, are exactly ``extends.events`` (the same events in the same
    order), and every later event is at or after the last of those in time. A store passes
    it when purchases were appended in time order since ``extends`` was made; after one
    arrives out of order, or a prune drops some, it makes a snapshot without it.

    The reference is kept at most one level deep and only until it is used: when
    ``extends`` itself still holds the snapshot it extends (nothing was derived from it, as
    for a customer whose purchases were read but not ranked through a digest), this
    snapshot extends that one instead, which the contract allows (it is a prefix of a
    prefix); and a reader that has derived what it needs calls :meth:`release_extends`.
    So a customer's snapshots never form a chain longer than two, whatever they buy.

    Parameters
    ----------
    events : tuple of Event
        The purchases, oldest first.
    extends : HeldPurchases, optional
        An earlier snapshot this one continues (see above).

    Raises
    ------
    ValueError
        ``extends`` holds more events than ``events``, its last event is not the one at the
        same place in ``events``, or a later event is before it in time.
    """

    __slots__ = ("__weakref__", "events", "extends", "memo")
    extends: HeldPurchases | None

    def __init__(self, events: tuple[Event, ...] = (), extends: HeldPurchases | None = None):
        self.events = events
        self.memo: weakref.WeakKeyDictionary[object, object] = weakref.WeakKeyDictionary()
        if extends is not None:
            # Checked where it costs the new events only; the prefix beyond its last event is
            # the caller's word.
            n = len(extends.events)
            if n > len(events):
                raise ValueError(f"HeldPurchases: extends holds {n} events, more than the {len(events)} given")
            if n:
                last = extends.events[-1]
                if events[n - 1] != last:
                    raise ValueError(f"HeldPurchases: event {n - 1} is not extends' last event {last!r}")
                for i in range(n, len(events)):
                    if events[i].timestamp < last.timestamp:
                        raise ValueError(
                            f"HeldPurchases: event {i} at {events[i].timestamp} is before extends' last "
                            f"event at {last.timestamp}; a purchase out of order needs a snapshot without extends"
                        )
            # One level deep: skip a snapshot nothing was derived from.
            further = extends.extends
            if further is not None:
                extends = further
        self.extends = extends

    def __len__(self) -> int:
        return len(self.events)

    def release_extends(self) -> None:
        """Drop the reference to ``extends`` (and the events it holds) once what was needed
        of it is derived: this snapshot's own ``memo`` is what a later one extends."""
        self.extends = None


@dataclass(frozen=True)
class HeldEvents:
    """A customer's held events: the few recent ones and the purchases, each oldest first.

    :meth:`merged` is the one list :meth:`UserStateStore.events` answers; a Rank reads the
    two parts as they are, so a customer with thousands of purchases since the bundle costs
    the overlay what their distinct items cost once the purchases' digest is made.
    """

    recent: tuple[Event, ...] = ()
    purchases: HeldPurchases = field(default_factory=HeldPurchases)

    def __len__(self) -> int:
        return len(self.recent) + len(self.purchases)

    def __iter__(self) -> Iterator[Event]:
        return iter(self.merged())

    def merged(self) -> list[Event]:
        """Every event, oldest first; at equal times the recent ones first, as both parts were appended."""
        return list(heapq.merge(self.recent, self.purchases.events, key=_time))


class UserStateStore:
    """Each customer's events after the served bundle's data end, until a bundle holding them is served.

    Thread-safe. Events are kept by item id, not bundle row, so they survive a bundle swap.
    Two parts, bounded differently:

    - **purchases** (the bundle's ``consumed`` event types): every one is kept until
      :meth:`prune` is called with a horizon (the served bundle's data end) at or after
      it. Neither bound below drops one: a purchase that ends a need must keep ending it
      until the bundle knows it, however old it is by the wall clock.
    - **recent events** (everything else): the latest ``max_events_per_user`` per
      customer, and at most ``max_users`` customers; the least recently touched are
      evicted (their events stay in the event log and reach the next build).

    There is no wall-clock time-to-live: an event is dropped when a bundle's window
    covers it, not when it is old.

    Parameters
    ----------
    max_users : int
        Customers whose recent events are held (least recently used evicted beyond).
    max_events_per_user : int
        Only a customer's most recent non-purchase events are kept.
    durable_types : tuple of str
        The event types held as purchases (the served bundle's ``consumed_event_types``).
    """

    def __init__(
        self,
        max_users: int = UserStateSettings.max_users,
        max_events_per_user: int = UserStateSettings.max_events_per_user,
        durable_types: tuple[str, ...] = UserStateSettings.durable_types,
    ):
        self.max_users = max_users
        self.max_events_per_user = max_events_per_user
        self.durable_types = frozenset(durable_types)
        self._users: collections.OrderedDict[str, collections.deque] = collections.OrderedDict()
        self._purchases: dict[str, list[Event]] = {}
        # Each customer's purchases as last read, oldest first; dropped when they change.
        self._held: dict[str, HeldPurchases] = {}
        # The snapshot the next one extends, while every purchase appended since it was read
        # is at or after the latest before it (HeldPurchases' contract).
        self._extends: dict[str, HeldPurchases] = {}
        self._lock = threading.Lock()
        self.evicted_users = 0
        self.horizon = float("-inf")
        # Customers with any state held, kept as it changes: the gauge reads it after every
        # RecordEvents, where a union of both key sets would cost O(customers).
        self._n_customers = 0

    def __len__(self) -> int:
        """Customers with any state held."""
        return self._n_customers

    @property
    def n_purchases(self) -> int:
        with self._lock:
            return sum(len(v) for v in self._purchases.values())

    def add(self, events: list[Event]) -> int:
        """Apply events (in order); returns how many were kept (after the current horizon)."""
        kept = 0
        with self._lock:
            for ev in events:
                if ev.timestamp <= self.horizon:
                    continue
                kept += 1
                if ev.event_type in self.durable_types:
                    bought = self._purchases.get(ev.user_id)
                    if bought is None:
                        self._n_customers += ev.user_id not in self._users
                        bought = self._purchases[ev.user_id] = []
                    bought.append(ev)
                    snap = self._held.pop(ev.user_id, None)
                    # The latest purchase before this one: the snapshot's last (it is sorted), or
                    # while purchases continue a snapshot, the one appended before (they are in order).
                    if snap is not None:
                        latest = snap.events[-1]
                    elif ev.user_id in self._extends and len(bought) > 1:
                        latest = bought[-2]
                    else:
                        continue  # no snapshot to continue
                    if ev.timestamp >= latest.timestamp:
                        if snap is not None:
                            self._extends[ev.user_id] = snap
                    else:
                        # Out of order: the next snapshot is sorted anew, not a continuation.
                        self._extends.pop(ev.user_id, None)
                    continue
                q = self._users.get(ev.user_id)
                if q is None:
                    self._n_customers += ev.user_id not in self._purchases
                    q = self._users[ev.user_id] = collections.deque(maxlen=self.max_events_per_user)
                else:
                    self._users.move_to_end(ev.user_id)
                q.append(ev)
            while len(self._users) > self.max_users:
                uid, _ = self._users.popitem(last=False)
                self._n_customers -= uid not in self._purchases
                self.evicted_users += 1
        return kept

    def prune(self, horizon: float, durable_types: tuple[str, ...] | None = None) -> int:
        """A bundle with data up to ``horizon`` is served: drop what it holds; returns how many
        events were dropped. ``durable_types`` updates the types held as purchases."""
        dropped = 0
        with self._lock:
            if durable_types is not None:
                self.durable_types = frozenset(durable_types)
            if horizon <= self.horizon:
                return 0
            self.horizon = horizon
            # What a prune drops is a prefix of the snapshots: none continues an earlier one.
            self._held.clear()
            self._extends.clear()
            for uid in list(self._purchases):
                keep = [e for e in self._purchases[uid] if e.timestamp > horizon]
                dropped += len(self._purchases[uid]) - len(keep)
                if keep:
                    self._purchases[uid] = keep
                else:
                    del self._purchases[uid]
            for uid in list(self._users):
                q = self._users[uid]
                keep_q = [e for e in q if e.timestamp > horizon]
                dropped += len(q) - len(keep_q)
                if keep_q:
                    self._users[uid] = collections.deque(keep_q, maxlen=self.max_events_per_user)
                else:
                    del self._users[uid]
            self._n_customers = len(self._users.keys() | self._purchases.keys())
        return dropped

    def events(self, user_id: str) -> list[Event]:
        """The customer's held events after the horizon, oldest first (a copy)."""
        return self.held(user_id).merged()

    def held(self, user_id: str) -> HeldEvents:
        """The customer's held events after the horizon, recent ones and purchases apart, each
        oldest first (arrival order among equal times); the purchases' snapshot is the same
        object from one read to the next until they change."""
        if not user_id:
            return HeldEvents()
        with self._lock:
            q = self._users.get(user_id)
            if q is not None:
                self._users.move_to_end(user_id)
            recent = tuple(q or ())
            snap = self._held.get(user_id)
            bought = self._purchases.get(user_id) if snap is None else None
            raw = tuple(bought) if bought else ()
            base = self._extends.get(user_id) if snap is None else None
        if snap is None:
            # Made outside the lock; kept unless the purchases changed meanwhile. Purchases
            # appended in time order since ``base`` continue it as they are.
            if base is not None and len(base.events) <= len(raw):
                snap = HeldPurchases(base.events + raw[len(base.events) :], extends=base)
            else:
                snap = HeldPurchases(tuple(sorted(raw, key=_time)))
            with self._lock:
                if bought and self._purchases.get(user_id) is bought and len(bought) == len(raw):
                    self._held[user_id] = snap
                    if self._extends.get(user_id) is base:
                        self._extends.pop(user_id, None)
        # Arrival order is not event-time order.
        return HeldEvents(tuple(sorted(recent, key=_time)), snap)
