"""Tokens: guest tokens we sign ourselves, and JWTs from the operator's identity provider.

Either way the result is one validated user name: the sender of everything the connection
does (a gateway socket, a gRPC call). One implementation for every door into the system.

Three modes (settings.auth_mode):
- guest: the gateway signs a token for a name it has reserved (see chatlib.guest_names);
  the token's `jti` names that reservation, so the token is only good while it holds it.
- jwt: a static key (HS256 secret or RS256 public key) from the operator.
- oidc: an OpenID Connect provider; its signing keys come from its JWKS (found through
  discovery) and rotate: an unknown `kid` refetches the key set, at most once per
  `oidc_jwks_cooldown` seconds, so forged `kid`s cannot make us hammer the provider.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import time
import urllib.request
from dataclasses import dataclass
from typing import Any

import jwt
from jwt.utils import base64url_decode, base64url_encode

from chatlib import validate
from chatlib.settings import ClientSettings

GUEST_ISSUER = "natschat-guest"
# Asymmetric algorithms an OIDC provider may sign ID/access tokens with. Never "none" or
# HS*: a public key must never be usable as an HMAC secret (algorithm confusion).
OIDC_ALGORITHMS = ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "EdDSA"]


# The header jwt.encode writes for issue_guest's tokens (base64url of its JSON), and the
# claims issue_guest writes with their types: what _decode_guest_fast takes.
_GUEST_HEADER = base64url_encode(b'{"alg":"HS256","typ":"JWT"}').decode()
_GUEST_CLAIMS = {"sub": str, "iss": str, "iat": int, "exp": int, "jti": str}


class AuthError(Exception):
    """A missing, malformed, forged or expired token."""


@dataclass(frozen=True)
class Identity:
    """Who a valid token speaks for, and until when."""

    user: str
    expires_at: float  # the token's exp, seconds since the epoch
    # Guest tokens: the name reservation (jti) the token is bound to; "" otherwise.
    holder: str = ""


class Authenticator:
    def __init__(self, settings: ClientSettings) -> None:
        self.settings = settings
        self._jwks: jwt.PyJWKClient | None = None

    def issue_guest(
        self, name: str, now: float | None = None, holder: str | None = None
    ) -> tuple[str, int]:
        """A signed guest token for `name` (already validated and reserved for `holder`)
        and its expiry in ms. A new holder id unless one is given."""
        now = time.time() if now is None else now
        exp = int(now + self.settings.guest_token_ttl)
        claims = {
            "sub": name,
            "iss": GUEST_ISSUER,
            "iat": int(now),
            "exp": exp,
            "jti": holder or new_holder(),
        }
        token = jwt.encode(claims, self.settings.guest_secret, algorithm="HS256")
        return token, exp * 1000

    def verify(self, token: object) -> str:
        """The token's user; AuthError for anything not valid right now."""
        return self.identify(token).user

    def identify(self, token: object) -> Identity:
        """The token's identity; AuthError for anything not valid right now. In oidc mode
        this may fetch the provider's keys (blocking): call it from a thread."""
        if not isinstance(token, str) or not token:
            raise AuthError("missing token")
        try:
            claims = self._decode(token)
        except jwt.PyJWTError as exc:
            raise AuthError(f"invalid token: {exc}") from exc
        s = self.settings
        if s.auth_mode == "oidc":
            user = claims.get(s.oidc_username_claim)
            if user is None:
                raise AuthError(f"token has no {s.oidc_username_claim!r} claim")
        else:
            user = claims.get("preferred_username") or claims.get("sub")
        if not validate.is_valid_name(user):
            raise AuthError(f"token user is not a valid name ({validate.NAME_RULE})")
        assert isinstance(user, str)
        holder = ""
        if s.auth_mode == "guest":
            holder = claims.get("jti") or ""
            if not isinstance(holder, str) or not holder:
                raise AuthError("guest token is not bound to a name reservation (no jti)")
        return Identity(user, float(claims["exp"]), holder)

    def has_role(self, token: object, role: str) -> bool:
        """Whether a valid identity-provider JWT carries `role` in its `roles` claim (a
        list, or Keycloak's realm_access.roles). Guest tokens never carry roles: anyone can
        get one."""
        if not role or self.settings.auth_mode == "guest" or not isinstance(token, str):
            return False
        try:
            claims = self._decode(token)
        except (jwt.PyJWTError, AuthError):
            return False
        found = claims.get("roles")
        realm = claims.get("realm_access")
        if not isinstance(found, list) and isinstance(realm, dict):
            found = realm.get("roles")
        return isinstance(found, list) and role in found

    def _decode(self, token: str) -> dict[str, Any]:
        s = self.settings
        options: Any = {"require": ["exp", "sub"]}
        if s.auth_mode == "guest":
            fast = _decode_guest_fast(token, s.guest_secret.encode())
            if fast is not None:
                return fast
            return jwt.decode(
                token, s.guest_secret, algorithms=["HS256"], issuer=GUEST_ISSUER, options=options
            )
        if s.auth_mode == "oidc":
            signing_key = self._jwks_client().get_signing_key_from_jwt(token)
            return jwt.decode(
                token,
                signing_key,
                algorithms=OIDC_ALGORITHMS,
                issuer=s.oidc_issuer,
                audience=s.oidc_audience or s.oidc_client_id,
                leeway=s.oidc_leeway,
                options={"require": ["exp", "iss", "aud"]},
            )
        key = s.jwt_secret if s.jwt_algorithm == "HS256" else s.jwt_public_key
        if not key:
            raise AuthError("jwt auth is not configured")
        return jwt.decode(
            token,
            key,
            algorithms=[s.jwt_algorithm],
            issuer=s.jwt_issuer or None,
            audience=s.jwt_audience or None,
            options={**options, "verify_aud": bool(s.jwt_audience)},
        )

    def _jwks_client(self) -> jwt.PyJWKClient:
        if self._jwks is None:
            s = self.settings
            uri = s.oidc_jwks_uri or discover(s.oidc_issuer, s.request_timeout * 5)["jwks_uri"]
            self._jwks = jwt.PyJWKClient(
                uri,
                cache_jwk_set=True,
                lifespan=s.oidc_jwks_lifespan,
                cooldown_duration=s.oidc_jwks_cooldown,
                timeout=s.request_timeout * 5,
            )
        return self._jwks


