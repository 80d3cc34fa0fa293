"""`python -m devtools.capacity [--users N] [--msgs-per-s M] [--fanout F] ...`: how many
gateways, archive and presence replicas, NATS nodes and CHAT shards a load needs, and
which single part is nearest its limit. The formulas are the table of docs/capacity.md;
the default costs are the figures measured there (replace them with your own).
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, fields


@dataclass(frozen=True)
class Load:
    users: float = 1_000_000  # connected at the same time
    sockets_per_user: float = 1.2  # tabs and devices
    rooms: float = 100_000
    msgs_per_s: float = 50_000  # durable sends (room messages, DMs, edits, reactions)
    fanout: float = 20  # online receivers (sockets) per message, on average
    dm_share: float = 0.2  # of msgs_per_s: every gateway hears every DM today
    session_minutes: float = 30  # mean socket lifetime: opens (and closes) per second


@dataclass(frozen=True)
class Costs:
    """Per unit of work, in microseconds of one core (measured: docs/capacity.md)."""

    gateway_send_us: float = 240  # a durable send: frame in, publish, PubAck, ack out
    gateway_live_us: float = 190  # a live message from NATS: decode, order, render once
    gateway_skip_us: float = 20  # a DM with no local participant: nats-py parse, skip
    gateway_frame_us: float = 8  # one frame written to one socket
    gateway_handshake_us: float = 4000  # upgrade + token + hello + presence + welcome
    gateway_kib_per_socket: float = 29
    gateway_sockets_max: float = 50_000  # per process: memory (~1.4 GiB) and storm size
    stream_msgs_per_s: float = 20_000  # one R3 stream's leader, acked publishes
    nats_us_per_stored_msg: float = 56  # nats-server CPU, 3 replicas, CHAT + ARCHIVE
    nats_us_per_delivery: float = 3  # a core message routed to one subscriber
    nats_cores_per_node: float = 4
    archive_rows_per_replica: float = 11_800  # rows/s one replica writes
    postgres_rows_per_s: float = 23_600  # one primary, the archive's INSERT path
    presence_us_per_event: float = 1000  # an open or close: KV compare-and-set (+ event)
    presence_us_per_listed_socket: float = 5  # each socket in each gateway heartbeat
    heartbeat_interval_s: float = 2.0  # GATEWAY_HEARTBEAT_INTERVAL
    target_utilisation: float = 0.6  # headroom for storms and for a replica lost


@dataclass(frozen=True)
class Plan:
    gateways: int
    gateways_fit: bool  # False: per-gateway work that does not shrink with more gateways
    gateway_cores: float
    gateway_live_per_s: float  # live messages NATS delivers to each gateway
    chat_shards: int
    nats_nodes: int
    nats_cores: float
    archive_replicas: int
    postgres_shards: int
    presence_replicas: int
    presence_cores: float
    presence_writes_per_s: float
    first_limit: str  # the single (unsharded) part with the least headroom
    headroom: dict[str, float]  # part -> load / its limit, for the single parts


def share_of_rooms_per_gateway(gateways: int, members: float) -> float:
    """Share of the rooms that have a member on a given gateway, with a room's `members`
    online sockets placed on `gateways` at random (a load balancer): 1 - (1 - 1/G)^F."""
    if gateways <= 1:
        return 1.0
    return 1.0 - (1.0 - 1.0 / gateways) ** members


def plan(load: Load, costs: Costs = Costs()) -> Plan:
    util = costs.target_utilisation
    sockets = load.users * load.sockets_per_user
    opens_per_s = sockets / (load.session_minutes * 60)
    room_msgs = load.msgs_per_s * (1 - load.dm_share)
    dm_msgs = load.msgs_per_s * load.dm_share
    frames = load.msgs_per_s * load.fanout
    # Gateways: enough for the sockets, then enough cores for the work. A gateway hears
    # the rooms that have a local member (shrinks with more gateways) and every DM (does
    # not), so grow the count until one gateway's share fits in one core (one Python
    # process) at the target utilisation, or until more gateways no longer help.
    gateways = max(1, math.ceil(sockets / costs.gateway_sockets_max))

    def per_gateway_us(g: int) -> float:
        live = room_msgs * share_of_rooms_per_gateway(g, load.fanout)
        return (
            (load.msgs_per_s * costs.gateway_send_us + frames * costs.gateway_frame_us) / g
            + live * costs.gateway_live_us
            + dm_msgs * costs.gateway_skip_us
            + opens_per_s / g * costs.gateway_handshake_us
        )

    while per_gateway_us(gateways) / 1e6 > util and gateways < 100_000:
        gateways += max(1, gateways // 10)
    fits = per_gateway_us(gateways) / 1e6 <= util
    live = room_msgs * share_of_rooms_per_gateway(gateways, load.fanout) + dm_msgs
    gateway_cores = per_gateway_us(gateways) / 1e6 * gateways
    shards = max(1, math.ceil(load.msgs_per_s / (costs.stream_msgs_per_s * util)))
    presence_writes = 2 * opens_per_s  # each open and each close is one KV write
    nats_cores = (
        load.msgs_per_s * costs.nats_us_per_stored_msg
        + live * gateways * costs.nats_us_per_delivery
        + presence_writes * costs.nats_us_per_stored_msg
    ) / 1e6
    # In threes: each R3 stream's replicas on three nodes, spread over groups of three.
    nats_nodes = 3 * max(1, math.ceil(nats_cores / util / (3 * costs.nats_cores_per_node)))
    archive = max(2, math.ceil(load.msgs_per_s / (costs.archive_rows_per_replica * util)))
    primaries = max(1, math.ceil(load.msgs_per_s / (costs.postgres_rows_per_s * util)))
    presence_cores = (
        presence_writes * costs.presence_us_per_event
        + sockets / costs.heartbeat_interval_s * costs.presence_us_per_listed_socket
    ) / 1e6
    presence = max(2, math.ceil(presence_cores / util))
    headroom = {
        "one CHAT stream leader": load.msgs_per_s / costs.stream_msgs_per_s,
        "one Postgres primary": load.msgs_per_s / costs.postgres_rows_per_s,
        "one presence KV bucket": presence_writes / costs.stream_msgs_per_s,
        # What one gateway spends on NATS traffic whatever the number of gateways (DMs).
        "DM interest on one gateway": dm_msgs * costs.gateway_skip_us / 1e6,
    }
    first = max(headroom, key=lambda k: headroom[k])
    return Plan(
        gateways=gateways,
        gateways_fit=fits,
        gateway_cores=round(gateway_cores, 1),
        gateway_live_per_s=round(live),
        chat_shards=shards,
        nats_nodes=nats_nodes,
        nats_cores=round(nats_cores, 1),
        archive_replicas=archive,
        postgres_shards=primaries,
        presence_replicas=presence,
        presence_cores=round(presence_cores, 1),
        presence_writes_per_s=round(presence_writes),
        first_limit=first,
        headroom={k: round(v, 2) for k, v in headroom.items()},
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devtools.capacity", description=__doc__)
    for cls in (Load, Costs):
        for f in fields(cls):
            flag = "--" + f.name.replace("_", "-")
            parser.add_argument(flag, type=float, default=f.default, help=f"default {f.default}")
    args = vars(parser.parse_args(argv))
    load = Load(**{f.name: args[f.name] for f in fields(Load)})
    costs = Costs(**{f.name: args[f.name] for f in fields(Costs)})
    result = plan(load, costs)
    for f in fields(Plan):
        print(f"{f.name:24} {getattr(result, f.name)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
