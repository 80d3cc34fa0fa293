"""Entry point: `python -m presence`."""

from __future__ import annotations

from chatlib import lifecycle

from presence.app import PresenceService
from presence.settings import PresenceSettings


def main() -> None:
    settings = PresenceSettings()
    lifecycle.run(PresenceService(settings), settings)


if __name__ == "__main__":
    main()
