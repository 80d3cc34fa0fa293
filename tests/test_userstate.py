"""User state on the server (issue #13): memberships, read markers, unread and mention
counts, the room directory and DM threads, against real NATS, Postgres, two gateways and
two archive replicas."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from archive import userstate as archive_userstate
from chatlib import codec, names
from chatlib.proto.chat import v1 as pb
from devtools.servers import url_as
from nats.aio.client import Client as NATS

from tests.archive_fixtures import ArchiveProc, archive_db, archive_procs, start_archive
from tests.chatctl_fixtures import run_chatctl
from tests.gateway_fixtures import ChatClient, GatewayProc, clients, gateways
from tests.presence_fixtures import PresenceReplicas, presence_replicas
from tests.waiting import wait_until

__all__ = ["archive_db", "archive_procs", "gateways", "presence_replicas"]


def start_two_archives(procs: list[ArchiveProc], nats_url: str, db: str, logs: Path) -> None:
    for _ in range(2):
        start_archive(procs, nats_url, db, logs, wait_ready=False)
    for proc in procs:
        proc.wait_ready()


async def fetch(database_url: str, query: str, *args: Any) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(database_url)
    try:
        return list(await conn.fetch(query, *args))
    finally:
        await conn.close()


async def member_rooms(database_url: str, user: str) -> set[str]:
    rows = await fetch(
        database_url, 'SELECT room FROM memberships WHERE "user" = $1 AND member', user
    )
    return {r["room"] for r in rows}


def counts(welcome: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """thread ('dev' or '@bob') -> (unread, mentions) from a welcome."""
    out = {}
    for entry in welcome.get("unread", []):
        key = entry["room"] if "room" in entry else "@" + entry["with"]
        out[key] = (entry["unread"], entry["mentions"])
    return out


async def acked_seq(client: ChatClient, cid: str) -> int:
    ack = await client.expect(type="ack", client_id=cid)
    return int(ack["seq"])


@pytest.fixture
async def system(
    nc: NATS,
    gateways: list[GatewayProc],
    archive_procs: list[ArchiveProc],
    nats_server: Any,
    database_url: str,
    logs_dir: Path,
) -> list[GatewayProc]:
    start_two_archives(archive_procs, nats_server.url, database_url, logs_dir)
    return gateways


async def test_a_join_on_one_device_reaches_the_other_and_every_new_device_lists_it(
    system: list[GatewayProc], database_url: str
) -> None:
    gw_a, gw_b = system
    async with clients(
        ChatClient.connect(gw_a, "alice"),
        ChatClient.connect(gw_b, "alice"),
        ChatClient.connect(gw_b, "bob", rooms=["dev"]),
    ) as (phone, laptop, bob):
        await phone.send({"type": "join", "room": "dev"})
        await laptop.expect(type="membership", room="dev", joined=True, timeout=1.0)
        # The laptop is now in dev without having asked: it receives dev's messages.
        await bob.send_room("dev", "hello dev")
        await laptop.expect(type="message", room="dev", content="hello dev")
        await wait_until(lambda: member_rooms(database_url, "alice"), "alice's memberships stored")
        async with clients(ChatClient.connect(gw_a, "alice")) as (tablet,):
            assert "dev" in tablet.welcome["rooms"]
        await laptop.send({"type": "leave", "room": "dev"})
        await phone.expect(type="membership", room="dev", joined=False, timeout=1.0)
        await wait_until(lambda: _lacks(member_rooms(database_url, "alice"), "dev"), "leave stored")
        async with clients(ChatClient.connect(gw_b, "alice")) as (desktop,):
            assert desktop.welcome["rooms"] == ["lobby"]


async def _lacks(rooms: Any, room: str) -> bool:
    return room not in await rooms


async def _has(rooms: Any, room: str) -> bool:
    return room in await rooms


async def test_unread_and_mention_counts_are_exact_and_a_read_clears_them_on_every_device(
    system: list[GatewayProc], database_url: str
) -> None:
    gw_a, gw_b = system
    async with clients(
        ChatClient.connect(gw_a, "alice", rooms=["dev"]),
        ChatClient.connect(gw_b, "bob", rooms=["dev"]),
    ) as (alice, bob):
        await alice.close()
        await wait_until(lambda: member_rooms(database_url, "alice"), "alice in dev")
        seqs = []
        for text in ("one", "two @alice", "three", "mail a@alice.org"):
            seqs.append(await acked_seq(bob, await bob.send_room("dev", text)))
        await acked_seq(bob, await bob.send_dm("alice", "psst"))
        dm_seq = await acked_seq(bob, await bob.send_dm("alice", "psst @alice"))
        await acked_seq(alice_own := bob, await bob.send_room("lobby", "hi all"))
        del alice_own
        async with clients(
            ChatClient.connect(gw_a, "alice"), ChatClient.connect(gw_b, "alice")
        ) as (phone, laptop):
            assert counts(phone.welcome)["dev"] == (4, 1)
            assert counts(phone.welcome)["@bob"] == (2, 0)
            assert counts(phone.welcome)["lobby"] == (1, 0)
            assert phone.welcome["unread_cap"] == 100
            # Read dev up to the second message on the phone: the laptop hears it at once.
            await phone.send({"type": "read", "room": "dev", "seq": seqs[1]})
            await laptop.expect(type="read", room="dev", seq=seqs[1], timeout=1.0)
            await phone.expect(type="read", room="dev", seq=seqs[1])
            await phone.send({"type": "read", "with": "bob", "seq": dm_seq})
            await laptop.expect(type="read", seq=dm_seq, timeout=1.0, **{"with": "bob"})
            # A stale marker changes nothing: markers only move forward.
            await laptop.send({"type": "read", "room": "dev", "seq": seqs[0]})
            await laptop.expect(type="read", room="dev", seq=seqs[0])

            async def settled() -> bool:
                rows = await fetch(
                    database_url,
                    'SELECT thread, seq FROM read_markers WHERE "user" = $1',
                    "alice",
                )
                return {r["thread"]: r["seq"] for r in rows} == {
                    "r:dev": seqs[1],
                    "d:bob": dm_seq,
                }

            await wait_until(settled, "markers stored, forward only")
        async with clients(ChatClient.connect(gw_b, "alice")) as (tablet,):
            assert counts(tablet.welcome)["dev"] == (2, 0)
            assert "@bob" not in counts(tablet.welcome)


async def test_counts_stay_exact_while_the_archive_lags_behind_the_log(
    system: list[GatewayProc], database_url: str
) -> None:
    """The archive cannot write messages (their table is locked), so it is behind the
    CHAT log: the counts add the log's tail to what the archive has."""
    gw_a, gw_b = system
    async with clients(
        ChatClient.connect(gw_a, "alice", rooms=["dev"]),
        ChatClient.connect(gw_b, "bob", rooms=["dev"]),
    ) as (alice, bob):
        await wait_until(lambda: member_rooms(database_url, "alice"), "alice in dev")
        first = await acked_seq(bob, await bob.send_room("dev", "archived"))
        await wait_until(
            lambda: fetch(database_url, "SELECT 1 FROM messages WHERE stream_seq = $1", first),
            "first message archived",
        )
        await alice.send({"type": "read", "room": "dev", "seq": first})
        await alice.expect(type="read", room="dev", seq=first)
        lock = await asyncpg.connect(database_url)
        try:
            tx = lock.transaction()
            await tx.start()
            await lock.execute("LOCK TABLE messages IN EXCLUSIVE MODE")
            for n in range(3):
                await acked_seq(bob, await bob.send_room("dev", f"lagging {n} @alice"))
            await acked_seq(bob, await bob.send_dm("alice", "lagging dm"))
            async with clients(ChatClient.connect(gw_b, "alice")) as (laptop,):
                assert counts(laptop.welcome)["dev"] == (3, 3)
                assert counts(laptop.welcome)["@bob"] == (1, 0)
            stored = await fetch(database_url, "SELECT count(*) AS n FROM messages")
            assert stored[0]["n"] == 1  # the three are really not archived yet
            await tx.rollback()
        finally:
            await lock.close()
        await wait_until(lambda: _count_is(database_url, 5), "the archive caught up", timeout=30)
        async with clients(ChatClient.connect(gw_a, "alice")) as (tablet,):
            assert counts(tablet.welcome)["dev"] == (3, 3)
            assert counts(tablet.welcome)["@bob"] == (1, 0)


