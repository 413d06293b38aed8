"""The builder's orchestrator: named steps from the inputs to a published bundle (or a ladder report).

Every part of the data is fitted once (``index_builder.fit``). The protocols'
earlier parts (``index_builder.splits``) serve both the reranker's training rows
and the ladder evaluation; the whole data is fitted last for the published bundle.
Each step's time is on the progress bar and in the manifest's ``steps``.
"""

from __future__ import annotations

import datetime as _dt
import logging
import time
from pathlib import Path

import faiss
import numpy as np
import pyarrow.parquet as pq

from index_builder.ann_tuning import tune_index
from index_builder.config import BuildConfig
from index_builder.evaluate import EvalConfig, ladder_summary, run_protocol
from index_builder.fit import FIT_STEPS, Fitted, Inputs, PartFit, build_index, fit, linear_scoring, read_inputs
from index_builder.io import EventRecords
from index_builder.profile import data_profile
from index_builder.repeat import check_repeat_categories, rebought_pairs
from index_builder.rerank_train import RerankOutcome, attributes_of, train_reranker
from index_builder.splits import Protocol, SplitError, split
from index_builder.steps import Steps
from index_builder.stream_input import StreamInput, is_store_url
from index_builder.tables import item_categories
from ranking import (
    DEFAULT_ANN_EFFORT,
    DEFAULT_EXACT_HEAD_ITEMS,
    FEATURE_NAMES,
    SCHEMA_VERSION,
    BundleWriter,
    ExactHead,
    ann_search,
    check_arrays,
    choose_first_tier,
    tree_arrays,
)

__all__ = ["build", "evaluate", "run_all", "build_index", "read_inputs", "ann_recall", "exact_head_share"]

log = logging.getLogger(__name__)


def ann_recall(index: faiss.Index, item_factors: np.ndarray, queries: np.ndarray, k: int, effort: int) -> float:
    """Mean recall@k of the ANN index against exact inner-product search."""
    if len(queries) == 0 or k == 0:
        return float("nan")
    exact = faiss.IndexFlatIP(item_factors.shape[1])
    exact.add(item_factors)
    k = min(k, index.ntotal)
    _, truth = exact.search(queries, k)
    _, got = ann_search(index, queries, k, effort)
    hits = [len(np.intersect1d(t[t >= 0], g[g >= 0])) / max(1, (t >= 0).sum()) for t, g in zip(truth, got)]
    return float(np.mean(hits))


def exact_head_share(
    item_factors: np.ndarray, queries: np.ndarray, k: int, size: int = DEFAULT_EXACT_HEAD_ITEMS
) -> float:
    """Share of queries whose exact top-k the server's exact head (the ``size`` largest-norm
    items, ``ranking.retrieval.ExactHead``) proves; the rest are served by the ANN index."""
    if len(queries) == 0 or k == 0:
        return float("nan")
    head = ExactHead(item_factors, size)
    if k > head.size:
        return 0.0
    return float(head.search(np.ascontiguousarray(queries, dtype=np.float32), k)[2].mean())


# ---------------------------------------------------------------------------
# The learning steps shared by `build` and `evaluate`
# ---------------------------------------------------------------------------


def _rerank_protocols(cfg: BuildConfig, rebought: int) -> list[Protocol]:
    """The reranker's training splits; ``both`` adds ``last_basket`` on a shop whose customers buy again
    (``rebought`` pairs), so what it learns includes which staples come back in the next basket."""
    if not cfg.rerank:
        return []
    if cfg.rerank_split == "both":
        names: tuple[str, ...] = ("temporal", "last_n") + (("last_basket",) if rebought else ())
    else:
        names = (cfg.rerank_split,)
    return [Protocol(n, cfg.rerank_cutoff_quantile, cfg.rerank_holdout) for n in names]


