"""External data sent straight to the service's object store: the service hands out presigned URLs of
each file's parts (`POST /v1/uploads`), the parts go to the store a few at once without passing through
the service, and the model is completed with the upload's id (`Client.upload_model` does all of it).

The API key never goes to the store: each URL's signature is the credential there, and the URLs are
never shown whole (their query string is that credential). Each file's sha256 is computed on the way,
for the service to record and its workers to check."""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

import httpx

from qaas_client.errors import QaasError
from qaas_client.http import Http

log = logging.getLogger("qaas_client")

PARALLEL_PARTS = 4  # parts in flight at once (memory: a chunk each; the file is read where it lies)
PART_ATTEMPTS = 3
CHUNK = 1 << 20
HASH_CHUNK = 8 << 20
NOT_OFFERED = "direct_uploads_unavailable"


class StoreUnreachable(Exception):
    """The object store's URLs cannot be reached from here (it may sit on a network of the service's own)."""


def start(http: Http, files: Sequence[Path]) -> dict[str, Any] | None:
    """A new upload of `files` (`POST /v1/uploads`), or None when the service offers none: it keeps its
    files itself (409 `direct_uploads_unavailable`) or predates the endpoint (404, 405)."""
    body = {"files": [{"name": path.name, "size_bytes": path.stat().st_size} for path in files]}
    try:
        plan: dict[str, Any] = http.json("POST", "/v1/uploads", json=body)
    except QaasError as exc:
        if (exc.status == 409 and exc.code == NOT_OFFERED) or exc.status in (404, 405):
            return None
        raise
    return plan


def send(plan: dict[str, Any], files: Sequence[Path], store: httpx.Client) -> dict[str, str]:
    """PUT every part of the plan's files (in the order the upload lists them, `files` in the same order)
    and return each file's sha256 by the name the upload keeps it under. Raises StoreUnreachable when
    not one part could connect, QaasError when the store refuses a part."""
    planned = plan["files"]
    if len(planned) != len(files):
        raise QaasError("unexpected_response", f"The service planned {len(planned)} files for {len(files)} sent.")
    reached = threading.Event()
    hashes: dict[str, str] = {}
    with ThreadPoolExecutor(PARALLEL_PARTS + 1, thread_name_prefix="qaas-upload") as pool:
        hashing = pool.submit(_hash_all, planned, files, hashes)
        puts: list[Future[None]] = [
            pool.submit(_put_part, store, path, entry["name"], part, reached)
            for entry, path in zip(planned, files, strict=True)
            for part in entry["parts"]
        ]
        done, _ = wait([hashing, *puts], return_when=FIRST_EXCEPTION)
        failed = next((f for f in done if f.exception() is not None), None)
        if failed is not None:
            for future in puts:
                future.cancel()
            exc = failed.exception()
            assert exc is not None
            raise exc
    return hashes


def _hash_all(planned: list[dict[str, Any]], files: Sequence[Path], hashes: dict[str, str]) -> None:
    for entry, path in zip(planned, files, strict=True):
        digest = hashlib.sha256()
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(HASH_CHUNK), b""):
                digest.update(chunk)
        hashes[entry["name"]] = digest.hexdigest()


def _read(path: Path, offset: int, size: int) -> Iterator[bytes]:
    fd = os.open(path, os.O_RDONLY)
    try:
        end = offset + size
        while offset < end:
            chunk = os.pread(fd, min(CHUNK, end - offset), offset)
            if not chunk:
                raise QaasError("file_changed", f"{path} became shorter while it was uploaded; upload it again.")
            offset += len(chunk)
            yield chunk
    finally:
        os.close(fd)


def _put_part(store: httpx.Client, path: Path, name: str, part: dict[str, Any], reached: threading.Event) -> None:
    url = httpx.URL(part["url"])
    where = f"{url.scheme}://{url.netloc.decode('ascii', 'replace')}"
    what = f"part {part['number']} of {name}"
    for attempt in range(1, PART_ATTEMPTS + 1):
        headers = {"Content-Length": str(part["size_bytes"])}  # signed: exactly the part, never chunked
        try:
            response = store.put(url, content=_read(path, part["offset"], part["size_bytes"]), headers=headers)
        except httpx.ConnectError as exc:
            if not reached.is_set():
                raise StoreUnreachable(f"the object store at {where} cannot be reached ({exc})") from exc
            problem = f"could not connect ({exc})"
        except httpx.TransportError as exc:
            problem = f"the connection broke ({type(exc).__name__})"
        else:
            reached.set()
            if response.is_success:
                return
            if response.status_code < 500 and response.status_code != 429:
                raise QaasError(
                    "store_refused",
                    f"The object store at {where} refused {what}: {response.status_code} {response.reason_phrase} "
                    f"{response.text[:300]}",
                    status=response.status_code,
                )
            problem = f"it answered {response.status_code}"
        if attempt < PART_ATTEMPTS:
            log.info("%s to %s: %s; sending it again", what, where, problem)
            time.sleep(0.5 * 2 ** (attempt - 1))
    raise QaasError(
        "store_failed", f"The object store at {where} did not take {what} in {PART_ATTEMPTS} tries: {problem}."
    )
