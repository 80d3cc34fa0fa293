"""Connecting to NATS and provisioning the streams and KV bucket every service relies on."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import ssl
from collections.abc import Awaitable, Callable

import nats
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext, api
from nats.js.errors import BadRequestError, ServerError
from nats.js.kv import KeyValue

from chatlib import names
from chatlib.nats_client import Client
from chatlib.settings import CommonSettings

log = logging.getLogger(__name__)

DAY = 24 * 3600.0


def instance_id(settings: CommonSettings, service: str) -> str:
    if settings.instance_id:
        return settings.instance_id
    # Host name + pid: unique per process on a host, readable in `nats server report conns`.
    host = socket.gethostname().split(".")[0].lower()
    clean = "".join(ch if ch.isalnum() or ch in "-_" else "-" for ch in host)
    return f"{service}-{clean}-{os.getpid()}"


async def close(nc: NATS, timeout: float) -> None:
    """Drain (pending publishes and acks go out), else close; never raises. A NATS that is
    down cannot be drained, and closing a connection that is reconnecting can itself fail
    (uvloop raises RuntimeError on its half-closed transport): the process stops anyway."""
    try:
        await asyncio.wait_for(nc.drain(), timeout)
        return
    except Exception as exc:
        log.warning("nats drain failed: %s", exc or type(exc).__name__)
    try:
        await asyncio.wait_for(nc.close(), timeout)
    except Exception as exc:
        log.warning("nats close failed: %s", exc or type(exc).__name__)


async def connect(
    settings: CommonSettings,
    name: str,
    on_state: Callable[[str], Awaitable[None]] | None = None,
) -> NATS:
    """Connect with endless reconnects: a NATS restart must never end a service."""

    async def disconnected() -> None:
        log.warning("nats disconnected")
        if on_state:
            await on_state("disconnected")

    async def reconnected() -> None:
        log.info("nats reconnected")
        if on_state:
            await on_state("reconnected")

    async def error(exc: Exception) -> None:
        log.warning("nats error: %s", exc)

    options: dict[str, object] = {
        "servers": settings.nats_servers,
        "name": name,
        "max_reconnect_attempts": -1,
        "reconnect_time_wait": 0.5,
        "connect_timeout": 3,
        "ping_interval": 5,
        "max_outstanding_pings": 3,
        # Keep publishing into the buffer while reconnecting; JetStream publishes still
        # wait for their ack, so nothing is acknowledged that is not stored.
        "pending_size": 8 * 1024 * 1024,
        "disconnected_cb": disconnected,
        "reconnected_cb": reconnected,
        "error_cb": error,
        "allow_reconnect": True,
    }
    options.update(security_options(settings))
    # The first connect also retries: services may start before NATS in compose or k8s.
    delay = 0.2
    while True:
        try:
            nc = Client()
            await nc.connect(**options)  # type: ignore[arg-type]
            return nc
        except (TimeoutError, OSError, nats.errors.NoServersError) as exc:
            log.warning("nats not reachable yet (%s); retrying in %.1fs", exc, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)


def security_options(settings: CommonSettings) -> dict[str, object]:
    """Who we are on NATS (NKey seed, .creds file or user/password) and TLS: with a CA
    file the connection is TLS and the server's certificate must chain to that CA and
    name the host we dial (no fallback to plaintext)."""
    options: dict[str, object] = {}
    if settings.nats_nkey_seed:
        options["nkeys_seed_str"] = settings.nats_nkey_seed
    elif settings.nats_nkey_seed_file:
        options["nkeys_seed"] = settings.nats_nkey_seed_file
    elif settings.nats_creds:
        options["user_credentials"] = settings.nats_creds
    elif settings.nats_user:
        options["user"] = settings.nats_user
        options["password"] = settings.nats_password
    if settings.nats_tls_ca_file:
        context = ssl.create_default_context(cafile=settings.nats_tls_ca_file)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if settings.nats_tls_cert_file:
            context.load_cert_chain(settings.nats_tls_cert_file, settings.nats_tls_key_file or None)
        options["tls"] = context
    return options


def stream_configs(settings: CommonSettings) -> list[api.StreamConfig]:
    replicas = settings.stream_replicas
    return [
        api.StreamConfig(
            name=names.STREAM_CHAT,
            description="Every chat message in order; reconnect recovery replays from it",
            subjects=names.STREAM_CHAT_SUBJECTS,
            retention=api.RetentionPolicy.LIMITS,
            storage=api.StorageType.FILE,
            num_replicas=replicas,
            max_age=settings.chat_log_max_age,
            max_bytes=settings.chat_log_max_bytes,
            duplicate_window=120.0,
            max_msg_size=64 * 1024,
            republish=api.RePublish(src=names.CHAT_ALL, dest=names.LIVE_ALL),
        ),
        api.StreamConfig(
            name=names.STREAM_ARCHIVE,
            description="Archive work queue: one task per message to write to Postgres",
            subjects=[names.ARCHIVE_TASKS],
            sources=[api.StreamSource(name=names.STREAM_CHAT)],
            retention=api.RetentionPolicy.WORK_QUEUE,
            storage=api.StorageType.FILE,
            num_replicas=replicas,
            duplicate_window=120.0,
            max_age=7 * DAY,
        ),
        api.StreamConfig(
            name=names.STREAM_DEAD,
            description="Messages a consumer could not process, with the reason in a header",
            subjects=[names.DEAD_LETTER_ALL],
            retention=api.RetentionPolicy.LIMITS,
            storage=api.StorageType.FILE,
            num_replicas=replicas,
            max_age=30 * DAY,
        ),
        api.StreamConfig(
            name=names.STREAM_USERSTATE,
            description="User-state events: memberships, read markers, mentions",
            subjects=names.STREAM_USERSTATE_SUBJECTS,
            retention=api.RetentionPolicy.LIMITS,
            storage=api.StorageType.FILE,
            num_replicas=replicas,
            # Applied to Postgres within seconds; kept a week for an archive outage.
            max_age=7 * DAY,
            duplicate_window=120.0,
            max_msg_size=4 * 1024,
            republish=api.RePublish(src=f"{names.USER_PREFIX}.>", dest=names.LIVE_USER_ALL),
        ),
        api.StreamConfig(
            name=names.STREAM_PRESENCE,
            description="Online/offline events, deduplicated per state transition",
            subjects=[names.PRESENCE_EVENTS_ALL],
            retention=api.RetentionPolicy.LIMITS,
            storage=api.StorageType.FILE,
            num_replicas=replicas,
            max_age=3600.0,
            duplicate_window=120.0,
        ),
    ]


# How often stream creation is retried while the server reports its store busy.
STORE_RETRIES = 5


async def ensure_stream(js: JetStreamContext, config: api.StreamConfig) -> None:
    """Create the stream if missing. Safe when several replicas start at once: creating an
    identical stream twice succeeds, and a stream that exists with another config is left
    as the operator set it (changing retention under running consumers is their call)."""
    for attempt in range(STORE_RETRIES + 1):
        try:
            await js.add_stream(config)
            return
        except BadRequestError as exc:
            if exc.err_code != 10058:  # stream name already in use with a different config
                raise
            log.info("stream %s exists with another config; leaving it as is", config.name)
            return
        except ServerError as exc:
            # 10049 "error creating store": the server is still removing the files of a
            # stream of that name deleted a moment ago. Transient: try again shortly.
            if exc.err_code != 10049 or attempt == STORE_RETRIES:
                raise
            log.info("stream %s: store busy, retrying", config.name)
            await asyncio.sleep(0.1 * (attempt + 1))


# A JetStream API request that times out while provisioning is asked again this many
# times: a cluster that has just elected its meta leader can take longer than one
# request's timeout to place a replicated stream, and every step here is idempotent.
PROVISION_RETRIES = 5


async def provision(js: JetStreamContext, settings: CommonSettings) -> KeyValue:
    """The streams and buckets every service relies on, created if missing."""
    for attempt in range(PROVISION_RETRIES + 1):
        try:
            for config in stream_configs(settings):
                await ensure_stream(js, config)
            await ensure_members_bucket(js, settings)
            return await ensure_presence_bucket(js, settings)
        except nats.errors.TimeoutError:
            if attempt == PROVISION_RETRIES:
                raise
            log.warning("JetStream did not answer in time while provisioning; asking again")
            await asyncio.sleep(0.5 * (attempt + 1))
    raise AssertionError("unreachable")


async def ensure_kv(
    js: JetStreamContext, bucket: str, description: str, replicas: int, ttl: float | None = None
) -> KeyValue:
    """A KV bucket (history 1, on file): created, or the existing one taken as it is."""
    try:
        return await js.create_key_value(
            api.KeyValueConfig(
                bucket=bucket,
                description=description,
                history=1,
                ttl=ttl,
                storage=api.StorageType.FILE,
                replicas=replicas,
            )
        )
    except BadRequestError as exc:
        if exc.err_code != 10058:  # exists with another config: the operator's call
            raise
        return await js.key_value(bucket)


async def ensure_members_bucket(js: JetStreamContext, settings: CommonSettings) -> KeyValue:
    description = "Room membership: <room>.<user> for who joined and has not left"
    return await ensure_kv(js, names.KV_MEMBERS, description, settings.stream_replicas)


async def ensure_presence_bucket(js: JetStreamContext, settings: CommonSettings) -> KeyValue:
    description = "Who is online: live connections per user, gateway heartbeats"
    return await ensure_kv(js, names.KV_PRESENCE, description, settings.stream_replicas)
