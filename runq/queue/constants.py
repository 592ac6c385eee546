"""Every Redis key name, prefix and TTL runq uses, in one place, units in the names.

RQ's own keys are taken from RQ's classes so they follow ``RQ_KEY_PREFIX`` and RQ's layout;
runq's keys sit under their own prefix.
"""

from __future__ import annotations

from rq.defaults import DEFAULT_JOB_MONITORING_INTERVAL, RQ_KEY_PREFIX
from rq.executions import WORKER_EXECUTIONS_KEY_TEMPLATE, ExecutionRegistry
from rq.job import Job
from rq.queue import Queue
from rq.registry import (
    CanceledJobRegistry,
    FailedJobRegistry,
    FinishedJobRegistry,
    StartedJobRegistry,
)
from rq.results import Result
from rq.worker import Worker
from rq.worker_registration import REDIS_WORKER_KEYS, WORKERS_BY_QUEUE_KEY

RUNQ_PREFIX = "runq:"
QUEUE_NAME_PREFIX = "runq."

# Task priorities, highest first. Each is its own RQ queue, so RQ's tools count them apart; the
# normal one is named after the function alone.
PRIORITIES = ("high", "normal", "low")
DEFAULT_PRIORITY = "normal"

# RQ keys: the worker's pipelines and the gateway's Lua scripts must agree with RQ on these.
RQ_QUEUES_KEY = Queue.redis_queues_keys
RQ_JOB_PREFIX = Job.redis_job_namespace_prefix
RQ_EXECUTION_PREFIX = RQ_KEY_PREFIX + ":execution:"
RQ_EXECUTIONS_PREFIX = ExecutionRegistry.key_template.format("")
RQ_QUEUE_PREFIX = Queue.redis_queue_namespace_prefix
RQ_STARTED_PREFIX = StartedJobRegistry.key_template.format("")
RQ_FAILED_PREFIX = FailedJobRegistry.key_template.format("")
RQ_CANCELED_PREFIX = CanceledJobRegistry.key_template.format("")
RQ_FINISHED_PREFIX = FinishedJobRegistry.key_template.format("")
RQ_RESULTS_PREFIX = str(Result.get_key(""))
RQ_WORKER_PREFIX = Worker.redis_worker_namespace_prefix
# RQ's sets of registered worker keys: all, and per queue.
RQ_WORKERS_KEY = REDIS_WORKER_KEYS
RQ_WORKERS_BY_QUEUE_PREFIX = WORKERS_BY_QUEUE_KEY % ""
# RQ keeps a result stream this long (XADD MAXLEN ~), and an execution's record this long past
# its heartbeat TTL (an execution's TTL is RQ's job monitoring interval, at most the job's
# timeout, plus RQ_EXECUTION_GRACE_S).
RQ_RESULTS_MAX = 10
RQ_JOB_MONITORING_INTERVAL_S = DEFAULT_JOB_MONITORING_INTERVAL
RQ_EXECUTION_GRACE_S = 60

# Job hash fields, RQ's: the scripts read and write them as RQ's own Job would.
STATUS_FIELD = "status"
ORIGIN_FIELD = "origin"
CREATED_AT_FIELD = "created_at"
ENQUEUED_AT_FIELD = "enqueued_at"
STARTED_AT_FIELD = "started_at"
ENDED_AT_FIELD = "ended_at"
HEARTBEAT_FIELD = "last_heartbeat"
WORKER_NAME_FIELD = "worker_name"
RESULT_TTL_FIELD = "result_ttl"
FAILURE_TTL_FIELD = "failure_ttl"
TIMEOUT_FIELD = "timeout"
# RQ's execution hash fields (beside CREATED_AT, HEARTBEAT and WORKER_NAME), and its worker
# hash's state field.
EXECUTION_ID_FIELD = "id"
EXECUTION_JOB_FIELD = "job_id"
WORKER_STATE_FIELD = "state"
# Job hash fields runq adds; RQ ignores fields it does not know.
ERROR_FIELD = "runq_error"
ATTEMPTS_FIELD = "runq_attempts"
# The deadlines to start by and to end by, server epoch seconds.
DEADLINE_FIELD = "runq_deadline"
FINISH_BY_FIELD = "runq_finish_by"
# Where a waiting predict listens.
REPLY_TO_FIELD = "runq_reply_to"
# A streaming task's chunks so far, the attempt they belong to, and its latest progress JSON.
CHUNKS_FIELD = "runq_chunks"
CHUNKS_ATTEMPT_FIELD = "runq_chunks_attempt"
PROGRESS_FIELD = "runq_progress"
# The idempotency key naming the task: deleting the task frees it.
IDEMPOTENCY_FIELD = "runq_idempotency"
# Object-store keys of an input or output too big to travel through Redis (claim check).
INPUT_REF_FIELD = "runq_input_ref"
OUTPUT_REF_FIELD = "runq_output_ref"
# Where to POST the task when it ends (submitted with "webhook").
WEBHOOK_FIELD = "runq_webhook"
# The task's tenant; absent on tasks of DEFAULT_TENANT, whose layout and cost stay as they were.
TENANT_FIELD = "tenant"
DEFAULT_TENANT = "default"
# The queued-tasks set of the quota the task was admitted under (Request.quota).
QUOTA_FIELD = "runq_quota"

