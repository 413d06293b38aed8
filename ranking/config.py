"""The library's configuration sections (each default written once) and the docs tables made from them.

Light on purpose (dataclasses only, no numpy or faiss): the server's and the builder's
configs import it when they load and derive their own defaults from these.
"""

from __future__ import annotations

import dataclasses
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Items in the exact head by default: 16 384 x 64 float32 is 4 MB, which stays in cache
# between requests where the whole index (hundreds of MB at a million items) cannot.
DEFAULT_EXACT_HEAD_ITEMS = 16384

# Search effort of a bundle that records no tuned one (built before the builder chose it,
# or by the builder's own in-memory models); a bundle's ``retrieval.ann_effort`` replaces it.
DEFAULT_ANN_EFFORT = 128


# Why an id with a NUL character is refused: the bundle's id arrays are fixed-width NumPy text,
# which drops trailing NULs, so "u1\x00" would be served as "u1" while real-time state keeps it.
ID_NUL = "holds a NUL character"


def id_problem(v: str, max_chars: int) -> str | None:
    """Why an id (user or item, in a Rank or RecordEvents request) cannot be taken, or None."""
    if len(v) > max_chars:
        return f"is longer than {max_chars} characters"
    if "\x00" in v:
        return ID_NUL
    return None


@dataclass(frozen=True)
class QueryLimits:
    """Request limits; every default is written down here once (see docs/api.md)."""

    default_results: int = 10
    max_results: int = 100
    max_request_items: int = 10_000
    max_session_items: int = 100
    max_attributes: int = 64
    max_id_chars: int = 256
    max_text_chars: int = 64
    max_attribute_chars: int = 256


@dataclass(frozen=True)
class RankerConfig:
    """Online pipeline settings; every default is written down here once."""

    n_candidates: int = 200
    popular_candidates: int = 50
    # 0: the bundle's own (``retrieval.ann_effort`` in its manifest, chosen by the builder for
    # recall of the served path), else DEFAULT_ANN_EFFORT. Any other value is the operator's
    # and wins over the bundle's.
    ann_effort: int = 0
    # 0: the bundle's own (``retrieval.ann_refine``, chosen with ann_effort), else 1. Any value
    # >= 1 is the operator's: a query the exact head cannot prove asks the ANN index for
    # ceil(k x ann_refine) items and keeps the k best by the exact inner product (1: none).
    ann_refine: float = 0.0
    max_consumed_slack: int = 1000
    covis_candidates: int = 100
    # The user's own re-offerable purchases added as candidates, most due first (ONE_TO_ONE only).
    buy_again_candidates: int = 50
    limits: QueryLimits = field(default_factory=QueryLimits)
    # Test/debug only, empty in production: microseconds of artificial work per
    # candidate in a stage ("retrieve", "features"), to prove budget handling.
    debug_delay_us_per_candidate: dict[str, float] = field(default_factory=dict)
    ann_batch_size: int = 1
    ann_batch_wait_us: float = 300.0
    # Items of largest norm searched exactly before the ANN index (ranking.retrieval); 0: off.
    exact_head_items: int = DEFAULT_EXACT_HEAD_ITEMS
    # Phased scoring: the first phase (a prefix of every bag of the reranker, chosen by the
    # builder) scores every candidate, the full model the best N of them. -1: the bundle's own
    # N (``phases.second_phase_candidates`` in its manifest, 0 when it records none); 0: one
    # phase, the full model over every candidate; N > 0: the operator's N.
    second_phase_candidates: int = -1
    # Milliseconds of a request's budget the scoring must fit with the cost model's plan
    # (ranking.pipeline.budget.CostModel): a bundle whose measured scoring cost is over it gets
    # its second phase cut at warm-up. The server passes its default_budget_ms; 0: no check.
    scoring_budget_ms: float = 0.0


def bundle_ann_effort(manifest: dict[str, Any]) -> int | None:
    """The search effort a bundle's builder chose (``retrieval.ann_effort``), or None when it records none."""
    effort = (manifest.get("retrieval") or {}).get("ann_effort")
    return int(effort) if isinstance(effort, int) and effort > 0 else None


def effective_ann_effort(config: RankerConfig, manifest: dict[str, Any]) -> tuple[int, str]:
    """The effort a ranker searches with and where it came from: ``config`` (the operator set
    ``ann_effort``), ``bundle`` (the builder's tuned choice) or ``default`` (neither)."""
    if config.ann_effort > 0:
        return config.ann_effort, "config"
    tuned = bundle_ann_effort(manifest)
    if tuned is not None:
        return tuned, "bundle"
    return DEFAULT_ANN_EFFORT, "default"


def bundle_ann_refine(manifest: dict[str, Any]) -> float | None:
    """The refine factor a bundle's builder chose (``retrieval.ann_refine``), or None when it records none."""
    refine = (manifest.get("retrieval") or {}).get("ann_refine")
    if isinstance(refine, (int, float)) and not isinstance(refine, bool) and refine >= 1:
        return float(refine)
    return None


def effective_ann_refine(config: RankerConfig, manifest: dict[str, Any]) -> tuple[float, str]:
    """The refine factor a ranker searches with and where it came from: ``config`` (the operator set
    ``ann_refine``), ``bundle`` (the builder's choice, tuned with its effort) or ``default`` (1: none).

    Raises
    ------
    ValueError
        ``config.ann_refine`` is neither 0 nor >= 1.
    """
    if config.ann_refine == 0:
        tuned = bundle_ann_refine(manifest)
        return (tuned, "bundle") if tuned is not None else (1.0, "default")
    if not config.ann_refine >= 1:  # also NaN
        raise ValueError(f"ann_refine {config.ann_refine} must be 0 (the bundle's) or >= 1 (1: no re-ranking)")
    return float(config.ann_refine), "config"


