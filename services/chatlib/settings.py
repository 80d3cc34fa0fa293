"""Settings common to every service. Each service subclasses `CommonSettings` with its own
env prefix (GATEWAY_, PRESENCE_, ARCHIVE_), so one environment can hold them all.
"""

from __future__ import annotations

from typing import Annotated, Literal, Self

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


def split_csv(value: object) -> object:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class CommonSettings(BaseSettings):
    model_config = SettingsConfigDict(extra="ignore", validate_default=True)

    environment: Literal["development", "production"] = "development"
    # Comma-separated list; the client fails over between them.
    nats_servers: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["nats://127.0.0.1:4222"]
    )
    nats_user: str = ""
    nats_password: str = ""
    nats_creds: str = ""  # path to a .creds file (JWT auth), instead of user/password
    log_level: str = "INFO"
    # How long SIGTERM waits for in-flight work before draining NATS anyway. Keep
    # Kubernetes' terminationGracePeriodSeconds above this.
    drain_timeout: float = 10.0
    # Replicas for streams and the KV bucket: 1 on one server, 3 on a 3-node cluster.
    stream_replicas: int = Field(default=1, ge=1, le=5)
    # How far back the CHAT log (reconnect recovery) reaches; older history comes from the
    # archive. Every service provisions streams with these, so set them the same everywhere.
    chat_log_max_age: float = Field(default=24 * 3600.0, gt=0)
    chat_log_max_bytes: int = Field(default=1024**3, gt=0)
    http_host: str = "0.0.0.0"
    http_port: int = 8080
    instance_id: str = ""  # defaults to host name + pid; names the process in NATS

    @model_validator(mode="before")
    @classmethod
    def _split_lists(cls, data: object) -> object:
        if isinstance(data, dict):
            for key in ("nats_servers", "allowed_origins"):
                if key in data:
                    data[key] = split_csv(data[key])
        return data

    @model_validator(mode="after")
    def _refuse_unsafe_defaults(self) -> Self:
        if self.environment == "production":
            self.check_production()
        return self

    def check_production(self) -> None:
        """Raise ValueError for defaults that are fine on a laptop but unsafe in production."""
        if not (self.nats_user or self.nats_creds):
            raise ValueError("production needs NATS credentials (nats_user or nats_creds)")
