"""The builder's one typed configuration: every default written down once, overridable from TOML."""

from __future__ import annotations

import dataclasses
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ranking import RankerConfig, settings_main, settings_table

# The longest ladder of HNSW rebuilds a build may climb (``ann_max_index_rebuilds``).
MAX_INDEX_REBUILDS = 6


def _setting(default: Any, help: str) -> Any:
    """A field with its default and the one line the docs table shows."""
    return field(default=default, metadata={"help": help})


@dataclass
class BuildConfig:
    """Settings of one offline build (``--config FILE`` overrides any of them).

    Event weights: a row's weight is ``event_weights[event_type]``; for a type named in
    ``value_event_types`` (ratings) the weight is multiplied by ``value / value_scale``.
    Types not listed weigh ``default_event_weight``. A negative weight (skips) pushes
    the item down for that user.
    """

    event_weights: dict[str, float] = field(
        default_factory=lambda: {
            "view": 1.0,
            "click": 2.0,
            "add_to_cart": 4.0,
            "purchase": 8.0,
            "rating": 6.0,
            "skip": -1.0,
            "dislike": -1.0,
        },
        metadata={
            "help": "weight of an event by its type (view < click < add_to_cart < purchase; a negative "
            "weight pushes the item down for that user)"
        },
    )
    value_event_types: list[str] = field(
        default_factory=lambda: ["rating"],
        metadata={"help": "event types whose weight is multiplied by `value / value_scale` (ratings)"},
    )
    value_scale: float = _setting(5.0, "divides the `value` of a `value_event_types` event")
    default_event_weight: float = _setting(1.0, "weight of an event type `event_weights` does not list")
    consumed_event_types: list[str] = field(
        default_factory=lambda: ["purchase", "rating"],
        metadata={
            "help": "event types that are purchases: the item is then excluded for that user, or offered "
            "again when due, as `repeat_policy` says"
        },
    )
    repeat_policy: str = _setting(
        "learned",
        "what a purchase does to an item: `learned` (per item from its buyers' repeat rate: a durable "
        "stays excluded, a staple is offered again when due), `never` (always excluded) or `always`",
    )
    repeat_categories: dict[str, str] = field(
        default_factory=dict,
        metadata={"help": 'per-category override of `repeat_policy`: `{"Dairy" = "always", "TV" = "never"}`'},
    )
    repeat_min_rate: float = _setting(
        0.05,
        "with the learned policy, an item is offered again after purchase when at least this share of "
        "its buyers (shrunk, below) bought it in another basket",
    )
    repeat_shrink: float = _setting(
        20.0,
        "buyers' worth of prior pulling an item's repeat rate and interval towards its category's "
        "(and a category's towards the shop's)",
    )
    half_life_days: float = _setting(
        120.0, "time decay: an event's weight halves every this many days before the data's end"
    )
    recent_days: float = _setting(30.0, "window of the recent-popularity list and feature")

    factors: int = _setting(64, "ALS embedding dimensions")
    iterations: int = _setting(15, "ALS iterations")
    regularization: float = _setting(0.05, "ALS L2 regularization")
    alpha: float = _setting(2.0, "ALS confidence scale: confidence = 1 + alpha x weight")
    random_seed: int = _setting(42, "seed of every random step (same data and seed: the same bundle)")

    index_type: str = _setting(
        "HNSW32,Flat",
        "FAISS index factory string of the inner-product item index; for an HNSW index (`HNSW<M>,...`) the "
        "builder may publish a stronger graph (see `ann_max_index_rebuilds`), recorded in the manifest's "
        "`retrieval.index`",
    )
    hnsw_ef_construction: int = _setting(
        80, "HNSW efConstruction (build-time search effort) of the first index built; >= 1"
    )

    segment_columns: list[str] = field(
        default_factory=list,
        metadata={"help": "users-file columns that define segments; empty: chosen automatically (below)"},
    )
    numeric_band_width: float = _setting(10.0, "width of the bands a numeric user column is cut into (age: decades)")
    max_segment_columns: int = _setting(2, "columns chosen automatically when `segment_columns` is empty")
    max_segment_cardinality: int = _setting(30, "a column qualifies automatically with 2 to this many values")
    min_segment_users: int = _setting(5, "segments with fewer users are dropped")
    segment_top_items: int = _setting(500, "items kept in each segment's popularity list")
    popular_top_items: int = _setting(1000, "items kept in the popular and recent-popular lists")

    on_bad_row: str = _setting(
        "error", "`error`: a malformed row stops the build; `skip`: dropped and counted (up to `max_bad_fraction`)"
    )
    max_bad_fraction: float = _setting(0.01, 'with `on_bad_row = "skip"`, the build stops above this share of bad rows')

    scoring_weights: dict[str, float] = field(
        default_factory=lambda: {
            "retrieval": 1.0,
            "popularity": 0.25,
            "recent_popularity": 0.1,
            "segment_popularity": 0.5,
        },
        metadata={"help": "weights of the linear fallback scorer, used when no reranker is trained"},
    )

    # Reranker features (ranking.pipeline.features) and the learned reranker (index_builder.rerank_train).
    lifecycle_new_events: int = _setting(
        10, "a user with fewer events (and a shorter tenure than `lifecycle_established_days`) is new (`user_stage` 0)"
    )
    lifecycle_established_events: int = _setting(
        50, "a user with at least this many events is established (`user_stage` 2)"
    )
    lifecycle_established_days: float = _setting(90.0, "a user with at least this tenure is established")
    recent_items_per_user: int = _setting(20, "a user's latest items kept for the item-to-item features and candidates")
    covis_neighbours: int = _setting(50, "item-to-item neighbours kept per item")
    covis_shrink: float = _setting(10.0, "shrinkage of the item-to-item cosine (damps pairs seen together rarely)")
    ease_max_items: int = _setting(5000, "EASE weights are built only for catalogs up to this size")
    ease_lambda: float = _setting(300.0, "EASE L2 regularization")
    # Events' channel/device/region: values kept per field (the most frequent; the rest are "other"),
    # and a switch that builds no context tables (their features are then NaN), to measure what they add.
    context_vocabulary: int = _setting(
        16,
        "values of each context field (channel, device, region) with their "
        "own column, the most frequent among positive events; the rest "
        'share "other"',
    )
    context_features: bool = _setting(
        True, "build the context tables (false: their features are NaN, to measure what context adds)"
    )
    rerank: bool = _setting(True, "train the learned reranker (false: the linear fallback scorer)")
    rerank_split: str = _setting(
        "both",
        "training splits: `temporal`, `last_n`, `last_basket` or `both` (temporal and last_n, and "
        "last_basket on a shop whose customers buy items again)",
    )
    rerank_holdout: int = _setting(10, "positives held out per user by the `last_n` split")
    rerank_temporal_share: float = _setting(0.5, "weight of the temporal split's queries in training")
    rerank_cutoff_quantile: float = _setting(0.8, "timestamp quantile where the temporal split cuts")
    rerank_session_share: float = _setting(
        0.4, "share of training queries that replay the first later items as a session"
    )
    rerank_cold_share: float = _setting(
        0.15, "share of training queries asked as a cold visitor known only by segment attributes"
    )
    rerank_min_groups: int = _setting(
        20,
        "fewer training queries with a positive among their candidates: "
        "no reranker (the linear fallback, with the reason)",
    )
    rerank_max_queries: int = _setting(20_000, "training queries per split at most (a random sample of users beyond)")
    rerank_trees: int = _setting(300, "LightGBM boosting rounds at most (early stopping picks fewer)")
    rerank_leaves: int = _setting(31, "LightGBM `num_leaves`")
    rerank_learning_rate: float = _setting(0.05, "LightGBM learning rate")
    rerank_min_data_in_leaf: int = _setting(50, "LightGBM `min_data_in_leaf`")
    rerank_valid_share: float = _setting(0.2, "share of users held out for early stopping in each bag")
    rerank_bags: int = _setting(5, "models averaged, each early-stopped on a different fold of users")
    rerank_early_stopping: int = _setting(50, "rounds without improvement that stop a model")
    # The serving budget of the reranker (index_builder.rerank_cost); the reason for the default
    # is in docs/builder.md, "The reranker's serving cost".
    rerank_max_tree_nodes_per_candidate: int = _setting(
        2500,
        "ceiling on the tree nodes the exported ensemble walks per candidate (every bag's trees, "
        "mean depth measured on the training rows); above it each bag is cut to fewer trees, "
        "in proportion. 0: no ceiling",
    )
    # Phased scoring (index_builder.rerank_phases, docs/builder.md "Phased scoring").
    # 100: MovieLens-100K loses NDCG@10 beyond noise at 50 and not at 100 (bench/README.md,
    # "Phased scoring").
    rerank_second_phase_candidates: int = _setting(
        100,
        "candidates the full reranker scores after a first phase (a prefix of every bag) ranked them all; "
        "the build records it (0 when the phases lose NDCG@10 beyond noise) and the server uses it unless "
        "configured otherwise. 0: one phase",
    )
    rerank_phase_recall: float = _setting(
        0.99,
        "share of the full model's top 10 the first phase must keep in its top `rerank_second_phase_candidates` "
        "on the held-out rows; the shortest prefix reaching it is the first phase",
    )

    # Run the ladder evaluation (both protocols, every rung) and put its NDCG@10 in the manifest.
    ladder_report: bool = _setting(True, "run the ladder evaluation and put its NDCG@10 in the manifest")
    ladder_max_users: int = _setting(
        5000,
        "test users the build's ladder measures per protocol (a random sample when more; 0 = all); "
        "`python -m index_builder evaluate` measures all unless `--max-users`",
    )

    eval_users: int = _setting(2000, "users sampled to measure ANN recall and the exact head's share")
    # Recall is measured at the number of candidates the server retrieves.
    eval_candidates: int = _setting(
        RankerConfig.n_candidates, "candidates the ANN recall is measured at (the pipeline's `n_candidates`)"
    )

    eval_exact_head_items: int = _setting(
        RankerConfig.exact_head_items,
        "the exact head the served path's recall is measured with (the server's `exact_head_items`; 0: ANN only)",
    )
    # The search effort the bundle asks the server for (ranking.config.effective_ann_effort).
    ann_target_recall: float = _setting(
        0.95,
        "recall of the exact top `eval_candidates` the served path (exact head, then ANN index) must reach; "
        "the builder tries efforts 16, 32, ... `ann_max_effort` with each of `ann_refine_factors` and records "
        "the cheapest pair that reaches it as the bundle's `ann_effort` and `ann_refine`",
    )
    ann_max_effort: int = _setting(
        1024,
        "highest search effort tried; when no pair of effort and refine factor reaches `ann_target_recall` "
        "an HNSW index is rebuilt stronger (`ann_max_index_rebuilds`), and when no index tried reaches it the "
        "bundle gets the pair of highest recall and a warning",
    )
    ann_refine_factors: list[float] = field(
        default_factory=lambda: [1.0, 2.0, 4.0],
        metadata={
            "help": "refine factors tried with each effort (each >= 1): the ANN index is asked for "
            "`eval_candidates` x this many items, re-ranked by the exact inner product with the item factors "
            "(recovers what a quantised index such as SQ8 misorders; 1: none). The bundle records the pair "
            "reaching `ann_target_recall` at the lowest measured time per query as `ann_effort` and `ann_refine`"
        },
    )
    # The index's own settings (index_builder.ann_tuning.tune_index, docs/builder.md "The index
    # tuned too"). 1000 us: a fiftieth of the server's default 50 ms budget and a tenth of the
    # bench's 10 ms budgeted run; a search costing more leaves the reranker less of a tight budget.
    ann_max_search_us: float = _setting(
        1000.0,
        "ceiling on the served path's measured search time per query (microseconds): when the chosen pair of "
        "effort and refine factor costs more, or none reaches `ann_target_recall`, the builder rebuilds an HNSW "
        "index with stronger settings (`ann_max_index_rebuilds`). 0: no ceiling (rebuild only when the target "
        "is missed)",
    )
    ann_max_index_rebuilds: int = _setting(
        2,
        "times at most an HNSW index is rebuilt when it misses `ann_target_recall` or `ann_max_search_us`, each "
        "rebuild stronger than the last: efConstruction doubled, then M doubled (`HNSW32,SQ8` -> `HNSW64,SQ8`), "
        "alternately; the effort and refine factor are tuned on each and the bundle gets the index reaching "
        "the target at the lowest measured search time (0..6; 0: the configured index only; other index "
        "types are never rebuilt)",
    )

    @classmethod
    def load(cls, path: Path | str | None = None, overrides: dict[str, Any] | None = None) -> BuildConfig:
        """Defaults, then the TOML file's ``[build]`` table (or top level), then ``overrides``.

        Raises
        ------
        ValueError
            An unknown key or a value of the wrong type, naming the key and the file.
        """
        values: dict[str, Any] = {}
        if path is not None:
            with open(path, "rb") as fh:
                doc = tomllib.load(fh)
            values.update(doc.get("build", doc))
        values.update(overrides or {})
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            where = f" in {path}" if path else ""
            raise ValueError(
                f"unknown build setting(s){where}: {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        cfg = cls()
        for k, v in values.items():
            default = getattr(cfg, k)
            if isinstance(default, float) and isinstance(v, int) and not isinstance(v, bool):
                v = float(v)
            if type(default) is not type(v):
                raise ValueError(
                    f"build setting {k!r}{' in ' + str(path) if path else ''} must be "
                    f"{type(default).__name__}, got {type(v).__name__} {v!r}"
                )
            setattr(cfg, k, v)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        if not 0.0 < self.ann_target_recall <= 1.0:
            raise ValueError(f"ann_target_recall must be in (0, 1], got {self.ann_target_recall}")
        if self.eval_exact_head_items < 0:
            raise ValueError(f"eval_exact_head_items must be >= 0 (0: ANN only), got {self.eval_exact_head_items}")
        if self.ann_max_effort < 1:
            raise ValueError(f"ann_max_effort must be >= 1, got {self.ann_max_effort}")
        if not self.ann_max_search_us >= 0:  # also NaN
            raise ValueError(
                f"ann_max_search_us must be >= 0 microseconds (0: no ceiling), got {self.ann_max_search_us}"
            )
        # Each rebuild doubles efConstruction or M: six end at 8 x each (HNSW32 -> HNSW256), where an
        # item's links on the base layer (2 M int32) take 2 KB, eight times its 64-d float32 factors.
        if not 0 <= self.ann_max_index_rebuilds <= MAX_INDEX_REBUILDS:
            raise ValueError(
                f"ann_max_index_rebuilds must be in 0..{MAX_INDEX_REBUILDS} (0: the configured index only), "
                f"got {self.ann_max_index_rebuilds}"
            )
        if self.hnsw_ef_construction < 1:
            raise ValueError(f"hnsw_ef_construction must be >= 1, got {self.hnsw_ef_construction}")
        bad_refine = [
            r for r in self.ann_refine_factors if isinstance(r, bool) or not isinstance(r, (int, float)) or not r >= 1
        ]
        if not self.ann_refine_factors or bad_refine:
            raise ValueError(
                f"ann_refine_factors must be a non-empty list of numbers >= 1 (1: no re-ranking), "
                f"got {self.ann_refine_factors!r}"
            )
        if self.rerank_max_tree_nodes_per_candidate < 0:
            raise ValueError(
                f"rerank_max_tree_nodes_per_candidate must be >= 0 (0: no ceiling), "
                f"got {self.rerank_max_tree_nodes_per_candidate}"
            )
        if self.rerank_second_phase_candidates < 0:
            raise ValueError(
                f"rerank_second_phase_candidates must be >= 0 (0: one phase), got {self.rerank_second_phase_candidates}"
            )
        if not 0.0 < self.rerank_phase_recall <= 1.0:
            raise ValueError(f"rerank_phase_recall must be in (0, 1], got {self.rerank_phase_recall}")
        if self.ladder_max_users < 0:
            raise ValueError(f"ladder_max_users must be >= 0 (0 = every test user), got {self.ladder_max_users}")
        if self.factors < 1 or self.iterations < 1:
            raise ValueError("factors and iterations must be >= 1")
        if self.half_life_days <= 0 or self.recent_days <= 0:
            raise ValueError("half_life_days and recent_days must be > 0")
        if not 0.0 < self.rerank_cutoff_quantile < 1.0:
            raise ValueError(f"rerank_cutoff_quantile must be in (0, 1), got {self.rerank_cutoff_quantile}")
        if not 0.0 <= self.rerank_session_share <= 1.0 or not 0.0 < self.rerank_valid_share < 1.0:
            raise ValueError("rerank_session_share must be in [0, 1] and rerank_valid_share in (0, 1)")
        if not 0.0 < self.rerank_temporal_share < 1.0:
            raise ValueError(f"rerank_temporal_share must be in (0, 1), got {self.rerank_temporal_share}")
        if self.rerank_split not in ("temporal", "last_n", "last_basket", "both"):
            raise ValueError(
                f"rerank_split must be 'temporal', 'last_n', 'last_basket' or 'both', got {self.rerank_split!r}"
            )
        if self.rerank_trees < 1 or self.rerank_leaves < 2:
            raise ValueError("rerank_trees must be >= 1 and rerank_leaves >= 2")
        if not 1 <= self.context_vocabulary <= 255:
            raise ValueError(f"context_vocabulary must be in [1, 255], got {self.context_vocabulary}")
        if self.repeat_policy not in ("learned", "never", "always"):
            raise ValueError(f"repeat_policy must be 'learned', 'never' or 'always', got {self.repeat_policy!r}")
        bad = {k: v for k, v in self.repeat_categories.items() if v not in ("never", "always")}
        if bad:
            raise ValueError(f"repeat_categories values must be 'never' or 'always', got {bad}")
        if not 0.0 <= self.repeat_min_rate <= 1.0 or self.repeat_shrink < 0:
            raise ValueError("repeat_min_rate must be in [0, 1] and repeat_shrink >= 0")
        if self.on_bad_row not in ("error", "skip"):
            raise ValueError(f"on_bad_row must be 'error' or 'skip', got {self.on_bad_row!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def config_table_markdown() -> str:
    """The settings table of docs/builder.md, generated from the fields' help (``make docs``)."""
    return settings_table(BuildConfig)


def main(argv: list[str] | None = None) -> int:
    """``python -m index_builder.config --markdown [FILE]``: print the settings table, or rewrite it in FILE."""
    return settings_main(BuildConfig, "index_builder.config", sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
