"""Experiments from configuration: arms that are pipeline variants, a stable hash split of
users, pilot-cohort targeting, and the per-request ``variant`` override.

In the experiments/rules TOML::

    [[experiments]]
    name = "ladder"
    salt = "2026-11"                 # change it to reshuffle users
    control = "one_to_one"           # the arm the report measures lift against
    arms = [
      { name = "popular",    variant = "POPULAR",    weight = 1 },
      { name = "one_to_one", variant = "ONE_TO_ONE", weight = 1 },
    ]
    [experiments.target]             # optional: the pilot cohort
    min_consumed = 20                # users with >= 20 consumed items in the bundle
    channels = ["web", "app"]        # requests on these channels only
    fraction = 0.5                   # half of the cohort (own hash, independent of the split)

A user enters the first experiment whose target they match; anonymous requests (no
user id) enter none. The arm is ``bucket(user_id, salt)`` against the cumulative
weights, where bucket is the first 8 bytes of SHA-256 as a fraction of 2⁶⁴, so it
is stable across processes, restarts and machines.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from ranking.errors import FieldViolation, InvalidRequest
from ranking.policy.tomltables import named_tables

_NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,31}$")


@dataclass(frozen=True)
class Variant:
    """What a pipeline variant changes: the highest rung it may use and whether it sees
    context (session items, context attributes, real-time events). Exclusion of what the
    user bought and the context rules apply in every variant."""

    name: str
    max_rung: int
    use_context: bool


# Rung numbers as in ranking.pipeline.ranker.Rung (kept literal so this module needs no pipeline import).
VARIANTS = {
    v.name: v
    for v in (
        Variant("POPULAR", 1, False),
        Variant("SEGMENT", 2, True),
        Variant("SESSION", 3, True),
        Variant("ONE_TO_ONE_NO_CONTEXT", 4, False),
        Variant("ONE_TO_ONE", 4, True),
    )
}
FULL = VARIANTS["ONE_TO_ONE"]


@dataclass(frozen=True)
class Arm:
    name: str
    variant: Variant
    weight: float


@dataclass(frozen=True)
class Target:
    """Who is in the experiment; every condition is optional."""

    min_consumed: int = 0
    channels: tuple[str, ...] = ()
    fraction: float = 1.0


@dataclass(frozen=True)
class Experiment:
    name: str
    salt: str
    arms: tuple[Arm, ...]
    control: str
    target: Target = Target()

    def arm_for(self, user_id: str) -> Arm:
        """The user's arm: stable for a given (user id, salt)."""
        b = bucket(user_id, self.salt)
        total = sum(a.weight for a in self.arms)
        acc = 0.0
        for arm in self.arms:
            acc += arm.weight / total
            if b < acc:
                return arm
        return self.arms[-1]  # b rounds up against the last cumulative weight

    def targets(self, user_id: str, channel: str, consumed: Callable[[], int]) -> bool:
        t = self.target
        if not user_id:
            return False
        if t.channels and channel.strip().lower() not in t.channels:
            return False
        if t.fraction < 1.0 and bucket(user_id, self.salt + ":pilot") >= t.fraction:
            return False
        return t.min_consumed <= 0 or consumed() >= t.min_consumed


