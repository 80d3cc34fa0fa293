"""Who a message names: `@name` with a valid user name, not glued to a longer word."""

from __future__ import annotations

import re

# The same alphabet as user names (chatlib.validate); a name is the longest run after
# the @, so "@bob-x" names bob-x, never bob. "a@b" (an e-mail address) names nobody.
_MENTION = re.compile(r"(?<![a-z0-9_@.-])@([a-z0-9][a-z0-9_-]{0,31})(?![a-z0-9_-])")
# A message names at most this many users (a message naming everyone is not a feature).
MAX_MENTIONS = 20


def mentioned(content: str) -> list[str]:
    """The users a message names, first occurrence order, without duplicates."""
    if "@" not in content:
        return []
    found: dict[str, None] = {}
    for match in _MENTION.finditer(content):
        found[match.group(1)] = None
        if len(found) >= MAX_MENTIONS:
            break
    return list(found)
