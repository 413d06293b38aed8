"""The id maps: every external id to its row and back, whatever the length of the asked key."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from ranking.bundle.ids import IdMap


@pytest.fixture(scope="module")
def ids() -> np.ndarray:
    rng = np.random.default_rng(7)
    # Ids of several lengths, shuffled, so the sorted order differs from the rows'.
    return np.array([f"c{i}" for i in rng.permutation(5000)] + ["", "x" * 12])


def test_every_id_maps_to_its_row_and_back(ids):
    m = IdMap(ids)
    assert m.lookup(ids).tolist() == list(range(len(ids)))
    assert [m.row(str(k)) for k in ids[:50]] == [i if k else -1 for i, k in enumerate(ids[:50])]
    assert m.id_of(np.array([3, 0])) == [ids[3], ids[0]]


@pytest.mark.parametrize(
    "key",
    [
        "x" * 13,  # one character longer than the longest id
        "c12345678901234567890",  # a known id's prefix, longer than every id
        "c1" + "0" * 30,
        "zz",  # past the last id
        "a",  # before the first
        "c4999x",
    ],
)
def test_an_unknown_key_of_any_length_is_minus_one(ids, key):
    m = IdMap(ids)
    assert m.row(key) == -1
    assert m.lookup([key]).tolist() == [-1]


def test_keys_longer_than_every_id_mixed_with_known_ones(ids):
    m = IdMap(ids)
    # Cut to the map's width, the long keys would equal known ids: they must still be unknown.
    width = ids.dtype.itemsize // 4
    long_known_prefix = str(ids[0]) + "9" * (width + 3)
    keys = [str(ids[5]), "x" * 12 + "y", long_known_prefix, str(ids[-1]), str(ids[0])]
    assert m.lookup(keys).tolist() == [5, -1, -1, len(ids) - 1, 0]
    assert m.lookup(np.array(keys)).tolist() == [5, -1, -1, len(ids) - 1, 0]


def test_a_long_key_does_not_copy_the_map():
    """NumPy searching a wider key casts the whole sorted map to the key's dtype first (a
    million ids: 12 ms per Rank of a customer whose id is longer than every known one)."""
    m = IdMap(np.array([f"u{i:07d}" for i in range(200_000)]))
    key = "visitor-" + "f" * 36
    m.lookup([key])  # warm NumPy's own caches
    tracemalloc.start()
    try:
        assert m.row(key) == -1
        assert m.lookup([key, "u0000007"]).tolist() == [-1, 7]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # The map's sorted ids hold 200,000 x 8 x 4 bytes; a cast to 44 characters would be 35 MB.
    assert peak < 1_000_000, f"a lookup allocated {peak} bytes"


def test_one_key_finds_what_the_batch_lookup_finds_for_any_characters():
    """row() searches the ids' code points in compiled code; lookup() through NumPy. Both agree on
    every known id, on its prefixes and extensions, and on characters beyond ASCII and the BMP
    (a map wider than the compiled search's stack probe too)."""
    rng = np.random.default_rng(11)
    alphabet = list("ab01-_") + ["é", "ß", "中", "\U0001f600", "\x00"]
    for width in (3, 9, 70):
        made = {"".join(rng.choice(alphabet, int(rng.integers(1, width + 1)))) for _ in range(400)}
        known = sorted(k for k in made if k and not k.endswith("\x00"))  # NumPy drops trailing NULs
        ids = np.array([known[i] for i in rng.permutation(len(known))])
        m = IdMap(ids)
        for row, key in enumerate(ids.tolist()):
            assert m.row(key) == row == m.row(ids[row]), key  # a str, and NumPy's own str_
        keys = [k[:-1] for k in known if len(k) > 1] + [k + "b" for k in known] + ["a" * (width + 1), "zzz"]
        want = m.lookup(keys).tolist()
        assert [m.row(k) for k in keys] == want
        assert any(w >= 0 for w in want) and any(w < 0 for w in want)
    assert IdMap(np.array([], dtype=str)).row("a") == -1
