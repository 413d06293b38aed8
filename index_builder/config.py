"""The builder's one typed configuration: every default written down once, overridable from TOML."""
from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class BuildConfig:
    """Settings of one offline build (``--config FILE`` overrides any of them).

    Event weights: a row's weight is ``event_weights[event_type]``; for a type named in
    ``value_event_types`` (ratings) the weight is multiplied by ``value / value_scale``.
    Types not listed weigh ``default_event_weight``. A negative weight (skips) pushes
    the item down for that user.
    """

    event_weights: dict[str, float] = field(default_factory=lambda: {
        "view": 1.0, "click": 2.0, "add_to_cart": 4.0, "purchase": 8.0, "rating": 6.0, "skip": -1.0,
        "dislike": -1.0,
    })
    value_event_types: list[str] = field(default_factory=lambda: ["rating"])
    value_scale: float = 5.0
    default_event_weight: float = 1.0
    consumed_event_types: list[str] = field(default_factory=lambda: ["purchase", "rating"])
    half_life_days: float = 120.0
    recent_days: float = 30.0

    factors: int = 64
    iterations: int = 15
    regularization: float = 0.05
    alpha: float = 2.0
    random_seed: int = 42

    index_type: str = "HNSW32,Flat"
    hnsw_ef_construction: int = 80

    segment_columns: list[str] = field(default_factory=list)
    numeric_band_width: float = 10.0
    max_segment_columns: int = 2
    max_segment_cardinality: int = 30
    min_segment_users: int = 5
    segment_top_items: int = 500
    popular_top_items: int = 1000

    on_bad_row: str = "error"
    max_bad_fraction: float = 0.01

    scoring_weights: dict[str, float] = field(default_factory=lambda: {
        "retrieval": 1.0, "popularity": 0.25, "recent_popularity": 0.1, "segment_popularity": 0.5,
    })

    # Reranker features (ranking.features) and the learned reranker (index_builder.rerank_train).
    lifecycle_new_events: int = 10
    lifecycle_established_events: int = 50
    lifecycle_established_days: float = 90.0
    recent_items_per_user: int = 20
    covis_neighbours: int = 50
    covis_shrink: float = 10.0
    ease_max_items: int = 5000
    ease_lambda: float = 300.0
    # Events' channel/device/region: values kept per field (the most frequent; the rest are "other"),
    # and a switch that builds no context tables (their features are then NaN), to measure what they add.
    context_vocabulary: int = 16
    context_features: bool = True
    rerank: bool = True
    rerank_split: str = "both"
    rerank_holdout: int = 10
    rerank_temporal_share: float = 0.5
    rerank_cutoff_quantile: float = 0.8
    rerank_session_share: float = 0.4
    rerank_cold_share: float = 0.15
    rerank_min_groups: int = 20
    rerank_max_queries: int = 20_000
    rerank_trees: int = 300
    rerank_leaves: int = 31
    rerank_learning_rate: float = 0.05
    rerank_min_data_in_leaf: int = 50
    rerank_valid_share: float = 0.2
    rerank_bags: int = 5
    rerank_early_stopping: int = 50

    # Run the ladder evaluation (both protocols, every rung) and put its NDCG@10 in the manifest.
    ladder_report: bool = True

    eval_users: int = 2000
    eval_candidates: int = 200

    @classmethod
    def load(cls, path: Path | str | None = None, overrides: dict[str, Any] | None = None) -> "BuildConfig":
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
            raise ValueError(f"unknown build setting(s){where}: {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        cfg = cls()
        for k, v in values.items():
            default = getattr(cfg, k)
            if isinstance(default, float) and isinstance(v, int) and not isinstance(v, bool):
                v = float(v)
            if type(default) is not type(v):
                raise ValueError(f"build setting {k!r}{' in ' + str(path) if path else ''} must be "
                                 f"{type(default).__name__}, got {type(v).__name__} {v!r}")
            setattr(cfg, k, v)
        cfg.validate()
        return cfg

    def validate(self) -> None:
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
        if self.rerank_split not in ("temporal", "last_n", "both"):
            raise ValueError(f"rerank_split must be 'temporal', 'last_n' or 'both', got {self.rerank_split!r}")
        if self.rerank_trees < 1 or self.rerank_leaves < 2:
            raise ValueError("rerank_trees must be >= 1 and rerank_leaves >= 2")
        if not 1 <= self.context_vocabulary <= 255:
            raise ValueError(f"context_vocabulary must be in [1, 255], got {self.context_vocabulary}")
        if self.on_bad_row not in ("error", "skip"):
            raise ValueError(f"on_bad_row must be 'error' or 'skip', got {self.on_bad_row!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
