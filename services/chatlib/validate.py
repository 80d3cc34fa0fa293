"""Rules for user and room names: one NATS subject token, readable, bounded."""

from __future__ import annotations

import re

NAME_RULE = (
    "1-32 characters: lowercase letters, digits, '-' or '_', starting with a letter or digit"
)
_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")


def is_valid_name(name: object) -> bool:
    return isinstance(name, str) and _NAME.match(name) is not None
