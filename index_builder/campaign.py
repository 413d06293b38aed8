"""The campaign file of a portfolio run: who gets offers, what may be offered, in which context,
and how the return is measured; parsed into one typed :class:`Campaign`, every error naming
the file and the key.

Example (README.md, "Portfolios for every customer", explains every key)::

    name = "week_49"

    [who]                       # default: every customer with history in the bundle
    segments = ["region=r1"]    # optional: only customers of these segment keys
    min_consumed = 3            # optional: at least this many items consumed in the bundle
    list = "customers.txt"      # optional: only these ids (a text file, or .csv/.parquet with user_id)

    [offers]
    k = 10
    catalogue = "promotions.txt"          # optional: offer only these items
    include_categories = ["Groceries"]    # optional, as a Rank filter
    exclude_categories = ["Alcohol"]
    min_price = 1.0
    max_price = 50.0
    max_category_share = 0.3              # at most 30% of a portfolio from one category

    [context]
    channel = "email"
    send_time = 2026-12-07T08:00:00Z      # the Rank request's event_time; default: when the run starts
    rules_file = "experiments.toml"       # optional: the server's [[rules]] (inline [[rules]] too)

    [measurement]
    salt = "week_49"            # default: the campaign name
    holdout = 0.1               # this share of the chosen customers gets nothing
    arms = [                    # optional; default: one arm, the full pipeline
      { name = "popular",    variant = "POPULAR",    weight = 1 },
      { name = "one_to_one", variant = "ONE_TO_ONE", weight = 1 },
    ]
"""

from __future__ import annotations

import datetime as _dt
import re
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ranking import Experiment, Rule, bucket, parse_experiments, parse_rules

HOLDOUT = "holdout"
DEFAULT_ARM = "one_to_one"
MAX_K = 100
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")
_SECTIONS = {
    "who": {"segments", "min_consumed", "list"},
    "offers": {
        "k",
        "catalogue",
        "include_categories",
        "exclude_categories",
        "min_price",
        "max_price",
        "max_category_share",
    },
    "context": {"channel", "device", "region", "send_time", "rules_file"},
    "measurement": {"salt", "holdout", "arms"},
}


class CampaignError(ValueError):
    """A campaign file that cannot be run; the message names the file and the key."""


@dataclass(frozen=True)
class Who:
    segments: tuple[str, ...] = ()
    min_consumed: int = 0
    list_file: str = ""


@dataclass(frozen=True)
class Offers:
    k: int = 10
    catalogue_file: str = ""
    include_categories: tuple[str, ...] = ()
    exclude_categories: tuple[str, ...] = ()
    min_price: float = 0.0
    max_price: float = 0.0
    max_category_share: float = 1.0

    def per_category(self) -> int:
        """Most offers of one portfolio that may share a category (at least one)."""
        return max(1, int(self.max_category_share * self.k + 1e-9))


@dataclass(frozen=True)
class Context:
    channel: str = ""
    device: str = ""
    region: str = ""
    send_time: float = 0.0  # unix seconds
    rules_file: str = ""


@dataclass(frozen=True)
class Campaign:
    """A parsed campaign file; paths in it are resolved against the file's directory."""

    name: str
    source: str
    who: Who
    offers: Offers
    context: Context
    salt: str
    holdout: float
    experiment: Experiment
    rules: tuple[Rule, ...] = ()
    catalogue: tuple[str, ...] = field(default=(), repr=False)
    customers: tuple[str, ...] | None = field(default=None, repr=False)

    def group(self, user_id: str) -> tuple[str, str]:
        """(arm, variant name) of a customer: the holdout first (its own hash), then an arm."""
        if self.holdout > 0 and bucket(user_id, self.salt + ":holdout") < self.holdout:
            return HOLDOUT, "ONE_TO_ONE"
        arm = self.experiment.arm_for(user_id)
        return arm.name, arm.variant.name

    def arm_names(self) -> list[str]:
        return [a.name for a in self.experiment.arms]

    def settings(self) -> dict[str, Any]:
        """What the manifest records of this campaign (the id lists by count, not in full)."""
        return {
            "name": self.name,
            "source": self.source,
            "who": asdict(self.who),
            "offers": asdict(self.offers),
            "context": {
                **asdict(self.context),
                "send_time_iso": _dt.datetime.fromtimestamp(self.context.send_time, _dt.UTC).isoformat(),
            },
            "measurement": {
                "salt": self.salt,
                "holdout": self.holdout,
                "arms": [{"name": a.name, "variant": a.variant.name, "weight": a.weight} for a in self.experiment.arms],
            },
            "rules": [r.name for r in self.rules],
            "catalogue_items": len(self.catalogue),
            "listed_customers": None if self.customers is None else len(self.customers),
        }


def _fail(where: str, message: str) -> CampaignError:
    return CampaignError(f"{where}: {message}")


