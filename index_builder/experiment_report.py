"""The experiment report: a server's event log turned into per-arm conversion rates with
confidence intervals and each arm's lift over the control.

The unit is the impression (one Rank response served in an arm, logged with its
request id). An event that carries that request id is attributed to the arm. Per arm:
impressions, users, attributed clicks, add-to-carts, purchases and revenue; the share
of impressions with at least one click / add-to-cart / purchase (Wilson score
interval); revenue per impression (normal interval); and for every arm but the
control the relative lift over the control, ``rate_arm / rate_control - 1``, with
the log-ratio (Katz) interval for rates and the delta-method interval for revenue.

Its statistics (:func:`wilson`, :func:`rate_lift`, :func:`mean_ci`, :func:`mean_lift`) are
also the campaign report's (index_builder.campaign_report): one implementation.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from scipy.stats import norm

from index_builder.event_archive import log_records

OUTCOMES = ("click", "add_to_cart", "purchase")


@dataclass
class ArmCounts:
    impressions: int = 0
    users: set = field(default_factory=set)
    events: dict[str, int] = field(default_factory=lambda: {t: 0 for t in OUTCOMES})
    converted: dict[str, set] = field(default_factory=lambda: {t: set() for t in OUTCOMES})
    revenue_by_request: dict[str, float] = field(default_factory=dict)


def wilson(successes: int, n: int, z: float) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion."""
    if n == 0:
        return float("nan"), float("nan")
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def rate_lift(x_a: int, n_a: int, x_c: int, n_c: int, z: float) -> tuple[float, float, float, float]:
    """Relative lift of rate a over rate c with its Katz log-ratio interval and a two-sided
    two-proportion z-test p-value: (lift, low, high, p_value). NaN where undefined (no successes)."""
    if min(x_a, x_c, n_a, n_c) == 0:
        return (float("nan"),) * 4
    pa, pc = x_a / n_a, x_c / n_c
    se = math.sqrt((1 - pa) / x_a + (1 - pc) / x_c)
    log_ratio = math.log(pa / pc)
    pooled = (x_a + x_c) / (n_a + n_c)
    se0 = math.sqrt(pooled * (1 - pooled) * (1 / n_a + 1 / n_c))
    p_value = float(2 * norm.sf(abs(pa - pc) / se0)) if se0 > 0 else float("nan")
    return pa / pc - 1, math.exp(log_ratio - z * se) - 1, math.exp(log_ratio + z * se) - 1, p_value


def mean_ci(values: list[float], n: int, z: float) -> tuple[float, float, float, float]:
    """Mean over ``n`` units of which ``values`` are the non-zero ones: (mean, low, high, variance)."""
    if n == 0:
        return (float("nan"),) * 4
    s, s2 = sum(values), sum(v * v for v in values)
    mean = s / n
    var = max(s2 / n - mean * mean, 0.0) * n / max(n - 1, 1)
    half = z * math.sqrt(var / n)
    return mean, mean - half, mean + half, var


def mean_lift(
    values_a: list[float], n_a: int, values_c: list[float], n_c: int, z: float
) -> tuple[float, float, float, float]:
    """Relative lift of mean a over mean c (each over its ``n`` units, ``values`` the non-zero
    ones, as :func:`mean_ci`), with the delta-method interval of the log ratio and its two-sided
    z-test p-value: (lift, low, high, p_value). NaN where undefined (a mean of 0)."""
    m_a, _, _, var_a = mean_ci(values_a, n_a, z)
    m_c, _, _, var_c = mean_ci(values_c, n_c, z)
    if not (m_a > 0 and m_c > 0):
        return (float("nan"),) * 4
    se = math.sqrt(var_a / (n_a * m_a * m_a) + var_c / (n_c * m_c * m_c))
    log_ratio = math.log(m_a / m_c)
    p_value = float(2 * norm.sf(abs(log_ratio) / se)) if se > 0 else float("nan")
    return m_a / m_c - 1, math.exp(log_ratio - z * se) - 1, math.exp(log_ratio + z * se) - 1, p_value


def collect(log_dir: Path | str) -> tuple[dict[tuple[str, str], ArmCounts], int]:
    """Read the log (or the builder's event archive) once: per-(experiment, arm) counts (arms in
    first-seen order) and how many events carried a request id with no logged impression."""
    arms: dict[tuple[str, str], ArmCounts] = {}
    owner: dict[str, tuple[str, str]] = {}
    unattributed = 0
    # Two passes: with several writers (worker processes) an event may sit in another
    # writer's log than the impression it answers, so every impression is known first.
    for rec in log_records(log_dir):
        if rec.get("kind") == "impression" and rec.get("experiment"):
            key = (rec["experiment"], rec["arm"])
            c = arms.setdefault(key, ArmCounts())
            c.impressions += 1
            c.users.add(rec.get("user_id", ""))
            owner[rec["request_id"]] = key
    for rec in log_records(log_dir):
        kind = rec.get("kind")
        if kind == "event" and rec.get("request_id") and rec.get("event_type") in OUTCOMES:
            owned = owner.get(rec["request_id"])
            if owned is None:
                unattributed += 1
                continue
            c = arms[owned]
            t = rec["event_type"]
            c.events[t] += 1
            c.converted[t].add(rec["request_id"])
            if t == "purchase":
                c.revenue_by_request[rec["request_id"]] = c.revenue_by_request.get(rec["request_id"], 0.0) + float(
                    rec.get("value", 0.0)
                )
    return arms, unattributed


