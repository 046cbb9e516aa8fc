"""The search server under hostile or changing conditions: decompression bombs, forged Host headers, clients
that never finish their request, and an index rebuilt while it is served."""

from __future__ import annotations

import io
import os
import socket
import threading
import time

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from vlkit.cli import build_parser, main
from vlkit.cli import serve as serve_cli
from vlkit.data.decode import DEFAULT_MAX_PIXELS, max_pixels, set_max_pixels
from vlkit.data.store import open_dataset, split_indices
from vlkit.search.http_guard import allowed_hosts_for, bounded_protocol
from vlkit.search.index import build_index
from vlkit.inference.loading import load_for_inference
from vlkit.search.searcher import QueryImageTooLarge, Searcher
from vlkit.search.server import create_app

from .conftest import jpeg_bytes

LOCAL = "http://127.0.0.1:8000"


def bomb_png(side: int = 9000) -> bytes:
    """A one-bit PNG of ``side`` x ``side`` pixels: about 10 KB on disk, 243 MB once decoded to RGB."""
    buf = io.BytesIO()
    Image.new("1", (side, side), 0).save(buf, "PNG", optimize=True)
    return buf.getvalue()


def split_ids(dataset, split: str) -> set[str]:
    ds = open_dataset(dataset)
    return set(ds.take(split_indices(ds, split), columns=["id"]).column("id").to_pylist())


@pytest.fixture(scope="module")
def loaded(trained_run):
    return load_for_inference(trained_run[0])


@pytest.fixture(scope="module")
def index_dir(synth, loaded, tmp_path_factory):
    out = tmp_path_factory.mktemp("trust") / "index"
    build_index(loaded, synth, out, split="val")
    return out


@pytest.fixture(scope="module")
def searcher(index_dir):
    return Searcher(index_dir)


@pytest.fixture(scope="module")
def app(searcher):
    return create_app(searcher)


@pytest.fixture(scope="module")
def client(app):
    with TestClient(app, base_url=LOCAL) as c:
        yield c


@pytest.fixture
def pixel_limit():
    """Set the process-wide pixel limit in a test; restored afterwards."""
    yield set_max_pixels
    set_max_pixels(None)


# --------------------------------------------------------------------------- decompression bombs
def test_pixel_bomb_is_refused_with_413_without_taking_the_model_lock(app, client):
    data = bomb_png()
    assert len(data) < 64 * 1024 and 9000 * 9000 > DEFAULT_MAX_PIXELS
    lock = app.state.service.lock
    lock.acquire()  # a long query holds the model: a bomb must be answered without waiting for it
    releaser = threading.Timer(5.0, lock.release)
    releaser.start()
    try:
        start = time.perf_counter()
        raw = client.post("/api/search/image", content=data, headers={"Content-Type": "image/png"})
        form = client.post("/api/search/image", files={"file": ("bomb.png", data, "image/png")},
                           data={"mode": "captions"})
        took = time.perf_counter() - start
    finally:
        releaser.cancel()
        if lock.locked():
            lock.release()
    assert took < 2.0, f"the bomb took {took:.1f} s"
    for r in (raw, form):
        assert r.status_code == 413, r.text
        assert "9000x9000" in r.json()["error"] and "pixel limit" in r.json()["error"]


def test_the_pixel_limit_setting_is_obeyed(client, monkeypatch, pixel_limit):
    image = jpeg_bytes(size=(48, 32))  # 1536 pixels
    monkeypatch.setenv("VLKIT_MAX_PIXELS", "1535")
    r = client.post("/api/search/image", content=image, headers={"Content-Type": "image/jpeg"})
    assert r.status_code == 413 and "48x32" in r.json()["error"]
    monkeypatch.setenv("VLKIT_MAX_PIXELS", "1536")
    assert client.post("/api/search/image", content=image, headers={"Content-Type": "image/jpeg"}).status_code == 200
    pixel_limit(1000)  # --max-pixels wins over the environment
    assert client.post("/api/search/image", content=image, headers={"Content-Type": "image/jpeg"}).status_code == 413
    assert client.get("/api/info").json()["max_pixels"] == 1000


def test_serve_max_pixels_option_sets_the_limit(pixel_limit):
    args = build_parser().parse_args(["serve", "idx", "--max-pixels", "2500", "--allowed-hosts", "search.lan"])
    hosts, protocol = serve_cli._check_options(args)
    assert max_pixels() == 2500
    assert "search.lan" in hosts and protocol.header_timeout == 10 and protocol.body_timeout == 30