# A gateway process's reply channel: a finished predict task is published here, whole.
REPLY_CHANNEL_PREFIX = RUNQ_PREFIX + "reply:"
# A task's own channel: its id is published here when it ends, for long-polls on any gateway.
TASK_CHANNEL_PREFIX = RUNQ_PREFIX + "task:"
# A task's stream of chunks and progress reports (runq:chunks:<id>), a Redis Stream of entries
# {k: kind, i: chunk index (chunks only), d: JSON}, appended by its worker as the function
# yields, kept the task's result TTL from the last append, at most its function's max_chunks
# chunks. Each append publishes the task's id on its channel: open streams re-read it.
CHUNKS_PREFIX = RUNQ_PREFIX + "chunks:"
CHUNK_KIND_FIELD = "k"
CHUNK_INDEX_FIELD = "i"
CHUNK_DATA_FIELD = "d"
CHUNK_KIND = "chunk"
PROGRESS_KIND = "progress"
# Entries one read of a stream takes; a longer backlog is read in turns.
CHUNKS_READ_MAX = 256
# How often a gateway checks that the tasks it waits on still exist. DELETE tells waiters at
# once; a record that goes without runq's word (`rq empty`, FLUSHDB, an eviction) is only found
# by looking: one pipelined EXISTS per waited-on task, one round trip per gateway process per
# interval, and none while nothing waits. Keyspace notifications would need server config
# (notify-keyspace-events) that managed Redis often refuses, and would send every gateway
# every deletion in the whole Redis.
WAIT_EXISTS_INTERVAL_S = 1.0

# Tenants: DEFAULT_TENANT's tasks sit in the function's own queues; another tenant's sit in
# queues of their own, named "<function's queue>@<tenant>" (function names and priorities never
# hold an "@"), registered in RQ's set of queues like any other. A function's tenants set holds
# the other tenants that may have queued work (enqueue and the reaper add them, the claim
# removes one it finds empty, maintenance adds back one a tool such as `rq requeue` refilled).
# The claim takes from the tenants in turn by stride scheduling: each has a pass (a virtual
# time, field FAIR_TURN_PREFIX + tenant of the function's fair hash), advanced by 1/weight per
# task taken; the lowest pass goes next, and a tenant that comes back from idle starts at the
# current virtual time, with no credit saved up. Weights are per tenant, for every function
# (`runq tenants weight`).
TENANT_QUEUE_SEPARATOR = "@"
TENANTS_PREFIX = RUNQ_PREFIX + "tenants:"
TENANT_WEIGHTS_KEY = RUNQ_PREFIX + "tenant-weights"
DEFAULT_TENANT_WEIGHT = 1.0
FAIR_PREFIX = RUNQ_PREFIX + "fair:"
FAIR_TURN_PREFIX = "p:"
FAIR_VIRTUAL_TIME_FIELD = "vt"
# A fair hash is dropped when the function's queues empty, and outlives a busy one this long.
FAIR_TTL_S = 24 * 3600
# Quotas (Request.quota): a token bucket per quota name {tokens, at}, expiring once it would be
# full again, and a sorted set of the quota's queued task ids scored by admission time (server
# epoch s). The claim, cancel and delete remove a task that leaves the queue; at the cap,
# admission looks at the QUOTA_HEAL_MAX oldest entries and drops those no longer queued (a
# tool outside runq emptied the queue), so the count cannot stay inflated for good.
RATE_PREFIX = RUNQ_PREFIX + "rate:"
RATE_TOKENS_FIELD = "tokens"
RATE_AT_FIELD = "at"
QUEUED_PREFIX = RUNQ_PREFIX + "queued:"
QUOTA_HEAL_MAX = 8

