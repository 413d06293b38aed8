"""The portfolio run as a Spark job (local mode, two cores): the same output as the local run for
the same campaign, the bundle loaded once per Python worker, and a failed job leaving nothing."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from index_builder.campaign import HOLDOUT, load_campaign
from index_builder.portfolio import PortfolioError, read_dataset, run_portfolios

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
# Arms, a holdout, a rule that drops a category by e-mail and a category cap (which ranks again
# past full categories): every path of a portfolio.
CAMPAIGN = """
name = "week_3"
[offers]
k = 8
max_category_share = 0.25
[context]
channel = "email"
send_time = 2024-01-20T08:00:00Z
[[rules]]
name = "no_cat1_by_email"
when = { channel = "email" }
exclude_categories = ["cat1"]
[measurement]
holdout = 0.2
arms = [
  { name = "popular", variant = "POPULAR", weight = 1 },
  { name = "one_to_one", variant = "ONE_TO_ONE", weight = 1 },
]
"""
KEYS = ("user_id", "rank", "item_id", "strategy", "arm", "campaign", "model_version")


def require_pyspark() -> None:
    """Skips locally when pyspark (the spark extra) or its Java runtime is missing; fails under
    CI=true, which installs both (`make install`, `make deps-system`)."""
    message = ""
    try:
        import pyspark  # noqa: F401
    except ImportError:
        message = "pyspark not installed; `make install` installs the package's spark extra"
    if not message and not (shutil.which("java") or os.environ.get("JAVA_HOME")):
        message = "java not found; `make deps-system` installs a Java 17 runtime for pyspark"
    if message:
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(scope="module")
def spark():
    require_pyspark()
    from pyspark.sql import SparkSession

    # The workers run this interpreter (pyspark reads the variable as the context starts).
    before = os.environ.get("PYSPARK_PYTHON")
    os.environ["PYSPARK_PYTHON"] = sys.executable
    session = (
        SparkSession.builder.master("local[2]")
        .appName("one2one tests")
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
        .config("spark.driver.host", "127.0.0.1")
        .config("spark.driver.bindAddress", "127.0.0.1")
        .config("spark.sql.shuffle.partitions", "2")
        .config("spark.executorEnv.PYTHONPATH", str(ROOT))
        .getOrCreate()
    )
    session.sparkContext.setLogLevel("ERROR")
    yield session
    session.stop()
    if before is None:
        os.environ.pop("PYSPARK_PYTHON", None)
    else:
        os.environ["PYSPARK_PYTHON"] = before


@pytest.fixture(scope="module")
def campaign(tmp_path_factory):
    path = tmp_path_factory.mktemp("campaign") / "campaign.toml"
    path.write_text(CAMPAIGN)
    return load_campaign(path)


@pytest.fixture(scope="module")
def local_run(artifacts, campaign, tmp_path_factory):
    out = tmp_path_factory.mktemp("local") / "out"
    return out, run_portfolios(artifacts, campaign, out, workers=2, chunk_size=37, show_progress=False)


def _sorted_rows(out: Path, name: str) -> tuple[list[tuple], np.ndarray]:
    rows = sorted(read_dataset(out, name).to_pylist(), key=lambda r: (r["user_id"], r["rank"]))
    return [tuple(r[k] for k in KEYS) for r in rows], np.array([r["score"] for r in rows], np.float32)


def test_the_spark_run_writes_what_the_local_run_writes(spark, artifacts, campaign, local_run, tmp_path, shop):
    from index_builder.portfolio_spark import run_portfolios_spark

    local_out, local = local_run
    out = tmp_path / "spark"
    manifest = run_portfolios_spark(artifacts, campaign, out, spark=spark, chunk_size=50, show_progress=False)

    for name in ("portfolios", "holdout"):
        rows, scores = _sorted_rows(out, name)
        want, want_scores = _sorted_rows(local_out, name)
        assert rows == want, name
        np.testing.assert_allclose(scores, want_scores, rtol=1e-6)
    customers = sorted(map(str, read_dataset(out, "customers").to_pylist()))
    assert customers == sorted(map(str, read_dataset(local_out, "customers").to_pylist()))
    # A run that ranked nothing would compare equal too: there is something in every group.
    arms = {r["arm"] for r in read_dataset(out, "customers").to_pylist()}
    assert arms == {"popular", "one_to_one", HOLDOUT}
    offers = read_dataset(out, "portfolios").to_pylist()
    assert len(offers) > 1000
    category = dict(zip(shop.items["item_id"].to_pylist(), shop.items["category"].to_pylist()))
    assert not [r for r in offers if category[r["item_id"]] == "cat1"]  # the rule held
    assert len({r["generated_at"] for r in offers}) == 1

    # The same counts; the manifest says which engine and master made it.
    for key in ("campaign", "bundle", "customers", "who", "unknown_to_bundle", "arms", "event_log"):
        assert manifest[key] == local[key], key
    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert manifest["engine"] == "spark" and "engine" not in local
    n_parts = -(-manifest["customers"] // 50)
    assert manifest["spark"]["master"] == "local[2]" and manifest["spark"]["partitions"] == n_parts
    assert len(manifest["files"]) == 3 * n_parts
    assert manifest["files"] == sorted(str(p.relative_to(out)) for p in out.glob("*/*.parquet"))
    # Each Python worker loaded the bundle once and ranked its later tasks with it.
    assert 1 <= manifest["spark"]["bundle_loads"] <= 2 < n_parts
    assert not list(tmp_path.glob(".spark.partial-*"))


def test_partitions_do_not_change_the_output_and_replace_swaps_it_whole(
    spark, artifacts, campaign, local_run, tmp_path
):
    from index_builder.portfolio_spark import run_portfolios_spark

    local_out, _ = local_run
    out = tmp_path / "spark"
    out.mkdir()
    (out / "old-file").write_text("from an earlier run")
    with pytest.raises(PortfolioError, match="exists; choose another --out or pass --replace"):
        run_portfolios_spark(artifacts, campaign, out, spark=spark, show_progress=False)
    manifest = run_portfolios_spark(
        artifacts, campaign, out, spark=spark, partitions=3, replace=True, show_progress=False
    )
    assert manifest["spark"]["partitions"] == 3 and not (out / "old-file").exists()
    for name in ("portfolios", "holdout"):
        assert _sorted_rows(out, name)[0] == _sorted_rows(local_out, name)[0]
    # The session was handed in: the run leaves it running.
    assert spark.sparkContext.parallelize([1, 2]).sum() == 3


def test_the_spark_engine_refuses_an_event_log_before_starting(artifacts, campaign, tmp_path):
    from index_builder.portfolio_spark import run_portfolios_spark

    with pytest.raises(PortfolioError, match="--event-log: the spark engine does not apply"):
        run_portfolios_spark(artifacts, campaign, tmp_path / "out", event_log=tmp_path)
    assert not list(tmp_path.iterdir())


def test_the_cli_runs_the_spark_engine_with_its_own_session(artifacts, local_run, tmp_path):
    require_pyspark()
    local_out, local = local_run
    (tmp_path / "c.toml").write_text(CAMPAIGN)
    out = tmp_path / "out"
    args = ["--artifacts", str(artifacts), "--campaign", str(tmp_path / "c.toml"), "--out", str(out)]
    proc = subprocess.run(
        [sys.executable, "-m", "index_builder", "portfolios", *args, "--engine", "spark", "--spark-master", "local[2]"]
        + ["--quiet"],
        cwd=ROOT,
        env={**os.environ, "SPARK_LOCAL_IP": "127.0.0.1"},
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == str(out)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["engine"] == "spark" and manifest["spark"]["master"] == "local[2]"
    assert manifest["arms"] == local["arms"]
    assert _sorted_rows(out, "portfolios")[0] == _sorted_rows(local_out, "portfolios")[0]
    # Options of the other engine are refused, naming them.
    proc = subprocess.run(
        [sys.executable, "-m", "index_builder", "portfolios", *args, "--engine", "spark", "--workers", "2"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "--workers is for --engine local" in proc.stderr


def test_ctrl_c_cancels_the_job_and_publishes_nothing(artifacts, tmp_path):
    require_pyspark()
    (tmp_path / "c.toml").write_text(CAMPAIGN)
    out = tmp_path / "out"
    args = ["--artifacts", str(artifacts), "--campaign", str(tmp_path / "c.toml"), "--out", str(out)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "index_builder", "portfolios", *args, "--engine", "spark", "--spark-master", "local[2]"]
        + ["--chunk-size", "1", "--quiet"],  # one customer per task: still running when interrupted
        cwd=ROOT,
        env={**os.environ, "SPARK_LOCAL_IP": "127.0.0.1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    t0 = time.monotonic()
    while not list(tmp_path.glob(".out.partial-*/portfolios/part-*.parquet")):
        assert proc.poll() is None and time.monotonic() - t0 < 120, proc.communicate()
        time.sleep(0.005)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "interrupted; nothing was published" in err, err[-3000:]
    assert not out.exists() and not list(tmp_path.glob(".out.partial-*"))


def test_spark_submit_runs_the_deploy_script_on_its_master(artifacts, local_run, tmp_path):
    require_pyspark()
    local_out, local = local_run
    (tmp_path / "c.toml").write_text(CAMPAIGN)
    out = tmp_path / "out"
    submit = Path(sys.executable).parent / "spark-submit"  # pyspark installs it beside the interpreter
    env = {**os.environ, "PYSPARK_PYTHON": sys.executable, "SPARK_LOCAL_IP": "127.0.0.1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [str(submit), "--master", "local[2]", "--conf", "spark.ui.enabled=false", "deploy/spark/portfolios.py"]
        + ["--artifacts", str(artifacts), "--campaign", str(tmp_path / "c.toml"), "--out", str(out), "--quiet"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["engine"] == "spark" and manifest["spark"]["master"] == "local[2]"
    assert manifest["arms"] == local["arms"]
    assert _sorted_rows(out, "holdout")[0] == _sorted_rows(local_out, "holdout")[0]


def _children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry.name))
    return out


def _python_workers() -> list[int]:
    """This test's Spark Python workers: children of the pyspark daemon the JVM it started runs."""
    workers = []
    for jvm in _children(os.getpid()):
        for daemon in _children(jvm):
            try:
                cmdline = Path(f"/proc/{daemon}/cmdline").read_bytes()
            except OSError:
                continue
            if b"pyspark.daemon" in cmdline:
                workers += _children(daemon)
    return workers


