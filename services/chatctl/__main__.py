"""chatctl: watch, decode, send and query the chat system over NATS.

Exit codes: 0 ok; 1 runtime error (a service refused or failed the request, an undecodable
payload); 2 usage error (bad arguments, bad room/user/subject/type name); 3 NATS
unreachable (or credentials refused, or connection lost); 4 service unavailable (no
responders, no reply in time, stream missing, history's database down).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import TextIO

from chatctl import commands
from chatctl.client import ChatClient
from chatctl.errors import ChatError, ExitCode

DEFAULT_SERVER = "nats://127.0.0.1:4222"

EPILOG = """exit codes: 0 ok, 1 runtime/service error, 2 usage or bad name,
3 NATS unreachable, 4 service unavailable (no responders, stream missing)"""

Command = Callable[[ChatClient, argparse.Namespace, TextIO], Awaitable[int]]


def _connection_options(parser: argparse.ArgumentParser, suppress: bool) -> None:
    """The same options before or after the subcommand; after it, an option given before
    keeps its value unless repeated (defaults are suppressed there)."""

    def default(value: object) -> object:
        return argparse.SUPPRESS if suppress else value

    group = parser.add_argument_group("connection")
    group.add_argument(
        "-s",
        "--server",
        default=default(os.environ.get("NATS_URL", DEFAULT_SERVER)),
        help=f"NATS URL(s), comma-separated (default: $NATS_URL or {DEFAULT_SERVER})",
    )
    group.add_argument("--user", default=default(os.environ.get("NATS_USER", "")))
    group.add_argument("--password", default=default(os.environ.get("NATS_PASSWORD", "")))
    group.add_argument(
        "--creds",
        default=default(os.environ.get("NATS_CREDS", "")),
        help="a .creds file (JWT auth) instead of user/password",
    )
    group.add_argument(
        "--timeout-connect",
        type=float,
        default=default(2.0),
        help="seconds to wait for NATS before giving up (exit 3)",
    )
    group.add_argument(
        "--request-timeout",
        type=float,
        default=default(5.0),
        help="seconds to wait for a service reply or PubAck (exit 4)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="chatctl",
        description="Watch, decode, send and query the chat system over NATS.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _connection_options(parser, suppress=False)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, help_text: str, description: str) -> argparse.ArgumentParser:
        p = sub.add_parser(
            name,
            help=help_text,
            description=description,
            epilog=EPILOG,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        _connection_options(p, suppress=True)
        return p

    p = add(
        "tail",
        "print messages on subjects as JSON lines",
        "Subscribe to SUBJECT... and print each message as one JSON line: time, subject, "
        "headers, seq (on live.* subjects), type and the protobuf payload decoded "
        "(data); payloads without a Chat-Type header are shown as json/text/base64. "
        "Examples: chatctl tail 'chat.>'; chatctl tail 'live.chat.>'; "
        "chatctl tail 'presence.>'",
    )
    p.add_argument("subjects", nargs="+", metavar="SUBJECT")
    p.add_argument("-n", "--count", type=int, default=0, help="exit after N messages")
    p.add_argument("--timeout", type=float, default=0, help="exit after SECONDS")
    p.set_defaults(run=commands.tail)

    p = add(
        "decode",
        "decode protobuf bytes on stdin to JSON",
        "Read one payload from stdin and print it as JSON. Name the type with --type, or "
        "pass the message's Chat-Type header with --header. Works as a filter: "
        "nats sub 'live.chat.>' --translate 'chatctl decode --type ChatMessage'",
    )
    p.add_argument("-t", "--type", help="chat.v1.ChatMessage, or just ChatMessage")
    p.add_argument("-H", "--header", action="append", help="'Chat-Type: chat.v1.X' (repeatable)")
    p.set_defaults(run=None)

    p = add(
        "send",
        "send a chat message as a service identity",
        "Publish a chat message to the CHAT stream as the gateway does (same headers, "
        "dedup id); prints {id, seq}. Use credentials allowed to publish on chat.>.",
    )
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--room", help="room to post in")
    target.add_argument("--to", help="user to send a direct message to")
    p.add_argument("--as", dest="sender", default="chatctl", help="sender (default chatctl)")
    p.add_argument(
        "--client-id",
        help=(
            "idempotency key: a retry of the same message with it is not stored twice"
            " (prints duplicate: true); reusing it for another message is refused (exit 1)"
        ),
    )
    p.add_argument("content", help="message text, or - to read it from stdin")
    p.set_defaults(run=commands.send)

    p = add(
        "history",
        "print a room's or DM thread's history",
        "Ask the chat-history service for a page of ROOM (or of the DM thread between A "
        "and B, asked as A) and print the messages oldest first as JSON lines.",
    )
    p.add_argument("room", nargs="?", metavar="ROOM")
    p.add_argument("--dm", nargs=2, metavar=("A", "B"), help="the DM thread of A and B")
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("--before", metavar="ID", help="only messages older than this id")
    p.add_argument("--as", dest="sender", default="chatctl", help="requester for a room")
    p.set_defaults(run=commands.history)

    p = add(
        "search",
        "full-text search of history as a user sees it",
        "Search the archive (chat.history.search) as --as USER: the rooms given with --room "
        "and USER's own DM threads, newest first; matches shown between [[ and ]].",
    )
    p.add_argument("query", help='words, "a phrase", -excluded, or')
    p.add_argument("--as", dest="sender", required=True, help="the user searching")
    p.add_argument("--room", action="append", help="a room to search (repeatable)")
    p.add_argument("--limit", type=int, default=20)
    p.add_argument("--before", metavar="ID", help="only messages older than this id")
    p.set_defaults(run=commands.search)

    p = add(
        "who",
        "list users online (or a room's members)",
        "Ask chat-presence who is online, one user a line. With --room R: R's members "
        "(who joined it and has not left), each with online/offline.",
    )
    p.add_argument("--room", metavar="ROOM", help="list this room's members instead")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=commands.who)

    p = add(
        "rooms",
        "list the room directory",
        "Ask chat-userstate for the rooms by name (members, last activity), JSON lines.",
    )
    p.add_argument("--prefix", default="", help="only rooms whose name starts with this")
    p.add_argument("--limit", type=int, default=100, help="rooms per request")
    p.add_argument("--one-page", action="store_true", help="stop after one request")
    p.set_defaults(run=commands.rooms)

    p = add(
        "unread",
        "a user's unread and mention counts",
        "Ask chat-userstate for USER's rooms and DM threads with their unread and mention "
        "counts, one JSON line a thread.",
    )
    p.add_argument("state_user", metavar="USER")
    p.set_defaults(run=commands.unread)

    p = add(
        "stats",
        "streams, archive consumer, dead letters, presence",
        "Stream sizes, the archive work queue (pending, ack pending, redelivered), dead "
        "letters, presence KV keys and online users.",
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=commands.show_stats)
    return parser


async def _run(args: argparse.Namespace) -> int:
    command: Command = args.run
    # A bad name is a usage error (exit 2) whether or not NATS is up.
    commands.check_names(args)
    client = await ChatClient.connect(
        [s.strip() for s in args.server.split(",") if s.strip()],
        user=args.user,
        password=args.password,
        creds=args.creds,
        name="chatctl",
        connect_timeout=args.timeout_connect,
        request_timeout=args.request_timeout,
    )
    try:
        return await command(client, args, sys.stdout)
    finally:
        await client.close()


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        if args.run is None:
            code = commands.decode(args, sys.stdin.buffer.read(), sys.stdout)
        else:
            code = asyncio.run(_run(args))
    except ChatError as exc:
        print(f"chatctl: {exc}", file=sys.stderr)
        code = exc.exit_code
    except KeyboardInterrupt:
        code = ExitCode.OK
    except BrokenPipeError:
        # `chatctl tail ... | head`: the reader went away; that is a normal end.
        code = ExitCode.OK
    sys.exit(int(code))


if __name__ == "__main__":
    main()
