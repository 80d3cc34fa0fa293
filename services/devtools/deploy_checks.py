"""Static checks for the container and cluster deployment (deploy/, docker-compose.yml, k8s/).

No Docker engine or cluster runs where the tests run, so this module reads the files and
answers the questions an operator would otherwise learn the hard way:

- `nats_permissions()`: which subjects each service user may publish and subscribe to,
  derived from `chatlib.names`. `render_accounts_conf()` turns it into the NATS config
  block that deploy/nats/accounts.conf and k8s/base/nats/accounts.conf must equal
  (regenerate with `python -m devtools.deploy_checks accounts > deploy/nats/accounts.conf`).
- `render_kustomization()`: the overlays as the real `kubectl kustomize` renders them.
- env helpers: which environment variables compose and the manifests give each service.

The services are identified by their command (`python -m <service>`), so a renamed
compose service or Deployment is still checked.
"""

from __future__ import annotations

import base64
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from chatlib import names
from pydantic_settings import BaseSettings

# Environment variables nats-server reads for the passwords (compose and k8s set them
# from the operator's secrets).
from devtools.servers import password_env

ROOT = Path(__file__).resolve().parents[2]
SERVICES = ("gateway", "presence", "archive", "rpc")

# --- Settings ----------------------------------------------------------------------


def settings_class(service: str) -> type[BaseSettings]:
    if service == "gateway":
        from gateway.settings import GatewaySettings

        return GatewaySettings
    if service == "presence":
        from presence.settings import PresenceSettings

        return PresenceSettings
    if service == "archive":
        from archive.settings import ArchiveSettings

        return ArchiveSettings
    if service == "rpc":
        from rpc.settings import RpcSettings

        return RpcSettings
    raise KeyError(service)


def env_prefix(service: str) -> str:
    return str(settings_class(service).model_config.get("env_prefix", ""))


def setting_env_names(service: str) -> set[str]:
    """Every environment variable the service reads (prefix + field name, upper case)."""
    prefix = env_prefix(service)
    return {f"{prefix}{name}".upper() for name in settings_class(service).model_fields}


# What a deployment must set for the service to work outside a laptop: where NATS is and
# who we are on it, production mode, plus each service's own must-haves.
REQUIRED_COMMON = ("environment", "nats_servers")
# Who the service is on NATS: a user and password (dev, compose), or an NKey seed with the
# CA that verifies the servers (prod: NKeys over TLS).
NATS_IDENTITY_PASSWORD = ("nats_user", "nats_password")
NATS_IDENTITY_NKEY = ("nats_nkey_seed", "nats_tls_ca_file")
REQUIRED_EXTRA = {
    "gateway": ("allowed_origins",),
    "presence": (),
    "archive": ("database_url",),
    "rpc": ("guest_secret",),  # the gateway's, so the same tokens work on both doors
}


def required_env_names(service: str, env: dict[str, str] | None = None) -> set[str]:
    """What `env` must set; its NATS identity is an NKey when it sets a seed."""
    prefix = env_prefix(service)
    nkey = f"{prefix}NATS_NKEY_SEED".upper() in (env or {})
    identity = NATS_IDENTITY_NKEY if nkey else NATS_IDENTITY_PASSWORD
    fields = (*REQUIRED_COMMON, *identity, *REQUIRED_EXTRA[service])
    return {f"{prefix}{name}".upper() for name in fields}


def build_settings(service: str, env: dict[str, str]) -> BaseSettings:
    """The service's settings as the container would see them (raises when invalid, e.g.
    production with the development token secret)."""
    import os
    from unittest import mock

    prefix = env_prefix(service)
    clean = {k: v for k, v in os.environ.items() if not k.startswith(prefix)}
    with mock.patch.dict(os.environ, {**clean, **env}, clear=True):
        return settings_class(service)()


# --- NATS permissions ----------------------------------------------------------------


@dataclass
class Permissions:
    publish_allow: list[str]
    subscribe_allow: list[str]
    publish_deny: list[str] = field(default_factory=list)
    allow_responses: bool = False  # micro service responders reply to requesters' inboxes