def noise_png(side: int = 64) -> bytes:
    buf = io.BytesIO()
    Image.frombytes("RGB", (side, side), os.urandom(side * side * 3)).save(buf, "PNG")
    return buf.getvalue()


@pytest.mark.parametrize("data, reason", [
    (b"just some text", "unrecognised format"),
    (jpeg_bytes(size=(64, 64))[:300], "truncated"),  # in the header
    (noise_png()[:6000], "truncated"),  # a sound header, then the pixels stop
])
def test_a_decode_failure_names_its_reason(client, data, reason):
    r = client.post("/api/search/image", content=data, headers={"Content-Type": "image/png"})
    assert r.status_code == 400
    assert "not a readable image: " in r.json()["error"] and reason in r.json()["error"].lower(), r.text


def test_cli_search_and_ask_refuse_a_bomb_in_one_line(index_dir, tmp_path, capsys):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(bomb_png())
    for argv in (["search", str(index_dir), "--image", str(bomb)],
                 ["search", str(index_dir), "--image", str(bomb), "--captions"],
                 ["ask", str(tmp_path), str(bomb), "what colour is it?"]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "pixel limit" in err and str(bomb) in err, err
    with pytest.raises(QueryImageTooLarge):
        Searcher(index_dir).search_image(bomb.read_bytes())


# --------------------------------------------------------------------------- Host header
@pytest.mark.parametrize("base", ["http://127.0.0.1:8000", "http://localhost:5000", "http://[::1]:8000",
                                  "http://LOCALHOST"])
def test_loopback_hosts_are_answered(app, base):
    with TestClient(app, base_url=base) as c:
        assert c.get("/api/info").status_code == 200


@pytest.mark.parametrize("host", ["evil.example", "evil.example:8000", "127.0.0.1.evil.example", "testserver"])
def test_a_forged_host_gets_400(client, host):
    for r in (client.get("/api/info", headers={"Host": host}),
              client.get("/api/search", params={"q": "a red circle"}, headers={"Host": host}),
              client.get("/", headers={"Host": host})):
        assert r.status_code == 400 and "not allowed" in r.json()["error"]


def test_allowed_hosts_follow_the_bind_address_and_the_option(searcher):
    assert "192.168.1.5" in allowed_hosts_for("192.168.1.5") and "[::1]" in allowed_hosts_for("::")
    assert allowed_hosts_for("0.0.0.0") == allowed_hosts_for("::") == ["127.0.0.1", "localhost", "[::1]"]
    app = create_app(searcher, allowed_hosts=allowed_hosts_for("0.0.0.0", ["search.lan", "10.0.0.7"]))
    with TestClient(app, base_url="http://search.lan:8000") as c:
        assert c.get("/api/info").status_code == 200
        assert c.get("/api/info", headers={"Host": "10.0.0.7:8000"}).status_code == 200
        assert c.get("/api/info", headers={"Host": "other.lan"}).status_code == 400
    with TestClient(create_app(searcher, allowed_hosts=["*"]), base_url="http://anything.example") as c:
        assert c.get("/api/info").status_code == 200
    with pytest.raises(ValueError, match="not a host"):
        allowed_hosts_for("127.0.0.1", ["*.lan"])


def test_serve_refuses_bad_options_before_loading(index_dir, capsys):
    for extra, message in ((["--allowed-hosts", "a b"], "--allowed-hosts"),
                           (["--header-timeout", "0"], "--header-timeout"),
                           (["--body-timeout", "-1"], "--body-timeout")):
        assert main(["serve", str(index_dir), *extra]) == 2
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit) as excinfo:  # parsed as the global --max-pixels is: an argparse error
        main(["serve", str(index_dir), "--max-pixels", "0"])
    assert excinfo.value.code == 2 and "--max-pixels" in capsys.readouterr().err


# --------------------------------------------------------------------------- timeouts on a real server
@pytest.fixture(scope="module")
def live(searcher):
    """The app served by uvicorn on 127.0.0.1 with 1 s header and body deadlines and a 1000-byte upload limit."""
    import uvicorn

    sock = serve_cli.bind("127.0.0.1", 0)
    app = create_app(searcher, max_upload_bytes=1000)
    server = uvicorn.Server(serve_cli.server_config(app, bounded_protocol(header_timeout=1, body_timeout=1)))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    yield sock.getsockname()[1]
    server.should_exit = True
    thread.join(10)
    sock.close()


