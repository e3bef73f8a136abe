"""download(): checksums, no partial files, clear errors; safe_extract_zip(): refuses escaping entries."""

from __future__ import annotations

import hashlib
import stat
import zipfile
from pathlib import Path

import pytest

from metaloop.data.download import (
    ChecksumError,
    DownloadError,
    UnsafeArchiveError,
    download,
    md5_of,
    safe_extract_zip,
    sha256_of,
)

PAYLOAD = b"metaloop test payload\n" * 10_000


@pytest.fixture
def source(tmp_path: Path) -> Path:
    path = tmp_path / "src" / "payload.bin"
    path.parent.mkdir()
    path.write_bytes(PAYLOAD)
    return path


def test_hashes(source):
    assert sha256_of(source) == hashlib.sha256(PAYLOAD).hexdigest()
    assert md5_of(source) == hashlib.md5(PAYLOAD).hexdigest()


def test_download_ok(source, tmp_path):
    dest = tmp_path / "out" / "payload.bin"
    assert download(source.as_uri(), dest, hashlib.sha256(PAYLOAD).hexdigest().upper()) == dest
    assert dest.read_bytes() == PAYLOAD
    assert [p.name for p in dest.parent.iterdir()] == ["payload.bin"]


def test_download_accepts_any_known_hash_or_md5(source, tmp_path):
    dest = tmp_path / "out" / "a.bin"
    download(source.as_uri(), dest, {"0" * 64, hashlib.sha256(PAYLOAD).hexdigest()})
    dest.unlink()
    download(source.as_uri(), dest, {"0" * 64}, md5={hashlib.md5(PAYLOAD).hexdigest()})
    assert dest.read_bytes() == PAYLOAD


def test_checksum_mismatch_discards(source, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    dest = out / "payload.bin"
    with pytest.raises(ChecksumError) as info:
        download(source.as_uri(), dest, "ab" * 32)
    msg = str(info.value)
    assert "ab" * 32 in msg and hashlib.sha256(PAYLOAD).hexdigest() in msg and source.as_uri() in msg
    assert list(out.iterdir()) == []
    # an existing file at dest is left alone
    dest.write_bytes(b"old")
    with pytest.raises(ChecksumError):
        download(source.as_uri(), dest, "ab" * 32)
    assert dest.read_bytes() == b"old" and [p.name for p in out.iterdir()] == ["payload.bin"]


def test_network_error_is_clear(tmp_path):
    out = tmp_path / "out"
    url = (tmp_path / "does-not-exist.zip").as_uri()
    with pytest.raises(DownloadError) as info:
        download(url, out / "x.zip", "00" * 32)
    msg = str(info.value)
    assert url in msg and "by hand" in msg and str(out / "x.zip") in msg
    assert not isinstance(info.value, ChecksumError)
    assert list(out.iterdir()) == []
    with pytest.raises(DownloadError, match="by hand"):
        download("nosuchscheme://example/x.zip", out / "x.zip", "00" * 32)
    assert list(out.iterdir()) == []


# ---------------------------------------------------------------- safe_extract_zip


def _zip(path: Path, entries: list[tuple[str, bytes]], links: dict[str, str] | None = None) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in entries:
            zf.writestr(name, data)
        for name, target in (links or {}).items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, target)
    return path


def test_extract_ok(tmp_path):
    archive = _zip(tmp_path / "ok.zip", [("a/", b""), ("a/b.txt", b"bee"), ("c.txt", b"sea")])
    target = tmp_path / "t"
    written = safe_extract_zip(archive, target)
    assert sorted(p.relative_to(target).as_posix() for p in written) == ["a/b.txt", "c.txt"]
    assert (target / "a/b.txt").read_bytes() == b"bee"


@pytest.mark.parametrize(
    "bad",
    ["../evil.txt", "a/../../evil.txt", "/tmp/metaloop-evil.txt", "..\\evil.txt", "C:/evil.txt"],
)
def test_extract_refuses_escaping_paths(tmp_path, bad):
    archive = tmp_path / "bad.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("fine.txt", b"ok")
        info = zipfile.ZipInfo("placeholder")
        info.filename = bad  # ZipInfo() would normalise some of these away
        zf.writestr(info, b"evil")
    target = tmp_path / "t"
    with pytest.raises(UnsafeArchiveError, match="nothing was extracted"):
        safe_extract_zip(archive, target)
    assert list(target.iterdir()) == []
    assert not (tmp_path / "evil.txt").exists() and not Path("/tmp/metaloop-evil.txt").exists()


@pytest.mark.parametrize("link", ["../../etc", "/etc/passwd", "sub/../../x"])
def test_extract_refuses_escaping_symlinks(tmp_path, link):
    archive = _zip(tmp_path / "bad.zip", [("fine.txt", b"ok")], {"link": link})
    target = tmp_path / "t"
    with pytest.raises(UnsafeArchiveError, match="symlink"):
        safe_extract_zip(archive, target)
    assert list(target.iterdir()) == []


def test_extract_skips_inner_symlink(tmp_path):
    archive = _zip(tmp_path / "ok.zip", [("d/x.txt", b"x")], {"d/link": "x.txt"})
    target = tmp_path / "t"
    with pytest.warns(UserWarning, match="skipping symlink"):
        written = safe_extract_zip(archive, target)
    assert [p.name for p in written] == ["x.txt"] and not (target / "d/link").exists()


def test_extract_refuses_through_existing_symlink(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    target = tmp_path / "t"
    target.mkdir()
    (target / "sneaky").symlink_to(outside)
    archive = _zip(tmp_path / "bad.zip", [("sneaky/x.txt", b"x")])
    with pytest.raises(UnsafeArchiveError, match="outside the target folder"):
        safe_extract_zip(archive, target)
    assert list(outside.iterdir()) == []


def test_extract_not_a_zip(tmp_path):
    path = tmp_path / "x.zip"
    path.write_bytes(b"nope")
    with pytest.raises(ValueError, match="not a readable zip"):
        safe_extract_zip(path, tmp_path / "t")
