"""Wiring and lifecycle of the rpc service: a grpc.aio server with ChatService (the
handlers in rpc.handlers, on betterproto2 messages decoded by chatlib.codec), the
standard health service (SERVING only while NATS answers) and server reflection."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from chatctl.client import ChatClient
from chatlib import codec
from chatlib.auth import Authenticator
from chatlib.guest_names import GuestNames, ensure_bucket
from chatlib.proto.chat import v1 as pb
from chatlib.proto.google_proto_descriptor_pool import default_google_proto_descriptor_pool
from chatlib.tasks import CriticalTasks
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from rpc import handlers, metrics
from rpc.handlers import Deps, Limiter, Refused
from rpc.settings import RpcSettings

log = logging.getLogger(__name__)

SERVICE = "chat.v1.ChatService"
# How often the health status follows the NATS connection.
HEALTH_EVERY_S = 0.5


def _decoder(cls: type[Any]) -> Callable[[bytes], Any]:
    def decode(data: bytes) -> Any:
        # Raising here would make grpc answer INTERNAL; the handler says INVALID_ARGUMENT.
        try:
            return codec.decode_as(cls, data)
        except codec.DecodeError as exc:
            return _Undecodable(str(exc))

    return decode


class _Undecodable:
    """A request that is not valid protobuf for its method: INVALID_ARGUMENT."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


def _unary(
    method: str, handler: Callable[[Any, Any, Deps], Awaitable[Any]], deps: Deps
) -> Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]:
    async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            if isinstance(request, _Undecodable):
                raise Refused(grpc.StatusCode.INVALID_ARGUMENT, request.reason)
            reply = await handler(request, context, deps)
        except Refused as exc:
            metrics.CALLS.labels(method, exc.code.name).inc()
            await context.abort(exc.code, exc.details)
        metrics.CALLS.labels(method, "OK").inc()
        return reply

    return call


def _streaming(
    method: str, deps: Deps
) -> Callable[[Any, grpc.aio.ServicerContext], AsyncIterator[Any]]:
    async def call(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        try:
            if isinstance(request, _Undecodable):
                raise Refused(grpc.StatusCode.INVALID_ARGUMENT, request.reason)
            async for item in handlers.stream_messages(request, context, deps):
                yield item
        except Refused as exc:
            metrics.CALLS.labels(method, exc.code.name).inc()
            await context.abort(exc.code, exc.details)

    return call


def chat_service_handler(deps: Deps) -> grpc.GenericRpcHandler:
    def unary(
        cls: type[Any], handler: Callable[[Any, Any, Deps], Awaitable[Any]], name: str
    ) -> Any:
        return grpc.unary_unary_rpc_method_handler(
            _unary(name, handler, deps), request_deserializer=_decoder(cls),
            response_serializer=bytes,
        )  # fmt: skip

    return grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "SendMessage": unary(pb.ChatMessage, handlers.send_message, "SendMessage"),
            "GetHistory": unary(pb.HistoryRequest, handlers.get_history, "GetHistory"),
            "ListOnline": unary(pb.WhoRequest, handlers.list_online, "ListOnline"),
            "StreamMessages": grpc.unary_stream_rpc_method_handler(
                _streaming("StreamMessages", deps),
                request_deserializer=_decoder(pb.StreamRequest),
                response_serializer=bytes,
            ),
        },
    )


class RpcService:
    name = "rpc"

    def __init__(self, settings: RpcSettings) -> None:
        self.settings = settings
        self.nc: NATS | None = None
        self.server: grpc.aio.Server | None = None
        self.health = health.aio.HealthServicer()
        self.deps: Deps | None = None
        self.tasks = CriticalTasks()
        self.port = 0  # the bound port (settings.grpc_port, or the one picked for 0)

    async def start(self, nc: NATS, js: JetStreamContext) -> None:
        self.nc = nc
        s = self.settings
        client = ChatClient(nc, request_timeout=s.request_timeout)
        self.deps = Deps(client, Authenticator(s), Limiter(s), s)
        if s.auth_mode == "guest":
            kv = await ensure_bucket(js, s.guest_hold, s.stream_replicas)
            self.deps.guest_names = GuestNames(js, kv, s.guest_hold, s.stream_replicas)
        self.server = grpc.aio.server()
        self.server.add_generic_rpc_handlers([chat_service_handler(self.deps)])
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        service_names = [
            SERVICE,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ]
        reflection.enable_server_reflection(
            service_names, self.server, pool=default_google_proto_descriptor_pool
        )
        self.port = self.server.add_insecure_port(f"{s.grpc_host}:{s.grpc_port}")
        await self.server.start()
        self.tasks.spawn(self._follow_nats(), name="rpc-health")
        log.info("gRPC %s on %s:%d", SERVICE, s.grpc_host, self.port)

    async def _follow_nats(self) -> None:
        """grpc.health.v1 says SERVING only while NATS answers and we are not stopping."""
        status = health_pb2.HealthCheckResponse
        while True:
            serving = self.ready()
            value = status.SERVING if serving else status.NOT_SERVING
            await self.health.set("", value)
            await self.health.set(SERVICE, value)
            await asyncio.sleep(HEALTH_EVERY_S)

    async def on_nats_state(self, state: str) -> None:
        if state == "disconnected" and self.deps is not None:
            self.deps.lost_connection()

    def ready(self) -> bool:
        connected = self.nc is not None and self.nc.is_connected
        return connected and self.deps is not None and not self.deps.stopping.is_set()

    def alive(self) -> bool:
        return self.tasks.alive()

    async def stop_intake(self) -> None:
        """Health turns NOT_SERVING and open streams end (UNAVAILABLE, with the last seq
        to resume from); in-flight unary calls go on."""
        if self.deps is not None:
            self.deps.stopping.set()
        await self.tasks.stop()
        await self.health.enter_graceful_shutdown()

    async def finish_inflight(self) -> None:
        """Refuse new calls and let the in-flight ones finish (up to DRAIN_TIMEOUT)."""
        if self.server is not None:
            await self.server.stop(grace=self.settings.drain_timeout)

    async def close(self) -> None:
        return None
