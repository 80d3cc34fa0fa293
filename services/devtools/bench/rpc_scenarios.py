"""The gRPC door (services/rpc): unary SendMessage acked/s, and StreamMessages delivered
msgs/s, from grpc.aio clients in this process (generic calls on the betterproto2
classes, so no generated stubs are needed). The WebSocket figures of the same `make
bench` run (durable, fanout) are the ones to read them against."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import grpc
from chatlib import codec, ids, names
from chatlib.proto.chat import v1 as pb

from devtools.bench.cluster import Cluster, cpu_of, mint_token
from devtools.bench.report import Figure, Run
from devtools.bench.ws_scenarios import Ctx

SEND = "/chat.v1.ChatService/SendMessage"
STREAM = "/chat.v1.ChatService/StreamMessages"


def rpc(ctx: Ctx) -> Run:
    callers = ctx.scaled(100, 20)
    seconds = float(ctx.scaled(10, 3))
    streams = ctx.scaled(20, 5)
    messages = ctx.scaled(5000, 1000)
    with Cluster(ctx.workdir / "rpc") as c:
        _, proc, address = c.rpc()
        before = cpu_of([proc])
        t0 = time.monotonic()
        sent = asyncio.run(_send_load(address, callers, seconds))
        send_cpu = (cpu_of([proc])[proc.name] - before[proc.name]) / (time.monotonic() - t0)
        streamed = asyncio.run(_stream_load(address, c.start_nats(), streams, messages))
    figs = [
        Figure(
            f"gRPC SendMessage: acked msgs/s ({callers} callers, 1 rpc replica)",
            sent["acks_per_s"],
            "msg/s",
        ),
        Figure(
            f"gRPC StreamMessages: delivered msgs/s ({streams} streams, 1 room)",
            streamed["delivered_per_s"],
            "msg/s",
        ),
    ]
    details: dict[str, Any] = {
        "send": sent,
        "stream": streamed,
        "rpc_cpu_during_send": round(send_cpu, 3),
    }
    return Run("rpc", figs, details)


def _metadata(user: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {mint_token(user)}"),)


async def _send_load(address: str, callers: int, seconds: float) -> dict[str, Any]:
    acked = errors = 0
    deadline = time.monotonic() + seconds
    async with grpc.aio.insecure_channel(address) as channel:
        send = channel.unary_unary(
            SEND, request_serializer=bytes, response_deserializer=pb.SendResponse.FromString
        )

        async def caller(n: int) -> None:
            nonlocal acked, errors
            metadata = _metadata(f"caller-{n}")
            i = 0
            while time.monotonic() < deadline:
                request = pb.ChatMessage(room="bench-rpc", content=f"m{i}", client_id=f"{n}-{i}")
                try:
                    await send(request, metadata=metadata, timeout=10)
                    acked += 1
                except grpc.aio.AioRpcError:
                    errors += 1
                i += 1

        started = time.monotonic()
        await asyncio.gather(*(caller(n) for n in range(callers)))
        elapsed = time.monotonic() - started
    return {"acked": acked, "errors": errors, "acks_per_s": round(acked / elapsed, 1)}


async def _stream_load(address: str, nats_url: str, streams: int, messages: int) -> dict[str, Any]:
    """`streams` live streams on one room; `messages` published to it through JetStream
    as fast as it takes them; delivered msgs/s from the first publish to the last
    delivery."""
    import nats

    room = "bench-stream"
    got = [0] * streams
    all_in = asyncio.Event()
    async with grpc.aio.insecure_channel(address) as channel:
        stream = channel.unary_stream(
            STREAM, request_serializer=bytes, response_deserializer=pb.StreamItem.FromString
        )
        calls = [
            stream(pb.StreamRequest(rooms=[room]), metadata=_metadata(f"reader-{n}"))
            for n in range(streams)
        ]

        async def read(n: int) -> None:
            async for _ in calls[n]:
                got[n] += 1
                if got[n] == messages and all(g >= messages for g in got):
                    all_in.set()

        readers = [asyncio.create_task(read(n)) for n in range(streams)]
        await asyncio.sleep(1.0)  # the streams subscribe (their replay is empty)
        nc = await nats.connect(nats_url)
        js = nc.jetstream()
        started = time.monotonic()
        for start in range(0, messages, 500):
            batch = []
            for i in range(start, min(start + 500, messages)):
                now = int(time.time() * 1000)
                message = pb.ChatMessage(
                    id=ids.new_id(), room=room, sender="pub", content=f"s{i}", ts_ms=now
                )
                data, headers = codec.encode(message)
                headers[names.HEADER_MSG_ID] = message.id
                batch.append(js.publish(names.room_subject(room), data, headers=headers))
            await asyncio.gather(*batch)
        try:
            await asyncio.wait_for(all_in.wait(), 120)
        except TimeoutError:
            pass
        elapsed = time.monotonic() - started
        for call in calls:
            call.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
        await nc.close()
    delivered = sum(got)
    return {
        "streams": streams,
        "messages": messages,
        "delivered": delivered,
        "expected": streams * messages,
        "delivered_per_s": round(delivered / elapsed, 1),
    }
