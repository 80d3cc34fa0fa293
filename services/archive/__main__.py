"""Entry point: `python -m archive` (or `chat-archive`)."""

from __future__ import annotations

from chatlib.lifecycle import run

from archive.app import ArchiveService
from archive.settings import ArchiveSettings


def main() -> None:
    settings = ArchiveSettings()
    run(ArchiveService(settings), settings)


if __name__ == "__main__":
    main()
