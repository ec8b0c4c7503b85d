"""Safe reading of uploaded zip archives: limits, member names, and flat extraction."""

from __future__ import annotations

import os
import stat
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from service.contract.formats import member_name as safe_member_name
from service.errors import InvalidDataset, InvalidModel, PayloadTooLarge, ServiceError

_CHUNK = 1 << 20
# Small entries compress extremely well when they are padding or zeros, so the ratio test
# only bites on entries large enough to matter.
_RATIO_MIN_BYTES = 1 << 20
_SUPPORTED_METHODS = {zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA}
_UNIX = 3


@dataclass(frozen=True)
class ArchiveLimits:
    max_entries: int = 100_000
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


def open_zip(path: Path, error_cls: type[ServiceError] = InvalidDataset) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError) as exc:
        raise error_cls(
            f"The archive is not a readable zip file ({exc}); upload a zip created by a standard tool.",
            detail={"reason": str(exc)},
        ) from exc


def check_zip(
    path: Path, limits: ArchiveLimits = ArchiveLimits(), error_cls: type[ServiceError] = InvalidDataset
) -> list[zipfile.ZipInfo]:
    """Every entry of the zip after checking the central directory against `limits`.

    Sizes, counts and compression ratios raise PayloadTooLarge; malformed, encrypted, symlink or
    badly named entries raise `error_cls`. Nothing is decompressed here.
    """
    with open_zip(path, error_cls) as zf:
        infos = zf.infolist()
    archive_size = path.stat().st_size
    if len(infos) > limits.max_entries:
        raise PayloadTooLarge(
            f"The archive holds {len(infos)} entries, more than the limit of {limits.max_entries}; upload fewer files.",
            detail={"entries": len(infos), "limit": limits.max_entries},
        )
    total = 0
    seen: set[str] = set()
    for info in infos:
        name = info.filename
        if info.flag_bits & 0x1:
            raise error_cls(
                f"Archive entry {name!r} is encrypted; upload an archive without a password.",
                detail={"entry": name},
            )
        if info.compress_type not in _SUPPORTED_METHODS:
            raise error_cls(
                f"Archive entry {name!r} uses an unsupported compression method "
                f"({info.compress_type}); recompress it with deflate or store it.",
                detail={"entry": name, "compress_type": info.compress_type},
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
    return infos


def extract_flat(
    zip_path: Path,
    dest_dir: Path,
    limits: ArchiveLimits = ArchiveLimits(),
    error_cls: type[ServiceError] = InvalidModel,
) -> list[Path]:
    """Extract every file entry into `dest_dir` by its base name (no sub-folders).

    Bytes are counted while streaming so a header that lies about sizes cannot exceed the
    limits; files are created exclusively (never overwritten, never through a symlink).
    On failure the files written so far are removed.
    """
    infos = [i for i in check_zip(zip_path, limits, error_cls) if not i.is_dir()]
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
    total = 0
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)
    try:
        with open_zip(zip_path, error_cls) as zf:
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
                with os.fdopen(fd, "wb") as out, zf.open(info) as src:
                    while chunk := src.read(_CHUNK):
                        entry_bytes += len(chunk)
                        total += len(chunk)
                        _check_streamed(info, entry_bytes, total, limits)
                        out.write(chunk)
    except zipfile.BadZipFile as exc:
        _remove(written)
        raise error_cls(
            f"The archive is corrupt ({exc}); upload a zip created by a standard tool.",
            detail={"reason": str(exc)},
        ) from exc
    except BaseException:
        _remove(written)
        raise
    return written


def _check_streamed(info: zipfile.ZipInfo, entry_bytes: int, total: int, limits: ArchiveLimits) -> None:
    if total > limits.max_total_bytes:
        raise PayloadTooLarge(
            f"The archive expands to more than the limit of {limits.max_total_bytes} bytes; upload less data.",
            detail={"limit_bytes": limits.max_total_bytes},
        )
    if entry_bytes > info.file_size:
        raise PayloadTooLarge(
            f"Archive entry {info.filename!r} expands beyond its declared size of {info.file_size} bytes; "
            "upload an archive whose headers are correct.",
            detail={"entry": info.filename, "file_size": info.file_size},
        )
    if entry_bytes >= limits.ratio_min_bytes and entry_bytes > limits.max_ratio * max(info.compress_size, 1):
        raise PayloadTooLarge(
            f"Archive entry {info.filename!r} expands beyond the allowed compression ratio of "
            f"{limits.max_ratio:g}; upload it less compressed.",
            detail={"entry": info.filename, "max_ratio": limits.max_ratio},
        )


def _remove(paths: list[Path]) -> None:
    for path in paths:
        path.unlink(missing_ok=True)
