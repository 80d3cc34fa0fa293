"""Exit codes and the errors that map to them: a script calling chatctl branches on these."""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    RUNTIME = 1  # the request reached a service, which refused or failed it
    USAGE = 2  # bad arguments: an invalid room/user/subject/type name
    UNREACHABLE = 3  # NATS could not be reached (or refused our credentials)
    UNAVAILABLE = 4  # NATS is up but nothing answers: service or stream missing


class ChatError(Exception):
    """An error the client library raises; `exit_code` is what chatctl exits with."""

    exit_code = ExitCode.RUNTIME


class UsageError(ChatError):
    exit_code = ExitCode.USAGE


class NatsUnreachable(ChatError):
    exit_code = ExitCode.UNREACHABLE


class ServiceUnavailable(ChatError):
    exit_code = ExitCode.UNAVAILABLE


class IdempotencyConflict(ChatError):
    """A client_id reused, within the duplicate window, for a different message (another
    target or content): nothing was stored. Use a new client_id for a new message."""


class ServiceError(ChatError):
    """A micro service answered with Nats-Service-Error / Nats-Service-Error-Code."""

    def __init__(self, service: str, code: int, description: str) -> None:
        super().__init__(f"{service} error {code}: {description}")
        self.service = service
        self.code = code
        self.description = description
        # 503 means the service is up but its backend (e.g. Postgres) is not.
        self.exit_code = ExitCode.UNAVAILABLE if code == 503 else ExitCode.RUNTIME
