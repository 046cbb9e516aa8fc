""""Describe this image" on the search server: ``POST /api/describe`` (in process) against ``write_captions``,
its 4xx answers, the model that writes the captions, and the page's describe mode in Chromium."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from fastapi.testclient import TestClient

from vlkit.cli import serve as serve_cli
from vlkit.data.decode import set_max_pixels
from vlkit.inference.captions import write_captions
from vlkit.search.describe import describe_settings
from vlkit.search.http_guard import bounded_protocol
from vlkit.search.index import build_index
from vlkit.inference.loading import load_for_inference
from vlkit.search.searcher import MAX_IMAGE_BYTES, Searcher
from vlkit.search.server import create_app

from .conftest import jpeg_bytes
from .test_caption_cli import loaded, one_thread, tiny  # noqa: F401  (shared module fixtures)
from .test_serve import CHROMIUM_ARGS, _playwright
from .test_serve_trust import bomb_png

LOCAL = "http://127.0.0.1:8000"


@pytest.fixture(scope="module")
def searcher(tiny, tmp_path_factory):
    """An index of the tiny dataset embedded by a random clip-tiny (a model that cannot write captions)."""
    out = tmp_path_factory.mktemp("describe") / "index"
    build_index(load_for_inference(tiny["clip"]), tiny["dataset"], out)
    return Searcher(out)


@pytest.fixture(scope="module")
def client(searcher, loaded):  # noqa: F811
    with TestClient(create_app(searcher, describer=loaded), base_url=LOCAL) as c:
        yield c


@pytest.fixture(scope="module")
def clip_client(searcher):
    with TestClient(create_app(searcher), base_url=LOCAL) as c:
        yield c


def _direct(loaded, data: bytes, n: int) -> list[tuple[str, float]]:  # noqa: F811
    transform = loaded.model.preprocess.image_transform(train=False)
    pixels = transform.normalize(transform(data)[None])
    return write_captions(loaded.model, loaded.tokenizer, pixels, None, **describe_settings(n))[0]


def test_describe_returns_the_captions_write_captions_writes(client, loaded, tiny):  # noqa: F811
    info = client.get("/api/info").json()
    assert info["can_describe"] is True and info["max_descriptions"] == 5
    data = tiny["images"][2].read_bytes()
    one = client.post("/api/describe", files={"file": ("a.png", data, "image/png")})
    assert one.status_code == 200, one.text
    want = _direct(loaded, data, 1)
    assert [c["caption"] for c in one.json()["captions"]] == [want[0][0]]
    assert one.json()["captions"][0]["score"] == pytest.approx(want[0][1], abs=1e-4)
    # three captions: as a query parameter on a raw upload, and as a multipart field
    raw = client.post("/api/describe?n=3", content=data, headers={"Content-Type": "image/png"}).json()
    form = client.post("/api/describe", files={"file": ("a.png", data, "image/png")}, data={"n": "3"}).json()
    want = _direct(loaded, data, 3)
    for body in (raw, form):
        assert body["n"] == 3 and [c["caption"] for c in body["captions"]] == [t for t, _ in want]
        scores = [c["score"] for c in body["captions"]]
        assert scores == pytest.approx([s for _, s in want], abs=1e-4) and scores == sorted(scores, reverse=True)
    assert raw["captions"][0]["caption"] == one.json()["captions"][0]["caption"]


@pytest.mark.parametrize("kwargs, status, message", [
    ({"files": {"file": ("a.txt", b"hello, not an image", "text/plain")}}, 400, "not a readable image"),
    ({"content": b"\x89PNG\r\n\x1a\n truncated", "headers": {"Content-Type": "image/png"}}, 400,
     "not a readable image"),
    ({"content": b"", "headers": {"Content-Type": "image/png"}}, 400, "empty"),
    ({"files": {"other": ("a.png", b"x", "image/png")}}, 400, "multipart field 'file'"),
    ({"content": b"hello", "headers": {"Content-Type": "text/plain"}}, 415, "unsupported upload type"),
    ({"content": b"\xff" * (MAX_IMAGE_BYTES + 1), "headers": {"Content-Type": "image/jpeg"}}, 413, "too large"),
    ({"files": {"file": ("big.jpg", b"\xff" * (MAX_IMAGE_BYTES + 1), "image/jpeg")}}, 413, "too large"),
    ({"content": bomb_png(), "headers": {"Content-Type": "image/png"}}, 413, "too large"),
])
def test_bad_uploads_get_4xx(client, kwargs, status, message):
    r = client.post("/api/describe", **kwargs)
    assert r.status_code == status, r.text
    assert message in r.json()["error"]


def test_the_pixel_limit_and_bad_n_get_4xx(client):
    for query in ("n=0", "n=6", "n=x"):
        r = client.post(f"/api/describe?{query}", content=jpeg_bytes(), headers={"Content-Type": "image/jpeg"})
        assert r.status_code == 400 and "n must be an integer from 1 to 5" in r.json()["error"]
    set_max_pixels(100)  # restored by the conftest's autouse fixture
    r = client.post("/api/describe", content=jpeg_bytes(size=(20, 10)), headers={"Content-Type": "image/jpeg"})
    assert r.status_code == 413 and "pixel limit" in r.json()["error"]


def test_a_model_that_cannot_write_captions_gets_400(clip_client, tiny):
    assert clip_client.get("/api/info").json()["can_describe"] is False
    r = clip_client.post("/api/describe", files={"file": ("a.png", tiny["images"][0].read_bytes(), "image/png")})
    assert r.status_code == 400
    assert "cannot describe images" in r.json()["error"] and "CLIP" in r.json()["error"]
    # search still works on that server
    assert clip_client.get("/api/search", params={"q": "a red circle", "k": 2}).status_code == 200


def test_a_generative_index_model_describes_by_default(tiny, tmp_path):
    """An index built by a model that embeds and writes (CoCa): the served model describes without a describer."""
    from vlkit.data.text import TextTokenizer
    from vlkit.models.io import save_model
    from vlkit.models.registry import create_model, list_models

    if "coca-tiny" not in list_models("coca*"):
        pytest.skip("coca-tiny is not registered")
    tokenizer = TextTokenizer(tiny["model"] / "tokenizer.json", max_length=32)
    torch.manual_seed(1)
    save_model(create_model("coca-tiny", vocab_size=tokenizer.vocab_size), tmp_path / "coca", tokenizer=tokenizer)
    loaded_coca = load_for_inference(tmp_path / "coca")
    build_index(loaded_coca, tiny["dataset"], tmp_path / "index")
    with TestClient(create_app(Searcher(tmp_path / "index")), base_url=LOCAL) as c:
        assert c.get("/api/info").json()["can_describe"] is True
        data = tiny["images"][0].read_bytes()
        body = c.post("/api/describe?n=2", content=data, headers={"Content-Type": "image/png"}).json()
    assert [x["caption"] for x in body["captions"]] == [t for t, _ in _direct(loaded_coca, data, 2)]


def test_the_page_describes_an_uploaded_image_in_chromium(searcher, loaded, tiny):  # noqa: F811
    sync_playwright, expect = _playwright()
    import uvicorn

    sock = serve_cli.bind("127.0.0.1", 0)
    app = create_app(searcher, describer=loaded)
    server = uvicorn.Server(serve_cli.server_config(app, bounded_protocol(10, 30)))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}/"
    data = tiny["images"][3].read_bytes()
    want = _direct(loaded, data, 1)[0][0]
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS, headless=True)
            try:
                page = browser.new_page()
                page.set_default_timeout(30_000)
                errors = []
                page.on("pageerror", lambda exc: errors.append(str(exc)))
                page.goto(url)
                label = page.get_by_test_id("mode-describe-label")
                expect(label).to_be_visible(timeout=30_000)
                label.click()
                page.get_by_test_id("file-input").set_input_files(
                    {"name": "query.png", "mimeType": "image/png", "buffer": data})
                rows = page.get_by_test_id("written-caption")
                expect(rows).to_have_count(1, timeout=30_000)
                expect(rows.first.get_by_test_id("caption-text")).to_have_text(want)
                expect(page.get_by_test_id("status")).to_contain_text("1 caption written for query.png")
                page.get_by_test_id("file-input").set_input_files(
                    {"name": "notes.txt", "mimeType": "text/plain", "buffer": b"not an image"})
                expect(page.get_by_test_id("error")).to_contain_text("not a readable image")
                assert errors == []
            finally:
                browser.close()
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def test_a_captioner_cannot_be_the_search_model(searcher, tiny, capsys):
    from vlkit.cli import main

    assert main(["serve", str(searcher.index_dir), "--port", "0", "--model", str(tiny["model"])]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "does not embed images and texts" in err, err
