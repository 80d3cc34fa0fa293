"""The bare baseline: a minimal uvicorn WebSocket broadcast loop, no NATS, no auth.

Same server stack as the gateway (uvicorn, the websockets-sansio protocol, a raw ASGI
app), speaking just enough of the chat protocol for the same load generator: `hello` gets
a `welcome`, `send` is broadcast as a `message` frame to every socket in the room
(rendered once) and
acked to its sender. It is the ceiling of this stack on this machine.

Run: python -m devtools.bench.baseline PORT
"""

from __future__ import annotations

import sys
import time
from typing import Any

import orjson
import uvicorn

Send = Any
Receive = Any


class Broadcast:
    def __init__(self) -> None:
        self.rooms: dict[str, set[Any]] = {}
        self.seq = 0

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await _http_ok(send)
            return
        if scope["type"] != "websocket":
            return
        event = await receive()
        if event["type"] != "websocket.connect":
            return
        await send({"type": "websocket.accept"})
        try:
            while True:
                event = await receive()
                if event["type"] != "websocket.receive":
                    break
                await self.on_frame(event.get("text") or event.get("bytes") or b"{}", send)
        finally:
            for members in self.rooms.values():
                members.discard(send)

    async def on_frame(self, raw: str | bytes, send: Send) -> None:
        frame = orjson.loads(raw)
        kind = frame.get("type")
        if kind == "hello":
            for room in ["lobby", *frame.get("rooms", [])]:
                self.rooms.setdefault(room, set()).add(send)
            welcome = {"type": "welcome", "v": 1, "user": "x", "rooms": ["lobby"], "seq": self.seq}
            await send({"type": "websocket.send", "text": orjson.dumps(welcome).decode()})
        elif kind == "send":
            self.seq += 1
            now = int(time.time() * 1000)
            message = {
                "type": "message",
                "id": str(self.seq),
                "seq": self.seq,
                "room": frame.get("room", "lobby"),
                "sender": "x",
                "content": frame.get("content", ""),
                "ts": now,
            }
            text = orjson.dumps(message).decode()
            members = self.rooms.get(message["room"], set())
            for target in list(members):
                try:
                    await target({"type": "websocket.send", "text": text})
                except Exception:  # a socket that went away meanwhile
                    members.discard(target)
            ack = {"type": "ack", "client_id": frame.get("client_id", ""), "seq": self.seq}
            await send({"type": "websocket.send", "text": orjson.dumps(ack).decode()})
        elif kind == "ping":
            await send({"type": "websocket.send", "text": '{"type":"pong"}'})


async def _http_ok(send: Send) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


def main() -> None:
    port = int(sys.argv[1])
    uvicorn.run(
        Broadcast(),
        host="127.0.0.1",
        port=port,
        ws="websockets-sansio",
        lifespan="off",
        access_log=False,
        log_level="warning",
    )


if __name__ == "__main__":
    main()
