"""Staging of uploaded files: streamed to a private folder in chunks, counted and hashed."""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from fastapi import UploadFile

from service.errors import PayloadTooLarge
from service.settings import Settings
from service.storage import HashedWrite, write_stream


@contextmanager
def staging_dir(settings: Settings) -> Iterator[Path]:
    """A fresh folder for one upload, removed afterwards whatever happens."""
    path = settings.resolved_data_dir / "staging" / uuid.uuid4().hex
    path.mkdir(parents=True)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def stage_upload(upload: UploadFile, dest: Path, *, max_bytes: int, what: str, chunk_size: int) -> HashedWrite:
    upload.file.seek(0)
    chunks = iter(lambda: upload.file.read(chunk_size), b"")
    try:
        return write_stream(dest, chunks, max_bytes=max_bytes)
    except OverflowError as exc:
        raise PayloadTooLarge(
            f"The {what} is larger than the limit of {max_bytes} bytes; upload a smaller file "
            "or ask the operator to raise the limit.",
            detail={"limit_bytes": max_bytes, "field": what},
        ) from exc
