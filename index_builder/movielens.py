"""Fetching MovieLens-100K from the recbole wheel and writing it as builder input CSVs."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import uuid
import zipfile
from pathlib import Path

__all__ = ["fetch_movielens", "RECBOLE_REQUIREMENT"]

RECBOLE_REQUIREMENT = "recbole==1.2.1"
_DEFAULT_CACHE = Path.home() / ".cache" / "one2one" / "recbole"
_WHEEL_GLOB = "recbole-1.2.1-*.whl"
_MEMBER = "recbole/dataset_example/ml-100k/ml-100k.{}"
_INTER_FIELDS = ["user_id", "item_id", "rating", "timestamp"]
_ITEM_FIELDS = ["item_id", "movie_title", "release_year", "class"]
_OUTPUTS = {
    "events": ["user_id", "item_id", "event_type", "timestamp", "value"],
    "items": ["item_id", "title", "year", "category"],
    "users": ["user_id", "age", "gender", "occupation", "zip_code"],
}


def fetch_movielens(out_dir, *, cache_dir=None, python: str = sys.executable) -> dict[str, Path]:
    """Write MovieLens-100K as events.csv, items.csv and users.csv.

    The data comes from the example dataset shipped inside the recbole 1.2.1
    wheel, which is downloaded once with pip and read as a zip (recbole is
    never installed).

    Parameters
    ----------
    out_dir : str or os.PathLike
        Directory to write the three CSV files to; created if missing.
    cache_dir : str or os.PathLike, optional
        Where the wheel is kept; defaults to ``~/.cache/one2one/recbole``. A
        wheel already there is reused without any network request.
    python : str
        Interpreter whose pip downloads the wheel.

    Returns
    -------
    dict of str to pathlib.Path
        ``{"events": ..., "items": ..., "users": ...}``.

    Raises
    ------
    RuntimeError
        If pip cannot download the wheel, or the wheel lacks or garbles the
        MovieLens files.
    """
    cache = Path(cache_dir) if cache_dir is not None else _DEFAULT_CACHE
    wheel = _wheel(cache, python)
    try:
        with zipfile.ZipFile(wheel) as archive:
            tables = {
                "events": _events(_recbole_table(archive, "inter", _INTER_FIELDS)),
                "items": _items(_recbole_table(archive, "item", _ITEM_FIELDS)),
                "users": _users(_recbole_table(archive, "user", _OUTPUTS["users"])),
            }
    except zipfile.BadZipFile as e:
        raise RuntimeError(f"{wheel} is not a valid wheel ({e}); delete it and fetch again") from e
    return _write_all(Path(out_dir), tables)


def _wheel(cache: Path, python: str) -> Path:
    found = sorted(cache.glob(_WHEEL_GLOB))
    if found:
        return found[0]
    cache.mkdir(parents=True, exist_ok=True)
    # Binary only: the data files are read from the wheel, an sdist would not do.
    command = [
        python,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        RECBOLE_REQUIREMENT,
        "-d",
        str(cache),
    ]
    try:
        done = subprocess.run(command, capture_output=True, text=True)
    except OSError as e:
        raise RuntimeError(
            f"cannot run {python!r} to download {RECBOLE_REQUIREMENT}: {e}; check the python argument"
        ) from e
    if done.returncode != 0:
        tail = "\n".join(done.stderr.strip().splitlines()[-20:])
        raise RuntimeError(
            f"pip could not download {RECBOLE_REQUIREMENT} (exit {done.returncode}); check network "
            f"access to PyPI (proxy, PIP_INDEX_URL) and that {python} has pip.\n"
            f"pip stderr (last lines):\n{tail}"
        )
    found = sorted(cache.glob(_WHEEL_GLOB))
    if not found:
        raise RuntimeError(f"pip reported success but no {_WHEEL_GLOB} is in {cache}")
    return found[0]


def _recbole_table(archive: zipfile.ZipFile, suffix: str, needed: list[str]) -> list[dict]:
    """Rows of a recbole atomic file, keyed by field name (the part before ':type')."""
    member = _MEMBER.format(suffix)
    try:
        text = archive.read(member).decode("utf-8")
    except KeyError as e:
        raise RuntimeError(f"{archive.filename} has no {member}") from e
    except UnicodeDecodeError as e:
        raise RuntimeError(f"{archive.filename}: {member} is not UTF-8 ({e})") from e
    lines = text.split("\n")
    names = [field.split(":", 1)[0] for field in lines[0].rstrip("\r").split("\t")]
    missing = [name for name in needed if name not in names]
    if missing:
        raise RuntimeError(f"{member} lacks fields {missing}; its header has {names}")
    rows = []
    for number, line in enumerate(lines[1:], start=2):
        line = line.rstrip("\r")
        if not line:
            continue
        # Plain split, not csv: recbole files are unquoted and titles may hold '"'.
        values = line.split("\t")
        if len(values) != len(names):
            raise RuntimeError(f"{member} line {number}: expected {len(names)} fields, found {len(values)}")
        rows.append(dict(zip(names, values)))
    return rows


def _events(rows):
    return [[r["user_id"], r["item_id"], "rating", _whole_seconds(r["timestamp"]), r["rating"]] for r in rows]


def _whole_seconds(text: str) -> str:
    # The header types timestamps as float; the builder wants whole seconds.
    try:
        return str(int(float(text)))
    except ValueError as e:
        raise RuntimeError(f"ml-100k.inter has a timestamp that is not a number: {text!r}") from e


def _items(rows):
    return [[r["item_id"], r["movie_title"], r["release_year"], "|".join(r["class"].split())] for r in rows]


def _users(rows):
    return [[r[name] for name in _OUTPUTS["users"]] for r in rows]


def _write_all(out_dir: Path, tables: dict[str, list[list[str]]]) -> dict[str, Path]:
    """Write every file to a temporary name first, then rename them all into place."""
    out_dir.mkdir(parents=True, exist_ok=True)
    temps: dict[str, Path] = {}
    try:
        for name, rows in tables.items():
            # A fresh name opened exclusively, so the file gets the usual umask modes.
            temps[name] = out_dir / f".{name}.csv.{uuid.uuid4().hex}.tmp"
            with open(temps[name], "x", encoding="utf-8", newline="") as f:
                writer = csv.writer(f, lineterminator="\n")
                writer.writerow(_OUTPUTS[name])
                writer.writerows(rows)
        paths = {name: out_dir / f"{name}.csv" for name in tables}
        for name, temp in temps.items():
            os.replace(temp, paths[name])
        return paths
    finally:
        for temp in temps.values():
            temp.unlink(missing_ok=True)  # only left over when writing failed
