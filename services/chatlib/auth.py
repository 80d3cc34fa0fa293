"""Tokens: guest tokens we sign ourselves, and JWTs from the operator's identity provider.

Either way the result is one validated user name: the sender of everything the connection
does (a gateway socket, a gRPC call). One implementation for every door into the system.
"""

from __future__ import annotations

import time
from typing import Any

import jwt

from chatlib import validate
from chatlib.settings import ClientSettings

GUEST_ISSUER = "natschat-guest"


class AuthError(Exception):
    """A missing, malformed, forged or expired token."""


class Authenticator:
    def __init__(self, settings: ClientSettings) -> None:
        self.settings = settings

    def issue_guest(self, name: str, now: float | None = None) -> tuple[str, int]:
        """A signed guest token for `name` (already validated) and its expiry in ms."""
        now = time.time() if now is None else now
        exp = int(now + self.settings.guest_token_ttl)
        claims = {"sub": name, "iss": GUEST_ISSUER, "iat": int(now), "exp": exp}
        token = jwt.encode(claims, self.settings.guest_secret, algorithm="HS256")
        return token, exp * 1000

    def verify(self, token: object) -> str:
        """The token's user; AuthError for anything not valid right now."""
        if not isinstance(token, str) or not token:
            raise AuthError("missing token")
        try:
            claims = self._decode(token)
        except jwt.PyJWTError as exc:
            raise AuthError(f"invalid token: {exc}") from exc
        user = claims.get("preferred_username") or claims.get("sub")
        if not validate.is_valid_name(user):
            raise AuthError(f"token user is not a valid name ({validate.NAME_RULE})")
        assert isinstance(user, str)
        return user

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
            return jwt.decode(
                token, s.guest_secret, algorithms=["HS256"], issuer=GUEST_ISSUER, options=options
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
