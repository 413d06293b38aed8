"""The Grafana dashboard: built with grafana-foundation-sdk, type-checked against Grafana's
published schema types (@grafana/schema) with tsc.

That the committed JSON is what the builder writes, and that every query returns data
from a real Prometheus, is tested in tests/server/test_ops_prometheus.py.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import tempfile
from importlib.metadata import version
from pathlib import Path

import pytest
from ops_tools import DEPLOY

DASHBOARD = DEPLOY / "grafana" / "one2one.json"
SCHEMA_CHECK = DEPLOY / "grafana" / "schema-check"
TSCONFIG = {
    "compilerOptions": {
        "strict": True,
        "noEmit": True,
        "target": "es2022",
        "module": "esnext",
        "moduleResolution": "bundler",
        "types": [],
    }
}


def _check_file(doc: dict) -> str:
    # An object literal, not an imported JSON module: TypeScript then refuses unknown keys
    # (excess property checks) and keeps string values literal for the enums.
    return (
        "import type { One2oneDashboard } from './dashboard-types';\n\n"
        f"export const dashboard: One2oneDashboard = {json.dumps(doc, indent=2)};\n"
    )


def _mutations(doc: dict) -> dict[str, tuple[dict, str]]:
    """Broken copies of the dashboard, each with the tsc error code it must raise."""
    out = {}
    ts_panel = next(i for i, p in enumerate(doc["panels"]) if p["type"] == "timeseries")
    thresholded = next(
        i for i, p in enumerate(doc["panels"]) if "thresholds" in p.get("fieldConfig", {}).get("defaults", {})
    )
    m = copy.deepcopy(doc)
    m["panels"][ts_panel]["gridPos"]["h"] = "8"
    out["wrong_type"] = (m, "TS2322")
    m = copy.deepcopy(doc)
    m["panels"][thresholded]["fieldConfig"]["defaults"]["thresholds"]["mode"] = "absolut"
    out["unknown_enum_value"] = (m, "TS2820")
    m = copy.deepcopy(doc)
    m["panels"][ts_panel]["targetz"] = m["panels"][ts_panel].pop("targets")
    out["unknown_key"] = (m, "TS2353")
    m = copy.deepcopy(doc)
    del m["panels"][ts_panel]["targets"][0]["refId"]
    out["missing_field"] = (m, "TS2741")
    m = copy.deepcopy(doc)
    m["templating"]["list"][0]["hide"] = 7
    out["enum_number_out_of_range"] = (m, "TS2322")
    return out


@pytest.mark.slow
def test_dashboard_type_checks_against_grafana_schema(tsc):
    doc = json.loads(DASHBOARD.read_text())
    mutations = _mutations(doc)
    # Under build/node (tsc is build/node/node_modules/.bin/tsc) so that tsc resolves
    # @grafana/schema from build/node/node_modules.
    work = Path(tempfile.mkdtemp(prefix="dashboard-check-", dir=Path(tsc).parents[2]))
    try:
        shutil.copy(SCHEMA_CHECK / "dashboard-types.ts", work)
        files = {"dashboard.check.ts": _check_file(doc)}
        files |= {f"broken_{name}.ts": _check_file(m) for name, (m, _) in mutations.items()}
        for name, text in files.items():
            (work / name).write_text(text)
        (work / "tsconfig.json").write_text(json.dumps(TSCONFIG | {"files": sorted(files)}))
        out = subprocess.run(
            [tsc, "-p", "tsconfig.json", "--pretty", "false"], cwd=work, capture_output=True, text=True, timeout=300
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    errors: dict[str, list[str]] = {}
    for line in out.stdout.splitlines():
        if m := re.match(r"^(\S+?\.ts)\(\d+,\d+\): error (TS\d+):", line):
            errors.setdefault(m.group(1), []).append(m.group(2))
    assert "dashboard.check.ts" not in errors and "dashboard-types.ts" not in errors, out.stdout + out.stderr
    # The check can fail: every broken copy is refused, with the error its breakage means.
    for name, (_, code) in mutations.items():
        assert code in errors.get(f"broken_{name}.ts", []), f"tsc accepted broken copy {name!r}:\n{out.stdout}"
    assert out.returncode != 0


def test_sdk_and_schema_pins_are_the_same_grafana_release():
    # grafana-foundation-sdk versions read "<build>!<grafana major.minor>.0".
    sdk = version("grafana-foundation-sdk").split("!")[-1]
    package = json.loads((SCHEMA_CHECK / "package.json").read_text())["devDependencies"]
    schema = package["@grafana/schema"]
    assert re.fullmatch(r"\d+\.\d+\.\d+", schema) and re.fullmatch(r"\d+\.\d+\.\d+", package["typescript"]), (
        "npm packages must be pinned exactly"
    )
    assert sdk.split(".")[:2] == schema.split(".")[:2], (
        f"grafana-foundation-sdk is for Grafana {sdk}, @grafana/schema {schema}"
    )
    assert sdk.split(".")[0] == "11"
    lock = json.loads((SCHEMA_CHECK / "package-lock.json").read_text())["packages"]
    assert lock["node_modules/@grafana/schema"]["version"] == schema


def test_dashboard_is_what_grafana_11_expects():
    doc = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in doc["panels"]]
    assert ids == list(range(1, len(ids) + 1)), "panel ids must be unique"
    assert doc["uid"] == "one2one-ops" and doc["schemaVersion"] >= 39
    for p in doc["panels"]:
        if p["type"] == "timeseries":
            assert p["targets"], p["title"]
            assert {t["refId"] for t in p["targets"]} == {chr(ord("A") + i) for i in range(len(p["targets"]))}
            assert all(t["datasource"]["uid"] == "${datasource}" for t in p["targets"]), p["title"]
            g = p["gridPos"]
            assert g["x"] + g["w"] <= 24, p["title"]