def _plan(rerank: list[Protocol], ladder: list[Protocol]) -> tuple[list[Protocol], list[str]]:
    """The distinct splits to fit (a split both consumers ask for is fitted once) and their step names."""
    parts: dict[tuple, Protocol] = {}
    for p in rerank + ladder:
        parts.setdefault(p.key, p)
    names = [f"fit[{_label(p)}]" for p in parts.values()]
    names += ["rerank rows", "rerank fit"] if rerank else []
    names += [f"ladder[{p.name}]" for p in ladder]
    return list(parts.values()), names


def _label(p: Protocol) -> str:
    if p.name == "temporal":
        return f"{p.name} q={p.cutoff_quantile}"
    return f"{p.name} n={p.holdout}" if p.name == "last_n" else p.name


def _learn(inp: Inputs, cfg: BuildConfig, ladder: EvalConfig | None, steps: Steps) -> tuple[dict, dict | None]:
    """Fit each protocol's earlier part once; train the reranker and run the ladder on those fits.

    Returns
    -------
    (scoring, ladder_results)
        The manifest's ``scoring`` section (tree arrays under ``"_trees"``), and the ladder's
        results (None without ``ladder``).
    """
    rerank = _rerank_protocols(cfg, rebought_pairs(inp.events, cfg))
    ladder_protocols = [ladder.protocol(n) for n in ladder.protocols] if ladder is not None else []
    needed, _ = _plan(rerank, ladder_protocols)
    parts: dict[tuple, PartFit | str] = {}
    for p in needed:
        with steps.step(f"fit[{_label(p)}]"):
            try:
                earlier, later = split(inp.events, p, cfg)
                fitted = fit(inp.with_events(earlier), cfg)
                model = fitted.model(linear_scoring(cfg, "rerank = false"), name=f"the {p.name} split's earlier part")
                parts[p.key] = PartFit(p, earlier, later, fitted, model)
            except SplitError as exc:
                parts[p.key] = str(exc)
            except ValueError as exc:  # the earlier part cannot be fitted
                parts[p.key] = f"protocol {p.name}: cannot fit the earlier part: {exc}"

    outcome = RerankOutcome(None, reason="rerank = false")
    if rerank:
        usable = [part for p in rerank if isinstance(part := parts[p.key], PartFit)]
        failed = [part for p in rerank if isinstance(part := parts[p.key], str)]
        attributes = attributes_of(inp.users, usable[0].model) if usable else {}
        outcome = train_reranker(usable, failed, attributes, cfg, steps)
        if outcome.trees is None:
            log.warning("no reranker trained (%s); scoring with the linear fallback", outcome.reason)
    if outcome.trees is not None:
        scoring = {
            "model": "trees",
            "features": list(FEATURE_NAMES),
            "training": outcome.section,
            "_trees": outcome.trees,
            "_phases": outcome.phases,
        }
    else:
        scoring = linear_scoring(cfg, outcome.reason, outcome.section if rerank else None)

    if ladder is None:
        return scoring, None
    results: dict = {"protocols": {}}
    for p in ladder_protocols:
        with steps.step(f"ladder[{p.name}]"):
            part = parts[p.key]
            if isinstance(part, str):
                results["protocols"][p.name] = {"protocol": p.name, "error": part}
                continue
            results["protocols"][p.name] = _ladder_protocol(part, outcome, scoring, ladder)
    results["settings"] = {
        "ks": list(ladder.ks),
        "cutoff_quantile": ladder.cutoff_quantile,
        "holdout": ladder.holdout,
        "recent_days": ladder.recent_days,
        "ease_lambda": ladder.ease_lambda,
        "reranker": "cross-fitted: each user scored by the bag that never trained on them",
    }
    return scoring, results


