"""Shared fixtures: a small synthetic shop with planted structure and its published bundle."""
from __future__ import annotations

from pathlib import Path

import pytest

from index_builder.build import build
from index_builder.config import BuildConfig
from index_builder.synthetic import make_shop, write_shop

from tests_support import SMALL_BUILD


@pytest.fixture(scope="session")
def shop():
    return make_shop(n_users=300, n_items=200, n_categories=5, events_per_user=30, seed=7)


@pytest.fixture(scope="session")
def shop_files(shop, tmp_path_factory) -> dict[str, Path]:
    return write_shop(shop, tmp_path_factory.mktemp("shop"), "csv")


@pytest.fixture(scope="session")
def artifacts(shop_files, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("artifacts")
    build(shop_files["events"], shop_files["items"], shop_files["users"], out,
          BuildConfig.load(overrides=SMALL_BUILD), show_progress=False)
    return out


@pytest.fixture(scope="session")
def bundle_path(artifacts) -> Path:
    from ranking import resolve_current

    return resolve_current(artifacts)
