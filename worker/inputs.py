"""A worker's local copies of the stored inputs its jobs read (models, their external data,
datasets): downloaded once into a cache keyed by sha256, bounded in bytes, and hard-linked (model
files: copied) into each job's work dir, so a job never reads from storage through a path and a
busy worker does not fetch the same model for every job.

The cache holds whole files only: a download goes to a temporary name and is renamed into place.
Least recently used files go first when a new one would pass the bound; a file a running job has
linked stays readable through its link after it left the cache.

A sha256 may be the client's word, not the service's (external data uploaded straight to the object
store, `POST /v1/uploads`): a download is hashed on its way and refused (`input_corrupt`) unless it
matches, and a cached file serves a key only once that key's own bytes were seen to hash to it, so
declaring another tenant's sha256 never brings their file into a job.

A job shares the inode of a hard-linked file with the cache, so every file a job gets is the worker's
and read-only (0444), the cache's folders are the worker's alone (0700), and a cached file is hashed
again before each use: a file changed since (by a job running as the worker's own user) is fetched
anew rather than handed on."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import stat
import uuid
from pathlib import Path

from core.errors import RuleError
from service.storage import ObjectCorrupt, Storage, sha256_file

log = logging.getLogger(__name__)
READ_ONLY = 0o444


class InputCache:
    def __init__(self, storage: Storage, folder: Path, max_bytes: int) -> None:
        self.storage = storage
        self.folder = folder
        self.max_bytes = max_bytes
        self.seen = folder.with_name(folder.name + ".seen")  # marks beside the cache, which holds only files

    def fetch(self, key: str, sha256: str, size: int, dest: Path, *, copy: bool = False) -> Path:
        """The stored object `key` (whose content hashes to `sha256`) as the new file `dest`:
        a hard link to the cached file, or with `copy` a file of its own (ONNX refuses to read
        external data from a file with several links, a guard against hard-link attacks)."""
        dest.parent.mkdir(parents=True, exist_ok=True)
        if size > self.max_bytes:  # would never fit: straight into the job's folder
            self._download(key, sha256, dest)
            dest.chmod(READ_ONLY)
            return dest
        cached = self.folder / sha256
        if not (cached.is_file() and self._mark(key, sha256).exists() and self._intact(cached, sha256)):
            self._make_room(size)
            _private(self.folder)
            tmp = self.folder / f".{uuid.uuid4().hex}.part"
            try:
                self._download(key, sha256, tmp)
                tmp.chmod(READ_ONLY)
                os.replace(tmp, cached)  # another process may have won the race: same bytes
            finally:
                tmp.unlink(missing_ok=True)
            _private(self.seen)
            self._mark(key, sha256).touch()
        with contextlib.suppress(OSError):
            os.utime(cached)  # most recently used
        if copy:
            shutil.copyfile(cached, dest)  # copy_file_range: in the kernel, no network
            dest.chmod(READ_ONLY)
            return dest
        try:
            os.link(cached, dest)
        except OSError:  # the work dir is on another file system
            shutil.copyfile(cached, dest)
            dest.chmod(READ_ONLY)
        return dest

    def _intact(self, cached: Path, sha256: str) -> bool:
        """The cached file still hashes to its name; if not, it goes (with its marks), to be fetched again."""
        if sha256_file(cached) == sha256:
            return True
        log.warning("cached input %s no longer hashes to its name; fetching it again", cached.name)
        cached.unlink(missing_ok=True)
        for mark in self.seen.glob(f"{cached.name}-*"):
            mark.unlink(missing_ok=True)
        return False

    def _download(self, key: str, sha256: str, dest: Path) -> None:
        try:
            self.storage.download(key, dest, sha256=sha256)
        except ObjectCorrupt as exc:
            name = key.rsplit("/", 1)[-1]
            raise RuleError(
                "input_corrupt",
                f"The stored file {name!r} does not match the sha256 recorded for it when it was uploaded "
                f"({exc.expected}; its bytes hash to {exc.actual}): the upload sent other bytes than it declared. "
                "Upload it again and start a new job.",
                {"file_name": name, "sha256_recorded": exc.expected, "sha256_stored": exc.actual},
            ) from exc

    def _mark(self, key: str, sha256: str) -> Path:
        """Present once `key`'s bytes were seen to hash to `sha256`; goes with the cached file."""
        return self.seen / f"{sha256}-{hashlib.sha256(key.encode()).hexdigest()[:32]}"

    def _make_room(self, incoming: int) -> None:
        if not self.folder.is_dir():
            return
        entries = []
        for path in self.folder.iterdir():
            if path.name.startswith("."):
                continue  # a download in progress (maybe another pool process's)
            with contextlib.suppress(OSError):
                info = path.lstat()
                # The cache's own files only: anything else standing here (a folder, a link) is neither
                # counted, followed nor removed, so it cannot make every later eviction fail.
                if stat.S_ISREG(info.st_mode):
                    entries.append((info.st_mtime, info.st_size, path))
        total = sum(size for _, size, _ in entries)
        for _, size, path in sorted(entries):
            if total + incoming <= self.max_bytes:
                return
            path.unlink(missing_ok=True)
            for mark in self.seen.glob(f"{path.name}-*"):
                mark.unlink(missing_ok=True)
            total -= size


def _private(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o700)
