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


def make_grocery(
    n_users: int = 400,
    n_items: int = 300,
    n_categories: int = 10,
    days: int = 120,
    durable_share: float = 0.3,
    seed: int = 0,
    start_unix: int = 1_700_000_000,
) -> SyntheticShop:
    """A grocery shop with planted replenishment: staples bought again on personal cycles, and durables.

    Categories are durable (``durable_share`` of them: an item there is bought once per
    customer) or replenished. Each customer visits every few days (their own mean gap) and
    has a set of staples from replenished categories, mostly their favourite, each with a
    cycle (the item's typical cycle times a personal factor); at a visit a staple that is
    due (its cycle, with noise, has passed since its last purchase) is bought with high
    probability. Each basket also holds a few discoveries, popular items of the favourite
    category more often than not, some of which become staples. Purchases carry the visit's
    ``order_id`` and follow a view of the item; a few more views browse the favourite category.
    """
    rng = np.random.default_rng([seed, 7])
    item_cat = np.arange(n_items) % n_categories
    rng.shuffle(item_cat)
    n_durable = round(durable_share * n_categories)
    durable_cat = np.zeros(n_categories, bool)
    durable_cat[rng.choice(n_categories, n_durable, replace=False)] = True
    weights = np.empty(n_items)
    by_cat = [np.flatnonzero(item_cat == c) for c in range(n_categories)]
    for members in by_cat:
        weights[members] = (rng.permutation(len(members)) + 1.0) ** -1.1
    item_cycle = np.exp(rng.normal(np.log(12.0), 0.5, n_items))  # days
    fav = rng.integers(0, n_categories, n_users)
    replenished = np.flatnonzero(~durable_cat[item_cat])
    cols: dict[str, list] = {"user_id": [], "item_id": [], "event_type": [], "timestamp": [], "order_id": []}

    def draw(c_pool: np.ndarray, k: int) -> np.ndarray:
        p = weights[c_pool] / weights[c_pool].sum()
        return rng.choice(c_pool, min(k, len(c_pool)), replace=False, p=p)

    def emit(user: int, item: int, kind: str, t: int, order: str) -> None:
        cols["user_id"].append(f"u{user}")
        cols["item_id"].append(f"i{item}")
        cols["event_type"].append(kind)
        cols["timestamp"].append(t)
        cols["order_id"].append(order)

    for user in range(n_users):
        own_pool = by_cat[fav[user]]
        fav_staples = own_pool[~durable_cat[item_cat[own_pool]]]
        n_staples = int(rng.integers(4, 13))
        n_fav = min(len(fav_staples), round(n_staples * 0.6))
        staples = list(draw(fav_staples, n_fav)) if n_fav else []
        others = np.setdiff1d(replenished, staples)
        if len(others) and n_staples > n_fav:
            staples += list(draw(others, n_staples - n_fav))
        cycle = {int(s): item_cycle[s] * np.exp(rng.normal(0.0, 0.3)) for s in staples}
        last = {s: -rng.uniform(0, cycle[s]) for s in cycle}  # phase: when each was last bought
        bought: set[int] = set()
        gap = rng.uniform(3.0, 10.0)
        day = rng.uniform(0, gap)
        visit = 0
        while day < days:
            t0 = start_unix + int(day) * 86_400 + int(rng.integers(8, 21)) * 3600
            order = f"o{user}-{visit}"
            basket = [s for s in cycle if day - last[s] >= cycle[s] * np.exp(rng.normal(0.0, 0.2))]
            basket = [s for s in basket if rng.random() < 0.85]
            for _ in range(int(rng.poisson(1.2))):
                pool = own_pool if rng.random() < 0.7 else np.arange(n_items)
                pool = pool[~np.isin(pool, list(bought))] if durable_cat[item_cat[pool]].any() else pool
                if len(pool) == 0:
                    continue
                item = int(draw(pool, 1)[0])
                if durable_cat[item_cat[item]] and item in bought:
                    continue
                basket.append(item)
                if not durable_cat[item_cat[item]] and item not in cycle and rng.random() < 0.3:
                    cycle[item] = item_cycle[item] * np.exp(rng.normal(0.0, 0.3))
            for j, item in enumerate(dict.fromkeys(basket)):
                t = t0 + 60 * j
                emit(user, item, "view", t - 30, order)
                emit(user, item, "purchase", t, order)
                bought.add(item)
                if item in cycle:
                    last[item] = day
            for item in draw(own_pool, int(rng.integers(0, 4))):
                emit(user, int(item), "view", t0 - 300, "")
            visit += 1
            day += max(1.0, rng.exponential(gap))
    uid = np.char.add("u", np.arange(n_users).astype(str))
    iid = np.char.add("i", np.arange(n_items).astype(str))
    cat_names = np.array([f"{'durable' if durable_cat[c] else 'fresh'}{c}" for c in range(n_categories)])
    order_col = pa.array([o or None for o in cols.pop("order_id")], pa.string())
    events = pa.table({**{k: np.asarray(v) for k, v in cols.items()}, "order_id": order_col})
    events = events.set_column(3, "timestamp", pa.array(cols["timestamp"], pa.int64()))
    items_t = pa.table(
        {
            "item_id": iid,
            "title": np.char.add("Item ", np.arange(n_items).astype(str)),
            "category": cat_names[item_cat],
            "price": np.round(rng.lognormal(1.5, 0.6, n_items), 2),
        }
    )
    users_t = pa.table({"user_id": uid, "region": np.array([f"R{c % 4}" for c in fav])})
    return SyntheticShop(events, items_t, users_t, fav, item_cat)


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
