"""The Kubernetes manifests: valid for `kubernetes-validate --strict`, hardened, and in agreement
with the code (config keys, ports, probes, paths, CLI flags, the image's user)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import tomllib
from pathlib import Path, PurePosixPath

import pytest
import yaml
from ops_tools import DEPLOY, require_tool

from bench.redis_server import free_port
from index_builder.__main__ import _parser as builder_parser
from server.app import LIVENESS_SERVICE
from server.config import ServerConfig
from server.security import exposure_problem

K8S = DEPLOY / "k8s"
# The oldest Kubernetes the manifests are for, and the newest kubernetes-validate knows.
KUBERNETES_VERSIONS = ("1.30", "1.37")
# The transport-security settings the ConfigMap must set; the server's own loader checks
# their types and how they combine (server_config below).
SECURITY_SETTINGS = (
    "tls_cert_file",
    "tls_key_file",
    "tls_client_ca_file",
    "require_client_auth",
    "auth_tokens_file",
    "health_port",
    "allow_insecure",
    "metrics_tls_cert_file",
    "metrics_tls_key_file",
    "metrics_tls_client_ca_file",
    "reflection",
)
SECRET_FILE_SETTINGS = (
    "tls_cert_file",
    "tls_key_file",
    "tls_client_ca_file",
    "auth_tokens_file",
    "metrics_tls_cert_file",
    "metrics_tls_key_file",
    "metrics_tls_client_ca_file",
)


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
def settings(objects) -> dict:
    """The ConfigMap's [server] table as written."""
    return tomllib.loads(objects[("ConfigMap", "one2one-server")]["data"]["server.toml"])["server"]


@pytest.fixture(scope="module")
def server_config(objects, tmp_path_factory) -> ServerConfig:
    path = tmp_path_factory.mktemp("cm") / "server.toml"
    path.write_text(objects[("ConfigMap", "one2one-server")]["data"]["server.toml"])
    # The real loader: an unknown key, a wrong type or settings that do not go together
    # (a client CA without require_client_auth) fail here, naming the key.
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
        "NetworkPolicy",
        "StatefulSet",
    } <= kinds


def test_configmap_is_a_valid_server_config(server_config):
    assert server_config.host == "0.0.0.0" and server_config.metrics_host == "0.0.0.0"
    assert server_config.drain_notice_seconds > 0
    # Reachable from the cluster, so secure by default must let it start: TLS and callers.
    assert exposure_problem(server_config) is None
    assert server_config.tls_enabled and server_config.metrics_tls_enabled and server_config.auth_enabled
    assert server_config.require_client_auth and server_config.tls_client_ca_file
    assert not server_config.allow_insecure and not server_config.reflection


def test_configmap_with_an_unrequired_client_ca_is_refused(settings, tmp_path):
    # The loader the tests above rely on refuses what gRPC cannot do: a client CA whose
    # certificates are requested but not required.
    path = tmp_path / "server.toml"
    lines = ["[server]"] + [
        f"{k} = {json.dumps(False if k == 'require_client_auth' else v)}" for k, v in settings.items()
    ]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match="tls_client_ca_file"):
        ServerConfig.load(path, env={})


def test_deployment_probes_ports_resources_and_grace(objects, server_config):
    dep = objects[("Deployment", "one2one-server")]
    pod = _pod(dep)
    (c,) = pod["containers"]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {
        "grpc": server_config.port,
        "metrics": server_config.metrics_port,
        "health": server_config.health_port,
    }
    # Readiness on service "", liveness on LIVENESS_SERVICE, by the kubelet's own gRPC probe
    # on the plaintext health-only port (it speaks neither TLS nor tokens).
    expected = {"readinessProbe": "", "livenessProbe": LIVENESS_SERVICE, "startupProbe": LIVENESS_SERVICE}
    for probe, service in expected.items():
        assert set(c[probe]) - {"periodSeconds", "timeoutSeconds", "failureThreshold", "successThreshold"} == {
            "grpc"
        }, probe
        assert c[probe]["grpc"] == {"port": server_config.health_port, "service": service}, probe
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
    services = [
        o for (k, _), o in objects.items() if k == "Service" and o["spec"]["selector"].items() <= labels.items()
    ]
    assert len(services) == 2
    for svc in services:
        assert svc["spec"]["selector"].items() <= labels.items()
        assert {p["targetPort"] for p in svc["spec"]["ports"]} <= port_names
        # The plaintext health port is the kubelet's; no Service offers it to callers.
        assert "health" not in {p["targetPort"] for p in svc["spec"]["ports"]}
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
    claim = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
    dep_claims = {
        v["name"]: v.get("persistentVolumeClaim", {}).get("claimName")
        for v in _pod(objects[("Deployment", "one2one-server")])["volumes"]
    }
    assert claim["artifacts"] == dep_claims["artifacts"]
    assert ("PersistentVolumeClaim", claim["artifacts"]) in objects
    assert "ReadWriteMany" in objects[("PersistentVolumeClaim", claim["artifacts"])]["spec"]["accessModes"]
    for flag in (*parsed.events, parsed.items, parsed.users):  # --events may be repeated
        # Files come from the inputs volume; the shared store is a URL (its own test below).
        assert str(flag).startswith((mounts["inputs"]["mountPath"] + "/", "redis://"))


