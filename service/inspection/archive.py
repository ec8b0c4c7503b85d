"""Safe reading of uploaded zip archives: limits, member names, and flat extraction.

The central directory's entry count and size are read from the end-of-central-directory record
(zip64 included) and checked before `zipfile` parses the directory: parsing builds one object per
entry, so a small archive of many tiny entries would otherwise cost far more memory than its size
before any limit is checked. Each archive is then parsed once (`checked_zip`).

An archive is a file on disk or a seekable file object (`Archive`): a stored object read in place
through ranged reads (`Storage.open_seekable`) is checked without ever being copied to local disk.

Members are read only through `ZipMembers`, never through `zipfile`'s own readers: those trust the
sizes an archive declares (bzip2 and LZMA members are inflated a whole compressed window at a time,
and `read()` takes a member whole), so a few hundred bytes could make the API allocate gigabytes. Only
stored and deflate members are accepted (what numpy and the usual zip tools write); every decompressor
call may produce at most the bytes asked for and still declared, a member that inflates past its
declared size or ends short of it is refused, and a stored member must hold exactly what it declares."""

from __future__ import annotations

import io
import os
import stat
import struct
import zipfile
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, BinaryIO, cast

from core.images import member_name as safe_member_name
from service.errors import InvalidDataset, InvalidModel, PayloadTooLarge, ServiceError
from service.storage import ObjectWriter, StoredObject

_CHUNK = 1 << 20
# Small entries compress extremely well when they are padding or zeros, so the ratio test
# only bites on entries large enough to matter.
_RATIO_MIN_BYTES = 1 << 20
_METHOD_NAMES = {zipfile.ZIP_BZIP2: "bzip2", zipfile.ZIP_LZMA: "LZMA", 9: "deflate64"}
_WINDOW = 64 << 10  # compressed bytes handed to the inflater at a time
_UNIX = 3
MAX_FILE_NAME_BYTES = 255  # one path component, on the filesystems storage runs on

# The end-of-central-directory record, the zip64 locator before it and the zip64 record before that.
_EOCD = struct.Struct("<4s4H2LH")
_EOCD_SIGNATURE = b"PK\x05\x06"
_ZIP64_LOCATOR = struct.Struct("<4sLQL")
_ZIP64_LOCATOR_SIGNATURE = b"PK\x06\x07"
_ZIP64_EOCD = struct.Struct("<4sQ2H2L4Q")
_ZIP64_EOCD_SIGNATURE = b"PK\x06\x06"
_CENTRAL_HEADER = struct.Struct("<4s4B4HL2L5H2L")
_CENTRAL_SIGNATURE = b"PK\x01\x02"
_LOCAL_HEADER = struct.Struct("<4s5H3L2H")
_LOCAL_SIGNATURE = b"PK\x03\x04"
_UTF8_NAME = 0x800
_PATCHED_DATA = 0x20

Archive = Path | BinaryIO  # a zip on disk, or open and seekable


@contextmanager
def _reading(archive: Archive) -> Iterator[BinaryIO]:
    """The archive as an open file: opened here (and closed after) when it is a path."""
    if isinstance(archive, Path):
        with archive.open("rb") as f:
            yield f
    else:
        yield archive


@dataclass(frozen=True)
class ArchiveLimits:
    max_entries: int = 100_000
    max_directory_bytes: int = 16 << 20
    max_total_bytes: int = 4 << 30
    max_ratio: float = 200.0
    ratio_min_bytes: int = _RATIO_MIN_BYTES


def is_symlink_entry(info: zipfile.ZipInfo) -> bool:
    mode = info.external_attr >> 16
    return info.create_system == _UNIX and stat.S_ISLNK(mode)


def _is_special_entry(info: zipfile.ZipInfo) -> bool:
    mode = info.external_attr >> 16
    # Writers such as numpy.savez store permission bits only (no file-type bits): a regular file.
    if info.create_system != _UNIX or stat.S_IFMT(mode) == 0:
        return False
    return not (stat.S_ISREG(mode) or stat.S_ISDIR(mode))


def open_zip(archive: Archive, error_cls: type[ServiceError] = InvalidDataset) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError) as exc:
        raise error_cls(
            f"The archive is not a readable zip file ({exc}); upload a zip created by a standard tool.",
            detail={"reason": str(exc)},
        ) from exc


@dataclass(frozen=True)
class ZipDirectory:
    """Where the central directory is and what its end record declares."""

    entries: int
    offset: int
    size_bytes: int


