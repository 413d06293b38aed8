"""Writes the ladder report: Markdown tables, PNG plots (lift per rung, metric vs K) and the JSON figures."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

LABELS = {
    "POPULAR": "Popular (all time)",
    "POPULAR_RECENT": "Popular (recent)",
    "SEGMENT": "Segment",
    "ITEM_TO_ITEM": "Item-to-item",
    "BUY_AGAIN": "Buy again (own most bought)",
    "ALS": "ALS alone",
    "EASE": "EASE",
    "ONE2ONE": "one2one (full pipeline)",
}
GROUPS = ("all", "warm", "cold", "cold_with_segment", "new", "developing", "established")


def _fmt(x) -> str:
    return "—" if x is None else f"{x:.4f}"


def _lift(hi, lo) -> str:
    if hi is None or lo is None or lo <= 0:
        return "—"
    return f"{(hi / lo - 1) * 100:+.1f}%"


def _protocol_md(p: dict, k: int, plots: list[str]) -> list[str]:
    name = p["protocol"]
    title = {"temporal": "Temporal split", "last_n": "Last-N held out", "last_basket": "Last basket held out"}.get(
        name, name
    )
    lines = [f"## {title} (`{name}`)", ""]
    if "error" in p:
        return lines + [f"**Not evaluated:** {p['error']}", ""]
    lines += [
        f"{p['n_train_events']} training events, {p['n_test_users']} test users "
        f"({', '.join(f'{g}: {n}' for g, n in p['group_sizes'].items())}). "
        f"The full pipeline served them from rungs {p['served_rungs']} with a "
        f"`{p['scoring_model']}` scoring model"
        + "".join(f"; {n} requests carried a {f}" for f, n in p.get("requests_with_context", {}).items() if n)
        + ".",
        "",
    ]
    if "ease_skipped" in p:
        lines += [f"EASE not run: {p['ease_skipped']}.", ""]
    for g in ("all", "warm"):
        if g not in p["groups"]:
            continue
        lines += [
            f"### {g} users, @{k}",
            "",
            f"| rung | Recall@{k} | NDCG@{k} | MAP@{k} | Coverage@{k} | Novelty@{k} "
            "| NDCG lift over the previous row (the rung below) |",
            "|---|---|---|---|---|---|---|",
        ]
        prev = None
        for r in p["rungs"]:
            m = p["groups"][g][r][k] if k in p["groups"][g][r] else p["groups"][g][r][str(k)]
            lift = _lift(m["ndcg"], prev) if prev is not None else "—"
            lines.append(
                f"| {LABELS[r]} | {_fmt(m['recall'])} | {_fmt(m['ndcg'])} | {_fmt(m['map'])} | "
                f"{_fmt(m['coverage'])} | {_fmt(m['novelty'])} | {lift} |"
            )
            prev = m["ndcg"]
        lines.append("")
    lines += [
        f"### NDCG@{k} by user group",
        "",
        "| rung | " + " | ".join(f"{g} ({p['group_sizes'].get(g, 0)})" for g in GROUPS) + " |",
        "|---" * (len(GROUPS) + 1) + "|",
    ]
    for r in p["rungs"]:
        cells = []
        for g in GROUPS:
            gm = p["groups"].get(g)
            cells.append(_fmt(gm[r][k]["ndcg"]) if gm else "no users")
        lines.append(f"| {LABELS[r]} | " + " | ".join(cells) + " |")
    lines.append("")
    lines += _repeat_new_md(p, k)
    lines += _phases_md(p)
    lines += [f"![lift per rung]({plots[0]})", "", f"![NDCG vs K]({plots[1]})", ""]
    return lines


def _phases_md(p: dict) -> list[str]:
    """The full pipeline's NDCG ranked in one phase and phased, on the same test users."""
    ph = p.get("phases")
    if not ph:
        return []
    verdict = (
        "**phased scoring loses beyond noise here**: the bundle scores in one phase"
        if ph["lost"]
        else "no loss beyond noise"
    )
    return [
        f"### Phased scoring, @{ph['k']}",
        "",
        f"The first phase walks {ph['first_trees']} of {ph['trees']} trees (summed over the cross-fitted bags) "
        f"over every candidate, the full "
        f"model the best {ph['second_phase_candidates']}; {ph['same_top_k']:.1%} of {ph['queries']} test users "
        f"got the same top {ph['k']}. Noise: two standard errors of the paired per-user difference.",
        "",
        f"| ranking | NDCG@{ph['k']} |",
        "|---|---|",
        f"| one phase (the full model over every candidate) | {_fmt(ph['one_phase'])} |",
        f"| phased | {_fmt(ph['phased'])} |",
        f"| difference (± standard error) | {ph['difference']:+.5f} ± {ph['difference_se']:.5f}: {verdict} |",
        "",
    ]


