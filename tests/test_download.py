"""download.py against a loopback HTTP server: verification, idempotence, resume, and archives that try to escape."""
from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from blip_repro.data import download as dl
from blip_repro.data.download import Source
from blip_repro.errors import UserError

BODY = bytes(range(256)) * 8192  # 2 MiB: several download chunks, so "half" leaves a real partial file


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Files:
    """What the server serves and what it saw."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.requests: list[tuple[str, dict]] = []
        self.drop_once: set[str] = set()  # paths whose next response stops half-way and closes the connection
        self.ranges = True  # honour Range requests
        self.sent: list[int] = []  # body bytes written per response


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server's name)
        state: Files = self.server.state
        state.requests.append((self.path, dict(self.headers)))
        body = state.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        start = 0
        if self.headers.get("Range") and state.ranges:
            start = int(re.fullmatch(r"bytes=(\d+)-", self.headers["Range"]).group(1))
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(body) - start))
        self.send_header("ETag", f'"{sha(body)[:16]}"')
        self.end_headers()
        payload = body[start:]
        if self.path in state.drop_once:
            state.drop_once.discard(self.path)
            payload = payload[: len(payload) // 2]
            self.close_connection = True  # the client sees a body shorter than Content-Length
        self.wfile.write(payload)
        state.sent.append(len(payload))

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.state = Files()
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    httpd.state.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield httpd.state
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(autouse=True)
def no_retry_wait(monkeypatch):
    monkeypatch.setattr(dl, "_RETRY_WAIT_S", (0,))


def toy(monkeypatch, server, *sources: tuple[str, bytes, bool, bool]) -> None:
    """Register dataset 'toy': (name, body, pin the sha256?, unpack?) per file, served by `server`."""
    entries = []
    for name, body, pinned, unpack in sources:
        server.files[f"/{name}"] = body
        entries.append(Source(f"{server.url}/{name}", sha(body) if pinned else None, len(body), name, unpack))
    monkeypatch.setitem(dl.SOURCES, "toy", entries)


def zip_bytes(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    return buf.getvalue()


def tar_bytes(add) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as t:
        add(t)
    return buf.getvalue()


def tar_file(t: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    t.addfile(info, io.BytesIO(data))


def tar_link(t: tarfile.TarFile, name: str, target: str) -> None:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = tarfile.SYMTYPE, target
    t.addfile(info)


def test_download_verifies_and_records_hashes(tmp_path, server, monkeypatch):
    toy(monkeypatch, server, ("pinned.bin", BODY, True, False), ("first_use.json", b'{"a": 1}', False, False))
    out = dl.download(["toy"], root=tmp_path, progress=False)
    folder = tmp_path / "toy"
    assert out == {"toy": [folder / "pinned.bin", folder / "first_use.json"]}
    assert (folder / "pinned.bin").read_bytes() == BODY
    lock = json.loads((folder / "checksums.json").read_text())
    assert lock["pinned.bin"]["trust"] == "pinned" and lock["pinned.bin"]["sha256"] == sha(BODY)
    assert lock["first_use.json"] == {**lock["first_use.json"], "trust": "first-use", "sha256": sha(b'{"a": 1}')}
    assert not list(folder.glob("*.part*")) and not list(folder.glob("tmp*"))


def test_second_call_makes_no_requests(tmp_path, server, monkeypatch):
    toy(monkeypatch, server, ("a.bin", BODY, True, False), ("b.json", b"[]", False, False),
        ("c.zip", zip_bytes({"c/inside.txt": b"x"}), False, True))
    first = dl.download(["toy"], root=tmp_path, progress=False)
    n = len(server.requests)
    assert n == 3
    assert dl.download(["toy"], root=tmp_path, progress=False) == first
    assert len(server.requests) == n


def test_wrong_hash_is_refused_and_kept_aside(tmp_path, server, monkeypatch):
    toy(monkeypatch, server, ("data.bin", BODY, True, False))
    server.files["/data.bin"] = b"tampered" + BODY[8:]
    with pytest.raises(UserError) as err:
        dl.download(["toy"], root=tmp_path, progress=False)
    msg = str(err.value)
    assert "data.bin" in msg and sha(BODY) in msg and sha(b"tampered" + BODY[8:]) in msg
    folder = tmp_path / "toy"
    assert not (folder / "data.bin").exists()
    assert [p.name for p in folder.glob("data.bin.corrupt-*")] == [f"data.bin.corrupt-{sha(b'tampered' + BODY[8:])[:12]}"]
    lock = folder / "checksums.json"
    assert not lock.exists() or "data.bin" not in json.loads(lock.read_text())
    assert not list(folder.glob("*.part*"))


def test_first_use_hash_guards_every_later_download(tmp_path, server, monkeypatch):
    toy(monkeypatch, server, ("ann.json", b'{"v": 1}', False, False))
    dl.download(["toy"], root=tmp_path, progress=False)
    server.files["/ann.json"] = b'{"v": 2}'  # upstream changed (or someone tampers) after the first download
    with pytest.raises(UserError, match=sha(b'{"v": 1}')):
        dl.download(["toy"], root=tmp_path, force=True, progress=False)
    assert not (tmp_path / "toy" / "ann.json").exists()


def test_corrupt_local_file_is_moved_aside_and_fetched_again(tmp_path, server, monkeypatch):
    toy(monkeypatch, server, ("data.bin", BODY, True, False))
    folder = tmp_path / "toy"
    folder.mkdir()
    (folder / "data.bin").write_bytes(b"bit rot")
    dl.download(["toy"], root=tmp_path, progress=False)
    assert (folder / "data.bin").read_bytes() == BODY
    assert (folder / f"data.bin.corrupt-{sha(b'bit rot')[:12]}").read_bytes() == b"bit rot"


def test_dropped_connection_is_resumed_not_restarted(tmp_path, server, monkeypatch):
    toy(monkeypatch, server, ("big.bin", BODY, True, False))
    server.drop_once.add("/big.bin")
    dl.download(["toy"], root=tmp_path, progress=False)
    assert (tmp_path / "toy" / "big.bin").read_bytes() == BODY
    (_, first), (_, second) = server.requests
    kept = int(re.fullmatch(r"bytes=(\d+)-", second["Range"]).group(1))
    assert "Range" not in first and 0 < kept <= len(BODY) // 2
    assert second["If-Range"] == f'"{sha(BODY)[:16]}"'
    assert server.sent == [len(BODY) // 2, len(BODY) - kept]  # the second response carried only the rest


def test_failed_download_resumes_on_the_next_run(tmp_path, server, monkeypatch):
    monkeypatch.setattr(dl, "_RETRY_WAIT_S", ())
    toy(monkeypatch, server, ("big.bin", BODY, True, False))
    server.drop_once.add("/big.bin")
    with pytest.raises(UserError, match="resume"):
        dl.download(["toy"], root=tmp_path, progress=False)
    folder = tmp_path / "toy"
    assert not (folder / "big.bin").exists()
    kept = (folder / "big.bin.part").stat().st_size
    assert 0 < kept <= len(BODY) // 2
    dl.download(["toy"], root=tmp_path, progress=False)
    assert (folder / "big.bin").read_bytes() == BODY
    assert server.requests[-1][1]["Range"] == f"bytes={kept}-"
    assert server.sent[-1] == len(BODY) - kept


def test_server_without_range_support_restarts_from_zero(tmp_path, server, monkeypatch):
    toy(monkeypatch, server, ("big.bin", BODY, True, False))
    server.ranges = False
    folder = tmp_path / "toy"
    folder.mkdir()
    (folder / "big.bin.part").write_bytes(b"stale bytes from another file")
    dl.download(["toy"], root=tmp_path, progress=False)
    assert (folder / "big.bin").read_bytes() == BODY  # the 200 body replaced the .part instead of being appended


@pytest.mark.parametrize("extra", [b"", b"junk"], ids=["part-complete", "part-too-long"])
def test_part_file_left_by_a_killed_run(tmp_path, server, monkeypatch, extra):
    toy(monkeypatch, server, ("big.bin", BODY, True, False))
    folder = tmp_path / "toy"
    folder.mkdir()
    (folder / "big.bin.part").write_bytes(BODY + extra)
    dl.download(["toy"], root=tmp_path, progress=False)
    assert (folder / "big.bin").read_bytes() == BODY
    assert server.sent == ([] if not extra else [len(BODY)])  # complete: no body re-sent; too long: fetched anew


def test_missing_file_fails_at_once_with_the_url(tmp_path, server, monkeypatch):
    monkeypatch.setitem(dl.SOURCES, "toy", [Source(f"{server.url}/gone.zip", None, None, "gone.zip", True)])
    monkeypatch.setattr(dl, "_RETRY_WAIT_S", (0, 0, 0))
    with pytest.raises(UserError, match=r"gone\.zip.*404"):
        dl.download(["toy"], root=tmp_path, progress=False)
    assert len(server.requests) == 1  # a 404 is not retried


def test_zip_unpacks_beside_files_already_there_and_only_once(tmp_path, server, monkeypatch):
    toy(monkeypatch, server, ("annotations/a.json", b"{}", False, False),
        ("pack.zip", zip_bytes({"annotations/b.json": b"[]", "images/1.jpg": b"jpg"}), True, True))
    out = dl.download(["toy"], root=tmp_path, progress=False)["toy"]
    folder = tmp_path / "toy"
    assert out == [folder / "annotations/a.json", folder / "annotations", folder / "images"]
    assert (folder / "annotations/a.json").exists() and (folder / "annotations/b.json").read_bytes() == b"[]"
    assert json.loads((folder / ".pack.zip.unpacked").read_text())["members"] == ["annotations", "images"]
    monkeypatch.setattr(dl, "_extract", lambda *a: pytest.fail("unpacked twice"))
    dl.download(["toy"], root=tmp_path, progress=False)


def test_interrupted_unpack_is_not_taken_for_complete(tmp_path, server, monkeypatch):
    toy(monkeypatch, server, ("pack.zip", zip_bytes({"a/1.txt": b"1", "b/2.txt": b"2"}), True, True))
    real_merge = dl._merge

    def merge_then_die(src, dst):
        real_merge(src, dst)
        raise KeyboardInterrupt

    monkeypatch.setattr(dl, "_merge", merge_then_die)
    with pytest.raises(KeyboardInterrupt):
        dl.download(["toy"], root=tmp_path, progress=False)
    folder = tmp_path / "toy"
    assert not (folder / ".pack.zip.unpacked").exists() and not (folder / ".pack.zip.unpacking").exists()
    monkeypatch.setattr(dl, "_merge", real_merge)
    dl.download(["toy"], root=tmp_path, progress=False)
    assert (folder / "a/1.txt").exists() and (folder / "b/2.txt").exists()
    assert (folder / ".pack.zip.unpacked").exists()


def _assert_refused_and_nothing_written(tmp_path, server, monkeypatch, name, body, outside: Path):
    toy(monkeypatch, server, (name, body, False, True))
    with pytest.raises(UserError, match="refusing"):
        dl.download(["toy"], root=tmp_path, progress=False)
    folder = tmp_path / "toy"
    assert not outside.exists() or not any(outside.iterdir())
    assert sorted(p.name for p in folder.iterdir()) == sorted([name, "checksums.json", ".download.lock"])


def test_zip_with_parent_path_is_refused(tmp_path, server, monkeypatch):
    body = zip_bytes({"ok.txt": b"fine", "../evil": b"pwned", "../../evil": b"pwned"})
    _assert_refused_and_nothing_written(tmp_path, server, monkeypatch, "evil.zip", body, tmp_path / "outside")
    assert not (tmp_path / "evil").exists() and not (tmp_path.parent / "evil").exists()


def test_tar_with_absolute_path_is_refused(tmp_path, server, monkeypatch):
    outside = tmp_path / "outside"
    body = tar_bytes(lambda t: (tar_file(t, "ok.txt", b"fine"), tar_file(t, str(outside / "abs.txt"), b"pwned")))
    _assert_refused_and_nothing_written(tmp_path, server, monkeypatch, "abs.tar.gz", body, outside)


@pytest.mark.parametrize("link", ["../../outside", "ABSOLUTE"])
def test_tar_with_escaping_symlink_is_refused(tmp_path, server, monkeypatch, link):
    outside = tmp_path / "outside"
    outside.mkdir()
    target = str(outside) if link == "ABSOLUTE" else link

    def add(t):
        tar_link(t, "escape", target)
        tar_file(t, "escape/evil.txt", b"pwned")

    _assert_refused_and_nothing_written(tmp_path, server, monkeypatch, "link.tar.gz", tar_bytes(add), outside)


def test_safe_tar_unpacks_with_inner_symlink(tmp_path, server, monkeypatch):
    def add(t):
        tar_file(t, "flickr30k-images/1.jpg", b"jpg")
        tar_link(t, "flickr30k-images/latest.jpg", "1.jpg")

    toy(monkeypatch, server, ("imgs.tar.gz", tar_bytes(add), True, True))
    dl.download(["toy"], root=tmp_path, progress=False)
    assert (tmp_path / "toy/flickr30k-images/latest.jpg").read_bytes() == b"jpg"


def test_unknown_name_lists_the_valid_ones(tmp_path):
    with pytest.raises(UserError, match="unknown dataset 'cocoo'; valid names: coco, flickr30k, gqa, nocaps"):
        dl.download(["coco", "cocoo"], root=tmp_path)
    with pytest.raises(UserError, match="shapes"):
        dl.describe("vqa")
    assert not any(tmp_path.iterdir())  # nothing started before the names were checked


def test_shapes_is_generated_not_downloaded(tmp_path, monkeypatch):
    import blip_repro.data.shapes as shapes

    calls = []
    monkeypatch.setattr(shapes, "generate", lambda root=None, force=False: calls.append((root, force)) or root)
    assert dl.download(["shapes"], root=tmp_path, force=True) == {"shapes": [tmp_path / "shapes"]}
    assert calls == [(tmp_path / "shapes", True)]


def test_manual_step_is_printed_until_done(tmp_path, server, monkeypatch, capsys):
    toy(monkeypatch, server, ("annotations/flickr30k_test.json", b"[]", False, False))
    monkeypatch.setitem(dl.MANUAL, "toy", dl.MANUAL["flickr30k"])
    dl.download(["toy"], root=tmp_path, progress=False)
    assert "forms.illinois.edu" in capsys.readouterr().err
    (tmp_path / "toy/flickr30k-images").mkdir()
    dl.download(["toy"], root=tmp_path, progress=False)
    assert capsys.readouterr().err == ""


def test_describe_covers_sizes_hashes_and_manual_steps():
    coco = dl.describe("coco")
    assert "train2014.zip  (13.5 GB; sha256 pinned; unpacked)" in coco and "coco_karpathy_test_gt.json" in coco
    assert "sha256 on first use" in coco
    assert "https://forms.illinois.edu/sec/229675" in dl.describe("flickr30k")
    assert "nocaps.org/download" in dl.describe("nocaps")
    assert "no download" in dl.describe("shapes")


def test_sources_are_well_formed():
    for name, sources in dl.SOURCES.items():
        targets = [s.target for s in sources]
        assert len(set(targets)) == len(targets), name
        for s in sources:
            assert s.url.startswith(("http://", "https://")) and s.note, s
            assert s.sha256 is None or re.fullmatch(r"[0-9a-f]{64}", s.sha256), s
            assert not Path(s.target).is_absolute() and ".." not in Path(s.target).parts, s
            assert s.sha256 or "trust-on-first-use" in s.note, s
    answer_list = next(s for s in dl.SOURCES["vqav2"] if s.target == "answer_list.json")
    assert answer_list.url.endswith("/sfr-vision-language-research/datasets/answer_list.json")
