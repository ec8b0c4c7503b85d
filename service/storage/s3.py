"""S3-compatible object storage (AWS S3, MinIO, Ceph, R2) behind the `Storage` interface, with boto3.

`QAAS_STORAGE_URL=s3://bucket/prefix` selects it, `QAAS_S3_ENDPOINT_URL` points at a store other
than AWS, and credentials come from the standard AWS variables (`AWS_ACCESS_KEY_ID`, ...).

Objects larger than one part go up as multipart uploads: they become visible only when the upload
is completed, and any failure on the way (a broken request, a dead source) aborts the upload, so a
half-written object is never seen and no orphaned parts are left behind. Every error of the store
is raised as `StorageUnavailable` (an OSError, which the API answers with 503), a missing key as
`ObjectMissing` (a FileNotFoundError).
"""

from __future__ import annotations

import contextlib
import io
import itertools
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO, TypeVar, cast

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from service.settings import Settings
from service.storage.base import (
    CHUNK,
    BesideHash,
    ListedObject,
    ObjectCorrupt,
    ObjectMissing,
    StorageUnavailable,
    StoredObject,
    UnfinishedUpload,
    UploadedPart,
    checked_key,
)

T = TypeVar("T")
MISSING = frozenset({"404", "NoSuchKey", "NotFound"})
NO_SUCH_UPLOAD = frozenset({"NoSuchUpload"})
PARALLEL_PARTS = 2  # parts uploaded at once (memory: this many parts plus the one filling)
MIN_WINDOW = 64 << 10  # what a ranged read fetches at least: a header and what follows it
MAX_WINDOW = 8 << 20  # ... at most, after reads that kept moving forward


def _utc(moment: datetime | None) -> datetime | None:
    return None if moment is None else moment.astimezone(UTC)


def parse_url(url: str) -> tuple[str, str]:
    """`s3://bucket/some/prefix` -> ("bucket", "some/prefix/")."""
    rest = url.removeprefix("s3://")
    bucket, _, prefix = rest.partition("/")
    prefix = prefix.strip("/")
    return bucket, f"{prefix}/" if prefix else ""


