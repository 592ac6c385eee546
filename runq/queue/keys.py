"""API keys in Redis: created, listed and revoked by `runq keys`, looked up by every gateway.

A key reads ``runq_<id>_<secret>``: the id (64 random bits, hex) names its record, the secret
(256 random bits) is what proves it. Redis keeps only the SHA-256 of the whole key, which the
gateway compares in constant time; a key shown once at creation cannot be read back from Redis.
A plain hash is enough for keys this random: nobody can guess one to test against it.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import redis.asyncio as aioredis
from redis import Redis
from redis.typing import EncodableT, FieldT

from runq.errors import ConfigError, NotFound
from runq.queue import constants
from runq.queue.tasks import text

Scope = Literal["predict", "read", "admin"]
# predict: predict and submit; read: the caller's own tasks; admin: every tenant's tasks,
# /metrics and the functions' settings (and everything the others allow).
SCOPES: tuple[Scope, ...] = ("predict", "read", "admin")
DEFAULT_SCOPES: tuple[Scope, ...] = ("predict", "read")
KEY_PREFIX = "runq_"
_ID_BYTES = 8
_SECRET_BYTES = 32
_KEY_SHAPE = re.compile(rf"{KEY_PREFIX}([0-9a-f]{{{2 * _ID_BYTES}}})_[A-Za-z0-9_-]{{43}}")
# Tenant names are label values, log fields and part of the idempotency digest: short and plain.
TENANT_SHAPE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")

_TENANT, _SCOPES, _RATE, _MAX_QUEUED = "tenant", "scopes", "rate_per_s", "max_queued"
_HASH, _CREATED, _REVOKED = "hash", "created_at", "revoked_at"


@dataclass(frozen=True)
class KeyRecord:
    """What Redis holds of a key, its hash aside."""

    key_id: str
    tenant: str
    scopes: frozenset[Scope]
    rate_per_s: float | None
    max_queued: int | None
    created_at: float
    revoked_at: float | None


def key_id_of(key: str) -> str | None:
    """The id a well-formed key names; None for anything else (never a Redis lookup)."""
    match = _KEY_SHAPE.fullmatch(key)
    return match.group(1) if match else None


def _hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def create_key(
    connection: Redis,
    tenant: str,
    scopes: tuple[Scope, ...] = DEFAULT_SCOPES,
    rate_per_s: float | None = None,
    max_queued: int | None = None,
) -> tuple[str, KeyRecord]:
    """A new key (returned this once, never stored) and its record."""
    if not TENANT_SHAPE.fullmatch(tenant):
        raise ConfigError(
            f"tenant {tenant!r}: 1-64 letters, digits, '.', '_' or '-', starting with a "
            "letter or digit"
        )
    if rate_per_s is not None and not rate_per_s > 0:
        raise ConfigError(f"rate {rate_per_s} must be a positive number of requests per second")
    if max_queued is not None and max_queued < 1:
        raise ConfigError(f"max-queued {max_queued} must be at least 1")
    key_id = secrets.token_hex(_ID_BYTES)
    key = f"{KEY_PREFIX}{key_id}_{secrets.token_urlsafe(_SECRET_BYTES)}"
    record = KeyRecord(
        key_id=key_id,
        tenant=tenant,
        scopes=frozenset(scopes or DEFAULT_SCOPES),
        rate_per_s=rate_per_s,
        max_queued=max_queued,
        created_at=time.time(),
        revoked_at=None,
    )
    fields: dict[FieldT, EncodableT] = {
        _TENANT: tenant,
        _SCOPES: " ".join(s for s in SCOPES if s in record.scopes),
        _RATE: "" if rate_per_s is None else repr(rate_per_s),
        _MAX_QUEUED: "" if max_queued is None else str(max_queued),
        _CREATED: repr(record.created_at),
        _HASH: _hash(key),
    }
    with connection.pipeline() as pipe:
        pipe.hset(constants.api_key_key(key_id), mapping=fields)
        pipe.sadd(constants.API_KEYS_KEY, key_id)
        pipe.execute()
    return key, record


def list_keys(connection: Redis) -> list[KeyRecord]:
    """Every key's record, oldest first; revoked ones too (they say so)."""
    ids = sorted(str(text(raw)) for raw in connection.smembers(constants.API_KEYS_KEY))
    with connection.pipeline(transaction=False) as pipe:
        for key_id in ids:
            pipe.hgetall(constants.api_key_key(key_id))
        found = pipe.execute()
    records = [_record(key_id, raw) for key_id, raw in zip(ids, found, strict=True) if raw]
    return sorted(records, key=lambda record: record.created_at)


def revoke_key(connection: Redis, key_id: str) -> KeyRecord:
    """Marks the key revoked (its record stays, for `runq keys list`); every gateway refuses it
    within API_KEY_CACHE_S."""
    key = constants.api_key_key(key_id)
    # Records are never deleted, so checking first cannot race: a mistyped id creates nothing.
    if not connection.exists(key):
        raise NotFound(f"no API key {key_id!r}; `runq keys list` shows them")
    connection.hset(key, _REVOKED, repr(time.time()))
    return _record(key_id, connection.hgetall(key))


async def verify_key(redis: aioredis.Redis, key: str) -> KeyRecord | None:
    """The record of a presented key if it is one runq made and not revoked; else None."""
    key_id = key_id_of(key)
    if key_id is None:
        return None
    raw = await redis.hgetall(constants.api_key_key(key_id))
    stored = text(raw.get(_HASH.encode()))
    if stored is None or not hmac.compare_digest(stored, _hash(key)):
        return None
    record = _record(key_id, raw)
    return None if record.revoked_at is not None else record


def _record(key_id: str, raw: Mapping[Any, Any]) -> KeyRecord:
    def field(name: str) -> str:
        return text(raw.get(name.encode())) or ""

    scopes = frozenset(s for s in SCOPES if s in field(_SCOPES).split())
    return KeyRecord(
        key_id=key_id,
        tenant=field(_TENANT),
        scopes=scopes,
        rate_per_s=float(field(_RATE)) if field(_RATE) else None,
        max_queued=int(field(_MAX_QUEUED)) if field(_MAX_QUEUED) else None,
        created_at=float(field(_CREATED) or 0),
        revoked_at=float(field(_REVOKED)) if field(_REVOKED) else None,
    )
