"""Reconnect delays of our clients (chatlib.backoff; the page has the same rule)."""

from __future__ import annotations

from types import SimpleNamespace

from chatctl.client import _jittered_reconnect
from chatlib import backoff


def test_full_jitter_grows_exponentially_up_to_the_cap() -> None:
    top = [backoff.delay(n, rand=lambda: 1.0, base=0.5, cap=15) for n in range(8)]
    assert top == [0.5, 1.0, 2.0, 4.0, 8.0, 15, 15, 15]
    assert backoff.delay(3, rand=lambda: 0.0) == 0.0  # anywhere from zero: full jitter
    assert backoff.delay(10_000, rand=lambda: 1.0) == backoff.CAP_S  # no overflow


def test_retry_after_is_waited_plus_a_random_share_of_one_second() -> None:
    # The gateway spreads the turns it hands out (gateway/admission.py); the random share
    # spreads those given the same whole second over it.
    assert backoff.delay(0, retry_after=4, rand=lambda: 0.0) == 4
    assert backoff.delay(0, retry_after=4, rand=lambda: 0.5) == 4.5
    assert backoff.delay(0, retry_after=20, rand=lambda: 0.99) == 20.99
    assert backoff.delay(0, retry_after=0, rand=lambda: 0.5) == 0.25  # ignored


def test_chatctl_reconnects_to_the_least_tried_server_after_a_jittered_delay() -> None:
    a, b = SimpleNamespace(reconnects=3), SimpleNamespace(reconnects=1)
    server, wait = _jittered_reconnect([a, b], {})
    assert server is b
    assert 0 <= wait <= backoff.BASE_S * 2