class S3Storage:
    def __init__(self, client: Any, bucket: str, prefix: str = "", part_bytes: int = 8 << 20) -> None:
        self.client = client
        self.bucket = bucket
        self.prefix = prefix
        self.part_bytes = part_bytes

    @classmethod
    def from_settings(cls, settings: Settings) -> S3Storage:
        assert settings.storage_url is not None
        bucket, prefix = parse_url(settings.storage_url)
        client = boto3.session.Session().client(
            "s3",
            endpoint_url=settings.s3_endpoint_url,
            config=Config(
                retries={"max_attempts": 4, "mode": "standard"},
                connect_timeout=5,
                read_timeout=60,
                max_pool_connections=32,
                # Path-style addressing works on every S3-compatible store (virtual hosts need DNS).
                s3={"addressing_style": "path" if settings.s3_endpoint_url else "auto"},
                signature_version="s3v4",
            ),
        )
        return cls(client, bucket, prefix, settings.s3_part_bytes)

    def _key(self, key: str) -> str:
        return self.prefix + checked_key(key).as_posix()

    def _call(
        self, fn: Callable[..., T], key: str | None = None, *, missing: frozenset[str] = MISSING, **kwargs: Any
    ) -> T:
        try:
            return fn(Bucket=self.bucket, **({"Key": self._key(key)} if key is not None else {}), **kwargs)
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in missing and key is not None:
                raise ObjectMissing(f"no stored object {key!r}") from exc
            raise StorageUnavailable(f"object storage refused {fn.__name__}: {code or exc}") from exc
        except BotoCoreError as exc:
            raise StorageUnavailable(f"object storage unreachable: {exc}") from exc

    # -- writes ------------------------------------------------------------------------------------

    def put_file(self, key: str, src: Path, *, move: bool = False, sha256: str | None = None) -> StoredObject:
        with src.open("rb") as f:
            stored = self.put_stream(key, iter(lambda: f.read(CHUNK), b""))
        if sha256 is not None and sha256 != stored.sha256:
            self.delete(key)
            raise StorageUnavailable(f"{src.name} changed while it was stored")
        if move:
            src.unlink()
        return stored

    def put_stream(self, key: str, chunks: Iterable[bytes]) -> StoredObject:
        """Store the chunks through a `writer`, aborted if anything fails before it completes."""
        writer = self.writer(key)
        try:
            for chunk in chunks:
                writer.write(chunk)
        except BaseException:
            writer.abort()
            raise
        return writer.commit()

    def writer(self, key: str) -> S3Writer:
        return S3Writer(self, key)

    def _part(self, key: str, upload_id: str, number: int, body: bytearray) -> dict[str, Any]:
        answer = self._call(self.client.upload_part, key, UploadId=upload_id, PartNumber=number, Body=body)
        return {"ETag": answer["ETag"], "PartNumber": number}

    def _abort(self, key: str, upload_id: str) -> None:
        # If this fails too, the store's lifecycle rule or the next delete_prefix removes the parts.
        with contextlib.suppress(OSError):
            self._call(self.client.abort_multipart_upload, key, UploadId=upload_id)

    # -- reads -------------------------------------------------------------------------------------

    def open(self, key: str) -> BinaryIO:
        return cast(BinaryIO, self._call(self.client.get_object, key)["Body"])

    def open_seekable(self, key: str) -> BinaryIO:
        return cast(BinaryIO, RangedReader(self, key, self.size(key)))

    def iter_bytes(
        self, key: str, chunk_size: int = CHUNK, *, start: int = 0, end: int | None = None
    ) -> Iterator[bytes]:
        ranged = start or end is not None
        extra: dict[str, Any] = {"Range": f"bytes={start}-{'' if end is None else end}"} if ranged else {}
        body = self._call(self.client.get_object, key, **extra)["Body"]
        try:
            yield from body.iter_chunks(chunk_size)
        except (BotoCoreError, ClientError) as exc:
            raise StorageUnavailable(f"object storage broke off a read: {exc}") from exc
        finally:
            body.close()

    def size(self, key: str) -> int:
        return int(self._call(self.client.head_object, key)["ContentLength"])

    def download(self, key: str, dest: Path, *, sha256: str | None = None) -> None:
        chunks = self.iter_bytes(key, 4 * CHUNK)
        first = next(chunks, b"")  # the GET: a missing key or a dead store fails before `dest` exists
        digest = BesideHash() if sha256 is not None else None
        try:
            with dest.open("xb") as f:
                for chunk in itertools.chain([first], chunks):
                    if digest is not None:
                        digest.update(chunk)  # beside the write
                    f.write(chunk)
            if digest is not None and (actual := digest.hexdigest()) != sha256:
                raise ObjectCorrupt(key, str(sha256), actual)
        except BaseException:
            if digest is not None:
                digest.cancel()
            dest.unlink(missing_ok=True)
            raise

    def keys(self, prefix: str) -> list[str]:
        found: list[str] = []
        token: dict[str, Any] = {}
        while True:
            page = self._call(self.client.list_objects_v2, Prefix=self.prefix + prefix, **token)
            found += [obj["Key"][len(self.prefix) :] for obj in page.get("Contents", [])]
            if not page.get("IsTruncated"):
                return found
            token = {"ContinuationToken": page["NextContinuationToken"]}

    def listing(self, prefix: str = "") -> Iterator[ListedObject]:
        """Finished objects only: the parts of a multipart upload are listed by `list_multipart_uploads`."""
        folder = self.prefix + (prefix.rstrip("/") + "/" if prefix.strip("/") else "")
        token: dict[str, Any] = {}
        while True:
            page = self._call(self.client.list_objects_v2, Prefix=folder, **token)
            for obj in page.get("Contents", []):
                key = obj["Key"][len(self.prefix) :]
                yield ListedObject(key, int(obj["Size"]), obj["LastModified"].astimezone(UTC))
            if not page.get("IsTruncated"):
                return
            token = {"ContinuationToken": page["NextContinuationToken"]}

    def presigned_url(self, key: str, *, expires_s: int, filename: str) -> str | None:
        params = {
            "Bucket": self.bucket,
            "Key": self._key(key),
            "ResponseContentDisposition": f'attachment; filename="{filename}"',
        }
        url: str = self.client.generate_presigned_url("get_object", Params=params, ExpiresIn=expires_s)
        return url

    # -- deletes and health ------------------------------------------------------------------------

    def delete(self, key: str) -> None:
        self._call(self.client.delete_object, key)

    def delete_prefix(self, prefix: str) -> None:
        """Every object under the prefix, and every unfinished multipart upload there (an attempt
        that died mid-upload)."""
        full = self.prefix + prefix
        keys = self.keys(prefix)
        for i in range(0, len(keys), 1000):
            objects = [{"Key": self.prefix + k} for k in keys[i : i + 1000]]
            self._call(self.client.delete_objects, Delete={"Objects": objects, "Quiet": True})
        uploads = self._call(self.client.list_multipart_uploads, Prefix=full).get("Uploads", [])
        for upload in uploads:
            self._abort(upload["Key"][len(self.prefix) :], upload["UploadId"])

    def check(self) -> None:
        """Raise StorageUnavailable unless the bucket answers."""
        self._call(self.client.head_bucket)

    # -- uploads whose parts the client sends itself (`DirectUploads`) ------------------------------

    def direct_uploads(self) -> S3Storage:
        return self

    def start_upload(self, key: str) -> str:
        return str(self._call(self.client.create_multipart_upload, key)["UploadId"])

    def part_url(self, key: str, upload_id: str, number: int, size_bytes: int, *, expires_s: int) -> str:
        # Content-Length is signed: the store refuses a part of any other size (AWS, MinIO; moto does not check).
        params = {
            "Bucket": self.bucket,
            "Key": self._key(key),
            "UploadId": upload_id,
            "PartNumber": number,
            "ContentLength": size_bytes,
        }
        url: str = self.client.generate_presigned_url("upload_part", Params=params, ExpiresIn=expires_s)
        return url

    def uploaded_parts(self, key: str, upload_id: str) -> list[UploadedPart]:
        parts: list[UploadedPart] = []
        marker: dict[str, Any] = {}
        while True:
            page = self._call(self.client.list_parts, key, missing=NO_SUCH_UPLOAD, UploadId=upload_id, **marker)
            parts += [
                UploadedPart(int(p["PartNumber"]), int(p["Size"]), str(p["ETag"]), _utc(p.get("LastModified")))
                for p in page.get("Parts", [])
            ]
            if not page.get("IsTruncated"):
                return parts
            marker = {"PartNumberMarker": page["NextPartNumberMarker"]}

    def unfinished_uploads(self, prefix: str = "") -> Iterator[UnfinishedUpload]:
        folder = self.prefix + (prefix.rstrip("/") + "/" if prefix.strip("/") else "")
        marker: dict[str, Any] = {}
        while True:
            page = self._call(self.client.list_multipart_uploads, Prefix=folder, **marker)
            for upload in page.get("Uploads", []):
                key = upload["Key"][len(self.prefix) :]
                yield UnfinishedUpload(key, str(upload["UploadId"]), upload["Initiated"].astimezone(UTC))
            if not page.get("IsTruncated"):
                return
            marker = {"KeyMarker": page["NextKeyMarker"], "UploadIdMarker": page["NextUploadIdMarker"]}

    def complete_upload(self, key: str, upload_id: str, parts: list[UploadedPart]) -> None:
        listed = [{"PartNumber": p.number, "ETag": p.etag} for p in sorted(parts, key=lambda p: p.number)]
        self._call(
            self.client.complete_multipart_upload,
            key,
            missing=NO_SUCH_UPLOAD,
            UploadId=upload_id,
            MultipartUpload={"Parts": listed},
        )

    def abort_upload(self, key: str, upload_id: str) -> None:
        self._abort(key, upload_id)


