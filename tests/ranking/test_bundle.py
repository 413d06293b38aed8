"""Bundle format: atomic publish, CURRENT pointer, verification of every file."""

import json

import numpy as np
import pytest

from ranking import Bundle, BundleError, BundleWriter, resolve_current, set_current


def publish(root, arrays, version=None):
    with BundleWriter(root, version) as w:
        for name, a in arrays.items():
            w.add_array(name, a)
        return w.publish({"note": "test"})


def test_roundtrip_and_current(tmp_path):
    path = publish(tmp_path, {"x": np.arange(5, dtype=np.int32)}, "v1")
    assert resolve_current(tmp_path) == path
    b = Bundle(path)
    assert b.version == "v1"
    assert b.manifest["note"] == "test"
    assert b.array("x").tolist() == [0, 1, 2, 3, 4]
    assert set(b.manifest["files"]) == {"x.npy"}
    publish(tmp_path, {"x": np.ones(2, np.float32)}, "v2")
    assert resolve_current(tmp_path).name == "v2"
    set_current(tmp_path, "v1")
    assert resolve_current(tmp_path).name == "v1"


def test_failed_build_leaves_no_version(tmp_path):
    with pytest.raises(RuntimeError):
        with BundleWriter(tmp_path, "v1") as w:
            w.add_array("x", np.zeros(3))
            raise RuntimeError("build failed half way")
    assert [p.name for p in tmp_path.iterdir()] == []
    with pytest.raises(BundleError, match="no bundle published"):
        resolve_current(tmp_path)


def test_corrupt_file_is_refused(tmp_path):
    path = publish(tmp_path, {"x": np.arange(100, dtype=np.int32)}, "v1")
    raw = bytearray((path / "x.npy").read_bytes())
    raw[-1] ^= 0xFF
    (path / "x.npy").write_bytes(bytes(raw))
    with pytest.raises(BundleError, match="x.npy is corrupt"):
        Bundle(path)


def test_of_several_corrupt_files_the_manifest_s_first_is_named(tmp_path):
    """The files are hashed in parallel, largest first; the refusal still names the first
    corrupt file in the manifest's order, whichever finished hashing first, and a bundle
    whose files are all intact loads."""
    arrays = {f"a{i}": np.arange(10 ** (1 + i % 4), dtype=np.int64) for i in range(8)}
    path = publish(tmp_path, arrays, "v1")
    Bundle(path)
    listed = list(json.loads((path / "manifest.json").read_text())["files"])
    bad = [n for n in listed if n.endswith(".npy")][2:5]  # a small, larger and largest among them
    for name in bad:
        raw = bytearray((path / name).read_bytes())
        raw[-1] ^= 0xFF
        (path / name).write_bytes(bytes(raw))
    with pytest.raises(BundleError, match=f"{bad[0]} is corrupt"):
        Bundle(path)


def test_missing_file_and_schema_mismatch(tmp_path):
    path = publish(tmp_path, {"x": np.arange(3), "y": np.arange(2)}, "v1")
    (path / "y.npy").unlink()
    with pytest.raises(BundleError, match="missing y.npy"):
        Bundle(path)
    path2 = publish(tmp_path, {"x": np.arange(3)}, "v2")
    doc = json.loads((path2 / "manifest.json").read_text())
    doc["schema_version"] = 999
    (path2 / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(BundleError, match="schema version 999"):
        Bundle(path2)


def test_object_arrays_are_rejected(tmp_path):
    with BundleWriter(tmp_path, "v1") as w:
        with pytest.raises(ValueError, match="dtype object"):
            w.add_array("bad", np.array([{"a": 1}], dtype=object))


def test_current_pointing_nowhere(tmp_path):
    (tmp_path / "CURRENT").write_text("v9\n")
    with pytest.raises(BundleError, match="v9"):
        resolve_current(tmp_path)
