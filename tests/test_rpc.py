"""The gRPC door (services/rpc) against the whole system: real NATS (with the shipped
permissions), Postgres, gateways and a grpc.aio client on the stubs protoc writes from
protos/chat/v1/chat_service.proto, as an integrator in any language would have."""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from devtools.servers import PostgresServer
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from websockets.asyncio.client import connect

from tests.reference_protobuf import official, protobufjs_dir
from tests.system_fixtures import GrpcReader, SystemRun, mint_token, system_run
from tests.waiting import wait_until

STREAM_BUFFER = 20


@pytest.fixture(scope="module")
async def run(
    tmp_path_factory: pytest.TempPathFactory, pg_server: PostgresServer
) -> AsyncIterator[SystemRun]:
    async with system_run(
        tmp_path_factory.mktemp("rpc"),
        pg_server.url,
        gateways=1,
        archives=1,
        presences=1,
        rpcs=2,
        extra_env={
            "rpc": {
                "RPC_STREAM_BUFFER": str(STREAM_BUFFER),
                "RPC_RATE_PER_SECOND": "0.01",  # a burst of 40, then refused: no timing
                "RPC_RATE_BURST": "40",
            }
        },
    ) as running:
        yield running


def auth(user: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {mint_token(user)}")]


@pytest.fixture
async def stub(run: SystemRun) -> AsyncIterator[Any]:
    async with grpc.aio.insecure_channel(run.system.grpc_addresses()[0]) as channel:
        yield official().ChatServiceStub(channel)


async def ws_user(url: str, user: str, rooms: list[str]) -> Any:
    ws = await connect(url, open_timeout=5, ping_interval=None)
    await ws.send(json.dumps({"type": "hello", "v": 1, "token": mint_token(user)}))
    await until_frame(ws, "welcome")
    for room in rooms:
        await ws.send(json.dumps({"type": "join", "room": room}))
        await until_frame(ws, "joined")
    return ws


async def until_frame(ws: Any, kind: str, **fields: Any) -> dict[str, Any]:
    while True:
        frame = json.loads(await asyncio.wait_for(ws.recv(), 10))
        if frame["type"] == kind and all(frame.get(k) == v for k, v in fields.items()):
            return frame


async def test_grpc_and_websocket_users_chat_both_ways(run: SystemRun, stub: Any) -> None:
    ref = official()
    ws = await ws_user(run.ws_url(), "webby", ["grpc-room"])
    try:
        sent = await stub.SendMessage(
            ref.ChatMessage(room="grpc-room", content="from grpc", client_id="g-1"),
            metadata=auth("botty"),
        )
        frame = await until_frame(ws, "message", id=sent.id)
        assert (frame["sender"], frame["content"], frame["seq"]) == ("botty", "from grpc", sent.seq)
        stream = stub.StreamMessages(
            ref.StreamRequest(rooms=["grpc-room"], since_seq=sent.seq), metadata=auth("botty")
        )
        await ws.send(json.dumps({"type": "send", "room": "grpc-room", "content": "from ws",
                                  "client_id": "w-1"}))  # fmt: skip
        item = await asyncio.wait_for(stream.read(), 10)
        assert (item.message.sender, item.message.content) == ("webby", "from ws")
        assert item.seq > sent.seq
        stream.cancel()
    finally:
        await ws.close()


async def test_the_same_idempotency_key_twice_is_one_message_on_any_replica(
    run: SystemRun,
) -> None:
    ref = official()
    request = ref.ChatMessage(room="lobby", content="exactly once", client_id="k-twice")
    answers = []
    for address in run.system.grpc_addresses():  # one call on each replica
        async with grpc.aio.insecure_channel(address) as channel:
            answers.append(
                await ref.ChatServiceStub(channel).SendMessage(request, metadata=auth("botty"))
            )
    first, second = answers
    assert (second.id, second.seq, second.ts_ms) == (first.id, first.seq, first.ts_ms)
    assert (first.duplicate, second.duplicate) == (False, True)
    other = ref.ChatMessage(room="lobby", content="something else", client_id="k-twice")
    async with grpc.aio.insecure_channel(run.system.grpc_addresses()[0]) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await ref.ChatServiceStub(channel).SendMessage(other, metadata=auth("botty"))
    assert refused.value.code() == grpc.StatusCode.ALREADY_EXISTS


async def test_stream_resumes_after_a_disconnect_with_exactly_the_missed_messages(
    run: SystemRun, stub: Any
) -> None:
    ref = official()
    send = ref.ChatMessage(room="resume", content="m0", client_id="r-0")
    first = await stub.SendMessage(send, metadata=auth("botty"))
    missed = []
    for i in range(1, 6):  # sent while nobody listens
        reply = await stub.SendMessage(
            ref.ChatMessage(room="resume", content=f"m{i}", client_id=f"r-{i}"),
            metadata=auth("botty"),
        )
        missed.append(reply.seq)
    stream = stub.StreamMessages(
        ref.StreamRequest(rooms=["resume"], since_seq=first.seq), metadata=auth("reader")
    )
    got = [(await asyncio.wait_for(stream.read(), 10)).seq for _ in missed]
    assert got == missed  # replay: exactly the missed ones, in order
    live = await stub.SendMessage(
        ref.ChatMessage(room="resume", content="live", client_id="r-live"), metadata=auth("botty")
    )
    item = await asyncio.wait_for(stream.read(), 10)
    assert (item.seq, item.message.content) == (live.seq, "live")  # then live, no duplicate
    stream.cancel()


async def test_dm_streams_and_history_are_the_participants_only(run: SystemRun, stub: Any) -> None:
    ref = official()
    dm = await stub.SendMessage(
        ref.ChatMessage(dm_peer="carol", content="psst", client_id="dm-1"), metadata=auth("dave")
    )

    async def archived() -> bool:
        page = await stub.GetHistory(ref.HistoryRequest(dm_peer="dave"), metadata=auth("carol"))
        return dm.id in [m.id for m in page.messages]

    await wait_until(archived, "carol reads the dm thread", timeout=15, interval=0.2)
    # The requester is the caller: eve's thread with dave is hers, not carol's...
    page = await stub.GetHistory(ref.HistoryRequest(dm_peer="dave"), metadata=auth("eve"))
    assert dm.id not in [m.id for m in page.messages]
    # ... and naming carol as the requester is refused.
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.GetHistory(
            ref.HistoryRequest(dm_peer="dave", requester="carol"), metadata=auth("eve")
        )
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    eve = stub.StreamMessages(
        ref.StreamRequest(direct_messages=True, since_seq=dm.seq - 1), metadata=auth("eve")
    )
    stream = stub.StreamMessages(
        ref.StreamRequest(direct_messages=True, since_seq=dm.seq - 1), metadata=auth("carol")
    )
    item = await asyncio.wait_for(stream.read(), 10)
    assert (item.seq, item.message.sender) == (dm.seq, "dave")
    stream.cancel()
    # eve's DM stream replays nothing of carol and dave's.
    marker = await stub.SendMessage(
        ref.ChatMessage(dm_peer="eve", content="hi eve", client_id="dm-eve"), metadata=auth("dave")
    )
    first = await asyncio.wait_for(eve.read(), 10)
    assert (first.seq, first.message.content) == (marker.seq, "hi eve")
    eve.cancel()


@pytest.mark.parametrize(
    ("metadata", "request_fields", "code"),
    [
        ([], {"room": "lobby", "content": "x"}, grpc.StatusCode.UNAUTHENTICATED),
        ([("authorization", "Bearer forged")], {"room": "lobby", "content": "x"},
         grpc.StatusCode.UNAUTHENTICATED),
        (None, {"room": "Bad Room", "content": "x"}, grpc.StatusCode.INVALID_ARGUMENT),
        (None, {"room": "lobby", "dm_peer": "bob", "content": "x"},
         grpc.StatusCode.INVALID_ARGUMENT),
        (None, {"room": "lobby", "content": "x" * 5000}, grpc.StatusCode.INVALID_ARGUMENT),
        (None, {"room": "lobby", "content": "   "}, grpc.StatusCode.INVALID_ARGUMENT),
    ],
)  # fmt: skip
async def test_bad_requests_get_their_status_codes_and_store_nothing(
    run: SystemRun, stub: Any, metadata: Any, request_fields: dict[str, Any], code: Any
) -> None:
    js = run.nc.jetstream()
    before = (await js.stream_info("CHAT")).state.last_seq
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.SendMessage(
            official().ChatMessage(**request_fields, client_id="bad"),
            metadata=auth("botty") if metadata is None else metadata,
        )
    assert refused.value.code() == code
    assert (await js.stream_info("CHAT")).state.last_seq == before


async def test_a_flood_is_resource_exhausted_for_that_user_only(run: SystemRun) -> None:
    ref = official()
    async with grpc.aio.insecure_channel(run.system.grpc_addresses()[1]) as channel:
        stub = ref.ChatServiceStub(channel)
        codes = []
        for i in range(45):  # a burst of 40 at 0.01/s
            try:
                await stub.SendMessage(
                    ref.ChatMessage(room="flood", content=f"f{i}", client_id=f"f-{i}"),
                    metadata=auth("flooder"),
                )
                codes.append(grpc.StatusCode.OK)
            except grpc.aio.AioRpcError as exc:
                codes.append(exc.code())
        assert codes[:40] == [grpc.StatusCode.OK] * 40
        assert set(codes[40:]) == {grpc.StatusCode.RESOURCE_EXHAUSTED}
        ok = await stub.SendMessage(
            ref.ChatMessage(room="flood", content="calm", client_id="calm-1"),
            metadata=auth("calm"),
        )
        assert ok.seq > 0


async def test_a_slow_stream_ends_resource_exhausted_with_the_seq_to_resume_from(
    run: SystemRun, stub: Any
) -> None:
    ref = official()
    start = await stub.SendMessage(
        ref.ChatMessage(room="firehose", content="start", client_id="fh-start"),
        metadata=auth("pumper"),
    )
    # A client that reads nothing; without BDP probing its HTTP/2 window stays at 64 KiB,
    # so the server's writes block after a few of these messages.
    slow_channel = grpc.aio.insecure_channel(
        run.system.grpc_addresses()[0], options=[("grpc.http2.bdp_probe", 0)]
    )
    stream = ref.ChatServiceStub(slow_channel).StreamMessages(
        ref.StreamRequest(rooms=["firehose"], since_seq=start.seq), metadata=auth("slowpoke")
    )
    first_live = None
    big = "y" * 4000  # fills gRPC's flow-control window quickly
    js = run.nc.jetstream()
    for i in range(400):  # published without the rate limiter, as another gateway would
        msg = ref.ChatMessage(id=f"01FH{i:022d}", room="firehose", sender="pumper",
                              content=big, ts_ms=1)  # fmt: skip
        ack = await js.publish(
            "chat.room.firehose",
            msg.SerializeToString(),
            headers={"Chat-Type": "chat.v1.ChatMessage", "Nats-Msg-Id": msg.id},
        )
        first_live = first_live or ack.seq
    delivered: list[int] = []

    async def read_all() -> None:
        async for item in stream:
            delivered.append(item.seq)

    with pytest.raises(grpc.aio.AioRpcError) as ended:
        await asyncio.wait_for(read_all(), 30)
    assert ended.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    trailing = dict(ended.value.trailing_metadata() or ())
    assert int(trailing["chat-last-seq"]) == delivered[-1]
    assert delivered == list(range(first_live, first_live + len(delivered)))  # no gap
    # Resuming from there goes on with the next one.
    resumed = stub.StreamMessages(
        ref.StreamRequest(rooms=["firehose"], since_seq=delivered[-1]), metadata=auth("slowpoke")
    )
    assert (await asyncio.wait_for(resumed.read(), 10)).seq == delivered[-1] + 1
    resumed.cancel()
    await slow_channel.close()


async def test_a_node_grpc_js_client_sends_and_streams_through_the_same_proto(
    run: SystemRun,
) -> None:
    folder = protobufjs_dir()
    address = run.system.grpc_addresses()[0]
    done = await asyncio.to_thread(
        subprocess.run,
        ["node", "grpc_client.mjs", address, mint_token("nodejs"), "polyglot", "hello-from-node"],
        cwd=folder, capture_output=True, text=True, timeout=20,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    sent, item = (json.loads(line) for line in done.stdout.splitlines())
    assert sent["sent"]["duplicate"] is False and isinstance(sent["sent"]["seq"], int)
    message = item["item"]["message"]
    assert item["item"]["seq"] == sent["sent"]["seq"]
    assert (message["sender"], message["content"]) == ("nodejs", "hello-from-node")


async def test_health_is_serving_and_reflection_lists_the_service(run: SystemRun) -> None:
    async with grpc.aio.insecure_channel(run.system.grpc_addresses()[0]) as channel:
        check = health_pb2_grpc.HealthStub(channel)
        for service in ("", "chat.v1.ChatService"):
            reply = await check.Check(health_pb2.HealthCheckRequest(service=service))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
        call = reflect.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        )
        reply = await call.read()
        listed = {s.name for s in reply.list_services_response.service}
        assert {"chat.v1.ChatService", "grpc.health.v1.Health"} <= listed
        call.cancel()
        # What grpcurl asks next: the file declaring the service, with its dependencies.
        call = reflect.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(
                file_containing_symbol="chat.v1.ChatService")])
        )  # fmt: skip
        reply = await call.read()
        files = [
            descriptor_pb2.FileDescriptorProto.FromString(raw)
            for raw in reply.file_descriptor_response.file_descriptor_proto
        ]
        by_name = {f.name: f for f in files}
        service = by_name["chat/v1/chat_service.proto"].service[0]
        assert [m.name for m in service.method] == [
            "SendMessage", "StreamMessages", "GetHistory", "ListOnline"
        ]  # fmt: skip
        call.cancel()


