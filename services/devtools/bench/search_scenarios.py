"""Full-text search (issue 14): p99 of the archive's search endpoint over 1,000,000 rows,
next to the same SQL sent straight to Postgres."""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from typing import Any

import asyncpg
import nats
from chatlib import codec, ids, names
from chatlib.proto.chat import v1 as pb

from devtools.bench.cluster import Cluster, Missing, service_exists
from devtools.bench.report import Figure, Run, percentile
from devtools.bench.ws_scenarios import Ctx

COLUMNS = ["id", "room", "dm_lo", "dm_hi", "sender", "content", "ts_ms", "stream_seq"]
ROOMS = 40
USERS = 500
VOCABULARY = 20_000
WORDS_PER_MESSAGE = 10
TARGET_MS = 50.0


def _vocabulary() -> list[str]:
    rng = random.Random(7)
    letters = "abcdefghijklmnopqrstuvwxyz"
    words: set[str] = set()
    while len(words) < VOCABULARY:
        words.add("".join(rng.choice(letters) for _ in range(rng.randint(3, 9))))
    return sorted(words)


def _rows(count: int, words: list[str], start_ms: int) -> list[tuple[Any, ...]]:
    """Room messages and DMs whose words follow a Zipf-like law (a few words are in a
    large share of messages, most are rare), as in real chat."""
    rng = random.Random(14)
    # Cumulative weights, computed once: random.choices would redo them on every call.
    cumulative = list(itertools.accumulate(1 / (rank + 1) for rank in range(len(words))))
    out: list[tuple[Any, ...]] = []
    for i in range(count):
        text = " ".join(rng.choices(words, cum_weights=cumulative, k=WORDS_PER_MESSAGE))
        ts = start_ms + i // 10
        sender = f"u{rng.randrange(USERS)}"
        if i % 5 == 0:  # a fifth are DMs
            peer = f"u{rng.randrange(USERS)}"
            lo, hi = names.dm_pair(sender, peer)
            out.append((ids.new_id(ts), None, lo, hi, sender, text, ts, None))
        else:
            out.append((ids.new_id(ts), f"room{i % ROOMS}", None, None, sender, text, ts, None))
    return out


async def _search_bench(nats_url: str, db_url: str, total: int, queries: int) -> dict[str, Any]:
    from archive.lifecycle import SEARCH_SQL

    words = _vocabulary()
    rows = _rows(total, words, int(time.time() * 1000) - total)
    conn = await asyncpg.connect(db_url)
    try:
        t0 = time.monotonic()
        for start in range(0, len(rows), 100_000):
            await conn.copy_records_to_table(
                "messages", records=rows[start : start + 100_000], columns=COLUMNS
            )
        # What autovacuum does soon after such a load (and keeps doing): statistics, and the
        # GIN index's pending list merged (a search would otherwise scan it).
        await conn.execute("VACUUM ANALYZE messages")
        load_s = time.monotonic() - t0
        rng = random.Random(99)
        # What people search for: a third each of common words (in ~1-5 % of messages),
        # middling and rare ones; as a user in 5 rooms, plus their own DMs.
        asks = []
        for _ in range(queries):
            low, high = rng.choice(((10, 100), (100, 2000), (2000, VOCABULARY)))
            rank = rng.randrange(low, high)
            rooms = [f"room{r}" for r in rng.sample(range(ROOMS), 5)]
            asks.append((words[rank], rooms, f"u{rng.randrange(USERS)}"))
        samples: dict[str, list[float]] = {"search": [], "sql search": []}
        hits = 0
        nc = await nats.connect(nats_url)
        # The bare SQL as the archive sends it (asyncpg prepares it there too).
        stmt = await conn.prepare(SEARCH_SQL)

        async def via_sql(word: str, rooms: list[str], user: str) -> None:
            await stmt.fetch(word, rooms, user, "~", 21)

        async def via_nats(word: str, rooms: list[str], user: str) -> int:
            req = pb.SearchRequest(requester=user, rooms=rooms, query=word, limit=20)
            payload, headers = codec.encode(req)
            reply = await nc.request(names.HISTORY_SEARCH, payload, timeout=10, headers=headers)
            if reply.headers and reply.headers.get("Nats-Service-Error-Code"):
                raise RuntimeError(f"search error: {reply.headers}")
            return len(codec.decode_as(pb.SearchPage, reply.data, reply.headers).hits)

        try:
            for word, rooms, user in asks[:50]:  # warm both paths' caches, untimed
                await via_nats(word, rooms, user)
                await via_sql(word, rooms, user)
            # Interleaved, alternating which goes first, so neither path runs on caches
            # the other one warmed (or on a quieter moment of the machine).
            for i, (word, rooms, user) in enumerate(asks):
                for path in ("search", "sql search") if i % 2 else ("sql search", "search"):
                    s = time.perf_counter()
                    if path == "search":
                        hits += await via_nats(word, rooms, user)
                    else:
                        await via_sql(word, rooms, user)
                    samples[path].append((time.perf_counter() - s) * 1000)
        finally:
            await nc.close()
    finally:
        await conn.close()
    return {
        "load_seconds": round(load_s, 1),
        "mean_hits_per_page": round(hits / max(1, queries), 1),
        "samples_ms": samples,
    }


def search(ctx: Ctx) -> Run:
    if not service_exists("archive"):
        raise Missing("services/archive has no __main__ yet")
    total = ctx.scaled(1_000_000, 100_000)
    queries = ctx.scaled(1000, 200)
    with Cluster(ctx.workdir / "search") as c:
        c.start_postgres()
        c.archive()
        data = asyncio.run(_search_bench(c.start_nats(), c.database_url, total, queries))
    s = {k: sorted(v) for k, v in data["samples_ms"].items()}
    p99 = percentile(s["search"], 99)
    figs = [
        Figure(
            f"search p99 ({total:,} rows, via NATS)",
            p99,
            "ms",
            baseline=percentile(s["sql search"], 99),
            target=f"<= {TARGET_MS:g} ms",
            passed=p99 <= TARGET_MS,
        ),
        Figure(
            "search p50",
            percentile(s["search"], 50),
            "ms",
            baseline=percentile(s["sql search"], 50),
        ),
    ]
    data["baseline"] = "the same SQL straight to Postgres (prepared statement) from the bench"
    data["samples_ms"] = {k: [round(x, 3) for x in v] for k, v in data["samples_ms"].items()}
    return Run("search", figs, data)
