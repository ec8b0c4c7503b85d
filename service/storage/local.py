"""The local-filesystem backend (the embedded default): keys are relative paths under one folder, written
to a temporary name and renamed into place."""

from __future__ import annotations

import os
import shutil
import stat
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO

from service.storage.base import (
    CHUNK,
    BesideHash,
    ListedObject,
    ObjectMissing,
    ObjectWriter,
    StoredObject,
    checked_key,
    sha256_file,
)


class LocalStorage:
    """Keys are POSIX relative paths under `root`; temporary files live in `root/.tmp`."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.tmp = self.root / ".tmp"

    def ensure(self) -> None:
        self.tmp.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*checked_key(key).parts)

    def put_file(self, key: str, src: Path, *, move: bool = False, sha256: str | None = None) -> StoredObject:
        """Store `src` under `key`. `sha256`: the caller hashed the bytes while writing them, so they
        are not read again (a moved multi-GB upload would otherwise be re-read just to hash it)."""
        dest = self._path(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.tmp / f"{uuid.uuid4().hex}.part"
        self.tmp.mkdir(parents=True, exist_ok=True)
        size = src.stat().st_size
        if move:
            try:
                os.replace(src, tmp)
            except OSError:  # another filesystem: copy instead
                shutil.copyfile(src, tmp)
                src.unlink()
        else:
            shutil.copyfile(src, tmp)
        digest = sha256 or sha256_file(tmp)
        with tmp.open("rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, dest)
        return StoredObject(key, size, digest)

    def writer(self, key: str) -> ObjectWriter:
        self.ensure()
        return _LocalWriter(self, key, self.tmp / f"{uuid.uuid4().hex}.part")

    def open(self, key: str) -> BinaryIO:
        try:
            return self._path(key).open("rb")
        except FileNotFoundError as exc:
            raise ObjectMissing(f"no stored object {key!r}") from exc

    def open_seekable(self, key: str) -> BinaryIO:
        return self.open(key)

    def iter_bytes(
        self, key: str, chunk_size: int = CHUNK, *, start: int = 0, end: int | None = None
    ) -> Iterator[bytes]:
        with self.open(key) as f:
            f.seek(start)
            left = None if end is None else end - start + 1
            while left is None or left > 0:
                chunk = f.read(chunk_size if left is None else min(chunk_size, left))
                if not chunk:
                    return
                if left is not None:
                    left -= len(chunk)
                yield chunk

    def size(self, key: str) -> int:
        try:
            return self._path(key).stat().st_size
        except FileNotFoundError as exc:
            raise ObjectMissing(f"no stored object {key!r}") from exc

    def download(self, key: str, dest: Path, *, sha256: str | None = None) -> None:
        """`sha256` is not checked: every object here was written, and hashed, by the service itself."""
        src = self._path(key)
        try:
            os.link(src, dest)  # stored files are never changed in place, so a link is a copy
            return
        except OSError:
            if not src.is_file():
                raise ObjectMissing(f"no stored object {key!r}") from None
        try:
            shutil.copyfile(src, dest)  # another file system
        except BaseException:
            dest.unlink(missing_ok=True)
            raise

    def keys(self, prefix: str) -> list[str]:
        base = self._path(prefix.rstrip("/"))
        if base.is_file():
            return [prefix]
        if not base.is_dir():
            return []
        return sorted(p.relative_to(self.root).as_posix() for p in base.rglob("*") if p.is_file())

    def listing(self, prefix: str = "") -> Iterator[ListedObject]:
        """Regular files only, `.tmp`'s writes in progress included (a write renamed into place keeps the
        time of its last byte)."""
        base = self._path(prefix.rstrip("/")) if prefix.strip("/") else self.root
        folders = [base]
        while folders:
            try:
                entries = list(os.scandir(folders.pop()))
            except (FileNotFoundError, NotADirectoryError):
                continue
            for entry in entries:
                try:
                    info = entry.stat(follow_symlinks=False)
                except FileNotFoundError:  # gone meanwhile
                    continue
                if stat.S_ISDIR(info.st_mode):
                    folders.append(Path(entry.path))
                elif stat.S_ISREG(info.st_mode):
                    key = Path(entry.path).relative_to(self.root).as_posix()
                    yield ListedObject(key, info.st_size, datetime.fromtimestamp(info.st_mtime, UTC))

    def presigned_url(self, key: str, *, expires_s: int, filename: str) -> str | None:
        return None

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def delete_prefix(self, prefix: str) -> None:
        path = self._path(prefix.rstrip("/"))
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)

    def check(self) -> None:
        """Raise OSError unless the storage root is writable."""
        self.ensure()
        probe = self.tmp / f"ready-{uuid.uuid4().hex}"
        probe.write_bytes(b"ok")
        probe.unlink()

    def direct_uploads(self) -> None:
        """None: clients send their files through the API, which is the only way into this folder."""
        return None


class _LocalWriter:
    def __init__(self, storage: LocalStorage, key: str, tmp: Path) -> None:
        self.storage, self.key, self.tmp = storage, key, tmp
        self.file = tmp.open("xb")
        self.digest = BesideHash()
        self.size = 0

    def write(self, chunk: bytes | memoryview) -> None:
        self.digest.update(chunk)
        self.file.write(chunk)
        self.size += len(chunk)

    def commit(self) -> StoredObject:
        dest = self.storage._path(self.key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self.tmp, dest)
        return StoredObject(self.key, self.size, self.digest.hexdigest())

    def abort(self) -> None:
        self.digest.cancel()
        self.file.close()
        self.tmp.unlink(missing_ok=True)
