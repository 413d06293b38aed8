"""The portfolio run: every chosen customer's offers from the serving pipeline (``Ranker.rank``),
in forked worker processes, written as Parquet and renamed into place whole.

Output directory (``--out``)::

    portfolios/part-<worker>.parquet   one row per customer x rank: what to send
    holdout/part-<worker>.parquet      what the holdout would have been offered (never send)
    customers/part-<worker>.parquet    every chosen customer: arm (or "holdout"), strategy, offers
    manifest.json                      settings, counts per arm and strategy, timings

The directory is built under a temporary name next to ``--out`` and renamed into place
when complete, so a reader never sees half a run; a run that dies leaves only its
temporary directory, which the next run removes.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime as _dt
import json
import logging
import os
import shutil
import signal
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from index_builder.campaign import HOLDOUT, Campaign, CampaignError
from index_builder.event_archive import log_records
from ranking import (
    VARIANTS,
    Event,
    OverlaySettings,
    QueryLimits,
    Ranker,
    RankerConfig,
    RankingModel,
    RankOverlay,
    RankQuery,
    RankResult,
    ServingModel,
    UserStateStore,
    build_overlay,
    resolve_current,
)

log = logging.getLogger(__name__)

DATASETS = ("portfolios", "holdout", "customers")
MANIFEST = "manifest.json"
# The ranking asks for this many times k when a category cap may skip some of the best offers.
OVERFETCH = 4
OFFER_SCHEMA = pa.schema(
    [
        ("user_id", pa.string()),
        ("rank", pa.int32()),
        ("item_id", pa.string()),
        ("score", pa.float32()),
        ("strategy", pa.string()),
        ("arm", pa.string()),
        ("campaign", pa.string()),
        ("model_version", pa.string()),
        ("generated_at", pa.timestamp("us", tz="UTC")),
    ]
)
CUSTOMER_SCHEMA = pa.schema(
    [
        ("user_id", pa.string()),
        ("arm", pa.string()),
        ("strategy", pa.string()),
        ("offers", pa.int32()),
        ("fallback_reason", pa.string()),
    ]
)
_PR_SET_PDEATHSIG = 1


class PortfolioError(RuntimeError):
    """The run cannot start or did not finish; nothing was written at the output path."""


def partial_name(out: Path, pid: int) -> Path:
    return out.parent / f".{out.name}.partial-{pid}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_partials(out: Path) -> list[Path]:
    """Remove what runs that died left next to ``out`` (their process is gone); returns the paths."""
    gone = []
    for p in out.parent.glob(f".{out.name}.partial-*"):
        pid = p.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)
            gone.append(p)
    return gone


# ---------------------------------------------------------------------------
# Who
# ---------------------------------------------------------------------------


def select_customers(model: RankingModel, campaign: Campaign) -> tuple[list[str], dict[str, int]]:
    """The customers of the campaign, in bundle order (or the list file's order), and counts of
    what was left out.

    Raises
    ------
    CampaignError
        A segment key matches no segment of the bundle, or nobody is chosen.
    """
    who, src = campaign.who, campaign.source
    counts: dict[str, int] = {}
    if campaign.customers is not None:
        ids = np.array(campaign.customers, dtype=object)
        rows = model.users.lookup(list(campaign.customers))
        counts["listed"] = len(ids)
        counts["listed_unknown"] = int((rows < 0).sum())
    else:
        rows = np.flatnonzero(np.asarray(model.user_has_history)).astype(np.int64)
        ids = None
        counts["with_history"] = len(rows)
    keep = np.ones(len(rows), bool)
    if who.segments:
        names = [str(s).lower() for s in model.segment_keys.ids]
        wanted = set(who.segments)
        chosen = np.array([n in wanted or bool(wanted.intersection(n.split("|"))) for n in names], bool)
        if not chosen.any():
            raise CampaignError(
                f"{src}: who.segments: none of {sorted(wanted)[:5]} is a segment of bundle {model.version} "
                f"(segments look like {names[:5]})"
            )
        seg = np.where(rows >= 0, np.asarray(model.user_segment)[np.maximum(rows, 0)], -1)
        keep &= (seg >= 0) & chosen[np.maximum(seg, 0)]
        counts["outside_segments"] = int((~keep).sum())
    if who.min_consumed > 0:
        indptr = np.asarray(model.consumed.indptr)
        safe = np.maximum(rows, 0)
        consumed = np.where(rows >= 0, indptr[safe + 1] - indptr[safe], 0)
        low = keep & (consumed < who.min_consumed)
        counts["below_min_consumed"] = int(low.sum())
        keep &= ~low
    if ids is None:
        chosen_ids = [str(x) for x in model.users.id_of(rows[keep])]
    else:
        chosen_ids = [str(x) for x in ids[keep]]
    if not chosen_ids:
        raise CampaignError(f"{src}: who: no customer of bundle {model.version} matches ({counts})")
    return chosen_ids, counts


# ---------------------------------------------------------------------------
# What: one customer's portfolio
# ---------------------------------------------------------------------------


@dataclass
class ChunkResult:
    offers: pa.Table
    holdout: pa.Table
    customers: pa.Table
    counts: dict = field(default_factory=dict)


class PortfolioRanker:
    """Ranks portfolios of one campaign on one loaded bundle, through :meth:`Ranker.rank`.

    Build it in the process that ranks (a worker, after the fork) on a :class:`ServingModel`
    loaded before the fork.

    Parameters
    ----------
    serving : ServingModel
    campaign : Campaign
    state : UserStateStore, optional
        Real-time events (from the server's event log) up to the send time.
    generated_at : float
        Unix seconds written on every row.
    """

    def __init__(
        self,
        serving: ServingModel,
        campaign: Campaign,
        state: UserStateStore | None = None,
        generated_at: float = 0.0,
    ):
        self.campaign = campaign
        self.model = serving.model
        self.ranker = Ranker(serving, ranker_config(campaign))
        # As a server worker does before serving: also fixes the offsets' scale (rules' demotions).
        self.ranker.warm()
        self.state = state
        self.generated_at = generated_at
        c = campaign.context
        self.rules = [r for r in campaign.rules if r.matches(c.channel, c.device, c.region, {})]
        self.settings = OverlaySettings()
        self.variants = {a.name: a.variant for a in campaign.experiment.arms} | {HOLDOUT: VARIANTS["ONE_TO_ONE"]}
        self.base = {
            name: RankOverlay(variant=v, rules=self.rules, settings=self.settings) for name, v in self.variants.items()
        }
        o = campaign.offers
        self.fetch = o.k if o.max_category_share >= 1.0 else o.k * OVERFETCH
        self.per_category = o.per_category()
        self.catalogue = list(campaign.catalogue)

    def query(self, user_id: str, exclude_categories: list[str], exclude_items: list[str]) -> RankQuery:
        o, c = self.campaign.offers, self.campaign.context
        return RankQuery(
            user_id=user_id,
            num_results=self.fetch,
            event_time=c.send_time,
            channel=c.channel,
            device=c.device,
            region=c.region,
            candidate_item_ids=self.catalogue,
            exclude_item_ids=exclude_items,
            include_categories=list(o.include_categories),
            exclude_categories=list(o.exclude_categories) + exclude_categories,
            min_price=o.min_price,
            max_price=o.max_price,
        )

    def overlay(self, user_id: str, arm: str) -> RankOverlay:
        # The overlay leaves out what the bundle's window already holds, as the server's state does.
        events = self.state.held(user_id) if self.state is not None else None
        if not events:
            return self.base[arm]
        return build_overlay(
            self.model,
            user_id,
            events,
            self.campaign.context.send_time,
            self.variants[arm],
            self.rules,
            self.settings,
        )

    def portfolio(self, user_id: str, arm: str) -> tuple[list[str], list[float], RankResult]:
        """One customer's offers: Rank's order, at most ``per_category`` sharing a category.

        With a category cap: take the ranking in order while it fits; when a category is full
        and offers are still missing, rank again with the full categories and the chosen items
        excluded (as Rank filters), and go on. Every round fills a category or ends.
        """
        k = self.campaign.offers.k
        overlay = self.overlay(user_id, arm)
        res = self.ranker.rank(self.query(user_id, [], []), None, overlay)
        if self.fetch == k:
            return res.item_ids[:k], res.scores[:k], res
        cats, names = self.model.item_categories, self.model.category_names.ids
        used: Counter = Counter()
        ids: list[str] = []
        scores: list[float] = []
        first = res
        while True:
            full_before = {c for c, n in used.items() if n >= self.per_category}
            for item, score, row in zip(res.item_ids, res.scores, self.model.items.lookup(res.item_ids)):
                mine = [int(c) for c in cats.row(int(row))] if row >= 0 else []
                if any(used[c] >= self.per_category for c in mine):
                    continue
                used.update(mine)
                ids.append(item)
                scores.append(score)
                if len(ids) == k:
                    return ids, scores, first
            full = {c for c, n in used.items() if n >= self.per_category}
            if len(res.item_ids) < self.fetch or full == full_before:
                return ids, scores, first  # nothing more to rank
            excluded = [str(names[c]) for c in sorted(full)]
            res = self.ranker.rank(self.query(user_id, excluded, ids), None, overlay)

    def rank_chunk(self, user_ids: list[str]) -> ChunkResult:
        """Portfolios of these customers: offers (arms), the holdout's would-be offers, and one
        customer row each."""
        name, version = self.campaign.name, self.model.version
        cols: dict[str, dict[str, list]] = {d: {f.name: [] for f in OFFER_SCHEMA} for d in ("portfolios", "holdout")}
        cust: dict[str, list] = {f.name: [] for f in CUSTOMER_SCHEMA}
        counts: dict[str, Counter] = {
            "arm_strategy": Counter(),
            "rows": Counter(),
            "empty": Counter(),
            "short": Counter(),
        }
        k = self.campaign.offers.k
        for uid in user_ids:
            arm, _ = self.campaign.group(uid)
            ids, scores, res = self.portfolio(uid, arm)
            strategy = res.rung.name
            into = cols["holdout" if arm == HOLDOUT else "portfolios"]
            n = len(ids)
            into["user_id"] += [uid] * n
            into["rank"] += range(1, n + 1)
            into["item_id"] += ids
            into["score"] += scores
            into["strategy"] += [strategy] * n
            into["arm"] += [arm] * n
            cust["user_id"].append(uid)
            cust["arm"].append(arm)
            cust["strategy"].append(strategy)
            cust["offers"].append(n)
            cust["fallback_reason"].append(res.fallback_reason)
            counts["arm_strategy"][f"{arm}/{strategy}"] += 1
            counts["rows"][arm] += n
            if n == 0:
                counts["empty"][arm] += 1
            elif n < k:
                counts["short"][arm] += 1
        stamp = int(self.generated_at * 1_000_000)
        tables = {}
        for d, c in cols.items():
            n = len(c["user_id"])
            c["campaign"] = [name] * n
            c["model_version"] = [version] * n
            c["generated_at"] = [stamp] * n
            tables[d] = pa.table(c, schema=OFFER_SCHEMA)
        return ChunkResult(
            tables["portfolios"],
            tables["holdout"],
            pa.table(cust, schema=CUSTOMER_SCHEMA),
            {key: dict(v) for key, v in counts.items()},
        )


def ranker_config(campaign: Campaign) -> RankerConfig:
    """The server's pipeline settings (RankerConfig's defaults), with room for the campaign's
    over-fetch and catalogue."""
    d = QueryLimits()
    limits = QueryLimits(
        max_results=max(d.max_results, campaign.offers.k * OVERFETCH),
        max_request_items=max(d.max_request_items, len(campaign.catalogue)),
    )
    return RankerConfig(limits=limits)


def check_campaign_against(model: RankingModel, campaign: Campaign) -> dict[str, int]:
    """What of the campaign the bundle does not know; refuses what would make every portfolio empty.

    Raises
    ------
    CampaignError
    """
    src, o = campaign.source, campaign.offers
    out = {}
    if campaign.catalogue:
        rows = model.items.lookup(list(campaign.catalogue))
        out["catalogue_unknown"] = int((rows < 0).sum())
        if (rows < 0).all():
            raise CampaignError(
                f"{src}: offers.catalogue: none of its {len(rows)} items is in bundle {model.version} "
                f"(e.g. {list(campaign.catalogue[:3])})"
            )
    for key in ("include_categories", "exclude_categories"):
        names = getattr(o, key)
        if names:
            ids = model.category_names.lookup(list(names))
            unknown = [n for n, i in zip(names, ids) if i < 0]
            if key == "include_categories" and len(unknown) == len(names):
                raise CampaignError(f"{src}: offers.{key}: no category of bundle {model.version} matches {unknown[:5]}")
            out[f"{key}_unknown"] = len(unknown)
    return out


def load_event_state(log_dir: Path, until: float) -> tuple[UserStateStore, int]:
    """Events of the server's event log (or the builder's event archive) up to ``until``, as the
    server's user state would hold them at that time (every purchase, the latest other events per
    customer)."""
    events = [
        Event.from_record(rec)
        for rec in log_records(log_dir)
        if rec.get("kind") == "event" and float(rec.get("timestamp", 0.0)) <= until
    ]
    # Several writers (server workers) each append in their own order: apply in event time.
    events.sort(key=lambda e: e.timestamp)
    state = UserStateStore(max_users=1 << 62)
    kept = state.add(events)
    return state, kept


# ---------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------


def _stop_with_parent(parent: int) -> None:
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:
        os._exit(1)


def open_part_writers(paths: dict[str, Path]) -> dict[str, pq.ParquetWriter]:
    """One Parquet writer per dataset (``DATASETS``), at these paths; closed by the caller."""
    writers: dict[str, pq.ParquetWriter] = {}
    try:
        for d in DATASETS:
            schema = CUSTOMER_SCHEMA if d == "customers" else OFFER_SCHEMA
            writers[d] = pq.ParquetWriter(paths[d], schema, compression="zstd")
    except BaseException:
        for w in writers.values():
            w.close()
        raise
    return writers


def rank_and_write(pr: PortfolioRanker, user_ids: list[str], writers: dict[str, pq.ParquetWriter]) -> dict:
    """Rank one chunk of customers and append it to the part files (a row group each); both
    engines (forked workers, Spark tasks) run every chunk through here.

    Returns
    -------
    dict
        ``n`` customers, ``rank_s`` and ``write_s`` seconds, and the chunk's counts
        (summed with :func:`merge_counts` into the manifest's).
    """
    t0 = time.perf_counter()
    r = pr.rank_chunk(user_ids)
    t_rank = time.perf_counter() - t0
    for d, table in zip(DATASETS, (r.offers, r.holdout, r.customers)):
        if table.num_rows:
            writers[d].write_table(table)
    return {"n": len(user_ids), "rank_s": t_rank, "write_s": time.perf_counter() - t0 - t_rank, **r.counts}


def _worker(
    slot: int,
    serving: ServingModel,
    campaign: Campaign,
    state: UserStateStore | None,
    customers: list[str],
    chunks: list[tuple[int, int]],
    next_chunk,
    tmp: Path,
    generated_at: float,
    report_fd: int,
) -> None:
    """One worker: takes chunks until none is left, appends each to its part files, reports counts."""
    pr = PortfolioRanker(serving, campaign, state, generated_at)
    writers = open_part_writers({d: tmp / d / f"part-{slot:04d}.parquet" for d in DATASETS})
    try:
        while True:
            with next_chunk.get_lock():
                i = next_chunk.value
                next_chunk.value += 1
            if i >= len(chunks):
                break
            lo, hi = chunks[i]
            msg = rank_and_write(pr, customers[lo:hi], writers)
            os.write(report_fd, (json.dumps(msg) + "\n").encode())
    finally:
        for w in writers.values():
            w.close()


def merge_counts(total: dict, part: dict) -> None:
    """Add one chunk's (or task's) counts into ``total``, nested dicts key by key."""
    for key, value in part.items():
        if isinstance(value, dict):
            sub = total.setdefault(key, {})
            for k2, v2 in value.items():
                sub[k2] = sub.get(k2, 0) + v2
        else:
            total[key] = total.get(key, 0) + value


def default_workers() -> int:
    return len(os.sched_getaffinity(0))


def run_portfolios(
    artifacts: Path,
    campaign: Campaign,
    out: Path,
    *,
    workers: int = 0,
    event_log: Path | None = None,
    replace: bool = False,
    chunk_size: int = 2000,
    show_progress: bool = True,
) -> dict:
    """Rank every chosen customer's portfolio and publish the output directory whole.

    Parameters
    ----------
    artifacts : Path
        Artifacts directory (its CURRENT bundle is used) or a bundle version directory.
    campaign : Campaign
    out : Path
        Output directory; must not exist unless ``replace``.
    workers : int
        Worker processes (0: one per usable CPU).
    event_log : Path, optional
        The server's event log directory: events after the bundle and up to the send time
        apply as they do on a Rank (real-time overlay).
    replace : bool
        Replace an existing ``out``.
    chunk_size : int
        Customers per unit of work (and per Parquet row group).
    show_progress : bool
        A progress bar on stderr.

    Returns
    -------
    dict
        The manifest written to ``out/manifest.json``.

    Raises
    ------
    CampaignError
        The campaign does not fit the bundle.
    PortfolioError
        ``out`` exists, or a worker failed.
    """
    t_start = time.perf_counter()
    generated_at = time.time()
    out = prepare_output(out, replace, chunk_size)
    # One OpenMP and BLAS thread in this process and so in every worker forked from it: the
    # workers, not threads, use the cores (as the server's do, server/app.py). Set before the
    # first search, so no OpenMP thread pool exists when the workers are forked.
    one_thread_per_process()
    version_dir = bundle_dir(artifacts)
    t0 = time.perf_counter()
    serving = load_serving(version_dir, campaign)
    model = serving.model
    unknown = check_campaign_against(model, campaign)
    customers, who_counts = select_customers(model, campaign)
    state, n_events = (None, 0)
    if event_log is not None:
        if not Path(event_log).is_dir():
            raise FileNotFoundError(f"--event-log {event_log}: not a directory")
        state, n_events = load_event_state(Path(event_log), campaign.context.send_time)
    t_load = time.perf_counter() - t0

    n_workers = max(1, min(workers or default_workers(), -(-len(customers) // chunk_size)))
    chunks = [(lo, min(lo + chunk_size, len(customers))) for lo in range(0, len(customers), chunk_size)]
    tmp = make_partial(out)

    import multiprocessing

    next_chunk = multiprocessing.get_context("fork").Value("q", 0)
    read_fd, write_fd = os.pipe()
    parent = os.getpid()
    pids: list[int] = []
    totals: dict = {}
    t1 = time.perf_counter()
    published = False
    try:
        sys.stdout.flush()
        sys.stderr.flush()
        for slot in range(n_workers):
            pid = os.fork()
            if pid == 0:  # the worker
                code = 1
                try:
                    os.close(read_fd)
                    _stop_with_parent(parent)
                    signal.signal(signal.SIGINT, signal.SIG_DFL)  # Ctrl-C stops it at once; the parent cleans up
                    _worker(slot, serving, campaign, state, customers, chunks, next_chunk, tmp, generated_at, write_fd)
                    code = 0
                except BaseException:  # a worker must never fall back into the parent's code
                    log.exception("portfolio worker %d failed", slot)
                finally:
                    os._exit(code)
            pids.append(pid)
        os.close(write_fd)
        write_fd = -1
        from tqdm import tqdm

        with (
            tqdm(total=len(customers), unit="customer", disable=not show_progress, desc=campaign.name) as bar,
            os.fdopen(read_fd, "rb", buffering=0) as pipe,
        ):
            read_fd = -1
            buf = b""
            while chunk := pipe.read(65536):
                buf += chunk
                *lines, buf = buf.split(b"\n")
                for line in lines:
                    msg = json.loads(line)
                    bar.update(msg["n"])
                    merge_counts(totals, msg)
        failed = []
        for pid in pids:
            _, status = os.waitpid(pid, 0)
            if os.waitstatus_to_exitcode(status) != 0:
                failed.append(pid)
        pids = []
        if failed or totals.get("n", 0) != len(customers):
            raise PortfolioError(
                f"{len(failed)} worker(s) failed (see the log above); {totals.get('n', 0)} of "
                f"{len(customers)} customers ranked; nothing was written to {out}"
            )
        t_rank = time.perf_counter() - t1
        manifest = run_manifest(
            campaign, model, version_dir, customers, who_counts, unknown, totals, n_workers, n_events, event_log
        )
        stamp(manifest, generated_at, t_load, t_rank, t_start, len(customers))
        written = publish(tmp, out, manifest)
        published = True
        return written
    finally:
        for fd in (read_fd, write_fd):
            if fd >= 0:
                os.close(fd)
        for pid in pids:  # interrupted: stop the workers before removing what they write to
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
        if not published:
            shutil.rmtree(tmp, ignore_errors=True)


def prepare_output(out: Path, replace: bool, chunk_size: int) -> Path:
    """The output path made absolute, its parent created and what dead runs left beside it removed.

    Raises
    ------
    PortfolioError
        ``out`` exists and ``replace`` is not set.
    ValueError
        ``chunk_size`` is below 1.
    """
    out = Path(out).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in remove_stale_partials(out):
        log.info("removed the partial output of an interrupted run: %s", stale)
    if out.exists() and not replace:
        raise PortfolioError(f"{out} exists; choose another --out or pass --replace")
    if chunk_size < 1:
        raise ValueError(f"chunk size must be >= 1, got {chunk_size}")
    return out


def one_thread_per_process() -> None:
    """One OpenMP (faiss) and one BLAS thread in this process: processes, not threads, use the cores."""
    import faiss
    from threadpoolctl import threadpool_limits

    faiss.omp_set_num_threads(1)
    threadpool_limits(1, "blas")


def bundle_dir(artifacts: Path) -> Path:
    """The bundle version directory a run ranks with: ``artifacts`` itself or its CURRENT version."""
    root = Path(artifacts)
    return root if (root / MANIFEST).exists() else resolve_current(root)


def load_serving(version_dir: Path, campaign: Campaign) -> ServingModel:
    """The bundle, verified, as the ranking processes share it (with the exact head the pipeline uses)."""
    serving = ServingModel(RankingModel(version_dir, verify=True))
    cfg = ranker_config(campaign)
    if cfg.exact_head_items > 0:
        serving.exact_head(cfg.exact_head_items)  # shared by the workers, as in server.workers
    return serving


def make_partial(out: Path) -> Path:
    """A fresh temporary output directory beside ``out``, with one folder per dataset."""
    tmp = partial_name(out, os.getpid())
    shutil.rmtree(tmp, ignore_errors=True)
    for d in DATASETS:
        (tmp / d).mkdir(parents=True)
    return tmp


def stamp(manifest: dict, generated_at: float, t_load: float, t_rank: float, t_start: float, n: int) -> None:
    """The run's time and timings in its manifest: when, how long each part took, customers per second."""
    manifest["generated_at"] = _dt.datetime.fromtimestamp(generated_at, _dt.UTC).isoformat()
    manifest["timings_seconds"] = {
        "load": round(t_load, 3),
        "rank_and_write": round(t_rank, 3),
        "total": round(time.perf_counter() - t_start, 3),
    }
    manifest["customers_per_second"] = round(n / t_rank, 1) if t_rank > 0 else None