def _repeat_new_md(p: dict, k: int) -> list[str]:
    """The metrics split into re-purchases (items the user bought in training) and new items."""
    split = p.get("repeat_new")
    if not split or not split["users"]["repeat"]:
        return []
    n = split["users"]
    lines = [
        f"### Repeat and new items, @{k}",
        "",
        f"Re-purchases of items the learned policy offers again count as hits. {n['repeat']} test users "
        f"bought a repeat item, {n['new']} a new one; hits are per test user.",
        "",
        f"| rung | NDCG@{k} repeat | NDCG@{k} new | repeat hits@{k} | new hits@{k} |",
        "|---|---|---|---|---|",
    ]
    for r in p["rungs"]:
        rep, new = split[r]["repeat"], split[r]["new"]
        rep, new = rep.get(k, rep.get(str(k))), new.get(k, new.get(str(k)))
        lines.append(
            f"| {LABELS[r]} | {_fmt(rep['ndcg'])} | {_fmt(new['ndcg'])} | {rep['hits']:.3f} | {new['hits']:.3f} |"
        )
    return lines + [""]


def _plots(p: dict, out: Path, k: int) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    name = p["protocol"]
    files = [f"lift_{name}.png", f"ndcg_vs_k_{name}.png"]
    all_ = p["groups"]["all"]
    rungs = p["rungs"]
    base = all_[rungs[0]][k]["ndcg"] or 0.0
    fig, ax = plt.subplots(figsize=(8, 4))
    vals = [((all_[r][k]["ndcg"] or 0.0) / base - 1) * 100 if base > 0 else 0.0 for r in rungs]
    ax.bar([LABELS[r] for r in rungs], vals, color=["#999"] * (len(rungs) - 1) + ["#1f77b4"])
    ax.set_ylabel(f"NDCG@{k} lift over popular (%)")
    ax.set_title(f"{name}: lift of each rung over all-time popularity")
    ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(out / files[0], dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(7, 4))
    ks = sorted(all_[rungs[0]])
    for r in rungs:
        ax.plot(
            ks,
            [all_[r][kk]["ndcg"] for kk in ks],
            marker="o",
            label=LABELS[r],
            linewidth=2.5 if r == "ONE2ONE" else 1.2,
        )
    ax.set_xlabel("K")
    ax.set_ylabel("NDCG@K")
    ax.set_title(f"{name}: NDCG vs K")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / files[1], dpi=110)
    plt.close(fig)
    return files


def _profile_md(prof: dict) -> list[str]:
    lines = [
        "## Data profile",
        "",
        f"{prof['events']} events, {prof['users']} users, {prof['items_in_catalog']} catalog items "
        f"({prof['items_with_events']} with events) over {prof['days']} days; density {prof['density']}.",
        "",
    ]
    for section in ("purchase_frequency", "items_per_visit", "assortment_variety", "long_tail"):
        lines += [
            f"**{section.replace('_', ' ')}**: "
            + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in prof[section].items()),
            "",
        ]
    lines += ["A visit is one user's events on one UTC day.", ""]
    rep = prof.get("repeat")
    if rep and rep.get("purchase_lines"):

        def cats(rows: list[dict]) -> str:
            return ", ".join(
                f"{c['category']} {c['repeat_rate']:.0%}"
                + (f" every {c['interval_days']} days" if c["interval_days"] is not None else "")
                for c in rows
            )

        interval = rep["typical_interval_days"]
        lines += [
            f"**re-purchase**: {rep['repeat_share']:.0%} of purchase lines are items the customer bought before "
            f"(baskets by {rep['basket_from']}; {rep['baskets']} baskets); {rep['buyers_who_rebuy']:.0%} of an "
            f"item's buyers buy it again"
            + (f", typically every {interval} days" if interval is not None else "")
            + f"; the `{rep['policy']}` policy offers {rep['items_reoffered']} of {rep['items_bought']} bought "
            "items again after purchase.",
            "",
        ]
        if rep["most_replenished_categories"]:
            lines += [
                f"Most replenished categories: {cats(rep['most_replenished_categories'])}. "
                f"Least: {cats(rep['least_replenished_categories'])}.",
                "",
            ]
    ctx = {k: v for k, v in prof.get("context", {}).items() if v["share_of_events_with_value"] > 0}
    lines += [
        "**context**: "
        + (
            ", ".join(
                f"{k} on {v['share_of_events_with_value']:.0%} of events ({v['distinct_values']} values)"
                for k, v in ctx.items()
            )
            if ctx
            else "the events carry no channel, device or region (their features are unknown)"
        ),
        "",
    ]
    return lines


def write_report(results: dict, out: Path, k: int = 10) -> Path:
    """Write ``report.md``, ``ladder.json`` and the plots under ``out``; return the Markdown path."""
    out.mkdir(parents=True, exist_ok=True)
    lines = [
        "# The personalization ladder",
        "",
        f"Inputs: `{results['inputs']['events']}`, `{results['inputs']['items']}`, "
        f"`{results['inputs']['users']}`. Settings: {results['settings']}.",
        "",
        "Every rung is scored from the training part only; items a user touched in training never count "
        "as hits, except re-purchases of items the learned policy offers again. The full pipeline is asked "
        "through `ranking.pipeline.ranker.Ranker.rank` over the arrays "
        "fitted on the training part, at the time of the user's first test event, each user scored by the "
        "reranker bag that never trained on them.",
        "",
    ]
    for p in results["protocols"].values():
        plots = _plots(p, out, k) if "error" not in p else []
        lines += _protocol_md(p, k, plots)
    lines += _profile_md(results["profile"])
    md = out / "report.md"
    md.write_text("\n".join(lines), encoding="utf-8")
    (out / "ladder.json").write_text(json.dumps(results, indent=1, default=_json_default), encoding="utf-8")
    return md


def _json_default(x):
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return float(x)
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")