KV_STREAM_PRESENCE = f"KV_{names.KV_PRESENCE}"
KV_STREAM_MEMBERS = f"KV_{names.KV_MEMBERS}"
KV_STREAM_GUEST_NAMES = f"KV_{names.KV_GUEST_NAMES}"
ALL_STREAMS = (
    KV_STREAM_MEMBERS,
    names.STREAM_CHAT,
    names.STREAM_ARCHIVE,
    names.STREAM_DEAD,
    names.STREAM_PRESENCE,
    names.STREAM_USERSTATE,
    KV_STREAM_PRESENCE,
    KV_STREAM_GUEST_NAMES,
)
# Streams whose consumers each service may create, read and ack. Everything else is
# denied, e.g. the gateway cannot pull (steal) the archive's work queue.
CONSUMES = {
    "gateway": (names.STREAM_CHAT, KV_STREAM_PRESENCE, KV_STREAM_MEMBERS),
    "presence": (names.STREAM_PRESENCE, KV_STREAM_PRESENCE),
    # USERSTATE: the durable consumer applying events, and reads of its unapplied tail.
    "archive": (names.STREAM_ARCHIVE, names.STREAM_DEAD, names.STREAM_USERSTATE),
    "rpc": (names.STREAM_CHAT,),  # replays for StreamMessages (ephemeral consumers)
}
JS_API_ALL = "$JS.API.>"
JS_ACK_ALL = "$JS.ACK.>"
JS_FLOW_CONTROL = "$JS.FC.>"  # ordered/push consumers answer flow-control requests
INBOX_ALL = "_INBOX.>"
MICRO_ALL = "$SRV.>"  # PING/INFO/STATS discovery of nats micro services
# No service deletes or purges a stream: that is an operator's job (admin user).
DESTRUCTIVE_JS_API = ("$JS.API.STREAM.DELETE.>", "$JS.API.STREAM.PURGE.>")
# Single messages a service may delete: the archive removes a task it parked in the dead
# letters after JetStream gave up delivering it (max deliveries). Deny wins over allow in
# NATS, so the other streams are denied one by one rather than with a wildcard.
# And (issue 14) the archive removes a deleted message and its edits from CHAT, so that
# reconnect replay cannot serve deleted content.
DELETES_FROM = {"archive": (names.STREAM_ARCHIVE, names.STREAM_CHAT)}


def msg_delete_subject(stream: str) -> str:
    return f"$JS.API.STREAM.MSG.DELETE.{stream}"


def consumer_api_denies(stream: str) -> list[str]:
    # $JS.API.CONSUMER.<op>.<stream>[.<consumer>...]: CREATE, INFO, DELETE, NAMES, LIST
    # $JS.API.CONSUMER.<op>.<op2>.<stream>.<consumer>: DURABLE.CREATE, MSG.NEXT
    return [
        f"$JS.API.CONSUMER.*.{stream}",
        f"$JS.API.CONSUMER.*.{stream}.>",
        f"$JS.API.CONSUMER.*.*.{stream}.>",
        f"$JS.ACK.{stream}.>",
    ]


def jetstream_denies(service: str) -> list[str]:
    denied = [s for s in ALL_STREAMS if s not in CONSUMES[service]]
    may_delete = DELETES_FROM.get(service, ())
    if may_delete:
        deletes = [msg_delete_subject(s) for s in ALL_STREAMS if s not in may_delete]
    else:
        deletes = [msg_delete_subject(">")]
    return [
        *DESTRUCTIVE_JS_API,
        *deletes,
        *(d for s in denied for d in consumer_api_denies(s)),
    ]


def kv_subject(bucket: str) -> str:
    return f"$KV.{bucket}.>"


