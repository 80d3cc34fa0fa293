"""Turn what flows over NATS into JSON people can read: one object per message."""

from __future__ import annotations

import base64
import datetime as dt
import json
from typing import Any

import betterproto2
from chatlib import codec, names


def message_dict(message: betterproto2.Message) -> dict[str, Any]:
    """Field names as in the .proto files (snake_case), int64 as numbers, defaults left out."""
    return message.to_dict(
        output_format=betterproto2.OutputFormat.PYTHON, casing=betterproto2.Casing.SNAKE
    )


def resolve_type(name: str) -> type[betterproto2.Message]:
    """A chat.v1 type by full name (chat.v1.ChatMessage) or short name (ChatMessage)."""
    cls = codec.TYPES.get(name) or codec.TYPES.get(f"chat.v1.{name}")
    if cls is None:
        known = ", ".join(sorted(codec.TYPES))
        raise KeyError(f"unknown type {name!r}; known types: {known}")
    return cls


def _undecoded(data: bytes) -> dict[str, Any]:
    """A payload without a Chat-Type header (JetStream API, micro service PING): show it as
    JSON or text when it is that, base64 otherwise."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return {"data_base64": base64.b64encode(data).decode("ascii")}
    try:
        return {"json": json.loads(text)} if text.strip() else {"text": text}
    except ValueError:
        return {"text": text}


def envelope(
    subject: str,
    data: bytes,
    headers: dict[str, str] | None,
    received: dt.datetime | None = None,
    reply: str = "",
) -> dict[str, Any]:
    """What `chatctl tail` prints for one NATS message."""
    when = received or dt.datetime.now(dt.UTC)
    out: dict[str, Any] = {
        "time": when.isoformat(timespec="milliseconds"),
        "subject": subject,
        "headers": dict(headers or {}),
    }
    if reply:
        out["reply"] = reply
    seq = (headers or {}).get(names.HEADER_SEQUENCE)
    if seq and seq.isdigit():
        out["seq"] = int(seq)
    declared = (headers or {}).get(names.HEADER_TYPE)
    if declared is None:
        out.update(_undecoded(data))
        return out
    out["type"] = declared
    try:
        out["data"] = message_dict(codec.decode(data, headers))
    except codec.DecodeError as exc:
        out["error"] = str(exc)
        out["data_base64"] = base64.b64encode(data).decode("ascii")
    return out


def dumps(obj: dict[str, Any]) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