def _strings(where: str, value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise _fail(where, f"must be a list of non-empty strings, got {value!r}")
    return tuple(v.strip() for v in value)


def _number(where: str, value: Any, lo: float, hi: float | None = None) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not value >= lo
        or (hi is not None and value > hi)
    ):
        bounds = f"within [{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise _fail(where, f"must be a number {bounds}, got {value!r}")
    return float(value)


def _int(where: str, value: Any, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise _fail(where, f"must be an integer within [{lo}, {hi}], got {value!r}")
    return value


def read_id_list(path: Path, column: str, where: str) -> tuple[str, ...]:
    """Ids from a text file (one a line, blank lines and ``#`` comments skipped) or the ``column`` of a
    .csv/.parquet file, in file order without duplicates.

    Raises
    ------
    CampaignError
        The file is missing, has no such column, or lists no id.
    """
    if not path.is_file():
        raise _fail(where, f"file {path} does not exist")
    suffix = "".join(path.suffixes[-2:]).lower()
    if suffix.endswith((".parquet", ".pq", ".csv", ".csv.gz")):
        import pyarrow.csv as pacsv
        import pyarrow.parquet as pq

        try:
            table = (
                pq.read_table(path)
                if suffix.endswith((".parquet", ".pq"))
                else pacsv.read_csv(path, convert_options=pacsv.ConvertOptions(column_types={column: "string"}))
            )
        except Exception as exc:  # pyarrow raises several kinds for an unreadable file
            raise _fail(where, f"cannot read {path}: {exc}") from None
        if column not in table.column_names:
            raise _fail(where, f"{path} has no {column!r} column (columns: {', '.join(table.column_names)})")
        ids = [str(v).strip() for v in table.column(column).to_pylist() if v is not None and str(v).strip()]
    else:
        lines = path.read_text(encoding="utf-8").splitlines()
        ids = [s for s in (line.strip() for line in lines) if s and not s.startswith("#")]
    if not ids:
        raise _fail(where, f"{path} lists no id")
    return tuple(dict.fromkeys(ids))


def _send_time(where: str, value: Any, now: float) -> float:
    if value is None:
        return now
    if isinstance(value, _dt.datetime):
        if value.tzinfo is None:
            raise _fail(where, f"{value.isoformat()} has no time zone; write it as e.g. 2026-12-07T08:00:00Z")
        return value.timestamp()
    if isinstance(value, _dt.date):
        raise _fail(
            where, f"{value.isoformat()} is a date; give a time with a zone, e.g. {value.isoformat()}T08:00:00Z"
        )
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
        return float(value)
    raise _fail(where, f"must be a TOML date-time with a zone or unix seconds, got {value!r}")


def load_campaign(path: Path | str, now: float | None = None) -> Campaign:
    """Parse and check a campaign file; list files it names are read here.

    Parameters
    ----------
    path : Path
        The campaign TOML.
    now : float, optional
        Unix seconds taken as the send time when the file gives none (default: the current time).

    Returns
    -------
    Campaign

    Raises
    ------
    CampaignError
        Naming the file, the key and what is wrong.
    """
    path = Path(path)
    src = str(path)
    try:
        with open(path, "rb") as fh:
            doc = tomllib.load(fh)
    except FileNotFoundError:
        raise CampaignError(f"{src}: campaign file does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise CampaignError(f"{src}: not valid TOML: {exc}") from None
    here = path.resolve().parent
    unknown = sorted(set(doc) - {"name", "rules", *_SECTIONS})
    if unknown:
        raise _fail(src, f"unknown key(s) {', '.join(unknown)}; known: name, rules, {', '.join(_SECTIONS)}")
    name = doc.get("name")
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise _fail(f"{src}: name", f"must be 1-64 of a-z 0-9 _ . - (starting with a letter or digit), got {name!r}")
    tables: dict[str, dict] = {}
    for section, known in _SECTIONS.items():
        t = doc.get(section, {})
        if not isinstance(t, dict):
            raise _fail(f"{src}: {section}", "must be a table")
        bad = sorted(set(t) - known)
        if bad:
            raise _fail(f"{src}: {section}", f"unknown key(s) {', '.join(bad)}; known: {', '.join(sorted(known))}")
        tables[section] = t

    w = tables["who"]
    who = Who(
        segments=tuple(s.lower() for s in _strings(f"{src}: who.segments", w["segments"])) if "segments" in w else (),
        min_consumed=_int(f"{src}: who.min_consumed", w.get("min_consumed", 0), 0, 1 << 31),
        list_file=str(here / w["list"]) if isinstance(w.get("list"), str) else "",
    )
    if "list" in w and not isinstance(w["list"], str):
        raise _fail(f"{src}: who.list", f"must be a file path, got {w['list']!r}")
    customers = read_id_list(Path(who.list_file), "user_id", f"{src}: who.list") if who.list_file else None

    o = tables["offers"]
    if "k" not in o:
        raise _fail(f"{src}: offers.k", "is required (offers per customer)")
    if "catalogue" in o and not isinstance(o["catalogue"], str):
        raise _fail(f"{src}: offers.catalogue", f"must be a file path, got {o['catalogue']!r}")
    offers = Offers(
        k=_int(f"{src}: offers.k", o["k"], 1, MAX_K),
        catalogue_file=str(here / o["catalogue"]) if "catalogue" in o else "",
        include_categories=_strings(f"{src}: offers.include_categories", o.get("include_categories", [])),
        exclude_categories=_strings(f"{src}: offers.exclude_categories", o.get("exclude_categories", [])),
        min_price=_number(f"{src}: offers.min_price", o.get("min_price", 0.0), 0.0),
        max_price=_number(f"{src}: offers.max_price", o.get("max_price", 0.0), 0.0),
        max_category_share=_number(f"{src}: offers.max_category_share", o.get("max_category_share", 1.0), 0.0, 1.0),
    )
    if offers.max_category_share == 0:
        raise _fail(f"{src}: offers.max_category_share", "is 0: no offer could be made; use a share in (0, 1]")
    if offers.min_price > 0 and offers.max_price > 0 and offers.min_price > offers.max_price:
        raise _fail(f"{src}: offers.max_price", f"{offers.max_price} is below offers.min_price {offers.min_price}")
    catalogue = (
        read_id_list(Path(offers.catalogue_file), "item_id", f"{src}: offers.catalogue") if "catalogue" in o else ()
    )

    c = tables["context"]
    for key in ("channel", "device", "region", "rules_file"):
        if key in c and not isinstance(c[key], str):
            raise _fail(f"{src}: context.{key}", f"must be a string, got {c[key]!r}")
    import time

    context = Context(
        channel=c.get("channel", "").strip(),
        device=c.get("device", "").strip(),
        region=c.get("region", "").strip(),
        send_time=_send_time(f"{src}: context.send_time", c.get("send_time"), time.time() if now is None else now),
        rules_file=str(here / c["rules_file"]) if c.get("rules_file") else "",
    )
    rules: list[Rule] = []
    if context.rules_file:
        rules_path = Path(context.rules_file)
        try:
            with open(rules_path, "rb") as fh:
                rules_doc = tomllib.load(fh)
        except FileNotFoundError:
            raise _fail(f"{src}: context.rules_file", f"file {rules_path} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise _fail(f"{src}: context.rules_file", f"{rules_path} is not valid TOML: {exc}") from None
        try:
            rules += parse_rules(rules_doc.get("rules", []), str(rules_path))
        except ValueError as exc:
            raise CampaignError(f"{src}: context.rules_file: {exc}") from None
    try:
        rules += parse_rules(doc.get("rules", []), src)
    except ValueError as exc:
        raise CampaignError(str(exc)) from None
    if len({r.name for r in rules}) < len(rules):
        raise _fail(f"{src}: rules", "a rule name appears both inline and in context.rules_file")

    m = tables["measurement"]
    salt = m.get("salt", name)
    if not isinstance(salt, str) or not salt:
        raise _fail(f"{src}: measurement.salt", f"must be a non-empty string, got {salt!r}")
    holdout = _number(f"{src}: measurement.holdout", m.get("holdout", 0.0), 0.0, 1.0)
    if holdout >= 1.0:
        raise _fail(f"{src}: measurement.holdout", "is 1: nobody would get an offer; use a share in [0, 1)")
    arms = m.get("arms", [{"name": DEFAULT_ARM, "variant": "ONE_TO_ONE"}])
    if not isinstance(arms, list) or not arms:
        raise _fail(f"{src}: measurement.arms", "must be a non-empty list of {name, variant, weight} tables")
    if any(isinstance(a, dict) and a.get("name") == HOLDOUT for a in arms):
        raise _fail(f"{src}: measurement.arms", f"{HOLDOUT!r} is the holdout's name; call the arm something else")
    # One arm is allowed here (an experiment needs two): pad with a zero-weight twin to reuse the parser.
    pad = "padding_arm" if not (isinstance(arms[0], dict) and arms[0].get("name") == "padding_arm") else "padding_arm2"
    padded = arms if len(arms) > 1 else [*arms, {"name": pad, "variant": "POPULAR", "weight": 0}]
    try:
        (experiment,) = parse_experiments([{"name": "campaign", "salt": salt, "arms": padded}], f"{src}: measurement")
    except ValueError as exc:
        raise CampaignError(str(exc).replace("experiment 'campaign': ", "")) from None
    if len(arms) == 1:
        experiment = Experiment(experiment.name, salt, experiment.arms[:1], experiment.arms[0].name)
    return Campaign(
        name=name,
        source=src,
        who=who,
        offers=offers,
        context=context,
        salt=salt,
        holdout=holdout,
        experiment=experiment,
        rules=tuple(rules),
        catalogue=catalogue,
        customers=customers,
    )