# A function's wake list: enqueue pushes a token, idle workers block on it. Tokens are hints
# (the queues are the truth), so the list is capped and cleared once the queues are empty.
WAKE_PREFIX = RUNQ_PREFIX + "wake:"
WAKE_TOKENS_MAX = 64
# A function's leases: sorted set of running task ids scored by lease expiry (epoch s). Workers
# renew their tasks' leases while they run; a crashed worker's leases lapse, and with them its
# share of max_concurrency.
LEASES_PREFIX = RUNQ_PREFIX + "leases:"
# A function's live workers: sorted set of worker names scored by the expiry of their last
# heartbeat (same TTL as leases). RQ's own registration outlives a killed worker by minutes.
ALIVE_PREFIX = RUNQ_PREFIX + "alive:"
# When a worker of the function last renewed its heartbeat (epoch s, the server's clock): how
# long queued tasks have had no live worker to take them (stranded work) is counted from it.
SEEN_PREFIX = RUNQ_PREFIX + "seen:"
LEASE_TTL_S = 8.0
LEASE_RENEW_INTERVAL_S = 2.0
# A function's slot list: a worker that ends a batch of a concurrency-capped function pushes a
# token, waking a worker that found every slot taken. Hints too, capped like the wake list.
SLOTS_PREFIX = RUNQ_PREFIX + "slots:"
# A function's drain rate: hash {rate, at}, an exponentially decayed count of tasks taken off
# its queues per second, kept by the claim script; it sizes Retry-After when the queue is full.
DRAIN_PREFIX = RUNQ_PREFIX + "drain:"
DRAIN_RATE_FIELD = "rate"
DRAIN_AT_FIELD = "at"
DRAIN_RATE_WINDOW_S = 10.0
DRAIN_TTL_S = 24 * 3600
# Channel an enqueue publishes the function's name on while it has no worker: wakes autoscalers.
DEMAND_CHANNEL = RUNQ_PREFIX + "demand"
# A function's wanted replicas, {desired}, written by the autoscaler that manages it; they
# expire when it stops writing them. Current replicas are the live workers, never its count of
# processes: a hung worker is one of those, and no replica.
REPLICAS_PREFIX = RUNQ_PREFIX + "replicas:"
REPLICAS_DESIRED_FIELD = "desired"
REPLICAS_TTL_S = 10
# What `runq deploy` set: hash {function: JSON settings}, and a counter bumped with every
# deploy that running gateways, workers and autoscalers poll every DEPLOYED_POLL_INTERVAL_S.
DEPLOYED_KEY = RUNQ_PREFIX + "deployed"
DEPLOYED_VERSION_KEY = RUNQ_PREFIX + "deployed:version"
DEPLOYED_POLL_INTERVAL_S = 1.0
# Idempotency keys, per function, holding {task, body} (the body's digest).
IDEMPOTENCY_PREFIX = RUNQ_PREFIX + "idem:"
IDEMPOTENCY_TASK_FIELD = "task"
IDEMPOTENCY_BODY_FIELD = "body"
# A function's outcome stats, one hash per epoch second (runq:stats:<function>:<second>): a count
# per ended status and latency histogram buckets (runq/queue/stats.py), added by workers in the
# transaction that records the outcomes. The TTL outlives the longest window `runq status` reads.
STATS_PREFIX = RUNQ_PREFIX + "stats:"
STATS_TTL_S = 120
STATS_WINDOW_S = 60
# Set of function names `runq status` lists: workers add theirs with every batch's stats;
# gateways and autoscalers may add theirs at start so a function shows before its first batch.
# Never pruned: SREM a function that is gone for good.
FUNCTIONS_KEY = RUNQ_PREFIX + "functions"

