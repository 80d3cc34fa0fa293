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
    # NKey auth (Ed25519; the prod overlay and the TLS compose variant): path to this
    # service's seed file, instead of user/password. The server knows only the public key.
    nats_nkey_seed_file: str = ""
    nats_nkey_seed: str = ""  # the seed itself (e.g. from a Kubernetes Secret), instead
    # TLS to NATS: the CA that signed the servers' certificates (the client verifies the
    # server against it and refuses anything else), and optionally a client certificate.
    nats_tls_ca_file: str = ""
    nats_tls_cert_file: str = ""
    nats_tls_key_file: str = ""
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
        if not (
            self.nats_user or self.nats_creds or self.nats_nkey_seed_file or self.nats_nkey_seed
        ):
            raise ValueError(
                "production needs NATS credentials (nats_user, nats_creds or nats_nkey_seed_file)"
            )


DEV_SECRET = "dev-only-insecure-secret-change-me"


class ClientSettings(CommonSettings):
    """What every service that serves users shares (the gateway's WebSocket, the rpc
    service's gRPC): how tokens are verified, and the limits each user gets. Same values
    everywhere, so a user meets one set of rules whichever door they come in by."""

    # guest: pick a free name, get a token signed with guest_secret (development; in
    #   production only with guest_in_production, e.g. a public demo).
    # jwt: verify tokens signed with a static key from the operator's identity provider.
    # oidc: sign-in with an OpenID Connect provider; keys from its JWKS, rotating.
    auth_mode: Literal["guest", "jwt", "oidc"] = "guest"
    guest_secret: str = DEV_SECRET
    guest_token_ttl: float = Field(default=24 * 3600.0, gt=0)
    # Guest mode lets anyone pick any free name: production refuses it unless this says
    # the operator means it.
    guest_in_production: bool = False
    # A guest name stays reserved for its holder while any of their sockets is open, and
    # this many seconds after the last one closes (chatlib.guest_names). Same everywhere.
    guest_hold: float = Field(default=60.0, gt=0)
    # OIDC: the issuer (discovery at <issuer>/.well-known/openid-configuration), the
    # page's client id (also the expected audience unless oidc_audience says otherwise),
    # and the claim that holds the user name (validated against our name rule).
    oidc_issuer: str = ""
    oidc_client_id: str = ""
    oidc_audience: str = ""
    oidc_username_claim: str = "preferred_username"
    oidc_scopes: str = "openid profile offline_access"
    oidc_jwks_uri: str = ""  # default: the provider's discovery document says
    # Clock skew tolerated on exp/nbf/iat, seconds.
    oidc_leeway: float = Field(default=30.0, ge=0)
    # The key set is cached this long; an unknown kid refetches it at most once per
    # cooldown (rotation is picked up, forged kids cannot make us hammer the provider).
    oidc_jwks_lifespan: float = Field(default=300.0, gt=0)
    oidc_jwks_cooldown: float = Field(default=5.0, ge=0)
    jwt_algorithm: Literal["HS256", "RS256"] = "HS256"
    jwt_secret: str = ""  # HS256
    jwt_public_key: str = ""  # RS256, PEM
    jwt_issuer: str = ""
    jwt_audience: str = ""

    max_content_bytes: int = Field(default=4096, gt=0)
    # Two token buckets per user (per socket on the gateway), so that neither kind can
    # starve the other: writes (send, dm, typing) and reads (history, join, leave, who).
    # Violations of either count towards abuse.
    rate_per_second: float = Field(default=20.0, gt=0)
    rate_burst: int = Field(default=40, gt=0)
    read_rate_per_second: float = Field(default=20.0, gt=0)
    read_rate_burst: int = Field(default=40, gt=0)
    request_timeout: float = Field(default=2.0, gt=0)

    def check_production(self) -> None:
        super().check_production()
        prefix = str(self.model_config.get("env_prefix", ""))
        if self.auth_mode == "guest" and not self.guest_in_production:
            raise ValueError(
                "production refuses guest auth (anyone can pick any free name): use oidc "
                f"or jwt, or set {prefix}GUEST_IN_PRODUCTION=true to mean it"
            )
        if self.auth_mode == "guest" and self.guest_secret == DEV_SECRET:
            raise ValueError(f"production with guest auth needs {prefix}GUEST_SECRET")
        if self.auth_mode == "oidc" and not (self.oidc_issuer and self.oidc_client_id):
            raise ValueError(f"oidc auth needs {prefix}OIDC_ISSUER and {prefix}OIDC_CLIENT_ID")
        if self.auth_mode == "oidc" and not self.oidc_issuer.startswith("https://"):
            raise ValueError(f"production needs an https:// {prefix}OIDC_ISSUER")
        if self.auth_mode == "jwt" and not (self.jwt_secret or self.jwt_public_key):
            raise ValueError(f"jwt auth needs {prefix}JWT_SECRET or {prefix}JWT_PUBLIC_KEY")
