"""bench.run end to end: both shop shapes built, served, loaded and reported in one run."""

import json
import math
import subprocess
import sys

import pytest

from bench.run import SHOPS, WORK_FLOORS

# Every target row a shop's table must carry (issue 24's list, the open loop at 50% and 80%).
TARGETS = {
    "saturation_vs_score_floor",
    "saturation_vs_bare",
    "score_floor_vs_bare",
    "p99_c8_vs_score_floor",
    "features_floor_vs_score_floor",
    "saturation_vs_features_floor",
    "open_loop_50_p99_ms",
    "open_loop_50_p999_ms",
    "open_loop_50_p99_vs_bare",
    "open_loop_80_p99_ms",
    "open_loop_80_p999_ms",
    "open_loop_80_p99_vs_bare",
    "served_recall",
    "budgeted_server_p999_ms",
    "late_share",
    "shared_budgeted_server_p999_ms",
    "shared_late_share",
    "startup_s",
    "memory_ratio",
}
BOUNDED = TARGETS - {
    "features_floor_vs_score_floor",
    "saturation_vs_features_floor",
    "open_loop_50_p999_ms",
    "open_loop_50_p99_vs_bare",
    "open_loop_80_p99_ms",
    "open_loop_80_p999_ms",
    "open_loop_80_p99_vs_bare",
    "shared_budgeted_server_p999_ms",
    "shared_late_share",
}


@pytest.mark.slow
def test_bench_run_reports_every_target_of_both_shops_with_measured_figures(tmp_path):
    out = tmp_path / "out"
    # Small shops, short bounded loads: the same code path as the full run.
    cmd = [
        sys.executable,
        "-m",
        "bench.run",
        "--users",
        "3000",
        "--items",
        "2000",
        "--dim",
        "16",
        "--iterations",
        "1",
        "--concurrency",
        "1,8",
        "--requests",
        "150",
        "--rounds",
        "2",
        "--duration",
        "2",
        "--budget-requests",
        "200",
        "--exact-head-items",
        "256",
        "--work",
        str(tmp_path / "work"),
        "--out",
        str(out),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert list(report["shops"]) == list(SHOPS) == ["standard", "flat"]
    md = (out / "report.md").read_text()
    for name, shop in report["shops"].items():
        shape = SHOPS[name]
        assert shop["shape"]["categories"] == shape.categories and shop["shape"]["zipf"] == shape.zipf
        assert shop["shape"]["users"] == 3000 and shop["shape"]["items"] == 2000
        assert f"## Shop `{name}`" in md
        rows = {t["target"]: t for t in shop["targets"]}
        assert set(rows) == TARGETS, name
        for key, t in rows.items():
            assert math.isfinite(t["figure"]), (name, key, t)
            assert (t["met"] is None) == (key not in BOUNDED), (name, key, t)
            if t["met"] is not None:
                assert t["met"] == (t["figure"] >= t["bound"] if t["op"] == ">=" else t["figure"] <= t["bound"])
            assert t["what"] in md
        # Every load run really ran: closed loop at each level on the server and the four floors.
        for runs in ("real", "bare", *WORK_FLOORS):
            assert [r["concurrency"] for r in shop[runs]] == [1, 8]
            assert all(r["requests"] > 0 and r["errors"] == {} for r in shop[runs]), (name, runs)
            # Two rounds each, the servers taking turns; the figure is one of them (the median).
            rounds = shop["rounds_qps"][runs]
            assert set(rounds) == {"1", "8"} and all(len(q) == 2 for q in rounds.values()), (name, runs)
            assert all(r["qps"] in rounds[str(r["concurrency"])] for r in shop[runs]), (name, runs)
        s = shop["summary"]
        shares = [o["share"] for o in s["open_loop"]]
        assert shares == [0.5, 0.8]
        for o, run in zip(s["open_loop"], shop["open_loop"]):
            # An open loop does not wait for answers, so a burst of arrivals may find a worker's
            # queue full: the server sheds those (RESOURCE_EXHAUSTED), and the run counts them.
            assert run["mode"] == "open" and run["requests"] > 0, (name, run)
            assert set(run["errors"]) <= {"RESOURCE_EXHAUSTED"}, (name, run)
            assert run["requests"] + sum(run["errors"].values()) + run["overflow"] == run["arrivals"]
            assert o["errors"] == sum(run["errors"].values())
            assert o["rate"] == pytest.approx(o["share"] * s["saturation_qps"])
            # The server's own time and the rest, per request; the empty server at the same rate.
            assert 0 < o["server_p99_ms"] <= o["p99_ms"] and math.isfinite(o["outside_server_p99_ms"])
        for o, bare in zip(s["open_loop"], shop["bare_open_loop"]):
            assert bare["mode"] == "open" and bare["rate"] == o["rate"] and bare["requests"] > 0, (name, bare)
            assert o["bare_p99_ms"] == bare["p99_ms"] and o["p99_vs_bare"] == pytest.approx(
                o["p99_ms"] / bare["p99_ms"]
            )
        # The budgeted run twice: the generator at the lower priority (the targets) and as an equal.
        assert shop["budgeted"]["generator_nice"] == 10 and shop["budgeted_shared"]["generator_nice"] == 0
        for key in ("budgeted", "budgeted_shared"):
            assert shop[key]["requests"] > 0 and shop[key]["errors"] == {}, (name, key)
            assert 0.0 <= shop[key]["late_ratio"] <= 1.0, (name, key)
        assert s["shared_budgeted_server_p999_ms"] == shop["budgeted_shared"]["server"]["p999_ms"]
        assert s["shared_budgeted_late_ratio"] == shop["budgeted_shared"]["late_ratio"]
        # Served with the bundle's own tuned effort (the bench forced none), and the floors with it.
        serving, tuned = shop["serving"], shop["bundle_retrieval"]["ann_effort"]
        assert serving["ann_effort_source"] == "bundle" and serving["ann_effort"] == tuned
        assert shop["raw_faiss"]["effort"] == tuned
        # The in-process timing refines as the server does: with the bundle's factor.
        assert shop["raw_faiss"]["refine"] == shop["bundle_retrieval"]["ann_refine"]
        # The features floor's ratios are its runs' best throughputs against the others'.
        best = {runs: max(r["qps"] for r in shop[runs]) for runs in ("real", *WORK_FLOORS)}
        assert s["floor_features_ratio_vs_floor_score"] == pytest.approx(best["floor_features"] / best["floor_score"])
        assert s["throughput_ratio_vs_floor_features"] == pytest.approx(best["real"] / best["floor_features"])
        assert 0.0 <= s["served_recall"] <= 1.0 and 0.0 <= s["ann_top10_in_candidates"] <= 1.0


@pytest.mark.parametrize(
    "args, named",
    [
        (["--budget-nice", "20"], "--budget-nice 20: a niceness from 0"),
        (["--budget-nice", "-1"], "--budget-nice -1: a niceness from 0"),
        (["--rounds", "0"], "--rounds 0: at least one run"),
    ],
)
def test_bad_settings_are_refused_before_any_work_with_the_reason(args, named, tmp_path, capsys):
    from bench.run import main

    with pytest.raises(SystemExit) as exc:
        main([*args, "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out")])
    assert exc.value.code == 2
    assert named in capsys.readouterr().err
    assert not (tmp_path / "out" / "report.json").exists()
