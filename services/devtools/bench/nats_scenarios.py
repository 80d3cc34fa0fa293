"""Scenarios that talk NATS and Postgres directly: archive drain, history, presence."""

from __future__ import annotations

from devtools.bench.cluster import Missing
from devtools.bench.report import Run
from devtools.bench.ws_scenarios import Ctx


def archive(ctx: Ctx) -> Run:
    raise Missing("not written yet")


def history(ctx: Ctx) -> Run:
    raise Missing("not written yet")


def presence(ctx: Ctx) -> Run:
    raise Missing("not written yet")
