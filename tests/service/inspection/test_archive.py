"""Zip handling: names, limits, bombs, symlinks and flat extraction."""

from __future__ import annotations

import io
import random
import stat
import struct
import zipfile
from pathlib import Path

import pytest

from service.errors import InvalidDataset, InvalidModel, PayloadTooLarge
from service.inspection.archive import ArchiveLimits, check_zip, checked_zip, extract_flat, safe_member_name


def _zip(path: Path, entries: dict[str, bytes], method: int = zipfile.ZIP_DEFLATED) -> Path:
    with zipfile.ZipFile(path, "w", compression=method) as zf:
        for name, data in entries.items():
            zf.writestr(zipfile.ZipInfo(name), data, compress_type=method)
    return path


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("a.npy", "a.npy"),
        ("./dir//cat/x.png", "dir/cat/x.png"),
        ("dir/", None),
        ("../x", None),
        ("a/../../x", None),
        ("a/..", None),
        ("/abs", None),
        ("C:/x", None),
        ("C:x", None),
        ("a\\b", None),
        ("a\x00b", None),
        ("", None),
    ],
)
def test_safe_member_name(name: str, expected: str | None) -> None:
    assert safe_member_name(name) == expected


def test_valid_zip_lists_entries(tmp_path: Path) -> None:
    path = _zip(tmp_path / "a.zip", {"dir/": b"", "dir/a.bin": b"abc", "b.bin": b"x" * 100})
    infos = check_zip(path, ArchiveLimits())
    assert [i.filename for i in infos] == ["dir/", "dir/a.bin", "b.bin"]


def test_not_a_zip(tmp_path: Path) -> None:
    path = tmp_path / "a.zip"
    path.write_bytes(b"PK\x03\x04 but not really")
    with pytest.raises(InvalidModel, match="not a readable zip"):
        check_zip(path, ArchiveLimits(), InvalidModel)


def test_zip_bomb_ratio_refused(tmp_path: Path) -> None:
    path = _zip(tmp_path / "bomb.zip", {"zeros.bin": bytes(2 << 20)})
    with pytest.raises(PayloadTooLarge, match="compression ratio") as err:
        check_zip(path, ArchiveLimits())
    assert err.value.status == 413


def test_small_compressible_entries_are_fine(tmp_path: Path) -> None:
    path = _zip(tmp_path / "ok.zip", {"zeros.bin": bytes(64 << 10)})
    assert len(check_zip(path, ArchiveLimits())) == 1


def test_too_many_entries(tmp_path: Path) -> None:
    path = _zip(tmp_path / "many.zip", {f"{i}.bin": b"x" for i in range(4)})
    with pytest.raises(PayloadTooLarge, match="4 entries"):
        check_zip(path, ArchiveLimits(max_entries=3))


def test_total_declared_size(tmp_path: Path) -> None:
    path = _zip(tmp_path / "big.zip", {"a.bin": b"x" * 600, "b.bin": b"y" * 600}, zipfile.ZIP_STORED)
    with pytest.raises(PayloadTooLarge, match="1000 bytes"):
        check_zip(path, ArchiveLimits(max_total_bytes=1000))


@pytest.mark.parametrize("name", ["../x", "/abs", "a\\b", "dir/../../etc/passwd", "C:/win.bin"])
def test_path_traversal_names_refused(tmp_path: Path, name: str) -> None:
    path = _zip(tmp_path / "evil.zip", {name: b"data"})
    with pytest.raises(InvalidDataset, match="unsafe"):
        check_zip(path, ArchiveLimits())
    with pytest.raises(InvalidModel, match="unsafe"):
        extract_flat(path, tmp_path / "out", ArchiveLimits(), error_cls=InvalidModel)
    assert not (tmp_path / "x").exists()


