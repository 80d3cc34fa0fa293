"""Container HEALTHCHECK for the one natschat image: GET /healthz on the service's port,
or, for the rpc service (RPC_GRPC_PORT set), the standard gRPC health check.

The same image runs gateway, presence, archive or rpc, so the port is the *_HTTP_PORT
that is set, else each service's default (gateway 8000, presence 8081, archive 8082, rpc
8083). Only one service runs per container, so the first port that answers is the one.
The slim image has no curl: the standard library, and grpcio for the gRPC check.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request

DEFAULT_PORTS = {
    "GATEWAY_HTTP_PORT": 8000,
    "PRESENCE_HTTP_PORT": 8081,
    "ARCHIVE_HTTP_PORT": 8082,
    "RPC_HTTP_PORT": 8083,
}


def ports() -> list[int]:
    explicit = [int(os.environ[k]) for k in DEFAULT_PORTS if os.environ.get(k)]
    return explicit or list(DEFAULT_PORTS.values())


def healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as resp:
            return bool(resp.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def grpc_serving(port: int) -> bool:
    """grpc.health.v1 says SERVING: the process is up and NATS answers."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=2
            )
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)
    except grpc.RpcError:
        return False


def main() -> int:
    if os.environ.get("RPC_GRPC_PORT"):
        return 0 if grpc_serving(int(os.environ["RPC_GRPC_PORT"])) else 1
    return 0 if any(healthy(port) for port in ports()) else 1


if __name__ == "__main__":
    sys.exit(main())
