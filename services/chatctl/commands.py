"""One async function per chatctl subcommand. Each prints to `out` and returns an exit code;
errors are raised as chatctl.errors.ChatError and turned into a message by __main__."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
from typing import Any, TextIO

from chatlib import codec, names
from nats.aio.msg import Msg

from chatctl import render, stats
from chatctl.client import ChatClient, check_name
from chatctl.errors import ExitCode, NatsUnreachable, UsageError


def check_subject(subject: str) -> str:
    """A subject the server accepts for a subscription; refuse it here with a clear
    message rather than have the server close the connection."""
    tokens = subject.split(".")
    for i, token in enumerate(tokens):
        bad = (
            not token
            or any(ch.isspace() for ch in token)
            or (token != ">" and ">" in token)
            or (token != "*" and "*" in token)
            or (token == ">" and i != len(tokens) - 1)
        )
        if bad:
            raise UsageError(f"bad subject {subject!r}")
    return subject


def check_names(args: argparse.Namespace) -> None:
    """Every room/user name and subject in the arguments, before connecting."""
    for kind, attr in (
        ("room", "room"),
        ("user", "to"),
        ("user", "sender"),
        ("user", "state_user"),
    ):
        value = getattr(args, attr, None)
        for one in value if isinstance(value, list) else [value]:  # search: --room repeats
            if one is not None:
                check_name(kind, one)
    for user in getattr(args, "dm", None) or []:
        check_name("user", user)
    for subject in getattr(args, "subjects", None) or []:
        check_subject(subject)


async def tail(client: ChatClient, args: argparse.Namespace, out: TextIO) -> int:
    subjects = [check_subject(s) for s in args.subjects]
    done = asyncio.Event()
    printed = 0

    async def show(msg: Msg) -> None:
        nonlocal printed
        if done.is_set():
            return
        line = render.envelope(msg.subject, msg.data, msg.headers, reply=msg.reply)
        out.write(render.dumps(line) + "\n")
        out.flush()
        printed += 1
        if args.count and printed >= args.count:
            done.set()

    async def watch_connection() -> None:
        await client.closed.wait()
        done.set()

    watcher = asyncio.create_task(watch_connection())
    for subject in subjects:
        await client.nc.subscribe(subject, cb=show)
    await client.nc.flush(timeout=max(1, round(client.request_timeout)))
    # Tell a watching person (or test) that the subscription is in place.
    print(f"chatctl: watching {' '.join(subjects)}", file=sys.stderr, flush=True)

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, done.set)
    waiter = asyncio.ensure_future(done.wait())
    try:
        if args.timeout:
            await asyncio.wait_for(asyncio.shield(waiter), args.timeout)
        else:
            await waiter
    except TimeoutError:
        pass
    finally:
        waiter.cancel()
        watcher.cancel()
    if client.closed.is_set():
        raise NatsUnreachable("lost the connection to NATS")
    return ExitCode.OK


def decode(args: argparse.Namespace, stdin: bytes, out: TextIO) -> int:
    headers: dict[str, str] = {}
    for header in args.header or []:
        key, sep, value = header.partition(":")
        if not sep:
            raise UsageError(f"bad header {header!r}: want 'Name: value'")
        headers[key.strip()] = value.strip()
    try:
        if args.type:
            cls = render.resolve_type(args.type)
            message = codec.decode_as(cls, stdin, headers)
        elif names.HEADER_TYPE in headers:
            message = codec.decode(stdin, headers)
        else:
            raise UsageError(
                f"give --type (e.g. chat.v1.ChatMessage) or --header '{names.HEADER_TYPE}: ...'"
            )
    except KeyError as exc:
        raise UsageError(str(exc.args[0])) from exc
    except codec.DecodeError as exc:
        print(f"chatctl: {exc}", file=sys.stderr)
        return ExitCode.RUNTIME
    out.write(render.dumps(render.message_dict(message)) + "\n")
    return ExitCode.OK


async def send(client: ChatClient, args: argparse.Namespace, out: TextIO) -> int:
    content = sys.stdin.read().rstrip("\n") if args.content == "-" else args.content
    sent = await client.send(
        room=args.room, to=args.to, content=content, sender=args.sender, client_id=args.client_id
    )
    result: dict[str, Any] = {"id": sent.id, "seq": sent.seq}
    if sent.duplicate:
        result["duplicate"] = True
    out.write(render.dumps(result) + "\n")
    return ExitCode.OK


async def history(client: ChatClient, args: argparse.Namespace, out: TextIO) -> int:
    if args.dm and args.room:
        raise UsageError("give a ROOM or --dm A B, not both")
    if not args.dm and not args.room:
        raise UsageError("give a ROOM or --dm A B")
    page = await client.history(
        room=args.room,
        dm=(args.dm[0], args.dm[1]) if args.dm else None,
        requester=args.sender,
        before_id=args.before or "",
        limit=args.limit,
    )
    for message in page.messages:
        out.write(render.dumps(render.message_dict(message)) + "\n")
    if page.has_more and page.messages:
        print(
            f"chatctl: older messages exist; next page: --before {page.messages[0].id}",
            file=sys.stderr,
        )
    return ExitCode.OK


async def search(client: ChatClient, args: argparse.Namespace, out: TextIO) -> int:
    page = await client.search(
        args.query,
        requester=args.sender,
        rooms=args.room or [],
        before_id=args.before or "",
        limit=args.limit,
    )
    for hit in page.hits:
        if hit.message is None:
            continue
        line = render.message_dict(hit.message)
        # The snippet's match marks (U+E000/U+E001) as [[...]] on a terminal.
        line["snippet"] = hit.snippet.replace("\ue000", "[[").replace("\ue001", "]]")
        out.write(render.dumps(line) + "\n")
    if page.has_more and page.hits and page.hits[-1].message is not None:
        print(
            f"chatctl: more results; next page: --before {page.hits[-1].message.id}",
            file=sys.stderr,
        )
    return ExitCode.OK


async def who(client: ChatClient, args: argparse.Namespace, out: TextIO) -> int:
    if args.room:
        members = await client.members(args.room)
        if args.json:
            listed = [{"user": u, "online": on} for u, on in members]
            out.write(json.dumps({"room": args.room, "members": listed, "total": len(listed)}))
            out.write("\n")
        else:
            for user, online in members:
                out.write(f"{user}\t{'online' if online else 'offline'}\n")
        return ExitCode.OK
    users = await client.who()
    if args.json:
        out.write(json.dumps({"users": users, "total": len(users)}) + "\n")
    else:
        for user in users:
            out.write(user + "\n")
    return ExitCode.OK


async def show_stats(client: ChatClient, args: argparse.Namespace, out: TextIO) -> int:
    data: dict[str, Any] = await stats.gather(client)
    out.write((json.dumps(data) if args.json else stats.render_table(data)) + "\n")
    return ExitCode.OK


async def rooms(client: ChatClient, args: argparse.Namespace, out: TextIO) -> int:
    """The room directory, every page (or one with --limit), one JSON line a room."""
    if args.prefix and not all(c in "abcdefghijklmnopqrstuvwxyz0123456789_-" for c in args.prefix):
        raise UsageError(f"bad prefix {args.prefix!r}: room names are [a-z0-9_-]")
    after = ""
    while True:
        page = await client.rooms(prefix=args.prefix, after=after, limit=args.limit)
        for room in page.rooms:
            out.write(
                json.dumps({"name": room.name, "members": room.members, "last_ts": room.last_ts_ms})
                + "\n"
            )
            after = room.name
        if not page.has_more or args.one_page or not page.rooms:
            return ExitCode.OK


async def unread(client: ChatClient, args: argparse.Namespace, out: TextIO) -> int:
    """A user's threads with unread and mention counts, one JSON line a thread."""
    state = await client.user_state(args.state_user)
    for t in state.threads:
        thread = {"room": t.room} if t.room else {"with": t.dm_peer}
        line = {**thread, "unread": t.unread, "mentions": t.mentions, "read_seq": t.read_seq}
        out.write(json.dumps(line) + "\n")
    print(
        f"chatctl: counts cover CHAT seq <= {state.archived_through} (the archive's "
        'watermark; at 100 read "99+")',
        file=sys.stderr,
    )
    return ExitCode.OK
