"""The bundle's arrays, declared once: name, dtype, shape and the schema version that added each.

The writer checks a bundle against this declaration before it publishes, and the reader
checks it again before serving, so the bundle is a contract like the proto: an array
nobody declared, a missing one, a wrong dtype or a shape that disagrees with its
neighbours is refused by name.

Shapes are written with dimension symbols. ``"items"`` and ``"users"`` are the id
tables' lengths; ``"items+1"`` is a CSR indptr over them; any other name (``"factors"``,
``"nnz_covis"``) is bound by the first array that uses it and must agree everywhere
else; ``"*"`` is free.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol

from ranking.errors import BundleError

SCHEMA_VERSION = 2  # 2: the re-purchase tables (index_builder.repeat)

# The request Context fields the builder keeps offline history of (ranking.pipeline.features uses them).
CONTEXT_FIELDS = ("channel", "device", "region")
# Item popularity windows, in days, counted at the data end.
WINDOW_DAYS = (7, 30)
# The tree ensemble's flat arrays (ranking.kernels.scoring.TREE_ARRAYS) are stored as ``rerank_<name>``.


@dataclass(frozen=True)
class ArraySpec:
    """One declared array of the bundle.

    ``dtype`` is a NumPy dtype name, or ``"str"`` for a fixed-width unicode array of any
    width. ``group`` names arrays present all together or not at all (the reranker's
    trees exist only when one was trained).
    """

    name: str
    dtype: str
    shape: tuple[str | int, ...]
    since: int = 1
    group: str = ""


def _csr(prefix: str, rows: str, nnz: str, data: Iterable[tuple[str, str]]) -> list[ArraySpec]:
    """A CSR structure: an int64 indptr over ``rows`` and its data arrays of one length."""
    return [ArraySpec(f"{prefix}indptr", "int64", (f"{rows}+1",))] + [
        ArraySpec(name, dtype, (nnz,)) for name, dtype in data
    ]


ARRAYS: tuple[ArraySpec, ...] = tuple(
    [
        # Id tables and their sort orders (binary search of an id).
        ArraySpec("item_ids", "str", ("items",)),
        ArraySpec("item_order", "int32", ("items",)),
        ArraySpec("user_ids", "str", ("users",)),
        ArraySpec("user_order", "int32", ("users",)),
        # Embeddings and what real-time fold-in needs of them.
        ArraySpec("item_factors", "float32", ("items", "factors")),
        ArraySpec("user_factors", "float32", ("users", "factors")),
        ArraySpec("item_gram", "float64", ("factors", "factors")),
        ArraySpec("item_inv_norms", "float32", ("items",)),
        # Popularity, segments and catalogue tables.
        ArraySpec("user_has_history", "uint8", ("users",)),
        ArraySpec("user_segment", "int32", ("users",)),
        ArraySpec("item_popularity", "float32", ("items",)),
        ArraySpec("item_recent_popularity", "float32", ("items",)),
        ArraySpec("item_price", "float32", ("items",)),
        ArraySpec("category_names", "str", ("categories",)),
        ArraySpec("popular_items", "int32", ("n_popular",)),
        ArraySpec("recent_popular_items", "int32", ("n_recent_popular",)),
        ArraySpec("segment_keys", "str", ("segments",)),
        *_csr("item_cat_", "items", "nnz_item_cat", [("item_cat_ids", "int32")]),
        *_csr("consumed_", "users", "nnz_consumed", [("consumed_indices", "int32")]),
        *_csr(
            "segment_pop_",
            "segments",
            "nnz_segment_pop",
            [("segment_pop_items", "int32"), ("segment_pop_scores", "float32")],
        ),
        # Reranker feature tables (index_builder.feature_tables).
        ArraySpec("item_event_keys", "int64", ("n_item_events",)),
        *[ArraySpec(f"item_events_{days}d_at_end", "float32", ("items",)) for days in WINDOW_DAYS],
        ArraySpec("item_first_seen", "int64", ("items",)),
        ArraySpec("item_hour_lift", "float32", ("items", "hour_blocks")),
        ArraySpec("item_weekday_lift", "float32", ("items", 7)),
        ArraySpec("user_first_seen", "int64", ("users",)),
        ArraySpec("user_last_seen", "int64", ("users",)),
        ArraySpec("user_stage", "int8", ("users",)),
        ArraySpec("user_value", "float32", ("users",)),
        ArraySpec("user_hour_share", "float32", ("users", "hour_blocks")),
        ArraySpec("user_log_price", "float32", ("users",)),
        *_csr("user_cat_", "users", "nnz_user_cat", [("user_cat_ids", "int32"), ("user_cat_share", "float32")]),
        *_csr("user_recent_", "users", "nnz_user_recent", [("user_recent_items", "int32")]),
        *_csr("touched_", "users", "nnz_touched", [("touched_items", "int32")]),
        # Re-purchase tables (index_builder.repeat): what each item's buyers buy again and when,
        # and per user x item their baskets with it, its last purchase and their own interval.
        ArraySpec("item_repeat_rate", "float32", ("items",), since=2),
        ArraySpec("item_repeat_interval", "float32", ("items",), since=2),
        ArraySpec("item_reoffer", "uint8", ("items",), since=2),
        ArraySpec("user_baskets", "int32", ("users",), since=2),
        ArraySpec("user_repeat_share", "float32", ("users",), since=2),
        *[
            ArraySpec(s.name, s.dtype, s.shape, since=2)
            for s in _csr(
                "user_buy_",
                "users",
                "nnz_user_buy",
                [
                    ("user_buy_items", "int32"),
                    ("user_buy_baskets", "float32"),
                    ("user_buy_last", "int64"),
                    ("user_buy_interval", "float32"),
                    ("user_buy_in_last", "uint8"),
                ],
            )
        ],
        *_csr("covis_", "items", "nnz_covis", [("covis_items", "int32"), ("covis_scores", "float32")]),
        # (items, items), or (0, 0) for a catalogue above ease_max_items.
        ArraySpec("ease_weights", "float32", ("*", "*")),
        *[
            spec
            for f in CONTEXT_FIELDS
            for spec in (
                ArraySpec(f"context_{f}_values", "str", (f"vocab_{f}",)),
                ArraySpec(f"item_{f}_lift", "float16", ("items", f"vocab_{f}")),
                ArraySpec(f"user_{f}_share", "float16", ("users", f"vocab_{f}")),
            )
        ],
        # The learned reranker's trees (ranking.kernels.scoring.TreeArrays), when one was trained.
        ArraySpec("rerank_roots", "int32", ("trees",), group="trees"),
        ArraySpec("rerank_leaf_value", "float64", ("leaves",), group="trees"),
        *[
            ArraySpec(f"rerank_{name}", dtype, ("nodes",), group="trees")
            for name, dtype in (
                ("feature", "int32"),
                ("threshold", "float64"),
                ("left", "int32"),
                ("right", "int32"),
                ("flags", "uint8"),
                ("node_value", "float64"),
            )
        ],
    ]
)
SPECS: dict[str, ArraySpec] = {s.name: s for s in ARRAYS}


class ArrayLike(Protocol):
    @property
    def dtype(self): ...

    @property
    def shape(self) -> tuple[int, ...]: ...


def _dtype_ok(spec: ArraySpec, array: ArrayLike) -> bool:
    if spec.dtype == "str":
        return array.dtype.kind == "U"
    return str(array.dtype) == spec.dtype


def check_arrays(arrays: Mapping[str, ArrayLike], schema_version: int, where: str) -> None:
    """Check a bundle's arrays against the declaration; raise one error naming every problem.

    Parameters
    ----------
    arrays : mapping of name to array (or anything with ``dtype`` and ``shape``)
    schema_version : int
        The bundle's schema version: arrays added after it are not required.
    where : str
        The bundle's path (or "the bundle being built"), for the message.

    Raises
    ------
    BundleError
        An array is undeclared, missing, of the wrong dtype or of a disagreeing shape.
    """
    problems = [f"{name} is not declared in ranking.bundle.schema" for name in sorted(set(arrays) - set(SPECS))]
    groups_present = {s.group for s in ARRAYS if s.group and s.name in arrays}
    dims: dict[str, int] = {}
    bound_by: dict[str, str] = {}
    for table, name in (("items", "item_ids"), ("users", "user_ids"), ("segments", "segment_keys")):
        if name in arrays:
            dims[table], bound_by[table] = int(arrays[name].shape[0]), name
    for spec in ARRAYS:
        if spec.since > schema_version:
            continue
        if spec.name not in arrays:
            if not spec.group or spec.group in groups_present:
                problems.append(f"{spec.name} is missing")
            continue
        arr = arrays[spec.name]
        if not _dtype_ok(spec, arr):
            problems.append(f"{spec.name} has dtype {arr.dtype}, declared {spec.dtype}")
        if len(arr.shape) != len(spec.shape):
            problems.append(f"{spec.name} has shape {tuple(arr.shape)}, declared {spec.shape}")
            continue
        for axis, (dim, got) in enumerate(zip(spec.shape, arr.shape)):
            if dim == "*":
                continue
            if isinstance(dim, int):
                want, what = dim, str(dim)
            else:
                base, plus = (dim[:-2], 1) if dim.endswith("+1") else (dim, 0)
                if base not in dims:
                    dims[base], bound_by[base] = int(got) - plus, spec.name
                want, what = dims[base] + plus, f"{dim} = {dims[base] + plus} (from {bound_by[base]})"
            if int(got) != want:
                problems.append(f"{spec.name} axis {axis} is {got}, expected {what}")
    if problems:
        raise BundleError(
            f"{where} does not match the declared arrays: "
            + "; ".join(problems)
            + "; rebuild it with this version's index_builder"
        )
