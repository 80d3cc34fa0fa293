"""Background tasks a service cannot do without.

A task that ends with an error is logged with its traceback and marks the service failed:
/healthz then answers 503, so the orchestrator restarts the container. Without this a dead
task is silent: the process answers its probes and does nothing, forever.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

log = logging.getLogger(__name__)


class CriticalTasks:
    def __init__(self) -> None:
        self.failure: str | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, work: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        task = asyncio.create_task(work, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if task.cancelled() or task.exception() is None:
            return  # cancelled or finished by a stop: nothing went wrong
        exc = task.exception()
        self.failure = f"{task.get_name()} died: {exc!r}"
        log.error(
            "background task %s died; /healthz fails from now on so the process is restarted",
            task.get_name(),
            exc_info=exc,
        )

    def alive(self) -> bool:
        return self.failure is None

    def cancel(self, name: str | None = None) -> None:
        """Cancel the task called `name`, or all of them."""
        for task in list(self._tasks):
            if name is None or task.get_name() == name:
                task.cancel()

    async def stop(self) -> None:
        """Cancel all and wait until they are gone."""
        running = list(self._tasks)
        self.cancel()
        await asyncio.gather(*running, return_exceptions=True)