def _decode_guest_fast(token: str, secret: bytes) -> dict[str, Any] | None:
    """The claims of one of our own guest tokens, as jwt.decode returns them, without
    PyJWT's generic machinery (a warnings context, option merging, per-claim checks:
    ~3% of a gateway's CPU per hello). Taken only when jwt.decode would accept the token
    as it is: issue_guest's exact header, a valid HS256 signature in its canonical
    encoding, exactly issue_guest's claims with their types, our issuer, iat not in the
    future, exp not passed. None for anything else: jwt.decode then decides (and names
    the error). tests/test_security_units.py pins it to jwt.decode."""
    if not token.isascii():
        return None
    head, _, rest = token.partition(".")
    body, dot, signature = rest.partition(".")
    if head != _GUEST_HEADER or not dot or "." in signature:
        return None
    signed = token[: len(head) + 1 + len(body)].encode()
    expected = base64url_encode(hmac.new(secret, signed, hashlib.sha256).digest())
    if not hmac.compare_digest(expected, signature.encode()):
        return None
    try:
        claims = json.loads(base64url_decode(body))
    except ValueError:
        return None
    if not isinstance(claims, dict) or claims.keys() != _GUEST_CLAIMS.keys():
        return None
    if any(type(claims[name]) is not kind for name, kind in _GUEST_CLAIMS.items()):
        return None
    now = time.time()
    if claims["iss"] != GUEST_ISSUER or claims["iat"] > now or claims["exp"] <= now:
        return None
    return claims


def discover(issuer: str, timeout: float) -> dict[str, Any]:
    """The provider's OpenID configuration (its endpoints, among them jwks_uri)."""
    url = issuer.rstrip("/") + "/.well-known/openid-configuration"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            config: dict[str, Any] = json.load(resp)
    except (OSError, ValueError) as exc:
        raise AuthError(f"cannot read the provider's discovery document: {exc}") from exc
    if config.get("issuer") != issuer or "jwks_uri" not in config:
        raise AuthError("the provider's discovery document does not match the issuer")
    return config


def new_holder() -> str:
    """An unguessable id for one guest's name reservation."""
    return secrets.token_urlsafe(18)
