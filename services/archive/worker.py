"""The pull loop: fetch a batch from the shared durable consumer, write it in one
transaction, ack after the commit. Modelled on FastStream's stream_pull_subscriber.

Exactly once = at-least-once delivery (ack only after commit, so a crash means
redelivery) + an idempotent write (ON CONFLICT on the message id, so a redelivery or a
duplicate publish adds nothing).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable

import asyncpg
import nats.errors
import nats.js.errors
from chatlib import names
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from archive import lifecycle, metrics, userstate
from archive.handlers import (
    DB_UNAVAILABLE,
    PoisonTask,
    Row,
    chat_sequence,
    one_line,
    task_row,
)
from archive.lifecycle import EventRow
from archive.pull import BatchPuller
from archive.settings import ArchiveSettings

log = logging.getLogger(__name__)


def backoff(attempt: int, base: float = 0.1, cap: float = 5.0) -> float:
    """Full jitter: replicas that failed together do not all retry together."""
    return random.uniform(0, min(cap, base * 2**attempt))


def times_delivered(msg: Msg) -> int:
    """msg.metadata.num_delivered, without building the whole Metadata (a dataclass, a
    datetime and six ints per message: a tenth of a replica's time in a drain). Reads the
    plain `$JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.<consumer seq>.<ns>.<pending>`
    reply; any other form goes to nats-py (tests/test_archive_handlers.py pins both)."""
    tokens = (msg.reply or "").split(".")
    if len(tokens) == 9 and tokens[0] == "$JS" and tokens[1] == "ACK" and tokens[4].isdigit():
        return int(tokens[4])
    return msg.metadata.num_delivered


class ArchiveWorker:
    def __init__(
        self,
        nc: NATS,
        js: JetStreamContext,
        puller: BatchPuller,
        pool: asyncpg.Pool,
        settings: ArchiveSettings,
        on_db_state: Callable[[bool], None],
        on_mentions: Callable[[list[tuple[str, Row]]], Awaitable[None]] | None = None,
    ) -> None:
        self.nc, self.js, self.puller, self.pool = nc, js, puller, pool
        self.settings = settings
        self.on_db_state = on_db_state
        # Called after a commit with the mentions of members the batch holds.
        self.on_mentions = on_mentions
        self.stopping = False

    def stop(self) -> None:
        """Fetch no more; the batch in hand is still written and acked."""
        self.stopping = True

    async def run(self) -> None:
        """Fetch and decode batch N+1 while batch N commits: one write in flight per
        replica, so Postgres is never idle waiting for NATS, nor NATS for Postgres."""
        writing: asyncio.Task[None] | None = None
        try:
            while not self.stopping:
                msgs = await self.fetch()
                if not msgs:
                    continue
                batch = await self.decode_batch(msgs)
                if writing is not None:
                    await self.wait_holding(writing, [msg for msg, _ in batch])
                writing = asyncio.create_task(self.write_batch(batch), name="archive-write")
        finally:
            # A stop (or a cancel) still commits and acks the batch in hand.
            if writing is not None:
                await asyncio.shield(writing)

    async def fetch(self) -> list[Msg]:
        try:
            return await self.puller.fetch(self.settings.batch_size, self.settings.fetch_timeout)
        except (nats.errors.ConnectionClosedError, nats.errors.ConnectionReconnectingError):
            await asyncio.sleep(0.2)
        except Exception:
            log.exception("fetch failed")
            await asyncio.sleep(0.5)
        return []

    async def wait_holding(self, writing: asyncio.Task[None], held: list[Msg]) -> None:
        """Wait for the write in flight; meanwhile keep the batch held here from being
        redelivered (a long outage must not use up its deliveries)."""
        while True:
            done, _ = await asyncio.wait({writing}, timeout=self.settings.ack_wait / 3)
            if done:
                writing.result()
                return
            await self.keep_alive(held)

    async def decode_batch(self, msgs: list[Msg]) -> list[tuple[Msg, Row | EventRow]]:
        """The rows of a batch; poison tasks are dead-lettered here."""
        metrics.BATCH_SIZE.observe(len(msgs))
        good: list[tuple[Msg, Row | EventRow]] = []
        for msg in msgs:
            if times_delivered(msg) > 1:
                metrics.REDELIVERIES.inc()
            try:
                if lifecycle.is_lifecycle(msg.headers):  # an edit, delete or reaction
                    good.append((msg, lifecycle.event_row(msg.data, msg.headers)))
                    continue
                good.append((msg, task_row(msg.subject, msg.data, msg.headers)))
            except PoisonTask as exc:
                # Undecodable or invalid: no retry can fix it. Park it and move on.
                await self.dead_letter(msg, str(exc), "poison")
        return good

    async def write_batch(self, batch: list[tuple[Msg, Row | EventRow]]) -> None:
        try:
            if batch:
                await self.commit(batch)
        except lifecycle.PurgeIncomplete as exc:
            # Written, but deleted text is still in CHAT: not acked, so the redelivery
            # (after ack_wait) removes it then; replay leaves it out meanwhile.
            log.warning("%s; the batch will be redelivered to finish", exc)
        except Exception:
            # Never let a surprise end the consume loop (it runs in a task nobody reads):
            # the batch is not acked, so it comes back after ack_wait.
            log.exception("writing a batch failed unexpectedly; it will be redelivered")
        await self.flush_acks()

    async def write(self, items: list[Row | EventRow]) -> tuple[int, list[tuple[str, Row]]]:
        """Write messages (with their user state: archive.userstate) and lifecycle events
        (archive.lifecycle); every step is idempotent, so a retry or a redelivery of any
        part is harmless. Returns (new messages, mentions of members)."""
        rows = [item for item in items if isinstance(item, Row)]
        events = [item for item in items if isinstance(item, EventRow)]
        new, mentioned, pending = await userstate.write_messages(self.pool, rows)
        if events:
            await lifecycle.record(self.pool, events)
        waiting = {*pending, *(e.message_id for e in events)}
        if waiting:
            window = int(self.settings.edit_window_s * 1000)
            purge = await lifecycle.apply_pending(self.pool, waiting, window)
            await lifecycle.purge_from_log(self.js, purge)
        return new, mentioned

    async def commit(self, batch: list[tuple[Msg, Row | EventRow]]) -> None:
        rows = [row for _, row in batch]
        attempt = 0
        while True:
            started = time.perf_counter()
            try:
                new, mentioned = await self.write(rows)
            except DB_UNAVAILABLE as exc:
                # Keep the batch and retry here rather than nak it: a nak would count as a
                # delivery, and a long outage must not push good tasks to the dead letters.
                # in_progress keeps JetStream from redelivering it to another replica that
                # would only hit the same outage.
                metrics.DB_ERRORS.inc()
                self.on_db_state(False)
                delay = backoff(attempt, cap=min(5.0, self.settings.ack_wait / 3))
                log.warning("postgres unavailable (%s); retrying batch in %.2fs", exc, delay)
                await self.keep_alive([msg for msg, _ in batch])
                await asyncio.sleep(delay)
                attempt += 1
                continue
            except asyncpg.PostgresError as exc:
                # Postgres refused the data: find the row(s) to blame, write the rest.
                self.on_db_state(True)
                log.warning("batch refused (%s); writing its rows one by one", exc)
                await self.write_one_by_one(batch)
                return
            metrics.COMMIT_SECONDS.observe(time.perf_counter() - started)
            metrics.ROWS_WRITTEN.inc(new)
            self.on_db_state(True)
            break
        # Committed: now, and only now, the tasks may leave the queue (after the mention
        # events: a crash before the ack writes the batch again and republishes them, and
        # JetStream drops the duplicates).
        if mentioned and self.on_mentions is not None:
            await self.on_mentions(mentioned)
        for msg, _ in batch:
            await self.ack(msg)

    async def write_one_by_one(self, batch: list[tuple[Msg, Row | EventRow]]) -> None:
        for msg, row in batch:
            try:
                new, mentioned = await self.write([row])
                metrics.ROWS_WRITTEN.inc(new)
                if mentioned and self.on_mentions is not None:
                    await self.on_mentions(mentioned)
            except DB_UNAVAILABLE:
                continue  # not acked: it comes back after ack_wait
            except asyncpg.PostgresError as exc:
                delivered = msg.metadata.num_delivered
                if delivered >= self.settings.max_deliver - 1:
                    reason = f"postgres refused it {delivered} times: {exc}"
                    await self.dead_letter(msg, reason, "retries_exhausted")
                else:
                    await self.nak(msg, backoff(delivered, base=1.0, cap=30.0))
                continue
            await self.ack(msg)

    async def dead_letter(self, msg: Msg, reason: str, cause: str) -> None:
        """Park the task on the dead-letter subject with the reason, then remove it from
        the queue. If the park fails the task is not acked, so it comes back."""
        headers = {k: v for k, v in (msg.headers or {}).items() if not k.startswith("Nats-")}
        headers[names.HEADER_DEAD_REASON] = one_line(reason)
        headers[names.HEADER_DEAD_SUBJECT] = msg.subject
        # A retried park (crash between publish and ack) is a duplicate, not a second copy.
        headers[names.HEADER_MSG_ID] = f"archive-{msg.metadata.sequence.stream}"
        try:
            await self.js.publish(names.DEAD_LETTER_ARCHIVE, msg.data, headers=headers)
        except Exception as exc:
            log.warning("could not dead-letter task %s: %s", msg.metadata.sequence.stream, exc)
            return
        if not await self.skip_chat_seq(chat_sequence(msg.headers)):
            return  # not acked: it comes back, and the park is deduplicated
        log.warning(
            "dead-lettered task",
            extra={"seq": msg.metadata.sequence.stream, "reason": one_line(reason)},
        )
        metrics.DEAD_LETTERED.labels(cause).inc()
        # Ack, not term: on a WorkQueue stream an ack is what removes the message.
        await self.ack(msg)

    async def park_exhausted(self, stream_seq: int) -> None:
        """A task JetStream stopped delivering (max_deliver reached without an ack, e.g. a
        replica crashed on it again and again): park it and remove it from the queue,
        rather than leave it stuck there unseen."""
        try:
            stored = await self.js.get_msg(names.STREAM_ARCHIVE, stream_seq)
        except nats.js.errors.NotFoundError:
            return  # acked after all, or already parked by another replica
        headers = {k: v for k, v in (stored.headers or {}).items() if not k.startswith("Nats-")}
        reason = f"delivered {self.settings.max_deliver} times and never acked"
        headers[names.HEADER_DEAD_REASON] = reason
        headers[names.HEADER_DEAD_SUBJECT] = stored.subject or ""
        headers[names.HEADER_MSG_ID] = f"archive-{stream_seq}"
        await self.js.publish(names.DEAD_LETTER_ARCHIVE, stored.data or b"", headers=headers)
        if not await self.skip_chat_seq(chat_sequence(stored.headers)):
            return
        try:
            await self.js.delete_msg(names.STREAM_ARCHIVE, stream_seq)
        except nats.js.errors.NotFoundError:
            pass
        log.warning("dead-lettered task", extra={"seq": stream_seq, "reason": reason})
        metrics.DEAD_LETTERED.labels("retries_exhausted").inc()

    async def skip_chat_seq(self, seq: int | None) -> bool:
        """Tell the unread-count watermark that this CHAT sequence will never be stored."""
        if seq is None:
            return True
        try:
            await userstate.record_skipped(self.pool, seq)
        except Exception as exc:
            log.warning("could not record skipped sequence %d: %s", seq, exc)
            return False
        return True

    async def ack(self, msg: Msg) -> None:
        try:
            await msg.ack()
        except Exception as exc:  # NATS gone: the task is redelivered; the write is idempotent
            log.warning("ack failed: %s", exc)

    async def nak(self, msg: Msg, delay: float) -> None:
        try:
            await msg.nak(delay=delay)
        except Exception as exc:
            log.warning("nak failed: %s", exc)

    async def keep_alive(self, msgs: list[Msg]) -> None:
        try:
            for msg in msgs:
                await msg.in_progress()
        except Exception as exc:
            log.warning("in-progress signal failed: %s", exc)

    async def flush_acks(self) -> None:
        """Acks are fire-and-forget publishes; flush so they leave before the next fetch
        (and before a graceful stop)."""
        try:
            await self.nc.flush(timeout=5)
        except Exception as exc:
            log.warning("flushing acks failed: %s", exc)
