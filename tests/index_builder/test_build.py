"""The offline build end to end on small shops: what it publishes, and what it refuses."""

import json
import subprocess
import sys

import numpy as np
import pytest
from tests_support import SMALL_BUILD

from index_builder.build import build, build_index
from index_builder.config import BuildConfig
from index_builder.io import InputError
from ranking import Bundle, resolve_current


def test_manifest_records_window_counts_checksums_and_evaluation(bundle_path, shop):
    b = Bundle(bundle_path)  # verifies every checksum
    m = b.manifest
    ts = shop.events["timestamp"].to_numpy()
    assert m["data_window"]["start_unix"] == ts.min() and m["data_window"]["end_unix"] == ts.max()
    assert m["counts"]["events"] == shop.events.num_rows
    assert m["counts"]["users"] == 300 and m["counts"]["items"] == 200
    assert m["config"]["factors"] == SMALL_BUILD["factors"]
    assert m["segments"]["columns"] == ["region", "age"]
    assert set(m["files"]) >= {"index.faiss", "item_factors.npy", "user_factors.npy", "items.parquet"}
    recall = m["evaluation"]["ann_recall_at_200"]
    assert 0.95 <= recall <= 1.0
    # 200 items fit in the default exact head: the server answers every user exactly.
    assert m["evaluation"]["exact_head_items"] == 16384 and m["evaluation"]["exact_head_share"] == 1.0
    # No tier smaller than the half of these 200 items holds the 200 candidates: the half.
    assert m["evaluation"]["exact_head_first_tier"] == 100 and m["evaluation"]["exact_head_first_tier_shares"] == {}


