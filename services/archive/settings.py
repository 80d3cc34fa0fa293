"""Archive settings, from ARCHIVE_* environment variables."""

from __future__ import annotations

from chatlib.settings import CommonSettings
from pydantic import Field
from pydantic_settings import SettingsConfigDict


class ArchiveSettings(CommonSettings):
    model_config = SettingsConfigDict(env_prefix="ARCHIVE_", extra="ignore")

    http_port: int = 8082
    database_url: str = "postgresql://postgres@127.0.0.1:5432/chat"
    db_pool_min: int = Field(default=1, ge=1)
    db_pool_max: int = Field(default=8, ge=1)
    # Tasks fetched and committed together in one transaction.
    batch_size: int = Field(default=2000, gt=0)
    fetch_timeout: float = Field(default=1.0, gt=0)
    # Unacked tasks go back to the queue after ack_wait; after max_deliver attempts a
    # task is dead-lettered.
    ack_wait: float = Field(default=30.0, gt=0)
    max_deliver: int = Field(default=5, gt=1)
    history_page_max: int = Field(default=200, gt=0)
    # How often lag (consumer pending) and Postgres reachability (readiness) are refreshed.
    monitor_interval: float = Field(default=2.0, gt=0)
    # Edits later than this after their message are refused (the gateway refuses them
    # first with the same default; this catches a forged or misconfigured publisher).
    edit_window_s: float = Field(default=24 * 3600, gt=0)
