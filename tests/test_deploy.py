"""The deployment files under ``deploy/``: the Kubernetes manifests are valid for Kubernetes (checked against
its JSON schemas by ``kubernetes-validate``, offline) and say what the server needs (probes, drain timing,
models, settings, the autoscaler's metric) and run it locked down (non-root, read-only root file system, no
capabilities, a NetworkPolicy, a placeholder key the server refuses); the HAProxy configuration is accepted
by ``haproxy -c``, has the balancing, health-check, retry and stickiness rules the replicas rely on, and
keeps the admin routes to the admin network (checked against a running HAProxy too).

How HAProxy behaves in front of running replicas is tested elsewhere; this file checks the files."""

from __future__ import annotations

import contextlib
import copy
import http.client
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import latest_version

from conftest import free_port
from localai_aio.app import create_app
from localai_aio.config import (
    PLACEHOLDER_API_KEY,
    SETTINGS,
    ConfigError,
    ServerSettings,
    conf_file,
    load_settings,
)

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "kubernetes"
ADAPTER = K8S / "prometheus-adapter"
HAPROXY_CFG = ROOT / "deploy" / "haproxy" / "haproxy.cfg"

# Kubernetes 1.31 is the newest release every kubernetes-validate>=1.31 ships schemas for; the newest one the
# installed package knows is checked too. Everything the manifests use is GA in both.
K8S_VERSIONS = sorted({"1.31.0", latest_version()})
METRIC = "localai_model_queue_length"


def manifest_files() -> list[Path]:
    return sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


def load_docs(path: Path) -> list[dict[str, Any]]:
    with path.open() as f:
        return [doc for doc in yaml.safe_load_all(f) if doc is not None]


def all_docs() -> list[dict[str, Any]]:
    return [doc for path in manifest_files() for doc in load_docs(path)]


def one(kind: str) -> dict[str, Any]:
    [doc] = [doc for doc in all_docs() if doc["kind"] == kind]
    return doc


def pod_spec() -> dict[str, Any]:
    return one("Deployment")["spec"]["template"]["spec"]


def server_container() -> dict[str, Any]:
    [container] = pod_spec()["containers"]
    return container


def manifest_env() -> dict[str, str]:
    """The environment the server container gets: the ConfigMap's and the Secret's entries."""
    env: dict[str, str] = {}
    for source in server_container()["envFrom"]:
        if "configMapRef" in source:
            cm = one("ConfigMap")
            assert source["configMapRef"]["name"] == cm["metadata"]["name"]
            env.update(cm["data"])
        else:
            secret = one("Secret")
            assert source["secretRef"]["name"] == secret["metadata"]["name"]
            env.update(secret["stringData"])
    return env


# -- Kubernetes: schema validation -------------------------------------------------------------------------

@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("path", manifest_files(), ids=lambda p: p.name)
def test_manifest_is_valid_kubernetes(path: Path, version: str) -> None:
    docs = load_docs(path)
    assert docs, f"{path.name} holds no document"
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{path.name}: {doc['kind']} {doc['metadata']['name']}: {exc.message} "
                        f"at {'.'.join(map(str, exc.path))}")


def test_expected_objects_are_there() -> None:
    kinds = sorted(doc["kind"] for doc in all_docs())
    assert kinds == sorted(["ConfigMap", "Secret", "Deployment", "Service", "PodDisruptionBudget",
                            "HorizontalPodAutoscaler", "NetworkPolicy"])
    # namespace-agnostic: `kubectl apply -k ... -n NAMESPACE` chooses it
    assert all("namespace" not in doc["metadata"] for doc in all_docs())
    assert "namespace" not in yaml.safe_load((K8S / "kustomization.yaml").read_text())


@pytest.mark.parametrize("mistake", ["misspelled field", "wrong type", "unknown top-level field"])
def test_validator_rejects_a_broken_manifest(mistake: str) -> None:
    """The check above proves something only if a mistake makes it fail."""
    broken = copy.deepcopy(one("Deployment"))
    container = broken["spec"]["template"]["spec"]["containers"][0]
    if mistake == "misspelled field":
        container["readinesProbe"] = container.pop("readinessProbe")
    elif mistake == "wrong type":
        broken["spec"]["replicas"] = "two"
    else:
        broken["spec"]["template"]["spec"]["terminationGracePeriod"] = 45
    kubernetes_validate.validate(one("Deployment"), K8S_VERSIONS[0], strict=True)
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSIONS[0], strict=True)


