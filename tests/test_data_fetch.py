"""`dcmfg data fetch`: against a local http.server on 127.0.0.1 serving generated archives (never the internet)."""

from __future__ import annotations

import hashlib
import http.server
import threading
import zipfile
from functools import partial
from pathlib import Path

import pytest

from dcmfg.data import load_dataset
from dcmfg.data.fetch import ARCHIVES, Archive, FetchError, fetch_dataset, read_sums
from test_data_mirflickr import make_raw


class RangeHandler(http.server.SimpleHTTPRequestHandler):
    """The stdlib file server plus single-range `Range: bytes=N-` support (what the fetch resumes with)."""

    ranges: list = []  # Range headers seen, per server (set on a subclass)
    honour_range = True

    def log_message(self, *args):
        pass

    def send_head(self):
        rng = self.headers.get("Range")
        type(self).ranges.append(rng)
        path = Path(self.translate_path(self.path))
        if not rng or not self.honour_range or not path.is_file():
            return super().send_head()
        start = int(rng.removeprefix("bytes=").split("-")[0])
        size = path.stat().st_size
        if start >= size:
            self.send_error(416)
            return None
        f = open(path, "rb")
        f.seek(start)
        self.send_response(206)
        self.send_header("Content-Type", "application/zip")
        self.send_header("Content-Range", f"bytes {start}-{size - 1}/{size}")
        self.send_header("Content-Length", str(size - start))
        self.end_headers()
        return f


@pytest.fixture
def server(tmp_path):
    """Serve generated mirflickr25k.zip (with its mirflickr/ folder) and a flat annotations zip."""
    src = make_raw(tmp_path / "src")
    www = tmp_path / "www"
    www.mkdir()
    with zipfile.ZipFile(www / "mirflickr25k.zip", "w") as z:
        for p in sorted((src / "mirflickr").rglob("*")):
            z.write(p, p.relative_to(src).as_posix())
    with zipfile.ZipFile(www / "mirflickr25k_annotations_v080.zip", "w") as z:  # flat, like the official one
        for p in sorted((src / "mirflickr25k_annotations_v080").iterdir()):
            z.write(p, p.name)
    handler = type("Handler", (RangeHandler,), {"ranges": []})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(handler, directory=str(www)))
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/", www, handler
    httpd.shutdown()
    httpd.server_close()


def _archives(www: Path, **overrides) -> list[Archive]:
    return [
        Archive(a.name, a.subdir, size=(www / a.name).stat().st_size, **overrides.get(a.name, {}))
        for a in ARCHIVES["mirflickr25k"]
    ]


def test_fetch_extract_and_load(server, tmp_path, capsys):
    url, www, handler = server
    dest = tmp_path / "dest"
    fetch_dataset("mirflickr25k", dest, url_base=url, archives=_archives(www))
    out = capsys.readouterr().out
    sha = hashlib.sha256((www / "mirflickr25k.zip").read_bytes()).hexdigest()
    assert f"SHA-256 {sha}" in out  # unknown hash: printed and recorded
    assert read_sums(dest)["mirflickr25k.zip"] == sha
    assert (dest / "mirflickr25k_annotations_v080" / "animals.txt").is_file()  # flat archive put in its folder
    d = load_dataset("mirflickr25k", dest)
    assert d.layout == "raw" and len(d) > 0
    fetch_dataset("mirflickr25k", dest, url_base=url, archives=_archives(www))  # second run: nothing to do
    assert "already downloaded and extracted" in capsys.readouterr().out


def test_fetch_resumes_a_partial_file(server, tmp_path):
    url, www, handler = server
    dest = tmp_path / "dest"
    dest.mkdir()
    whole = (www / "mirflickr25k.zip").read_bytes()
    (dest / "mirflickr25k.zip.part").write_bytes(whole[:1000])
    sha = hashlib.sha256(whole).hexdigest()
    fetch_dataset("mirflickr25k", dest, url_base=url, archives=_archives(www, **{"mirflickr25k.zip": {"sha256": sha}}))
    assert "bytes=1000-" in handler.ranges
    assert (dest / "mirflickr25k.zip").read_bytes() == whole
    assert not (dest / "mirflickr25k.zip.part").exists()


def test_fetch_restarts_when_server_ignores_range(server, tmp_path):
    url, www, handler = server
    handler.honour_range = False
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "mirflickr25k.zip.part").write_bytes(b"garbage that must not stay in front")
    fetch_dataset("mirflickr25k", dest, url_base=url, archives=_archives(www))
    assert (dest / "mirflickr25k.zip").read_bytes() == (www / "mirflickr25k.zip").read_bytes()


def test_fetch_hash_mismatch(server, tmp_path):
    url, www, handler = server
    dest = tmp_path / "dest"
    wrong = "0" * 64
    with pytest.raises(FetchError) as err:
        fetch_dataset("mirflickr25k", dest, url_base=url, archives=_archives(www, **{"mirflickr25k.zip": {"sha256": wrong}}))
    msg = str(err.value)
    got = hashlib.sha256((www / "mirflickr25k.zip").read_bytes()).hexdigest()
    assert "mirflickr25k.zip" in msg and wrong in msg and got in msg
    assert (dest / "mirflickr25k.zip.corrupt").is_file() and not (dest / "mirflickr").exists()


def test_fetch_checks_a_recorded_hash(server, tmp_path):
    """A hash recorded by an earlier fetch is checked when the archive is verified again."""
    url, www, handler = server
    dest = tmp_path / "dest"
    fetch_dataset("mirflickr25k", dest, url_base=url, archives=_archives(www))
    (dest / ".extracted-mirflickr25k_annotations_v080.zip").unlink()
    with open(dest / "mirflickr25k_annotations_v080.zip", "r+b") as f:  # bit rot after the first fetch
        f.seek(10)
        f.write(b"X")
    with pytest.raises(FetchError, match="recorded SHA-256"):
        fetch_dataset("mirflickr25k", dest, url_base=url, archives=_archives(www))


def test_fetch_unreachable_server(tmp_path):
    with pytest.raises(FetchError, match="cannot download"):
        fetch_dataset("mirflickr25k", tmp_path, url_base="http://127.0.0.1:9/", archives=[Archive("x.zip", "x")])


def test_fetch_command_checks_the_official_table(server, tmp_path):
    """Through `dcmfg data fetch` with the real table: a generated archive is not the official one."""
    import argparse

    from dcmfg.data import cli

    url, www, handler = server
    parser = argparse.ArgumentParser(prog="dcmfg")
    cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["data", "fetch", "mirflickr25k", "--dest", str(tmp_path / "d"), "--url-base", url])
    with pytest.raises(FetchError, match=r"expected 3069184257.*MD5 [0-9a-f]{32}, expected a23d0a8564ee84cda5622a6c2f947785"):
        args.func(args)
