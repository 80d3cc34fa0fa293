"""Hypothesis strategies for chat protobufs, shared by the tests that pin hand-written
readers and writers (chatlib.wire and its users) to betterproto2."""

from __future__ import annotations

from chatlib.proto.chat import v1 as pb
from hypothesis import strategies as st

texts = st.text(max_size=40)
int64s = st.integers(min_value=-(2**63), max_value=2**63 - 1)


def chat_messages(with_reply_to: bool = False) -> st.SearchStrategy[pb.ChatMessage]:
    fields = {
        "id": texts,
        "room": texts,
        "dm_peer": texts,
        "sender": texts,
        "content": st.text(max_size=300),
        "ts_ms": int64s,
        "client_id": texts,
    }
    if with_reply_to:
        fields["reply_to"] = texts
    return st.builds(pb.ChatMessage, **fields)
