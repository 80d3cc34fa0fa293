"""The capacity calculator (devtools.capacity): the formulas docs/capacity.md gives an
operator to redo with their own numbers."""

from __future__ import annotations

import pytest
from devtools import capacity
from devtools.capacity import Costs, Load


def test_one_gateway_hears_every_room_and_many_hear_only_their_share() -> None:
    assert capacity.share_of_rooms_per_gateway(1, 20) == 1.0
    # Two gateways, a room of one member: the member is on a given gateway half the time.
    assert capacity.share_of_rooms_per_gateway(2, 1) == pytest.approx(0.5)
    # Many gateways: about members / gateways.
    assert capacity.share_of_rooms_per_gateway(1000, 20) == pytest.approx(0.0198, rel=0.01)


def test_a_small_load_needs_the_minimum_of_everything() -> None:
    plan = capacity.plan(Load(users=1000, msgs_per_s=10, fanout=5))
    assert plan.gateways == 1 and plan.gateways_fit
    assert plan.chat_shards == 1
    assert plan.nats_nodes == 3  # a JetStream cluster with R3 streams needs three
    assert plan.archive_replicas == 2 and plan.presence_replicas == 2  # no singleton


def test_sockets_set_the_gateway_count_when_the_work_is_light() -> None:
    plan = capacity.plan(
        Load(users=1_000_000, sockets_per_user=1, msgs_per_s=1, fanout=1, session_minutes=1e6),
        Costs(gateway_sockets_max=50_000),
    )
    assert plan.gateways == 20


def test_shards_follow_the_message_rate_over_one_stream_leader() -> None:
    costs = Costs(stream_msgs_per_s=10_000, target_utilisation=0.5)
    assert capacity.plan(Load(msgs_per_s=4_000), costs).chat_shards == 1
    assert capacity.plan(Load(msgs_per_s=50_000), costs).chat_shards == 10
    plan = capacity.plan(Load(msgs_per_s=50_000), costs)
    assert plan.first_limit == "one CHAT stream leader"
    assert plan.headroom["one CHAT stream leader"] == 5.0


def test_work_every_gateway_does_whatever_their_number_is_reported_as_not_fitting() -> None:
    # Every DM reaches every gateway: at 50,000 DMs/s and 20 us each that is a core per
    # gateway, which no number of gateways brings under the target.
    costs = Costs(gateway_skip_us=20, stream_msgs_per_s=1e6, postgres_rows_per_s=1e6)
    plan = capacity.plan(Load(msgs_per_s=50_000, dm_share=1.0), costs)
    assert not plan.gateways_fit
    assert plan.first_limit == "DM interest on one gateway"


def test_the_command_line_takes_every_figure_as_a_flag(capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        capacity.main(["--users", "2000", "--msgs-per-s", "100", "--stream-msgs-per-s", "50"]) == 0
    )
    out = capsys.readouterr().out
    assert "chat_shards              4" in out  # 100 / (50 x 0.6) -> 4
