"""`chatctl stats`: the numbers an operator checks first, gathered from JetStream and KV."""

from __future__ import annotations

from typing import Any

import nats.errors
from chatlib import codec, names
from chatlib.proto.chat import v1 as pb
from nats.js.errors import NoKeysError, NotFoundError

from chatctl.client import ChatClient
from chatctl.errors import ChatError, ServiceUnavailable


async def gather(client: ChatClient) -> dict[str, Any]:
    """Streams, the archive consumer, dead letters, presence. A part that is missing (no
    stream yet, presence down) is reported as null, not as an error: stats is what you
    run when something is wrong."""
    js = client.js
    try:
        infos = await js.streams_info()
    except (nats.errors.NoRespondersError, nats.errors.TimeoutError) as exc:
        raise ServiceUnavailable("JetStream does not answer (is it enabled?)") from exc
    streams = [
        {
            "name": info.config.name,
            "subjects": list(info.config.subjects or []),
            "messages": info.state.messages,
            "bytes": info.state.bytes,
            "first_seq": info.state.first_seq,
            "last_seq": info.state.last_seq,
            "consumers": info.state.consumer_count,
        }
        for info in sorted(infos, key=lambda i: i.config.name or "")
    ]
    by_name = {s["name"]: s for s in streams}

    archive: dict[str, Any] | None
    try:
        consumer = await js.consumer_info(names.STREAM_ARCHIVE, names.CONSUMER_ARCHIVE)
        archive = {
            "stream": names.STREAM_ARCHIVE,
            "consumer": names.CONSUMER_ARCHIVE,
            "pending": consumer.num_pending,  # not yet delivered to any archive replica
            "ack_pending": consumer.num_ack_pending,  # delivered, not yet written + acked
            "redelivered": consumer.num_redelivered,  # delivered more than once
            "waiting_pulls": consumer.num_waiting,  # idle archive replicas asking for work
        }
    except NotFoundError:
        archive = None

    dead = by_name.get(names.STREAM_DEAD)
    kv_keys: int | None
    try:
        kv = await js.key_value(names.KV_PRESENCE)
        try:
            kv_keys = len(await kv.keys())
        except NoKeysError:
            kv_keys = 0
    except (NotFoundError, nats.js.errors.BucketNotFoundError):
        kv_keys = None

    return {
        "streams": streams,
        "archive": archive,
        "dead_letters": dead["messages"] if dead else None,
        "presence": {"kv_keys": kv_keys, "online": await _online_count(client)},
    }


async def _online_count(client: ChatClient) -> int | None:
    try:
        data, headers = await client._request(
            names.SERVICE_PRESENCE, names.PRESENCE_WHO, pb.WhoRequest(limit=1)
        )
        return codec.decode_as(pb.WhoPage, data, headers).total
    except (ChatError, codec.DecodeError):
        return None


def _show(value: object) -> str:
    return "-" if value is None else str(value)


def render_table(stats: dict[str, Any]) -> str:
    """A plain table for people; `--json` gives the same data to programs."""
    rows = [("STREAM", "MESSAGES", "BYTES", "FIRST", "LAST", "CONSUMERS")]
    for s in stats["streams"]:
        rows.append(
            (
                s["name"],
                str(s["messages"]),
                str(s["bytes"]),
                str(s["first_seq"]),
                str(s["last_seq"]),
                str(s["consumers"]),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)) for r in rows]
    if len(rows) == 1:
        lines.append("(no streams: no service has provisioned them yet)")
    archive = stats["archive"]
    lines.append("")
    if archive is None:
        lines.append(f"archive consumer {names.STREAM_ARCHIVE}/{names.CONSUMER_ARCHIVE}: missing")
    else:
        lines.append(
            f"archive consumer {archive['stream']}/{archive['consumer']}: "
            f"pending {_show(archive['pending'])}, ack pending {_show(archive['ack_pending'])}, "
            f"redelivered {_show(archive['redelivered'])}, "
            f"waiting pulls {_show(archive['waiting_pulls'])}"
        )
    lines.append(f"dead letters ({names.STREAM_DEAD}): {_show(stats['dead_letters'])}")
    presence = stats["presence"]
    lines.append(
        f"presence: online users {_show(presence['online'])}, "
        f"KV '{names.KV_PRESENCE}' keys {_show(presence['kv_keys'])}"
    )
    return "\n".join(lines)
