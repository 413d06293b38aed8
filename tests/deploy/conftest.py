"""The tools the deploy checks run: each ecosystem's own (hadolint, kubernetes-validate, tsc)."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest
from ops_tools import ROOT

# `make deps-node` installs the npm packages pinned in deploy/grafana/schema-check here.
NODE_DIR = ROOT / "build" / "node"


def _missing(message: str) -> None:
    """Fail under CI (its setup installs every tool), skip locally with the reason."""
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def venv_tool(name: str) -> str:
    """A console script of a pinned test dependency: beside this interpreter, else on PATH."""
    beside = Path(sys.executable).parent / name
    path = str(beside) if beside.exists() else shutil.which(name)
    if not path:
        _missing(f"{name} not found beside {sys.executable} or on PATH; `make install` installs it (pyproject [test])")
    return str(path)


@pytest.fixture(scope="session")
def hadolint() -> str:
    return venv_tool("hadolint")


@pytest.fixture(scope="session")
def tsc() -> str:
    path = NODE_DIR / "node_modules" / ".bin" / "tsc"
    if not shutil.which("node"):
        _missing("node not found on PATH; `make deps-system` installs Debian's nodejs and npm")
    if not path.exists():
        _missing(f"{path} missing; `make deps-node` installs typescript and @grafana/schema there")
    return str(path)
