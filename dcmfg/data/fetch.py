"""Official dataset downloads: HTTP Range resume, hash verification, safe extraction.

A download goes to `<name>.part` and is resumed from its length with a Range request (a server that ignores Range
restarts it); only a complete file whose hash checks is renamed into place. Known hashes live in the table below.
The official site publishes no SHA-256, so for MIRFlickr the table holds the size and MD5 that third-party
download scripts record; the SHA-256 of what was downloaded is printed and recorded in `<dest>/SHA256SUMS`, and a
later fetch into the same folder is checked against it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from dcmfg.fileio import write_text_atomic

from .base import DatasetError


class FetchError(DatasetError):
    """A download that failed, was cut short, or does not match its known hash."""


@dataclass(frozen=True)
class Archive:
    name: str  # file name, appended to the URL base
    subdir: str  # the folder the archive's content belongs in (extracted there unless it already carries it)
    size: int | None = None
    sha256: str | None = None
    md5: str | None = None


# MIRFlickr-25K, version 3b of the official release (press.liacs.nl/mirflickr/mirdownload.html). Sizes and MD5s as
# recorded by third-party download scripts; no published SHA-256 (recorded on first download, see module doc).
ARCHIVES: dict[str, list[Archive]] = {
    "mirflickr25k": [
        Archive("mirflickr25k.zip", "mirflickr", size=3_069_184_257, md5="a23d0a8564ee84cda5622a6c2f947785"),
        Archive("mirflickr25k_annotations_v080.zip", "mirflickr25k_annotations_v080", size=207_220,
                md5="aa0138c79892b1b670184d142380948f"),  # fmt: skip
    ],
}
URL_BASES = {"mirflickr25k": "https://press.liacs.nl/mirflickr/mirflickr25k.v3b/"}
SUMS_FILE = "SHA256SUMS"
_CHUNK = 1 << 20


def file_hashes(path: Path) -> tuple[str, str]:
    """(sha256, md5) of a file, read once in chunks."""
    sha, md5 = hashlib.sha256(), hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            sha.update(block)
            md5.update(block)
    return sha.hexdigest(), md5.hexdigest()


def read_sums(dest: Path) -> dict[str, str]:
    path = dest / SUMS_FILE
    if not path.is_file():
        return {}
    out = {}
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) == 2:
            out[parts[1].lstrip("*")] = parts[0].lower()
    return out


def _record_sum(dest: Path, name: str, sha256: str) -> None:
    sums = read_sums(dest)
    sums[name] = sha256
    text = "".join(f"{h}  {n}\n" for n, h in sorted(sums.items()))
    write_text_atomic(dest / SUMS_FILE, text)


def download(url: str, path: Path, timeout: float = 60.0, log: Callable[[str], None] = print) -> Path:
    """Download url to path, resuming `<path>.part` with an HTTP Range request. Returns path (not verified)."""
    path = Path(path)
    part = path.with_name(path.name + ".part")
    offset = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": "dcmfg-fetch"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        resp = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and offset:  # nothing left to send: the partial file is already whole
            os.replace(part, path)
            return path
        raise FetchError(f"{url}: HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise FetchError(f"{url}: cannot download ({exc}); partial data kept in {part}" if offset else f"{url}: cannot download ({exc})") from None
    with resp:
        if offset and resp.status == 206:
            start = (resp.headers.get("Content-Range") or "").removeprefix("bytes ").split("-")[0]
            if start != str(offset):
                raise FetchError(f"{url}: asked to resume at byte {offset}, server answered {resp.headers.get('Content-Range')!r}")
            mode = "ab"
            log(f"resuming {path.name} at byte {offset}")
        else:
            if offset:
                log(f"{url}: server ignored the Range request; downloading {path.name} from the start")
            mode, offset = "wb", 0
        length = resp.headers.get("Content-Length")
        expected_total = offset + int(length) if length is not None else None
        with open(part, mode) as f:
            try:
                for block in iter(lambda: resp.read(_CHUNK), b""):
                    f.write(block)
            except (OSError, urllib.error.URLError) as exc:
                raise FetchError(f"{url}: connection lost ({exc}); run the fetch again to resume from {part}") from None
    got = part.stat().st_size
    if expected_total is not None and got != expected_total:
        raise FetchError(f"{url}: got {got} of {expected_total} bytes; run the fetch again to resume from {part}")
    os.replace(part, path)
    return path


def verify(path: Path, archive: Archive, recorded: str | None, log: Callable[[str], None] = print) -> str:
    """Check size and hashes against the table (and an earlier recorded SHA-256). Returns the file's SHA-256.

    A mismatch moves the file aside to `<name>.corrupt` (kept for inspection, never re-used) and raises.
    """
    size = path.stat().st_size
    sha256, md5 = file_hashes(path)
    problems = []
    if archive.size is not None and size != archive.size:
        problems.append(f"size {size} bytes, expected {archive.size}")
    for what, expected, got in (("SHA-256", archive.sha256, sha256), ("recorded SHA-256", recorded, sha256), ("MD5", archive.md5, md5)):
        if expected is not None and expected.lower() != got:
            problems.append(f"{what} {got}, expected {expected.lower()}")
    if problems:
        bad = path.with_name(path.name + ".corrupt")
        os.replace(path, bad)
        raise FetchError(f"{path}: hash mismatch ({'; '.join(problems)}); the file was moved to {bad}")
    if archive.sha256 is None and recorded is None:
        log(f"{path.name}: SHA-256 {sha256} (no known hash to check against; recorded in {path.parent / SUMS_FILE})")
    return sha256


def _safe_members(zf: zipfile.ZipFile, zip_path: Path) -> list[zipfile.ZipInfo]:
    members = zf.infolist()
    for m in members:
        p = Path(m.filename)
        if p.is_absolute() or ".." in p.parts:
            raise FetchError(f"{zip_path}: unsafe member path {m.filename!r} in archive")
    return members


def extract(zip_path: Path, dest: Path, subdir: str) -> Path:
    """Extract into dest (dest/subdir when the archive does not carry that folder itself), via a temp folder."""
    try:
        zf = zipfile.ZipFile(zip_path)
    except zipfile.BadZipFile as exc:
        raise FetchError(f"{zip_path}: not a valid zip archive ({exc})") from None
    with zf:
        members = _safe_members(zf, zip_path)
        carries = all(m.filename.split("/")[0] == subdir for m in members)
        target = dest if carries else dest / subdir
        tmp = Path(tempfile.mkdtemp(prefix=f".extract-{zip_path.stem}-", dir=dest))
        try:
            zf.extractall(tmp, members)
            target.mkdir(parents=True, exist_ok=True)
            for entry in sorted(tmp.iterdir()):
                final = target / entry.name
                if final.exists():  # never clobber what is already there
                    continue
                os.replace(entry, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return dest / subdir


def fetch_dataset(
    name: str,
    dest,
    url_base: str | None = None,
    archives: list[Archive] | None = None,
    log: Callable[[str], None] = print,
) -> Path:
    """Download, verify and extract a dataset's official archives into dest. Returns dest (a loadable root)."""
    if archives is None:
        if name not in ARCHIVES:
            raise DatasetError(f"no official download known for {name!r}; fetchable: {', '.join(ARCHIVES)}")
        archives = ARCHIVES[name]
    base = url_base or URL_BASES.get(name)
    if not base:
        raise DatasetError(f"{name}: no URL base known; pass --url-base")
    base = base if base.endswith("/") else base + "/"
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for archive in archives:
        path = dest / archive.name
        marker = dest / f".extracted-{archive.name}"
        if marker.exists():
            log(f"{archive.name}: already downloaded and extracted")
            continue
        if not path.exists():
            log(f"downloading {base}{archive.name}")
            download(base + archive.name, path, log=log)
        sha256 = verify(path, archive, read_sums(dest).get(archive.name), log=log)
        _record_sum(dest, archive.name, sha256)
        out = extract(path, dest, archive.subdir)
        marker.write_text(sha256 + "\n")
        log(f"{archive.name}: verified and extracted to {out}")
    return dest