def publish(tmp: Path, out: Path, manifest: dict) -> dict:
    """List the part files in the manifest, write it, flush everything and rename ``tmp`` to ``out``
    (replacing an old ``out`` whole); returns the manifest as a reader of the file sees it."""
    manifest["files"] = sorted(str(p.relative_to(tmp)) for d in DATASETS for p in (tmp / d).glob("*.parquet"))
    text = json.dumps(manifest, indent=2) + "\n"
    (tmp / MANIFEST).write_text(text)
    _fsync_tree(tmp)
    if out.exists():
        old = out.parent / f".{out.name}.replaced-{os.getpid()}"
        os.rename(out, old)
        os.rename(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, out)
    _fsync_dir(out.parent)
    return json.loads(text)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for p in root.rglob("*"):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    for d in [root, *(p for p in root.rglob("*") if p.is_dir())]:
        _fsync_dir(d)


def run_manifest(
    campaign: Campaign,
    model: RankingModel,
    version_dir: Path,
    customers: list[str],
    who_counts: dict,
    unknown: dict,
    totals: dict,
    n_workers: int,
    n_events: int,
    event_log: Path | None,
) -> dict:
    """The manifest of a run: its settings, who was chosen, and the counts per arm and strategy
    summed from every chunk (``totals``); the engines add their timings."""
    by_arm: dict[str, dict] = {}
    for key, n in sorted(totals.get("arm_strategy", {}).items()):
        arm, strategy = key.split("/")
        a = by_arm.setdefault(arm, {"customers": 0, "strategies": {}})
        a["customers"] += n
        a["strategies"][strategy] = n
    for arm, a in by_arm.items():
        a["offers"] = totals.get("rows", {}).get(arm, 0)
        a["empty_portfolios"] = totals.get("empty", {}).get(arm, 0)
        a["short_portfolios"] = totals.get("short", {}).get(arm, 0)
    return {
        "campaign": campaign.settings(),
        "bundle": {"version": model.version, "path": str(version_dir)},
        "event_log": {"path": str(event_log), "events_applied": n_events} if event_log is not None else None,
        "customers": len(customers),
        "who": who_counts,
        "unknown_to_bundle": unknown,
        "arms": by_arm,
        "workers": n_workers,
        "seconds_ranking_by_workers": round(totals.get("rank_s", 0.0), 3),
        "seconds_writing_by_workers": round(totals.get("write_s", 0.0), 3),
    }


def read_dataset(out: Path, name: str) -> pa.Table:
    """One dataset of a run's output directory as a single table."""
    schema = CUSTOMER_SCHEMA if name == "customers" else OFFER_SCHEMA
    parts = sorted((Path(out) / name).glob("*.parquet"))
    if not parts:
        return schema.empty_table()
    return pa.concat_tables([pq.read_table(p, schema=schema) for p in parts])
