"""Shared fixtures: a small synthetic shop with planted structure and its published bundle."""

from __future__ import annotations

from pathlib import Path

import pytest
from tests_support import SMALL_BUILD

from index_builder.build import build
from index_builder.config import BuildConfig
from index_builder.synthetic import make_shop, write_shop


@pytest.fixture(scope="session")
def shop():
    return make_shop(n_users=300, n_items=200, n_categories=5, events_per_user=30, seed=7)


@pytest.fixture(scope="session")
def shop_files(shop, tmp_path_factory) -> dict[str, Path]:
    return write_shop(shop, tmp_path_factory.mktemp("shop"), "csv")


@pytest.fixture(scope="session")
def artifacts(shop_files, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("artifacts")
    build(
        shop_files["events"],
        shop_files["items"],
        shop_files["users"],
        out,
        BuildConfig.load(overrides=SMALL_BUILD),
        show_progress=False,
    )
    return out


@pytest.fixture(scope="session")
def bundle_path(artifacts) -> Path:
    from ranking import resolve_current

    return resolve_current(artifacts)


# Fixtures whose use makes a test slow: each builds a bundle (fits the shop end to end),
# or hands over the shop's files for a test to build one. `artifacts` also stands behind
# every test that starts a real server, since a server needs a bundle to serve.
# Tests that are slow for other reasons (a server with no bundle, promtool, the network,
# a CLI that imports the whole builder) carry @pytest.mark.slow themselves.
_SLOW_FIXTURES = {"artifacts", "shop_files", "context_model", "blind_model"}


def pytest_collection_modifyitems(config, items):
    """Mark slow every test that builds a bundle, so `-m "not slow"` is the fast tier."""
    for item in items:
        if _SLOW_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