def test_symlink_entry_refused(tmp_path: Path) -> None:
    path = tmp_path / "link.zip"
    with zipfile.ZipFile(path, "w") as zf:
        info = zipfile.ZipInfo("weights.bin")
        info.create_system = 3
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(info, "/etc/passwd")
    with pytest.raises(InvalidModel, match="symbolic link"):
        extract_flat(path, tmp_path / "out", ArchiveLimits(), error_cls=InvalidModel)
    assert not (tmp_path / "out" / "weights.bin").exists()


def test_encrypted_entry_refused(tmp_path: Path) -> None:
    path = _zip(tmp_path / "enc.zip", {"a.bin": b"secret"})
    data = bytearray(path.read_bytes())  # zipfile cannot write encrypted entries: set the flag bit
    data[6] |= 0x1
    data[data.index(b"PK\x01\x02") + 8] |= 0x1
    path.write_bytes(bytes(data))
    with pytest.raises(InvalidDataset, match="encrypted"):
        check_zip(path, ArchiveLimits())


def test_duplicate_entry_refused(tmp_path: Path) -> None:
    path = tmp_path / "dup.zip"
    with zipfile.ZipFile(path, "w") as zf, pytest.warns(UserWarning, match="Duplicate"):
        zf.writestr("a.bin", b"1")
        zf.writestr("a.bin", b"2")
    with pytest.raises(InvalidDataset, match="more than once"):
        check_zip(path, ArchiveLimits())


def test_extract_flat_uses_base_names(tmp_path: Path) -> None:
    path = _zip(
        tmp_path / "w.zip",
        {"weights/": b"", "weights/a.bin": b"aaa", "b.bin": b"bb", "__MACOSX/._a.bin": b"junk"},
    )
    out = tmp_path / "out"
    written = extract_flat(path, out, ArchiveLimits())
    assert sorted(p.name for p in written) == ["a.bin", "b.bin"]
    assert (out / "a.bin").read_bytes() == b"aaa"
    assert sorted(p.name for p in out.iterdir()) == ["a.bin", "b.bin"]


def test_extract_flat_never_overwrites(tmp_path: Path) -> None:
    path = _zip(tmp_path / "w.zip", {"a.bin": b"new"})
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.bin").write_bytes(b"old")
    with pytest.raises(InvalidModel, match="overwrite"):
        extract_flat(path, out, ArchiveLimits())
    assert (out / "a.bin").read_bytes() == b"old"


def test_extract_flat_does_not_follow_existing_symlink(tmp_path: Path) -> None:
    target = tmp_path / "target.txt"
    target.write_bytes(b"keep")
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.bin").symlink_to(target)
    with pytest.raises(InvalidModel):
        extract_flat(_zip(tmp_path / "w.zip", {"a.bin": b"new"}), out, ArchiveLimits())
    assert target.read_bytes() == b"keep"


def test_extract_flat_refuses_colliding_base_names(tmp_path: Path) -> None:
    path = _zip(tmp_path / "w.zip", {"x/a.bin": b"1", "y/a.bin": b"2"})
    with pytest.raises(InvalidModel, match="both named"):
        extract_flat(path, tmp_path / "out", ArchiveLimits())


def _lie_about_size(path: Path, declared: int) -> None:
    """Rewrite the uncompressed size in the local and central headers of the only entry."""
    data = bytearray(path.read_bytes())
    struct.pack_into("<I", data, 22, declared)  # local file header
    central = data.index(b"PK\x01\x02")
    struct.pack_into("<I", data, central + 24, declared)
    path.write_bytes(bytes(data))


def test_extract_flat_lying_header_cannot_exceed_limits(tmp_path: Path) -> None:
    path = _zip(tmp_path / "liar.zip", {"a.bin": b"z" * 50_000})
    _lie_about_size(path, 10)
    assert check_zip(path, ArchiveLimits(max_total_bytes=100))[0].file_size == 10
    out = tmp_path / "out"
    with pytest.raises((InvalidModel, PayloadTooLarge)):
        extract_flat(path, out, ArchiveLimits(max_total_bytes=100))
    assert list(out.iterdir()) == []


