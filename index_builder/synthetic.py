"""Synthetic shops with planted structure, for tests, the demo's smoke run and benchmarks.

Each user has one favourite category and draws most interactions from it; item
popularity within a category is power-law; a user's ``region`` attribute predicts the
favourite category, so segments carry signal too. Everything is vectorised, so a
catalog of a million items and users is generated in seconds.

With ``context > 0`` the events also carry ``channel``, ``device`` and ``region`` with
planted effects (off by default, so the standard shop stays as it was):

- device: each visit (a user's events on one day) happens on "mobile" or "desktop", and
  users mostly keep their device from one visit to the next. Categories of even index are
  desktop categories, odd ones mobile; every user has a favourite of each kind, and a
  ``context`` share of their in-focus events go to the favourite of the visit's device
  instead of the overall favourite. What a user wants depends on the device they are on.
- channel: visits come by "web", "app" or "email"; on email visits a ``context`` share
  of the events go to the few items of the newsletter.
- region: the user's region attribute, on 95% of events (their taste follows it).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

EVENT_TYPES = np.array(["view", "click", "add_to_cart", "purchase"])
EVENT_PROBS = np.array([0.55, 0.25, 0.12, 0.08])


@dataclass
class SyntheticShop:
    events: pa.Table
    items: pa.Table
    users: pa.Table
    favourite: np.ndarray  # favourite category index per user
    item_category: np.ndarray  # category index per item
    device_favourite: np.ndarray | None = None  # (n_users, 2): favourite category on DEVICES[d]
    newsletter_items: np.ndarray | None = None  # item indices the email channel promotes


DEVICES = np.array(["desktop", "mobile"])  # desktop categories have even index, mobile odd
CHANNELS = np.array(["web", "app", "email"])
CHANNEL_PROBS = np.array([0.5, 0.35, 0.15])
DEVICE_SWITCH = 0.1  # chance that a visit's device differs from the user's previous visit


def make_shop(
    n_users: int = 300,
    n_items: int = 200,
    n_categories: int = 5,
    events_per_user: int = 30,
    focus: float = 0.9,
    zipf: float = 1.1,
    days: int = 60,
    seed: int = 0,
    start_unix: int = 1_700_000_000,
    context: float = 0.0,
) -> SyntheticShop:
    """Generate a shop.

    Parameters
    ----------
    focus : float
        Share of a user's events inside their favourite category.
    zipf : float
        Exponent of the power law of item popularity within a category.
    context : float
        Strength of the planted channel/device effects (module docstring); 0 leaves the
        events without context columns, exactly as before.
    """
    rng = np.random.default_rng(seed)
    item_cat = np.arange(n_items) % n_categories
    rng.shuffle(item_cat)
    fav = rng.integers(0, n_categories, n_users)
    # Popularity rank within each category -> power-law weights.
    weights = np.empty(n_items)
    by_cat = [np.flatnonzero(item_cat == c) for c in range(n_categories)]
    for members in by_cat:
        ranks = rng.permutation(len(members)) + 1
        weights[members] = ranks**-zipf
    cat_cdf = []
    for members in by_cat:
        p = weights[members] / weights[members].sum()
        cat_cdf.append((members, np.cumsum(p)))
    n_events = n_users * events_per_user
    users = np.repeat(np.arange(n_users), events_per_user)
    in_fav = rng.random(n_events) < focus
    cats = np.where(in_fav, fav[users], rng.integers(0, n_categories, n_events))
    items = np.empty(n_events, dtype=np.int64)
    u = rng.random(n_events)
    for c, (members, cdf) in enumerate(cat_cdf):
        sel = cats == c
        items[sel] = members[np.minimum(np.searchsorted(cdf, u[sel]), len(members) - 1)]
    etype = EVENT_TYPES[rng.choice(len(EVENT_TYPES), n_events, p=EVENT_PROBS)]
    ts = start_unix + rng.integers(0, days * 86_400, n_events)
    regions = np.array([f"R{c}" for c in range(n_categories)])
    # Region predicts the favourite category 80% of the time: a segment with signal.
    region_of = np.where(rng.random(n_users) < 0.8, fav, rng.integers(0, n_categories, n_users))
    columns: dict[str, np.ndarray] = {}
    shop_context: dict[str, np.ndarray] = {}
    if context > 0:
        columns, shop_context = _plant_context(
            users,
            ts,
            in_fav,
            items,
            cat_cdf,
            region_of,
            regions,
            n_users,
            n_items,
            n_categories,
            context,
            seed,
            start_unix,
        )
    uid = np.char.add("u", np.arange(n_users).astype(str))
    iid = np.char.add("i", np.arange(n_items).astype(str))
    cat_names = np.array([f"cat{c}" for c in range(n_categories)])
    events = pa.table(
        {
            "user_id": uid[users],
            "item_id": iid[items],
            "event_type": etype,
            "timestamp": ts.astype(np.int64),
            **columns,
        }
    )
    items_t = pa.table(
        {
            "item_id": iid,
            "title": np.char.add("Item ", np.arange(n_items).astype(str)),
            "category": cat_names[item_cat],
            "price": np.round(rng.lognormal(3.0, 0.6, n_items), 2),
        }
    )
    users_t = pa.table(
        {
            "user_id": uid,
            "region": regions[region_of],
            "age": rng.integers(18, 70, n_users).astype(str),
        }
    )
    return SyntheticShop(events, items_t, users_t, fav, item_cat, **shop_context)


def _plant_context(
    users, ts, in_fav, items, cat_cdf, region_of, regions, n_users, n_items, n_categories, strength, seed, start_unix
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Context columns with planted effects; moves the affected events' items in place.

    A random stream of its own, so the shop's other draws stay those of ``context = 0``.
    """
    if n_categories < 2:
        raise ValueError("a planted device effect needs at least 2 categories")
    rng = np.random.default_rng([seed, 1])
    n_events = len(users)
    # Visits: a user's events on one day, in time order; the device is sticky across visits.
    order = np.lexsort((ts, users))
    su, sd = users[order], (ts[order] - start_unix) // 86_400
    new_user = np.r_[True, su[1:] != su[:-1]]
    new_visit = new_user | np.r_[True, sd[1:] != sd[:-1]]
    visit = np.cumsum(new_visit) - 1
    n_visits = int(new_visit.sum())
    switch = new_user[new_visit] | (rng.random(n_visits) < DEVICE_SWITCH)
    drawn = rng.integers(0, len(DEVICES), n_visits)
    visit_device = drawn[np.maximum.accumulate(np.where(switch, np.arange(n_visits), 0))]
    visit_channel = rng.choice(len(CHANNELS), n_visits, p=CHANNEL_PROBS)
    device = np.empty(n_events, np.int64)
    channel = np.empty(n_events, np.int64)
    device[order] = visit_device[visit]
    channel[order] = visit_channel[visit]

    kinds = [np.arange(d, n_categories, len(DEVICES)) for d in range(len(DEVICES))]
    device_fav = np.stack([rng.choice(k, n_users) for k in kinds], axis=1)
    follow = in_fav & (rng.random(n_events) < strength)
    cats = device_fav[users[follow], device[follow]]
    u = rng.random(len(cats))
    moved = np.empty(len(cats), np.int64)
    for c, (members, cdf) in enumerate(cat_cdf):
        sel = cats == c
        moved[sel] = members[np.minimum(np.searchsorted(cdf, u[sel]), len(members) - 1)]
    items[follow] = moved
    newsletter = rng.choice(n_items, min(10, n_items), replace=False)
    promo = (CHANNELS[channel] == "email") & (rng.random(n_events) < strength)
    items[promo] = rng.choice(newsletter, int(promo.sum()))

    region = region_of[users]
    away = rng.random(n_events) < 0.05
    region[away] = rng.integers(0, len(regions), int(away.sum()))
    columns = {"channel": CHANNELS[channel], "device": DEVICES[device], "region": regions[region]}
    return columns, {"device_favourite": device_fav, "newsletter_items": newsletter}


def write_shop(shop: SyntheticShop, out: Path, fmt: str = "csv") -> dict[str, Path]:
    """Write events/items/users as CSV or Parquet under ``out``; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, table in (("events", shop.events), ("items", shop.items), ("users", shop.users)):
        path = out / f"{name}.{fmt}"
        if fmt == "csv":
            pacsv.write_csv(table, path)
        elif fmt == "parquet":
            pq.write_table(table, path)
        else:
            raise ValueError(f"format must be csv or parquet, got {fmt!r}")
        paths[name] = path
    return paths


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m index_builder.synthetic", description=__doc__)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--users", type=int, default=300)
    p.add_argument("--items", type=int, default=200)
    p.add_argument("--categories", type=int, default=5)
    p.add_argument("--events-per-user", type=int, default=30)
    p.add_argument("--format", choices=["csv", "parquet"], default="csv")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--context",
        type=float,
        default=0.0,
        help="strength of the planted channel/device effects (0 = no context columns)",
    )
    a = p.parse_args(argv)
    shop = make_shop(a.users, a.items, a.categories, a.events_per_user, seed=a.seed, context=a.context)
    for name, path in write_shop(shop, a.out, a.format).items():
        print(f"{name}\t{path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
