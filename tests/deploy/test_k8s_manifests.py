"""The Kubernetes manifests agree with the code: config keys, ports, probes, paths, CLI flags."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from ops_tools import DEPLOY

from index_builder.__main__ import _parser as builder_parser
from server.app import LIVENESS_SERVICE
from server.config import ServerConfig

K8S = DEPLOY / "k8s"


@pytest.fixture(scope="module")
def objects() -> dict[tuple[str, str], dict]:
    out = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                key = (doc["kind"], doc["metadata"]["name"])
                assert key not in out, f"{key} defined twice"
                out[key] = doc
    return out


@pytest.fixture(scope="module")
def server_config(objects, tmp_path_factory) -> ServerConfig:
    toml = objects[("ConfigMap", "one2one-server")]["data"]["server.toml"]
    path = tmp_path_factory.mktemp("cm") / "server.toml"
    path.write_text(toml)
    # The real loader: an unknown key or a wrong type fails here, naming it.
    return ServerConfig.load(path, env={})


def _pod(obj: dict) -> dict:
    spec = obj["spec"]
    if obj["kind"] == "CronJob":
        spec = spec["jobTemplate"]["spec"]
    return spec["template"]["spec"]


def test_every_piece_is_there(objects):
    kinds = {k for k, _ in objects}
    assert {
        "Deployment",
        "Service",
        "HorizontalPodAutoscaler",
        "ConfigMap",
        "CronJob",
        "PersistentVolumeClaim",
        "PodDisruptionBudget",
    } <= kinds


def test_configmap_is_a_valid_server_config(server_config):
    assert server_config.host == "0.0.0.0" and server_config.metrics_host == "0.0.0.0"
    assert server_config.drain_notice_seconds > 0


def test_deployment_probes_ports_resources_and_grace(objects, server_config):
    dep = objects[("Deployment", "one2one-server")]
    pod = _pod(dep)
    (c,) = pod["containers"]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"grpc": server_config.port, "metrics": server_config.metrics_port}
    assert c["readinessProbe"]["grpc"] == {"port": server_config.port, "service": ""}
    assert c["livenessProbe"]["grpc"] == {"port": server_config.port, "service": LIVENESS_SERVICE}
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(c["resources"][kind])
    # A CPU limit is a quota the process cannot see: one worker per CPU of the limit, set
    # explicitly, or the default would start one per CPU of the node.
    assert server_config.workers == int(c["resources"]["limits"]["cpu"])
    assert pod["terminationGracePeriodSeconds"] > server_config.drain_notice_seconds + server_config.drain_seconds
    annotations = dep["spec"]["template"]["metadata"]["annotations"]
    assert int(annotations["prometheus.io/port"]) == server_config.metrics_port
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    assert mounts["artifacts"] == server_config.artifacts
    assert "--config" in c["args"] and Path(c["args"][c["args"].index("--config") + 1]).parent == Path(mounts["config"])
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_services_and_autoscaler_point_at_the_deployment(objects):
    dep = objects[("Deployment", "one2one-server")]
    labels = dep["spec"]["template"]["metadata"]["labels"]
    port_names = {p["name"] for p in _pod(dep)["containers"][0]["ports"]}
    services = [o for (k, _), o in objects.items() if k == "Service"]
    assert len(services) == 2
    for svc in services:
        assert svc["spec"]["selector"].items() <= labels.items()
        assert {p["targetPort"] for p in svc["spec"]["ports"]} <= port_names
    hpa = objects[("HorizontalPodAutoscaler", "one2one-server")]
    assert hpa["spec"]["scaleTargetRef"]["name"] == dep["metadata"]["name"]
    assert 2 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]
    assert _pod(dep)["containers"][0]["resources"]["requests"]["cpu"], "HPA on CPU needs a CPU request"


def test_builder_cronjob_publishes_to_the_volume_the_servers_read(objects, server_config):
    cron = objects[("CronJob", "one2one-builder")]
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    pod = _pod(cron)
    (c,) = pod["containers"]
    args = c["args"]
    assert args[:3] == ["python", "-m", "index_builder"]
    parsed = builder_parser().parse_args(args[3:])  # the real CLI: unknown flags fail here
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    assert str(parsed.out) == mounts["artifacts"]["mountPath"] and not mounts["artifacts"].get("readOnly")
    claim = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]}
    dep_claims = {
        v["name"]: v.get("persistentVolumeClaim", {}).get("claimName")
        for v in _pod(objects[("Deployment", "one2one-server")])["volumes"]
    }
    assert claim["artifacts"] == dep_claims["artifacts"]
    assert ("PersistentVolumeClaim", claim["artifacts"]) in objects
    assert "ReadWriteMany" in objects[("PersistentVolumeClaim", claim["artifacts"])]["spec"]["accessModes"]
    for flag in (*parsed.events, parsed.items, parsed.users):  # --events may be repeated
        assert str(flag).startswith(mounts["inputs"]["mountPath"] + "/")