async def _count_is(database_url: str, n: int) -> bool:
    rows = await fetch(database_url, "SELECT count(*) AS n FROM messages")
    return bool(rows[0]["n"] == n)


async def test_bad_reads_get_documented_errors_and_store_nothing(
    system: list[GatewayProc], database_url: str
) -> None:
    gw_a, _ = system
    async with clients(
        ChatClient.connect(gw_a, "alice", rooms=["dev"]),
        ChatClient.connect(gw_a, "bob", rooms=["dev", "secret"]),
    ) as (alice, bob):
        dev_seq = await acked_seq(bob, await bob.send_room("dev", "hi"))
        secret_seq = await acked_seq(bob, await bob.send_room("secret", "hush"))
        bad = [
            ({"room": "secret", "seq": secret_seq}, "not_joined"),  # a thread you are not in
            ({"room": "nowhere", "seq": dev_seq}, "not_joined"),  # an unknown room
            ({"room": "dev", "seq": dev_seq + 1000}, "bad_marker"),  # past the end
            ({"room": "dev", "seq": secret_seq}, "bad_marker"),  # another thread's message
            ({"with": "bob", "seq": dev_seq}, "bad_marker"),  # not a message of the DM
            ({"room": "dev", "seq": dev_seq, "user": "bob"}, "forbidden"),  # forged user
            ({"room": "Dev!", "seq": dev_seq}, "bad_room"),
            ({"room": "dev", "seq": 0}, "bad_frame"),
            ({"room": "dev", "seq": "7"}, "bad_frame"),
            ({"seq": dev_seq}, "bad_frame"),
        ]
        for fields, _code in bad:
            await alice.send({"type": "read", **fields})
        errors = await alice.expect_count(len(bad), type="error", ref="read")
        assert [e["code"] for e in errors] == [code for _, code in bad]
        # A good read after the bad ones: the only marker stored, the only read frame.
        await alice.send({"type": "read", "room": "dev", "seq": dev_seq})
        await alice.expect(type="read", room="dev", seq=dev_seq)
        await wait_until(
            lambda: fetch(database_url, "SELECT 1 FROM read_markers"), "the good marker"
        )
        rows = await fetch(database_url, 'SELECT "user", thread, seq FROM read_markers')
        assert [(r["user"], r["thread"], r["seq"]) for r in rows] == [("alice", "r:dev", dev_seq)]
        assert len(alice.matching(type="read")) == 1