def _closed_after(port: int, *parts: bytes) -> tuple[float, bytes]:
    """Send ``parts``, then wait (at most 10 s) for the server to close; returns the seconds taken and the reply."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        start = time.monotonic()
        for part in parts:
            s.sendall(part)
        reply = b""
        try:
            while chunk := s.recv(65536):
                reply += chunk
        except (socket.timeout, ConnectionResetError):
            pass
        return time.monotonic() - start, reply


def _response(s: socket.socket) -> bytes:
    """One whole HTTP response from ``s`` (headers, then the body its Content-Length announces)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        assert chunk, f"connection closed inside the headers: {data!r}"
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), 0)
    while len(body) < length:
        chunk = s.recv(65536)
        assert chunk, f"connection closed inside the body: {data!r}"
        body += chunk
    return head + b"\r\n\r\n" + body


def test_half_sent_headers_and_bodies_are_closed_within_the_bound(live):
    head = f"POST /api/search/image HTTP/1.1\r\nHost: 127.0.0.1:{live}\r\nContent-Type: image/png\r\n"
    cases = {
        "silent": (),
        "half header": (b"GET /api/info HTTP/1.1\r\nHost: 127.0.0.1\r\n",),
        "half body": ((head + "Content-Length: 900\r\n\r\n").encode() + b"x" * 100,),
    }
    for name, parts in cases.items():
        took, reply = _closed_after(live, *parts)
        assert 0.8 < took < 4.0 and reply == b"", f"{name}: closed after {took:.1f} s, reply {reply[:80]!r}"


def test_keep_alive_then_half_a_request_is_closed_too(live):
    request = f"GET /api/info HTTP/1.1\r\nHost: 127.0.0.1:{live}\r\n\r\n".encode()
    with socket.create_connection(("127.0.0.1", live), timeout=10) as s:
        s.sendall(request)
        assert _response(s).startswith(b"HTTP/1.1 200")
        start = time.monotonic()
        s.sendall(b"GET /api/info HT")  # the next request never ends
        assert s.recv(65536) == b""
        assert time.monotonic() - start < 4.0


def test_a_streamed_upload_is_refused_while_it_is_read(live):
    """Without Content-Length, the limit applies as the body arrives: 413 comes before the body ends."""
    head = (f"POST /api/search/image HTTP/1.1\r\nHost: 127.0.0.1:{live}\r\nContent-Type: image/png\r\n"
            "Transfer-Encoding: chunked\r\n\r\n").encode()
    chunk = b"%x\r\n%s\r\n" % (600, b"x" * 600)
    with socket.create_connection(("127.0.0.1", live), timeout=10) as s:
        s.sendall(head + chunk + chunk)  # 1200 bytes of an unending body: over the 1000-byte limit
        reply = _response(s)
    assert reply.startswith(b"HTTP/1.1 413") and b"too large" in reply


def test_a_forged_host_is_refused_by_the_real_server(live):
    took, reply = _closed_after(live, b"GET /api/info HTTP/1.1\r\nHost: rebind.example\r\nConnection: close\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 400") and b"not allowed" in reply


# --------------------------------------------------------------------------- an index rebuilt while served
def test_an_index_rebuilt_in_place_is_served_without_a_restart(synth, loaded, tmp_path):
    index = tmp_path / "index"
    build_index(loaded, synth, index, split="val")
    val, test = split_ids(synth, "val"), split_ids(synth, "test")
    with TestClient(create_app(Searcher(index)), base_url=LOCAL) as c:
        first = c.get("/api/search", params={"q": "a red circle", "k": 5})
        assert first.status_code == 200 and {h["id"] for h in first.json()["results"]} <= val

        build_index(loaded, synth, index, split="test")  # replaces the directory by a rename
        for _ in range(2):  # the first request re-opens the index, the next ones use it
            r = c.get("/api/search", params={"q": "a red circle", "k": 5})
            assert r.status_code == 200, r.text
            assert {h["id"] for h in r.json()["results"]} <= test
        info = c.get("/api/info").json()
        assert info["split"] == "test" and info["images"] == len(test)
        some = next(iter(test))
        assert c.get(f"/api/thumbnail/{some}").status_code == 200

        os.replace(index, tmp_path / "aside")  # the moment between removing the old index and renaming the new
        for r in (c.get("/api/search", params={"q": "a red circle"}), c.get(f"/api/thumbnail/{some}"),
                  c.get("/api/info")):
            assert r.status_code == 503 and "being rebuilt" in r.json()["error"], r.text
            assert r.headers["retry-after"]
        os.replace(tmp_path / "aside", index)
        assert c.get("/api/search", params={"q": "a red circle"}).status_code == 200
