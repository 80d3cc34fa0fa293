"""Container HEALTHCHECK for the one natschat image: GET /healthz on the service's port.

The same image runs gateway, presence or archive, so the port is the *_HTTP_PORT that is
set, else each service's default (gateway 8000, presence 8081, archive 8082). Only one
service runs per container, so the first port that answers is the one. Standard library
only: the slim image has no curl.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request

DEFAULT_PORTS = {"GATEWAY_HTTP_PORT": 8000, "PRESENCE_HTTP_PORT": 8081, "ARCHIVE_HTTP_PORT": 8082}


def ports() -> list[int]:
    explicit = [int(os.environ[k]) for k in DEFAULT_PORTS if os.environ.get(k)]
    return explicit or list(DEFAULT_PORTS.values())


def healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as resp:
            return bool(resp.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def main() -> int:
    return 0 if any(healthy(port) for port in ports()) else 1


if __name__ == "__main__":
    sys.exit(main())