def test_a_failed_job_leaves_no_output_and_the_next_run_succeeds(spark, artifacts, campaign, local_run, tmp_path):
    """An executor's Python worker dies mid-job (local mode does not retry a task): the job fails,
    and neither the output nor its temporary directory is left."""
    from index_builder.portfolio_spark import run_portfolios_spark

    out = tmp_path / "out"
    failure: list[BaseException] = []

    def run() -> None:
        try:
            # One customer per task: the job is still running when its workers are killed.
            run_portfolios_spark(artifacts, campaign, out, spark=spark, chunk_size=1, show_progress=False)
        except BaseException as exc:
            failure.append(exc)

    job = threading.Thread(target=run)
    job.start()
    t0 = time.monotonic()
    while not list(tmp_path.glob(".out.partial-*/portfolios/part-*.parquet")):
        assert job.is_alive() and time.monotonic() - t0 < 120, "the job never wrote a part"
        time.sleep(0.005)
    while job.is_alive():
        for pid in _python_workers():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        job.join(0.05)
    assert len(failure) == 1 and isinstance(failure[0], PortfolioError), failure
    assert "the Spark job failed" in str(failure[0]) and "nothing was written" in str(failure[0])
    assert not out.exists() and not list(tmp_path.glob(".out.partial-*"))
    # The session recovers (new workers) and a rerun publishes the whole output.
    manifest = run_portfolios_spark(artifacts, campaign, out, spark=spark, show_progress=False)
    assert manifest["arms"] == local_run[1]["arms"]