async def test_events_apply_once_whatever_the_redeliveries_and_order(
    archive_db: asyncpg.Pool,
) -> None:
    """The archive's apply step on real Postgres: a batch applied twice, or its events in
    another order (two replicas racing), ends in the same state."""

    def member(seq: int, room: str, joined: bool) -> archive_userstate.Event:
        event = pb.MembershipEvent(id=f"m{seq}", user="alice", room=room, joined=joined, ts_ms=seq)
        return archive_userstate.Event(seq, event)

    def read(seq: int, room: str, upto: int) -> archive_userstate.Event:
        return archive_userstate.Event(
            seq, pb.ReadEvent(id=f"r{seq}", user="alice", room=room, seq=upto, ts_ms=seq)
        )

    events = [
        member(1, "dev", True),
        member(2, "ops", True),
        read(3, "dev", 40),
        member(4, "dev", False),
        read(5, "dev", 30),  # stale
        member(6, "ops", False),
        member(7, "ops", True),
    ]
    await archive_userstate.apply_events(archive_db, events)
    await archive_userstate.apply_events(archive_db, events)  # redelivered
    await archive_userstate.apply_events(archive_db, list(reversed(events)))  # reordered
    rows = await archive_db.fetch("SELECT room, member FROM memberships ORDER BY room")
    assert [(r["room"], r["member"]) for r in rows] == [("dev", False), ("ops", True)]
    assert await archive_db.fetchval("SELECT seq FROM read_markers") == 40


