"""The README's configuration table lists every ServerConfig setting with its real default."""
from __future__ import annotations

import dataclasses
import re

from ops_tools import ROOT
from server.config import ServerConfig


def _table() -> dict[str, str]:
    rows = {}
    for line in (ROOT / "README.md").read_text().splitlines():
        m = re.match(r"\| (`[a-z_]+`(?: / `[a-z_]+`)?) \| ([^|]+) \|", line)
        if m:
            names = re.findall(r"`([a-z_]+)`", m.group(1))
            values = [v.strip(" `") for v in m.group(2).split(" / ")]
            for name, value in zip(names, values * len(names) if len(values) == 1 else values):
                rows[name] = value
    return rows


def test_every_setting_is_documented_with_its_default():
    table = _table()
    for field in dataclasses.fields(ServerConfig):
        assert field.name in table, f"README configuration table lacks {field.name}"
        default = field.default
        if default == "":
            assert table[field.name].startswith("("), (field.name, table[field.name])
        elif isinstance(default, float):
            assert float(table[field.name]) == default, (field.name, table[field.name], default)
        else:
            assert table[field.name] == str(default), (field.name, table[field.name], default)


def test_the_servers_pipeline_defaults_are_the_pipelines_own():
    # ServerConfig spells out the defaults it hands to RankerConfig (the server's config
    # module imports nothing of the pipeline at load); they must not drift apart.
    from ranking import RankerConfig

    server, ranker = ServerConfig().ranker_config(), RankerConfig()
    for name in ("n_candidates", "popular_candidates", "ann_effort", "exact_head_items", "ann_batch_wait_us"):
        assert getattr(server, name) == getattr(ranker, name), name