def bucket(user_id: str, salt: str) -> float:
    """A uniform number in [0, 1) fixed by (user id, salt)."""
    digest = hashlib.sha256(f"{salt}\x00{user_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


@dataclass(frozen=True)
class Assignment:
    """What serves a request: the experiment and arm (empty when none) and the variant."""

    experiment: str
    arm: str
    variant: Variant


NO_EXPERIMENT = Assignment("", "", FULL)


@dataclass
class Experiments:
    """The configured experiments, in configuration order."""

    experiments: list[Experiment] = field(default_factory=list)

    def arm_names(self) -> list[tuple[str, str]]:
        return [(e.name, a.name) for e in self.experiments for a in e.arms]

    def assign(self, user_id: str, channel: str, consumed: Callable[[], int], override: str = "") -> Assignment:
        """The assignment of one request.

        Parameters
        ----------
        user_id, channel : str
        consumed : callable
            Returns the user's number of consumed items in the bundle (only called when an
            experiment targets by activity).
        override : str
            The request's ``variant``: an arm name of the user's experiment, or a variant name.

        Raises
        ------
        InvalidRequest
            ``override`` names neither.
        """
        exp = next((e for e in self.experiments if e.targets(user_id, channel, consumed)), None)
        if override:
            # A forced arm or variant is not a sample of the experiment (the caller chose it): it
            # is labelled with the arm's name but counted in no arm, so testing an arm by hand
            # leaves the experiment's figures as its random assignment made them.
            if exp is not None:
                arm = next((a for a in exp.arms if a.name == override), None)
                if arm is not None:
                    return Assignment("", arm.name, arm.variant)
            variant = VARIANTS.get(override.strip().upper())
            if variant is None:
                arms = [a.name for a in exp.arms] if exp else []
                raise InvalidRequest(
                    [
                        FieldViolation(
                            "variant",
                            (
                                f"{override[:64]!r} is neither a variant ({', '.join(VARIANTS)})"
                                + (f" nor an arm of experiment {exp.name!r} ({', '.join(arms)})" if exp else "")
                            ),
                        )
                    ]
                )
            return Assignment("", variant.name.lower(), variant)
        if exp is None:
            return NO_EXPERIMENT
        arm = exp.arm_for(user_id)
        return Assignment(exp.name, arm.name, arm.variant)


def _num(where: str, v, lo: float) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= lo:
        raise ValueError(f"{where} must be a number >= {lo}, got {v!r}")
    return float(v)


def parse_experiments(doc: list[dict], source: str) -> list[Experiment]:
    """Experiments from the ``[[experiments]]`` tables of a TOML document.

    Raises
    ------
    ValueError
        Naming the experiment, the key and what is wrong.
    """
    out = []
    for t, name, where in named_tables(
        doc, source, "experiments", "experiment", {"name", "salt", "control", "arms", "target"}, 32
    ):
        salt = t.get("salt", name)
        if not isinstance(salt, str):
            raise ValueError(f"{where}: salt must be a string")
        arms, arm_names = [], set()
        raw_arms = t.get("arms")
        if not isinstance(raw_arms, list) or len(raw_arms) < 2:
            raise ValueError(f"{where}: needs 'arms', a list of at least two {{name, variant, weight}} tables")
        for a in raw_arms:
            an = a.get("name") if isinstance(a, dict) else None
            if not isinstance(an, str) or not _NAME_RE.match(an) or an in arm_names:
                raise ValueError(f"{where}: arm name {an!r} must be unique lower_snake_case, at most 32 characters")
            arm_names.add(an)
            vn = str(a.get("variant", "")).upper()
            if vn not in VARIANTS:
                raise ValueError(
                    f"{where}: arm {an!r} variant {a.get('variant')!r} is not one of {', '.join(VARIANTS)}"
                )
            unknown = sorted(set(a) - {"name", "variant", "weight"})
            if unknown:
                raise ValueError(f"{where}: arm {an!r}: unknown key(s) {', '.join(unknown)}")
            arms.append(Arm(an, VARIANTS[vn], _num(f"{where}: arm {an!r} weight", a.get("weight", 1), 0)))
        if sum(a.weight for a in arms) <= 0:
            raise ValueError(f"{where}: arm weights sum to 0")
        control = t.get("control", arms[0].name)
        if control not in arm_names:
            raise ValueError(f"{where}: control {control!r} is not one of its arms ({', '.join(arm_names)})")
        tt = t.get("target", {})
        unknown = sorted(set(tt) - {"min_consumed", "channels", "fraction"})
        if unknown:
            raise ValueError(f"{where}: target: unknown key(s) {', '.join(unknown)}")
        fraction = _num(f"{where}: target.fraction", tt.get("fraction", 1.0), 0)
        if fraction > 1:
            raise ValueError(f"{where}: target.fraction must be within [0, 1], got {fraction}")
        channels = tt.get("channels", [])
        if not isinstance(channels, list) or not all(isinstance(c, str) for c in channels):
            raise ValueError(f"{where}: target.channels must be a list of strings")
        target = Target(
            int(_num(f"{where}: target.min_consumed", tt.get("min_consumed", 0), 0)),
            tuple(c.strip().lower() for c in channels),
            fraction,
        )
        out.append(Experiment(name, salt, tuple(arms), control, target))
    return out
