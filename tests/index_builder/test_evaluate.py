"""The ladder evaluation and report on small synthetic shops."""

import json
import math

import numpy as np
import pyarrow as pa
import pytest
from tests_support import SMALL_BUILD

from index_builder.build import evaluate
from index_builder.config import BuildConfig
from index_builder.evaluate import RUNGS, EvalConfig, user_metrics
from index_builder.synthetic import make_shop, write_shop


def test_user_metrics_exact_values():
    # Hits at ranks 1 and 3 of 4 shown; 3 relevant items.
    recall, ndcg, ap = user_metrics(np.array([7, 1, 8, 2]), {7, 8, 9}, 4)
    assert recall == pytest.approx(2 / 3)
    ideal = 1 + 1 / np.log2(3) + 1 / np.log2(4)
    assert ndcg == pytest.approx((1 + 1 / np.log2(4)) / ideal)
    assert ap == pytest.approx((1 + 2 / 3) / 3)


def _no_nan(obj):
    if isinstance(obj, float):
        return not math.isnan(obj)
    if isinstance(obj, dict):
        return all(_no_nan(v) for v in obj.values())
    if isinstance(obj, list):
        return all(_no_nan(v) for v in obj)
    return True


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    shop = make_shop(n_users=250, n_items=150, n_categories=5, events_per_user=40, seed=3)
    files = write_shop(shop, tmp_path_factory.mktemp("shop"))
    out = tmp_path_factory.mktemp("report")
    ecfg = EvalConfig(build=BuildConfig.load(overrides=SMALL_BUILD))
    return evaluate(files["events"], files["items"], files["users"], out, ecfg), out


@pytest.mark.slow
def test_report_files_and_every_rung(report):
    results, out = report
    assert (out / "report.md").is_file() and (out / "ladder.json").is_file()
    for protocol in ("last_n", "temporal", "last_basket"):
        p = results["protocols"][protocol]
        assert "error" not in p
        assert p["rungs"] == list(RUNGS)
        assert (out / f"lift_{protocol}.png").stat().st_size > 1000
        assert (out / f"ndcg_vs_k_{protocol}.png").stat().st_size > 1000
    assert _no_nan(json.loads((out / "ladder.json").read_text()))
    md = (out / "report.md").read_text()
    assert "one2one (full pipeline)" in md and "Data profile" in md and "long tail" in md


@pytest.mark.slow
def test_full_pipeline_beats_mass_on_planted_taste(report):
    results, _ = report
    g = results["protocols"]["last_n"]["groups"]["all"]
    assert g["ONE2ONE"][10]["ndcg"] > 1.5 * g["POPULAR"][10]["ndcg"]
    p = results["protocols"]["last_n"]
    assert p["served_rungs"] == {"ONE_TO_ONE": p["n_test_users"]} and p["n_test_users"] > 200


def test_too_little_data_is_said_plainly(tmp_path):
    # Every user has fewer events than the hold-out, and every event has one timestamp.
    shop = make_shop(n_users=30, n_items=20, events_per_user=4, seed=1)
    ev = shop.events.set_column(3, "timestamp", pa.array(np.full(shop.events.num_rows, 1_700_000_000)))
    shop.events = ev
    files = write_shop(shop, tmp_path / "shop")
    results = evaluate(
        files["events"],
        files["items"],
        files["users"],
        tmp_path / "out",
        EvalConfig(build=BuildConfig.load(overrides=SMALL_BUILD)),
    )
    for protocol in ("last_n", "temporal"):
        assert "error" in results["protocols"][protocol]
    md = (tmp_path / "out" / "report.md").read_text()
    assert "Not evaluated" in md and "no events to train on" in md
    assert "nan" not in md.lower()


@pytest.mark.slow
def test_report_shows_ndcg_with_and_without_phases(report):
    results, out = report
    md = (out / "report.md").read_text()
    for protocol in ("last_n", "temporal"):
        ph = results["protocols"][protocol]["phases"]
        assert ph["second_phase_candidates"] > 0 and 0 < ph["first_trees"] < ph["trees"]
        assert 0.0 <= ph["one_phase"] <= 1.0 and 0.0 <= ph["phased"] <= 1.0
        assert ph["difference"] == pytest.approx(ph["phased"] - ph["one_phase"], abs=2e-4)
        assert ph["queries"] == results["protocols"][protocol]["n_test_users"]
    assert md.count("### Phased scoring, @10") == 3
    assert "| one phase (the full model over every candidate) |" in md and "| phased |" in md