def nats_permissions() -> dict[str, Permissions]:
    """Per service user: exactly the subjects it uses (see chatlib.names)."""
    jetstream = [JS_API_ALL, JS_ACK_ALL, JS_FLOW_CONTROL]
    return {
        "gateway": Permissions(
            publish_allow=[
                *names.STREAM_CHAT_SUBJECTS,  # chat messages, published through JetStream
                names.PRESENCE_CONN_OPENED,
                names.PRESENCE_CONN_CLOSED,
                names.PRESENCE_HEARTBEAT_ALL,
                names.TYPING_ALL,
                names.HISTORY_ROOM,  # requests to the archive's history service
                names.HISTORY_DM,
                names.HISTORY_MESSAGE,  # who wrote a message (before an edit or delete)
                names.HISTORY_SEARCH,
                names.PRESENCE_WHO,  # requests to presence's who-is-online service
                kv_subject(names.KV_MEMBERS),  # room membership (gateway/roster.py)
                kv_subject(names.KV_GUEST_NAMES),  # guest name reservations
                names.USER_MEMBERSHIP_ALL,  # user-state events, through stream USERSTATE
                names.USER_READ_ALL,
                names.USERSTATE_STATE,  # requests to the archive's user-state service
                names.USERSTATE_ROOMS,
                names.USERSTATE_THREADS,
                *jetstream,
            ],
            publish_deny=jetstream_denies("gateway"),
            subscribe_allow=[
                names.LIVE_ALL,
                names.LIVE_USER_ALL,
                names.PRESENCE_EVENTS_ALL,
                names.TYPING_ALL,
                INBOX_ALL,
            ],
        ),
        "presence": Permissions(
            publish_allow=[
                names.PRESENCE_EVENTS_ALL,  # online/offline, through stream PRESENCE
                kv_subject(names.KV_PRESENCE),
                *jetstream,
            ],
            publish_deny=jetstream_denies("presence"),
            subscribe_allow=[
                names.PRESENCE_CONN_OPENED,
                names.PRESENCE_CONN_CLOSED,
                names.PRESENCE_HEARTBEAT_ALL,
                names.PRESENCE_WHO,
                MICRO_ALL,
                INBOX_ALL,
            ],
            allow_responses=True,
        ),
        "archive": Permissions(
            publish_allow=[
                names.DEAD_LETTER_ARCHIVE,
                names.DEAD_LETTER_USERSTATE,
                names.USER_MENTION_ALL,  # mention events, through stream USERSTATE
                *jetstream,
            ],
            publish_deny=jetstream_denies("archive"),
            subscribe_allow=[
                names.HISTORY_ROOM,
                names.HISTORY_DM,
                names.HISTORY_MESSAGE,
                names.HISTORY_SEARCH,
                names.USERSTATE_STATE,
                names.USERSTATE_ROOMS,
                names.USERSTATE_THREADS,
                names.ADVISORY_ARCHIVE_MAX_DELIVERIES,  # tasks JetStream gave up on
                MICRO_ALL,
                INBOX_ALL,
            ],
            allow_responses=True,
        ),
        "rpc": Permissions(
            publish_allow=[
                *names.STREAM_CHAT_SUBJECTS,  # SendMessage, through JetStream like the gateway
                names.HISTORY_ROOM,  # GetHistory
                names.HISTORY_DM,
                names.PRESENCE_WHO,  # ListOnline
                kv_subject(names.KV_GUEST_NAMES),  # guest tokens' name reservations
                *jetstream,
            ],
            publish_deny=jetstream_denies("rpc"),
            subscribe_allow=[names.LIVE_ALL, INBOX_ALL],  # StreamMessages' live part
        ),
    }


NATS_ACCOUNT = "CHAT"
NATS_ADMIN_USER = "admin"  # operators and the nats CLI: everything in the CHAT account
NATS_SYSTEM_USER = "sys"  # `nats server ...` reports: the system account


def _conf_list(items: list[str], indent: str) -> str:
    inner = "".join(f'{indent}  "{item}"\n' for item in items)
    return f"[\n{inner}{indent}]"


def render_accounts_conf(auth: str = "password") -> str:
    """The accounts block: one user per service with its permissions. `auth` "password":
    user + password from NATS_<USER>_PASSWORD (deploy/nats/accounts.conf, the default
    dev and compose set-up); "nkey": an NKey whose public key comes from NATS_<USER>_NKEY
    (deploy/nats/accounts-nkeys.conf: the prod overlay, the TLS compose variant). Same
    permissions either way."""
    from devtools.certs import nkey_env

    def identity(user: str) -> list[str]:
        if auth == "nkey":
            return [f"nkey: ${nkey_env(user)}"]
        return [f"user: {user}", f"password: ${password_env(user)}"]

    def inline(user: str) -> str:
        return "{" + ", ".join(identity(user)) + "}"

    source = "NKey public keys" if auth == "nkey" else "Passwords"
    generate = "accounts-nkeys" if auth == "nkey" else "accounts"
    lines = [
        f"# GENERATED from chatlib.names by `python -m devtools.deploy_checks {generate}`;",
        "# do not edit by hand (a test fails when it is stale). One user per service, each",
        f"# allowed exactly the subjects it uses. {source} come from environment variables.",
        "accounts: {",
        f"  {NATS_ACCOUNT}: {{",
        "    jetstream: enabled",
        "    users: [",
    ]
    ind = "          "
    for user, perms in nats_permissions().items():
        lines += ["      {", *(f"        {item}" for item in identity(user))]
        lines += [
            "        permissions: {",
            "          publish: {",
            f"            allow: {_conf_list(perms.publish_allow, ind + '  ')}",
        ]
        if perms.publish_deny:
            lines.append(f"            deny: {_conf_list(perms.publish_deny, ind + '  ')}")
        lines += [
            "          }",
            "          subscribe: {",
            f"            allow: {_conf_list(perms.subscribe_allow, ind + '  ')}",
            "          }",
        ]
        if perms.allow_responses:
            lines.append("          allow_responses: true")
        lines += ["        }", "      }"]
    lines += [
        f"      {inline(NATS_ADMIN_USER)}",
        "    ]",
        "  }",
        "  SYS: {",
        f"    users: [{inline(NATS_SYSTEM_USER)}]",
        "  }",
        "}",
        "system_account: SYS",
    ]
    return "\n".join(lines) + "\n"


