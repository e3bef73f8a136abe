"""Downloads that verify checksums and never leave partial files, and safe zip extraction.

* :func:`download` streams a URL into a temporary file next to the destination, hashes it on the
  way, and renames it into place only if the hash is one of the accepted ones.
* :func:`sha256_of` hashes a file in chunks.
* :func:`safe_extract_zip` extracts an archive only if no entry could land outside the target folder.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import sys
import tempfile
import urllib.error
import urllib.request
import warnings
import zipfile
from collections.abc import Collection
from pathlib import Path, PurePosixPath

_CHUNK = 1 << 20


class DownloadError(RuntimeError):
    """A file could not be fetched; the message says how to place it by hand."""


class ChecksumError(DownloadError):
    """A downloaded file's hash is not one of the accepted hashes."""


class UnsafeArchiveError(ValueError):
    """An archive holds an entry that would be written outside the target folder."""


def sha256_of(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    return _hash_file(path, "sha256")


def md5_of(path: str | os.PathLike) -> str:
    """Hex md5 of a file (only for matching published md5 sums; use sha256 for anything new)."""
    return _hash_file(path, "md5")


def _hash_file(path: str | os.PathLike, algorithm: str) -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _as_set(hashes: str | Collection[str]) -> set[str]:
    if isinstance(hashes, str):
        return {hashes.lower()}
    return {h.lower() for h in hashes}


def download(
    url: str,
    dest: str | os.PathLike,
    sha256: str | Collection[str],
    timeout: float = 60,
    *,
    md5: Collection[str] = (),
) -> Path:
    """Fetch ``url`` to ``dest`` and check its hash.

    The bytes go to a temporary file in ``dest``'s folder while being hashed; the file is renamed to
    ``dest`` (atomically) only when its sha256 is in ``sha256`` (one hex string or a collection of
    accepted ones) or, failing that, its md5 is in ``md5`` (for files whose only published sum is an
    md5). On any failure the temporary file is removed and ``dest`` is left as it was.

    Raises:
        ChecksumError: the hash matched nothing; the message names the URL, the expected and the
            actual hashes.
        DownloadError: the URL could not be read (network down, 404, timeout, ...) or the file could
            not be written; the message says to download the file by hand to ``dest``.
    """
    dest = Path(dest)
    accepted = _as_set(sha256)
    accepted_md5 = _as_set(md5)
    manual = f"Download it by hand from\n    {url}\nand save it as\n    {dest}"
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    except OSError as e:
        raise DownloadError(f"cannot write to {dest.parent}: {e}. {manual}") from e
    tmp = Path(tmp_name)
    try:
        h_sha, h_md5 = hashlib.sha256(), hashlib.md5()
        print(f"metaloop: downloading {url} -> {dest}", file=sys.stderr)
        try:
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:
                while chunk := response.read(_CHUNK):
                    out.write(chunk)
                    h_sha.update(chunk)
                    h_md5.update(chunk)
                out.flush()
                os.fsync(out.fileno())
        except (urllib.error.URLError, OSError, ValueError) as e:
            raise DownloadError(f"could not download {url}: {e}. {manual}") from e
        actual, actual_md5 = h_sha.hexdigest(), h_md5.hexdigest()
        if actual not in accepted and actual_md5 not in accepted_md5:
            expected = " or ".join(sorted(accepted)) or "(none)"
            if accepted_md5:
                expected += " (or md5 " + " or ".join(sorted(accepted_md5)) + ")"
            raise ChecksumError(
                f"checksum mismatch for {url}: expected sha256 {expected}, got sha256 {actual} "
                f"(md5 {actual_md5}). The download was discarded; {dest} was not written. "
                f"If the server's file changed on purpose, {manual} after checking it."
            )
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return dest


def _is_absolute(name: str) -> bool:
    """POSIX or Windows absolute path (``/x``, ``\\x``, ``C:x``)."""
    return name.startswith(("/", "\\")) or (len(name) > 1 and name[0].isalpha() and name[1] == ":")


def _unsafe_reason(info: zipfile.ZipInfo, target: Path, zf: zipfile.ZipFile) -> str | None:
    """Why ``info`` must not be extracted under ``target`` (resolved), or None if it is safe."""
    name = info.filename
    parts = name.replace("\\", "/").split("/")
    if _is_absolute(name):
        return "absolute path"
    if ".." in parts:
        return "'..' path component"
    # Existing symlinks inside target (from an earlier extraction) must not redirect the entry.
    dest = (target / name).resolve()
    if dest != target and target not in dest.parents:
        return f"resolves outside the target folder ({dest})"
    if stat.S_ISLNK(info.external_attr >> 16):
        link = zf.read(info).decode("utf-8", "replace")
        if _is_absolute(link):
            return f"symlink to absolute path {link!r}"
        resolved = PurePosixPath(*parts[:-1], *link.replace("\\", "/").split("/"))
        depth = 0
        for part in resolved.parts:
            depth += -1 if part == ".." else (0 if part == "." else 1)
            if depth < 0:
                return f"symlink to {link!r} points outside the target folder"
    return None


def safe_extract_zip(zip_path: str | os.PathLike, target_dir: str | os.PathLike) -> list[Path]:
    """Extract ``zip_path`` into ``target_dir`` after checking every entry; returns the files written.

    Nothing is extracted if any entry has an absolute path (``/x``, ``C:x``), a ``..`` component,
    resolves outside ``target_dir`` through a symlink already there, or is a symlink pointing
    outside ``target_dir``. Symlinks that stay inside are skipped with a warning, never created:
    real links would let a later entry be written through them.

    Raises:
        UnsafeArchiveError: an unsafe entry (named in the message); nothing was written.
        ValueError: ``zip_path`` is not a readable zip file.
    """
    target = Path(target_dir)
    target.mkdir(parents=True, exist_ok=True)
    target = target.resolve()
    try:
        zf = zipfile.ZipFile(zip_path)
    except (zipfile.BadZipFile, OSError) as e:
        raise ValueError(f"{zip_path} is not a readable zip file: {e}") from e
    with zf:
        infos = zf.infolist()
        for info in infos:
            reason = _unsafe_reason(info, target, zf)
            if reason:
                raise UnsafeArchiveError(
                    f"refusing to extract {zip_path}: entry {info.filename!r} is unsafe ({reason}); "
                    "nothing was extracted"
                )
        written = []
        for info in infos:
            if stat.S_ISLNK(info.external_attr >> 16):
                warnings.warn(f"{zip_path}: skipping symlink entry {info.filename!r}", stacklevel=2)
                continue
            dest = target / info.filename
            if info.is_dir():
                dest.mkdir(parents=True, exist_ok=True)
                continue
            dest.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, open(dest, "wb") as out:
                shutil.copyfileobj(src, out, _CHUNK)
            written.append(dest)
    return written