def test_entry_claiming_more_bytes_than_the_archive(tmp_path: Path) -> None:
    path = _zip(tmp_path / "short.zip", {"a.bin": b"x" * 100}, zipfile.ZIP_STORED)
    data = bytearray(path.read_bytes())
    central = data.index(b"PK\x01\x02")
    struct.pack_into("<I", data, central + 20, 10_000_000)  # compressed size
    struct.pack_into("<I", data, central + 24, 10_000_000)  # uncompressed size
    path.write_bytes(bytes(data))
    with pytest.raises(InvalidDataset, match="more bytes than the archive holds"):
        check_zip(path, ArchiveLimits())


def _member(path: Path, name: str = "a.bin") -> bytes:
    """Member `name` of the zip at `path`, read through `checked_zip` in odd-sized pieces to its end."""
    with checked_zip(path) as (members, infos), members.open(next(i for i in infos if i.filename == name)) as fp:
        pieces = []
        while piece := fp.read(77_777):
            pieces.append(piece)
        return b"".join(pieces)


@pytest.mark.parametrize("method", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED], ids=["stored", "deflated"])
def test_members_read_back_whole_across_windows(tmp_path: Path, method: int) -> None:
    data = random.Random(0).randbytes(300_000) + bytes(3 << 20)  # incompressible, then very compressible
    path = _zip(tmp_path / "a.zip", {"a.bin": data, "empty": b""}, method)
    assert _member(path) == data
    assert _member(path, "empty") == b""


def test_a_member_seeks_back_and_forth(tmp_path: Path) -> None:
    data = random.Random(1).randbytes(200_000)
    path = _zip(tmp_path / "a.zip", {"a.bin": data})
    with checked_zip(path) as (members, infos), members.open(infos[0]) as fp:
        assert fp.read(8) == data[:8]
        assert fp.seek(150_000) == 150_000
        assert fp.read(10) == data[150_000:150_010]
        fp.seek(0)
        assert fp.tell() == 0 and fp.read(8) == data[:8]
        assert fp.seek(0, io.SEEK_END) == len(data) and fp.read(5) == b""


def test_a_member_that_ends_short_of_its_declared_size_is_refused(tmp_path: Path) -> None:
    path = _zip(tmp_path / "short.zip", {"a.bin": b"z" * 1000})
    _lie_about_size(path, 2000)
    with pytest.raises(InvalidDataset, match="ends 1000 bytes short of its declared size"):
        _member(path)


def test_a_member_whose_crc_does_not_match_is_refused(tmp_path: Path) -> None:
    path = _zip(tmp_path / "crc.zip", {"a.bin": b"z" * 1000})
    data = bytearray(path.read_bytes())
    data[data.index(b"PK\x01\x02") + 16] ^= 0xFF  # the CRC in the central header, which is the one read
    path.write_bytes(bytes(data))
    with pytest.raises(InvalidDataset, match="CRC-32 does not match"):
        _member(path)


def test_a_local_header_naming_another_file_is_refused(tmp_path: Path) -> None:
    path = _zip(tmp_path / "names.zip", {"a.bin": b"z" * 10})
    data = bytearray(path.read_bytes())
    data[30:35] = b"b.bin"  # the local header's copy of the name
    path.write_bytes(bytes(data))
    with pytest.raises(InvalidDataset, match="local header names another file"):
        _member(path)


def test_a_stored_member_must_hold_what_it_declares(tmp_path: Path) -> None:
    path = _zip(tmp_path / "stored.zip", {"a.bin": b"z" * 1000}, zipfile.ZIP_STORED)
    _lie_about_size(path, 10)
    with pytest.raises(InvalidDataset, match="stored uncompressed but declares 10 bytes and holds 1000"):
        check_zip(path)
