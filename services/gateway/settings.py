"""Gateway settings, from GATEWAY_* environment variables."""

from __future__ import annotations

from typing import Annotated

from chatlib.settings import DEV_SECRET, ClientSettings
from pydantic import Field
from pydantic_settings import NoDecode, SettingsConfigDict

__all__ = ["DEV_SECRET", "GatewaySettings"]


class GatewaySettings(ClientSettings):
    """The gateway's own settings; auth, per-user limits and the NATS request timeout
    come from chatlib.settings.ClientSettings (shared with the rpc service)."""

    model_config = SettingsConfigDict(env_prefix="GATEWAY_", extra="ignore")

    http_port: int = 8000
    # Origins allowed to open a WebSocket (comma-separated). Empty in development means
    # "same host as the request"; production must list them.
    allowed_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)

    max_frame_bytes: int = Field(default=65536, gt=0)
    # Compare a reused client_id's request with the stored one (idempotency_conflict when
    # they differ). Off only to measure its cost (`make bench`); production refuses off.
    idempotency_check: bool = True
    # Durable sends waiting for their PubAck at once, over all sockets (chatlib.js_publisher);
    # past it a send waits for a slot, within the request timeout.
    publish_max_in_flight: int = Field(default=4096, gt=0)
    # Frames queued for one socket before it counts as too slow and is disconnected.
    send_queue_frames: int = Field(default=512, gt=0)
    # Reconnect recovery replays at most this many messages from the CHAT log.
    recovery_max_messages: int = Field(default=5000, gt=0)
    # Hello admission (gateway/admission.py): hellos answered at once, sockets waiting for
    # a turn, and the least Retry-After (seconds) of the 503 refusing any more.
    # A hello mostly waits on NATS round trips (user state, presence, membership); in
    # storm runs 256 at once did better than 64 (docs/performance.md, issue 15).
    hello_concurrency: int = Field(default=256, gt=0)
    hello_queue: int = Field(default=512, ge=0)
    hello_retry_after: int = Field(default=2, gt=0)
    # The listening socket's accept queue (the kernel caps it at net.core.somaxconn). A
    # storm's connections wait there until the gateway accepts them (to greet them or
    # refuse them with 503); past a full queue the kernel drops them and they come back
    # only on TCP's retransmit timers (1, 3, 7, 15, 31 s). uvicorn's default is 2048.
    http_backlog: int = Field(default=8192, gt=0)
    # A verified token is remembered this long (never past its exp); 0: no cache.
    token_cache_ttl: float = Field(default=10.0, ge=0)
    # Replay logs shared by resuming clients (replay_cache.py) live this long unused.
    replay_cache_ttl: float = Field(default=60.0, gt=0)
    # ... and a first read reaches this many seqs further back than asked (replay_cache.py).
    replay_backfill: int = Field(default=20_000, ge=0)
    # Guest sign-ins (POST /api/guest) per client address: this many a minute, bursts of
    # guest_burst; past it 429 with Retry-After (a script cannot squat names).
    guest_per_minute: float = Field(default=20.0, gt=0)
    guest_burst: int = Field(default=10, gt=0)
    # Addresses of the proxies whose X-Forwarded-For names the client (uvicorn's
    # forwarded_allow_ips, comma-separated, "*" for any): behind an ingress, set it to the
    # ingress's, else every client looks like the ingress to the guest limit.
    forwarded_allow_ips: str = "127.0.0.1"
    history_page_size: int = Field(default=50, gt=0)
    # Presence: how often this gateway reports its live connections.
    heartbeat_interval: float = Field(default=2.0, gt=0)
    # Scoped presence (gateway/scope.py): rooms with more members than this do not push
    # their members' presence (clients page them with `members`); the lobby counts the
    # users online as its members.
    presence_room_max: int = Field(default=200, ge=0)
    # Sockets that opt in at hello (`presence_batch`) get their presence changes gathered
    # for this long and sent as one frame (gateway/scope.py).
    presence_batch_ms: int = Field(default=250, gt=0)
    # `welcome.online` names at most this many users (the client itself included).
    welcome_online_max: int = Field(default=500, gt=0)
    # Users one socket may `watch` (besides its rooms' members; DM peers count too).
    watch_max: int = Field(default=200, gt=0)
    members_page_max: int = Field(default=200, gt=0)
    # How often the gateway re-reads who is online from presence (repairs missed events).
    online_resync_interval: float = Field(default=30.0, gt=0)
    ws_compression: bool = False
    # A client that racks up this many violations (rate-limited or oversized frames)
    # within abuse_window seconds is abusive: closed with 1008.
    abuse_max_violations: int = Field(default=20, gt=0)
    abuse_window: float = Field(default=10.0, gt=0)
    # The first frame must be `hello` within this many seconds, else close 4401.
    hello_timeout: float = Field(default=5.0, gt=0)
    # Frames above max_frame_bytes get an error; above this hard limit the socket is
    # closed with 1009 (the WebSocket layer refuses to buffer them). 0: 2 x max_frame_bytes.
    hard_frame_bytes: int = Field(default=0, ge=0)
    # Strict-Transport-Security is sent when the page is served over https (behind TLS).
    hsts_max_age: int = Field(default=31536000, ge=0)

    # Message lifecycle (issue 14): how long after sending its author may edit a message,
    # and the JWT role whose holders may delete anyone's message (empty: nobody).
    edit_window_s: float = Field(default=24 * 3600, gt=0)
    operator_role: str = "chat-operator"

    def check_production(self) -> None:
        super().check_production()
        if not self.idempotency_check:
            raise ValueError("production needs GATEWAY_IDEMPOTENCY_CHECK on")
        if not self.allowed_origins:
            raise ValueError("production needs GATEWAY_ALLOWED_ORIGINS")
