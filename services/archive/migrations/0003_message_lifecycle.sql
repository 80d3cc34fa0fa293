-- Message lifecycle (issue 14): edits, deletes, reactions, replies, full-text search.
--
-- The archive applies lifecycle events by their CHAT stream sequence, never by arrival
-- order (replicas share the work queue and redeliveries reorder it): an edit applies only
-- when its sequence is above the message's version_seq, a delete always wins, and each
-- (message, user, emoji) keeps the reaction state of its highest sequence. Every event is
-- recorded once (its id is the key), so a redelivery or a duplicate changes nothing.
ALTER TABLE messages
    ADD COLUMN reply_to      text COLLATE "C" NULL,
    ADD COLUMN edited_at_ms  bigint NULL,             -- server time of the applied edit
    ADD COLUMN version_seq   bigint NOT NULL DEFAULT 0,  -- CHAT seq of the applied edit
    ADD COLUMN deleted       boolean NOT NULL DEFAULT false,  -- a tombstone: content ''
    ADD COLUMN has_reactions boolean NOT NULL DEFAULT false,  -- history reads reactions
    -- Full-text search ('simple': no language's stemming, works for every language the
    -- same way). Generated, so it always matches the current (edited, deleted) content.
    ADD COLUMN search        tsvector GENERATED ALWAYS AS (to_tsvector('simple', content)) STORED;

CREATE INDEX messages_search ON messages USING gin (search);
-- Reply threads: a message and the ones replying to it.
CREATE INDEX messages_reply_to ON messages (reply_to) WHERE reply_to IS NOT NULL;

-- Every edit, delete and reaction the archive received. applied = false: waiting for its
-- message (events can arrive first); refused: not applied, and why (a forged event).
CREATE TABLE message_events (
    id          text COLLATE "C" PRIMARY KEY,
    message_id  text COLLATE "C" NOT NULL,
    kind        text NOT NULL CHECK (kind IN ('edit', 'delete', 'react')),
    room        text NULL,
    dm_lo       text NULL,
    dm_hi       text NULL,
    actor       text NOT NULL,
    operator    boolean NOT NULL DEFAULT false,
    content     text NULL,          -- an edit's text; erased when the message is deleted
    emoji       text NULL,
    removed     boolean NOT NULL DEFAULT false,
    ts_ms       bigint NOT NULL,
    stream_seq  bigint NOT NULL,
    applied     boolean NOT NULL DEFAULT false,
    refused     text NULL
);
CREATE INDEX message_events_message ON message_events (message_id);
CREATE INDEX message_events_pending ON message_events (message_id) WHERE NOT applied;

CREATE TABLE reactions (
    message_id  text COLLATE "C" NOT NULL,
    user_name   text NOT NULL,
    emoji       text NOT NULL,
    present     boolean NOT NULL,
    stream_seq  bigint NOT NULL,
    PRIMARY KEY (message_id, user_name, emoji)
);
