"""Recording a batch, as Redis and RQ see it."""

from __future__ import annotations

import redis.asyncio as aioredis
from redis import Redis
from rq.job import Job
from rq.registry import FinishedJobRegistry, StartedJobRegistry
from rq.serializers import JSONSerializer

from runq.queue import constants
from runq.queue.claim import Claim
from runq.queue.enqueue import ENQUEUE, Enqueue, Request
from runq.queue.line import Line
from runq.queue.reaper import Reaper
from runq.queue.record import Recorder, Running
from runq.queue.tasks import Outcome, new_job_fields
from runq.settings import FunctionSettings
from tests.helpers import clear_function

# More tasks than one Lua call can take as arguments (unpack() stops near 8,000 values): the
# record's variadic calls must go in slices.
BIG_BATCH = 4_500


def test_a_batch_too_big_for_one_variadic_call_is_recorded_whole(redis: Redis) -> None:
    function, worker = "bigbatch", "record-test-worker"
    clear_function(redis, function)
    _queue(redis, function, BIG_BATCH)
    claimed = Claim(Line(redis), function, worker)(BIG_BATCH, None)
    tasks = [Running.claimed(started) for started in claimed.started]
    assert len(tasks) == BIG_BATCH
    outcomes = [Outcome(output=i) for i in range(BIG_BATCH)]
    written = Recorder(Line(redis), function, worker).record(tasks, outcomes, max_concurrency=4)
    assert written == outcomes
    queue = constants.queue_name(function)
    assert FinishedJobRegistry(queue, connection=redis).count == BIG_BATCH
    assert StartedJobRegistry(queue, connection=redis).count == 0
    assert redis.scard(constants.worker_executions_key(worker)) == 0
    assert redis.zcard(constants.leases_key(function)) == 0
    assert not redis.exists(*(f"rq:execution:{t.task_id}:{t.execution_id}" for t in tasks[:50]))
    assert not redis.exists(*(f"rq:executions:{t.task_id}" for t in tasks[:50]))
    # A freed slot wakes a worker; more tokens than slots would wake no one new.
    assert redis.llen(constants.slots_key(function)) == 4


def test_a_late_record_of_a_lost_run_leaves_the_new_run_its_lease_and_execution(
    redis: Redis,
) -> None:
    function = "relet"
    clear_function(redis, function)
    _queue(redis, function, 1)
    lost = Claim(Line(redis), function, "lost-worker")(1, None)
    # Its lease lapses (the worker stopped answering) and the task goes to another worker.
    (task_id,) = [started.task_id for started in lost.started]
    redis.zadd(constants.leases_key(function), {task_id: 0})
    assert Reaper(redis, function, retries=1).reap() == ([task_id], [])
    again = Claim(Line(redis), function, "new-worker")(1, None)
    (running,) = [Running.claimed(started) for started in again.started]
    job = Job.fetch(task_id, connection=redis, serializer=JSONSerializer)

    late = Recorder(Line(redis), function, "lost-worker")
    tasks = [Running.claimed(started) for started in lost.started]
    assert late.record(tasks, [Outcome(output="late")], None) == [None]
    assert [e.id for e in job.get_executions()] == [running.execution_id]
    started = StartedJobRegistry(constants.queue_name(function), connection=redis)
    assert (task_id, running.execution_id) in started.get_job_and_execution_ids()
    # The new run keeps its lease: were that worker to die, its task would still be reaped.
    assert redis.zscore(constants.leases_key(function), task_id) is not None

    outcome = Outcome(output=1)
    assert Recorder(Line(redis), function, "new-worker").record([running], [outcome], None) == [
        outcome
    ]
    assert job.get_executions() == []
    assert job.get_status(refresh=True) == "finished"
    assert redis.zscore(constants.leases_key(function), task_id) is None


def _queue(redis: Redis, function: str, count: int) -> None:
    # The admission script itself, in one pipeline: thousands of HTTP submits would be slow.
    enqueue = Enqueue(aioredis.Redis(), idempotency_ttl_s=60)
    script = redis.register_script(ENQUEUE)
    with redis.pipeline(transaction=False) as pipe:
        for i in range(count):
            fields = new_job_fields(
                function=function,
                settings=FunctionSettings(),
                payload_json=str(i).encode(),
                priority=constants.DEFAULT_PRIORITY,
                reply_to=None,
                connection=redis,
            )
            request = Request(function, f"{function}{i}", constants.DEFAULT_PRIORITY, fields, count)
            keys, args = enqueue._keys_and_args(request)
            script(keys=keys, args=args, client=pipe)
        pipe.execute()
