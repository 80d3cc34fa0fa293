-- User state (issue #13): memberships, read markers, mentions, DM thread list, and the
-- watermark that makes unread counts exact while the archive lags.

-- One row per (user, room) ever joined; `member` says whether the user is in it now.
-- event_seq is the USERSTATE stream sequence of the event that wrote the row: an event is
-- applied only if its sequence is higher, so a redelivered or reordered event (two
-- replicas applying neighbouring events) never undoes a newer one, and applying an
-- event twice changes nothing.
CREATE TABLE memberships (
    "user"       text NOT NULL,
    room         text COLLATE "C" NOT NULL,
    member       boolean NOT NULL,
    joined_at_ms bigint NOT NULL,
    event_seq    bigint NOT NULL,
    event_id     text NOT NULL,
    PRIMARY KEY ("user", room)
);
CREATE INDEX memberships_room ON memberships (room) WHERE member;

-- Read markers: thread is 'r:<room>' or 'd:<peer>'; seq is a CHAT stream sequence and
-- only ever grows (GREATEST on conflict), so a stale or replayed event changes nothing.
CREATE TABLE read_markers (
    "user"     text NOT NULL,
    thread     text NOT NULL,
    seq        bigint NOT NULL,
    event_id   text NOT NULL,
    updated_ms bigint NOT NULL,
    PRIMARY KEY ("user", thread)
);

-- Rooms someone ever joined (the room directory).
CREATE TABLE rooms (
    name          text COLLATE "C" PRIMARY KEY,
    created_at_ms bigint NOT NULL
);

-- A user's DM threads, newest activity first (maintained with each stored DM).
CREATE TABLE dm_threads (
    "user"     text NOT NULL,
    peer       text NOT NULL,
    last_seq   bigint NOT NULL,
    last_ts_ms bigint NOT NULL,
    PRIMARY KEY ("user", peer)
);
CREATE INDEX dm_threads_recent ON dm_threads ("user", last_seq DESC);

-- Room messages that name a member with @user, written with the message.
CREATE TABLE mentions (
    "user"     text NOT NULL,
    message_id text COLLATE "C" NOT NULL,
    room       text NOT NULL,
    stream_seq bigint NOT NULL,
    PRIMARY KEY ("user", message_id)
);
CREATE INDEX mentions_thread ON mentions ("user", room, stream_seq);

-- Unread counts count by CHAT sequence.
CREATE INDEX messages_room_seq ON messages (room, stream_seq) WHERE room IS NOT NULL;
CREATE INDEX messages_dm_seq ON messages (dm_lo, dm_hi, stream_seq) WHERE dm_lo IS NOT NULL;
CREATE INDEX messages_seq ON messages (stream_seq) WHERE stream_seq IS NOT NULL;

-- CHAT sequences the archive will never store (their task was dead-lettered).
CREATE TABLE skipped_seqs (stream_seq bigint PRIMARY KEY);

-- Every CHAT sequence <= seq is stored (or skipped): counts up to it come from Postgres,
-- the rest from the CHAT stream. Replicas only ever raise it.
CREATE TABLE archive_watermark (
    id  integer PRIMARY KEY CHECK (id = 1),
    seq bigint NOT NULL
);
INSERT INTO archive_watermark VALUES (1, 0);
