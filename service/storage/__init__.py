"""Blob storage: the interface (`base`), its local-filesystem backend (`local`, the embedded default) and
S3-compatible object storage (`s3`), chosen from the settings by `open_storage`."""

from __future__ import annotations

from service.settings import Settings
from service.storage.base import (
    CHUNK,
    BesideHash,
    DirectUploads,
    HashedWrite,
    ListedObject,
    ObjectCorrupt,
    ObjectMissing,
    ObjectWriter,
    Storage,
    StorageUnavailable,
    StoredObject,
    UnfinishedUpload,
    UploadedPart,
    sha256_file,
)
from service.storage.local import LocalStorage
from service.storage.s3 import S3Storage

__all__ = [
    "CHUNK",
    "BesideHash",
    "DirectUploads",
    "HashedWrite",
    "ListedObject",
    "LocalStorage",
    "ObjectCorrupt",
    "ObjectMissing",
    "ObjectWriter",
    "S3Storage",
    "Storage",
    "StorageUnavailable",
    "StoredObject",
    "UnfinishedUpload",
    "UploadedPart",
    "open_storage",
    "sha256_file",
]


def open_storage(settings: Settings) -> Storage:
    """The storage the settings name: S3-compatible object storage for `QAAS_STORAGE_URL=s3://...`,
    else the local folder (the embedded default)."""
    if settings.storage_url:
        return S3Storage.from_settings(settings)
    local = LocalStorage(settings.resolved_storage_dir)
    local.ensure()
    return local
