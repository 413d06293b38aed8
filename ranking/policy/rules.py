"""Context rules from configuration: conditions on the request context that suppress or
restrict a ranking (e.g. an open support case → no cross-sell).

A rule, in the ``[[rules]]`` array of the experiments/rules TOML::

    [[rules]]
    name = "no_cross_sell_during_support"
    when = { support_case_open = "true" }      # context.attributes key → value(s)
    exclude_categories = ["Accessories"]        # and/or only_categories, demote_categories
    demote_by = 1.0                             # score subtracted from demote_categories
    suppress = false                            # true: return nothing at all

``when`` keys ``channel``, ``device`` and ``region`` test those context fields; any
other key tests ``context.attributes[key]``. A value is a string or a list of strings
(any of them); comparison ignores case and surrounding space. All keys must match.
Rules act through the scoring loop: exclusions and suppression via the mask,
demotions via the per-candidate offsets, so they cost nothing extra per item.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ranking.policy.tomltables import named_tables

_CONTEXT_FIELDS = ("channel", "device", "region")


@dataclass(frozen=True)
class Rule:
    """One configured context rule."""

    name: str
    when: dict[str, tuple[str, ...]]
    suppress: bool = False
    exclude_categories: tuple[str, ...] = ()
    only_categories: tuple[str, ...] = ()
    demote_categories: tuple[str, ...] = ()
    demote_by: float = 1.0

    def matches(self, channel: str, device: str, region: str, attributes: dict[str, str]) -> bool:
        """Whether every condition holds for this request context."""
        fields = {"channel": channel, "device": device, "region": region}
        for key, allowed in self.when.items():
            got = fields[key] if key in fields else attributes.get(key)
            if got is None or got.strip().lower() not in allowed:
                return False
        return True


def _strings(where: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, (str, bool, int)):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, (str, bool, int)) for v in value):
        raise ValueError(f"{where} must be a string or a list of strings, got {value!r}")
    # TOML booleans and numbers are accepted as their text, since context values are text.
    return tuple(str(v).lower() if isinstance(v, bool) else str(v) for v in value)


def parse_rules(doc: list[dict], source: str) -> list[Rule]:
    """Rules from the ``[[rules]]`` tables of a TOML document.

    Raises
    ------
    ValueError
        Naming the rule (by position and name), the key and what is wrong.
    """
    known = {"name", "when", "suppress", "exclude_categories", "only_categories", "demote_categories", "demote_by"}
    rules = []
    for table, name, where in named_tables(doc, source, "rules", "rule", known, 64):
        when = table.get("when", {})
        if not isinstance(when, dict) or not when:
            raise ValueError(f"{where}: 'when' must be a non-empty table of conditions")
        conditions = {
            str(k): tuple(v.strip().lower() for v in _strings(f"{where}: when.{k}", v)) for k, v in when.items()
        }
        suppress = table.get("suppress", False)
        if not isinstance(suppress, bool):
            raise ValueError(f"{where}: suppress must be true or false")
        demote_by = table.get("demote_by", 1.0)
        if not isinstance(demote_by, (int, float)) or isinstance(demote_by, bool) or not demote_by > 0:
            raise ValueError(f"{where}: demote_by must be a number > 0, got {demote_by!r}")
        rule = Rule(
            name=name,
            when=conditions,
            suppress=suppress,
            exclude_categories=_strings(f"{where}: exclude_categories", table.get("exclude_categories", [])),
            only_categories=_strings(f"{where}: only_categories", table.get("only_categories", [])),
            demote_categories=_strings(f"{where}: demote_categories", table.get("demote_categories", [])),
            demote_by=float(demote_by),
        )
        if not (rule.suppress or rule.exclude_categories or rule.only_categories or rule.demote_categories):
            raise ValueError(
                f"{where}: does nothing; set suppress, exclude_categories, only_categories or demote_categories"
            )
        rules.append(rule)
    return rules


@dataclass
class RuleSet:
    """The configured rules, matched per request in configuration order."""

    rules: list[Rule] = field(default_factory=list)

    def matching(self, channel: str, device: str, region: str, attributes: dict[str, str]) -> list[Rule]:
        return [r for r in self.rules if r.matches(channel, device, region, attributes)]
