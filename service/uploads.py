"""Staging of uploaded files: a private folder per upload, where the streaming parser
(`service/upload_stream.py`) has already written each file, counted and hashed."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from service.errors import PayloadTooLarge
from service.settings import Settings
from service.storage import HashedWrite
from service.upload_stream import StagedPart


@contextmanager
def staging_dir(settings: Settings) -> Iterator[Path]:
    """A fresh folder for one upload, removed afterwards whatever happens."""
    path = settings.resolved_data_dir / "staging" / uuid.uuid4().hex
    path.mkdir(parents=True)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def stage_upload(upload: StagedPart, dest: Path, *, max_bytes: int, what: str, chunk_size: int) -> HashedWrite:
    """Move the parsed file to `dest` (a rename: both live under the staging folder)."""
    if upload.size_bytes > max_bytes:
        raise PayloadTooLarge(
            f"The {what} is larger than the limit of {max_bytes} bytes; upload a smaller file "
            "or ask the operator to raise the limit.",
            detail={"limit_bytes": max_bytes, "field": what},
        )
    if dest.exists():
        raise FileExistsError(dest)
    os.replace(upload.path, dest)
    return HashedWrite(dest, upload.size_bytes, upload.sha256, upload.stored_key)
