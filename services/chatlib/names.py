"""Every NATS name the system uses: subjects, streams, consumers, buckets, services.

One module owns them so that services, deploy permissions and operators' docs agree.
User and room names are validated elsewhere (see `validate`) to [a-z0-9_-], so they
are always a single subject token.
"""

from __future__ import annotations

# --- Chat messages -------------------------------------------------------------------
# Room messages: chat.room.<room>. DMs: chat.dm.<a>.<b> with a < b, so one subject
# (and one stream sequence) serves both participants, and a user's DMs are the two
# cheap wildcards chat.dm.<user>.* and chat.dm.*.<user>.
CHAT_PREFIX = "chat"
CHAT_ALL = "chat.>"
ROOM_ALL = "chat.room.*"
DM_ALL = "chat.dm.*.*"

# The ordered log of every chat message; reconnect recovery replays from it.
STREAM_CHAT = "CHAT"
STREAM_CHAT_SUBJECTS = [ROOM_ALL, DM_ALL]

# Live fan-out: the CHAT stream republishes each message, once stored, to
# live.<original subject> with headers Nats-Sequence (its stream sequence) and
# Nats-Last-Sequence (the previous sequence on the same subject, to detect gaps).
# Gateways subscribe (core NATS) only to the live subjects their users need, so no one
# ever sees a message that is not durable, and every message carries its sequence.
LIVE_PREFIX = "live"
LIVE_ALL = "live.chat.>"
HEADER_SEQUENCE = "Nats-Sequence"
HEADER_LAST_SEQUENCE = "Nats-Last-Sequence"

# The archive work queue: sources every CHAT message (server side, so nothing acked
# can miss it) and also accepts tasks published directly on ARCHIVE_TASKS.
STREAM_ARCHIVE = "ARCHIVE"
ARCHIVE_TASKS = "archive.tasks"
CONSUMER_ARCHIVE = "archive-writer"

# Where the archive parks what it cannot write, with the reason in a header.
STREAM_DEAD = "DEADLETTER"
DEAD_LETTER_ALL = "deadletter.>"
DEAD_LETTER_ARCHIVE = "deadletter.archive"

# --- Ephemeral events ----------------------------------------------------------------
TYPING_ALL = "typing.>"

# --- Presence ------------------------------------------------------------------------
PRESENCE_CONN_OPENED = "presence.conn.opened"
PRESENCE_CONN_CLOSED = "presence.conn.closed"
PRESENCE_HEARTBEAT = "presence.heartbeat"  # .<gateway_id>
PRESENCE_HEARTBEAT_ALL = "presence.heartbeat.*"
PRESENCE_EVENT_ONLINE = "presence.event.online"  # .<user>
PRESENCE_EVENT_OFFLINE = "presence.event.offline"  # .<user>
PRESENCE_EVENTS_ALL = "presence.event.>"
# Presence events go through a stream so that a replica that dies after a state change
# but before publishing can be retried by another without a duplicate (dedup on id).
STREAM_PRESENCE = "PRESENCE"
KV_PRESENCE = "presence"
# Room membership (who joined which room and has not left), for scoped presence and member
# lists: key <room>.<user>, written by gateways, mirrored by every gateway (gateway/roster.py).
KV_MEMBERS = "members"

# --- Guest names -----------------------------------------------------------------------
# Guest name reservations: key <name>, value the holder id (the guest token's jti).
# Gateways write and refresh them; an entry unrefreshed for the bucket's max age lapses.
KV_GUEST_NAMES = "guest-names"

# --- Micro services (request/reply) --------------------------------------------------
SERVICE_HISTORY = "chat-history"
HISTORY_SUBJECT = "chat.history"
HISTORY_ROOM = "chat.history.room"
HISTORY_DM = "chat.history.dm"
# Issue 14: who wrote a message (the gateway's authorship check), and full-text search.
HISTORY_MESSAGE = "chat.history.message"
HISTORY_SEARCH = "chat.history.search"
SERVICE_PRESENCE = "chat-presence"
PRESENCE_WHO = "chat.presence.who"

# Queue groups: replicas of one service share work through these.
QUEUE_PRESENCE = "presence"
QUEUE_HISTORY = "history"

# --- Headers -------------------------------------------------------------------------
HEADER_TYPE = "Chat-Type"  # full protobuf name of the payload, e.g. chat.v1.ChatMessage
HEADER_MSG_ID = "Nats-Msg-Id"  # JetStream deduplication
# What a client_id (idempotency key) was first used for: a hash of the request (see
# chatlib.idempotency), stored with the message so that any gateway can tell a retry
# from a different request reusing the key.
HEADER_REQUEST_HASH = "Chat-Request-Hash"
HEADER_DEAD_REASON = "Chat-Dead-Reason"


def room_subject(room: str) -> str:
    return f"chat.room.{room}"


def live_subject(subject: str) -> str:
    return f"{LIVE_PREFIX}.{subject}"


def dedup_id(sender: str, client_id: str, message_id: str) -> str:
    """Nats-Msg-Id for a send: a client's retry (same client_id) must dedupe even when it
    lands on another gateway, which would mint a new message id."""
    return f"{sender}:{client_id}" if client_id else message_id


