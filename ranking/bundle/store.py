"""The artifact bundle on disk: versioned directories, manifest, checksums, CURRENT pointer."""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import secrets
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from ranking.bundle.schema import SCHEMA_VERSION, check_arrays
from ranking.errors import BundleError

MANIFEST = "manifest.json"
CURRENT = "CURRENT"
_HASH_CHUNK = 1 << 22


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks so large arrays never sit in memory twice."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def new_version() -> str:
    """A sortable, collision-safe version name: UTC time plus a random suffix."""
    now = _dt.datetime.now(_dt.UTC).strftime("%Y%m%dT%H%M%S")
    return f"{now}Z-{secrets.token_hex(3)}"


def fsync_dir(path: Path) -> None:
    """Make a rename or a new file inside ``path`` durable (the directory entry itself)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class BundleWriter:
    """Writes one bundle version under ``root`` and publishes it atomically.

    Files go to a hidden temporary directory; :meth:`publish` writes the manifest
    with every file's sha256, renames the directory into place and only then swaps
    ``CURRENT``. A build that fails before publishing leaves no visible version
    (call :meth:`abort`, or use the writer as a context manager).

    Parameters
    ----------
    root : Path
        The artifacts directory holding every version and ``CURRENT``.
    version : str, optional
        Version name; a new time-based one by default.
    """

    def __init__(self, root: Path | str, version: str | None = None):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.version = version or new_version()
        if (self.root / self.version).exists():
            raise BundleError(f"version {self.version} already exists under {self.root}")
        self.tmp = self.root / f".tmp-{self.version}-{os.getpid()}"
        self.tmp.mkdir()
        self._published = False

    def __enter__(self) -> BundleWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self._published:
            self.abort()

    def path(self, name: str) -> Path:
        """Where to write a file of the bundle (a FAISS index, a parquet table)."""
        if "/" in name or name.startswith(".") or name == MANIFEST:
            raise ValueError(f"bad bundle file name {name!r}")
        return self.tmp / name

    def add_array(self, name: str, array: np.ndarray) -> None:
        """Store one array as ``<name>.npy`` (never pickled)."""
        array = np.ascontiguousarray(array)
        if array.dtype.hasobject:
            raise ValueError(f"array {name!r} has dtype object; bundles hold plain arrays only")
        np.save(self.path(f"{name}.npy"), array, allow_pickle=False)

    def add_json(self, name: str, obj: Any) -> None:
        """Store a JSON document as ``<name>.json``."""
        with open(self.path(f"{name}.json"), "w", encoding="utf-8") as fh:
            json.dump(obj, fh, indent=1, sort_keys=True)

    def publish(self, manifest: dict[str, Any]) -> Path:
        """Checksum every file, write the manifest, rename into place, swap CURRENT.

        Returns
        -------
        Path
            The published version directory.
        """
        files = {}
        for p in sorted(self.tmp.iterdir()):
            files[p.name] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
            with open(p, "rb") as fh:
                os.fsync(fh.fileno())
        doc = dict(manifest)
        doc["schema_version"] = SCHEMA_VERSION
        doc["version"] = self.version
        doc["files"] = files
        with open(self.tmp / MANIFEST, "w", encoding="utf-8") as fh:
            json.dump(doc, fh, indent=1, sort_keys=True)
            fh.flush()
            os.fsync(fh.fileno())
        fsync_dir(self.tmp)
        final = self.root / self.version
        os.rename(self.tmp, final)
        set_current(self.root, self.version)
        self._published = True
        return final

    def abort(self) -> None:
        """Remove the temporary directory of an unpublished build."""
        if self.tmp.exists():
            shutil.rmtree(self.tmp, ignore_errors=True)


def set_current(root: Path | str, version: str) -> None:
    """Point ``CURRENT`` at ``version`` with an atomic rename."""
    root = Path(root)
    if not (root / version / MANIFEST).is_file():
        raise BundleError(f"cannot point CURRENT at {version}: {root / version / MANIFEST} is missing")
    tmp = root / f".{CURRENT}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(version + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, root / CURRENT)
    fsync_dir(root)


def resolve_current(root: Path | str) -> Path:
    """The version directory ``CURRENT`` names under ``root``."""
    root = Path(root)
    pointer = root / CURRENT
    try:
        version = pointer.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        raise BundleError(f"no bundle published under {root}: {pointer} does not exist") from None
    if not version or "/" in version or version.startswith("."):
        raise BundleError(f"{pointer} holds {version!r}, which is not a version name")
    path = root / version
    if not path.is_dir():
        raise BundleError(f"{pointer} names version {version}, but {path} does not exist")
    return path


class Bundle:
    """A published bundle opened for reading; arrays are memory-mapped.

    Parameters
    ----------
    path : Path
        A version directory.
    verify : bool
        Check the schema version and every file's sha256 against the manifest.

    Raises
    ------
    BundleError
        The manifest is missing or unreadable, the schema is not this code's, a file
        is missing, extra or altered.
    """

    def __init__(self, path: Path | str, verify: bool = True):
        self.path = Path(path)
        try:
            with open(self.path / MANIFEST, encoding="utf-8") as fh:
                self.manifest = json.load(fh)
        except FileNotFoundError:
            raise BundleError(f"{self.path} is not a bundle: {MANIFEST} is missing") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise BundleError(f"{self.path / MANIFEST} is not valid JSON: {exc}") from None
        schema = self.manifest.get("schema_version")
        if schema != SCHEMA_VERSION:
            raise BundleError(
                f"{self.path} has schema version {schema!r}; this server reads {SCHEMA_VERSION}: "
                "rebuild the bundle with the matching index_builder"
            )
        self.version = self.manifest.get("version") or self.path.name
        if verify:
            self.verify()

    def verify(self) -> None:
        """Check that the files on disk are exactly those the manifest lists, unaltered."""
        listed = self.manifest.get("files")
        if not isinstance(listed, dict) or not listed:
            raise BundleError(f"{self.path / MANIFEST} lists no files")
        present = {p.name for p in self.path.iterdir() if p.name != MANIFEST}
        missing = sorted(set(listed) - present)
        if missing:
            raise BundleError(f"{self.path} is missing {', '.join(missing)}")
        # Hashed on every core, the largest files first: hashlib and file reads let go of the
        # GIL, and the hashing is most of a server's start (a 1M-item bundle: 1.3 GB).
        names = sorted(listed, key=lambda n: -(self.path / n).stat().st_size)
        with ThreadPoolExecutor(max_workers=max(1, min(len(names), len(os.sched_getaffinity(0))))) as pool:
            digests = dict(zip(names, pool.map(lambda n: sha256_file(self.path / n), names)))
        for name, meta in listed.items():  # the first corrupt file in the manifest's order
            digest = digests[name]
            if digest != meta.get("sha256"):
                raise BundleError(
                    f"{self.path / name} is corrupt: sha256 {digest[:12]}… does not match "
                    f"the manifest's {str(meta.get('sha256'))[:12]}…"
                )

    def file(self, name: str) -> Path:
        """Path of a file listed in the manifest."""
        if name not in self.manifest["files"]:
            raise BundleError(f"{self.path} has no file {name}")
        return self.path / name

    def has_array(self, name: str) -> bool:
        """Whether the bundle lists ``<name>.npy`` (arrays later builders added)."""
        return f"{name}.npy" in self.manifest["files"]

    def array(self, name: str, mmap: bool = True) -> np.ndarray:
        """Load ``<name>.npy``; memory-mapped read-only by default so workers share pages."""
        path = self.file(f"{name}.npy")
        try:
            arr = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
            # A plain ndarray view of the mapping: same shared pages, but indexing it does
            # not build a np.memmap per call (a tenth of a millisecond per request).
            return arr.view(np.ndarray) if mmap else arr
        except ValueError as exc:
            raise BundleError(f"{path} cannot be read as a plain array: {exc}") from None

    def json(self, name: str) -> Any:
        """Load ``<name>.json``."""
        with open(self.file(f"{name}.json"), encoding="utf-8") as fh:
            return json.load(fh)

    def array_names(self) -> list[str]:
        """Every array the manifest lists."""
        return sorted(n[:-4] for n in self.manifest["files"] if n.endswith(".npy"))

    def check_schema(self) -> None:
        """Check the arrays' names, dtypes and shapes against ``ranking.bundle.schema`` (headers only)."""
        check_arrays(
            {n: self.array(n) for n in self.array_names()}, int(self.manifest["schema_version"]), f"{self.path}"
        )

    def load_index(self) -> faiss.Index:
        """Read the FAISS index into memory.

        Not memory-mapped on purpose: with faiss 1.15 a memory-mapped IVF index searched
        30-50x slower than one read into memory (bench/README.md), and HNSW graphs are
        read into memory either way. Worker processes share the index copy-on-write
        instead: the supervisor loads the bundle before it forks them (server.workers).
        """
        return faiss.read_index(str(self.file("index.faiss")))


