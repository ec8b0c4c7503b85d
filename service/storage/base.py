"""The storage interface every backend implements, the objects it returns, and the errors it raises.

Nothing outside the backends assumes a file path: callers put files in, stream bytes out, or
`download` an object into a folder of their own. Writes are never half-visible. Reading a key that
holds nothing raises `ObjectMissing`; a store that does not answer, `StorageUnavailable`."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, BinaryIO, Protocol

if TYPE_CHECKING:
    pass


CHUNK = 1 << 20
HASH_BATCH = 1 << 20
# sha256 runs on these threads beside the write (both drop the GIL): an upload costs the slower of
# the two, not their sum.
_HASHERS = ThreadPoolExecutor(max_workers=4, thread_name_prefix="qaas-hash")


class BesideHash:
    """sha256 of a stream of chunks, computed on a pool thread beside the caller, who meanwhile
    writes the chunks (which must not change until `hexdigest`: bytes, or views of bytes). Chunks
    go to the thread in batches of about HASH_BATCH bytes, at most one batch behind."""

    def __init__(self) -> None:
        self._digest = hashlib.sha256()
        self._pending: Future[None] | None = None
        self._batch: list[bytes | memoryview] = []
        self._batched = 0

    def update(self, chunk: bytes | memoryview) -> None:
        self._batch.append(chunk)
        self._batched += len(chunk)
        if self._batched >= HASH_BATCH:
            self._submit()

    def hexdigest(self) -> str:
        self._submit()
        self._wait()
        return self._digest.hexdigest()

    def cancel(self) -> None:
        if self._pending is not None:
            self._pending.cancel()
        self._batch = []

    def _submit(self) -> None:
        self._wait()  # in order: at most one batch behind
        batch, self._batch, self._batched = self._batch, [], 0
        if batch:
            self._pending = _HASHERS.submit(self._update, batch)

    def _update(self, batch: list[bytes | memoryview]) -> None:
        for chunk in batch:
            self._digest.update(chunk)

    def _wait(self) -> None:
        if self._pending is not None:
            self._pending.result()
            self._pending = None


@dataclass(frozen=True)
class StoredObject:
    key: str
    size_bytes: int
    sha256: str


@dataclass(frozen=True)
class ListedObject:
    """A stored object as a listing shows it: `modified_at` (UTC) is when its bytes were last written (S3:
    for an object that went up in parts, when its multipart upload started)."""

    key: str
    size_bytes: int
    modified_at: datetime


class StorageUnavailable(OSError):
    """The object store did not answer or refused the request; the API answers 503 (an OSError).
    Worth trying again later: a worker puts the job back in line."""


class ObjectMissing(FileNotFoundError):
    """No object is stored under the key (it was deleted): trying again will not bring it back."""


class ObjectCorrupt(Exception):
    """The stored bytes do not hash to the sha256 they were expected to: trying again will not mend them.
    Not an OSError: the store answered, the bytes are wrong."""

    def __init__(self, key: str, expected: str, actual: str) -> None:
        super().__init__(f"{key!r} hashes to {actual}, not {expected}")
        self.key, self.expected, self.actual = key, expected, actual


@dataclass(frozen=True)
class UploadedPart:
    number: int
    size_bytes: int
    etag: str
    modified_at: datetime | None = None  # when the store received it


@dataclass(frozen=True)
class UnfinishedUpload:
    """A multipart upload neither completed nor aborted: its parts take room, and no listing of objects shows them."""

    key: str
    upload_id: str
    started_at: datetime


class DirectUploads(Protocol):
    """Multipart uploads whose parts the client sends to the store itself, each to a presigned URL, so
    the bytes never pass through the service; the object exists once `complete_upload` joins the parts."""

    def start_upload(self, key: str) -> str:
        """A new multipart upload to `key`; its id."""
        ...

    def part_url(self, key: str, upload_id: str, number: int, size_bytes: int, *, expires_s: int) -> str:
        """A URL the client PUTs part `number` to, exactly `size_bytes` long, valid `expires_s` seconds."""
        ...

    def uploaded_parts(self, key: str, upload_id: str) -> list[UploadedPart]:
        """The parts the store holds, by number; ObjectMissing when the upload is gone (completed or aborted)."""
        ...

    def unfinished_uploads(self, prefix: str = "") -> Iterator[UnfinishedUpload]:
        """Every multipart upload under the folder `prefix` neither completed nor aborted: the service's own
        in progress (an object being written, a direct upload's files), and those a process that died left."""
        ...

    def complete_upload(self, key: str, upload_id: str, parts: list[UploadedPart]) -> None: ...
    def abort_upload(self, key: str, upload_id: str) -> None:
        """Best effort: what is left is removed by `delete_prefix` or the store's lifecycle rule."""
        ...


class ObjectWriter(Protocol):
    """Bytes pushed into a new object: invisible until `commit`, gone after `abort`."""

    def write(self, chunk: bytes | memoryview) -> None: ...
    def commit(self) -> StoredObject: ...
    def abort(self) -> None: ...


class Storage(Protocol):
    def put_file(self, key: str, src: Path, *, move: bool = False, sha256: str | None = None) -> StoredObject: ...
    def writer(self, key: str) -> ObjectWriter: ...

    def open(self, key: str) -> BinaryIO: ...
    def open_seekable(self, key: str) -> BinaryIO:
        """The object as a seekable file (for reading an archive's directory or a header in place),
        never copied whole to local disk. Leaving its `with` block re-raises a read of the store that
        failed, whatever the reader made of it (a zip reader would have called it a broken file)."""
        ...

    def iter_bytes(
        self, key: str, chunk_size: int = CHUNK, *, start: int = 0, end: int | None = None
    ) -> Iterator[bytes]:
        """The object's bytes from `start` to `end` (inclusive; None: to the end), in chunks."""
        ...

    def size(self, key: str) -> int: ...
    def download(self, key: str, dest: Path, *, sha256: str | None = None) -> None:
        """Write the object to `dest` (a new file in a folder the caller owns); no file when it fails.
        `sha256`: the bytes are hashed on their way and ObjectCorrupt raised (no file) unless they hash to
        it. A backend that moves no bytes (local: a hard link) checks nothing: it stores only what the
        service wrote and hashed itself."""
        ...

    def keys(self, prefix: str) -> list[str]:
        """Every stored key that starts with `prefix`."""
        ...

    def listing(self, prefix: str = "") -> Iterator[ListedObject]:
        """Every object stored under the folder `prefix` ("": the whole store), with its size and when it
        was last written, read a page at a time (a large store is never listed whole into memory)."""
        ...

    def presigned_url(self, key: str, *, expires_s: int, filename: str) -> str | None:
        """A short-lived URL the client can download the object from directly, or None."""
        ...

    def delete(self, key: str) -> None: ...
    def delete_prefix(self, prefix: str) -> None: ...
    def check(self) -> None: ...
    def direct_uploads(self) -> DirectUploads | None:
        """The store's presigned multipart uploads, or None when it has none (local storage)."""
        ...


def checked_key(key: str) -> PurePosixPath:
    path = PurePosixPath(key)
    if path.is_absolute() or not key or any(part in ("..", "") for part in key.split("/")) or "\\" in key:
        raise ValueError(f"invalid storage key {key!r}")
    return path


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class HashedWrite:
    """Streams chunks into a file while counting and hashing them."""

    path: Path
    size_bytes: int = 0
    sha256: str = ""
    stored_key: str | None = None  # the bytes are in storage under this key; `path` holds only the size
