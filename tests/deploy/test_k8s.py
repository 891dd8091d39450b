"""The Kubernetes manifests (deploy/k8s): every overlay renders with the real `kubectl kustomize`, passes strict
schema validation (kubernetes-validate) for the oldest and newest Kubernetes we support, passes yamllint, and holds
the invariants that tie it to the code: probes on real routes of the right port, ports and selectors that match,
a termination grace period that covers sessiond's drain, only real SESSIOND_* settings, Vault files where the
*_FILE settings look, a locked-down security context.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from functools import cache
from pathlib import Path, PurePosixPath
from typing import Any

import httpx
import pytest
import trio
import yaml

from api.settings import POD_ID_RE, Settings, env_names, load_settings
from tests.integration.harness import start_server

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = sorted(p.name for p in (K8S / "overlays").iterdir() if (p / "kustomization.yaml").is_file())
KUBECTL = "/usr/bin/kubectl"
VENV_BIN = Path(sys.executable).parent
# Oldest Kubernetes the manifests support (deploy/k8s/base/kustomization.yaml says why) and the newest schema set
# kubernetes-validate ships.
OLDEST_K8S = "1.31.0"
CRD_GROUP = "monitoring.coreos.com"
RULES_FILE = ROOT / "deploy" / "prometheus" / "rules" / "sessiond.rules.yml"
POD_NAME = "sessiond-6d5f8b7c9d-x2x7q"  # what the downward API gives SESSIOND_POD_ID


def newest_k8s() -> str:
    from kubernetes_validate.utils import latest_version

    return str(latest_version())


# ---- rendering ------------------------------------------------------------------------------------


def kustomize(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([KUBECTL, "kustomize", str(path)], capture_output=True, text=True, timeout=120, check=False)


@cache
def render(overlay: str) -> tuple[dict[str, Any], ...]:
    done = kustomize(K8S / "overlays" / overlay)
    assert done.returncode == 0, f"kubectl kustomize overlays/{overlay} failed:\n{done.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(done.stdout) if doc)


def one(objects: tuple[dict[str, Any], ...], kind: str) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def container(objects: tuple[dict[str, Any], ...]) -> dict[str, Any]:
    containers = one(objects, "Deployment")["spec"]["template"]["spec"]["containers"]
    found = [c for c in containers if c["name"] == "sessiond"]
    assert len(found) == 1, "the Deployment needs exactly one container named sessiond"
    return found[0]


def pod_annotations(objects: tuple[dict[str, Any], ...]) -> dict[str, str]:
    return dict(one(objects, "Deployment")["spec"]["template"]["metadata"].get("annotations", {}))


def manifest_env(objects: tuple[dict[str, Any], ...]) -> dict[str, str]:
    """The container's SESSIOND_* environment as the kubelet builds it: ConfigMaps of envFrom first, then env
    (which wins); downward-API values filled in."""
    c = container(objects)
    env: dict[str, str] = {}
    for source in c.get("envFrom", []):
        ref = source["configMapRef"]["name"]
        maps = [o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"] == ref]
        assert maps, f"envFrom names ConfigMap {ref}, which the render does not contain"
        env.update(maps[0].get("data", {}))
    for var in c.get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
        else:
            assert var["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name", var
            env[var["name"]] = POD_NAME
    return env


def file_settings(objects: tuple[dict[str, Any], ...]) -> dict[str, str]:
    return {k: v for k, v in manifest_env(objects).items() if k.endswith("_FILE")}


def settings_for(objects: tuple[dict[str, Any], ...], tmp_path: Path) -> Settings:
    """load_settings over the manifest's environment, each *_FILE pointing at a stand-in file."""
    stand_ins = {
        "jwt": "k8s-test-secret-0123456789abcdef0123456789abcdef",
        "redis-url": "redis://redis:6379/0",
        "database-url": "postgresql://sessiond:pw@postgres:5432/sessiond",
        "amqp-url": "amqp://sessiond:pw@rabbitmq:5672/%2F",
    }
    env = manifest_env(objects)
    for var, path in file_settings(objects).items():
        name = PurePosixPath(path).name
        assert name in stand_ins, f"{var}={path}: no stand-in value for a file named {name}"
        local = tmp_path / name
        local.write_text(stand_ins[name] + "\n")
        env[var] = str(local)
    return load_settings(env)


