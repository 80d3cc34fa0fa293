"""The committed generated code matches protos/, and a forgotten `make proto` is caught."""

from __future__ import annotations

import shutil
from pathlib import Path

from chatlib import codec
from chatlib.proto.chat import v1 as pb
from devtools.protogen import GENERATED_DIR, PROTO_DIR, stale_files


def test_committed_generated_code_matches_the_protos() -> None:
    assert stale_files() == [], "run `make proto` and commit the result"


def test_a_changed_proto_without_regeneration_is_caught(tmp_path: Path) -> None:
    protos = tmp_path / "protos"
    shutil.copytree(PROTO_DIR, protos)
    chat = protos / "chat" / "v1" / "chat.proto"
    chat.write_text(
        chat.read_text().replace(
            "string client_id = 7;", "string client_id = 7;\n  bool edited = 8;"
        )
    )
    assert "chat/v1/__init__.py" in stale_files(protos, GENERATED_DIR)


def test_every_payload_type_round_trips_through_the_codec_with_its_type_header() -> None:
    message = pb.ChatMessage(id="01ARZ3NDEKTSV4RRFFQ69G5FAV", room="lobby", sender="alice")
    data, headers = codec.encode(message)
    assert headers == {"Chat-Type": "chat.v1.ChatMessage"}
    assert codec.decode(data, headers) == message
    assert set(codec.TYPES) >= {
        "chat.v1.ChatMessage", "chat.v1.ArchiveTask", "chat.v1.HistoryRequest",
        "chat.v1.HistoryPage", "chat.v1.UserOnline", "chat.v1.UserOffline",
        "chat.v1.Heartbeat", "chat.v1.ConnectionOpened", "chat.v1.ConnectionClosed",
    }  # fmt: skip