# --- Files ---------------------------------------------------------------------------


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def load_yaml_docs(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def parse_env_file(path: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, value = line.split("=", 1)
        out[key.strip()] = value.strip()
    return out


_INTERPOLATION = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}, ${VAR?error}."""

    def one(match: re.Match[str]) -> str:
        name, op, arg = match.group(1), match.group(2), match.group(3) or ""
        value = env.get(name)
        if op in (":-", "-"):
            empty = value is None or (op == ":-" and value == "")
            return arg if empty else str(value)
        if op in (":?", "?"):
            if value is None or (op == ":?" and value == ""):
                raise KeyError(f"{name}: {arg}")
            return value
        return value or ""

    return _INTERPOLATION.sub(one, text).replace("$$", "$")


def required_compose_variables(text: str) -> set[str]:
    return {m.group(1) for m in _INTERPOLATION.finditer(text) if m.group(2) in (":?", "?")}


# --- Compose -------------------------------------------------------------------------


def service_of_command(command: Any) -> str | None:
    """'gateway' for ["python", "-m", "gateway"] or ["chat-gateway"]; None otherwise."""
    if isinstance(command, str):
        command = command.split()
    if not isinstance(command, list):
        return None
    for svc in SERVICES:
        if command[-2:] == ["-m", svc] or command[:1] == [f"chat-{svc}"]:
            return svc
    return None


def compose_env(service_def: dict[str, Any]) -> dict[str, str]:
    env = service_def.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


def compose_services(compose: dict[str, Any]) -> dict[str, tuple[str, dict[str, Any]]]:
    """compose service name -> (our service, its definition), for our services only."""
    out = {}
    for name, definition in compose["services"].items():
        svc = service_of_command(definition.get("command"))
        if svc:
            out[name] = (svc, definition)
    return out


# --- Kustomize: the real `kubectl kustomize` ----------------------------------------
# Until issue 19 a small renderer of our own stood here; its output was compared with
# `kubectl kustomize` (v1.32, kustomize v5.5) on both overlays, object by object, and was
# the same, so it was dropped: CI installs kubectl, and the checks render with the tool
# operators use.


class KustomizeError(ValueError):
    pass


def kubectl() -> str:
    found = shutil.which("kubectl")
    if not found:
        raise KustomizeError("kubectl is not installed (apt-get install kubectl)")
    return found


def render_kustomization(folder: Path) -> list[dict[str, Any]]:
    """The objects `kubectl kustomize folder` renders (folder inside k8s/).

    Secrets are the operator's and never committed: the overlay is rendered from a copy of
    k8s/ where each missing `secrets.env` is its committed `secrets.env.example`. Secret
    `data` is decoded into `stringData`, so checks read the values as written."""
    k8s = ROOT / "k8s"
    rel = folder.resolve().relative_to(k8s.resolve())
    with tempfile.TemporaryDirectory(prefix="kustomize-") as tmp:
        copy_root = Path(tmp) / "k8s"
        shutil.copytree(k8s, copy_root)
        for example in copy_root.rglob("*.env.example"):
            real = example.with_name(example.name.removesuffix(".example"))
            if not real.exists():
                shutil.copy(example, real)
        done = subprocess.run(
            [kubectl(), "kustomize", str(copy_root / rel)],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    if done.returncode != 0:
        raise KustomizeError(f"kubectl kustomize {rel}: {done.stderr.strip()}")
    objs = [doc for doc in yaml.safe_load_all(done.stdout) if doc]
    for obj in objs:
        if obj["kind"] == "Secret" and obj.get("data"):
            decoded = {k: base64.b64decode(v).decode() for k, v in obj.pop("data").items()}
            obj["stringData"] = {**decoded, **(obj.get("stringData") or {})}
    return objs


def pod_specs(objs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        o["spec"]["template"]["spec"]
        for o in objs
        if o["kind"] in ("Deployment", "StatefulSet", "DaemonSet")
    ]


def find(objs: list[dict[str, Any]], kind: str, name: str | None = None) -> list[dict[str, Any]]:
    return [o for o in objs if o["kind"] == kind and name in (None, o["metadata"]["name"])]


def k8s_service_containers(
    objs: list[dict[str, Any]],
) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(our service, workload, container) for every container running one of our services."""
    out = []
    for obj in find(objs, "Deployment"):
        for container in obj["spec"]["template"]["spec"]["containers"]:
            svc = service_of_command(container.get("command", []) + container.get("args", []))
            if svc:
                out.append((svc, obj, container))
    return out


def k8s_container_env(objs: list[dict[str, Any]], container: dict[str, Any]) -> dict[str, str]:
    """The container's environment: env entries, secretKeyRef/configMapKeyRef values and
    whole ConfigMaps/Secrets from envFrom, resolved against the rendered objects."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        ref = source.get("configMapRef") or source.get("secretRef")
        kind = "ConfigMap" if "configMapRef" in source else "Secret"
        found = find(objs, kind, ref["name"])
        if not found:
            raise KeyError(f"{kind} {ref['name']} (envFrom) not rendered")
        env.update(found[0].get("data") or found[0].get("stringData") or {})
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = str(item["value"])
            continue
        value_from = item["valueFrom"]
        if "fieldRef" in value_from:
            env[item["name"]] = "<field>"
            continue
        ref = value_from.get("secretKeyRef") or value_from.get("configMapKeyRef")
        kind = "Secret" if "secretKeyRef" in value_from else "ConfigMap"
        found = find(objs, kind, ref["name"])
        if not found:
            raise KeyError(f"{kind} {ref['name']} not rendered")
        data = found[0].get("data") or found[0].get("stringData") or {}
        if ref["key"] not in data:
            raise KeyError(f"{kind} {ref['name']} has no key {ref['key']}")
        env[item["name"]] = data[ref["key"]]
    return env


def main(argv: list[str]) -> None:
    if argv[1:] == ["accounts"]:
        sys.stdout.write(render_accounts_conf())
        return
    if argv[1:] == ["accounts-nkeys"]:
        sys.stdout.write(render_accounts_conf("nkey"))
        return
    raise SystemExit("usage: python -m devtools.deploy_checks accounts|accounts-nkeys")


if __name__ == "__main__":
    main(sys.argv)


# --- Kubernetes network policies -------------------------------------------------------


def label_selector_matches(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A Kubernetes label selector (matchLabels, matchExpressions) against labels."""
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        ok = {
            "In": key in labels and labels[key] in values,
            "NotIn": key not in labels or labels[key] not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[op]
        if not ok:
            return False
    return True


@dataclass(frozen=True)
class Endpoint:
    """A pod (namespace labels + pod labels), or an address outside the cluster (None)."""

    namespace: str
    namespace_labels: dict[str, str] = field(default_factory=dict, hash=False)
    pod_labels: dict[str, str] = field(default_factory=dict, hash=False)


def _peer_matches(peer: dict[str, Any], policy_ns: str, other: Endpoint | None) -> bool:
    if "ipBlock" in peer:
        return other is None  # our ipBlocks are for addresses outside the cluster
    if other is None:
        return False
    if "namespaceSelector" in peer:
        if not label_selector_matches(peer["namespaceSelector"], other.namespace_labels):
            return False
    elif other.namespace != policy_ns:
        return False
    return "podSelector" not in peer or label_selector_matches(
        peer["podSelector"], other.pod_labels
    )


def _rule_allows(
    rule: dict[str, Any], peers_key: str, policy_ns: str, other: Endpoint | None, port: int
) -> bool:
    ports = rule.get("ports")
    if ports and not any(p.get("port") in (None, port) for p in ports):
        return False
    peers = rule.get(peers_key)
    return not peers or any(_peer_matches(p, policy_ns, other) for p in peers)


def network_allows(
    policies: list[dict[str, Any]], src: Endpoint | None, dst: Endpoint | None, port: int
) -> bool:
    """Whether TCP `port` from src to dst passes the NetworkPolicies (both ends' policies
    in their own namespaces; None is an address outside the cluster, never isolated)."""

    def side(me: Endpoint | None, other: Endpoint | None, kind: str, key: str) -> bool:
        if me is None:
            return True
        selecting = [
            p
            for p in policies
            if p["metadata"].get("namespace", me.namespace) == me.namespace
            and kind in p["spec"].get("policyTypes", ["Ingress"])
            and label_selector_matches(p["spec"].get("podSelector") or {}, me.pod_labels)
        ]
        if not selecting:
            return True  # not isolated
        return any(
            _rule_allows(rule, key, me.namespace, other, port)
            for p in selecting
            for rule in p["spec"].get(kind.lower()) or []
        )

    return side(src, dst, "Egress", "to") and side(dst, src, "Ingress", "from")


def workloads(objs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every object that runs pods."""
    return [o for o in objs if o["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job")]
