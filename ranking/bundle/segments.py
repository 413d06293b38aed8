"""Segment keys (one-to-many): which user attributes define a segment and how values are banded."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True)
class SegmentScheme:
    """How user attributes map to segment keys.

    ``columns`` are the segment variables in order of importance; a numeric column
    listed in ``bands`` is cut into bands of that width (age 34 with width 10 →
    ``30-39``). A user's keys run from the most specific (all columns) to single
    columns, so a segment too small to have been kept falls back to a coarser one.
    """

    columns: tuple[str, ...] = ()
    bands: Mapping[str, float] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: Mapping) -> SegmentScheme:
        return cls(columns=tuple(d.get("columns", ())), bands=dict(d.get("bands", {})))

    def to_dict(self) -> dict:
        return {"columns": list(self.columns), "bands": dict(self.bands)}

    def value(self, column: str, raw: str | None) -> str | None:
        """The segment value of one attribute: banded when numeric, stripped text otherwise."""
        if raw is None:
            return None
        raw = str(raw).strip()
        if not raw:
            return None
        width = self.bands.get(column)
        if width:
            try:
                x = float(raw)
            except ValueError:
                return None
            if not math.isfinite(x):
                return None
            lo = math.floor(x / width) * width
            hi = lo + width
            fmt = (lambda v: str(int(v))) if float(width).is_integer() else (lambda v: f"{v:g}")
            return f"{fmt(lo)}-{fmt(hi - 1) if float(width).is_integer() else fmt(hi)}"
        return raw.lower()

    def keys(self, attributes: Mapping[str, str]) -> list[str]:
        """Candidate segment keys for these attributes, most specific first."""
        values = [(c, self.value(c, attributes.get(c))) for c in self.columns]
        known = [(c, v) for c, v in values if v is not None]
        out: list[str] = []
        if len(known) > 1:
            out.append("|".join(f"{c}={v}" for c, v in known))
        out.extend(f"{c}={v}" for c, v in known)
        return out