def named_port(c: dict[str, Any], name: str) -> int:
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert name in ports, f"container port {name!r} does not exist (have {sorted(ports)})"
    return int(ports[name])


def quantity_bytes(q: str) -> int:
    units = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "K": 10**3, "M": 10**6, "G": 10**9}
    m = re.fullmatch(r"(\d+)([KMG]i?)?", q)
    assert m, f"cannot read quantity {q!r}"
    return int(m[1]) * units.get(m[2] or "", 1)


def seconds(duration: str) -> float:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m)", duration)
    assert m, f"cannot read duration {duration!r}"
    return float(m[1]) * {"ms": 0.001, "s": 1.0, "m": 60.0}[m[2]]


@pytest.fixture(params=OVERLAYS)
def overlay(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def objects(overlay: str) -> tuple[dict[str, Any], ...]:
    return render(overlay)


# ---- rendering and validation ---------------------------------------------------------------------


def test_the_overlays_exist() -> None:
    assert {"dev", "prod"} <= set(OVERLAYS)


def test_every_overlay_renders(objects: tuple[dict[str, Any], ...], overlay: str) -> None:
    kinds = sorted(o["kind"] for o in objects)
    for kind in ("ConfigMap", "Deployment", "HorizontalPodAutoscaler", "NetworkPolicy", "PodDisruptionBudget",
                 "Service", "ServiceAccount"):
        assert kinds.count(kind) >= 1, f"overlays/{overlay} renders no {kind}"
    namespaces = {o["metadata"].get("namespace") for o in objects}
    assert len(namespaces) == 1 and None not in namespaces, f"one namespace for everything, got {namespaces}"
    if overlay == "prod":
        assert {"ServiceMonitor", "PrometheusRule"} <= set(kinds)


def test_kustomize_failure_is_reported(tmp_path: Path) -> None:
    """The render check can fail: a kustomization naming a missing resource is refused by kubectl."""
    (tmp_path / "kustomization.yaml").write_text("resources:\n  - missing.yaml\n")
    assert kustomize(tmp_path).returncode != 0


def _validate(objects: list[dict[str, Any]], version: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    path = tmp_path / f"render-{version}.yaml"
    path.write_text(yaml.safe_dump_all(objects, sort_keys=False))
    return subprocess.run(
        [str(VENV_BIN / "kubernetes-validate"), "--strict", "-k", version, str(path)],
        capture_output=True, text=True, timeout=120, check=False,
    )


@pytest.mark.parametrize("version", [OLDEST_K8S, "newest"])
def test_core_objects_pass_strict_validation(
    objects: tuple[dict[str, Any], ...], version: str, tmp_path: Path
) -> None:
    """Every core object (CRDs are checked below: their schemas are not in kubernetes-validate) validates
    strictly, unknown fields refused, against the oldest and newest supported Kubernetes."""
    version = newest_k8s() if version == "newest" else version
    core = [o for o in objects if not o["apiVersion"].startswith(CRD_GROUP + "/")]
    done = _validate(core, version, tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count(" passed for resource ") == len(core), done.stdout


def test_strict_validation_rejects_an_unknown_field(tmp_path: Path) -> None:
    deployment = dict(one(render("prod"), "Deployment"))
    deployment["spec"] = {**deployment["spec"], "replicaCount": 3}  # a plausible typo
    done = _validate([deployment], OLDEST_K8S, tmp_path)
    assert done.returncode != 0 and "replicaCount" in done.stdout + done.stderr


def test_yamllint_accepts_the_manifests() -> None:
    config = ROOT / "deploy" / ".yamllint.yml"
    done = subprocess.run(
        [str(VENV_BIN / "yamllint"), "--strict", "-c", str(config), str(K8S), str(config)],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_yamllint_config_catches_problems(tmp_path: Path) -> None:
    """The committed config is not a no-op: a yes/no boolean and an over-long line are reported."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("enabled: yes\nlong: " + "x " * 80 + "\n")
    done = subprocess.run(
        [str(VENV_BIN / "yamllint"), "-f", "parsable", "-c", str(ROOT / "deploy" / ".yamllint.yml"), str(bad)],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert done.returncode != 0
    assert "(truthy)" in done.stdout and "(line-length)" in done.stdout, done.stdout


# ---- the custom resources (Prometheus Operator) ----------------------------------------------------

RULE_GROUP_KEYS = {"name", "interval", "rules", "limit", "partial_response_strategy", "query_offset", "labels"}
RULE_KEYS = {"alert", "record", "expr", "for", "keep_firing_for", "labels", "annotations"}


def rule_group_problems(groups: Any) -> list[str]:
    """What the PrometheusRule CRD (spec.groups) would refuse, or what Prometheus would load wrongly."""
    if not isinstance(groups, list) or not groups:
        return ["groups must be a non-empty list"]
    problems: list[str] = []
    names = [g.get("name") for g in groups if isinstance(g, dict)]
    if len(names) != len(set(names)):
        problems.append(f"group names repeat: {names}")
    for group in groups:
        if not isinstance(group, dict) or not isinstance(group.get("name"), str) or not group["name"]:
            problems.append(f"group without a name: {group!r:.80}")
            continue
        where = f"group {group['name']}"
        problems += [f"{where}: unknown key {k}" for k in set(group) - RULE_GROUP_KEYS]
        rules = group.get("rules")
        if not isinstance(rules, list) or not rules:
            problems.append(f"{where}: rules must be a non-empty list")
            continue
        for rule in rules:
            if not isinstance(rule, dict):
                problems.append(f"{where}: a rule is not a mapping")
                continue
            name = rule.get("alert") or rule.get("record")
            problems += [f"{where}/{name}: unknown key {k}" for k in set(rule) - RULE_KEYS]
            if ("alert" in rule) == ("record" in rule):
                problems.append(f"{where}/{name}: exactly one of alert and record")
            if not isinstance(rule.get("expr"), str | int) or not str(rule.get("expr")).strip():
                problems.append(f"{where}/{name}: expr missing")
            for field in ("labels", "annotations"):
                values = rule.get(field, {})
                if not isinstance(values, dict) or not all(isinstance(v, str) for v in values.values()):
                    problems.append(f"{where}/{name}: {field} must map names to strings")
    return problems


def test_rule_shape_check_can_fail() -> None:
    assert rule_group_problems([{"name": "g", "rules": [{"alert": "A", "record": "b", "expr": "up"}]}])
    assert rule_group_problems([{"name": "g", "rules": [{"alert": "A", "expr": "up", "severity": "x"}]}])
    assert not rule_group_problems([{"name": "g", "rules": [{"alert": "A", "expr": "up", "for": "5m"}]}])


def test_service_monitor_and_prometheus_rule_have_the_operator_shape(tmp_path: Path) -> None:
    objects = render("prod")
    service = one(objects, "Service")
    monitor = one(objects, "ServiceMonitor")
    assert monitor["apiVersion"] == f"{CRD_GROUP}/v1"
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items(), "the ServiceMonitor does not select the Service"
    service_ports = {p["name"] for p in service["spec"]["ports"]}
    for endpoint in monitor["spec"]["endpoints"]:
        assert endpoint["port"] in service_ports, f"ServiceMonitor port {endpoint['port']} is not a Service port"
        assert endpoint["path"] == "/metrics"
        assert seconds(endpoint["scrapeTimeout"]) < seconds(endpoint["interval"])

    rule = one(objects, "PrometheusRule")
    assert rule["apiVersion"] == f"{CRD_GROUP}/v1"
    assert set(rule["spec"]) == {"groups"}
    assert rule_group_problems(rule["spec"]["groups"]) == []
    # Prometheus itself accepts the groups (promtool parses every expression).
    rules_path = tmp_path / "rules.yml"
    rules_path.write_text(yaml.safe_dump(rule["spec"]))
    promtool = shutil.which("promtool") or "/usr/bin/promtool"
    done = subprocess.run([promtool, "check", "rules", str(rules_path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_prometheus_rules_file_fits_a_prometheusrule() -> None:
    """deploy/prometheus/rules/sessiond.rules.yml is what the PrometheusRule should carry (prometheusrule.yaml
    explains how): its top level is exactly PrometheusRule.spec."""
    assert RULES_FILE.is_file(), f"{RULES_FILE.relative_to(ROOT)} is missing"
    rules = yaml.safe_load(RULES_FILE.read_text())
    assert isinstance(rules, dict) and set(rules) == {"groups"}, "a rules file holds `groups:` only"
    assert rule_group_problems(rules["groups"]) == []


# ---- invariants against the code ------------------------------------------------------------------


async def test_probes_and_scrape_path_are_real_routes_on_the_named_port(tmp_path: Path) -> None:
    """The paths the manifests use answer 200 on a real in-process sessiond's REST port (and a made-up path
    does not, so the check can fail)."""
    paths: set[str] = {"/metrics"}  # the ServiceMonitor's path (checked equal to this above)
    for overlay in OVERLAYS:
        c = container(render(overlay))
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            paths.add(c[probe]["httpGet"]["path"])
    async with trio.open_nursery() as nursery:
        server = await start_server(nursery, tmp_path)
        async with httpx.AsyncClient(base_url=server.http_url, timeout=10) as http:
            for path in sorted(paths):
                r = await http.get(path)
                assert r.status_code == 200, f"{path}: {r.status_code} {r.text[:200]}"
            assert (await http.get("/healthz-nope")).status_code == 404
        nursery.cancel_scope.cancel()


def test_probes_use_the_rest_port_by_name(objects: tuple[dict[str, Any], ...], tmp_path: Path) -> None:
    c = container(objects)
    settings = settings_for(objects, tmp_path)
    assert named_port(c, "http") == settings.http_port
    assert {p["httpGet"]["path"] for p in (c["livenessProbe"], c["startupProbe"])} == {"/healthz"}
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert c[probe]["httpGet"]["port"] == "http", f"{probe} must name the REST port"
    # /readyz pings each store with a 2 s timeout (api/app.py): the probe waits at least that long.
    assert c["readinessProbe"]["timeoutSeconds"] >= 3
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 60, "migrations on start need time"


def test_ports_match_the_service_and_the_settings(objects: tuple[dict[str, Any], ...], tmp_path: Path) -> None:
    c = container(objects)
    settings = settings_for(objects, tmp_path)
    container_ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert container_ports == {"http": settings.http_port, "ws": settings.ws_port}
    assert (settings.http_port, settings.ws_port) == (8080, 8443)
    service = one(objects, "Service")
    by_name = {p["name"]: p for p in service["spec"]["ports"]}
    assert set(by_name) == {"http", "ws"}
    for name, port in by_name.items():
        assert port["targetPort"] == name, f"Service port {name} must target the container port by name"
        assert port["port"] == container_ports[name]
    assert settings.host == "0.0.0.0"


def test_selectors_match_the_deployment(objects: tuple[dict[str, Any], ...]) -> None:
    deployment = one(objects, "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector.items() <= pod_labels.items()
    assert one(objects, "Service")["spec"]["selector"] == selector
    assert one(objects, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"] == selector
    assert one(objects, "NetworkPolicy")["spec"]["podSelector"]["matchLabels"] == selector
    hpa = one(objects, "HorizontalPodAutoscaler")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == (
        deployment["apiVersion"], "Deployment", deployment["metadata"]["name"]
    )
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    pdb = one(objects, "PodDisruptionBudget")["spec"]
    # Draining must stay possible: one pod may always go, whatever the HPA's minimum.
    assert pdb.get("maxUnavailable") == 1 and "minAvailable" not in pdb
    spread = deployment["spec"]["template"]["spec"]["topologySpreadConstraints"]
    assert all(s["labelSelector"]["matchLabels"] == selector for s in spread)
    # A rolling update never takes a ready pod away before its replacement is ready.
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


def test_network_policy_opens_the_named_ports(objects: tuple[dict[str, Any], ...]) -> None:
    c = container(objects)
    names = {p["name"] for p in c["ports"]}
    policy = one(objects, "NetworkPolicy")["spec"]
    assert set(policy["policyTypes"]) == {"Ingress", "Egress"}
    opened = {p["port"] for rule in policy["ingress"] for p in rule["ports"] if isinstance(p["port"], str)}
    assert opened <= names and {"http", "ws"} <= opened
    egress_ports = {p["port"] for rule in policy["egress"] for p in rule.get("ports", [])}
    assert {53, 6379, 5432, 5672} <= egress_ports, "DNS and the external stores must stay reachable"


def _source(path: str) -> str:
    return (ROOT / path).read_text()


def drain_budget_s(settings: Settings) -> float:
    """The longest sessiond takes from SIGTERM to exit, from the code of the drain (api/server.py, DESIGN §6):
    the "leaving" heartbeat and the member-list removal are each bounded by the lease TTL, the hand-over by
    SESSIOND_SHUTDOWN_GRACE_S, then the last WebSockets and hypercorn's graceful stop."""
    server, router, registry = _source("api/server.py"), _source("actors/router.py"), _source("actors/registry.py")
    drain = re.search(r"async def drain\(self, grace_s: float\) -> None:(.*?)\n    async def ", router, re.S)
    assert drain, "Router.drain moved: update drain_budget_s"
    assert re.search(r"await self\.heartbeat\(\).*await self\.registry\.shutdown\(grace_s\).*_leave_quietly",
                     drain[1], re.S), "the drain's steps changed: update drain_budget_s"
    assert "with trio.fail_after(self.ttl_s):" in router and "with trio.move_on_after(self.ttl_s):" in router
    assert "with trio.move_on_after(grace_s):" in registry
    ws_close = re.search(r"with trio\.move_on_after\((\d+(?:\.\d+)?)\):\s*\n\s*await ws\.wait_all_closed\(\)", server)
    http_grace = re.search(r"hconfig\.graceful_timeout = (\d+(?:\.\d+)?)", server)
    assert "await router.drain(settings.shutdown_grace_s)" in server
    assert ws_close and http_grace, "api/server.py's shutdown changed: update drain_budget_s"
    return settings.shutdown_grace_s + 2 * settings.lease_ttl_s + float(ws_close[1]) + float(http_grace[1])


def test_termination_grace_covers_the_drain(objects: tuple[dict[str, Any], ...], tmp_path: Path) -> None:
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    c = container(objects)
    grace = pod["terminationGracePeriodSeconds"]
    pre_stop = c["lifecycle"]["preStop"]["sleep"]["seconds"]
    drain = drain_budget_s(settings_for(objects, tmp_path))
    assert drain == 21  # the figure deployment.yaml's comment explains
    assert pre_stop < grace
    assert pre_stop + drain <= grace, f"preStop {pre_stop} s + drain {drain} s > grace {grace} s"
    # The Linkerd proxy must carry sessiond's last writes (checkpoints, lease releases): it takes SIGTERM only
    # after the drain, and finishes before the kubelet's SIGKILL.
    annotations = pod_annotations(objects)
    wait = int(annotations["config.alpha.linkerd.io/proxy-wait-before-exit-seconds"])
    proxy_grace = seconds(annotations["config.linkerd.io/shutdown-grace-period"])
    assert wait >= pre_stop + drain
    assert wait + proxy_grace <= grace


def test_security_context_is_locked_down(objects: tuple[dict[str, Any], ...], tmp_path: Path) -> None:
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    c = container(objects)
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    sc = c["securityContext"]
    assert sc["runAsNonRoot"] is True and sc["runAsUser"] == pod["securityContext"]["runAsUser"] == 10001
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"] and "add" not in sc["capabilities"]
    # Whatever sessiond writes lives on an emptyDir: the data dir and /tmp.
    empty_dirs = {v["name"] for v in pod["volumes"] if "emptyDir" in v}
    writable = {m["mountPath"] for m in c["volumeMounts"] if m["name"] in empty_dirs}
    settings = settings_for(objects, tmp_path)
    assert {str(settings.data_dir), "/tmp"} <= writable
    assert "memory" in c["resources"]["limits"] and {"cpu", "memory"} <= set(c["resources"]["requests"])
    assert settings.memory_budget_bytes <= quantity_bytes(c["resources"]["limits"]["memory"]) // 2, (
        "the live-state budget must leave room for everything else under the memory limit"
    )


def test_every_sessiond_variable_is_a_real_setting(objects: tuple[dict[str, Any], ...], tmp_path: Path) -> None:
    env = manifest_env(objects)
    used = {name for name in env if name.startswith("SESSIOND_")}
    assert used == set(env), f"non-SESSIOND variables: {sorted(set(env) - used)}"
    unknown = used - env_names()
    assert not unknown, f"not settings of api/settings.py: {sorted(unknown)}"
    settings = settings_for(objects, tmp_path)  # and the values load and validate together
    assert settings.pod_id == POD_NAME and POD_ID_RE.fullmatch(POD_NAME)
    assert settings.log_format == "json"
    assert settings.durability == "redis" and settings.redis_url and settings.database_url and settings.amqp_url
    assert settings.jwt_secret
    # Credentials only ever come as files.
    for plain in ("SESSIOND_JWT_SECRET", "SESSIOND_REDIS_URL", "SESSIOND_DATABASE_URL", "SESSIOND_AMQP_URL"):
        assert plain not in env and f"{plain}_FILE" in env


def test_settings_check_would_catch_a_typo() -> None:
    assert "SESSIOND_SHUTDOWN_GRACE" not in env_names() and "SESSIOND_SHUTDOWN_GRACE_S" in env_names()


def test_secret_files_are_where_the_file_settings_look(objects: tuple[dict[str, Any], ...]) -> None:
    files = file_settings(objects)
    annotations = pod_annotations(objects)
    c = container(objects)
    assert files, "no *_FILE settings"
    directories = {str(PurePosixPath(p).parent) for p in files.values()}
    assert directories == {"/vault/secrets"}
    names = {PurePosixPath(p).name for p in files.values()}
    if annotations.get("vault.hashicorp.com/agent-inject") == "true":
        prefix = "vault.hashicorp.com/agent-inject-secret-"
        assert annotations.get("vault.hashicorp.com/secret-volume-path", "/vault/secrets") == "/vault/secrets"
        injected = {k.removeprefix(prefix): v for k, v in annotations.items() if k.startswith(prefix)}
        assert set(injected) == names, "every file setting has a Vault secret, and every Vault secret is read"
        for name, vault_path in injected.items():
            template = annotations[f"vault.hashicorp.com/agent-inject-template-{name}"]
            assert f'with secret "{vault_path}"' in template, f"{name}: the template reads another path"
            assert annotations[f"vault.hashicorp.com/agent-inject-perms-{name}"] == "0400"
        # 0400 files are readable because the agent writes them as sessiond's own user.
        assert int(annotations["vault.hashicorp.com/agent-run-as-user"]) == c["securityContext"]["runAsUser"]
        assert not any(m["mountPath"] == "/vault/secrets" for m in c["volumeMounts"]), "the injector mounts it"
    else:
        # Without Vault (dev) a Secret is mounted where the agent would have written the files.
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        assert "/vault/secrets" in mounts
        volume = next(v for v in one(objects, "Deployment")["spec"]["template"]["spec"]["volumes"]
                      if v["name"] == mounts["/vault/secrets"])
        secret = next(o for o in objects if o["kind"] == "Secret"
                      and o["metadata"]["name"] == volume["secret"]["secretName"])
        assert names <= set(secret["data"]), f"the Secret lacks {sorted(names - set(secret['data']))}"


def test_linkerd_annotations_suit_long_lived_websockets(objects: tuple[dict[str, Any], ...]) -> None:
    annotations = pod_annotations(objects)
    assert annotations["linkerd.io/inject"] == "enabled"
    assert annotations["config.linkerd.io/proxy-await"] == "enabled"
    ws = str(named_port(container(objects), "ws"))
    http = str(named_port(container(objects), "http"))
    service = one(objects, "Service")["metadata"]["annotations"]
    for where in (annotations, service):
        opaque = where["config.linkerd.io/opaque-ports"].split(",")
        assert ws in opaque and http not in opaque, "WebSockets opaque, REST keeps HTTP detection"
    if annotations.get("vault.hashicorp.com/agent-inject") == "true":
        assert "8200" in annotations["config.linkerd.io/skip-outbound-ports"].split(",")
    assert "config.beta.linkerd.io/proxy-enable-native-sidecar" not in annotations, "not with wait-before-exit"


@pytest.fixture(scope="module", autouse=True)
def _kubectl_present() -> Iterator[None]:
    """kubectl is a real tool of this suite: missing, it fails (scripts/tools.sh installs it)."""
    if not Path(KUBECTL).is_file():
        pytest.fail(f"{KUBECTL} is missing: run scripts/tools.sh ensure", pytrace=False)
    yield
