"""Gateway wiring and lifecycle: NATS, the WebSocket endpoint, HTTP routes, shutdown.

Runs uvicorn inside our own event loop so that one place owns startup and SIGTERM:
stop accepting -> close every socket with 1001 (clients reconnect elsewhere and resume)
-> stop uvicorn -> drain NATS.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import math
from collections.abc import Awaitable, MutableMapping
from pathlib import Path
from typing import Any

import uvicorn
from chatlib import health, lifecycle, names, nats_wiring, validate
from chatlib.auth import Authenticator, AuthError, Identity, new_holder
from chatlib.guest_names import GuestNames, NameTaken, ensure_bucket
from chatlib.js_publisher import JetStreamPublisher
from chatlib.limits import KeyedBuckets
from chatlib.logs import setup_logging
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from starlette.datastructures import Headers
from starlette.staticfiles import StaticFiles

from gateway import frames, handlers, metrics, reauth, userstate
from gateway.admission import Admission, Ticket, TokenCache
from gateway.auth import content_security_policy, origin_allowed, security_headers
from gateway.batching import SharedRead
from gateway.fanout import Hub
from gateway.frames import FrameError
from gateway.presence import PresenceLink
from gateway.replay_cache import SharedReplay
from gateway.roster import Roster
from gateway.scope import PresenceScope, watch_list
from gateway.session import Session
from gateway.settings import GatewaySettings
from gateway.wsprotocol import SlimWebSocketProtocol

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).parent / "static"
WS_PATH = "/ws"
GC_GEN0_THRESHOLD = 20_000

Scope = dict[str, Any]
Receive = Any
Send = Any


class Gateway:
    name = "gateway"

    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings
        self.auth = Authenticator(settings)
        self.tokens = TokenCache(self.auth, settings.token_cache_ttl)
        self.admission = Admission(
            settings.hello_concurrency, settings.hello_queue, settings.hello_retry_after
        )
        self.accepting = False
        self.nc: NATS | None = None
        self.js: JetStreamContext | None = None
        self.hub: Hub | None = None
        self.publisher: JetStreamPublisher | None = None
        self.presence: PresenceLink | None = None
        self.user_events: userstate.UserEvents | None = None
        self.active: set[asyncio.Task[Any]] = set()
        self.sessions: set[Session] = set()
        self._chat_position: SharedRead[int] | None = None
        self.roster: Roster | None = None
        self.replay: SharedReplay | None = None
        self.scope: PresenceScope | None = None
        self._online_known: SharedRead[bool] | None = None
        self.guest_names: GuestNames | None = None

    # --- lifecycle ----------------------------------------------------------------------
    async def start(self, nc: NATS, js: JetStreamContext, instance: str) -> None:
        self.nc, self.js = nc, js
        self.hub = Hub(nc, js)
        s = self.settings
        self.publisher = JetStreamPublisher(nc, s.request_timeout, s.publish_max_in_flight)
        await self.publisher.start()
        self.replay = SharedReplay(
            js,
            self.settings.recovery_max_messages,
            self.settings.replay_cache_ttl,
            self.settings.replay_backfill,
        )
        self.hub.replay_log = self.replay
        await self.hub.start()
        self.user_events = userstate.UserEvents(nc, self.hub)
        await self.user_events.start()
        self.presence = PresenceLink(nc, instance, self.settings)
        await self.presence.start()
        self.roster = Roster(nc, js, self.settings, self.publisher)
        self.scope = PresenceScope(self.hub, self.roster, self.settings)
        await self.roster.start()
        self._chat_position = SharedRead(self._read_chat_position)
        self._online_known = SharedRead(self.roster.resync_online)
        if self.settings.auth_mode == "guest":
            s = self.settings
            kv = await ensure_bucket(js, s.guest_hold, s.stream_replicas)
            self.guest_names = GuestNames(js, kv, s.guest_hold, s.stream_replicas)
            self.guest_names.start(self._live_holds, self._hold_lost)
        self.accepting = True

    def _live_holds(self) -> list[tuple[str, str]]:
        return [(s.user, s.holder) for s in self.sessions if s.holder and not s.closing]

    def _hold_lost(self, name: str, holder: str) -> None:
        for session in list(self.sessions):
            if session.user == name and session.holder == holder:
                session.push(frames.error("name_taken", f"{name!r} is held by someone else"))
                session.close_soon(frames.CLOSE_UNAUTHORIZED, "name taken")

    async def _read_chat_position(self) -> int:
        assert self.js is not None
        return (await self.js.stream_info(names.STREAM_CHAT)).state.last_seq

    def ready(self) -> bool:
        return self.accepting and self.nc is not None and self.nc.is_connected

    async def stop_intake(self) -> None:
        self.accepting = False

    async def finish_inflight(self) -> None:
        """Close every socket with 'going away' (frames already queued go out first)."""
        await asyncio.gather(
            *(
                s.close(frames.CLOSE_GOING_AWAY, "server shutting down", flush=True)
                for s in list(self.sessions)
            ),
            return_exceptions=True,
        )
        if self.active:
            await asyncio.wait(set(self.active))

    async def close(self) -> None:
        if self.roster is not None:
            await self.roster.stop()
        if self.guest_names is not None:
            await self.guest_names.stop()
        if self.user_events is not None:
            await self.user_events.stop()
        if self.presence is not None:
            await self.presence.stop()
        if self.hub is not None:
            await self.hub.stop()
        if self.publisher is not None:
            await self.publisher.stop()

    def deps(self) -> handlers.Deps:
        assert self.nc is not None and self.js is not None and self.hub is not None
        assert self.publisher is not None
        return handlers.Deps(
            self.nc,
            self.js,
            self.hub,
            self.settings,
            self.publisher,
            scope=self.scope,
            auth=self.auth,
        )

    # --- the WebSocket ------------------------------------------------------------------
    async def websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.active.add(task)
        try:
            await self._websocket(scope, receive, send)
        finally:
            self.active.discard(task)

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        event = await receive()
        if event["type"] != "websocket.connect":
            return
        headers = Headers(scope=scope)
        allowed = origin_allowed(
            headers.get("origin"), headers.get("host"), self.settings.allowed_origins
        )
        if not allowed or not self.accepting:
            # Closing before accept makes the server answer the handshake with HTTP 403.
            log.info("websocket refused", extra={"origin": headers.get("origin")})
            await send({"type": "websocket.close", "code": frames.CLOSE_POLICY})
            return
        # Nothing reads the handshake headers past this point, and an open socket should
        # not keep them (~1 KiB each; issue 18: memory per idle connection).
        scope["headers"] = []
        del headers
        if self.admission.full():
            # Before the upgrade: the client learns when to come back without costing a
            # socket here (HTTP 503 + Retry-After, honoured by our clients' backoff).
            metrics.HELLO_REFUSED.inc()
            await send(_busy_response(self.admission.retry_after()))
            await send({"type": "websocket.http.response.body", "body": b"busy, retry later\n"})
            return
        ticket = self.admission.ticket()
        try:
            await send({"type": "websocket.accept"})
            await self._greet(receive, send, ticket)
        finally:
            ticket.done()

    async def _greet(self, receive: Receive, send: Send, ticket: Ticket) -> None:
        async def refuse(code: str, message: str) -> None:
            await send({"type": "websocket.send", "text": frames.error(code, message, "hello")})
            await send({"type": "websocket.close", "code": frames.CLOSE_UNAUTHORIZED})

        try:
            raw = await asyncio.wait_for(_receive_frame(receive), self.settings.hello_timeout)
        except TimeoutError:
            await refuse("unauthorized", "no hello within the time limit")
            return
        if raw is None:
            return
        try:
            hello = frames.parse(raw)
            if hello["type"] != "hello":
                raise FrameError("unauthorized", "the first frame must be hello")
            identity = await self.tokens.identify(hello.get("token"))
            await self._hold_name(identity)
        except (FrameError, AuthError) as exc:
            await refuse("unauthorized", str(exc))
            return
        except NameTaken:
            await refuse("name_taken", f"{identity.user!r} is held by someone else")
            return
        await ticket.turn()
        session = Session(identity.user, send, self.settings)
        session.holder = identity.holder
        # Issue 14: may this user delete anyone's message (a role in the hello's token)?
        session.operator = await reauth.is_operator(
            self.auth, hello.get("token"), self.settings.operator_role
        )
        self.sessions.add(session)
        reauth.schedule_expiry(session, identity.expires_at)
        try:
            await self._run_session(session, hello, ticket)
            # The socket may stay open for hours: its frames should not keep the hello
            # (token, rooms) alive meanwhile (issue 18).
            del hello, raw
            await self._receive_frames(session, receive)
        finally:
            reauth.cancel_expiry(session)
            self.sessions.discard(session)
            await self.deps().hub.remove(session)
            if self.scope is not None:
                self.scope.forget(session)
            if self.presence is not None:
                self.presence.closed(session.id, session.user)
            await session.finished()
            metrics.CONNECTIONS.dec()

    async def _hold_name(self, identity: Identity) -> None:
        """Guest mode: the token's name reservation must be its own (taken back if it
        lapsed while the name is free). NameTaken if someone else holds the name."""
        if self.guest_names is None or not identity.holder:
            return
        try:
            await self.guest_names.reserve(identity.user, identity.holder)
        except NameTaken:
            raise
        except Exception as exc:  # fail closed: no socket without its reservation
            log.warning("cannot check guest name %s: %s", identity.user, exc)
            raise AuthError("guest names are unavailable right now; try again") from exc

    async def _run_session(self, session: Session, hello: dict[str, Any], ticket: Ticket) -> None:
        metrics.CONNECTIONS.inc()
        deps = self.deps()
        rooms, problems = _hello_rooms(hello)
        resume = hello.get("resume_seq")
        if resume is not None and (
            not isinstance(resume, int) or isinstance(resume, bool) or resume < 0
        ):
            problems.append(FrameError("bad_frame", "resume_seq must be an integer >= 0"))
            resume = None
        batch = hello.get("presence_batch", False)
        if not isinstance(batch, bool):
            problems.append(FrameError("bad_frame", "presence_batch must be true or false"))
            batch = False
        watch: list[str] = []
        if "watch" in hello:
            try:
                watch = watch_list(hello["watch"], self.settings.watch_max, "hello")
            except FrameError as exc:
                problems.append(exc)
        # The user's stored rooms and counts: one request to the archive (userstate.py).
        state = await userstate.load_state(deps, session.user, rooms)
        rooms += [room for room in state.rooms if room not in rooms]
        # Live subscriptions first (buffered in the session), then the snapshot: every
        # message after the snapshot arrives live, everything before it is replayed.
        await deps.hub.add(session, rooms)
        assert self.scope is not None and self.roster is not None
        if batch:
            self.scope.batch(session)
        for room in rooms:
            self.scope.joined(session, room)
        self.scope.set_watch(session, watch)
        # Both reads are shared with the hellos arriving at the same time (SharedRead).
        assert self._chat_position is not None and self._online_known is not None
        try:
            snapshot: int | None = await self._chat_position.get()
        except Exception as exc:
            log.warning("cannot read the chat log position: %s", exc)
            snapshot = None
        # Presence never answered since we started (it may be starting): ask it now.
        known = self.roster.online_known or await self._online_known.get()
        online = self.scope.welcome_online(session) if known else None
        await userstate.store_hello_rooms(deps, session.user, state, sorted(session.rooms))
        unread = await userstate.welcome_unread(
            deps, session.user, sorted(session.rooms), state, snapshot
        )
        welcome: dict[str, Any] = {
            "type": "welcome",
            "v": frames.VERSION,
            "user": session.user,
            "rooms": sorted(session.rooms),
            # Scoped (gateway/scope.py); includes ourselves, reported just after this.
            "online": online if online is not None else [],
            "seq": snapshot or 0,
        }
        if unread is not None:
            # Exact up to `seq` (README: "User state"); absent when the archive is down.
            welcome["unread"] = unread
            welcome["unread_cap"] = userstate.UNREAD_CAP
        session.push(frames.dumps(welcome))
        if online is None:
            problems.append(FrameError("presence_unavailable", "who is online is unknown"))
        for problem in problems:
            session.push(frames.error(problem.code, problem.message, problem.ref or "hello"))
        if resume is not None and snapshot is not None:
            await self._replay(session, resume, snapshot)
        else:
            if resume is not None:
                session.push(frames.dumps({"type": "resumed", "replayed": 0, "complete": False}))
            session.end_buffering(snapshot or 0)
        ticket.done()  # greeted: the next hello may be answered
        if self.presence is not None:
            self.presence.opened(session.id, session.user)

    async def _receive_frames(self, session: Session, receive: Receive) -> None:
        """Act on the client's frames until it goes away (in its own frame: an idle socket
        keeps only this, not what the welcome was built from)."""
        deps = self.deps()
        while True:
            # receive() directly, not _receive_frame: one coroutine frame less held by
            # every idle socket (issue 18).
            event = await receive()
            if event["type"] == "websocket.disconnect":
                return
            if event["type"] != "websocket.receive":
                continue
            text = event.get("text")
            raw = text if text is not None else (event.get("bytes") or b"")
            if session.closing:
                continue  # being closed (slow, abusive, shutdown): act on nothing more
            close_code = await handlers.handle_raw(raw, session, deps)
            if close_code is not None:
                metrics.ABUSE_DISCONNECTS.inc()
                await session.close(close_code, "too many violations", flush=True)

    async def _replay(self, session: Session, resume: int, snapshot: int) -> None:
        """Replay what the client missed (shared with every client resuming alongside, see
        replay_cache.py), merged in seq order with the live messages held meanwhile, then
        `resumed`; live frames follow."""
        assert self.replay is not None
        replayed: list[tuple[int, str]] = []
        complete = False
        try:
            result = await self.replay.replay(
                session.user,
                sorted(session.rooms),
                resume,
                snapshot,
                self.settings.recovery_max_messages,
            )
        except Exception as exc:
            log.warning("recovery replay failed: %s", exc, extra={"user": session.user})
            session.end_buffering(snapshot)  # what was missed is not sent twice
        else:
            replayed = [(m.seq, m.for_user(session.user)) for m in result.messages]
            complete = result.complete
            session.end_buffering(result.after, replayed)
        metrics.REPLAYED.inc(len(replayed))
        session.push(
            frames.dumps({"type": "resumed", "replayed": len(replayed), "complete": complete})
        )


async def _receive_frame(receive: Receive) -> str | bytes | None:
    """The next data frame; None once the client is gone."""
    while True:
        event = await receive()
        if event["type"] == "websocket.receive":
            text = event.get("text")
            return text if text is not None else (event.get("bytes") or b"")
        if event["type"] == "websocket.disconnect":
            return None


def _busy_response(retry_after: int) -> dict[str, Any]:
    return {
        "type": "websocket.http.response.start",
        "status": 503,
        "headers": [(b"retry-after", str(retry_after).encode())],
    }


def _hello_rooms(hello: dict[str, Any]) -> tuple[list[str], list[FrameError]]:
    rooms, problems = [frames.LOBBY], []
    requested = hello.get("rooms") or []
    if not isinstance(requested, list):
        return rooms, [FrameError("bad_frame", "rooms must be a list of room names", "hello")]
    for room in requested:
        if not validate.is_valid_name(room):
            problems.append(
                FrameError("bad_room", f"room name must be {validate.NAME_RULE}", str(room)[:64])
            )
        elif room not in rooms:
            rooms.append(room)
    return rooms, problems


# --- HTTP --------------------------------------------------------------------------------
def build_app(gateway: Gateway) -> Any:
    settings = gateway.settings
    api = FastAPI(title="natschat gateway", docs_url=None, redoc_url=None, openapi_url=None)
    guest_buckets = KeyedBuckets(settings.guest_per_minute / 60, settings.guest_burst)

    @api.get("/")
    async def index() -> Response:
        page = STATIC_DIR / "index.html"
        if not page.is_file():
            return PlainTextResponse("the web page is not installed\n", status_code=503)
        return FileResponse(page, headers={"Cache-Control": "no-cache"})

    @api.get("/api/config")
    async def config() -> dict[str, Any]:
        return {
            "version": frames.VERSION,
            "auth_mode": settings.auth_mode,
            **_oidc_config(settings),
            "limits": {
                "max_content_bytes": settings.max_content_bytes,
                "max_frame_bytes": settings.max_frame_bytes,
                "rate_per_second": settings.rate_per_second,
                "rate_burst": settings.rate_burst,
                "read_rate_per_second": settings.read_rate_per_second,
                "read_rate_burst": settings.read_rate_burst,
            },
        }

    @api.get("/api/admission")
    async def admission() -> Response:
        # What a page whose WebSocket never opened asks: browsers cannot read the status
        # or Retry-After of a refused handshake (static/backoff.js).
        if gateway.admission.full():
            retry = str(gateway.admission.retry_after())
            body = _http_error("busy", "too many connections being set up; retry later")
            return JSONResponse(body, status_code=503, headers={"Retry-After": retry})
        return JSONResponse({"busy": False}, headers={"Cache-Control": "no-store"})

    @api.post("/api/guest")
    async def guest(request: Request) -> Response:
        if settings.auth_mode != "guest":
            return JSONResponse(_http_error("not_found", "guest mode is off"), status_code=404)
        try:
            body = await request.json()
        except ValueError:
            body = None
        name = body.get("name") if isinstance(body, dict) else None
        if not validate.is_valid_name(name):
            message = f"name must be {validate.NAME_RULE}"
            return JSONResponse(_http_error("bad_user", message), status_code=400)
        address = request.client.host if request.client else "unknown"
        wait = guest_buckets.take(address)
        if wait > 0:
            retry = max(1, math.ceil(wait))
            metrics.GUEST_RATE_LIMITED.inc()
            message = f"too many guest sign-ins from this address; try again in {retry} s"
            return JSONResponse(
                _http_error("rate_limited", message),
                status_code=429,
                headers={"Retry-After": str(retry)},
            )
        holder = new_holder()
        try:
            if gateway.guest_names is None:
                raise RuntimeError("not started")
            await gateway.guest_names.reserve(str(name), holder)
        except NameTaken:
            message = f"{name!r} is in use; pick another name"
            return JSONResponse(_http_error("name_taken", message), status_code=409)
        except Exception as exc:
            log.warning("cannot reserve guest name %s: %s", name, exc)
            message = "guest names are unavailable right now; try again"
            return JSONResponse(_http_error("unavailable", message), status_code=503)
        token, expires_at = gateway.auth.issue_guest(str(name), holder=holder)
        return JSONResponse(
            {"token": token, "user": name, "expires_at": expires_at},
            headers={"Cache-Control": "no-store"},
        )

    for path in health.HEALTH_PATHS:

        async def probe(request: Request) -> Response:
            status, ctype, body = health.probe_response(request.url.path, gateway.ready)
            return Response(body, status_code=status, media_type=ctype)

        api.add_api_route(path, probe, methods=["GET"], include_in_schema=False)

    api.mount("/static", StaticFiles(directory=STATIC_DIR, check_dir=False), name="static")

    csp = content_security_policy(settings.oidc_issuer if settings.auth_mode == "oidc" else "")

    def app(scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        # The chat socket bypasses the framework: it needs uvicorn's own send (to cut a
        # stuck connection) and nothing of routing. Returned, not awaited here: an open
        # socket then holds no coroutine frame of this dispatch (issue 18).
        if scope["type"] == "websocket" and scope["path"] == WS_PATH:
            return gateway.websocket(scope, receive, send)
        return framework(scope, receive, send)

    async def framework(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            forwarded = Headers(scope=scope).get("x-forwarded-proto", "")
            https = scope.get("scheme") == "https" or forwarded == "https"
            extra = security_headers(csp, https, settings.hsts_max_age)

            async def send_with_headers(event: MutableMapping[str, Any]) -> None:
                if event["type"] == "http.response.start":
                    event = {**event, "headers": [*event.get("headers", []), *extra]}
                await send(event)

            await api(scope, receive, send_with_headers)
        else:
            await api(scope, receive, send)

    return app


def _oidc_config(settings: GatewaySettings) -> dict[str, Any]:
    """What the page needs to sign in with the OIDC provider (public values only)."""
    if settings.auth_mode != "oidc":
        return {}
    return {
        "oidc": {
            "issuer": settings.oidc_issuer,
            "client_id": settings.oidc_client_id,
            "scopes": settings.oidc_scopes,
            "username_claim": settings.oidc_username_claim,
        }
    }


def _http_error(code: str, message: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message}}


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: our loop owns SIGTERM/SIGINT."""

    @contextlib.contextmanager
    def capture_signals(self) -> Any:
        yield


