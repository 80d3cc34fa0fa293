"""chatlib.auth's fast path for our own guest tokens: it returns jwt.decode's claims for
the tokens issue_guest writes, and steps aside (None, so jwt.decode decides) for
anything jwt.decode would not accept exactly as it is."""

from __future__ import annotations

import time
from typing import Any

import jwt
import pytest
from chatlib import auth
from chatlib.auth import GUEST_ISSUER, Authenticator
from gateway.settings import GatewaySettings
from hypothesis import assume, given, settings
from hypothesis import strategies as st

SECRET = "fast-path-secret-fast-path-secret-0123"


def _authenticator() -> Authenticator:
    return Authenticator(GatewaySettings(auth_mode="guest", guest_secret=SECRET))


def _library(token: str) -> dict[str, Any]:
    return jwt.decode(
        token,
        SECRET,
        algorithms=["HS256"],
        issuer=GUEST_ISSUER,
        options={"require": ["exp", "sub"]},
    )


def _fast(token: str) -> dict[str, Any] | None:
    return auth._decode_guest_fast(token, SECRET.encode())


@pytest.mark.parametrize("name", ["alice", "b", "x" * 32, "user_1-2"])
def test_issued_guest_tokens_take_the_fast_path_with_the_librarys_claims(name: str) -> None:
    token, _ = _authenticator().issue_guest(name)
    assert _fast(token) == _library(token)
    assert _fast(token) is not None


def _signed(claims: dict[str, Any], **kw: Any) -> str:
    return jwt.encode(claims, kw.pop("key", SECRET), algorithm=kw.pop("alg", "HS256"), **kw)


NOW = int(time.time())
GOOD = {"sub": "alice", "iss": GUEST_ISSUER, "iat": NOW, "exp": NOW + 600, "jti": "h1"}
REFUSED_BY_BOTH = {
    "expired": _signed({**GOOD, "exp": NOW - 1}),
    "issued in the future": _signed({**GOOD, "iat": NOW + 600}),
    "another issuer": _signed({**GOOD, "iss": "someone-else"}),
    "another key": _signed(GOOD, key="not-our-secret-not-our-secret-000"),
    "an audience": _signed({**GOOD, "aud": "x"}),
    "not a string subject": _signed({**GOOD, "sub": 7}),
    "no exp": _signed({k: v for k, v in GOOD.items() if k != "exp"}),
}
ONLY_THE_LIBRARY_TAKES = {
    "a float exp": _signed({**GOOD, "exp": NOW + 600.5}),
    "an extra claim": _signed({**GOOD, "name": "Alice"}),
    "another header": _signed(GOOD, headers={"kid": "k1"}),
    "no jti": _signed({k: v for k, v in GOOD.items() if k != "jti"}),
}


@pytest.mark.parametrize("token", REFUSED_BY_BOTH.values(), ids=REFUSED_BY_BOTH.keys())
def test_what_the_library_refuses_never_takes_the_fast_path(token: str) -> None:
    assert _fast(token) is None
    with pytest.raises(jwt.PyJWTError):
        _library(token)


@pytest.mark.parametrize(
    "token", ONLY_THE_LIBRARY_TAKES.values(), ids=ONLY_THE_LIBRARY_TAKES.keys()
)
def test_unusual_tokens_are_left_to_the_library(token: str) -> None:
    assert _fast(token) is None
    _library(token)  # valid all the same: identify still accepts them, slower


def test_a_tampered_or_re_encoded_token_is_left_to_the_library() -> None:
    token = _signed(GOOD)
    head, body, sig = token.split(".")
    forged_body = jwt.utils.base64url_encode(b'{"sub":"mallory"}').decode()
    for variant in (f"{head}.{forged_body}.{sig}", f"{head}.{body}"):
        assert _fast(variant) is None
        with pytest.raises(jwt.PyJWTError):
            _library(variant)
    # The library reads base64 leniently (padding): only its canonical form is fast.
    assert _fast(f"{head}.{body}.{sig}=") is None


def test_identify_gives_the_same_identity_either_way() -> None:
    a = _authenticator()
    token, _ = a.issue_guest("alice")
    fast = a.identify(token)
    original, auth._decode_guest_fast = auth._decode_guest_fast, lambda *_: None
    try:
        assert a.identify(token) == fast
    finally:
        auth._decode_guest_fast = original


_values = st.one_of(
    st.integers(min_value=NOW - 10**6, max_value=NOW + 10**6),
    st.floats(allow_nan=False, allow_infinity=False),
    st.booleans(),
    st.none(),
    st.text(max_size=8),
    st.just(GUEST_ISSUER),
)


@settings(max_examples=300, deadline=None)
@given(
    claims=st.dictionaries(
        st.sampled_from(["sub", "iss", "iat", "exp", "jti", "nbf", "aud"]), _values
    ),
    base=st.booleans(),
)
def test_the_fast_path_never_accepts_what_the_library_refuses(
    claims: dict[str, Any], base: bool
) -> None:
    try:
        token = _signed({**GOOD, **claims} if base else claims)
    except TypeError:  # jwt.encode refuses some claims (a non-string issuer)
        assume(False)
        return
    fast = _fast(token)
    try:
        expected: dict[str, Any] | None = _library(token)
    except jwt.PyJWTError:
        expected = None
    if fast is not None:
        assert fast == expected