def test_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert kustomization["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
    assert kustomization["kind"] == "Kustomization"
    resources = kustomization["resources"]
    assert len(resources) == len(set(resources))
    assert sorted(resources) == [p.name for p in manifest_files()]
    # the image placeholder is set in one place, and it is the one the containers name
    [image] = kustomization["images"]
    containers = pod_spec()["initContainers"] + pod_spec()["containers"]
    assert {c["image"] for c in containers} == {f"{image['name']}:latest"}


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed (renders the kustomization)")
def test_kustomization_renders_valid_objects() -> None:
    rendered = subprocess.run(["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, timeout=120)
    assert rendered.returncode == 0, rendered.stderr
    docs = [doc for doc in yaml.safe_load_all(rendered.stdout) if doc is not None]
    assert sorted(doc["kind"] for doc in docs) == sorted(doc["kind"] for doc in all_docs())
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSIONS[-1], strict=True)


# -- Kubernetes: what the server needs ---------------------------------------------------------------------

def test_probes_use_health_endpoints() -> None:
    container = server_container()
    [port] = container["ports"]
    for probe, path in (("livenessProbe", "/healthz"), ("startupProbe", "/healthz"), ("readinessProbe", "/readyz")):
        assert container[probe]["httpGet"]["path"] == path, probe
        assert container[probe]["httpGet"]["port"] in (port["name"], port["containerPort"]), probe


def test_container_listens_where_the_probes_and_service_look() -> None:
    settings = load_settings({}, manifest_env())
    [port] = server_container()["ports"]
    assert settings.host == "0.0.0.0"
    assert settings.port == port["containerPort"]
    service = one("Service")
    [service_port] = service["spec"]["ports"]
    assert service_port["targetPort"] in (port["name"], port["containerPort"])
    labels = one("Deployment")["spec"]["template"]["metadata"]["labels"]
    for selector in (service["spec"]["selector"], one("PodDisruptionBudget")["spec"]["selector"]["matchLabels"],
                     one("Deployment")["spec"]["selector"]["matchLabels"]):
        assert selector.items() <= labels.items()


def test_init_container_installs_the_default_models() -> None:
    spec = pod_spec()
    [init] = spec["initContainers"]
    command = init["command"]
    assert command[:3] == ["python", "-m", "localai_aio"]
    assert command[3:5] == ["models", "install"]
    assert "--defaults" in command
    models_dir = command[command.index("--models-path") + 1]
    assert models_dir == "/models"
    # the server reads the same volume at the path its settings name
    volume = next(m["name"] for m in init["volumeMounts"] if m["mountPath"] == models_dir)
    assert {"name": volume, "mountPath": models_dir, "readOnly": True} in server_container()["volumeMounts"]
    assert load_settings({}, manifest_env()).models_path == models_dir
    [declared] = [v for v in spec["volumes"] if v["name"] == volume]
    assert "emptyDir" in declared
    # the preloaded models (what readiness waits for) are the ones the init container installs
    defaults = yaml.safe_load(conf_file("gallery.yaml").read_text())["defaults"]
    assert sorted(load_settings({}, manifest_env()).preload_models) == sorted(defaults)


def prestop_seconds(container: dict[str, Any]) -> float:
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[:2] == ["python", "-c"], "the image may have no shell or sleep binary"
    match = re.fullmatch(r"import time; time\.sleep\((\d+(?:\.\d+)?)\)", command[2])
    assert match, command
    return float(match.group(1))


def test_termination_grace_covers_prestop_and_shutdown_grace() -> None:
    pause = prestop_seconds(server_container())
    assert pause >= 2, "the balancer needs a moment to see the pod go"
    grace = load_settings({}, manifest_env()).shutdown_grace
    assert grace == float(one("ConfigMap")["data"]["LOCALAI_SHUTDOWN_GRACE"])
    assert pod_spec()["terminationGracePeriodSeconds"] > pause + grace


def test_settings_from_configmap_and_secret_are_valid() -> None:
    env = manifest_env()
    known = {var for s in SETTINGS for var in s.env}
    localai = {key for key in env if key.startswith("LOCALAI_")}
    assert localai <= known, f"not server settings: {sorted(localai - known)}"
    assert set(env) - localai <= {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION",
                                  "AWS_ENDPOINT_URL"}
    settings = load_settings({}, env)  # every value parses
    # shared state: PostgreSQL and S3, with their secrets in the Secret, not the ConfigMap
    secret = one("Secret")["stringData"]
    assert secret["LOCALAI_DATABASE_URL"].startswith("postgresql://")
    assert {"LOCALAI_API_KEY", "LOCALAI_ADMIN_API_KEYS", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(secret)
    assert not {"LOCALAI_DATABASE_URL", "LOCALAI_API_KEY", "LOCALAI_ADMIN_API_KEYS",
                "AWS_SECRET_ACCESS_KEY"} & set(one("ConfigMap")["data"])
    assert settings.blob_url.startswith("s3://")
    # decoding threads match the CPU the container asks for (unset, the node's CPU count would be used)
    assert settings.threads == int(server_container()["resources"]["requests"]["cpu"])


def test_resources_fit_the_default_models() -> None:
    resources = server_container()["resources"]

    def gib(quantity: str) -> float:
        number, unit = re.fullmatch(r"(\d+(?:\.\d+)?)(Mi|Gi)", quantity).groups()
        return float(number) / (1024 if unit == "Mi" else 1)

    assert gib(resources["requests"]["memory"]) >= 2  # the default set alone needs about 1.5 GiB
    assert gib(resources["limits"]["memory"]) >= gib(resources["requests"]["memory"])
    assert int(resources["requests"]["cpu"]) >= 1


def test_autoscaler_scales_the_deployment_on_queue_length() -> None:
    hpa = one("HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    deployment = one("Deployment")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == ("apps/v1", "Deployment",
                                                                      deployment["metadata"]["name"])
    [metric] = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    assert metric["pods"]["metric"]["name"] == METRIC
    assert metric["pods"]["target"]["type"] == "AverageValue"
    assert hpa["spec"]["minReplicas"] <= deployment["spec"]["replicas"] <= hpa["spec"]["maxReplicas"]
    assert hpa["spec"]["minReplicas"] >= 2


def test_prometheus_adapter_rule_serves_the_metric() -> None:
    values = yaml.safe_load((ADAPTER / "values.yaml").read_text())
    [rule] = [r for r in values["rules"]["custom"] if METRIC in r["seriesQuery"]]
    assert re.fullmatch(rule["name"]["matches"], METRIC)
    assert rule["name"]["as"] == METRIC
    # per pod, so the HPA's Pods metric finds it
    assert rule["resources"]["overrides"]["pod"] == {"resource": "pod"}
    assert rule["resources"]["overrides"]["namespace"] == {"resource": "namespace"}
    assert "<<.Series>>" in rule["metricsQuery"] and "<<.GroupBy>>" in rule["metricsQuery"]


def test_pod_monitor_scrapes_the_replicas_with_an_admin_key() -> None:
    [monitor] = load_docs(ADAPTER / "podmonitor.yaml")
    assert monitor["kind"] == "PodMonitor"
    labels = one("Deployment")["spec"]["template"]["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
    [endpoint] = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] == server_container()["ports"][0]["name"]
    assert endpoint["path"] == "/metrics"
    credentials = endpoint["authorization"]["credentials"]
    assert credentials["name"] == one("Secret")["metadata"]["name"]
    assert credentials["key"] == "LOCALAI_ADMIN_API_KEYS"  # /metrics refuses user keys
    assert credentials["key"] in one("Secret")["stringData"]


# -- Kubernetes: locked down -------------------------------------------------------------------------------

def all_containers() -> list[dict[str, Any]]:
    return pod_spec()["initContainers"] + pod_spec()["containers"]


def test_pods_run_as_non_root_without_privileges_or_a_token() -> None:
    spec = pod_spec()
    assert spec["automountServiceAccountToken"] is False  # the server never calls the Kubernetes API
    pod = spec["securityContext"]
    assert pod["runAsNonRoot"] is True
    assert pod["runAsUser"] > 0 and pod["runAsGroup"] > 0 and pod["fsGroup"] == pod["runAsGroup"]
    assert pod["seccompProfile"] == {"type": "RuntimeDefault"}
    for container in all_containers():
        context = container["securityContext"]
        assert context["readOnlyRootFilesystem"] is True, container["name"]
        assert context["allowPrivilegeEscalation"] is False, container["name"]
        assert context["capabilities"] == {"drop": ["ALL"]}, container["name"]
        # nothing in a container undoes the pod's settings
        assert not {"privileged", "runAsUser", "runAsGroup", "runAsNonRoot", "seccompProfile"} & set(context)


def test_what_the_processes_write_is_on_writable_volumes() -> None:
    """With a read-only root file system, every place written to is an emptyDir mounted writable."""
    spec = pod_spec()
    empty_dirs = {volume["name"] for volume in spec["volumes"] if "emptyDir" in volume}
    settings = load_settings({}, manifest_env())
    [init] = spec["initContainers"]
    for container in all_containers():
        writable = {m["mountPath"] for m in container["volumeMounts"] if not m.get("readOnly")}
        assert {m["name"] for m in container["volumeMounts"]} <= empty_dirs, container["name"]
        env = {item["name"]: item["value"] for item in container["env"]}
        for var in ("HOME", "TMPDIR", "XDG_CACHE_HOME"):  # temporary files, pip's and Hugging Face's caches
            assert env[var] in writable, (container["name"], var)
        assert "/tmp" in writable
        needed = {settings.models_path} if container["name"] == init["name"] else {settings.config_dir}
        assert needed <= writable, container["name"]
    assert settings.models_path not in {m["mountPath"] for m in server_container()["volumeMounts"]
                                        if not m.get("readOnly")}  # the server only reads the models


def test_network_policy_admits_only_the_balancer_and_the_scraper() -> None:
    policy = one("NetworkPolicy")["spec"]
    labels = one("Deployment")["spec"]["template"]["metadata"]["labels"]
    assert policy["podSelector"]["matchLabels"].items() <= labels.items()
    assert policy["policyTypes"] == ["Ingress"]
    [port] = server_container()["ports"]
    peers = []
    for rule in policy["ingress"]:
        assert rule["from"], "a rule without 'from' admits every source"
        assert rule["ports"] == [{"port": port["name"], "protocol": "TCP"}]
        for peer in rule["from"]:
            assert set(peer) <= {"podSelector", "namespaceSelector"}, "no address ranges: pods, by their labels"
            assert peer["podSelector"]["matchLabels"], "an empty pod selector admits every pod"
            if "namespaceSelector" in peer:
                assert peer["namespaceSelector"]["matchLabels"], "an empty namespace selector admits every namespace"
            peers.append(peer["podSelector"]["matchLabels"])
    assert {"app.kubernetes.io/name": "ingress-nginx"} in peers  # the ingress controller
    assert {"localai-aio/balancer": "true"} in peers  # a balancer of one's own
    assert {"app.kubernetes.io/name": "prometheus"} in peers  # the scraper of the autoscaler's metric
    documented = (K8S / "networkpolicy.yaml").read_text()
    for selector in peers:
        for key, value in selector.items():
            assert f"{key}={value}" in documented, "each selector is explained in the file's comments"


def test_the_secrets_placeholder_key_is_refused_at_start(tmp_path: Path) -> None:
    placeholder = one("Secret")["stringData"]["LOCALAI_API_KEY"]
    assert placeholder == PLACEHOLDER_API_KEY
    settings = ServerSettings(models_path=str(tmp_path / "m"), config_dir=str(tmp_path / "d"))
    with pytest.raises(ConfigError, match="placeholder"):
        create_app(settings.replace(api_keys=("a-real-key", placeholder)))
    create_app(settings.replace(api_keys=("a-real-key",)))
    env = {**os.environ, "LOCALAI_API_KEY": placeholder}
    done = subprocess.run([sys.executable, "-m", "localai_aio", "serve", "--models-path", str(tmp_path / "m"),
                           "--config-dir", str(tmp_path / "d"), "--address", f"127.0.0.1:{free_port()}"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    [line] = done.stderr.strip().splitlines()  # one line, no traceback
    assert PLACEHOLDER_API_KEY in line and "LOCALAI_API_KEY" in line


# -- HAProxy -----------------------------------------------------------------------------------------------

HAPROXY_ENV = {"LB_BIND": "127.0.0.1:18080", "REPLICA1_ADDR": "10.0.0.11:8080", "REPLICA2_ADDR": "10.0.0.12:8080",
               "LB_STATS_BIND": "127.0.0.1:18404", "LB_LOG": "stdout"}


def haproxy_sections() -> dict[str, list[str]]:
    """Each section's directives ("backend NAME" -> lines), without comments and blank lines."""
    sections: dict[str, list[str]] = {}
    current: list[str] = []
    for raw in HAPROXY_CFG.read_text().splitlines():
        line = raw.split("#", 1)[0].strip() if not raw.lstrip().startswith("#") else ""
        if not line:
            continue
        if not raw[0].isspace():
            current = sections.setdefault(line, [])
        else:
            current.append(" ".join(shlex.split(line, posix=False)))
    return sections


def section(kind: str) -> list[str]:
    """The directives of the configuration's one section of that kind ("frontend", "backend")."""
    sections = haproxy_sections()
    [name] = [s for s in sections if s.startswith(kind + " ")]
    return sections[name]


def test_haproxy_balances_and_checks_readiness() -> None:
    lines = section("backend")
    assert "balance leastconn" in lines
    assert "option httpchk GET /readyz" in lines
    assert "http-check expect status 200" in lines
    [check] = [line for line in lines if line.startswith("default-server")]
    words = check.split()
    assert "check" in words
    interval = words[words.index("inter") + 1]
    assert re.fullmatch(r"\d+(ms|s)", interval)
    assert int(interval.rstrip("ms")) * (1 if interval.endswith("ms") else 1000) <= 2000
    assert int(words[words.index("fall") + 1]) <= 3
    # servers come from the environment
    servers = [line for line in lines if line.startswith("server ")]
    assert len(servers) == 2
    assert all('"${' in server for server in servers)


def test_haproxy_retries_only_requests_that_never_reached_a_replica() -> None:
    settings = [line for lines in haproxy_sections().values() for line in lines]
    assert "retries 2" in settings
    retry_on = [line for line in settings if line.startswith("retry-on")]
    assert retry_on == ["retry-on conn-failure"]
    assert any(line.startswith("option redispatch") for line in settings)
    timeouts = {line.split()[1]: line.split()[2] for line in settings if line.startswith("timeout ")}
    for name in ("server", "tunnel", "client"):
        value = timeouts[name]
        minutes = int(value[:-1]) * {"m": 1, "h": 60}[value[-1]] if value[-1] in "mh" else 0
        assert minutes >= 10, f"timeout {name} {value} would cut long streams"


def test_haproxy_sticks_conversations_to_their_replica() -> None:
    lines = section("backend")
    [table] = [line for line in lines if line.startswith("stick-table")]
    assert table.split()[1:3] == ["type", "string"]
    assert "option http-buffer-request" in lines
    [prev] = [line for line in lines if line.startswith("http-request set-var(txn.prev)")]
    assert "req.body,json_query('$.previous_response_id')" in prev
    assert any(line.startswith("stick match var(txn.prev)") for line in lines)
    assert any(line.startswith("stick store-response res.hdr(X-Response-Id)") for line in lines)
    assert any(line.startswith(("stick on req.hdr(X-Session-Id)", "stick match req.hdr(X-Session-Id)"))
               for line in lines)
    # the response that continues a conversation takes precedence over the session header
    order = [line for line in lines if line.startswith(("stick match", "stick on"))]
    assert order[0].startswith("stick match var(txn.prev)")


@pytest.fixture(scope="module")
def haproxy() -> str:
    found = shutil.which("haproxy") or next((p for p in ("/usr/sbin/haproxy",) if os.access(p, os.X_OK)), None)
    if found is None:
        pytest.skip("haproxy is not installed (Debian: apt-get install haproxy); its config check is skipped")
    return found


def haproxy_check(haproxy: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    # -dW: warnings are errors, so a directive HAProxy ignores does not pass unnoticed
    return subprocess.run([haproxy, "-c", "-dW", "-f", str(HAPROXY_CFG)], capture_output=True, text=True,
                          timeout=60, env={"PATH": os.environ.get("PATH", ""), **env})


def test_haproxy_accepts_the_config(haproxy: str) -> None:
    checked = haproxy_check(haproxy, HAPROXY_ENV)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "Configuration file is valid" in checked.stdout + checked.stderr


def test_haproxy_takes_addresses_from_the_environment(haproxy: str) -> None:
    checked = haproxy_check(haproxy, {**HAPROXY_ENV, "REPLICA2_ADDR": "10.0.0.12:not-a-port"})
    assert checked.returncode != 0
    assert "not-a-port" in checked.stdout + checked.stderr


def test_haproxy_keeps_admin_routes_to_the_admin_network() -> None:
    lines = section("frontend")
    assert 'acl from_admin_net src "${LB_ADMIN_NET[*]-127.0.0.1/32}"' in lines
    [deny] = [line for line in lines if line.startswith("http-request deny deny_status 403")]
    assert "!from_admin_net" in deny and "admin_route" in deny and "models_route !METH_GET" in deny
    assert "LB_ADMIN_NET" in HAPROXY_CFG.read_text().split("global")[0]  # documented with the other variables


class StubReplica(BaseHTTPRequestHandler):
    """Answers every request 200 with its method and path: what reached a replica."""

    def answer(self) -> None:
        body = json.dumps({"method": self.command, "path": self.path}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_DELETE = answer

    def log_message(self, *args: object) -> None:
        pass


@contextlib.contextmanager
def running_haproxy(haproxy: str, env: dict[str, str], log: Path) -> Iterator[int]:
    """HAProxy with the configuration, in front of a stub replica; yields the port clients connect to."""
    stub = ThreadingHTTPServer(("127.0.0.1", 0), StubReplica)
    threading.Thread(target=stub.serve_forever, daemon=True).start()
    port = free_port()
    replica = f"127.0.0.1:{stub.server_address[1]}"
    full = {"PATH": os.environ.get("PATH", ""), "LB_BIND": f"127.0.0.1:{port}", "REPLICA1_ADDR": replica,
            "REPLICA2_ADDR": replica, "LB_STATS_BIND": f"127.0.0.1:{free_port()}",
            "LB_LOG": f"127.0.0.1:{free_port()}", **env}
    with log.open("wb") as out:
        proc = subprocess.Popen([haproxy, "-db", "-f", str(HAPROXY_CFG)], env=full, stdout=out,
                                stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while request(port, "GET", "/v1/models")[0] != 200:
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        yield port
    finally:
        proc.terminate()
        proc.wait(10)
        stub.shutdown()
        stub.server_close()


def request(port: int, method: str, path: str, source: str = "127.0.0.1") -> tuple[int, dict]:
    """One request, sent from ``source`` (any 127.x address works on the loopback), the path as written."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10, source_address=(source, 0))
    try:
        conn.request(method, path, body=b"{}" if method == "POST" else None)
        resp = conn.getresponse()
        body = resp.read()
        return resp.status, json.loads(body) if body.startswith(b"{") else {}
    except OSError:
        return 0, {}
    finally:
        conn.close()


ADMIN_ROUTES = [("GET", "/metrics"), ("GET", "//metrics"), ("GET", "/models/available"), ("GET", "/models/jobs"),
                ("GET", "/models/jobs/abc"), ("GET", "/models/%6aobs"), ("POST", "/models/apply"),
                ("POST", "/models//apply"), ("POST", "/models/reload"), ("DELETE", "/models/tiny")]
OPEN_ROUTES = [("GET", "/v1/models"), ("GET", "/models"), ("GET", "/models/tiny"), ("POST", "/v1/chat/completions"),
               ("GET", "/healthz")]


@pytest.mark.parametrize(("admin_net", "admin", "other"), [
    (None, "127.0.0.1", "127.0.0.2"),  # the default: this machine only
    ("10.9.9.0/24 127.0.0.2/32", "127.0.0.2", "127.0.0.1"),  # several networks, separated by spaces
])
def test_haproxy_answers_admin_routes_only_to_the_admin_network(haproxy: str, tmp_path: Path, admin_net: str | None,
                                                                admin: str, other: str) -> None:
    env = {"LB_ADMIN_NET": admin_net} if admin_net else {}
    with running_haproxy(haproxy, env, tmp_path / "haproxy.log") as port:
        for method, path in ADMIN_ROUTES:
            status, body = request(port, method, path, source=other)
            assert status == 403, (method, path)
            assert body["error"]["code"] == "admin_only" and body["error"]["type"] == "permission_error"
            assert request(port, method, path, source=admin)[0] == 200, (method, path)
        for method, path in OPEN_ROUTES:
            status, body = request(port, method, path, source=other)
            assert status == 200 and body["path"] == path, (method, path)
        for path in ("/v1/../metrics", "/models/x/../../metrics", "/%2e%2e/metrics"):  # dot segments: refused
            assert request(port, "GET", path, source=admin)[0] == 400, path
            assert request(port, "GET", path, source=other)[0] in (400, 403), path
