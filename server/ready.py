"""The ready file a server writes once it listens: what tests, benches and scripts poll for."""

from __future__ import annotations

import json
import os
from pathlib import Path


def write_ready(path: str, doc: dict) -> None:
    """Write a ready file whole or not at all: whoever polls for it never reads it half-written."""
    tmp = Path(path + ".tmp")
    tmp.write_text(json.dumps(doc))
    os.replace(tmp, path)
