"""The domain form of a Rank request and the limits it is validated against."""

from __future__ import annotations

from dataclasses import dataclass, field

from ranking.config import QueryLimits, id_problem  # QueryLimits re-exported: its home is the light ranking.config
from ranking.errors import FieldViolation, InvalidRequest


@dataclass
class RankQuery:
    """What a caller asks of :meth:`ranking.pipeline.ranker.Ranker.rank`."""

    user_id: str = ""
    num_results: int = 0
    event_time: float | None = None
    channel: str = ""
    device: str = ""
    region: str = ""
    session_item_ids: list[str] = field(default_factory=list)
    attributes: dict[str, str] = field(default_factory=dict)
    candidate_item_ids: list[str] = field(default_factory=list)
    exclude_item_ids: list[str] = field(default_factory=list)
    include_categories: list[str] = field(default_factory=list)
    exclude_categories: list[str] = field(default_factory=list)
    min_price: float = 0.0
    max_price: float = 0.0
    budget_ms: int = 0
    explain: bool = False

    def validate(self, limits: QueryLimits) -> int:
        """Check every field against ``limits``.

        Returns
        -------
        int
            The number of results to return (default applied, clamped to the maximum).

        Raises
        ------
        InvalidRequest
            With one violation per offending field.
        """
        bad: list[FieldViolation] = []

        def check_ids(name: str, ids: list[str], most: int) -> None:
            if len(ids) > most:
                bad.append(FieldViolation(name, f"has {len(ids)} entries; at most {most} are allowed"))
                return
            for i, x in enumerate(ids):
                if not x:
                    bad.append(FieldViolation(f"{name}[{i}]", "is empty"))
                    return
                if (problem := id_problem(x, limits.max_id_chars)) is not None:
                    bad.append(FieldViolation(f"{name}[{i}]", problem))
                    return

        if (problem := id_problem(self.user_id, limits.max_id_chars)) is not None:
            bad.append(FieldViolation("user_id", problem))
        if self.num_results < 0:
            bad.append(
                FieldViolation(
                    "num_results", f"is {self.num_results}; it must be >= 0 (0 means {limits.default_results})"
                )
            )
        if self.budget_ms < 0:
            bad.append(
                FieldViolation("budget_ms", f"is {self.budget_ms}; it must be >= 0 (0 means the server default)")
            )
        check_ids("candidate_item_ids", self.candidate_item_ids, limits.max_request_items)
        check_ids("exclude_item_ids", self.exclude_item_ids, limits.max_request_items)
        check_ids("context.session_item_ids", self.session_item_ids, limits.max_session_items)
        for name in ("channel", "device", "region"):
            if len(getattr(self, name)) > limits.max_text_chars:
                bad.append(FieldViolation(f"context.{name}", f"is longer than {limits.max_text_chars} characters"))
        if len(self.attributes) > limits.max_attributes:
            bad.append(
                FieldViolation(
                    "context.attributes",
                    f"has {len(self.attributes)} entries; at most {limits.max_attributes} are allowed",
                )
            )
        for key, value in self.attributes.items():
            if not key or len(key) > limits.max_attribute_chars or len(value) > limits.max_attribute_chars:
                bad.append(
                    FieldViolation(
                        f"context.attributes[{key[:32]!r}]",
                        f"keys must be non-empty; keys and values at most {limits.max_attribute_chars} characters",
                    )
                )
                break
        for name in ("min_price", "max_price"):
            v = getattr(self, name)
            if not (v >= 0):  # also catches NaN
                bad.append(FieldViolation(f"filter.{name}", f"is {v}; it must be >= 0 (0 means no bound)"))
        if self.min_price > 0 and self.max_price > 0 and self.min_price > self.max_price:
            bad.append(
                FieldViolation("filter.max_price", f"{self.max_price} is below filter.min_price {self.min_price}")
            )
        for name in ("include_categories", "exclude_categories"):
            check_ids(f"filter.{name}", getattr(self, name), limits.max_request_items)
        if bad:
            raise InvalidRequest(bad)
        k = self.num_results or limits.default_results
        return min(k, limits.max_results)
