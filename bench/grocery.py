"""Buy again on a grocery shop: the full pipeline against the buy-again baseline, at several seeds.

``python -m bench.grocery [--seeds 0 1 2] [--users 1500] [--items 500]`` generates a
grocery shop with planted replenishment (``index_builder.synthetic.make_grocery``) per
seed, runs the ladder's ``last_basket`` protocol with default build settings (every
customer's last order held out; the full pipeline through ``Ranker.rank``, cross-fitted),
and prints NDCG@10 of ONE2ONE and BUY_AGAIN, on all items, repeat items and new items,
and the new items each list placed that the customer then bought. Figures are also
written to ``bench/out/grocery.json``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from index_builder.build import run_all
from index_builder.config import BuildConfig
from index_builder.evaluate import EvalConfig
from index_builder.synthetic import make_grocery, write_shop

K = 10


def measure(seed: int, n_users: int, n_items: int, n_categories: int) -> dict:
    shop = make_grocery(n_users=n_users, n_items=n_items, n_categories=n_categories, seed=seed)
    with tempfile.TemporaryDirectory() as tmp:
        files = write_shop(shop, Path(tmp), "parquet")
        t0 = time.perf_counter()
        results = run_all(
            files["events"],
            files["items"],
            files["users"],
            EvalConfig(protocols=("last_basket",), ks=(K,), build=BuildConfig()),
        )
        seconds = time.perf_counter() - t0
    p = results["protocols"]["last_basket"]
    split = p["repeat_new"]
    out = {"seed": seed, "events": shop.events.num_rows, "test_users": p["n_test_users"], "seconds": round(seconds, 1)}
    for rung in ("ONE2ONE", "BUY_AGAIN", "POPULAR"):
        out[rung] = {
            "ndcg": p["groups"]["all"][rung][K]["ndcg"],
            "ndcg_repeat": split[rung]["repeat"][K]["ndcg"],
            "ndcg_new": split[rung]["new"][K]["ndcg"],
            "new_hits": split[rung]["new"][K]["hits"],
        }
    out["repeat_share"] = results["profile"]["repeat"]["repeat_share"]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.grocery", description=__doc__)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--users", type=int, default=1500)
    ap.add_argument("--items", type=int, default=500)
    ap.add_argument("--categories", type=int, default=12)
    a = ap.parse_args(argv)
    rows = []
    print(
        f"{'seed':>4} {'events':>7} {'users':>5}  {'ONE2ONE':>7} {'BUY_AG':>7} {'ratio':>6}  "
        f"{'rep 1:1':>7} {'rep BA':>7}  {'new 1:1':>7} {'new BA':>7}  {'newhit 1:1':>10} {'newhit BA':>9}  secs"
    )
    for seed in a.seeds:
        r = measure(seed, a.users, a.items, a.categories)
        rows.append(r)
        o, b = r["ONE2ONE"], r["BUY_AGAIN"]
        print(
            f"{seed:>4} {r['events']:>7} {r['test_users']:>5}  {o['ndcg']:>7.4f} {b['ndcg']:>7.4f} "
            f"{o['ndcg'] / b['ndcg']:>6.3f}  {o['ndcg_repeat']:>7.4f} {b['ndcg_repeat']:>7.4f}  "
            f"{o['ndcg_new']:>7.4f} {b['ndcg_new']:>7.4f}  {o['new_hits']:>10.3f} {b['new_hits']:>9.3f}  "
            f"{r['seconds']}",
            flush=True,
        )
    out = Path(__file__).parent / "out"
    out.mkdir(exist_ok=True)
    (out / "grocery.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