def _ladder_phase_veto(phases: dict, ladder_results: dict) -> dict:
    """``phases`` with one phase chosen when the ladder saw phased NDCG@10 lose beyond noise.

    The held-out rows chose the phases; the ladder ranks real test users through the serving
    path both ways (``run_protocol``'s ``phases``): a loss there beyond noise on any protocol
    also sends the bundle back to one phase.
    """
    lost = [
        name
        for name, p in ladder_results["protocols"].items()
        if isinstance(p.get("phases"), dict) and p["phases"].get("lost")
    ]
    if lost and phases.get("second_phase_candidates"):
        phases = {
            **phases,
            "second_phase_candidates": 0,
            "one_phase_because": f"phased NDCG@10 lost beyond noise in the ladder's {', '.join(lost)} protocol",
        }
        log.info("scoring in one phase: %s", phases["one_phase_because"])
    return phases


def _ladder_protocol(part: PartFit, outcome: RerankOutcome, scoring: dict, ecfg: EvalConfig) -> dict:
    """One protocol of the ladder on its shared fit, the full pipeline cross-fitted over the reranker's bags."""
    if outcome.trees is None:
        models, bag_of = [part.fitted.model({k: v for k, v in scoring.items() if k != "_trees"})], None
    else:
        section = {"model": "trees", "features": list(FEATURE_NAMES), "training": outcome.section}
        models = [
            part.fitted.model(
                section,
                tree_arrays(bag),
                name=f"the {part.protocol.name} split, bag {b}",
                sections={"phases": outcome.bag_phases(b)} if outcome.phases else None,
            )
            for b, bag in enumerate(outcome.bags)
        ]
        bag_of = outcome.bag_of
    try:
        return run_protocol(part, models, bag_of, ecfg)
    except SplitError as exc:
        return {"protocol": part.protocol.name, "error": str(exc)}


# ---------------------------------------------------------------------------
# The two jobs
# ---------------------------------------------------------------------------


