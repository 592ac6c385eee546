"""Waiting for tasks to end without a thread, connection or polling loop per waiter.

One pub/sub connection per gateway process carries every notification: whole finished tasks on
the process's reply channel (predict), and bare task ids on task channels (long-polls, cancels,
and a streaming task's chunks, which open streams watch).
Each waiter is a future. A message can be lost (a reconnect, a subscription that raced the end of
the task), so a waiter that times out re-reads the task before it answers, and every reconnect
re-reads every task still waited on. A task whose record vanishes with no message at all
(`rq empty`) is found by a sweep that checks every WAIT_EXISTS_INTERVAL_S that the admitted
tasks waited on still exist.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator
from typing import Any, Protocol

import redis.asyncio as aioredis
from redis.asyncio.client import PubSub
from redis.exceptions import RedisError

from runq.queue import constants
from runq.queue.replies import Ended, read_reply
from runq.queue.store import TaskStore
from runq.queue.tasks import TERMINAL

logger = logging.getLogger("runq.waiter")

RECONNECT_DELAY_S = 0.5


class Interruption(Protocol):
    """What may end a wait before its time by settling its future (the caller hung up)."""

    def arm(self, future: asyncio.Future[Any]) -> None: ...

    def disarm(self) -> None: ...


class TaskWaiter:
    def __init__(self, redis: aioredis.Redis, store: TaskStore) -> None:
        self._redis = redis
        self._store = store
        self.reply_channel = constants.REPLY_CHANNEL_PREFIX + uuid.uuid4().hex
        self._waiting: dict[str, set[asyncio.Future[Ended]]] = defaultdict(set)
        self._channel_refs: dict[str, int] = {}
        self._confirmations: dict[str, list[asyncio.Future[None]]] = defaultdict(list)
        # Tasks waited on that are known to have been admitted, with how many wait on each: only
        # these are swept, since a predict's task has no record until its enqueue returns.
        self._admitted: dict[str, int] = defaultdict(int)
        # Open streams' events, set whenever their task's channel speaks (watch).
        self._watchers: dict[str, set[asyncio.Event]] = defaultdict(set)
        self._pubsub: PubSub | None = None
        self._listener: asyncio.Task[None] | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()
        self.connected = asyncio.Event()

    # lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Starts listening; `connected` is set once the reply channel is subscribed."""
        self._listener = asyncio.create_task(self._listen(), name="runq-waiter")
        self._sweeper = asyncio.create_task(self._sweep(), name="runq-waiter-sweep")

    async def stop(self) -> None:
        for loop in (self._listener, self._sweeper):
            if loop is not None:
                loop.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await loop
        for task in list(self._background):
            task.cancel()
        if self._pubsub is not None:
            with contextlib.suppress(RedisError, OSError):
                await self._pubsub.aclose()

    # waiting -------------------------------------------------------------------------------

    def expect(self, task_id: str) -> asyncio.Future[Ended]:
        """A future for a task whose reply channel is this process's; register before enqueue."""
        future: asyncio.Future[Ended] = asyncio.get_running_loop().create_future()
        self._waiting[task_id].add(future)
        return future

    def forget(self, task_id: str, future: asyncio.Future[Ended]) -> None:
        futures = self._waiting.get(task_id)
        if futures is not None:
            futures.discard(future)
            if not futures:
                del self._waiting[task_id]

    async def wait(
        self,
        task_id: str,
        future: asyncio.Future[Ended],
        timeout_s: float,
        interruption: Interruption | None = None,
    ) -> Ended | None:
        """The ended task, or its latest state at the timeout (None if it no longer exists);
        raises what ``interruption`` settles the future with."""
        # A timer that ends the wait with a marker costs less than asyncio.wait or wait_for
        # (a waiter future and callbacks, or a task) on predict's hottest await.
        timer = asyncio.get_running_loop().call_later(timeout_s, _expire, future)
        self._admitted[task_id] += 1
        if interruption is not None:
            interruption.arm(future)
        try:
            task = await future
        finally:
            timer.cancel()
            if interruption is not None:
                interruption.disarm()
            self.forget(task_id, future)
            self._unadmit(task_id)
        if task is not _EXPIRED:
            return task
        return await self._store.read(task_id, with_output=True)

    async def wait_any(
        self,
        task_id: str,
        timeout_s: float,
        interruption: Interruption | None = None,
        *,
        tenant: str | None = None,
    ) -> Ended | None:
        """Long-poll a task whatever gateway submitted it, through its own channel; None if
        there is none, or (``tenant`` given) it is another tenant's, which is not waited on."""
        channel = constants.task_channel(task_id)
        future = self.expect(task_id)
        try:
            await self._subscribe(channel)
            # Read only once the subscription is live, so an end between the two is not missed.
            task = await self._store.read(task_id, with_output=True)
            if task is not None and tenant is not None and task["tenant"] != tenant:
                task = None
            if task is None or task["status"] in TERMINAL or timeout_s <= 0:
                self.forget(task_id, future)
                return task
            return await self.wait(task_id, future, timeout_s, interruption)
        finally:
            self.forget(task_id, future)
            await self._unsubscribe(channel)

    @contextlib.asynccontextmanager
    async def watch(self, task_id: str) -> AsyncIterator[asyncio.Event]:
        """An event set whenever the task may have changed: a chunk or progress appended, its
        end, a cancel or delete, a reconnect (messages may have been lost), or its record
        found gone. Subscribed before it is yielded, so a read after that misses nothing; the
        watcher clears it before each read."""
        channel = constants.task_channel(task_id)
        changed = asyncio.Event()
        self._watchers[task_id].add(changed)
        self._admitted[task_id] += 1
        try:
            await self._subscribe(channel)
            yield changed
        finally:
            watchers = self._watchers[task_id]
            watchers.discard(changed)
            if not watchers:
                del self._watchers[task_id]
            self._unadmit(task_id)
            await self._unsubscribe(channel)

    def _wake(self, task_id: str) -> None:
        for changed in self._watchers.get(task_id, ()):
            changed.set()

    def _unadmit(self, task_id: str) -> None:
        self._admitted[task_id] -= 1
        if not self._admitted[task_id]:
            del self._admitted[task_id]

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(constants.WAIT_EXISTS_INTERVAL_S)
            if not self._admitted:
                continue
            try:
                gone = await self._store.missing(list(self._admitted))
            except (RedisError, OSError) as exc:
                # The listener reconnects and re-reads; the next sweep tries again.
                logger.debug("cannot check waited-on tasks (%s)", exc)
                continue
            for task_id in gone:
                self._resolve(task_id, None)

    # pub/sub -------------------------------------------------------------------------------

    async def _connect(self) -> None:
        pubsub = self._redis.pubsub()
        channels = [self.reply_channel, *self._channel_refs]
        confirmed = [self._confirmation(channel) for channel in channels]
        await pubsub.subscribe(*channels)
        # Confirmations arrive through the listener; before it runs, read them here.
        while not all(f.done() for f in confirmed):
            message = await pubsub.get_message(timeout=5.0)
            if message is None:
                raise RedisError("no subscription confirmation within 5 s")
            self._handle(message)
        self._pubsub = pubsub
        self.connected.set()

    async def _listen(self) -> None:
        while True:
            await self._connect_until_up()
            assert self._pubsub is not None
            try:
                while True:
                    message = await self._pubsub.get_message(timeout=None)
                    if message is not None:
                        self._handle(message)
            except (RedisError, OSError) as exc:
                self.connected.clear()
                logger.warning("reply subscription lost (%s); reconnecting", exc)

    async def _connect_until_up(self) -> None:
        if self._pubsub is not None:
            with contextlib.suppress(RedisError, OSError):
                await self._pubsub.aclose()
            self._pubsub = None
        while True:
            try:
                await self._connect()
            except (RedisError, OSError) as exc:
                logger.warning("cannot subscribe to replies (%s); retrying", exc)
                await asyncio.sleep(RECONNECT_DELAY_S)
                continue
            break
        # Notifications sent while disconnected are gone: re-read every task still waited on.
        for task_id in list(self._waiting):
            self._spawn(self._refresh(task_id))
        for task_id in list(self._watchers):
            self._wake(task_id)

    def _handle(self, message: dict[str, Any]) -> None:
        kind = message["type"]
        if kind == "subscribe":
            channel = message["channel"].decode()
            for future in self._confirmations.pop(channel, []):
                if not future.done():
                    future.set_result(None)
        elif kind == "message":
            data: bytes = message["data"]
            if b" " in data:
                # A worker's batch: every task of it this gateway waits on, in one message.
                for task_id, ended in read_reply(data):
                    self._resolve(task_id, ended)
            else:
                # A bare task id: it changed, read it.
                task_id = data.decode()
                if task_id in self._waiting:
                    self._spawn(self._refresh(task_id))
                if task_id in self._watchers:
                    self._wake(task_id)

    async def _refresh(self, task_id: str) -> None:
        task = await self._store.read(task_id, with_output=True)
        if task is None or task["status"] in TERMINAL:
            self._resolve(task_id, task)

    def _resolve(self, task_id: str, task: Ended | None) -> None:
        self._wake(task_id)
        for future in self._waiting.pop(task_id, ()):
            if not future.done():
                future.set_result(task)  # type: ignore[arg-type]

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _confirmation(self, channel: str) -> asyncio.Future[None]:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._confirmations[channel].append(future)
        return future

    async def _subscribe(self, channel: str) -> None:
        refs = self._channel_refs.get(channel, 0)
        self._channel_refs[channel] = refs + 1
        if refs:
            return
        confirmed = self._confirmation(channel)
        await self.connected.wait()
        assert self._pubsub is not None
        await self._pubsub.subscribe(channel)
        await confirmed

    async def _unsubscribe(self, channel: str) -> None:
        refs = self._channel_refs.pop(channel, 0) - 1
        if refs > 0:
            self._channel_refs[channel] = refs
            return
        if self._pubsub is not None and self.connected.is_set():
            with contextlib.suppress(RedisError, OSError):
                await self._pubsub.unsubscribe(channel)


# What a wait's future holds when its time ran out first.
_EXPIRED: Ended = {}


def _expire(future: asyncio.Future[Ended]) -> None:
    if not future.done():
        future.set_result(_EXPIRED)