async def test_two_archive_replicas_apply_every_event_exactly_once_across_a_restart(
    system: list[GatewayProc],
    archive_procs: list[ArchiveProc],
    nats_server: Any,
    database_url: str,
    logs_dir: Path,
) -> None:
    """Many users join and leave rooms on both gateways while archive replicas are killed
    and restarted: the stored memberships equal what each user did last."""
    gw_a, gw_b = system
    users = [f"u{n}" for n in range(8)]
    async with clients(
        *(ChatClient.connect(gw_a if n % 2 else gw_b, u) for n, u in enumerate(users))
    ) as socks:
        for round_ in range(6):
            if round_ == 2:
                archive_procs[0].kill()
            if round_ == 4:
                start_archive(archive_procs, nats_server.url, database_url, logs_dir)
            for n, sock in enumerate(socks):
                room = f"r{(n + round_) % 4}"
                await sock.send({"type": "join", "room": room})
                if round_ % 2:
                    await sock.send({"type": "leave", "room": f"r{(n + round_ + 1) % 4}"})
        expected = {}
        for n, sock in enumerate(socks):
            await sock.send({"type": "ping"})
            await sock.expect_count(1, type="pong")
            joined = {f["room"] for f in sock.matching(type="joined")}
            left_frames = [f for f in sock.frames if f.get("type") in {"joined", "left"}]
            now: set[str] = {"lobby"}
            for f in left_frames:
                (now.add if f["type"] == "joined" else now.discard)(f["room"])
            assert joined
            expected[users[n]] = now

        async def stored_all() -> bool:
            for user, rooms in expected.items():
                if await member_rooms(database_url, user) != rooms:
                    return False
            return True

        await wait_until(stored_all, "every user's last membership stored", timeout=30)


async def test_mentions_go_out_as_events_on_nats_for_members_only(
    system: list[GatewayProc], nc: NATS, database_url: str
) -> None:
    gw_a, gw_b = system
    got: list[pb.MentionEvent] = []

    async def on_mention(msg: Any) -> None:
        got.append(codec.decode_as(pb.MentionEvent, msg.data, msg.headers))

    await nc.subscribe(names.USER_MENTION_ALL, cb=on_mention)
    async with clients(
        ChatClient.connect(gw_a, "alice", rooms=["dev"]),
        ChatClient.connect(gw_b, "bob", rooms=["dev"]),
    ) as (alice, bob):
        await wait_until(lambda: member_rooms(database_url, "alice"), "alice in dev")
        seq = await acked_seq(bob, await bob.send_room("dev", "@alice and @carol, look"))
        await alice.expect(type="mention", room="dev", sender="bob", seq=seq)
        await wait_until(lambda: got, "a mention event on NATS")
        await asyncio.sleep(0)
        assert [(m.user, m.room, m.sender, m.seq) for m in got] == [("alice", "dev", "bob", seq)]


async def test_the_room_directory_and_dm_threads_page_from_the_server(
    system: list[GatewayProc],
    database_url: str,
    presence_replicas: PresenceReplicas,
    nats_server: Any,
) -> None:
    presence_replicas.start(1)
    gw_a, gw_b = system
    async with clients(
        ChatClient.connect(gw_a, "alice", rooms=["dev", "design", "ops"]),
        ChatClient.connect(gw_b, "bob", rooms=["dev"]),
        ChatClient.connect(gw_b, "carol"),
    ) as (alice, bob, carol):
        await acked_seq(bob, await bob.send_room("dev", "hi"))
        await acked_seq(bob, await bob.send_dm("alice", "from bob"))
        await acked_seq(carol, await carol.send_dm("alice", "from carol"))
        await wait_until(lambda: _count_is(database_url, 3), "messages archived", timeout=15)
        await wait_until(lambda: _has(member_rooms(database_url, "bob"), "dev"), "bob in dev")
        await alice.send({"type": "rooms", "prefix": "d", "limit": 1})
        page = await alice.expect(type="rooms")
        assert [r["name"] for r in page["rooms"]] == ["design"] and page["has_more"]
        await alice.send({"type": "rooms", "prefix": "d", "after": "design"})

        async def second_page() -> Any:
            pages = alice.matching(type="rooms")
            return pages[1] if len(pages) > 1 else None

        page2 = await wait_until(second_page, "second page")
        assert isinstance(page2, dict)
        dev = page2["rooms"][0]
        assert (dev["name"], dev["members"], dev["joined"]) == ("dev", 2, True)
        assert dev["last_ts"] > 0 and not page2["has_more"]
        await alice.send({"type": "threads"})
        threads = await alice.expect(type="threads")
        assert [(t["with"], t["online"]) for t in threads["threads"]] == [
            ("carol", True),
            ("bob", True),
        ]
        await alice.send({"type": "rooms", "prefix": "D!"})
        await alice.expect(type="error", code="bad_room", ref="rooms")

        # The operator's view of the same state.
        server = url_as(nats_server.url, "admin")
        listed = await run_chatctl("-s", server, "rooms", "--prefix", "d")
        assert listed.code == 0, listed.err
        assert [(r["name"], r["members"]) for r in listed.lines()] == [("design", 1), ("dev", 2)]
        unread = await run_chatctl("-s", server, "unread", "alice")
        assert unread.code == 0, unread.err
        dms = {t["with"]: t["unread"] for t in unread.lines() if "with" in t}
        assert dms == {"bob": 1, "carol": 1}
        assert (await run_chatctl("-s", server, "unread", "Not A User")).code == 2