def build(
    events: Path | str | list[Path | str],
    items: Path,
    users: Path | None,
    out: Path,
    cfg: BuildConfig,
    show_progress: bool = True,
) -> Path:
    """Build and publish one bundle version under ``out``.

    ``events`` is one source or several: files, a server's event log directory, or a shared
    event store's URL (``redis://...``, ``index_builder.stream_input``). A store's entries are
    read through its consumer group, archived under ``out/event-archive/`` and acknowledged
    only after the bundle is published; its earlier archives are read too, since the store
    keeps only what no build has published.

    Returns
    -------
    Path
        The published version directory (``out/<version>``), now named by ``out/CURRENT``.

    Raises
    ------
    index_builder.io.InputError
        An input file is malformed (names file, row and column). Nothing is published.
    ValueError
        The inputs are consistent but unusable (no event matches a catalog item, a bad setting).
    index_builder.stream_input.StreamInputError
        The event store is unreachable or holds no events of its prefix (nothing is published),
        or it failed while acknowledging a published bundle's entries (the next build does it).
    """
    t_start = time.perf_counter()
    # The ladder cuts the data where the reranker does, so each split is fitted once for both.
    # A sample of test users: every Rank of the ladder is a full request, and a few thousand
    # users measure NDCG@10 to about +-0.01, where all of a large shop's would dominate the build.
    ladder = (
        EvalConfig(
            cutoff_quantile=cfg.rerank_cutoff_quantile,
            holdout=cfg.rerank_holdout,
            max_users=cfg.ladder_max_users,
            build=cfg,
        )
        if cfg.ladder_report
        else None
    )
    ladder_protocols = [ladder.protocol(n) for n in ladder.protocols] if ladder is not None else []
    # Planned before the data is read: with the splits a re-buying shop adds (a step that does
    # not run is left out of the manifest).
    _, learn_steps = _plan(_rerank_protocols(cfg, rebought=1), ladder_protocols)
    steps = Steps(["read", *learn_steps, *(f"fit {s}" for s in FIT_STEPS), "ann eval", "write"], show_progress)
    sources = events if isinstance(events, list) else [events]
    streams = [StreamInput(s, out) for s in sources if isinstance(s, str) and is_store_url(s)]
    if len(streams) > 1:
        raise ValueError(f"--events names {len(streams)} event stores; a build reads at most one")
    try:
        with steps.step("read"):
            read = _event_sources(sources, streams)
            inp = read_inputs(read if isinstance(events, list) else read[0], items, users, cfg)
            if cfg.repeat_categories:
                # Settings that name the catalogue are checked against it before any fit, so
                # their error comes first and alone (not after a fallback's warning).
                check_repeat_categories(cfg, item_categories(inp.items)[2])
        scoring, ladder_results = _learn(inp, cfg, ladder, steps)
        served = fit(inp, cfg, steps, prefix="fit ", show_progress=show_progress)
        with steps.step("ann eval"):
            # The index may be rebuilt stronger here (index_builder.ann_tuning.tune_index): the bundle
            # ships the one tuned.
            served.index, retrieval, evaluation = _ann_evaluation(served, cfg)
        evaluation["ladder"] = (
            ladder_summary(ladder_results) if ladder_results is not None else {"skipped": "ladder_report = false"}
        )
        with steps.step("write"):
            trees = scoring.pop("_trees", None)
            phases = scoring.pop("_phases", None)
            if phases and ladder_results is not None:
                phases = _ladder_phase_veto(phases, ladder_results)
            arrays = {**served.arrays, **(tree_arrays(trees) if trees is not None else {})}
            check_arrays(arrays, SCHEMA_VERSION, "the bundle being built")
            with BundleWriter(out) as wr:
                for name, arr in arrays.items():
                    wr.add_array(name, arr)
                faiss.write_index(served.index, str(wr.path("index.faiss")))
                pq.write_table(inp.items, wr.path("items.parquet"))
                manifest = {
                    "created_at": _dt.datetime.now(_dt.UTC).isoformat(),
                    "config": cfg.to_dict(),
                    "inputs": inp.sources,
                    **served.sections,
                    "skipped": inp.skipped,
                    "scoring": scoring,
                    "retrieval": retrieval,
                    **({"phases": phases} if phases else {}),
                    "evaluation": evaluation,
                    "data_profile": data_profile(served.events, inp.items, cfg),
                }
                if streams:
                    manifest["event_store"] = streams[0].summary()
                # Every step but this one, which ends with the manifest written.
                manifest["steps"] = steps.to_manifest()
                manifest["build_seconds"] = round(time.perf_counter() - t_start, 3)
                path = wr.publish(manifest)
        # Only now: a crash before this line leaves the entries pending for the next build.
        for stream in streams:
            stream.commit()
    finally:
        steps.close()
        for stream in streams:
            stream.close()
    log.info(
        "built %s in %.1f s: %s",
        path,
        time.perf_counter() - t_start,
        ", ".join(f"{s['name']} {s['seconds']:.1f} s" for s in steps.to_manifest()),
    )
    return path


def _event_sources(sources: list[Path | str], streams: list[StreamInput]) -> list[Path | EventRecords]:
    """The sources ``read_inputs`` reads: a store URL replaced by its consumed history. A store
    with no event yet (a new deployment) is left out when other sources hold the history."""
    out: list[Path | EventRecords] = []
    for s in sources:
        if isinstance(s, str) and is_store_url(s):
            stream = streams[0].consume()
            if stream.has_events() or len(sources) == 1:
                out.append(stream)
            else:
                log.info("event store %s holds no events yet; building from the other sources", stream)
        else:
            out.append(Path(s))
    return out