def read_directory(archive: Archive, error_cls: type[ServiceError] = InvalidDataset) -> ZipDirectory:
    """The central directory as the end records describe it (zip64 included), found as `zipfile`
    finds it: the last end record in the file's tail, and the zip64 record just before it."""

    def broken(reason: str) -> ServiceError:
        return error_cls(
            f"The archive is not a readable zip file ({reason}); upload a zip created by a standard tool.",
            detail={"reason": reason},
        )

    try:
        with _reading(archive) as f:
            file_size = f.seek(0, os.SEEK_END)
            tail_start = max(0, file_size - _EOCD.size - 0xFFFF)  # the record plus the longest comment
            f.seek(tail_start)
            tail = f.read(file_size - tail_start)
            at = len(tail) - _EOCD.size
            if at < 0 or tail[at : at + 4] != _EOCD_SIGNATURE:
                at = tail.rfind(_EOCD_SIGNATURE)
            if at < 0 or at + _EOCD.size > len(tail):
                raise broken("no end-of-central-directory record")
            _, _, _, _, entries, size, _, _ = _EOCD.unpack_from(tail, at)
            end = tail_start + at  # where the directory (or the zip64 records after it) ends
            record64 = end - _ZIP64_LOCATOR.size - _ZIP64_EOCD.size
            if record64 >= 0:
                f.seek(record64)
                head = f.read(_ZIP64_EOCD.size + _ZIP64_LOCATOR.size)
                locator = head[_ZIP64_EOCD.size : _ZIP64_EOCD.size + 4] == _ZIP64_LOCATOR_SIGNATURE
                if locator and head[:4] == _ZIP64_EOCD_SIGNATURE:  # else zipfile, too, uses the plain record
                    fields = _ZIP64_EOCD.unpack_from(head)
                    entries, size = fields[7], fields[8]
                    end = record64
    except OSError as exc:
        raise broken(exc.strerror or type(exc).__name__) from exc
    if size > end:
        raise broken("the central directory claims more bytes than the archive holds")
    return ZipDirectory(entries=entries, offset=end - size, size_bytes=size)


def _too_many_entries(entries: int, limits: ArchiveLimits) -> PayloadTooLarge:
    return PayloadTooLarge(
        f"The archive holds {entries} entries, more than the limit of {limits.max_entries}; upload fewer files.",
        detail={"entries": entries, "limit": limits.max_entries},
    )


def check_directory(archive: Archive, limits: ArchiveLimits, error_cls: type[ServiceError] = InvalidDataset) -> None:
    """Refuse an archive over the entry or directory-size limits before anything parses its directory.

    The end record's count is checked first; then the directory's records are counted, a few bytes
    each, so an end record that understates the count cannot sneak more entries past the limit."""
    directory = read_directory(archive, error_cls)
    if directory.entries > limits.max_entries:
        raise _too_many_entries(directory.entries, limits)
    if directory.size_bytes > limits.max_directory_bytes:
        raise PayloadTooLarge(
            f"The archive's central directory is {directory.size_bytes} bytes, more than the limit of "
            f"{limits.max_directory_bytes}; upload fewer files or shorter file names.",
            detail={"directory_bytes": directory.size_bytes, "limit_bytes": limits.max_directory_bytes},
        )
    with _reading(archive) as f:
        f.seek(directory.offset)
        data = f.read(directory.size_bytes)
    counted = at = 0
    while at + _CENTRAL_HEADER.size <= len(data) and data[at : at + 4] == _CENTRAL_SIGNATURE:
        counted += 1
        if counted > limits.max_entries:
            raise _too_many_entries(counted, limits)
        fields = _CENTRAL_HEADER.unpack_from(data, at)
        at += _CENTRAL_HEADER.size + fields[12] + fields[13] + fields[14]  # name, extra, comment


@contextmanager
def checked_zip(
    archive: Archive, limits: ArchiveLimits = ArchiveLimits(), error_cls: type[ServiceError] = InvalidDataset
) -> Iterator[tuple[ZipMembers, list[zipfile.ZipInfo]]]:
    """The archive's members and its entries, its directory parsed once and every entry checked (see `check_zip`)."""
    check_directory(archive, limits, error_cls)
    with _reading(archive) as f:
        with open_zip(f, error_cls) as zf:
            infos = zf.infolist()
        size = f.seek(0, os.SEEK_END)
        _check_entries(infos, size, limits, error_cls)
        yield ZipMembers(f, size, error_cls), infos


