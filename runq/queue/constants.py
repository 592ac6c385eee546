"""Every Redis key name, prefix and TTL runq uses, in one place, units in the names.

RQ's own keys are taken from RQ's classes so they follow ``RQ_KEY_PREFIX`` and RQ's layout;
runq's keys sit under their own prefix.
"""

from __future__ import annotations

from rq.defaults import RQ_KEY_PREFIX
from rq.executions import ExecutionRegistry
from rq.intermediate_queue import IntermediateQueue
from rq.job import Job
from rq.queue import Queue
from rq.registry import (
    CanceledJobRegistry,
    FailedJobRegistry,
    FinishedJobRegistry,
    StartedJobRegistry,
)
from rq.results import Result
from rq.worker_registration import WORKERS_BY_QUEUE_KEY

RUNQ_PREFIX = "runq:"
QUEUE_NAME_PREFIX = "runq."

# RQ keys: the worker's pipelines and the gateway's Lua scripts must agree with RQ on these.
RQ_QUEUES_KEY = Queue.redis_queues_keys
RQ_JOB_PREFIX = Job.redis_job_namespace_prefix
RQ_EXECUTION_PREFIX = RQ_KEY_PREFIX + ":execution:"

# Hash fields runq adds to RQ's job hash; RQ ignores fields it does not know.
ERROR_FIELD = "runq_error"

# A gateway process's reply channel: a finished predict task is published here, whole.
REPLY_CHANNEL_PREFIX = RUNQ_PREFIX + "reply:"
# A task's own channel: its id is published here when it ends, for long-polls on any gateway.
TASK_CHANNEL_PREFIX = RUNQ_PREFIX + "task:"

# Idle blocking pops return this often so a worker notices a stop request.
WORKER_DEQUEUE_TIMEOUT_S = 1
# How often a worker holding a batching window open looks for batch-mates.
BATCH_FILL_POLL_S = 0.0005
# How long a canceled or timed-out-in-queue task stays readable when its function sets nothing.
DEFAULT_RESULT_TTL_S = 3600


def queue_name(function: str) -> str:
    return QUEUE_NAME_PREFIX + function


def queue_key(function: str) -> str:
    return Queue.redis_queue_namespace_prefix + queue_name(function)


def intermediate_key(function: str) -> str:
    return IntermediateQueue.get_intermediate_queue_key(queue_key(function))


def job_key(task_id: str) -> str:
    return RQ_JOB_PREFIX + task_id


def results_key(task_id: str) -> str:
    return str(Result.get_key(task_id))


def executions_key(task_id: str) -> str:
    return str(ExecutionRegistry.key_template.format(task_id))


def started_registry_key(function: str) -> str:
    return StartedJobRegistry.key_template.format(queue_name(function))


def finished_registry_key(function: str) -> str:
    return FinishedJobRegistry.key_template.format(queue_name(function))


def failed_registry_key(function: str) -> str:
    return FailedJobRegistry.key_template.format(queue_name(function))


def canceled_registry_key(function: str) -> str:
    return CanceledJobRegistry.key_template.format(queue_name(function))


def workers_key(function: str) -> str:
    return str(WORKERS_BY_QUEUE_KEY % queue_name(function))


def task_channel(task_id: str) -> str:
    return TASK_CHANNEL_PREFIX + task_id
