"""A nats-server started with the deploy config lets each service do its job and refuses
what it must not do (subjects derived from chatlib.names, not restated here)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import nats
import nats.js.errors
import pytest
from chatlib import names, nats_wiring
from chatlib.settings import CommonSettings
from devtools import certs
from devtools import deploy_checks as dc
from devtools.servers import DEPLOY_NATS_USERS, NatsServer
from nats.aio.client import Client as NATS

from tests.waiting import wait_until


@pytest.fixture(scope="module", params=["passwords", "tls-nkeys"])
def deploy_nats(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[NatsServer]:
    """nats-server with deploy/nats/nats.conf and accounts.conf, test passwords; and with
    deploy/nats/nats-tls.conf and accounts-nkeys.conf (TLS required, one NKey per
    service): every test below runs against both, so the permissions are the same."""
    base = tmp_path_factory.mktemp("deploy-nats")
    if request.param == "passwords":
        server = NatsServer.deployed(base)
    else:
        tls_dir = base / "tls"
        certs.make_all(tls_dir)
        server = NatsServer.deployed_tls(base / "nats", tls_dir)
    server.start()
    yield server
    server.stop()


def test_the_test_servers_know_every_user_of_the_accounts_file() -> None:
    users = {*dc.nats_permissions(), dc.NATS_ADMIN_USER, dc.NATS_SYSTEM_USER}
    assert set(DEPLOY_NATS_USERS) == users


class User:
    def __init__(self, nc: NATS, errors: list[str]) -> None:
        self.nc, self.errors = nc, errors

    def refused(self, subject: str) -> bool:
        # nats-py lower-cases the server's -ERR text.
        return any(
            "permissions violation" in e.lower() and subject.lower() in e.lower()
            for e in self.errors
        )


@pytest.fixture
async def connect(deploy_nats: NatsServer) -> AsyncIterator[object]:
    clients: list[NATS] = []

    async def as_user(user: str) -> User:
        errors: list[str] = []

        async def on_error(exc: Exception) -> None:
            errors.append(str(exc))

        nc = await nats.connect(**deploy_nats.connect_options(user), error_cb=on_error)
        clients.append(nc)
        return User(nc, errors)

    yield as_user
    for nc in clients:
        await nc.close()


async def provision_as(user: User) -> None:
    # Every service provisions streams and the KV bucket at start; its user must be able to.
    await nats_wiring.provision(user.nc.jetstream(), CommonSettings())


async def test_a_wrong_password_is_refused(deploy_nats: NatsServer) -> None:
    if deploy_nats.tls_dir is not None:
        pytest.skip("no passwords here: tests/test_nats_tls.py refuses wrong NKeys")
    with pytest.raises(Exception):  # noqa: B017 - nats-py raises several kinds here
        await nats.connect(
            deploy_nats.url.replace("admin:test-admin", "gateway:wrong"),
            max_reconnect_attempts=0,
            allow_reconnect=False,
        )


async def test_gateway_publishes_chat_through_jetstream_and_hears_live_fanout(connect) -> None:  # type: ignore[no-untyped-def]
    gw = await connect("gateway")
    await provision_as(gw)
    subject = names.room_subject("lobby")
    live = await gw.nc.subscribe(names.LIVE_ALL)
    ack = await gw.nc.jetstream().publish(subject, b"hi", headers={names.HEADER_MSG_ID: "m-1"})
    assert ack.stream == names.STREAM_CHAT
    msg = await live.next_msg(timeout=5)
    assert msg.subject == names.live_subject(subject)
    assert not gw.errors


async def test_gateway_cannot_pull_the_archive_work_queue(connect) -> None:  # type: ignore[no-untyped-def]
    archive = await connect("archive")
    await provision_as(archive)
    # The archive's own consumer works for the archive user...
    sub = await archive.nc.jetstream().pull_subscribe(
        names.ARCHIVE_TASKS, durable=names.CONSUMER_ARCHIVE, stream=names.STREAM_ARCHIVE
    )
    admin = await connect(dc.NATS_ADMIN_USER)  # operators (chatctl) enqueue tasks
    await admin.nc.jetstream().publish(names.ARCHIVE_TASKS, b"task")
    got = await sub.fetch(1, timeout=5)
    await got[0].ack()
    assert not archive.errors
    # ...but the gateway may not read or steal it.
    gw = await connect("gateway")
    next_subject = f"$JS.API.CONSUMER.MSG.NEXT.{names.STREAM_ARCHIVE}.{names.CONSUMER_ARCHIVE}"
    await gw.nc.publish(next_subject, b'{"batch":1}', reply=gw.nc.new_inbox())
    await wait_until(lambda: gw.refused(next_subject), "gateway refused MSG.NEXT on ARCHIVE")
    with pytest.raises(Exception):  # noqa: B017 - the request is dropped: a timeout
        await gw.nc.jetstream().consumer_info(
            names.STREAM_ARCHIVE, names.CONSUMER_ARCHIVE, timeout=1
        )


async def test_archive_cannot_publish_chat_messages(connect) -> None:  # type: ignore[no-untyped-def]
    archive = await connect("archive")
    subject = names.room_subject("lobby")
    await archive.nc.publish(subject, b"forged")
    await wait_until(lambda: archive.refused(subject), "archive refused chat publish")


async def test_presence_cannot_listen_to_chat_traffic(connect) -> None:  # type: ignore[no-untyped-def]
    presence = await connect("presence")
    await presence.nc.subscribe(names.CHAT_ALL)
    await presence.nc.flush()
    await wait_until(lambda: presence.refused(names.CHAT_ALL), "presence refused chat.>")


async def test_presence_serves_who_and_publishes_events_others_cannot_forge(connect) -> None:  # type: ignore[no-untyped-def]
    presence = await connect("presence")
    await provision_as(presence)

    async def answer(msg):  # type: ignore[no-untyped-def]
        await msg.respond(b"page")

    await presence.nc.subscribe(names.PRESENCE_WHO, queue=names.QUEUE_PRESENCE, cb=answer)
    ack = await presence.nc.jetstream().publish(names.online_subject("alice"), b"on")
    assert ack.stream == names.STREAM_PRESENCE
    gw = await connect("gateway")
    reply = await gw.nc.request(names.PRESENCE_WHO, b"", timeout=5)
    assert reply.data == b"page"  # the responder may answer the gateway's inbox
    forged = names.offline_subject("alice")
    await gw.nc.publish(forged, b"off")
    await wait_until(lambda: gw.refused(forged), "gateway refused presence event")
    assert not presence.errors


def test_permissions_cover_the_subjects_of_every_contract() -> None:
    perms = dc.nats_permissions()
    assert set(names.STREAM_CHAT_SUBJECTS) <= set(perms["gateway"].publish_allow)
    assert names.LIVE_ALL in perms["gateway"].subscribe_allow
    assert {names.HISTORY_ROOM, names.HISTORY_DM} <= set(perms["archive"].subscribe_allow)
    assert names.PRESENCE_WHO in perms["presence"].subscribe_allow
    assert names.PRESENCE_EVENTS_ALL in perms["gateway"].subscribe_allow
    assert names.PRESENCE_EVENTS_ALL in perms["presence"].publish_allow
    for user in ("archive", "presence"):
        assert not any(s.startswith(names.CHAT_PREFIX + ".") for s in perms[user].publish_allow)


async def test_archive_hears_max_deliveries_and_removes_the_task_it_parked(connect) -> None:  # type: ignore[no-untyped-def]
    """What parking a task JetStream gave up on needs: the advisory and a message delete
    on ARCHIVE; and (issue 14) removing deleted content from CHAT; no other deletes."""
    archive = await connect("archive")
    await provision_as(archive)
    advisories = await archive.nc.subscribe(
        names.ADVISORY_ARCHIVE_MAX_DELIVERIES, queue=names.QUEUE_ARCHIVE
    )
    admin = await connect(dc.NATS_ADMIN_USER)
    js = admin.nc.jetstream()
    task = await js.publish(names.ARCHIVE_TASKS, b"task")
    await admin.nc.publish(names.ADVISORY_ARCHIVE_MAX_DELIVERIES, b"{}")  # as JetStream does
    assert (await advisories.next_msg(timeout=5)).data == b"{}"
    await archive.nc.jetstream().delete_msg(names.STREAM_ARCHIVE, task.seq)
    chat = await js.publish(names.room_subject("lobby"), b"deleted by its author")
    await archive.nc.jetstream().delete_msg(names.STREAM_CHAT, chat.seq)
    with pytest.raises(nats.js.errors.NotFoundError):
        await js.get_msg(names.STREAM_CHAT, chat.seq)
    parked = await js.publish(names.DEAD_LETTER_ARCHIVE, b"parked")
    with pytest.raises(Exception):  # noqa: B017 - the request is dropped: a timeout
        await archive.nc.jetstream().delete_msg(names.STREAM_DEAD, parked.seq)
    delete_dead = f"$JS.API.STREAM.MSG.DELETE.{names.STREAM_DEAD}"
    await wait_until(lambda: archive.refused(delete_dead), "archive refused a DEADLETTER delete")
    with pytest.raises(nats.js.errors.NotFoundError):
        await js.get_msg(names.STREAM_ARCHIVE, task.seq)
    assert (await js.get_msg(names.STREAM_DEAD, parked.seq)).data == b"parked"