def check_zip(
    archive: Archive, limits: ArchiveLimits = ArchiveLimits(), error_cls: type[ServiceError] = InvalidDataset
) -> list[zipfile.ZipInfo]:
    """Every entry of the zip after checking the central directory against `limits`.

    Sizes, counts and compression ratios raise PayloadTooLarge; malformed, encrypted, symlink or
    badly named entries raise `error_cls`. Nothing is decompressed here.
    """
    with checked_zip(archive, limits, error_cls) as (_, infos):
        return infos


def _check_entries(
    infos: list[zipfile.ZipInfo], archive_size: int, limits: ArchiveLimits, error_cls: type[ServiceError]
) -> None:
    if len(infos) > limits.max_entries:
        raise _too_many_entries(len(infos), limits)
    total = 0
    seen: set[str] = set()
    for info in infos:
        name = info.filename
        if info.flag_bits & 0x1:
            raise error_cls(
                f"Archive entry {name!r} is encrypted; upload an archive without a password.",
                detail={"entry": name},
            )
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED) or info.flag_bits & _PATCHED_DATA:
            method = _METHOD_NAMES.get(info.compress_type, f"compression method {info.compress_type}")
            raise error_cls(
                f"Archive entry {name!r} is compressed with {method}, which is not accepted (only deflate or "
                "no compression); re-create the archive with np.savez_compressed or zip -Z deflate.",
                detail={"entry": name, "compress_type": info.compress_type},
            )
        if info.compress_type == zipfile.ZIP_STORED and info.compress_size != info.file_size:
            raise error_cls(
                f"Archive entry {name!r} is stored uncompressed but declares {info.file_size} bytes and holds "
                f"{info.compress_size}; upload a complete, uncorrupted zip.",
                detail={"entry": name, "file_size": info.file_size, "compress_size": info.compress_size},
            )
        if is_symlink_entry(info) or _is_special_entry(info):
            raise error_cls(
                f"Archive entry {name!r} is a symbolic link or special file; archive the real files instead.",
                detail={"entry": name},
            )
        safe = safe_member_name(name.rstrip("/") if info.is_dir() else name)
        if safe is None and not (info.is_dir() and name.strip("/") in ("", ".")):
            raise error_cls(
                f"Archive entry name {name!r} is unsafe (absolute, '..', backslash or control "
                "character); use plain relative paths.",
                detail={"entry": name},
            )
        if safe is not None and any(len(part.encode()) > MAX_FILE_NAME_BYTES for part in safe.split("/")):
            raise error_cls(
                f"Archive entry name {name[:100]!r} has a part longer than {MAX_FILE_NAME_BYTES} bytes; "
                "use shorter file names.",
                detail={"entry": name[:MAX_FILE_NAME_BYTES]},
            )
        if info.header_offset + info.compress_size > archive_size:
            raise error_cls(
                f"Archive entry {name!r} claims more bytes than the archive holds; upload a complete, uncorrupted zip.",
                detail={"entry": name},
            )
        if info.is_dir():
            continue
        assert safe is not None
        if safe in seen:
            raise error_cls(
                f"Archive entry {name!r} appears more than once; keep one copy of each file.",
                detail={"entry": name},
            )
        seen.add(safe)
        if info.file_size >= limits.ratio_min_bytes and info.file_size > limits.max_ratio * max(info.compress_size, 1):
            raise PayloadTooLarge(
                f"Archive entry {name!r} expands {info.file_size} bytes from {info.compress_size}, "
                f"beyond the allowed compression ratio of {limits.max_ratio:g}; upload it less compressed.",
                detail={
                    "entry": name,
                    "file_size": info.file_size,
                    "compress_size": info.compress_size,
                    "max_ratio": limits.max_ratio,
                },
            )
        total += info.file_size
        if total > limits.max_total_bytes:
            raise PayloadTooLarge(
                f"The archive expands to more than the limit of {limits.max_total_bytes} bytes; upload less data.",
                detail={"limit_bytes": limits.max_total_bytes},
            )


