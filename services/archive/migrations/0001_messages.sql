-- One row per chat message; the message id is the primary key, so writing a task twice
-- (a redelivery, a duplicate publish) can never make a second row.
CREATE TABLE messages (
    -- 26-char time-sortable id (chatlib.ids). COLLATE "C": byte order is time order,
    -- whatever the database's default collation.
    id         text COLLATE "C" PRIMARY KEY,
    room       text NULL,             -- set for room messages
    dm_lo      text NULL,             -- set for DMs: the two participants, sorted
    dm_hi      text NULL,
    sender     text NOT NULL,
    content    text NOT NULL,
    ts_ms      bigint NOT NULL,       -- server timestamp (ms since the epoch)
    stream_seq bigint NULL,           -- sequence in the CHAT stream, when sourced from it
    CHECK ((room IS NULL) <> (dm_lo IS NULL AND dm_hi IS NULL))
);

-- History pages are "WHERE room = $1 AND id < $2 ORDER BY id DESC LIMIT n": ids are unique
-- and sort by time, so paging by id is exact even when timestamps are equal.
CREATE INDEX messages_room_id ON messages (room, id) WHERE room IS NOT NULL;
CREATE INDEX messages_dm_id ON messages (dm_lo, dm_hi, id) WHERE dm_lo IS NOT NULL;
