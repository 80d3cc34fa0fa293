"""Entry point: `python -m rpc` (or `chat-rpc`)."""

from __future__ import annotations

from chatlib.lifecycle import run

from rpc.app import RpcService
from rpc.settings import RpcSettings


def main() -> None:
    settings = RpcSettings()
    run(RpcService(settings), settings)


if __name__ == "__main__":
    main()