# --- checked by Kubernetes' own schema -------------------------------------------------


@pytest.mark.parametrize("k8s_version", KUBERNETES_VERSIONS)
def test_every_manifest_passes_kubernetes_validate_strict(k8s_version):
    files = sorted(str(p) for p in K8S.glob("*.yaml"))
    out = subprocess.run(
        [sys.executable, "-m", "kubernetes_validate", "--strict", "-k", k8s_version, *files],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    passed = re.findall(r"^INFO (\S+) passed for resource", out.stdout, re.M)
    documents = sum(1 for p in K8S.glob("*.yaml") for d in yaml.safe_load_all(p.read_text()) if d)
    assert len(passed) == documents, out.stdout


def test_kubernetes_validate_strict_refuses_an_unknown_field(objects, tmp_path):
    # The check above can fail: a misspelt field (readOnlyRootFileSystem) is refused.
    dep = json.loads(json.dumps(objects[("Deployment", "one2one-server")]))
    sc = _pod(dep)["containers"][0]["securityContext"]
    sc["readOnlyRootFileSystem"] = sc.pop("readOnlyRootFilesystem")
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(dep))
    out = subprocess.run(
        [sys.executable, "-m", "kubernetes_validate", "--strict", "-k", KUBERNETES_VERSIONS[0], str(path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode != 0 and "readOnlyRootFileSystem" in out.stdout + out.stderr


# --- hardening ---------------------------------------------------------------------------


def _image_user() -> int:
    """The numeric uid of the final stage's last USER in deploy/Dockerfile."""
    users = re.findall(r"^USER\s+(\S+)", (DEPLOY / "Dockerfile").read_text(), re.M)
    assert users, "deploy/Dockerfile sets no USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit(), "USER must be numeric for runAsNonRoot to verify it"
    return int(uid)


@pytest.mark.parametrize(
    "key", [("Deployment", "one2one-server"), ("CronJob", "one2one-builder"), ("StatefulSet", "one2one-redis")]
)
def test_pods_are_hardened(objects, key):
    pod = _pod(objects[key])
    psc = pod["securityContext"]
    assert psc["runAsNonRoot"] is True
    # Our image's user; Redis runs as its own image's (non-root) user.
    assert psc["runAsUser"] == (_image_user() if key[0] != "StatefulSet" else psc["runAsUser"]) != 0
    assert psc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    volumes = {v["name"]: v for v in pod["volumes"]}
    for claim in objects[key]["spec"].get("volumeClaimTemplates", []):
        volumes[claim["metadata"]["name"]] = {"persistentVolumeClaim": {"claimName": claim["metadata"]["name"]}}
    for c in pod["containers"]:
        sc = c["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
        assert sc["capabilities"] == {"drop": ["ALL"]}
        assert ("privileged" not in sc and "runAsUser" not in sc) or sc["runAsUser"] != 0
        mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
        assert "/tmp" in mounts and not mounts["/tmp"].get("readOnly"), "Python and the libraries need a writable /tmp"
        for m in c["volumeMounts"]:
            vol = volumes[m["name"]]
            if "configMap" in vol or "secret" in vol or "projected" in vol:
                assert m.get("readOnly") is True, m
            if not m.get("readOnly"):
                assert "emptyDir" in vol or "persistentVolumeClaim" in vol, m
            if "emptyDir" in vol:
                assert vol["emptyDir"].get("sizeLimit"), f"{m['name']}: an unbounded emptyDir can fill the node"


def _writable_mount(pod: dict, path: str) -> dict | None:
    volumes = {v["name"]: v for v in pod["volumes"]}
    for m in pod["containers"][0]["volumeMounts"]:
        if PurePosixPath(path).is_relative_to(m["mountPath"]) and not m.get("readOnly"):
            return volumes[m["name"]]
    return None


def test_the_server_writes_only_to_its_writable_volumes(objects, server_config):
    pod = _pod(objects[("Deployment", "one2one-server")])
    # The event log (RecordEvents) and the worker metrics directory (tempfile under /tmp).
    assert "emptyDir" in _writable_mount(pod, str(server_config.event_log_path()))
    assert "emptyDir" in _writable_mount(pod, "/tmp/one2one-metrics-x")
    # The bundle is read, never written, by the servers.
    assert _writable_mount(pod, server_config.artifacts) is None


# --- TLS and token secrets ---------------------------------------------------------------


def _secret_files(pod: dict) -> dict[str, tuple[str, str, dict]]:
    """Every file a Secret puts in the container: path -> (secret, key, mount)."""
    volumes = {v["name"]: v for v in pod["volumes"]}
    out = {}
    for m in pod["containers"][0]["volumeMounts"]:
        vol = volumes[m["name"]]
        sources = [s["secret"] for s in vol.get("projected", {}).get("sources", []) if "secret" in s]
        if "secret" in vol:
            sources.append({"name": vol["secret"]["secretName"], "items": vol["secret"].get("items", [])})
        for src in sources:
            assert src.get("items"), f"{m['name']}: list the Secret's keys so a missing one fails the pod"
            for item in src["items"]:
                out[str(PurePosixPath(m["mountPath"]) / item["path"])] = (src["name"], item["key"], m)
    return out


def test_tls_and_token_secrets_are_mounted_where_the_settings_point(objects, settings):
    for key in SECURITY_SETTINGS:
        assert key in settings, f"{key} missing from the ConfigMap"
    pod = _pod(objects[("Deployment", "one2one-server")])
    files = _secret_files(pod)
    for key in SECRET_FILE_SETTINGS:
        assert settings[key] in files, f"{key} = {settings[key]!r} is not a file any mounted Secret provides"
        mount = files[settings[key]][2]
        # subPath mounts never see a renewed Secret: rotation needs the whole volume.
        assert "subPath" not in mount and "subPathExpr" not in mount, mount
    assert files[settings["tls_cert_file"]][:2] == ("one2one-server-tls", "tls.crt")
    assert files[settings["tls_key_file"]][:2] == ("one2one-server-tls", "tls.key")
    assert files[settings["auth_tokens_file"]][0] != "one2one-server-tls"
    # Callers' certificates are checked against the client CA, not the server's own CA.
    assert files[settings["tls_client_ca_file"]][0] == "one2one-client-ca"
    assert settings["metrics_tls_client_ca_file"] == settings["tls_client_ca_file"]
    # Secrets are not world-readable (the pod's fsGroup reads them).
    volumes = {v["name"]: v for v in pod["volumes"]}
    for name in {m["name"] for _, _, m in files.values()}:
        vol = volumes[name]
        mode = (vol.get("projected") or vol.get("secret"))["defaultMode"]
        assert mode & 0o007 == 0, f"{name}: defaultMode {mode:o} lets any user read the secret"
    # Prometheus scrapes over https when the metrics port has a certificate.
    annotations = objects[("Deployment", "one2one-server")]["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scheme"] == ("https" if settings["metrics_tls_cert_file"] else "http")


# --- network policy ----------------------------------------------------------------------


def test_network_policy_admits_only_labelled_callers_and_monitoring(objects):
    dep = objects[("Deployment", "one2one-server")]
    labels = dep["spec"]["template"]["metadata"]["labels"]
    ports = {p["name"]: p["containerPort"] for p in _pod(dep)["containers"][0]["ports"]}
    np = objects[("NetworkPolicy", "one2one-server")]["spec"]
    assert np["podSelector"]["matchLabels"].items() <= labels.items()
    assert set(np["policyTypes"]) == {"Ingress", "Egress"}
    _egress_only_to_redis_and_dns(objects, np)
    by_port = {}
    for rule in np["ingress"]:
        assert rule.get("from") and rule.get("ports"), "a rule without from or ports admits everyone"
        for port in rule["ports"]:
            assert port["port"] in ports, f"{port['port']} is no container port"
            by_port[port["port"]] = rule["from"]
    assert set(by_port) == {"grpc", "metrics"}
    (callers,) = by_port["grpc"]
    assert callers["podSelector"]["matchLabels"] and callers["namespaceSelector"]["matchLabels"]
    (monitoring,) = by_port["metrics"]
    assert monitoring == {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
    builder = objects[("NetworkPolicy", "one2one-builder")]["spec"]
    cron_labels = objects[("CronJob", "one2one-builder")]["spec"]["jobTemplate"]["spec"]["template"]["metadata"][
        "labels"
    ]
    assert builder["podSelector"]["matchLabels"].items() <= cron_labels.items()
    assert builder["ingress"] == []
    _egress_only_to_redis_and_dns(objects, builder)


def _egress_only_to_redis_and_dns(objects, policy: dict) -> None:
    redis_labels = objects[("StatefulSet", "one2one-redis")]["spec"]["template"]["metadata"]["labels"]
    redis_port = objects[("Service", "one2one-redis")]["spec"]["ports"][0]["port"]
    (to_redis, to_dns) = policy["egress"]
    (peer,) = to_redis["to"]
    assert peer["podSelector"]["matchLabels"].items() <= redis_labels.items()
    assert to_redis["ports"] == [{"port": redis_port, "protocol": "TCP"}]
    (dns,) = to_dns["to"]
    assert dns["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "kube-system"}
    assert {p["port"] for p in to_dns["ports"]} == {53}


def test_servers_and_builder_share_the_redis_store_with_its_secret(objects):
    """The Deployment points at the StatefulSet's first pod through its headless Service, with the
    password from the Secret Redis itself reads; the builder reads the same store and prefix."""
    from ranking import split_store_url

    sts = objects[("StatefulSet", "one2one-redis")]
    svc = objects[("Service", "one2one-redis")]
    host = f"{sts['metadata']['name']}-0.{svc['metadata']['name']}"
    redis_secret = next(
        v["secret"]["secretName"]
        for v in _pod(sts)["volumes"]
        if "secret" in v and "redis" in v["secret"]["secretName"]
    )
    server = _pod(objects[("Deployment", "one2one-server")])["containers"][0]
    env = {e["name"]: e for e in server["env"]}
    assert env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == redis_secret
    url = env["ONE2ONE_EVENT_STORE"]["value"]
    names = [e["name"] for e in server["env"]]
    assert names.index("REDIS_PASSWORD") < names.index("ONE2ONE_EVENT_STORE"), "$(VAR) expands only earlier vars"
    assert url.startswith(f"redis://:$(REDIS_PASSWORD)@{host}:{svc['spec']['ports'][0]['port']}/")
    _, prefix = split_store_url(url)
    # The server's own loader accepts it, as the environment gives it.
    ServerConfig.load(None, env={"ONE2ONE_ARTIFACTS": "/artifacts", "ONE2ONE_EVENT_STORE": url}).validate()
    builder = _pod(objects[("CronJob", "one2one-builder")])["containers"][0]
    events = [a for i, a in enumerate(builder["args"]) if i and builder["args"][i - 1] == "--events"]
    assert url in events, "the builder reads the store the servers write"
    benv = {e["name"]: e for e in builder["env"]}
    assert benv["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == redis_secret
    assert split_store_url(url)[1] == prefix


# --- the shared event store (Redis) ------------------------------------------------------


def _redis_conf(objects) -> dict[str, str]:
    conf = {}
    for line in objects[("ConfigMap", "one2one-redis")]["data"]["redis.conf"].splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.strip().partition(" ")
            conf[key] = value
    return conf


def test_redis_keeps_every_acknowledged_event_on_a_persistent_volume(objects):
    conf = _redis_conf(objects)
    # An OK from RecordEvents is durable only with every write fsynced to the AOF.
    assert conf["appendonly"] == "yes" and conf["appendfsync"] == "always"
    # A full Redis refuses writes rather than evicting purchases or stream entries.
    assert conf["maxmemory-policy"] == "noeviction"
    sts = objects[("StatefulSet", "one2one-redis")]
    assert sts["spec"]["replicas"] == 1
    pod = _pod(sts)
    (c,) = pod["containers"]
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"] and claim["spec"]["resources"]["requests"]["storage"]
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    assert mounts[claim["metadata"]["name"]] == conf["dir"], "the AOF must be written to the claimed volume"
    assert sts["spec"]["persistentVolumeClaimRetentionPolicy"]["whenDeleted"] == "Retain"
    # The config Redis reads is the ConfigMap's.
    config_volume = next(v for v in pod["volumes"] if v.get("configMap", {}).get("name") == "one2one-redis")
    assert PurePosixPath(mounts[config_volume["name"]]) / "redis.conf" == PurePosixPath(
        re.search(r"redis-server (\S+)", c["args"][0]).group(1)
    )
    # maxmemory leaves the container room for the AOF rewrite's fork.
    limit_mib = int(c["resources"]["limits"]["memory"].removesuffix("Gi")) * 1024
    assert int(conf["maxmemory"].removesuffix("mb")) <= 0.8 * limit_mib
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert probe in c, probe
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(c["resources"][kind])
    port = c["ports"][0]
    assert port["containerPort"] == int(conf["port"])
    # Headless Service: the stable per-pod name in the servers' URL.
    svc = objects[("Service", sts["spec"]["serviceName"])]
    assert svc["spec"]["clusterIP"] == "None"
    assert svc["spec"]["selector"].items() <= sts["spec"]["template"]["metadata"]["labels"].items()
    assert [p["targetPort"] for p in svc["spec"]["ports"]] == [port["name"]]


def test_redis_password_comes_from_a_secret_never_an_argument(objects):
    pod = _pod(objects[("StatefulSet", "one2one-redis")])
    (c,) = pod["containers"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    secret_mounts = {
        m["mountPath"]: volumes[m["name"]]["secret"]
        for m in c["volumeMounts"]
        if "secret" in volumes.get(m["name"], {})
    }
    ((path, secret),) = secret_mounts.items()
    assert secret["secretName"] == "one2one-redis-auth" and secret["items"] == [{"key": "password", "path": "password"}]
    assert secret["defaultMode"] & 0o007 == 0
    assert f"{path}/password" in c["args"][0] and "requirepass" not in " ".join(c["command"])
    assert "--requirepass" not in c["args"][0], "a password on the command line is in the process list"
    np_ = objects[("NetworkPolicy", "one2one-redis")]["spec"]
    assert np_["egress"] == [] and set(np_["policyTypes"]) == {"Ingress", "Egress"}
    (rule,) = np_["ingress"]
    components = {peer["podSelector"]["matchLabels"]["app.kubernetes.io/component"] for peer in rule["from"]}
    assert components == {"server", "builder"}


def test_redis_container_command_starts_a_durable_password_protected_redis(objects, tmp_path):
    """The StatefulSet's own start-up script and readiness probe, run against Debian's
    redis-server with the ConfigMap's redis.conf (only paths and the port moved to tmp_path)."""
    redis_server = require_tool("redis-server")
    require_tool("redis-cli")
    pod = _pod(objects[("StatefulSet", "one2one-redis")])
    (c,) = pod["containers"]
    port = free_port()
    password = "0123456789abcdef" * 4
    (tmp_path / "secret").mkdir()
    (tmp_path / "secret" / "password").write_text(password)
    (tmp_path / "data").mkdir()
    conf = objects[("ConfigMap", "one2one-redis")]["data"]["redis.conf"]
    conf = conf.replace("port 6379", f"port {port}").replace("dir /data", f"dir {tmp_path / 'data'}")
    conf = conf.replace("bind 0.0.0.0 -::*", "bind 127.0.0.1")
    (tmp_path / "redis.conf").write_text(conf)

    def local(script: str) -> str:
        return (
            script.replace("/tmp/auth.conf", str(tmp_path / "auth.conf"))
            .replace("/run/secrets/one2one-redis", str(tmp_path / "secret"))
            .replace("/etc/redis/redis.conf", str(tmp_path / "redis.conf"))
            .replace("exec redis-server", f"exec {redis_server}")
            .replace("redis-cli -h 127.0.0.1", f"redis-cli -h 127.0.0.1 -p {port}")
        )

    proc = subprocess.Popen(["sh", "-c", local(c["args"][0])], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        ready = local(c["readinessProbe"]["exec"]["command"][2])
        deadline = time.monotonic() + 15
        while subprocess.run(["sh", "-c", ready]).returncode != 0:
            assert proc.poll() is None, "redis-server exited: the ConfigMap's redis.conf is refused"
            assert time.monotonic() < deadline, "the readiness probe never passed"
            time.sleep(0.1)
        import redis

        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=port).ping()
        r = redis.Redis(port=port, password=password)
        got = {k: r.config_get(k)[k] for k in ("appendonly", "appendfsync", "maxmemory-policy", "save")}
        assert got == {"appendonly": "yes", "appendfsync": "always", "maxmemory-policy": "noeviction", "save": ""}
        # sh exec'd into redis-server: its arguments are what the process list shows.
        cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes()
        assert b"redis-server" in cmdline and password.encode() not in cmdline
        assert os.stat(tmp_path / "auth.conf").st_mode & 0o077 == 0
    finally:
        proc.terminate()
        proc.wait(10)