def report(
    log_dir: Path | str, controls: dict[str, str] | None = None, confidence: float = 0.95, experiment: str | None = None
) -> dict:
    """The report as a JSON-able dict.

    Parameters
    ----------
    log_dir : Path
        A server's event log directory.
    controls : dict, optional
        ``{experiment: control arm}``; default: the arm named "control" if there is one,
        else the first arm seen in the log (``--experiments FILE`` supplies the configured ones).
    confidence : float
        Of every interval, in (0, 1).
    experiment : str, optional
        Only this experiment.

    Raises
    ------
    ValueError
        No impression of any (or the named) experiment is in the log, or a bad control/confidence.
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be within (0, 1), got {confidence}")
    z = float(norm.ppf(0.5 + confidence / 2))
    arms, unattributed = collect(log_dir)
    if experiment:
        arms = {k: v for k, v in arms.items() if k[0] == experiment}
    if not arms:
        what = f"experiment {experiment!r}" if experiment else "any experiment"
        raise ValueError(f"{log_dir}: no impression of {what} in the event log")
    experiments: dict[str, dict] = {}
    out = {
        "log": str(log_dir),
        "confidence": confidence,
        "unattributed_events": unattributed,
        "experiments": experiments,
    }
    for exp in dict.fromkeys(k[0] for k in arms):
        names = [a for e, a in arms if e == exp]
        control = (controls or {}).get(exp) or ("control" if "control" in names else names[0])
        if control not in names:
            raise ValueError(f"control arm {control!r} of experiment {exp!r} has no impressions; arms: {names}")
        c = arms[(exp, control)]
        rows = []
        for name in names:
            a = arms[(exp, name)]
            n = a.impressions
            row = {
                "arm": name,
                "control": name == control,
                "impressions": n,
                "users": len(a.users),
                "clicks": a.events["click"],
                "add_to_carts": a.events["add_to_cart"],
                "purchases": a.events["purchase"],
                "revenue": round(sum(a.revenue_by_request.values()), 6),
            }
            for t in OUTCOMES:
                x = len(a.converted[t])
                lo, hi = wilson(x, n, z)
                row[f"{t}_rate"] = {"value": x / n if n else float("nan"), "low": lo, "high": hi}
                if name != control:
                    lift, llo, lhi, p = rate_lift(x, n, len(c.converted[t]), c.impressions, z)
                    row[f"{t}_lift"] = {"value": lift, "low": llo, "high": lhi, "p_value": p}
            m, mlo, mhi, _ = mean_ci(list(a.revenue_by_request.values()), n, z)
            row["revenue_per_impression"] = {"value": m, "low": mlo, "high": mhi}
            if name != control:
                lift, llo, lhi, p = mean_lift(
                    list(a.revenue_by_request.values()), n, list(c.revenue_by_request.values()), c.impressions, z
                )
                if lift == lift:
                    row["revenue_lift"] = {"value": lift, "low": llo, "high": lhi, "p_value": p}
            rows.append(row)
        experiments[exp] = {"control": control, "arms": rows}
    return out


def _pct(d: dict | None) -> str:
    if not d or d["value"] != d["value"]:
        return "n/a"
    return f"{100 * d['value']:+.1f}% [{100 * d['low']:+.1f}, {100 * d['high']:+.1f}]"


def format_rate(d: dict) -> str:
    """A rate and its interval, in percent (``n/a`` without data); both reports print rates so."""
    if d["value"] != d["value"]:
        return "n/a"
    return f"{100 * d['value']:.2f}% [{100 * d['low']:.2f}, {100 * d['high']:.2f}]"


def format_text(rep: dict) -> str:
    """The report as aligned text tables, one per experiment."""
    lines = [
        f"event log {rep['log']}; intervals at {100 * rep['confidence']:.0f}%; "
        f"{rep['unattributed_events']} attributed-looking events had no logged impression"
    ]
    for exp, e in rep["experiments"].items():
        lines.append(f"\nexperiment {exp} (control: {e['control']})")
        head = [
            "arm",
            "impressions",
            "users",
            "clicks",
            "carts",
            "purchases",
            "revenue",
            "purchase rate",
            "purchase lift",
            "click rate",
            "click lift",
            "revenue/impr. lift",
        ]
        table = [head]
        for r in e["arms"]:
            table.append(
                [
                    r["arm"] + (" *" if r["control"] else ""),
                    str(r["impressions"]),
                    str(r["users"]),
                    str(r["clicks"]),
                    str(r["add_to_carts"]),
                    str(r["purchases"]),
                    f"{r['revenue']:.2f}",
                    format_rate(r["purchase_rate"]),
                    _pct(r.get("purchase_lift")) if not r["control"] else "-",
                    format_rate(r["click_rate"]),
                    _pct(r.get("click_lift")) if not r["control"] else "-",
                    _pct(r.get("revenue_lift")) if not r["control"] else "-",
                ]
            )
        widths = [max(len(row[i]) for row in table) for i in range(len(head))]
        for row in table:
            lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    return "\n".join(lines)


def main(
    log_dir: Path,
    controls: list[str],
    confidence: float,
    experiment: str | None,
    as_json: bool,
    experiments_file: Path | None = None,
) -> str:
    """The CLI's output for ``python -m index_builder experiment-report``."""
    parsed = {}
    if experiments_file is not None:
        import tomllib

        from ranking import parse_experiments

        with open(experiments_file, "rb") as fh:
            doc = tomllib.load(fh)
        parsed.update({e.name: e.control for e in parse_experiments(doc.get("experiments", []), str(experiments_file))})
    for pair in controls:
        exp, sep, arm = pair.partition("=")
        if not sep:
            raise ValueError(f"--control {pair!r}: expected EXPERIMENT=ARM")
        parsed[exp] = arm
    rep = report(log_dir, parsed, confidence, experiment)
    return json.dumps(rep, indent=2) if as_json else format_text(rep)
