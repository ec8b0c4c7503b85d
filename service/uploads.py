"""Staging of uploaded files: a private folder per upload, where the streaming parser
(`service/upload_stream.py`) has already written each file, counted and hashed; and the removal of
what an upload that was refused or broke off had already put into storage."""

from __future__ import annotations

import logging
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import anyio
from starlette.concurrency import run_in_threadpool

from service.errors import PayloadTooLarge
from service.settings import Settings
from service.storage import HashedWrite, Storage
from service.upload_stream import StagedPart

log = logging.getLogger(__name__)


async def discard(storage: Storage, prefix: str) -> None:
    """Delete what a refused or broken upload stored under `prefix`: shielded, so it happens also
    when the client left; best effort, so the upload's own error is the answer when storage is down
    (what stays then has no row, and no later answer names it)."""
    with anyio.CancelScope(shield=True):
        try:
            await run_in_threadpool(storage.delete_prefix, prefix)
        except OSError as exc:
            log.warning("could not delete %s after a failed upload: %s", prefix, exc)


STAGING_STALE_S = 3600


def sweep_staging(settings: Settings, older_than_s: float = STAGING_STALE_S) -> list[str]:
    """Remove what uploads left in the staging folder when the API died mid-request (`staging_dir` removes
    its folder on every other exit): each entry whose newest file or folder is older than `older_than_s`.
    An upload still streaming touches its file all the time, so another replica's upload stays. Runs at
    the API's start. Returns the names removed."""
    root = settings.resolved_data_dir / "staging"
    if not root.is_dir():
        return []
    cutoff = time.time() - older_than_s
    removed: list[str] = []
    for entry in root.iterdir():
        try:
            if _newest_mtime(entry) >= cutoff:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        except OSError as exc:  # gone meanwhile, or not ours to remove: the next start looks again
            log.warning("could not remove the stale staging entry %s: %s", entry.name, exc)
            continue
        removed.append(entry.name)
    if removed:
        log.warning("removed %d stale staging entr%s: %s", len(removed), "y" if len(removed) == 1 else "ies", removed)
    return removed


def _newest_mtime(path: Path) -> float:
    newest = path.lstat().st_mtime
    if path.is_dir() and not path.is_symlink():
        for folder, dirs, files in os.walk(path):
            for name in (*dirs, *files):
                newest = max(newest, os.lstat(os.path.join(folder, name)).st_mtime)
    return newest


@contextmanager
def staging_dir(settings: Settings) -> Iterator[Path]:
    """A fresh folder for one upload, removed afterwards whatever happens."""
    path = settings.resolved_data_dir / "staging" / uuid.uuid4().hex
    path.mkdir(parents=True)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def check_size(upload: StagedPart, max_bytes: int, what: str) -> None:
    if upload.size_bytes > max_bytes:
        raise PayloadTooLarge(
            f"The {what} is larger than the limit of {max_bytes} bytes; upload a smaller file "
            "or ask the operator to raise the limit.",
            detail={"limit_bytes": max_bytes, "field": what},
        )


def stage_upload(upload: StagedPart, dest: Path, *, max_bytes: int, what: str) -> HashedWrite:
    """Move the parsed file to `dest` (a rename: both live under the staging folder). A file whose
    bytes went straight to storage gets a sparse placeholder of its size at `dest` instead: the size
    without the bytes, for checks that need only that (a model's external data)."""
    check_size(upload, max_bytes, what)
    if dest.exists():
        raise FileExistsError(dest)
    if upload.stored_key is not None:
        with dest.open("xb") as placeholder:
            placeholder.truncate(upload.size_bytes)
    else:
        os.replace(upload.path, dest)
    return HashedWrite(dest, upload.size_bytes, upload.sha256, upload.stored_key)