class ZipMembers:
    """The members of a checked archive (`checked_zip`), each read through a `MemberReader`."""

    def __init__(self, source: BinaryIO, size: int, error_cls: type[ServiceError]) -> None:
        self._source, self._size, self._error_cls = source, size, error_cls

    @contextmanager
    def open(self, info: zipfile.ZipInfo) -> Iterator[IO[bytes]]:
        """The member as a seekable, read-only file; its local header is checked first."""
        with MemberReader(self._source, info, self._data_start(info), self._error_cls) as reader:
            yield cast(IO[bytes], reader)  # a BufferedIOBase, which typeshed does not count as an IO

    def _data_start(self, info: zipfile.ZipInfo) -> int:
        self._source.seek(info.header_offset)
        header = self._source.read(_LOCAL_HEADER.size)
        if len(header) < _LOCAL_HEADER.size or header[:4] != _LOCAL_SIGNATURE:
            raise _corrupt(info, "no local header where the central directory points", self._error_cls)
        fields = _LOCAL_HEADER.unpack(header)
        flags, name_length, extra_length = fields[2], fields[9], fields[10]
        name = self._source.read(name_length).decode("utf-8" if flags & _UTF8_NAME else "cp437", errors="replace")
        if name != info.orig_filename:
            raise _corrupt(info, "its local header names another file", self._error_cls)
        start = info.header_offset + _LOCAL_HEADER.size + name_length + extra_length
        if start + info.compress_size > self._size:
            raise _corrupt(info, "it claims more bytes than the archive holds", self._error_cls)
        return start


class MemberReader(io.BufferedIOBase):
    """One stored or deflated member, inflated as it is read. Every decompressor call may produce at
    most the bytes asked for and, by the declared size, still to come: memory follows the reads,
    whatever the archive declares. At the declared size the member must end (one byte more and it is
    refused) and its CRC-32 must match; seeking backwards starts it again."""

    def __init__(self, source: BinaryIO, info: zipfile.ZipInfo, data_start: int, error_cls: type[ServiceError]) -> None:
        super().__init__()
        self._source, self._info, self._data_start, self._error_cls = source, info, data_start, error_cls
        self._rewind()

    def _rewind(self) -> None:
        self._raw_at, self._raw_left = self._data_start, self._info.compress_size
        deflated = self._info.compress_type == zipfile.ZIP_DEFLATED
        self._inflater = zlib.decompressobj(-zlib.MAX_WBITS) if deflated else None
        self._pending = b""  # compressed bytes read and not yet inflated
        self._pos = self._crc = 0
        self._ended = False

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._info.file_size}[whence]
        target = min(max(base + offset, 0), self._info.file_size)
        if target < self._pos:
            self._rewind()
        while self._pos < target:
            self._next(min(target - self._pos, _CHUNK))
        return self._pos

    def read(self, size: int | None = -1) -> bytes:
        left = self._left()
        want = left if size is None or size < 0 else min(size, left)
        chunks = []
        while want > 0:
            chunk = self._next(min(want, _CHUNK))
            chunks.append(chunk)
            want -= len(chunk)
        if left == 0:
            self._end()  # an empty member is checked too
        return b"".join(chunks)

    def read1(self, size: int = -1) -> bytes:
        left = self._left()
        want = min(_CHUNK if size < 0 else size, left)
        if left == 0:
            self._end()
        return self._next(want) if want > 0 else b""

    def _left(self) -> int:
        if self.closed:
            raise ValueError("I/O operation on closed file.")
        return self._info.file_size - self._pos

    def _next(self, want: int) -> bytes:
        """Between 1 and `want` (> 0, at most what is left) bytes more."""
        data = self._raw(want) if self._inflater is None else self._inflate(want)
        if not data:
            raise self._corrupt(f"its data ends {self._left()} bytes short of its declared size")
        self._crc = zlib.crc32(data, self._crc)
        self._pos += len(data)
        if self._pos == self._info.file_size:
            self._end()
        return data

    def _raw(self, size: int) -> bytes:
        size = min(size, self._raw_left)
        if size <= 0:
            return b""
        self._source.seek(self._raw_at)
        data = self._source.read(size)
        self._raw_at += len(data)
        self._raw_left -= len(data)
        return data

    def _inflate(self, limit: int) -> bytes:
        """At most `limit` more bytes of the deflate stream; b"" once it ends or its input runs out."""
        assert self._inflater is not None
        while not self._inflater.eof:
            try:
                out = self._inflater.decompress(self._pending, limit)
            except zlib.error as exc:
                raise self._corrupt(f"its deflate data is broken ({exc})") from exc
            self._pending = self._inflater.unconsumed_tail
            if out:
                return out
            if not self._pending:
                self._pending = self._raw(_WINDOW)
                if not self._pending:
                    return b""
        return b""

    def _end(self) -> None:
        """At the declared size: nothing more may inflate, and the CRC-32 must match."""
        if self._ended:
            return
        if self._inflater is not None and self._inflate(1):
            raise self._error_cls(
                f"Archive entry {self._info.filename!r} inflates past its declared size of "
                f"{self._info.file_size} bytes; re-create the archive with a standard zip tool.",
                detail={"entry": self._info.filename, "file_size": self._info.file_size},
            )
        if self._crc != self._info.CRC:
            raise self._corrupt("its CRC-32 does not match its data")
        self._ended = True

    def _corrupt(self, reason: str) -> ServiceError:
        return _corrupt(self._info, reason, self._error_cls)