# --- failures: an rpc replica killed, NATS restarted, a replica stopped --------------------

RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}


async def send_until_acked(run: SystemRun, i: int) -> int:
    """Send message i, retrying with the same client_id on any live replica."""
    ref = official()
    request = ref.ChatMessage(room="crash", content=f"c{i}", client_id=f"c-{i}")
    for attempt in range(200):
        addresses = run.system.grpc_addresses()
        async with grpc.aio.insecure_channel(addresses[attempt % len(addresses)]) as channel:
            try:
                reply = await ref.ChatServiceStub(channel).SendMessage(
                    request, metadata=auth("writer"), timeout=3
                )
                return int(reply.seq)
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in RETRYABLE:
                    raise
        await asyncio.sleep(0.1)
    raise AssertionError(f"message {i} never acked")


async def test_a_stream_resumes_exactly_across_an_rpc_sigkill_and_a_nats_restart(
    tmp_path: Any, pg_server: PostgresServer
) -> None:
    total = 300
    async with system_run(
        tmp_path,
        pg_server.url,
        gateways=0,
        archives=0,
        presences=0,
        rpcs=2,
        extra_env={"rpc": {"RPC_RATE_PER_SECOND": "10000", "RPC_RATE_BURST": "10000"}},
    ) as crashing:
        # A marker opens the room so the reader's since_seq starts before everything.
        start = await send_until_acked(crashing, -1)
        seen: list[int] = [start]
        reader = GrpcReader(crashing.system.grpc_addresses, ["crash"], "reader", seqs=seen)
        reading = asyncio.create_task(reader.run())
        acked: list[int] = []
        for i in range(total):
            acked.append(await send_until_acked(crashing, i))
            if i == total // 3:
                crashing.system.kill(crashing.system.rpc_at(reader.current))
            if i == 2 * total // 3:
                await asyncio.to_thread(crashing.nats.restart)
        await wait_until(lambda: set(acked) <= set(seen), "the reader has every acked message",
                         timeout=30)  # fmt: skip
        reading.cancel()
        await asyncio.gather(reading, return_exceptions=True)
        assert seen[1:] == sorted(set(acked)), "a gap, a duplicate or a reorder"
        # The stream did end (and resume) at the kill and at the NATS restart.
        assert len(reader.ends) >= 2, reader.ends

        # A replica that is stopped ends its streams UNAVAILABLE with the seq to resume
        # from, finishes, and exits 0.
        address = crashing.system.grpc_addresses()[-1]
        async with grpc.aio.insecure_channel(address) as channel:
            stream = (
                official()
                .ChatServiceStub(channel)
                .StreamMessages(
                    official().StreamRequest(rooms=["crash"], since_seq=acked[-2]),
                    metadata=auth("reader"),
                )
            )
            assert (await asyncio.wait_for(stream.read(), 10)).seq == acked[-1]
            name = crashing.system.names_of("rpc")[-1]
            stopping = asyncio.create_task(
                asyncio.to_thread(crashing.system.procs[name].terminate, 20)
            )
            with pytest.raises(grpc.aio.AioRpcError) as ended:
                await asyncio.wait_for(stream.read(), 10)
            assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
            assert dict(ended.value.trailing_metadata() or ())["chat-last-seq"] == str(acked[-1])
            assert await stopping == 0
