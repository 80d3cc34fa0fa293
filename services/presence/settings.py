"""Presence settings, from PRESENCE_* environment variables."""

from __future__ import annotations

from chatlib.settings import CommonSettings
from pydantic import Field
from pydantic_settings import SettingsConfigDict


class PresenceSettings(CommonSettings):
    model_config = SettingsConfigDict(env_prefix="PRESENCE_", extra="ignore")

    http_port: int = 8081
    # A gateway silent for this long is taken as dead and its connections dropped.
    # Keep it well above the gateways' GATEWAY_HEARTBEAT_INTERVAL (default 2 s).
    gateway_expiry: float = Field(default=8.0, gt=0)
    sweep_interval: float = Field(default=1.0, gt=0)
    who_page_max: int = Field(default=1000, gt=0)
