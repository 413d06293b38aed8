"""docs/operations.md's configuration table is the one generated from ServerConfig, and ServerConfig
derives the library's defaults instead of writing them a second time."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import pytest
from config_probe import probe_defaults
from ops_tools import ROOT

from ranking.config import (
    EventLogSettings,
    OverlaySettings,
    QueryLimits,
    RankerConfig,
    UserStateSettings,
    marked_table,
    settings_table,
)
from ranking.realtime.events import EventLimits
from server.config import ServerConfig, config_table_markdown

# Server setting -> the library section and field whose default it takes (module, class, field).
DERIVED = {
    "n_candidates": ("ranking.config", "RankerConfig", "n_candidates"),
    "popular_candidates": ("ranking.config", "RankerConfig", "popular_candidates"),
    "ann_effort": ("ranking.config", "RankerConfig", "ann_effort"),
    "ann_refine": ("ranking.config", "RankerConfig", "ann_refine"),
    "second_phase_candidates": ("ranking.config", "RankerConfig", "second_phase_candidates"),
    "exact_head_items": ("ranking.config", "RankerConfig", "exact_head_items"),
    "ann_batch_size": ("ranking.config", "RankerConfig", "ann_batch_size"),
    "ann_batch_wait_us": ("ranking.config", "RankerConfig", "ann_batch_wait_us"),
    "max_results": ("ranking.config", "QueryLimits", "max_results"),
    "event_types": ("ranking.realtime.events", "EventLimits", "event_types"),
    "max_events_per_batch": ("ranking.realtime.events", "EventLimits", "max_events_per_batch"),
    "max_event_future_seconds": ("ranking.realtime.events", "EventLimits", "max_future_seconds"),
    "event_log_fsync": ("ranking.config", "EventLogSettings", "fsync"),
    "event_log_segment_bytes": ("ranking.config", "EventLogSettings", "segment_bytes"),
    "event_log_fsync_interval_seconds": ("ranking.config", "EventLogSettings", "fsync_interval_seconds"),
    "user_state_max_users": ("ranking.config", "UserStateSettings", "max_users"),
    "user_state_max_events": ("ranking.config", "UserStateSettings", "max_events_per_user"),
    "skip_penalty": ("ranking.config", "OverlaySettings", "skip_penalty"),
    "interest_boost": ("ranking.config", "OverlaySettings", "interest_boost"),
}
# Same name, another form: the server's setting is the text ("retrieve:100,features:50") that
# ServerConfig.debug_delays() parses into the pipeline's dict; both default to nothing.
OTHER_FORM = {"debug_delay_us_per_candidate"}
SECTIONS = (RankerConfig, QueryLimits, EventLimits, EventLogSettings, UserStateSettings, OverlaySettings)


def test_the_operations_page_shows_the_generated_table():
    text = (ROOT / "docs" / "operations.md").read_text()
    assert marked_table(text) == config_table_markdown(), (
        "docs/operations.md's configuration table differs from ServerConfig's fields: run `make docs`"
    )


def test_every_setting_has_a_line_of_help_and_its_real_default_in_the_table():
    table = config_table_markdown().splitlines()[2:]
    fields = dataclasses.fields(ServerConfig)
    assert [row.split("`")[1] for row in table] == [f.name for f in fields]
    for row, f in zip(table, fields):
        assert f.metadata["help"].strip(), f.name
        if f.default == "" or "default" in f.metadata:
            assert row.split(" | ")[1].startswith("("), row  # "(none)", "(required)"
        else:
            shown = row.split(" | ")[1].strip("`")
            assert shown == (
                str(f.default).lower()
                if isinstance(f.default, bool)
                else str(int(f.default))
                if isinstance(f.default, float) and f.default.is_integer()
                else str(f.default)
            ), row


def test_a_field_without_help_is_refused_by_the_generator():
    @dataclass
    class Partial:
        documented: int = field(default=1, metadata={"help": "has a line"})
        bare: int = 2

    with pytest.raises(ValueError, match="Partial.bare has no metadata"):
        settings_table(Partial)


def test_the_servers_defaults_follow_the_librarys_sections():
    # Re-spelling a default (n_candidates: int = 200) would pass an equality check; here
    # each section's default is changed before server.config loads, and ServerConfig must follow.
    new, got = probe_defaults(DERIVED, "server.config", "ServerConfig")
    for key, (_, cls, name) in DERIVED.items():
        expected = ",".join(new[key]) if key == "event_types" else new[key]
        assert got[key] == expected, f"ServerConfig.{key} does not take its default from {cls}.{name}"


def test_a_setting_named_like_a_library_field_is_derived_from_it():
    server = {f.name for f in dataclasses.fields(ServerConfig)}
    for section in SECTIONS:
        for f in dataclasses.fields(section):
            if f.name in server and f.name not in OTHER_FORM:
                assert f.name in DERIVED, (
                    f"ServerConfig.{f.name} repeats {section.__name__}.{f.name}: "
                    "derive its default and list it in DERIVED"
                )
