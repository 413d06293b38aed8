"""The portfolio run as a Spark job: the same customers, rankings and output directory as
:func:`index_builder.portfolio.run_portfolios`, over customer partitions on a cluster's executors.

The driver loads the bundle once to choose the customers (the same code as the local run),
then hands Spark one partition of customers per task. Every Python worker loads the bundle
from its path on shared storage once (cached below, keyed by path and version), ranks each
task's customers through :class:`PortfolioRanker` and writes the task's part files into the
run's temporary directory, which must be on storage the driver and every executor share.
The driver publishes the directory whole (renamed into place) only when every task has
succeeded; a failed job leaves nothing at ``--out``.

Needs the ``spark`` extra (``pip install 'one2one[spark]'``). Run it with
``python -m index_builder portfolios --engine spark`` or ``spark-submit deploy/spark/portfolios.py``.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from index_builder.campaign import Campaign
from index_builder.portfolio import (
    DATASETS,
    PortfolioError,
    PortfolioRanker,
    bundle_dir,
    check_campaign_against,
    load_serving,
    make_partial,
    merge_counts,
    one_thread_per_process,
    open_part_writers,
    partial_name,
    prepare_output,
    publish,
    rank_and_write,
    run_manifest,
    select_customers,
    stamp,
)
from ranking import RankingModel, ServingModel

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

ENGINE = "spark"
PART = "part-{:05d}.parquet"
# Per Python worker process: Spark reuses its workers across tasks (spark.python.worker.reuse,
# on by default), so each loads the bundle once and ranks every later task's customers with it.
# One entry each: a long-lived worker that meets a new bundle or run drops the old one.
_SERVING: dict[tuple[str, str], ServingModel] = {}
_RANKERS: dict[tuple[str, str, str], PortfolioRanker] = {}


class SparkMissingError(PortfolioError):
    """pyspark is not installed (the package's ``spark`` extra)."""


def _require_pyspark() -> None:
    try:
        import pyspark  # noqa: F401
    except ImportError as exc:
        raise SparkMissingError(
            "--engine spark needs pyspark: pip install 'one2one[spark]' (or `make install`)"
        ) from exc


def spark_session(master: str | None = None, show_progress: bool = True) -> SparkSession:
    """A SparkSession for a portfolio run.

    Parameters
    ----------
    master : str, optional
        The Spark master (``local[2]``, ``spark://host:7077``, ``yarn``...). Without it, the one
        ``spark-submit`` was given, or ``local[*]`` when run as a plain Python program.
    show_progress : bool
        Spark's stage progress bar on the terminal.
    """
    _require_pyspark()
    from pyspark.sql import SparkSession

    builder = SparkSession.builder.appName("one2one portfolios").config(
        "spark.ui.showConsoleProgress", "true" if show_progress else "false"
    )
    if master is None and "PYSPARK_GATEWAY_PORT" not in os.environ:  # not under spark-submit
        master = "local[*]"
    if master is not None:
        builder = builder.master(master)
    if master is not None and master.startswith("local"):
        # Local mode's workers would start the `python3` on PATH, which may lack this package
        # (pyspark reads the variable when the context starts); a cluster's executors name
        # theirs through PYSPARK_PYTHON in their own environment.
        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    return builder.getOrCreate()


# ---------------------------------------------------------------------------
# Executor side
# ---------------------------------------------------------------------------


def executor_serving(version_dir: str, version: str, campaign: Campaign) -> tuple[ServingModel, bool]:
    """The bundle in this Python worker, loaded from shared storage on first use; and whether
    this call loaded it.

    Raises
    ------
    PortfolioError
        The path holds another bundle version than the driver chose the customers with.
    """
    key = (version_dir, version)
    serving = _SERVING.get(key)
    if serving is not None:
        return serving, False
    one_thread_per_process()  # Spark runs one task per core: one thread each
    serving = load_serving(Path(version_dir), campaign)
    if serving.model.version != version:
        raise PortfolioError(
            f"bundle at {version_dir} is version {serving.model.version} on this executor, but the driver "
            f"chose the customers with {version}: the artifacts must be on storage every executor shares"
        )
    _SERVING.clear()
    _RANKERS.clear()
    _SERVING[key] = serving
    return serving, True


@dataclass(frozen=True)
class _Task:
    """What every task of one run needs; pickled into each task (the campaign goes by broadcast)."""

    run_id: str
    version_dir: str
    version: str
    campaign: Any  # pyspark.Broadcast[Campaign]
    generated_at: float
    tmp: str
    chunk_size: int

    def ranker(self) -> tuple[PortfolioRanker, bool]:
        """This run's ranker in this Python worker, and whether the bundle was loaded for it."""
        key = (self.version_dir, self.version, self.run_id)
        pr = _RANKERS.get(key)
        if pr is not None:
            return pr, False
        campaign = self.campaign.value
        serving, loaded = executor_serving(self.version_dir, self.version, campaign)
        pr = PortfolioRanker(serving, campaign, None, self.generated_at)
        _RANKERS.clear()
        _RANKERS[key] = pr
        return pr, loaded

    def __call__(self, index: int, user_ids: Iterable[str]) -> Iterator[tuple[int, dict]]:
        """One partition: rank its customers chunk by chunk into its part files, written under a
        name of this attempt and renamed into place once complete (a retried or speculative
        attempt writes the same content); yields the partition's counts."""
        from pyspark import TaskContext

        ids = list(user_ids)
        pr, loaded = self.ranker()
        ctx = TaskContext.get()
        attempt = ctx.taskAttemptId() if ctx is not None else os.getpid()
        tmp = Path(self.tmp)
        final = {d: tmp / d / PART.format(index) for d in DATASETS}
        # Not *.parquet: never taken for a part if the attempt dies before its rename.
        temp = {d: p.with_name(f".{p.name}.attempt-{attempt}") for d, p in final.items()}
        totals: dict = {"n": 0, "bundle_loads": int(loaded)}
        done = False
        try:
            # No mkdir here: once the driver has removed a failed run's directory, a straggling
            # task fails rather than recreating it.
            writers = open_part_writers(temp)
            try:
                for lo in range(0, len(ids), self.chunk_size):
                    merge_counts(totals, rank_and_write(pr, ids[lo : lo + self.chunk_size], writers))
            finally:
                for w in writers.values():
                    w.close()
            for d in DATASETS:
                os.replace(temp[d], final[d])
            done = True
        finally:
            if not done:
                for p in temp.values():
                    p.unlink(missing_ok=True)
        yield index, totals


# ---------------------------------------------------------------------------
# Driver side
# ---------------------------------------------------------------------------


def run_portfolios_spark(
    artifacts: Path,
    campaign: Campaign,
    out: Path,
    *,
    spark: SparkSession | None = None,
    master: str | None = None,
    event_log: Path | None = None,
    replace: bool = False,
    chunk_size: int = 2000,
    partitions: int = 0,
    show_progress: bool = True,
) -> dict:
    """Rank every chosen customer's portfolio as a Spark job and publish the output directory whole.

    Same output as :func:`index_builder.portfolio.run_portfolios` (one part file per partition
    instead of per worker); the manifest adds ``engine: "spark"`` and the job's master.

    Parameters
    ----------
    artifacts : Path
        Artifacts directory (its CURRENT bundle is used) or a bundle version directory, on
        storage every executor reads at the same path.
    campaign : Campaign
    out : Path
        Output directory, on storage every executor writes at the same path; must not exist
        unless ``replace``.
    spark : SparkSession, optional
        The session to run in (left running); by default one is made from ``master`` and
        stopped at the end.
    master : str, optional
        The Spark master when no session is given (see :func:`spark_session`).
    event_log : Path, optional
        Refused: the real-time state of an event log is built in one process; run the local
        engine, or build a bundle that includes the log's events.
    replace : bool
        Replace an existing ``out``.
    chunk_size : int
        Customers per partition (one Spark task each) unless ``partitions`` is given.
    partitions : int
        Spark partitions (tasks); 0: one per ``chunk_size`` customers.
    show_progress : bool
        Spark's progress bar on stderr (when this call makes the session).

    Returns
    -------
    dict
        The manifest written to ``out/manifest.json``.

    Raises
    ------
    CampaignError
        The campaign does not fit the bundle.
    PortfolioError
        ``out`` exists, ``event_log`` was given, pyspark is missing, or the job failed.
    """
    if event_log is not None:
        raise PortfolioError(
            "--event-log: the spark engine does not apply a real-time event log (its user state is built "
            "in one process); use --engine local, or build a bundle that includes the log's events"
        )
    _require_pyspark()
    t_start = time.perf_counter()
    generated_at = time.time()
    out = prepare_output(out, replace, chunk_size)
    if partitions < 0:
        raise ValueError(f"partitions must be >= 0, got {partitions}")
    version_dir = bundle_dir(artifacts)
    t0 = time.perf_counter()
    # The driver ranks nothing: the model alone chooses the customers, as the local run does.
    model = RankingModel(version_dir, verify=True)
    unknown = check_campaign_against(model, campaign)
    customers, who_counts = select_customers(model, campaign)
    t_load = time.perf_counter() - t0

    session = spark if spark is not None else spark_session(master, show_progress)
    sc = session.sparkContext
    n_parts = max(1, min(partitions or -(-len(customers) // chunk_size), len(customers)))
    tmp = partial_name(out, os.getpid())
    tag = f"one2one-portfolios-{os.getpid()}-{int(generated_at * 1000)}"  # no comma: a tag may not hold one
    published = False
    broadcast = None
    try:
        make_partial(out)
        sc.addJobTag(tag)
        sc.setInterruptOnCancel(True)  # a cancelled task's Python worker is stopped, not left writing
        broadcast = sc.broadcast(campaign)
        task = _Task(tmp.name, str(version_dir), model.version, broadcast, generated_at, str(tmp), chunk_size)
        t1 = time.perf_counter()
        try:
            results = sc.parallelize(customers, n_parts).mapPartitionsWithIndex(task).collect()
        except Exception as exc:  # the job failed: py4j and pyspark raise their own types
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise PortfolioError(f"the Spark job failed ({first}); nothing was written to {out}") from exc
        t_rank = time.perf_counter() - t1
        totals: dict = {}
        seen = sorted(index for index, _ in results)
        for _, counts in results:
            merge_counts(totals, counts)
        if seen != list(range(n_parts)) or totals.get("n", 0) != len(customers):
            raise PortfolioError(
                f"{len(seen)} of {n_parts} partitions reported, {totals.get('n', 0)} of {len(customers)} "
                f"customers ranked; nothing was written to {out}"
            )
        _remove_attempt_leftovers(tmp, n_parts)
        manifest = run_manifest(
            campaign, model, version_dir, customers, who_counts, unknown, totals, sc.defaultParallelism, 0, None
        )
        manifest["engine"] = ENGINE
        manifest["spark"] = {
            "master": sc.master,
            "application_id": sc.applicationId,
            "version": sc.version,
            "partitions": n_parts,
            # Python worker processes that loaded the bundle (once each, then reused across tasks).
            "bundle_loads": totals.get("bundle_loads", 0),
        }
        stamp(manifest, generated_at, t_load, t_rank, t_start, len(customers))
        written = publish(tmp, out, manifest)
        published = True
        return written
    finally:
        if not published:
            sc.cancelJobsWithTag(tag)  # interrupted (Ctrl-C) or failed: no task goes on writing
            _remove_tree(tmp)
        sc.removeJobTag(tag)
        if broadcast is not None:
            broadcast.destroy()
        if spark is None:
            session.stop()


def _remove_attempt_leftovers(tmp: Path, n_parts: int) -> None:
    """Drop the files of task attempts that died before their rename; check every part is there."""
    for d in DATASETS:
        wanted = {PART.format(i) for i in range(n_parts)}
        for p in (tmp / d).iterdir():
            if p.name not in wanted:
                p.unlink()
        missing = wanted - {p.name for p in (tmp / d).iterdir()}
        if missing:
            raise PortfolioError(f"{tmp / d}: {len(missing)} part file(s) missing, e.g. {sorted(missing)[0]}")


def _remove_tree(path: Path, attempts: int = 50) -> None:
    """Remove a failed run's directory, again if a task being cancelled wrote into it meanwhile."""
    for _ in range(attempts):
        shutil.rmtree(path, ignore_errors=True)
        if not path.exists():
            return
        time.sleep(0.1)
