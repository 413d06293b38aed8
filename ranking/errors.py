"""Domain errors of the ranking core; the server maps them to gRPC status in one place."""

from __future__ import annotations

from dataclasses import dataclass


class RankingError(Exception):
    """Base of every error the ranking core raises on purpose."""


@dataclass(frozen=True)
class FieldViolation:
    """One bad field of a request: its path (e.g. ``context.session_item_ids``) and why."""

    field: str
    description: str


class InvalidRequest(RankingError):
    """The request is malformed; ``violations`` names every offending field."""

    def __init__(self, violations: list[FieldViolation]):
        self.violations = list(violations)
        super().__init__("; ".join(f"{v.field}: {v.description}" for v in self.violations))


class Unavailable(RankingError):
    """The service cannot answer yet, e.g. no bundle is loaded."""


class BundleError(RankingError):
    """A bundle is missing, corrupt or of an incompatible schema; it is never served."""
