"""one2one ranking core: the library the server and the builder import, one name at a time.

Its layers, each a subpackage importing only from those listed before it (and every
layer from :mod:`ranking.errors`, the domain errors the server maps to gRPC status):

- ``bundle``    the bundle format on disk and the loaded model: arrays, id maps, index
- ``kernels``   the compiled scoring and row-walk kernels and their public wrappers
- ``retrieval`` the exact head, the ANN search and the micro-batcher in front of it
- ``realtime``  events, the durable event log, per-user state and its fold-in
- ``policy``    context rules and experiments from configuration
- ``pipeline``  one Rank: query, budget, features, overlay, the serving model, the ranker

``server/``, ``index_builder/`` and ``bench/`` import the names below from ``ranking``
(tests/test_imports.py checks it). Each is imported from its module on first use: a
process pays only for the layers it touches (the supervisor forks the server's workers,
the builder's CLI starts for one command), and ``import ranking`` costs nothing.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# The module that defines each public name; the TYPE_CHECKING block below lists the same
# names for type checkers and readers (tests/test_imports.py checks the two agree).
_MODULES: dict[str, tuple[str, ...]] = {
    "ranking.errors": (
        "BundleError",
        "FieldViolation",
        "InvalidRequest",
        "RankingError",
        "Unavailable",
    ),
    "ranking.bundle.schema": ("SCHEMA_VERSION", "ArraySpec", "check_arrays"),
    "ranking.bundle.store": (
        "CURRENT",
        "MANIFEST",
        "Bundle",
        "BundleWriter",
        "MemoryBundle",
        "resolve_current",
        "set_current",
    ),
    "ranking.bundle.model": ("Csr", "RankingModel"),
    "ranking.bundle.segments": ("SegmentScheme",),
    "ranking.kernels.scoring": (
        "TopK",
        "TreeArrays",
        "TreePhases",
        "linear_contributions",
        "score_topk",
        "score_trees_phased_topk",
        "score_trees_topk",
        "topk",
        "tree_contributions",
    ),
    "ranking.kernels.reranker": ("concat_trees", "tree_arrays", "trees_from_lightgbm"),
    "ranking.retrieval.search": ("ExactHead", "Retriever", "ann_search", "choose_first_tier"),
    "ranking.realtime.events": ("Event", "EventLimits", "Rejection", "validate_batch"),
    "ranking.realtime.eventlog": (
        "FSYNC_POLICIES",
        "EventLog",
        "EventLogCorrupt",
        "EventLogError",
        "LogTailer",
        "log_dirs",
        "open_writer",
        "read_all",
    ),
    "ranking.realtime.redis_layout": (
        "BUILDER_CONSUMER",
        "BUILDER_GROUP",
        "RECORD_FIELD",
        "RedisLayout",
        "is_store_url",
        "parse_entry_id",
        "redacted",
        "split_store_url",
    ),
    "ranking.realtime.redis_store": ("EventStoreError", "RedisEventStore", "StreamOffset"),
    "ranking.realtime.store": ("EventStore", "LocalEventStore"),
    "ranking.realtime.user_state": ("HeldEvents", "UserStateStore", "item_gram"),
    "ranking.policy.experiments": (
        "NO_EXPERIMENT",
        "VARIANTS",
        "Assignment",
        "Experiment",
        "Experiments",
        "bucket",
        "parse_experiments",
    ),
    "ranking.policy.rules": ("Rule", "RuleSet", "parse_rules"),
    "ranking.pipeline.budget": ("LATE_ALLOWANCE_MS", "Budget", "CostModel", "effective_budget_ms"),
    "ranking.pipeline.query": ("RankQuery",),
    "ranking.config": (
        "DEFAULT_ANN_EFFORT",
        "DEFAULT_EXACT_HEAD_ITEMS",
        "ID_NUL",
        "EventLogSettings",
        "OverlaySettings",
        "QueryLimits",
        "RankerConfig",
        "UserStateSettings",
        "bundle_ann_effort",
        "effective_ann_effort",
        "bundle_ann_refine",
        "effective_ann_refine",
        "effective_second_phase",
        "marked_table",
        "replace_marked_table",
        "settings_main",
        "settings_table",
    ),
    "ranking.pipeline.features": ("CONTEXT_FIELDS", "FEATURE_NAMES", "N_FEATURES"),
    "ranking.pipeline.overlay": ("RankOverlay", "build_overlay"),
    "ranking.pipeline.serving": ("ServingModel",),
    "ranking.pipeline.ranker": ("FEATURES", "RankResult", "Ranker", "Rung"),
}
_EXPORTS = {name: module for module, names in _MODULES.items() for name in names}
__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from ranking.bundle.model import Csr, RankingModel
    from ranking.bundle.schema import SCHEMA_VERSION, ArraySpec, check_arrays
    from ranking.bundle.segments import SegmentScheme
    from ranking.bundle.store import CURRENT, MANIFEST, Bundle, BundleWriter, MemoryBundle, resolve_current, set_current
    from ranking.config import (
        DEFAULT_ANN_EFFORT,
        DEFAULT_EXACT_HEAD_ITEMS,
        ID_NUL,
        EventLogSettings,
        OverlaySettings,
        QueryLimits,
        RankerConfig,
        UserStateSettings,
        bundle_ann_effort,
        bundle_ann_refine,
        effective_ann_effort,
        effective_ann_refine,
        effective_second_phase,
        marked_table,
        replace_marked_table,
        settings_main,
        settings_table,
    )
    from ranking.errors import (
        BundleError,
        FieldViolation,
        InvalidRequest,
        RankingError,
        Unavailable,
    )
    from ranking.kernels.reranker import concat_trees, tree_arrays, trees_from_lightgbm
    from ranking.kernels.scoring import (
        TopK,
        TreeArrays,
        TreePhases,
        linear_contributions,
        score_topk,
        score_trees_phased_topk,
        score_trees_topk,
        topk,
        tree_contributions,
    )
    from ranking.pipeline.budget import LATE_ALLOWANCE_MS, Budget, CostModel, effective_budget_ms
    from ranking.pipeline.features import CONTEXT_FIELDS, FEATURE_NAMES, N_FEATURES
    from ranking.pipeline.overlay import RankOverlay, build_overlay
    from ranking.pipeline.query import RankQuery
    from ranking.pipeline.ranker import FEATURES, Ranker, RankResult, Rung
    from ranking.pipeline.serving import ServingModel
    from ranking.policy.experiments import (
        NO_EXPERIMENT,
        VARIANTS,
        Assignment,
        Experiment,
        Experiments,
        bucket,
        parse_experiments,
    )
    from ranking.policy.rules import Rule, RuleSet, parse_rules
    from ranking.realtime.eventlog import (
        FSYNC_POLICIES,
        EventLog,
        EventLogCorrupt,
        EventLogError,
        LogTailer,
        log_dirs,
        open_writer,
        read_all,
    )
    from ranking.realtime.events import Event, EventLimits, Rejection, validate_batch
    from ranking.realtime.redis_layout import (
        BUILDER_CONSUMER,
        BUILDER_GROUP,
        RECORD_FIELD,
        RedisLayout,
        is_store_url,
        parse_entry_id,
        redacted,
        split_store_url,
    )
    from ranking.realtime.redis_store import EventStoreError, RedisEventStore, StreamOffset
    from ranking.realtime.store import EventStore, LocalEventStore
    from ranking.realtime.user_state import HeldEvents, UserStateStore, item_gram
    from ranking.retrieval.search import ExactHead, Retriever, ann_search, choose_first_tier


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'ranking' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
