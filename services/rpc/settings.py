"""rpc settings, from RPC_* environment variables. Auth and per-user limits are the
gateway's (chatlib.settings.ClientSettings): set them to the same values."""

from __future__ import annotations

from chatlib.settings import ClientSettings
from pydantic import Field
from pydantic_settings import SettingsConfigDict


class RpcSettings(ClientSettings):
    model_config = SettingsConfigDict(env_prefix="RPC_", extra="ignore")

    http_port: int = 8083  # /healthz, /readyz, /metrics
    grpc_host: str = "0.0.0.0"
    grpc_port: int = 50051
    # Messages buffered for one StreamMessages call; a caller that falls this far behind
    # gets RESOURCE_EXHAUSTED with the last delivered seq, and resumes from it.
    stream_buffer: int = Field(default=1000, gt=0)
    # Users whose rate-limit buckets are remembered (least recently seen go first).
    rate_buckets_max: int = Field(default=100_000, gt=0)