async def test_joins_wait_in_the_stream_while_no_archive_runs_and_count_at_once(
    system: list[GatewayProc],
    archive_procs: list[ArchiveProc],
    nats_server: Any,
    database_url: str,
    logs_dir: Path,
) -> None:
    """Both archive replicas dead: joins are still stored (in USERSTATE) and
    applied when a replica is back. Then, with the archive unable to apply (its table
    locked), a new device still sees the latest join: hello lays the unapplied events
    over what Postgres holds."""
    gw_a, gw_b = system
    for proc in archive_procs:
        proc.kill()
    async with clients(ChatClient.connect(gw_a, "alice"), ChatClient.connect(gw_b, "alice")) as (
        phone,
        laptop,
    ):
        await phone.send({"type": "join", "room": "dev"})
        await phone.expect(type="joined", room="dev")
        await laptop.expect(type="membership", room="dev", joined=True, timeout=1.0)
        assert not phone.matching(type="error", ref="join")
        start_archive(archive_procs, nats_server.url, database_url, logs_dir)
        await wait_until(lambda: _has(member_rooms(database_url, "alice"), "dev"), "applied")

        lock = await asyncpg.connect(database_url)
        try:
            tx = lock.transaction()
            await tx.start()
            await lock.execute("LOCK TABLE memberships IN EXCLUSIVE MODE")
            await laptop.send({"type": "join", "room": "ops"})
            await phone.expect(type="membership", room="ops", joined=True)
            async with clients(ChatClient.connect(gw_a, "alice")) as (tablet,):
                assert tablet.welcome["rooms"] == ["dev", "lobby", "ops"]
            assert "ops" not in await member_rooms(database_url, "alice")  # not applied yet
            await tx.rollback()
        finally:
            await lock.close()
        await wait_until(lambda: _has(member_rooms(database_url, "alice"), "ops"), "applied")


async def test_a_forged_or_undecodable_user_state_event_is_parked_and_changes_nothing(
    system: list[GatewayProc], nc: NATS, database_url: str
) -> None:
    js = nc.jetstream()
    forged = pb.MembershipEvent(id="forged-1", user="alice", room="dev", joined=True, ts_ms=1)
    payload, headers = codec.encode(forged)
    await js.publish(names.membership_subject("mallory"), payload, headers=headers)
    await js.publish(names.read_subject("mallory"), b"\xff\x00garbage")
    await wait_until(lambda: _dead_count(js), "both parked", timeout=15)
    rows = await fetch(database_url, "SELECT * FROM memberships")
    assert rows == []
    # Real traffic still flows.
    gw_a, _ = system
    async with clients(ChatClient.connect(gw_a, "alice")) as (alice,):
        await alice.send({"type": "join", "room": "dev"})
        await wait_until(lambda: _has(member_rooms(database_url, "alice"), "dev"), "applied")


async def _dead_count(js: Any) -> bool:
    info = await js.stream_info("DEADLETTER", subjects_filter=names.DEAD_LETTER_USERSTATE)
    return bool(info.state.messages >= 2)
