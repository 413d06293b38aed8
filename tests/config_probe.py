"""Probe whether a config class derives a default from a library section or re-spells it."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def bumped(value):
    """A different value of the same type, so a re-spelt default cannot follow it."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 7
    if isinstance(value, tuple):
        return value + ("probe",)
    return value + "-probe"


# Run in a fresh interpreter: set each section's default to a new value, then load the
# config module and report what its class's defaults became.
_PROBE = """
import importlib, json, sys
changes, target, cls = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
for key, (module, section, name, value) in changes.items():
    section = getattr(importlib.import_module(module), section)
    setattr(section, name, tuple(value) if isinstance(getattr(section, name), tuple) else value)
cfg = getattr(importlib.import_module(target), cls)()
print(json.dumps({key: getattr(cfg, key) for key in changes}))
"""


def probe_defaults(derived: dict[str, tuple[str, str, str]], target: str, cls: str) -> tuple[dict, dict]:
    """``target.cls()``'s defaults once every section field named in ``derived`` has a new default.

    Returns the new section defaults and what the config's fields became, both by config field.
    """
    changes = {}
    for key, (module, section, name) in derived.items():
        original = getattr(getattr(importlib.import_module(module), section), name)
        changes[key] = (module, section, name, bumped(original))
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, json.dumps(changes), target, cls],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    return {key: c[3] for key, c in changes.items()}, json.loads(out.stdout)