async def serve(settings: GatewaySettings) -> None:
    gateway = Gateway(settings)
    ident = nats_wiring.instance_id(settings, gateway.name)
    stop = asyncio.Event()
    lifecycle.stop_on_signals(stop)
    nc = await nats_wiring.connect(settings, ident)
    js = nc.jetstream()
    await nats_wiring.provision(js, settings)
    await gateway.start(nc, js, ident)
    config = uvicorn.Config(
        build_app(gateway),
        host=settings.http_host,
        port=settings.http_port,
        interface="asgi3",  # `app` returns its coroutine (not detectable as ASGI 3)
        ws=SlimWebSocketProtocol,  # uvicorn's websockets-sansio, slimmed per socket
        ws_max_size=settings.hard_frame_bytes or 2 * settings.max_frame_bytes,
        ws_per_message_deflate=settings.ws_compression,
        forwarded_allow_ips=settings.forwarded_allow_ips,
        access_log=False,  # tokens never go in URLs, but keep request logs out anyway
        lifespan="off",
        log_config=None,
        server_header=False,
        backlog=settings.http_backlog,
    )
    server = _Server(config)
    _tune_gc()
    server_task = asyncio.create_task(server.serve())
    log.info("gateway started", extra={"instance": ident, "port": settings.http_port})
    stop_task = asyncio.create_task(stop.wait())
    await asyncio.wait({server_task, stop_task}, return_when=asyncio.FIRST_COMPLETED)
    log.info("gateway stopping")
    # 1. Stop accepting sockets (/readyz turns 503 so load balancers move on).
    await gateway.stop_intake()
    # 2. Close every socket with 1001 so clients reconnect elsewhere and resume.
    try:
        await asyncio.wait_for(gateway.finish_inflight(), settings.drain_timeout)
    except TimeoutError:
        log.warning("sockets not closed within %.1fs", settings.drain_timeout)
    # 3. Stop the HTTP server.
    server.should_exit = True
    with contextlib.suppress(Exception):
        await asyncio.wait_for(server_task, settings.drain_timeout)
    stop_task.cancel()
    await gateway.close()
    # 4. Drain NATS last: presence 'closed' events and pending publishes go out.
    await nats_wiring.close(nc, settings.drain_timeout)
    log.info("gateway stopped")


def _tune_gc() -> None:
    """Each socket is a few hundred long-lived objects; with the default thresholds the
    cyclic GC walks all of them every few hundred allocations (a pause per handshake
    burst, and a latency tail). Move what startup built out of its sight, and collect the
    young generation less often (garbage here is mostly acyclic: freed by refcounting)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_GEN0_THRESHOLD, 20, 50)


def main() -> None:
    settings = GatewaySettings()
    setup_logging("gateway", settings.log_level)
    lifecycle.run_main(lambda: serve(settings))
