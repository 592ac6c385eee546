"""The floor under runq's predict: bare_echo.py's app with a Redis queue between it and a worker.

Each request's input goes onto one Redis list (RPUSH [id, reply channel, input]) and comes back
on the gateway's pub/sub channel; a worker process BLPOPs the list, takes up to a batch more
with LPOP, and PUBLISHes each answer. That is all: no task record, no leases or caps, no
scripts, no metrics or logs. So what this adds over bare FastAPI is what a plain Redis-list
queue and a separate worker process cost between HTTP and the model on this machine, written
with redis-py (two more processes woken; at c=1 six more one-way loopback hops, and three
round trips for the worker as runq's has), and what runq adds over this is what its guarantees
and RQ's layout cost. It does not batch its admissions, so under load its tail is long.
benchmarks/run.py prints both.

Served as bare_echo.py is (uvicorn, one process, the same settings), on runq's embedded Valkey.

    python benchmarks/queue_floor.py gateway --port 8002
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from contextlib import ExitStack, asynccontextmanager, suppress
from typing import Any

import redis
import redis.asyncio as aioredis
from bare_echo import EchoIn, serve
from fastapi import FastAPI
from harness import stop_on_sigterm

from runq.embedded import EmbeddedValkey

QUEUE = "floor:queue"
BATCH = 64


def build_app(redis_url: str) -> FastAPI:
    reply_channel = f"floor:reply:{uuid.uuid4().hex}"
    waiting: dict[str, asyncio.Future[Any]] = {}
    client = aioredis.Redis.from_url(redis_url)

    async def listen(subscribed: asyncio.Event) -> None:
        async with client.pubsub() as pubsub:
            await pubsub.subscribe(reply_channel)
            subscribed.set()
            async for message in pubsub.listen():
                if message["type"] == "message":
                    task_id, output = json.loads(message["data"])
                    future = waiting.pop(task_id, None)
                    if future is not None and not future.done():
                        future.set_result(output)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        subscribed = asyncio.Event()
        listener = asyncio.create_task(listen(subscribed))
        await subscribed.wait()
        yield
        listener.cancel()
        await client.aclose()

    app = FastAPI(lifespan=lifespan)

    @app.post("/echo")
    async def echo(body: EchoIn) -> dict[str, Any]:
        task_id = uuid.uuid4().hex
        future = asyncio.get_running_loop().create_future()
        waiting[task_id] = future
        try:
            await client.rpush(QUEUE, json.dumps([task_id, reply_channel, body.input]))
            return {"output": await future}
        finally:
            waiting.pop(task_id, None)

    return app


def work(redis_url: str) -> None:
    connection = redis.Redis.from_url(redis_url)
    while True:
        popped = connection.blpop([QUEUE], timeout=1)
        if popped is None:
            continue
        raws = [popped[1], *(connection.lpop(QUEUE, BATCH - 1) or [])]
        with connection.pipeline(transaction=False) as pipe:
            for raw in raws:
                task_id, channel, payload = json.loads(raw)
                pipe.publish(channel, json.dumps([task_id, payload]))
            pipe.execute()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # The word after this file's name is the process's role for benchmarks/cost.py.
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("gateway").add_argument("--port", type=int, required=True)
    commands.add_parser("worker").add_argument("redis_url")
    args = parser.parse_args()
    if args.command == "worker":
        work(args.redis_url)
        return
    # uvicorn raises the signal that stopped it again once it has: as an exception here, so that
    # the worker and Valkey are stopped too.
    stop_on_sigterm()
    with ExitStack() as stack:
        valkey = EmbeddedValkey()
        stack.callback(valkey.stop)
        valkey.start()
        worker = subprocess.Popen([sys.executable, __file__, "worker", valkey.url])
        stack.callback(worker.wait)
        stack.callback(worker.terminate)
        with suppress(KeyboardInterrupt):
            serve(build_app(valkey.url), args.port)


if __name__ == "__main__":
    main()