class S3Writer:
    """Bytes pushed into a new object, hashed on the way: one PUT when they fit in one part, else a
    multipart upload with up to PARALLEL_PARTS parts in flight, visible only once `commit`
    completes it. `abort` (or any failure in `commit`) removes what was sent."""

    def __init__(self, storage: S3Storage, key: str) -> None:
        self.storage = storage
        self.key = key
        self.digest = BesideHash()
        self.size = 0
        self.buffer = bytearray()
        self.upload_id: str | None = None
        self.sent: list[Future[dict[str, Any]]] = []
        self.pool = ThreadPoolExecutor(PARALLEL_PARTS, thread_name_prefix="qaas-s3-part")

    def write(self, chunk: bytes | memoryview) -> None:
        self.digest.update(chunk)
        self.size += len(chunk)
        self.buffer += chunk
        if len(self.buffer) >= self.storage.part_bytes:
            try:
                self._send()
            except BaseException:
                self.abort()
                raise

    def _send(self) -> None:
        storage = self.storage
        if self.upload_id is None:
            self.upload_id = storage._call(storage.client.create_multipart_upload, self.key)["UploadId"]
        if len(self.sent) >= PARALLEL_PARTS:
            self.sent[-PARALLEL_PARTS].result()  # bounded memory: wait for the oldest in flight
        number = len(self.sent) + 1
        self.sent.append(self.pool.submit(storage._part, self.key, self.upload_id, number, self.buffer))
        self.buffer = bytearray()  # the part keeps its buffer: no copy

    def commit(self) -> StoredObject:
        storage = self.storage
        try:
            # The sha256 is returned for the caller's database row; the object's ETag is S3's own.
            if self.upload_id is None:
                storage._call(storage.client.put_object, self.key, Body=bytes(self.buffer))
            else:
                if self.buffer:
                    self._send()
                parts = [future.result() for future in self.sent]
                storage._call(
                    storage.client.complete_multipart_upload,
                    self.key,
                    UploadId=self.upload_id,
                    MultipartUpload={"Parts": parts},
                )
        except BaseException:
            self.abort()
            raise
        self.pool.shutdown()
        return StoredObject(self.key, self.size, self.digest.hexdigest())

    def abort(self) -> None:
        self.digest.cancel()
        for future in self.sent:
            future.cancel()
        wait(self.sent)
        self.pool.shutdown()
        if self.upload_id is not None:
            self.storage._abort(self.key, self.upload_id)
            self.upload_id = None