def bundle_second_phase(manifest: dict[str, Any]) -> int | None:
    """The second phase's N a bundle's builder chose (``phases.second_phase_candidates``; 0 when its
    phases lost NDCG), or None when it records none."""
    n = (manifest.get("phases") or {}).get("second_phase_candidates")
    return int(n) if isinstance(n, int) and not isinstance(n, bool) and n >= 0 else None


def effective_second_phase(config: RankerConfig, manifest: dict[str, Any]) -> tuple[int, str]:
    """The second phase's N a ranker scores with and where it came from: ``config`` (the operator
    set ``second_phase_candidates >= 0``), ``bundle`` (the builder's choice) or ``default`` (one phase)."""
    if config.second_phase_candidates >= 0:
        return config.second_phase_candidates, "config"
    chosen = bundle_second_phase(manifest)
    if chosen is not None:
        return chosen, "bundle"
    return 0, "default"


@dataclass(frozen=True)
class OverlaySettings:
    """Real-time tuning; every default is written down here once (see docs/api.md)."""

    # Score subtracted from a candidate as similar (cosine) as possible to an item the user
    # skipped or disliked; scaled down with the cosine, nothing below 0.
    skip_penalty: float = 3.0
    # Score added to the candidate most similar to an item the user engaged with since the
    # bundle was built (not to that item itself); the least similar get nothing.
    interest_boost: float = 2.0


@dataclass(frozen=True)
class UserStateSettings:
    """Bounds of the per-user real-time state (:class:`ranking.realtime.user_state.UserStateStore`)."""

    # Least recently touched users' recent events are evicted beyond this many (they stay in
    # the event log); purchases are never evicted, only dropped once a served bundle holds them.
    max_users: int = 100_000
    max_events_per_user: int = 200
    # Held as purchases when no bundle is served yet (then the bundle's consumed_event_types).
    durable_types: tuple[str, ...] = ("purchase", "rating")


@dataclass(frozen=True)
class EventLogSettings:
    """How the durable event log (:class:`ranking.realtime.eventlog.EventLog`) writes."""

    # "always" is what makes an acknowledged event survive a crash of the machine.
    fsync: str = "always"
    segment_bytes: int = 64 << 20
    fsync_interval_seconds: float = 1.0


# ---------------------------------------------------------------------------
# Docs tables, generated from the fields' ``metadata["help"]``
# ---------------------------------------------------------------------------

TABLE_START = "<!-- config-table:start -->"
TABLE_END = "<!-- config-table:end -->"


def _shown(value: Any) -> str:
    """A default as a reader would write it in a TOML file (strings bare, as in the prose)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else repr(value)
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_shown(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(f'"{v}"' if isinstance(v, str) else _shown(v) for v in value) + "]"
    return str(value)


def settings_table(cls: type) -> str:
    """The Markdown table of a config dataclass: setting, default, meaning.

    Parameters
    ----------
    cls : type
        A dataclass whose every field has ``metadata["help"]``; ``metadata["default"]``,
        when present, replaces the shown default (for an empty string that means
        something, such as "required").

    Returns
    -------
    str
        The table, one row per field in declaration order, ending with a newline.

    Raises
    ------
    ValueError
        A field has no help text.
    """
    rows = ["| setting | default | meaning |", "|---|---|---|"]
    for f in dataclasses.fields(cls):
        if "help" not in f.metadata:
            raise ValueError(f"{cls.__name__}.{f.name} has no metadata['help']: say in a line what it does")
        if "default" in f.metadata:
            shown = f.metadata["default"]
        else:
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default  # type: ignore[operator]
            shown = f"`{_shown(default)}`" if default != "" else "(none)"
        meaning = f.metadata["help"].replace("|", "\\|")  # a bare | would end the cell
        rows.append(f"| `{f.name}` | {shown} | {meaning} |")
    return "\n".join(rows) + "\n"


def marked_table(text: str) -> str:
    """What ``text`` holds between the config-table markers.

    Raises
    ------
    ValueError
        The markers are missing.
    """
    m = re.search(re.escape(TABLE_START) + r"\n(.*?)" + re.escape(TABLE_END), text, re.DOTALL)
    if not m:
        raise ValueError(f"no {TABLE_START} ... {TABLE_END} block")
    return m.group(1)


def replace_marked_table(text: str, table: str) -> str:
    """``text`` with the block between the config-table markers replaced by ``table``."""
    marked_table(text)  # raises when the markers are missing
    start, end = text.index(TABLE_START) + len(TABLE_START) + 1, text.index(TABLE_END)
    return text[:start] + table + text[end:]


def settings_main(cls: type, module: str, args: list[str]) -> int:
    """``python -m <module> --markdown [FILE]``: print ``cls``'s settings table, or rewrite it in
    FILE between the config-table markers (what ``make docs`` runs)."""
    if not args or args[0] != "--markdown" or len(args) > 2:
        print(f"usage: python -m {module} --markdown [FILE]", file=sys.stderr)
        return 2
    table = settings_table(cls)
    if len(args) == 1:
        sys.stdout.write(table)
        return 0
    path = Path(args[1])
    path.write_text(replace_marked_table(path.read_text(), table))
    return 0