def dm_pair(a: str, b: str) -> tuple[str, str]:
    return (a, b) if a <= b else (b, a)


def dm_subject(a: str, b: str) -> str:
    lo, hi = dm_pair(a, b)
    return f"chat.dm.{lo}.{hi}"


def dm_subjects_of(user: str) -> list[str]:
    """The two wildcards that cover every DM a user takes part in."""
    return [f"chat.dm.{user}.*", f"chat.dm.*.{user}"]


def typing_room_subject(room: str) -> str:
    return f"typing.room.{room}"


def typing_dm_subject(a: str, b: str) -> str:
    lo, hi = dm_pair(a, b)
    return f"typing.dm.{lo}.{hi}"


def heartbeat_subject(gateway_id: str) -> str:
    return f"{PRESENCE_HEARTBEAT}.{gateway_id}"


def member_key(room: str, user: str) -> str:
    return f"{room}.{user}"


def kv_subject(bucket: str, key: str) -> str:
    """The subject a KV bucket's key is stored under (what nats-py's KeyValue.put
    publishes to): for writing a key through a plain JetStream publish."""
    return f"$KV.{bucket}.{key}"


def online_subject(user: str) -> str:
    return f"{PRESENCE_EVENT_ONLINE}.{user}"


def offline_subject(user: str) -> str:
    return f"{PRESENCE_EVENT_OFFLINE}.{user}"


def parse_chat_subject(subject: str) -> tuple[str, str] | None:
    """('room', name) or ('dm', 'a.b') for a chat subject; None for anything else."""
    parts = subject.split(".")
    if len(parts) == 3 and parts[0] == CHAT_PREFIX and parts[1] == "room":
        return ("room", parts[2])
    if len(parts) == 4 and parts[0] == CHAT_PREFIX and parts[1] == "dm":
        return ("dm", f"{parts[2]}.{parts[3]}")
    return None


def typing_dm_subjects_of(user: str) -> list[str]:
    """The two wildcards that cover every DM typing indicator a user takes part in."""
    return [f"typing.dm.{user}.*", f"typing.dm.*.{user}"]


# --- Added by the archive ------------------------------------------------------------
# The subject a dead-lettered task was originally on (the reason is HEADER_DEAD_REASON).
HEADER_DEAD_SUBJECT = "Chat-Dead-Subject"
# JetStream's advisory when a task was delivered max_deliver times and never acked (a
# replica crash loop): the archive parks such tasks on the dead letters instead of
# leaving them stuck in the work queue.
ADVISORY_ARCHIVE_MAX_DELIVERIES = (
    f"$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{STREAM_ARCHIVE}.{CONSUMER_ARCHIVE}"
)
QUEUE_ARCHIVE = "archive"
# Every DM typing indicator (a gateway's one DM typing subscription).
TYPING_DM_ALL = "typing.dm.*.*"

# --- User state (issue #13) ----------------------------------------------------------
# Events about one user: user.<user>.membership (join/leave), user.<user>.read (read
# markers), user.<user>.mention (someone named them with @user in a room). Stream
# USERSTATE keeps them (deduplicated on Nats-Msg-Id = the event id); the archive applies
# membership and read events to Postgres through one durable consumer shared by its
# replicas; mention events are for other services to consume (push notifications).
USER_PREFIX = "user"
USER_ALL = "user.*.*"
USER_MEMBERSHIP_ALL = "user.*.membership"
USER_READ_ALL = "user.*.read"
USER_MENTION_ALL = "user.*.mention"
STREAM_USERSTATE = "USERSTATE"
STREAM_USERSTATE_SUBJECTS = [USER_ALL]
CONSUMER_USERSTATE = "userstate-writer"
# Live fan-out to a user's other sessions: USERSTATE republishes each stored event to
# live.user.<user>.<kind> (like CHAT's live.chat.>); every gateway subscribes once.
LIVE_USER_ALL = "live.user.>"
# Queries to the archive's user-state service (request/reply, nats micro).
SERVICE_USERSTATE = "chat-userstate"
USERSTATE_SUBJECT = "chat.userstate"
USERSTATE_STATE = "chat.userstate.state"
USERSTATE_ROOMS = "chat.userstate.rooms"
USERSTATE_THREADS = "chat.userstate.threads"
QUEUE_USERSTATE = "userstate"
# Where the archive parks user-state events it cannot apply (bad bytes, forged user).
DEAD_LETTER_USERSTATE = "deadletter.userstate"


def membership_subject(user: str) -> str:
    return f"{USER_PREFIX}.{user}.membership"


def read_subject(user: str) -> str:
    return f"{USER_PREFIX}.{user}.read"


def mention_subject(user: str) -> str:
    return f"{USER_PREFIX}.{user}.mention"


def parse_user_subject(subject: str) -> tuple[str, str] | None:
    """(user, kind) for user.<user>.<kind> (with or without the live. prefix)."""
    parts = subject.removeprefix(LIVE_PREFIX + ".").split(".")
    if len(parts) == 3 and parts[0] == USER_PREFIX:
        return (parts[1], parts[2])
    return None