class RangedReader(io.RawIOBase):
    """A stored object as a seekable, read-only file: each read beyond the bytes in hand is a ranged
    GET from there, so a zip's directory, an `.npy` header or an image's header is read where it lies
    and the object is never downloaded whole. A GET fetches at least the window: MIN_WINDOW after a
    jump backwards (zipfile going from the directory to a member), doubled up to MAX_WINDOW while
    reads move forward (members checked in the order they are stored), so checking every member of
    a zip costs about one sequential read of it at most, in few requests.

    A failed GET is raised as it is (StorageUnavailable), and again when the `with` block ends: the
    code reading the file may have taken it for a broken file, but the store, not the file, failed."""

    def __init__(self, storage: S3Storage, key: str, size: int) -> None:
        super().__init__()
        self.storage, self.key, self.size = storage, key, size
        self.pos = 0
        self.buffer = b""
        self.buffer_start = 0
        self.window = MIN_WINDOW // 2
        self.requests = 0
        self.fetched_bytes = 0
        self.failure: OSError | None = None

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.size}[whence]
        if base + offset < 0:
            raise ValueError(f"negative seek position {base + offset}")
        self.pos = base + offset
        return self.pos

    def readinto(self, b: Any) -> int:
        view = memoryview(b).cast("B")
        want = max(0, min(len(view), self.size - self.pos))
        done = 0
        while done < want:
            at = self.pos - self.buffer_start
            if not 0 <= at < len(self.buffer):
                self._fetch(want - done)
                at = 0
            n = min(want - done, len(self.buffer) - at)
            view[done : done + n] = self.buffer[at : at + n]
            done += n
            self.pos += n
        return done

    def readall(self) -> bytes:
        return self.read(max(0, self.size - self.pos))

    def _fetch(self, want: int) -> None:
        forward = bool(self.buffer) and self.pos >= self.buffer_start
        self.window = min(MAX_WINDOW, self.window * 2) if forward else MIN_WINDOW
        length = min(self.size - self.pos, max(want, self.window))
        self.buffer = b""  # the old window goes before the new one arrives
        try:
            data = b"".join(self.storage.iter_bytes(self.key, start=self.pos, end=self.pos + length - 1))
            if not data:
                raise StorageUnavailable(f"object storage returned nothing at byte {self.pos} of {self.key!r}")
        except OSError as exc:
            self.failure = self.failure or exc
            raise
        self.requests += 1
        self.fetched_bytes += len(data)
        self.buffer, self.buffer_start = data, self.pos

    def __exit__(self, *exc_info: Any) -> None:
        self.close()
        if self.failure is not None:
            raise self.failure
