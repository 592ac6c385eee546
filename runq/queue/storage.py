"""Object storage for what is too big to travel through Redis (claim check), via file:// or S3.

Only a key travels in the job hash; the bytes live in the store. Keys are made by runq from task
ids (never from caller input), so they cannot climb out of a file store's directory. boto3 is
synchronous: async callers run these methods in a thread.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Protocol
from urllib.parse import urlparse

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from runq.errors import ConfigError, StorageError

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

CHUNK_BYTES = 64 * 1024
DEFAULT_DIR_NAME = "runq-objects"


class ObjectStore(Protocol):
    def put(self, key: str, data: bytes) -> None: ...

    def get(self, key: str) -> bytes: ...

    def chunks(self, key: str) -> Iterator[bytes]: ...

    def delete(self, keys: list[str]) -> None: ...

    def presign(self, key: str, ttl_s: int) -> str | None:
        """A short-lived URL the caller can GET the object from; None if there is none."""

    def sweep(self, function: str, older_than_s: float) -> int:
        """Removes a function's objects older than that; returns how many (S3: lifecycle rules)."""


def open_store(url: str | None, endpoint_url: str | None = None) -> ObjectStore:
    if url is None:
        return FileStore(Path(tempfile.gettempdir()) / DEFAULT_DIR_NAME)
    parsed = urlparse(url)
    if parsed.scheme == "file":
        return FileStore(Path(parsed.netloc + parsed.path))
    if parsed.scheme == "s3" and parsed.netloc:
        return S3Store(parsed.netloc, parsed.path.strip("/"), endpoint_url)
    raise ConfigError(f"storage URL {url!r}: expected file://DIR or s3://BUCKET[/PREFIX]")


class FileStore:
    def __init__(self, root: Path) -> None:
        self.root = root

    def put(self, key: str, data: bytes) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        # Write then rename: a reader never sees half an object.
        partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
        partial.write_bytes(data)
        partial.replace(path)

    def get(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except OSError as exc:
            raise StorageError(f"cannot read object {key}: {exc.strerror}") from None

    def chunks(self, key: str) -> Iterator[bytes]:
        try:
            with self._path(key).open("rb") as file:
                while chunk := file.read(CHUNK_BYTES):
                    yield chunk
        except OSError as exc:
            raise StorageError(f"cannot read object {key}: {exc.strerror}") from None

    def delete(self, keys: list[str]) -> None:
        for key in keys:
            self._path(key).unlink(missing_ok=True)

    def presign(self, key: str, ttl_s: int) -> str | None:
        return None

    def sweep(self, function: str, older_than_s: float) -> int:
        cutoff = time.time() - older_than_s
        removed = 0
        for path in (self.root / function).rglob("*.json"):
            try:
                if path.stat().st_mtime < cutoff:
                    path.unlink()
                    removed += 1
            except OSError:
                continue  # another process swept it first
        return removed

    def _path(self, key: str) -> Path:
        return self.root / key


class S3Store:
    def __init__(self, bucket: str, prefix: str, endpoint_url: str | None) -> None:
        self.bucket = bucket
        self.prefix = f"{prefix}/" if prefix else ""
        config = Config(retries={"mode": "standard", "max_attempts": 3}, connect_timeout=5)
        self.client: S3Client = boto3.client("s3", endpoint_url=endpoint_url, config=config)

    def put(self, key: str, data: bytes) -> None:
        with _storage_errors(key):
            self.client.put_object(
                Bucket=self.bucket, Key=self._key(key), Body=data, ContentType="application/json"
            )

    def get(self, key: str) -> bytes:
        with _storage_errors(key):
            return self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()

    def chunks(self, key: str) -> Iterator[bytes]:
        with _storage_errors(key):
            body = self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"]
            yield from body.iter_chunks(CHUNK_BYTES)

    def delete(self, keys: list[str]) -> None:
        if not keys:
            return
        with _storage_errors(keys[0]):
            self.client.delete_objects(
                Bucket=self.bucket,
                Delete={"Objects": [{"Key": self._key(key)} for key in keys], "Quiet": True},
            )

    def presign(self, key: str, ttl_s: int) -> str | None:
        with _storage_errors(key):
            url: str = self.client.generate_presigned_url(
                "get_object",
                Params={"Bucket": self.bucket, "Key": self._key(key)},
                ExpiresIn=ttl_s,
            )
            return url

    def sweep(self, function: str, older_than_s: float) -> int:
        # S3 expires objects itself: see the lifecycle rule in the README.
        return 0

    def _key(self, key: str) -> str:
        return self.prefix + key


@contextmanager
def _storage_errors(key: str) -> Iterator[None]:
    try:
        yield
    except (ClientError, BotoCoreError) as exc:
        raise StorageError(f"object store failed on {key}: {exc}") from None


def input_key(function: str, task_id: str) -> str:
    # Per function, so a sweep can apply each function's own retention.
    return f"{function}/inputs/{task_id}.json"


def output_key(function: str, task_id: str) -> str:
    return f"{function}/outputs/{task_id}.json"


class ClaimCheck:
    """Puts a value too big to travel through Redis in the object store; only its key travels.

    The gateway checks inputs in, the worker outputs, by the same rule: the value's JSON, as the
    caller encoded it once for Redis too (RQ's JSONSerializer), over ``inline_max_bytes``.
    """

    def __init__(self, objects: ObjectStore, inline_max_bytes: int) -> None:
        self.objects = objects
        self.inline_max_bytes = inline_max_bytes

    def check_in(self, key: str, data: bytes) -> str | None:
        """Stores ``data`` under ``key`` if it is too big; returns the key then, else None."""
        if len(data) <= self.inline_max_bytes:
            return None
        self.objects.put(key, data)
        return key

    async def check_in_async(self, key: str, data: bytes) -> str | None:
        # boto3 blocks: the put runs in a thread, the size check does not.
        if len(data) <= self.inline_max_bytes:
            return None
        await asyncio.to_thread(self.objects.put, key, data)
        return key