class MemoryBundle:
    """A bundle that is still in memory: the builder's fitted arrays, read like a published one.

    The builder fits models on earlier parts of the data to train the reranker and to
    evaluate the ladder; they are served by the same :class:`~ranking.bundle.model.RankingModel`
    and pipeline code as a published bundle, without a round trip through the disk.

    Parameters
    ----------
    arrays : dict of str to ndarray
        Checked against ``ranking.bundle.schema``.
    manifest : dict
        The manifest sections the serving code reads (``scoring``, ``segments``, ``data_window``).
    index : faiss.Index
    name : str
        What messages call it.

    Raises
    ------
    BundleError
        The arrays do not match the declared schema.
    """

    def __init__(
        self,
        arrays: dict[str, np.ndarray],
        manifest: dict[str, Any],
        index: faiss.Index,
        name: str = "the bundle being built",
    ):
        check_arrays(arrays, SCHEMA_VERSION, name)
        self.arrays = arrays
        self.manifest = {**manifest, "schema_version": SCHEMA_VERSION, "version": name}
        self.version = name
        self.path = name
        self._index = index

    def has_array(self, name: str) -> bool:
        return name in self.arrays

    def array(self, name: str, mmap: bool = True) -> np.ndarray:
        try:
            return self.arrays[name]
        except KeyError:
            raise BundleError(f"{self.path} has no array {name}") from None

    def array_names(self) -> list[str]:
        return sorted(self.arrays)

    def check_schema(self) -> None:
        """Checked when made; nothing can change it since."""

    def load_index(self) -> faiss.Index:
        return self._index
