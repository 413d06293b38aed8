"""The campaign report: what each arm of a portfolio run returned within a window after the
send, against the holdout, from the purchases that followed.

The unit is the customer (the run's ``customers`` dataset: every chosen customer, holdout
included). Per arm and for the holdout: customers; buyers (customers with any purchase in
the window); redeemers (customers who bought an item of their portfolio; for the holdout,
of the portfolio they would have got: the run ranks it but never sends it); offered items
bought (distinct customer x offered item pairs bought); revenue from offered items and in
total. Each arm's lift over the holdout: of the redemption and buyer rates (Katz interval,
two-proportion z-test) and of revenue per customer, offered and total (delta method), with
the experiment report's statistics (index_builder.experiment_report).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from scipy.stats import norm

from index_builder.campaign import HOLDOUT
from index_builder.experiment_report import format_rate, mean_ci, mean_lift, rate_lift, wilson
from index_builder.portfolio import MANIFEST, read_dataset

DAY = 86_400.0


def _per_user_sums(user_idx: np.ndarray, values: np.ndarray, n_users: int) -> np.ndarray:
    return np.bincount(user_idx, weights=values, minlength=n_users)


def report(
    portfolios: Path | str,
    events: Path | str,
    window_days: float = 7.0,
    purchase_types: tuple[str, ...] = ("purchase",),
    confidence: float = 0.95,
) -> dict:
    """The report as a JSON-able dict.

    Parameters
    ----------
    portfolios : Path
        A portfolio run's output directory.
    events : Path
        Events file (.csv/.parquet) or a server's event log directory, read as the builder reads
        events (index_builder.io.read_events); a purchase's ``value`` is its revenue.
    window_days : float
        Purchases from the send time to this many days after count.
    purchase_types : tuple of str
        Event types that are purchases.
    confidence : float
        Of every interval, in (0, 1).

    Raises
    ------
    ValueError
        A bad window or confidence, or a directory that is not a finished portfolio run.
    """
    from index_builder.io import read_events

    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be within (0, 1), got {confidence}")
    if not window_days > 0:
        raise ValueError(f"window days must be > 0, got {window_days}")
    portfolios = Path(portfolios)
    manifest_path = portfolios / MANIFEST
    if not manifest_path.is_file():
        raise ValueError(f"{portfolios}: no {MANIFEST}; not the output of a finished portfolio run")
    manifest = json.loads(manifest_path.read_text())
    z = float(norm.ppf(0.5 + confidence / 2))
    send = float(manifest["campaign"]["context"]["send_time"])
    until = send + window_days * DAY

    customers = read_dataset(portfolios, "customers")
    user_ids = customers["user_id"].to_numpy(zero_copy_only=False).astype(str)
    arms = customers["arm"].to_numpy(zero_copy_only=False).astype(str)
    n_users = len(user_ids)
    order = np.argsort(user_ids)
    sorted_ids = user_ids[order]

    def user_index(ids: np.ndarray) -> np.ndarray:
        """Row of each id in ``customers``, -1 where it is not a customer of the run."""
        if n_users == 0 or len(ids) == 0:
            return np.full(len(ids), -1, np.int64)
        pos = np.minimum(np.searchsorted(sorted_ids, ids), n_users - 1)
        return np.where(sorted_ids[pos] == ids, order[pos], -1)

    ev, _ = read_events(events)
    keep = pc.and_(
        pc.and_(
            pc.is_in(ev["event_type"], pa.array(list(purchase_types))),
            pc.greater_equal(ev["timestamp"], int(np.ceil(send))),
        ),
        pc.less(ev["timestamp"], until),
    )
    ev = ev.filter(keep)
    p_user = user_index(ev["user_id"].to_numpy(zero_copy_only=False).astype(str))
    mine = p_user >= 0
    p_user = p_user[mine]
    p_item = ev["item_id"].to_numpy(zero_copy_only=False).astype(str)[mine]
    p_value = pc.fill_null(ev["value"], 0.0).to_numpy(zero_copy_only=False)[mine]

    # Offered pairs (sent portfolios and the holdout's would-be ones) as "user row \x00 item id".
    offers = pa.concat_tables([read_dataset(portfolios, "portfolios"), read_dataset(portfolios, "holdout")])
    o_user = user_index(offers["user_id"].to_numpy(zero_copy_only=False).astype(str))
    o_keys = np.char.add(
        np.char.add(o_user.astype(str), "\x00"), offers["item_id"].to_numpy(zero_copy_only=False).astype(str)
    )
    p_keys = np.char.add(np.char.add(p_user.astype(str), "\x00"), p_item)
    offered = np.isin(p_keys, o_keys)

    revenue = _per_user_sums(p_user, p_value, n_users)
    offered_revenue = _per_user_sums(p_user[offered], p_value[offered], n_users)
    bought_any = np.bincount(p_user, minlength=n_users) > 0
    redeemed = np.bincount(p_user[offered], minlength=n_users) > 0
    # Each offered item a customer bought counts once, however many units or orders.
    first_of_pair = np.unique(p_keys[offered], return_index=True)[1]
    pairs_bought = np.bincount(p_user[offered][first_of_pair], minlength=n_users)

    # The campaign's arms in its order, then the holdout (when the campaign has one).
    groups = [a["name"] for a in manifest["campaign"]["measurement"]["arms"]]
    groups += [HOLDOUT] if manifest["campaign"]["measurement"]["holdout"] > 0 else []
    stats: dict[str, dict] = {}
    for g in groups:
        sel = arms == g
        n = int(sel.sum())
        stats[g] = {
            "n": n,
            "redeemers": int(redeemed[sel].sum()),
            "buyers": int(bought_any[sel].sum()),
            "revenue_values": revenue[sel][revenue[sel] != 0].tolist(),
            "offered_values": offered_revenue[sel][offered_revenue[sel] != 0].tolist(),
        }
        stats[g]["row"] = {
            "arm": g,
            "holdout": g == HOLDOUT,
            "customers": n,
            "buyers": stats[g]["buyers"],
            "redeemers": stats[g]["redeemers"],
            "offered_items_bought": int(pairs_bought[sel].sum()),
            "offered_revenue": round(float(offered_revenue[sel].sum()), 6),
            "revenue": round(float(revenue[sel].sum()), 6),
        }
        row = stats[g]["row"]
        for key, x in (("redemption_rate", stats[g]["redeemers"]), ("buyer_rate", stats[g]["buyers"])):
            lo, hi = wilson(x, n, z)
            row[key] = {"value": x / n if n else float("nan"), "low": lo, "high": hi}
        for key, vals in (
            ("revenue_per_customer", stats[g]["revenue_values"]),
            ("offered_revenue_per_customer", stats[g]["offered_values"]),
        ):
            m, lo, hi, _ = mean_ci(vals, n, z)
            row[key] = {"value": m, "low": lo, "high": hi}
    h = stats.get(HOLDOUT)
    if h is not None:
        for g in groups:
            if g == HOLDOUT:
                continue
            s, row = stats[g], stats[g]["row"]
            for key, x, xc in (
                ("redemption_lift", s["redeemers"], h["redeemers"]),
                ("buyer_lift", s["buyers"], h["buyers"]),
            ):
                lift, lo, hi, p = rate_lift(x, s["n"], xc, h["n"], z)
                row[key] = {"value": lift, "low": lo, "high": hi, "p_value": p}
            for key, vals, vals_c in (
                ("revenue_lift", s["revenue_values"], h["revenue_values"]),
                ("offered_revenue_lift", s["offered_values"], h["offered_values"]),
            ):
                lift, lo, hi, p = mean_lift(vals, s["n"], vals_c, h["n"], z)
                row[key] = {"value": lift, "low": lo, "high": hi, "p_value": p}
    return {
        "portfolios": str(portfolios),
        "campaign": manifest["campaign"]["name"],
        "events": str(events),
        "send_time": manifest["campaign"]["context"]["send_time_iso"],
        "window_days": window_days,
        "purchase_types": list(purchase_types),
        "confidence": confidence,
        "purchases_in_window": len(p_user),
        "arms": [stats[g]["row"] for g in groups],
    }


def _pct(d: dict | None) -> str:
    if not d or d["value"] != d["value"]:
        return "n/a"
    return f"{100 * d['value']:+.1f}% [{100 * d['low']:+.1f}, {100 * d['high']:+.1f}] p={d['p_value']:.3g}"


def format_text(rep: dict) -> str:
    """The report as an aligned text table, the holdout last."""
    lines = [
        f"campaign {rep['campaign']} sent {rep['send_time']}; purchases ({', '.join(rep['purchase_types'])}) "
        f"within {rep['window_days']:g} days: {rep['purchases_in_window']}; intervals at {100 * rep['confidence']:.0f}%"
    ]
    head = [
        "arm",
        "customers",
        "buyers",
        "redeemers",
        "offered bought",
        "offered revenue",
        "revenue",
        "redemption rate",
        "redemption lift",
        "revenue/customer lift",
    ]
    table = [head]
    for r in rep["arms"]:
        table.append(
            [
                r["arm"],
                str(r["customers"]),
                str(r["buyers"]),
                str(r["redeemers"]),
                str(r["offered_items_bought"]),
                f"{r['offered_revenue']:.2f}",
                f"{r['revenue']:.2f}",
                format_rate(r["redemption_rate"]),
                "-" if r["holdout"] else _pct(r.get("redemption_lift")),
                "-" if r["holdout"] else _pct(r.get("revenue_lift")),
            ]
        )
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    for row in table:
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    if not any(r["holdout"] for r in rep["arms"]):
        lines.append("no holdout in this campaign (measurement.holdout = 0): no lift to report")
    return "\n".join(lines)


def main(
    portfolios: Path,
    events: Path,
    purchase_types: tuple[str, ...] | None,
    as_json: bool,
    window_days: float = 7.0,
    confidence: float = 0.95,
) -> str:
    """The CLI's output for ``python -m index_builder campaign-report``."""
    rep = report(portfolios, events, window_days, purchase_types or ("purchase",), confidence)
    return json.dumps(rep, indent=2) if as_json else format_text(rep)
