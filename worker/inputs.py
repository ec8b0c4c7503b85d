"""A worker's local copies of the stored inputs its jobs read (models, their external data,
datasets): downloaded once into a cache keyed by sha256, bounded in bytes, and hard-linked (model
files: copied) into each job's work dir, so a job never reads from storage through a path and a
busy worker does not fetch the same model for every job.

The cache holds whole files only: a download goes to a temporary name and is renamed into place.
Least recently used files go first when a new one would pass the bound; a file a running job has
linked stays readable through its link after it left the cache."""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import uuid
from pathlib import Path

from service.storage import Storage


class InputCache:
    def __init__(self, storage: Storage, folder: Path, max_bytes: int) -> None:
        self.storage = storage
        self.folder = folder
        self.max_bytes = max_bytes

    def fetch(self, key: str, sha256: str, size: int, dest: Path, *, copy: bool = False) -> Path:
        """The stored object `key` (whose content hashes to `sha256`) as the new file `dest`:
        a hard link to the cached file, or with `copy` a file of its own (ONNX refuses to read
        external data from a file with several links, a guard against hard-link attacks)."""
        dest.parent.mkdir(parents=True, exist_ok=True)
        if size > self.max_bytes:  # would never fit: straight into the job's folder
            self.storage.download(key, dest)
            return dest
        cached = self.folder / sha256
        if not cached.is_file():
            self._make_room(size)
            self.folder.mkdir(parents=True, exist_ok=True)
            tmp = self.folder / f".{uuid.uuid4().hex}.part"
            try:
                self.storage.download(key, tmp)
                os.replace(tmp, cached)  # another process may have won the race: same bytes
            finally:
                tmp.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            os.utime(cached)  # most recently used
        if copy:
            shutil.copyfile(cached, dest)  # copy_file_range: in the kernel, no network
            return dest
        try:
            os.link(cached, dest)
        except OSError:  # the work dir is on another file system
            shutil.copyfile(cached, dest)
        return dest

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
            total -= size