# Webhook deliveries: a hash per task (runq:webhook:<task id>) {url, body, attempts}, added in the
# transaction that records the task's outcome, and a sorted set of task ids scored by the next
# attempt's time (server epoch s). A sender claims due ones by pushing their score
# WEBHOOK_LEASE_S ahead, so two senders never send one delivery at once; one that dies while
# sending leaves the delivery to be sent again once the lease passes (at-least-once).
WEBHOOK_PREFIX = RUNQ_PREFIX + "webhook:"
WEBHOOK_URL_FIELD = "url"
WEBHOOK_BODY_FIELD = "body"
WEBHOOK_ATTEMPTS_FIELD = "attempts"
WEBHOOKS_DUE_KEY = RUNQ_PREFIX + "webhooks:due"
# Outlives the whole retry schedule by far: a delivery waits here while no sender runs.
WEBHOOK_TTL_S = 24 * 3600
# Covers one claimed delivery's attempt: DNS, then up to 3 addresses x WEBHOOK_TIMEOUT_S.
WEBHOOK_LEASE_S = 60.0
WEBHOOK_CLAIM_MAX = 8
# Deliveries one sender process has in flight at once, and at most to one receiver (scheme, host
# and port): a receiver that never answers holds up only its own deliveries, and one with a
# backlog is not flooded.
WEBHOOK_INFLIGHT_MAX = 64
WEBHOOK_PER_HOST_MAX = 4
WEBHOOK_POLL_INTERVAL_S = 0.2
WEBHOOK_TIMEOUT_S = 5.0
# Retry n waits WEBHOOK_BACKOFF_S * 2**(n-1), at most WEBHOOK_BACKOFF_MAX_S; after
# WEBHOOK_MAX_ATTEMPTS failed attempts the delivery is dropped (retries over about 8.5 min).
WEBHOOK_BACKOFF_S = 1.0
WEBHOOK_BACKOFF_MAX_S = 300.0
WEBHOOK_MAX_ATTEMPTS = 10

# API keys (runq/queue/keys.py): a hash per key (runq:apikey:<key id>) holding its tenant,
# scopes, quotas and the SHA-256 of the whole key, never the key; and the set of every key id.
# Each gateway process keeps a key it verified for API_KEY_CACHE_S, so a predict costs no
# lookup in steady state and a revoked key is refused everywhere within that time.
API_KEY_PREFIX = RUNQ_PREFIX + "apikey:"
API_KEYS_KEY = RUNQ_PREFIX + "apikeys"
API_KEY_CACHE_S = 0.5

# Registry maintenance (runq/queue/maintenance.py): whichever process holds this lock removes
# the finished, failed and canceled registries' entries of tasks past their TTL, and RQ's
# records of workers that are gone. Held for three quarters of the period, tried by every
# process each quarter: one cleanup per period however many processes run.
MAINTENANCE_LOCK_KEY = RUNQ_PREFIX + "maintenance"

# How often workers and the autoscaler look for lapsed leases: with LEASE_TTL_S, a dead worker's
# tasks are found within about LEASE_TTL_S + REAP_INTERVAL_S.
REAP_INTERVAL_S = 1.0
REAP_BATCH_MAX = 1000

# Idle blocking pops return this often so a worker notices a stop request or a lapsed lease.
WORKER_DEQUEUE_TIMEOUT_S = 1
# How often a worker holding a batching window open looks for batch-mates.
BATCH_FILL_POLL_S = 0.0005
# How long a canceled or timed-out-in-queue task stays readable when its function sets nothing.
DEFAULT_RESULT_TTL_S = 3600


def queue_name(
    function: str, priority: str = DEFAULT_PRIORITY, tenant: str = DEFAULT_TENANT
) -> str:
    suffix = "" if priority == DEFAULT_PRIORITY else "." + priority
    if tenant != DEFAULT_TENANT:
        suffix += TENANT_QUEUE_SEPARATOR + tenant
    return QUEUE_NAME_PREFIX + function + suffix


def is_runq_queue(name: str) -> bool:
    """Whether an RQ queue (a job's origin) is runq's: a job of another RQ app sharing the Redis
    is no task of runq's, which neither shows nor touches it."""
    return name.startswith(QUEUE_NAME_PREFIX)


