"""The bundle's arrays are declared once (ranking.bundle.schema); writer and reader refuse what disagrees."""

from __future__ import annotations

import numpy as np
import pytest

from ranking.bundle.schema import SCHEMA_VERSION, SPECS, check_arrays
from ranking.bundle.store import Bundle
from ranking.errors import BundleError


@pytest.fixture(scope="module")
def arrays(bundle_path):
    b = Bundle(bundle_path)
    return {n: np.asarray(b.array(n)) for n in b.array_names()}


def test_a_built_bundle_has_exactly_the_declared_arrays(arrays):
    check_arrays(arrays, SCHEMA_VERSION, "built")
    required = {s.name for s in SPECS.values()}
    assert set(arrays) == required  # the fixture's bundle has a trained reranker: every group is present


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda a: a.update(extra=np.zeros(3, np.float32)), "extra is not declared"),
        (lambda a: a.pop("item_price"), "item_price is missing"),
        (lambda a: a.update(item_price=a["item_price"].astype(np.float64)), "item_price has dtype float64"),
        (lambda a: a.update(item_price=a["item_price"][:-1]), r"item_price axis 0 is \d+, expected items"),
        (lambda a: a.update(covis_scores=a["covis_scores"][:-1]), r"covis_scores axis 0 is \d+, expected nnz_covis"),
        (lambda a: a.update(consumed_indptr=a["consumed_indptr"][:-1]), r"consumed_indptr axis 0 .* expected users\+1"),
        (lambda a: a.pop("rerank_roots"), "rerank_roots is missing"),
    ],
)
def test_what_disagrees_with_the_declaration_is_refused_by_name(arrays, change, message):
    bad = dict(arrays)
    change(bad)
    with pytest.raises(BundleError, match=message):
        check_arrays(bad, SCHEMA_VERSION, "the bundle")


def test_the_trees_are_optional_as_a_group(arrays):
    linear = {n: a for n, a in arrays.items() if not n.startswith("rerank_")}
    check_arrays(linear, SCHEMA_VERSION, "linear")


def test_arrays_added_after_a_bundles_schema_version_are_not_required(arrays, monkeypatch):
    from ranking.bundle import schema

    newer = schema.ArraySpec("item_brand", "int32", ("items",), since=SCHEMA_VERSION + 1)
    monkeypatch.setattr(schema, "ARRAYS", schema.ARRAYS + (newer,))
    monkeypatch.setitem(schema.SPECS, "item_brand", newer)
    check_arrays(arrays, SCHEMA_VERSION, "older")
    with pytest.raises(BundleError, match="item_brand is missing"):
        check_arrays(arrays, SCHEMA_VERSION + 1, "newer")