def test_cli_build_prints_the_published_path(shop_files, tmp_path):
    out = tmp_path / "art"
    cmd = [
        sys.executable,
        "-m",
        "index_builder",
        "build",
        "--quiet",
        "--events",
        str(shop_files["events"]),
        "--items",
        str(shop_files["items"]),
        "--users",
        str(shop_files["users"]),
        "--out",
        str(out),
        "--set",
        "factors=8",
        "--set",
        "iterations=3",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    printed = done.stdout.strip().splitlines()[-1]
    assert resolve_current(out) == type(resolve_current(out))(printed)
    assert Bundle(printed).manifest["config"]["factors"] == 8


def test_malformed_events_publish_nothing_and_name_the_row(shop_files, tmp_path):
    bad = tmp_path / "events.csv"
    lines = shop_files["events"].read_text().splitlines()
    lines[5] = lines[5].rsplit(",", 1)[0] + ",not-a-time"
    bad.write_text("\n".join(lines) + "\n")
    out = tmp_path / "art"
    with pytest.raises(InputError) as err:
        build(
            bad,
            shop_files["items"],
            shop_files["users"],
            out,
            BuildConfig.load(overrides=SMALL_BUILD),
            show_progress=False,
        )
    assert err.value.row == 6 and err.value.column == "timestamp"
    assert not out.exists() or not any(p for p in out.iterdir() if not p.name.startswith("."))
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "index_builder",
            "build",
            "--quiet",
            "--events",
            str(bad),
            "--items",
            str(shop_files["items"]),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert "row 6" in done.stderr and "timestamp" in done.stderr


def test_skip_mode_counts_bad_rows_in_the_manifest(shop_files, tmp_path):
    bad = tmp_path / "events.csv"
    lines = shop_files["events"].read_text().splitlines()
    lines[5] = lines[5].rsplit(",", 1)[0] + ",not-a-time"
    bad.write_text("\n".join(lines) + "\n")
    path = build(
        bad,
        shop_files["items"],
        None,
        tmp_path / "art",
        BuildConfig.load(overrides={**SMALL_BUILD, "on_bad_row": "skip"}),
        show_progress=False,
    )
    m = json.loads((path / "manifest.json").read_text())
    assert m["skipped"]["events"]["total"] == 1
    assert m["counts"]["events"] == len(lines) - 2


def test_events_for_unknown_items_are_dropped_and_counted(shop, shop_files, tmp_path):
    ev = tmp_path / "events.csv"
    ev.write_text(shop_files["events"].read_text() + "u1,ghost-item,view,1700000000\n")
    path = build(
        ev, shop_files["items"], None, tmp_path / "art", BuildConfig.load(overrides=SMALL_BUILD), show_progress=False
    )
    counts = json.loads((path / "manifest.json").read_text())["counts"]
    assert counts["events_unknown_item"] == 1 and counts["events"] == shop.events.num_rows


def test_bad_settings_are_refused_by_name(tmp_path):
    with pytest.raises(ValueError, match="unknown build setting.*factorz"):
        BuildConfig.load(overrides={"factorz": 3})
    with pytest.raises(ValueError, match="'factors'.*int"):
        BuildConfig.load(overrides={"factors": "many"})
    cfg_file = tmp_path / "b.toml"
    cfg_file.write_text("[build]\nindex_type = 'NotAnIndex'\n")
    cfg = BuildConfig.load(cfg_file)
    # The file is read; the index type is refused when the index is built, by name.
    with pytest.raises(ValueError, match="'NotAnIndex' is not a FAISS index factory string"):
        build_index(np.zeros((10, 4), np.float32), cfg)


def test_user_factors_are_zero_without_history(bundle_path):
    b = Bundle(bundle_path)
    has = b.array("user_has_history")
    uf = b.array("user_factors")
    assert has.all()  # every synthetic user has events
    assert np.abs(uf).sum(axis=1).min() > 0


def test_manifest_lists_the_named_steps_and_each_split_is_fitted_once(bundle_path):
    steps = Bundle(bundle_path).manifest["steps"]
    names = [s["name"] for s in steps]
    assert names == [
        "read",
        "fit[temporal q=0.8]",
        "fit[last_n n=10]",
        "fit[last_basket]",
        "rerank rows",
        "rerank fit",
        "ladder[temporal]",
        "ladder[last_n]",
        "ladder[last_basket]",
        "fit weights",
        "fit als",
        "fit tables",
        "fit features",
        "fit index",
        "ann eval",
    ]
    assert all(s["seconds"] >= 0 for s in steps)


def test_the_ladder_scores_each_user_with_a_bag_that_never_trained_on_them():
    from index_builder.rerank_train import RerankOutcome, _folds
    from index_builder.splits import user_folds

    cfg = BuildConfig()
    users = [f"u{j}" for j in range(200) for _ in range(2)]  # two queries (protocols) per user
    n_folds, fold, held = _folds(users, len(users), cfg)
    assert n_folds == cfg.rerank_bags and held == list(range(n_folds))
    # Every query of a user is in the user's fold, whatever the protocol.
    assert (fold[0::2] == fold[1::2]).all()
    outcome = RerankOutcome(None, held_folds=held, n_folds=n_folds, seed=cfg.random_seed)
    bag = outcome.bag_of(users[0::2])
    # Bag b was trained on every fold but held[b]: the user's own fold is the one it never saw.
    assert (np.asarray(held)[bag] == user_folds(users[0::2], n_folds, cfg.random_seed)).all()
    one = RerankOutcome(None, held_folds=[2], n_folds=5, seed=cfg.random_seed)
    b1 = one.bag_of(users[0::2])
    assert ((b1 == 0) == (user_folds(users[0::2], 5, cfg.random_seed) == 2)).all() and (b1 == -1).any()


def test_the_builds_ladder_measures_a_sample_of_test_users(shop_files, tmp_path):
    cfg = BuildConfig.load(overrides={**SMALL_BUILD, "ladder_max_users": 40})
    path = build(
        shop_files["events"], shop_files["items"], shop_files["users"], tmp_path / "a", cfg, show_progress=False
    )
    ladder = Bundle(path).manifest["evaluation"]["ladder"]
    for protocol in ("last_n", "temporal"):
        assert ladder[protocol]["test_users"]["all"] == 40, protocol
    with pytest.raises(ValueError, match="ladder_max_users must be >= 0"):
        BuildConfig.load(overrides={"ladder_max_users": -1})
