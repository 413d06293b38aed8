"""deploy/Dockerfile: hadolint-clean and running as a non-root user."""

from __future__ import annotations

import json
import re
import subprocess

import pytest
from ops_tools import DEPLOY

DOCKERFILE = DEPLOY / "Dockerfile"


def _lint(hadolint: str, path) -> list[dict]:
    out = subprocess.run([hadolint, "--no-color", "-f", "json", str(path)], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip().startswith("["), out.stdout + out.stderr
    return json.loads(out.stdout)


@pytest.mark.slow
def test_hadolint_reports_nothing(hadolint):
    findings = _lint(hadolint, DOCKERFILE)
    assert findings == [], "\n".join(f"line {f['line']} {f['code']} {f['level']}: {f['message']}" for f in findings)


@pytest.mark.slow
def test_hadolint_would_flag_a_root_image(hadolint, tmp_path):
    # The lint can fail: the same file ending as root (USER root) is flagged (DL3002).
    broken = tmp_path / "Dockerfile"
    broken.write_text(DOCKERFILE.read_text() + "USER root\n")
    assert "DL3002" in {f["code"] for f in _lint(hadolint, broken)}


def test_every_ignored_rule_says_why():
    lines = DOCKERFILE.read_text().splitlines()
    for i, line in enumerate(lines):
        if re.match(r"#\s*hadolint ignore=", line):
            above = lines[i - 1] if i else ""
            assert above.startswith("#") and "hadolint" not in above and len(above) > 20, (
                f"line {i + 1}: an ignored rule needs a comment above it saying why"
            )


def test_final_stage_runs_as_a_fixed_non_root_user():
    text = DOCKERFILE.read_text()
    final = re.split(r"^FROM\s", text, flags=re.M)[-1]
    users = re.findall(r"^USER\s+(\S+)", final, re.M)
    assert users, "the final stage sets no USER: it would run as root"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit() and int(uid) != 0, "numeric uid, so Kubernetes' runAsNonRoot can verify it"
    assert not gid or (gid.isdigit() and int(gid) != 0)
    # Nothing after USER switches back.
    assert final.rstrip().splitlines()[-1].startswith(("CMD", "ENTRYPOINT", "EXPOSE"))
