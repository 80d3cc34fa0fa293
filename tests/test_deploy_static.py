"""The container and cluster files are right before an operator ever runs them.

No Docker engine or cluster runs here (`make test-containers` runs the image and the
compose file for real with podman): Dockerfiles go through hadolint, compose through the
compose spec, the Kubernetes overlays are rendered by `kubectl kustomize` and every
manifest goes through kubernetes-validate --strict, and our own cross-checks tie them to
the code (settings, probes, permissions).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from chatlib.health import HEALTH_PATHS
from devtools import deploy_checks as dc

ROOT = dc.ROOT
BIN = Path(sys.executable).parent
OVERLAYS = sorted(p.name for p in (ROOT / "k8s" / "overlays").iterdir() if p.is_dir())
DOCKERFILES = sorted((ROOT / "deploy").rglob("Dockerfile*"))


def compose_text() -> str:
    return (ROOT / "docker-compose.yml").read_text()


def compose_with_example_env() -> dict[str, Any]:
    """docker-compose.yml as compose sees it with the documented .env.example values."""
    env = dc.parse_env_file(ROOT / ".env.example")
    return yaml.safe_load(dc.interpolate(compose_text(), env))


def render(overlay: str) -> list[dict[str, Any]]:
    """The overlay as `kubectl kustomize` renders it; without kubectl the test skips,
    except in CI (CI=true), where .ci/run installs it and its absence is a failure."""
    if not shutil.which("kubectl") and os.environ.get("CI", "").lower() not in ("1", "true"):
        pytest.skip("kubectl not installed (apt-get install kubectl)")
    return dc.render_kustomization(ROOT / "k8s" / "overlays" / overlay)


@pytest.fixture(scope="module", params=OVERLAYS)
def rendered(request: pytest.FixtureRequest) -> tuple[str, list[dict[str, Any]]]:
    return request.param, render(request.param)


# --- Linters and schemas ---------------------------------------------------------------


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_every_dockerfile_passes_hadolint(dockerfile: Path) -> None:
    done = subprocess.run([BIN / "hadolint", str(dockerfile)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_compose_file_follows_the_compose_spec() -> None:
    done = subprocess.run(
        [BIN / "check-jsonschema", "--builtin-schema", "vendor.compose-spec", "docker-compose.yml"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_rendered_manifest_is_valid_kubernetes(
    rendered: tuple[str, list[dict[str, Any]]], tmp_path: Path
) -> None:
    _, objs = rendered
    files = []
    for i, obj in enumerate(objs):
        path = tmp_path / f"{i}-{obj['kind']}-{obj['metadata']['name']}.yaml"
        path.write_text(yaml.safe_dump(obj))
        files.append(str(path))
    done = subprocess.run(
        [BIN / "kubernetes-validate", "--strict", "--quiet", *files],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout + done.stderr


# --- The image ---------------------------------------------------------------------------


def test_image_is_multi_stage_slim_non_root_with_healthcheck() -> None:
    text = (ROOT / "deploy" / "Dockerfile").read_text()
    stages = [line for line in text.splitlines() if line.startswith("FROM ")]
    assert len(stages) >= 2 and all("-slim" in line for line in stages)
    final = text.split(stages[-1], 1)[1]
    assert "USER 10001" in final and "HEALTHCHECK" in final
    # No compilers or package managers' leftovers in the final stage.
    assert "apt-get" not in final and "pip install" not in final
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv", ".env", "tests"} <= set(ignored)


def test_image_healthcheck_script_reports_a_service_healthy_only_while_it_answers() -> None:
    import asyncio
    import threading

    from chatlib.health import HealthServer
    from devtools.servers import free_port

    port = free_port()
    script = ROOT / "deploy" / "healthcheck.py"
    env = {**os.environ, "ARCHIVE_HTTP_PORT": str(port)}

    def check() -> int:
        return subprocess.run([sys.executable, str(script)], env=env).returncode

    assert check() == 1  # nothing listening yet
    loop = asyncio.new_event_loop()
    server = HealthServer("127.0.0.1", port, lambda: True)
    loop.run_until_complete(server.start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        assert check() == 0
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.run_until_complete(server.stop())
        loop.close()


# --- Compose -----------------------------------------------------------------------------


def test_compose_refuses_to_start_without_each_required_secret() -> None:
    text = compose_text()
    required = dc.required_compose_variables(text)
    documented = dc.parse_env_file(ROOT / ".env.example")
    assert required, "secrets must be ${VAR:?...}"
    assert required <= set(documented), "every required variable is in .env.example"
    for name in required:
        env = {k: v for k, v in documented.items() if k != name}
        with pytest.raises(KeyError, match=name):
            dc.interpolate(text, env)


def test_compose_runs_the_whole_system_with_healthy_dependencies() -> None:
    compose = compose_with_example_env()
    ours = dc.compose_services(compose)
    by_service: dict[str, list[dict[str, Any]]] = {}
    for _, (svc, definition) in ours.items():
        by_service.setdefault(svc, []).append(definition)
    assert set(by_service) == set(dc.SERVICES)
    replicas = {
        svc: sum((d.get("deploy") or {}).get("replicas", 1) for d in defs)
        for svc, defs in by_service.items()
    }
    assert replicas["gateway"] >= 2 and replicas["archive"] >= 2
    services = compose["services"]
    assert (
        "-js" in services["nats"]["command"]
        or "jetstream" in (ROOT / "deploy" / "nats" / "nats.conf").read_text()
    )
    assert "pg_isready" in services["postgres"]["healthcheck"]["test"]
    assert any(v.endswith(":/var/lib/postgresql/data") for v in services["postgres"]["volumes"])
    for name, definition in services.items():
        for dep, cond in (definition.get("depends_on") or {}).items():
            assert cond["condition"] == "service_healthy", f"{name} -> {dep}"
            assert "healthcheck" in services[dep] or dep in ours, f"{dep} has a healthcheck"
    # The page is served by the proxy on host port 8000, forwarding WebSocket upgrades.
    proxy = next(d for d in services.values() if "nginx" in d.get("image", ""))
    assert any(str(p).startswith("8000:") for p in proxy["ports"])
    nginx = (ROOT / "deploy" / "nginx" / "default.conf.template").read_text()
    assert "proxy_set_header Upgrade $http_upgrade" in nginx
    assert "gateway:" in nginx
    # No engine's DNS address in the config: the entry point fills in the container's own.
    assert "resolver ${CHAT_DNS_RESOLVER} " in nginx
    assert not [ln for ln in nginx.splitlines() if ln.startswith("resolver 127.")]
    assert "CHAT_DNS_RESOLVER" in proxy["environment"]
    mounts = [v.split(":")[1] for v in proxy["volumes"]]
    assert "/etc/nginx/templates/default.conf.template" in mounts
    assert "/docker-entrypoint.d/16-chat-resolver.envsh" in mounts
    assert os.access(ROOT / "deploy" / "nginx" / "16-chat-resolver.envsh", os.X_OK)
    # podman-compose (1.0) and Docker Compose v2 both honour replicated replicas.
    for name in ("gateway", "archive"):
        assert services[name]["deploy"]["mode"] == "replicated"


def test_compose_environment_sets_only_real_settings_and_every_required_one() -> None:
    compose = compose_with_example_env()
    for name, (svc, definition) in dc.compose_services(compose).items():
        env = dc.compose_env(definition)
        unknown = set(env) - dc.setting_env_names(svc)
        assert not unknown, f"compose service {name}: not settings of {svc}: {unknown}"
        missing = dc.required_env_names(svc) - set(env)
        assert not missing, f"compose service {name}: {missing} not set"
        settings = dc.build_settings(svc, env)  # production validation passes
        assert settings.environment == "production"  # type: ignore[attr-defined]


def test_compose_stop_grace_outlasts_the_drain() -> None:
    for name, (svc, definition) in dc.compose_services(compose_with_example_env()).items():
        settings = dc.build_settings(svc, dc.compose_env(definition))
        grace = float(definition["stop_grace_period"].rstrip("s"))
        assert grace > 2 * settings.drain_timeout, name  # type: ignore[attr-defined]


# --- Kubernetes --------------------------------------------------------------------------


def test_k8s_environment_sets_only_real_settings_and_every_required_one(
    rendered: tuple[str, list[dict[str, Any]]],
) -> None:
    overlay, objs = rendered
    seen = set()
    for svc, workload, container in dc.k8s_service_containers(objs):
        seen.add(svc)
        env = dc.k8s_container_env(objs, container)
        where = f"{overlay}: {workload['metadata']['name']}"
        assert not set(env) - dc.setting_env_names(svc), where
        assert not dc.required_env_names(svc, env) - set(env), where
        dc.build_settings(svc, env)  # production validation passes
    assert seen == set(dc.SERVICES)


def test_prod_replicates_streams_on_a_three_node_nats_cluster() -> None:
    objs = render("prod")
    nats = dc.find(objs, "StatefulSet", "nats")[0]
    assert nats["spec"]["replicas"] == 3
    conf = dc.find(objs, "ConfigMap", "nats-config")[0]["data"]["nats.conf"]
    for i in range(3):
        assert f"nats-{i}.nats-headless:6222" in conf
    for svc, _, container in dc.k8s_service_containers(objs):
        settings = dc.build_settings(svc, dc.k8s_container_env(objs, container))
        assert settings.stream_replicas == 3, svc  # type: ignore[attr-defined]


def test_dev_runs_a_single_nats_server() -> None:
    objs = render("dev")
    assert dc.find(objs, "StatefulSet", "nats")[0]["spec"]["replicas"] == 1
    assert "\ncluster {" not in dc.find(objs, "ConfigMap", "nats-config")[0]["data"]["nats.conf"]


def test_service_selectors_match_pod_labels(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    _, objs = rendered
    workloads = [o for o in objs if o["kind"] in ("Deployment", "StatefulSet")]
    for kind in ("Service", "PodDisruptionBudget"):
        for obj in dc.find(objs, kind):
            spec = obj["spec"]
            selector = spec["selector"] if kind == "Service" else spec["selector"]["matchLabels"]
            matches = [
                w
                for w in workloads
                if selector.items() <= w["spec"]["template"]["metadata"]["labels"].items()
            ]
            assert matches, f"{kind} {obj['metadata']['name']} selects no pods"
    for w in workloads:
        labels = w["spec"]["template"]["metadata"]["labels"]
        assert w["spec"]["selector"]["matchLabels"].items() <= labels.items()
    for hpa in dc.find(objs, "HorizontalPodAutoscaler"):
        assert dc.find(objs, "Deployment", hpa["spec"]["scaleTargetRef"]["name"])


def test_ingress_routes_to_the_gateway_with_websocket_timeouts(
    rendered: tuple[str, list[dict[str, Any]]],
) -> None:
    _, objs = rendered
    ingress = dc.find(objs, "Ingress", "gateway")[0]
    notes = ingress["metadata"]["annotations"]
    assert int(notes["nginx.ingress.kubernetes.io/proxy-read-timeout"]) >= 3600
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    gateway_svc = dc.find(objs, "Service", backend["name"])[0]
    assert backend["port"]["name"] in [p["name"] for p in gateway_svc["spec"]["ports"]]
    assert {
        h["spec"]["scaleTargetRef"]["name"] for h in dc.find(objs, "HorizontalPodAutoscaler")
    } >= {
        "gateway",
        "archive",
    }


def _port_number(container: dict[str, Any], port: int | str) -> int:
    if isinstance(port, int):
        return port
    return next(p["containerPort"] for p in container["ports"] if p["name"] == port)


def test_probes_hit_paths_and_ports_the_services_serve(
    rendered: tuple[str, list[dict[str, Any]]],
) -> None:
    _, objs = rendered
    for svc, _, container in dc.k8s_service_containers(objs):
        settings = dc.build_settings(svc, dc.k8s_container_env(objs, container))
        for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
            if "grpc" in container[probe]:  # rpc: the standard gRPC health service
                port = container[probe]["grpc"]["port"]
                assert _port_number(container, port) == settings.grpc_port, (svc, probe)  # type: ignore[attr-defined]
                continue
            get = container[probe]["httpGet"]
            assert get["path"] in HEALTH_PATHS, (svc, probe)
            assert _port_number(container, get["port"]) == settings.http_port, (svc, probe)  # type: ignore[attr-defined]
        assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
        ready = container["readinessProbe"]
        assert "grpc" in ready or ready["httpGet"]["path"] == "/readyz"


def test_pods_are_locked_down_with_resources_and_grace_above_the_drain(
    rendered: tuple[str, list[dict[str, Any]]],
) -> None:
    _, objs = rendered
    for svc, workload, container in dc.k8s_service_containers(objs):
        pod = workload["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        sec = container["securityContext"]
        assert sec["readOnlyRootFilesystem"] is True
        assert sec["allowPrivilegeEscalation"] is False
        assert sec["capabilities"]["drop"] == ["ALL"]
        assert {"cpu", "memory"} <= set(container["resources"]["requests"])
        assert {"cpu", "memory"} <= set(container["resources"]["limits"])
        settings = dc.build_settings(svc, dc.k8s_container_env(objs, container))
        pre_stop = container.get("lifecycle", {}).get("preStop", {}).get("exec", {})
        pre_stop_s = float(pre_stop["command"][-1]) if pre_stop else 0.0
        # SIGTERM comes after preStop; then in-flight work and the NATS drain each get up
        # to drain_timeout.
        needed = pre_stop_s + 2 * settings.drain_timeout  # type: ignore[attr-defined]
        assert pod["terminationGracePeriodSeconds"] > needed, svc
    for name in ("gateway", "presence", "archive", "nats"):
        assert dc.find(objs, "PodDisruptionBudget", name), name


# --- NATS config -------------------------------------------------------------------------


def test_nats_accounts_config_is_generated_from_the_subject_names() -> None:
    expected = {
        "accounts": dc.render_accounts_conf(),
        "accounts-nkeys": dc.render_accounts_conf("nkey"),
    }
    files = {
        "deploy/nats/accounts.conf": "accounts",
        "k8s/base/nats/accounts.conf": "accounts",
        "deploy/nats/accounts-nkeys.conf": "accounts-nkeys",
        "k8s/overlays/prod/accounts-nkeys.conf": "accounts-nkeys",
    }
    for path, kind in files.items():
        assert (ROOT / path).read_text() == expected[kind], (
            f"{path} is stale: python -m devtools.deploy_checks {kind} > {path}"
        )


def nats_password_env() -> dict[str, str]:
    users = [*dc.nats_permissions(), dc.NATS_ADMIN_USER, dc.NATS_SYSTEM_USER]
    return {dc.password_env(u): f"test-{u}" for u in users}


@pytest.mark.parametrize(
    "conf",
    [
        "deploy/nats/nats.conf",
        "deploy/nats/nats-tls.conf",
        "k8s/base/nats/nats.conf",
        "k8s/overlays/prod/nats.conf",
    ],
)
def test_every_nats_config_parses_with_credentials_from_the_environment(
    conf: str, tmp_path: Path
) -> None:
    from devtools import certs
    from devtools.servers import nats_server_binary

    folder = tmp_path / "etc"
    folder.mkdir()
    text = (ROOT / conf).read_text()
    (folder / "accounts.conf").write_text((ROOT / "deploy/nats/accounts.conf").read_text())
    (folder / "accounts-nkeys.conf").write_text(dc.render_accounts_conf("nkey"))
    env = {**os.environ, **nats_password_env(), "POD_NAME": "nats-0"}
    uses_nkeys = "accounts-nkeys.conf" in text
    if uses_nkeys:
        # The certificates it names (cert-manager's file names in k8s, make certs' in
        # compose) and the public NKeys from the environment.
        tls = tmp_path / "tls"
        certs.make_all(tls)
        for name in ("tls", "nats"):
            (tls / f"{name}.crt").write_bytes((tls / "nats.crt").read_bytes())
            (tls / f"{name}.key").write_bytes((tls / "nats.key").read_bytes())
        text = text.replace("/etc/nats-tls", str(tls)).replace("/etc/nats/tls", str(tls))
        assert "tls {" in text
        env.update(line.split("=", 1) for line in (tls / "nkeys.env").read_text().splitlines())
    (folder / "nats.conf").write_text(text)
    done = subprocess.run(
        [nats_server_binary(), "-c", str(folder / "nats.conf"), "-t"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    # Without a credential in the environment the server refuses to start.
    env.pop(certs.nkey_env("gateway") if uses_nkeys else dc.password_env("gateway"))
    done = subprocess.run(
        [nats_server_binary(), "-c", str(folder / "nats.conf"), "-t"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode != 0


# --- least privilege ---------------------------------------------------------------------


def _namespace(objs: list[dict[str, Any]]) -> dict[str, Any]:
    (namespace,) = dc.find(objs, "Namespace")
    return namespace


def _pod(objs: list[dict[str, Any]], name: str) -> dc.Endpoint:
    ns = _namespace(objs)["metadata"]["name"]
    (workload,) = [w for w in dc.workloads(objs) if w["metadata"]["name"] == name]
    labels = workload["spec"]["template"]["metadata"]["labels"]
    return dc.Endpoint(ns, {"kubernetes.io/metadata.name": ns}, labels)


def test_every_workload_meets_the_restricted_pod_security_standard(
    rendered: tuple[str, list[dict[str, Any]]],
) -> None:
    _, objs = rendered
    labels = _namespace(objs)["metadata"]["labels"]
    for mode in ("enforce", "warn", "audit"):
        assert labels[f"pod-security.kubernetes.io/{mode}"] == "restricted"
    found = dc.workloads(objs)
    assert {w["metadata"]["name"] for w in found} >= {
        "gateway", "presence", "archive", "rpc", "nats", "postgres",
    }  # fmt: skip
    for workload in found:
        name = workload["metadata"]["name"]
        pod = workload["spec"]["template"]["spec"]
        assert pod.get("automountServiceAccountToken") is False, name
        assert not any(pod.get(k) for k in ("hostNetwork", "hostPID", "hostIPC")), name
        assert not any("hostPath" in v for v in pod.get("volumes", [])), name
        pod_sec = pod.get("securityContext", {})
        for container in pod["containers"] + pod.get("initContainers", []):
            sec = container.get("securityContext", {})
            where = (name, container["name"])
            assert sec.get("runAsNonRoot", pod_sec.get("runAsNonRoot")) is True, where
            seccomp = sec.get("seccompProfile", pod_sec.get("seccompProfile", {}))
            assert seccomp.get("type") == "RuntimeDefault", where
            assert sec.get("allowPrivilegeEscalation") is False, where
            assert sec.get("privileged") is not True, where
            assert sec.get("capabilities", {}).get("drop") == ["ALL"], where
            assert not sec.get("capabilities", {}).get("add"), where


def test_every_workload_is_isolated_by_network_policies(
    rendered: tuple[str, list[dict[str, Any]]],
) -> None:
    _, objs = rendered
    policies = dc.find(objs, "NetworkPolicy")
    deny = [p for p in policies if p["spec"]["podSelector"] == {} and not p["spec"].get("ingress")
            and not p["spec"].get("egress")]  # fmt: skip
    assert deny and set(deny[0]["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    for workload in dc.workloads(objs):
        labels = workload["spec"]["template"]["metadata"]["labels"]
        own = [
            p["metadata"]["name"]
            for p in policies
            if p["spec"]["podSelector"]
            and dc.label_selector_matches(p["spec"]["podSelector"], labels)
        ]
        assert own, f"no NetworkPolicy of its own selects {workload['metadata']['name']}"


ALLOWED_PATHS = [
    ("ingress-nginx", "gateway", 8000),
    ("gateway", "nats", 4222),
    ("presence", "nats", 4222),
    ("archive", "nats", 4222),
    ("rpc", "nats", 4222),
    ("nats", "nats", 6222),
    ("archive", "postgres", 5432),
    ("gateway", "internet", 443),  # the OIDC provider's JWKS
]
DENIED_PATHS = [
    ("gateway", "postgres", 5432),
    ("presence", "postgres", 5432),
    ("rpc", "postgres", 5432),
    ("ingress-nginx", "nats", 4222),
    ("ingress-nginx", "postgres", 5432),
    ("elsewhere", "gateway", 8000),
    ("elsewhere", "nats", 4222),
    ("gateway", "nats", 6222),
    ("gateway", "presence", 8081),
    ("presence", "internet", 443),
    ("archive", "internet", 443),
    ("postgres", "internet", 443),
    ("nats", "internet", 443),
]


@pytest.mark.parametrize(
    ("src", "dst", "port", "allowed"),
    [(*p, True) for p in ALLOWED_PATHS] + [(*p, False) for p in DENIED_PATHS],
)
def test_network_policies_allow_exactly_the_paths_the_system_uses(
    rendered: tuple[str, list[dict[str, Any]]], src: str, dst: str, port: int, allowed: bool
) -> None:
    _, objs = rendered
    outside = {
        "ingress-nginx": dc.Endpoint(
            "ingress-nginx", {"kubernetes.io/metadata.name": "ingress-nginx"}, {"app": "x"}
        ),
        "elsewhere": dc.Endpoint("other", {"kubernetes.io/metadata.name": "other"}, {}),
        "internet": None,
    }
    ends = [outside[n] if n in outside else _pod(objs, n) for n in (src, dst)]
    policies = dc.find(objs, "NetworkPolicy")
    assert dc.network_allows(policies, ends[0], ends[1], port) is allowed


def _quantity(value: str | int) -> float:
    text = str(value)
    units = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    for suffix, factor in units.items():
        if text.endswith(suffix):
            return float(text.removesuffix(suffix)) * factor
    return float(text)


def test_the_resource_quota_fits_every_autoscaler_at_its_maximum(
    rendered: tuple[str, list[dict[str, Any]]],
) -> None:
    _, objs = rendered
    (quota,) = dc.find(objs, "ResourceQuota")
    hard = quota["spec"]["hard"]
    most = {h["spec"]["scaleTargetRef"]["name"]: h["spec"]["maxReplicas"]
            for h in dc.find(objs, "HorizontalPodAutoscaler")}  # fmt: skip
    totals = {"pods": 0.0, "requests.cpu": 0.0, "requests.memory": 0.0,
              "limits.cpu": 0.0, "limits.memory": 0.0}  # fmt: skip
    for workload in dc.workloads(objs):
        name = workload["metadata"]["name"]
        replicas = most.get(name, workload["spec"].get("replicas", 1))
        # A rolling update runs one pod more (maxSurge 1).
        pods = replicas + 1
        totals["pods"] += pods
        for container in workload["spec"]["template"]["spec"]["containers"]:
            res = container["resources"]
            for kind in ("requests", "limits"):
                for what in ("cpu", "memory"):
                    totals[f"{kind}.{what}"] += pods * _quantity(res[kind][what])
    for key, total in totals.items():
        assert total <= _quantity(hard[key]), (key, total, hard[key])


def test_prod_speaks_tls_with_verified_peers_and_nkeys_everywhere() -> None:
    import fnmatch
    import urllib.parse

    objs = render("prod")
    certificates = {c["spec"]["secretName"]: c["spec"] for c in dc.find(objs, "Certificate")}
    nats_names = certificates["nats-tls"]["dnsNames"]
    for svc, workload, container in dc.k8s_service_containers(objs):
        env = dc.k8s_container_env(objs, container)
        prefix = dc.env_prefix(svc)
        name = workload["metadata"]["name"]
        assert f"{prefix}NATS_PASSWORD" not in env, name
        assert env[f"{prefix}NATS_NKEY_SEED"].startswith("SU"), name  # a user NKey seed
        ca = env[f"{prefix}NATS_TLS_CA_FILE"]
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        volume = next(
            v for v in workload["spec"]["template"]["spec"]["volumes"]
            if v["name"] == mounts[str(Path(ca).parent)]
        )  # fmt: skip
        # Only ca.crt of the NATS certificate's Secret: never its private key.
        assert volume["secret"]["items"] == [{"key": "ca.crt", "path": Path(ca).name}], name
        # Each server the service dials is named in the NATS certificate (verify-full).
        for url in env[f"{prefix}NATS_SERVERS"].split(","):
            host = urllib.parse.urlsplit(url).hostname or ""
            assert any(fnmatch.fnmatch(host, pattern) for pattern in nats_names), host
        settings = dc.build_settings(svc, env)
        if svc in ("gateway", "rpc"):  # the doors users come in by: no guests in prod
            assert settings.auth_mode == "oidc", svc  # type: ignore[attr-defined]
        if svc == "archive":
            url = urllib.parse.urlsplit(env["ARCHIVE_DATABASE_URL"])
            query = urllib.parse.parse_qs(url.query)
            assert query["sslmode"] == ["verify-full"] and query["sslrootcert"] == [ca]
            assert any(fnmatch.fnmatch(url.hostname or "", n)
                       for n in certificates["postgres-tls"]["dnsNames"])  # fmt: skip
    (nats,) = dc.find(objs, "StatefulSet", "nats")
    nats_container = nats["spec"]["template"]["spec"]["containers"][0]
    assert not [e for e in nats_container["env"] if e["name"].endswith("_PASSWORD")]
    conf = dc.find(objs, "ConfigMap", "nats-config")[0]["data"]["nats.conf"]
    assert conf.count("tls {") == 2 and "verify: true" in conf  # clients and routes
    assert "include ./accounts-nkeys.conf" in conf
    (postgres,) = dc.find(objs, "StatefulSet", "postgres")
    args = postgres["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "ssl=on" in args
    hba = dc.find(objs, "ConfigMap", "postgres-hba")[0]["data"]["pg_hba.conf"]
    network = [line.split()[0] for line in hba.splitlines() if line and not line.startswith("#")
               and "127.0.0.1" not in line and not line.startswith("local")]  # fmt: skip
    assert network == ["hostssl"]


def test_the_tls_compose_variant_gives_every_service_an_nkey_and_the_ca(tmp_path: Path) -> None:
    """docker-compose.tls.yml over docker-compose.yml: the merged environment of each
    service is valid production settings with an NKey seed and the CA, every file it
    mounts from .data/tls is one `make certs` writes, and the archive verifies Postgres."""
    from devtools import certs

    env_example = dc.parse_env_file(ROOT / ".env.example")
    tls_compose = yaml.safe_load(
        dc.interpolate((ROOT / "docker-compose.tls.yml").read_text(), env_example)
    )
    base = compose_with_example_env()
    certs.make_all(tmp_path / "tls")
    written = {str(p.relative_to(tmp_path / "tls")) for p in (tmp_path / "tls").rglob("*")}
    for name, definition in tls_compose["services"].items():
        for volume in definition.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith("./.data/tls"):
                rel = source.removeprefix("./.data/tls").lstrip("/")
                assert not rel or rel in written, (name, source)
            else:
                assert (ROOT / source).exists(), (name, source)
    for name, (svc, definition) in dc.compose_services(base).items():
        env = {**dc.compose_env(definition), **dc.compose_env(tls_compose["services"][name])}
        prefix = dc.env_prefix(svc)
        assert env[f"{prefix}NATS_NKEY_SEED_FILE"] == "/run/natschat/nkey", name
        assert env[f"{prefix}NATS_TLS_CA_FILE"] == "/run/natschat/ca.crt", name
        assert not set(env) - dc.setting_env_names(svc), name
        dc.build_settings(svc, env)
        if svc == "archive":
            assert "sslmode=verify-full" in env["ARCHIVE_DATABASE_URL"]
    nats = tls_compose["services"]["nats"]
    assert "./deploy/nats/nats-tls.conf:/etc/nats/nats.conf:ro" in nats["volumes"]