def _corrupt(info: zipfile.ZipInfo, reason: str, error_cls: type[ServiceError]) -> ServiceError:
    return error_cls(
        f"Archive entry {info.filename!r} is corrupt ({reason}); upload a complete zip created by a standard tool.",
        detail={"entry": info.filename, "reason": reason},
    )


def extract_flat(
    archive: Archive,
    dest_dir: Path,
    limits: ArchiveLimits = ArchiveLimits(),
    error_cls: type[ServiceError] = InvalidModel,
) -> list[Path]:
    """Extract every file entry into `dest_dir` by its base name (no sub-folders).

    A member is refused as soon as it inflates past its declared size, so the declared sizes that
    were checked against `limits` bound what is written; files are created exclusively (never
    overwritten, never through a symlink).
    On failure the files written so far are removed.
    """
    with checked_zip(archive, limits, error_cls) as (members, all_infos):
        files = [i for i in all_infos if not i.is_dir()]
        return [path for path, _ in _extract(members, files, dest_dir, error_cls)]


def extract_flat_to_storage(
    archive: Archive,
    dest_dir: Path,
    store: Callable[[str], ObjectWriter],
    limits: ArchiveLimits = ArchiveLimits(),
    error_cls: type[ServiceError] = InvalidModel,
) -> list[tuple[Path, StoredObject]]:
    """`extract_flat`, with each file's bytes streamed into `store(flat name)` (a new stored object)
    and, in `dest_dir`, a sparse placeholder of its size: the name and size without the bytes, for
    checks that need only those. The same limits and refusals; on failure the placeholders are
    removed, the writer in progress is aborted, and objects already stored are the caller's to delete."""
    with checked_zip(archive, limits, error_cls) as (members, all_infos):
        infos = [i for i in all_infos if not i.is_dir()]
        return [(path, stored) for path, stored in _extract(members, infos, dest_dir, error_cls, store) if stored]


def _extract(
    members: ZipMembers,
    infos: list[zipfile.ZipInfo],
    dest_dir: Path,
    error_cls: type[ServiceError],
    store: Callable[[str], ObjectWriter] | None = None,
) -> list[tuple[Path, StoredObject | None]]:
    names: dict[str, str] = {}
    for info in infos:
        safe = safe_member_name(info.filename)
        assert safe is not None  # check_zip refused unsafe names
        if safe.split("/", 1)[0] == "__MACOSX":
            continue
        base = PurePosixPath(safe).name
        if base in names.values():
            raise error_cls(
                f"Two archive entries are both named {base!r}; a flat archive needs distinct file names.",
                detail={"entry": info.filename},
            )
        names[info.filename] = base
    dest_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    stored: list[StoredObject | None] = []
    writer: ObjectWriter | None = None
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)
    try:
        for info in infos:
            flat_name = names.get(info.filename)
            if flat_name is None:
                continue
            target = dest_dir / flat_name
            try:
                fd = os.open(target, flags, 0o600)
            except FileExistsError as exc:
                raise error_cls(
                    f"Archive entry {info.filename!r} would overwrite the existing file {flat_name!r}; "
                    "upload each file once.",
                    detail={"entry": info.filename, "file_name": flat_name},
                ) from exc
            written.append(target)
            entry_bytes = 0
            with os.fdopen(fd, "wb") as out, members.open(info) as src:
                writer = store(flat_name) if store is not None else None
                while chunk := src.read(_CHUNK):
                    entry_bytes += len(chunk)
                    if writer is not None:
                        writer.write(chunk)
                    else:
                        out.write(chunk)
                if writer is not None:
                    out.truncate(entry_bytes)  # the placeholder: the size without the bytes
                    stored.append(writer.commit())
                    writer = None
                else:
                    stored.append(None)
    except BaseException:
        _abort(writer)
        _remove(written)
        raise
    return list(zip(written, stored, strict=True))


def _abort(writer: ObjectWriter | None) -> None:
    if writer is not None:
        writer.abort()


def _remove(paths: list[Path]) -> None:
    for path in paths:
        path.unlink(missing_ok=True)