# Function names never hold a dot or an "@": "runq.<function>[.<priority>][@<tenant>]" splits
# one way only, whatever the tenant's name holds.
def function_of_queue(name: str) -> str:
    return _function_and_priority(name).partition(".")[0]


def priority_of_queue(name: str) -> str:
    _, dot, priority = _function_and_priority(name).partition(".")
    return priority if dot else DEFAULT_PRIORITY


def tenant_of_queue(name: str) -> str:
    _, at, tenant = name.partition(TENANT_QUEUE_SEPARATOR)
    return tenant if at else DEFAULT_TENANT


def _function_and_priority(name: str) -> str:
    return name.removeprefix(QUEUE_NAME_PREFIX).partition(TENANT_QUEUE_SEPARATOR)[0]


def queue_key(queue: str) -> str:
    return Queue.redis_queue_namespace_prefix + queue


def queue_keys(function: str, tenant: str = DEFAULT_TENANT) -> list[str]:
    """The queue lists of the function's tasks of ``tenant``, highest priority first. Every
    tenant's: these for DEFAULT_TENANT, then these of each member of ``tenants_key``."""
    return [queue_key(queue_name(function, priority, tenant)) for priority in PRIORITIES]


def tenants_key(function: str) -> str:
    return TENANTS_PREFIX + function


def fair_key(function: str) -> str:
    return FAIR_PREFIX + function


def rate_key(quota: str) -> str:
    return RATE_PREFIX + quota


def quota_queued_key(quota: str) -> str:
    return QUEUED_PREFIX + quota


def wake_key(function: str) -> str:
    return WAKE_PREFIX + function


def leases_key(function: str) -> str:
    return LEASES_PREFIX + function


def alive_key(function: str) -> str:
    return ALIVE_PREFIX + function


# A worker's last claim that took tasks: its token and the "id:execution" of each task taken, so
# the same claim sent again after its reply was lost answers those tasks instead of more.
CLAIM_PREFIX = RUNQ_PREFIX + "claim:"
CLAIM_ID_FIELD = "id"
CLAIM_TAKEN_FIELD = "taken"


def claim_key(worker_name: str) -> str:
    return CLAIM_PREFIX + worker_name


def seen_key(function: str) -> str:
    return SEEN_PREFIX + function


def slots_key(function: str) -> str:
    return SLOTS_PREFIX + function


def drain_key(function: str) -> str:
    return DRAIN_PREFIX + function


def replicas_key(function: str) -> str:
    return REPLICAS_PREFIX + function


def stats_key(function: str, epoch_s: int) -> str:
    return f"{STATS_PREFIX}{function}:{epoch_s}"


def idempotency_key(function: str, key_digest: str) -> str:
    return f"{IDEMPOTENCY_PREFIX}{function}:{key_digest}"


def job_key(task_id: str) -> str:
    return RQ_JOB_PREFIX + task_id


def results_key(task_id: str) -> str:
    return str(Result.get_key(task_id))


def worker_key(worker_name: str) -> str:
    return RQ_WORKER_PREFIX + worker_name


def worker_executions_key(worker_name: str) -> str:
    return WORKER_EXECUTIONS_KEY_TEMPLATE.format(worker_name)


def executions_key(task_id: str) -> str:
    return str(ExecutionRegistry.key_template.format(task_id))


def started_registry_key(queue: str) -> str:
    return StartedJobRegistry.key_template.format(queue)


def finished_registry_key(queue: str) -> str:
    return FinishedJobRegistry.key_template.format(queue)


def failed_registry_key(queue: str) -> str:
    return FailedJobRegistry.key_template.format(queue)


def canceled_registry_key(queue: str) -> str:
    return CanceledJobRegistry.key_template.format(queue)


def task_channel(task_id: str) -> str:
    return TASK_CHANNEL_PREFIX + task_id


def api_key_key(key_id: str) -> str:
    return API_KEY_PREFIX + key_id


def chunks_key(task_id: str) -> str:
    return CHUNKS_PREFIX + task_id


def webhook_key(task_id: str) -> str:
    return WEBHOOK_PREFIX + task_id