def _ann_evaluation(served: Fitted, cfg: BuildConfig) -> tuple[faiss.Index, dict, dict]:
    """The index the bundle ships, the effort and refine factor it asks for, and the recall figures,
    on a sample of users with history.

    Returns
    -------
    (index, retrieval, evaluation)
        The index to publish (``served.index``, or a stronger HNSW graph rebuilt over the same
        factors), the manifest's ``retrieval`` section (``index_builder.ann_tuning.tune_index``:
        the index and the pair of effort and refine factor at which the served path reaches
        ``ann_target_recall`` at the lowest measured cost, and the figures of every index and
        pair tried), and the ``evaluation`` figures at that effort: the ANN index's own recall
        and the share of users the exact head proves.
    """
    uf, itf = served.arrays["user_factors"], served.arrays["item_factors"]
    with_hist = np.flatnonzero(served.arrays["user_has_history"])
    rng = np.random.default_rng(cfg.random_seed)
    sample = rng.choice(with_hist, size=min(cfg.eval_users, len(with_hist)), replace=False)
    k = min(cfg.eval_candidates, len(itf))
    queries = np.ascontiguousarray(uf[sample], dtype=np.float32)
    index = served.index
    if len(sample) == 0 or k == 0:
        retrieval: dict = {
            "ann_effort": DEFAULT_ANN_EFFORT,
            "reached": False,
            "warning": "no user to measure recall on",
        }
    else:
        # The server's exact_head_items (its default unless the build says otherwise): the path it runs.
        index, retrieval = tune_index(served.index, served.index_seconds, itf, queries, k, cfg)
    effort = int(retrieval["ann_effort"])
    evaluation: dict = {
        f"ann_recall_at_{k}": ann_recall(index, itf, queries, k, effort),
        "ann_effort": effort,
        "ann_eval_users": len(sample),
        # The share of those users the head proves exact (the rest go to the index).
        "exact_head_items": cfg.eval_exact_head_items,
        "exact_head_share": (
            exact_head_share(itf, queries, k, cfg.eval_exact_head_items) if cfg.eval_exact_head_items else 0.0
        ),
    }
    if cfg.eval_exact_head_items and len(sample) and k:
        # The head's first tier for this bundle (ranking.retrieval.search.choose_first_tier):
        # the server splits a head of this size there.
        tier, shares = choose_first_tier(itf, queries, k, cfg.eval_exact_head_items)
        evaluation["exact_head_first_tier"] = tier
        evaluation["exact_head_first_tier_shares"] = {str(m): share for m, share in shares.items()}
    if "served_recall" in retrieval:
        evaluation[f"served_recall_at_{k}"] = retrieval["served_recall"]
        evaluation["ann_refine"] = retrieval["ann_refine"]
    return index, retrieval, evaluation


def evaluate(
    events: Path, items: Path, users: Path | None, out: Path, ecfg: EvalConfig, show_progress: bool = False
) -> dict:
    """Run every protocol and write the ladder report (Markdown, PNG plots, JSON) under ``out``.

    Returns
    -------
    dict
        The figures written to ``out/ladder.json``.

    Raises
    ------
    index_builder.io.InputError
        An input file is malformed.
    """
    from index_builder.report import write_report

    results = run_all(events, items, users, ecfg, show_progress)
    write_report(results, out)
    return results


def run_all(events: Path, items: Path, users: Path | None, ecfg: EvalConfig, show_progress: bool = False) -> dict:
    """Every protocol's figures (no files written); an unrunnable protocol carries an ``error`` message.

    Raises
    ------
    index_builder.io.InputError
        An input file is malformed.
    """
    _, learn_steps = _plan(_rerank_protocols(ecfg.build, rebought=1), [ecfg.protocol(n) for n in ecfg.protocols])
    steps = Steps(["read", *learn_steps], show_progress, desc="evaluate")
    try:
        with steps.step("read"):
            inp = read_inputs(events, items, users, ecfg.build)
        _, results = _learn(inp, ecfg.build, ecfg, steps)
    finally:
        steps.close()
    assert results is not None
    return {
        "inputs": inp.sources,
        "profile": data_profile(inp.events, inp.items, ecfg.build),
        **results,
        "steps": steps.to_manifest(),
    }
