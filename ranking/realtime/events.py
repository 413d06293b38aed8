"""The domain form of a user event and its per-event validation (what RecordEvents accepts)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ranking.config import QueryLimits, id_problem

# What the server accepts unless configured otherwise. "dislike" is an explicit
# negative signal like "skip"; both push similar items down.
DEFAULT_EVENT_TYPES = ("view", "click", "add_to_cart", "purchase", "rating", "skip", "dislike")
NEGATIVE_EVENT_TYPES = ("skip", "dislike")


@dataclass(frozen=True)
class EventLimits:
    """Limits an event is validated against; every default is written down here once.

    Ids, context text and attributes arrive by the same API as a Rank request's, so their
    lengths are the request's (``QueryLimits``), not a second spelling of them.
    """

    event_types: tuple[str, ...] = DEFAULT_EVENT_TYPES
    max_id_chars: int = QueryLimits.max_id_chars
    max_request_id_chars: int = 64
    max_text_chars: int = QueryLimits.max_text_chars
    max_attributes: int = QueryLimits.max_attributes
    max_attribute_chars: int = QueryLimits.max_attribute_chars
    max_future_seconds: float = 300.0
    max_events_per_batch: int = 1000
    # No rating or basket is worth more; as a rating's weight a larger value would overflow the
    # fold-in here and the ALS solve of the builder, whose reader takes the same bound.
    max_value: float = 1e12


@dataclass
class Event:
    """One thing a user did, as logged and as applied to user state.

    ``timestamp`` is unix seconds (float); ``value`` is a rating or the amount paid.
    """

    user_id: str
    item_id: str
    event_type: str
    timestamp: float
    value: float = 0.0
    request_id: str = ""
    channel: str = ""
    device: str = ""
    region: str = ""
    attributes: dict[str, str] = field(default_factory=dict)

    def to_record(self) -> dict:
        """The JSON-able form written to the event log (empty fields left out)."""
        rec = {
            "user_id": self.user_id,
            "item_id": self.item_id,
            "event_type": self.event_type,
            "timestamp": self.timestamp,
            "value": self.value,
        }
        for name in ("request_id", "channel", "device", "region"):
            if getattr(self, name):
                rec[name] = getattr(self, name)
        if self.attributes:
            rec["attributes"] = dict(self.attributes)
        return rec

    @classmethod
    def from_record(cls, rec: dict) -> Event:
        return cls(
            user_id=rec["user_id"],
            item_id=rec["item_id"],
            event_type=rec["event_type"],
            timestamp=float(rec["timestamp"]),
            value=float(rec.get("value", 0.0)),
            request_id=rec.get("request_id", ""),
            channel=rec.get("channel", ""),
            device=rec.get("device", ""),
            region=rec.get("region", ""),
            attributes=dict(rec.get("attributes", {})),
        )


@dataclass(frozen=True)
class Rejection:
    """Why the event at ``index`` of a batch was not accepted."""

    index: int
    field: str
    reason: str


def normalise(event: Event) -> Event:
    """Trim ids and lowercase the type, as the offline reader does, so both agree."""
    event.user_id = event.user_id.strip()
    event.item_id = event.item_id.strip()
    event.event_type = event.event_type.strip().lower()
    event.request_id = event.request_id.strip()
    return event


def check_event(event: Event, limits: EventLimits, now: float) -> tuple[str, str] | None:
    """The first problem of one (normalised) event as ``(field, reason)``, or None when it is valid."""
    for name in ("user_id", "item_id"):
        v = getattr(event, name)
        if not v:
            return name, "is empty"
        if (problem := id_problem(v, limits.max_id_chars)) is not None:
            return name, problem
    if not event.event_type:
        return "event_type", "is empty"
    if event.event_type not in limits.event_types:
        return "event_type", f"{event.event_type[:64]!r} is not one of {', '.join(limits.event_types)}"
    if not math.isfinite(event.timestamp):
        return "event_time", "is not a finite time"
    if event.timestamp > now + limits.max_future_seconds:
        return "event_time", (
            f"is {event.timestamp - now:.0f} s ahead of the server clock; "
            f"at most {limits.max_future_seconds:.0f} s are tolerated"
        )
    if event.timestamp < 0:
        return "event_time", "is before 1970"
    if not (0 <= event.value <= limits.max_value):  # NaN too
        return "value", f"is {event.value}; it must be a number from 0 to {limits.max_value:g}"
    if len(event.request_id) > limits.max_request_id_chars:
        return "request_id", f"is longer than {limits.max_request_id_chars} characters"
    for name in ("channel", "device", "region"):
        if len(getattr(event, name)) > limits.max_text_chars:
            return f"context.{name}", f"is longer than {limits.max_text_chars} characters"
    if len(event.attributes) > limits.max_attributes:
        return "context.attributes", f"has {len(event.attributes)} entries; at most {limits.max_attributes} are allowed"
    for key, value in event.attributes.items():
        if not key or len(key) > limits.max_attribute_chars or len(value) > limits.max_attribute_chars:
            return "context.attributes", (
                f"keys must be non-empty; keys and values at most {limits.max_attribute_chars} characters"
            )
    return None


def validate_batch(events: list[Event], limits: EventLimits, now: float) -> tuple[list[Event], list[Rejection]]:
    """Split a batch into the valid events and one rejection per invalid event.

    Parameters
    ----------
    events : list of Event
        The batch in arrival order; events are normalised in place.
    limits : EventLimits
    now : float
        The server clock, unix seconds (bounds how far ahead an event may be).

    Returns
    -------
    (accepted, rejections)
        ``accepted`` keeps batch order; ``rejections`` name index, field and reason.
    """
    accepted, rejections = [], []
    for i, ev in enumerate(events):
        problem = check_event(normalise(ev), limits, now)
        if problem is None:
            accepted.append(ev)
        else:
            rejections.append(Rejection(i, *problem))
    return accepted, rejections
