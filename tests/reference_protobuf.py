"""Other protobuf implementations, to check our codec against producers that are not us.

- `official()`: Google's `protobuf` package (upb), with code protoc generates from protos/
  into a temporary folder (grpcio-tools ships both).
- `protobufjs(mode, type, text)`: protobufjs under Node, installed from tests/interop
  (with nats.js, for the README's JavaScript example, and grpc-js for the gRPC API).
"""

from __future__ import annotations

import functools
import importlib
import os
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
INTEROP = ROOT / "tests" / "interop"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


@functools.cache
def official() -> SimpleNamespace:
    """chat.v1's messages as classes of the official protobuf package, and ChatService's
    grpc stub."""
    out = Path(tempfile.mkdtemp(prefix="pb2-"))
    protos = sorted(str(p.relative_to(ROOT / "protos")) for p in (ROOT / "protos").rglob("*.proto"))
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", f"-I{ROOT / 'protos'}",
         f"--python_out={out}", f"--grpc_python_out={out}", *protos],
        check=True, capture_output=True, cwd=ROOT / "protos",
    )  # fmt: skip
    sys.path.insert(0, str(out))
    classes: dict[str, Any] = {}
    # Every .proto of chat.v1 (new ones included without touching this list).
    for module in sorted(f"{Path(p).stem}_pb2" for p in protos):
        mod = importlib.import_module(f"chat.v1.{module}")
        for name, desc in mod.DESCRIPTOR.message_types_by_name.items():
            classes[name] = getattr(mod, name)
            assert desc.full_name == f"chat.v1.{name}"
    # The stub protoc's grpc plugin writes: what an integrator in Python would use.
    classes["ChatServiceStub"] = importlib.import_module(
        "chat.v1.chat_service_pb2_grpc"
    ).ChatServiceStub
    return SimpleNamespace(**classes)


def plain(message: Any) -> dict[str, Any]:
    """A message of either library as a dict of its fields (nested ones as dicts too), by
    the official descriptor's field names, so the two can be compared."""
    ref = getattr(official(), type(message).__name__)
    out: dict[str, Any] = {}
    for field in ref.DESCRIPTOR.fields:
        value = getattr(message, field.name)
        if field.message_type is not None:
            if field.is_repeated:
                value = [plain(v) for v in value]
            else:
                value = plain(value) if _present(message, field.name) else None
        elif field.is_repeated:
            value = list(value)
        elif field.has_presence and not _present(message, field.name):
            value = None  # an optional field left unset (betterproto2 says None)
        out[field.name] = value
    return out


def _present(message: Any, name: str) -> bool:
    if hasattr(message, "HasField"):
        return bool(message.HasField(name))
    return getattr(message, name) is not None


def key(number: int, wire_type: int) -> bytes:
    return bytes([number << 3 | wire_type])


def field_by_field(message: Any, rnd: random.Random, explicit_defaults: bool) -> bytes:
    """`message` (official) written one field at a time, in a shuffled order, optionally
    with the unset scalar fields written out at their default value (as protobufjs and
    hand-written encoders do). Concatenated encodings are a valid encoding: the merge."""
    parts = []
    for field in message.DESCRIPTOR.fields:
        one = type(message)()
        if field.is_repeated:
            for item in getattr(message, field.name):
                one = type(message)()
                getattr(one, field.name).append(item) if field.message_type is None else (
                    getattr(one, field.name).add().CopyFrom(item)
                )
                parts.append(one.SerializeToString())
            continue
        if field.message_type is not None:
            if message.HasField(field.name):
                getattr(one, field.name).CopyFrom(getattr(message, field.name))
                parts.append(one.SerializeToString())
            continue
        value = getattr(message, field.name)
        if value != field.default_value:
            setattr(one, field.name, value)
            parts.append(one.SerializeToString())
        elif explicit_defaults:
            wire_type = 2 if field.type in (field.TYPE_STRING, field.TYPE_BYTES) else 0
            parts.append(key(field.number, wire_type) + b"\x00")
    rnd.shuffle(parts)
    return b"".join(parts)


def protobufjs_dir() -> Path:
    """tests/interop with protobufjs installed (npm, once); skips (fails in CI) without
    Node."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        if IN_CI:
            pytest.fail("node and npm are needed for the protobufjs interop test in CI")
        pytest.skip("node/npm not installed: apt-get install nodejs npm")
    wanted = ("protobufjs", "nats", "@grpc/grpc-js", "@grpc/proto-loader")
    if not all((INTEROP / "node_modules" / p).exists() for p in wanted):
        subprocess.run(
            ["npm", "install", "--no-audit", "--no-fund", "--silent"],
            cwd=INTEROP, check=True, capture_output=True, timeout=240,
        )  # fmt: skip
    return INTEROP


def protobufjs(mode: str, type_name: str, text: str) -> str:
    """Run tests/interop/protobufjs_codec.mjs: encode JSON -> hex, or decode hex -> JSON."""
    folder = protobufjs_dir()
    done = subprocess.run(
        ["node", "protobufjs_codec.mjs", mode, type_name],
        cwd=folder, input=text, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout
