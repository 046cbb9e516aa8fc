"""The search server: its JSON API (in process), ``vlkit serve`` (a real subprocess) and the page in Chromium."""

from __future__ import annotations

import asyncio
import base64
import io
import re
import select
import subprocess
import sys
import time

import httpx
import pytest
import torch
import torch.nn.functional as F
from fastapi.testclient import TestClient
from PIL import Image

from vlkit.cli import main
from vlkit.data.store import open_dataset
from vlkit.search.index import build_index
from vlkit.inference.loading import load_for_inference
from vlkit.search.searcher import MAX_IMAGE_BYTES, Searcher
from vlkit.search.server import create_app

from .browser import CHROMIUM, CHROMIUM_ARGS, playwright as _playwright
from .conftest import jpeg_bytes

K_ERROR = "k must be an integer from 1 to 100"


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def index_dir(synth, trained_run, tmp_path_factory):
    run_dir, _ = trained_run
    out = tmp_path_factory.mktemp("serve") / "index"
    loaded = load_for_inference(run_dir)
    loaded.precision = "fp32"  # results are compared with a brute-force search in fp32
    build_index(loaded, synth, out)
    return out


@pytest.fixture(scope="module")
def searcher(index_dir):
    return Searcher(index_dir)


@pytest.fixture(scope="module")
def client(searcher):
    with TestClient(create_app(searcher), base_url="http://127.0.0.1:8000") as c:  # a host the server answers for
        yield c


@pytest.fixture(scope="module")
def dataset_rows(synth):
    """Every image of the dataset read straight from Lance: ids, captions and the original encoded bytes."""
    ds = open_dataset(synth)
    rows = ds.to_table(columns=["id", "captions"]).to_pydict()
    blobs = [bytes(data) for _, data in ds.read_blobs("image", indices=list(range(ds.count_rows())),
                                                        preserve_order=True)]
    return {"ids": rows["id"], "captions": rows["captions"], "images": blobs}


@pytest.fixture(scope="module")
def brute_force(searcher, dataset_rows):
    """Exact text->image search computed with the model alone (no LanceDB, no server): the reference."""
    model = searcher.loaded.model
    transform = model.preprocess.image_transform(train=False)
    with torch.no_grad():
        pixels = transform.normalize(torch.stack([transform(b) for b in dataset_rows["images"]]))  # [n, 3, S, S]
        images = F.normalize(model.encode_image(pixels).float(), dim=-1)  # [n, dim]

    def search(text: str, k: int) -> list[tuple[str, float]]:
        tokens = searcher.loaded.tokenizer([text])
        with torch.no_grad():
            query = F.normalize(model.encode_text(tokens["input_ids"], tokens["attention_mask"]).float(), dim=-1)
        scores = (images @ query[0]).tolist()
        order = sorted(range(len(scores)), key=lambda i: -scores[i])[:k]
        return [(dataset_rows["ids"][i], scores[i]) for i in order]

    return search


# --------------------------------------------------------------------------- the JSON API
def test_info(client, searcher):
    info = client.get("/api/info").json()
    assert info["images"] == searcher.info.images == 300
    assert info["captions"] == searcher.info.captions
    assert info["dim"] == searcher.info.dim and info["model_tag"] == searcher.info.model_tag
    assert info["max_k"] == 100 and info["max_upload_bytes"] == MAX_IMAGE_BYTES


def test_text_search_returns_k_sorted_results_with_thumbnails(client):
    r = client.get("/api/search", params={"q": "a red circle above a blue square", "k": 7})
    assert r.status_code == 200
    body = r.json()
    assert body["query"] == "a red circle above a blue square" and body["k"] == 7
    results = body["results"]
    assert len(results) == 7
    scores = [hit["score"] for hit in results]
    assert scores == sorted(scores, reverse=True) and all(-1 <= s <= 1 for s in scores)
    assert len({hit["id"] for hit in results}) == 7
    for hit in results:
        assert hit["caption"] in hit["captions"]
        assert "/" in hit["id"] and hit["thumbnail"] == f"/api/thumbnail/{hit['id']}"  # a slash in the path
        thumb = client.get(hit["thumbnail"])
        assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
        img = Image.open(io.BytesIO(thumb.content))
        assert img.format == "JPEG" and img.width > 0
        assert "max-age" in thumb.headers["cache-control"] and thumb.headers["etag"]
    again = client.get(results[0]["thumbnail"], headers={"If-None-Match": thumb.headers["etag"]})
    assert again.status_code == 200  # another image's tag
    etag = client.get(results[0]["thumbnail"]).headers["etag"]
    cached = client.get(results[0]["thumbnail"], headers={"If-None-Match": etag})
    assert cached.status_code == 304 and cached.content == b""


def test_caption_query_matches_the_searcher_and_a_brute_force_search(client, searcher, dataset_rows,
                                                                     brute_force):
    caption = dataset_rows["captions"][17][0]
    body = client.get("/api/search", params={"q": caption, "k": 10}).json()
    direct = searcher.search_text(caption, 10)
    assert [h["id"] for h in body["results"]] == [h.id for h in direct]
    assert [h["score"] for h in body["results"]] == pytest.approx([h.score for h in direct], abs=1e-6)
    reference = brute_force(caption, 10)
    top = body["results"][0]
    assert top["id"] == reference[0][0]
    assert top["score"] == pytest.approx(reference[0][1], abs=1e-4)
    assert [h["score"] for h in body["results"]] == pytest.approx([s for _, s in reference], abs=1e-4)
    row = dataset_rows["ids"].index(top["id"])
    assert top["caption"] == dataset_rows["captions"][row][0] and top["captions"] == dataset_rows["captions"][row]


@pytest.mark.parametrize("how", ["multipart", "raw"])
def test_image_upload_finds_the_same_image_first(client, dataset_rows, how):
    row = 42
    data = dataset_rows["images"][row]
    if how == "multipart":
        r = client.post("/api/search/image", params={"k": 5}, files={"file": ("x.png", data, "image/png")})
    else:
        r = client.post("/api/search/image?k=5", content=data, headers={"Content-Type": "image/png"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["mode"] == "images" and len(body["results"]) == 5
    first = body["results"][0]
    assert first["id"] == dataset_rows["ids"][row]
    assert first["score"] == pytest.approx(1.0, abs=1e-3)
    scores = [h["score"] for h in body["results"]]
    assert scores == sorted(scores, reverse=True)


def test_image_upload_in_captions_mode_returns_captions(client, searcher, dataset_rows):
    data = dataset_rows["images"][7]
    r = client.post("/api/search/image", files={"file": ("x.png", data, "image/png")},
                    data={"k": "6", "mode": "captions"})  # k and mode as form fields
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["mode"] == "captions" and body["k"] == 6 and len(body["results"]) == 6
    captions_of = dict(zip(dataset_rows["ids"], dataset_rows["captions"]))
    for hit in body["results"]:
        assert set(hit) == {"id", "text", "score", "thumbnail"}
        assert hit["text"] in captions_of[hit["id"]]  # a real caption of the image it names
    scores = [h["score"] for h in body["results"]]
    assert scores == sorted(scores, reverse=True)
    direct = searcher.image_to_text(data, 6)
    assert [(h["id"], h["text"]) for h in body["results"]] == [(h.id, h.text) for h in direct]


def test_default_k_and_query_parameter_precedence(client, dataset_rows):
    assert len(client.get("/api/search", params={"q": "a green square"}).json()["results"]) == 12
    r = client.post("/api/search/image?mode=images&k=3", files={"file": ("x.png", dataset_rows["images"][1])},
                    data={"mode": "captions", "k": "9"})
    assert r.json()["mode"] == "images" and len(r.json()["results"]) == 3


# --------------------------------------------------------------------------- errors
@pytest.mark.parametrize("params, message", [
    ({}, "missing query"),
    ({"q": ""}, "the query is empty"),
    ({"q": "   "}, "the query is empty"),
    ({"q": "x" * 1001}, "too long"),
    ({"q": "a red circle", "k": "0"}, K_ERROR),
    ({"q": "a red circle", "k": "101"}, K_ERROR),
    ({"q": "a red circle", "k": "abc"}, K_ERROR),
    ({"q": "a red circle", "k": "2.5"}, K_ERROR),
    ({"q": "a red circle", "k": ""}, K_ERROR),
])
def test_bad_text_queries_get_400_with_a_message(client, params, message):
    r = client.get("/api/search", params=params)
    assert r.status_code == 400
    assert message in r.json()["error"]


@pytest.mark.parametrize("kwargs, status, message", [
    ({"files": {"file": ("a.txt", b"hello, not an image", "text/plain")}}, 400, "not a readable image"),
    ({"content": b"\x89PNG\r\n\x1a\n truncated", "headers": {"Content-Type": "image/png"}}, 400,
     "not a readable image"),
    ({"content": b"", "headers": {"Content-Type": "image/png"}}, 400, "empty"),
    ({"files": {"other": ("a.png", b"x", "image/png")}}, 400, "multipart field 'file'"),
    ({"content": b"hello", "headers": {"Content-Type": "text/plain"}}, 415, "unsupported upload type"),
    ({"content": b"--x\r\nbroken", "headers": {"Content-Type": "multipart/form-data"}}, 400, "multipart"),
])
def test_bad_uploads_get_4xx_with_a_message(client, kwargs, status, message):
    r = client.post("/api/search/image", **kwargs)
    assert r.status_code == status, r.text
    assert message in r.json()["error"]


@pytest.mark.parametrize("query, message", [("k=0", K_ERROR), ("k=x", K_ERROR), ("mode=both", "mode must be")])
def test_bad_upload_parameters_get_400(client, query, message):
    r = client.post(f"/api/search/image?{query}", content=jpeg_bytes(), headers={"Content-Type": "image/jpeg"})
    assert r.status_code == 400 and message in r.json()["error"]


def test_unknown_thumbnail_and_route_get_404(client):
    r = client.get("/api/thumbnail/images/no-such.png")
    assert r.status_code == 404 and "images/no-such.png" in r.json()["error"]
    assert client.get("/api/nothing").json() == {"error": "Not Found"}
    assert client.delete("/api/search").status_code == 405


def test_too_large_uploads_get_413(client):
    big = b"\xff" * (MAX_IMAGE_BYTES + 1)
    raw = client.post("/api/search/image", content=big, headers={"Content-Type": "image/jpeg"})
    form = client.post("/api/search/image", files={"file": ("big.jpg", big, "image/jpeg")})

    def chunks():  # no Content-Length: the limit applies while streaming
        for _ in range(MAX_IMAGE_BYTES // 2**20 + 2):
            yield b"\xff" * 2**20

    streamed = client.post("/api/search/image", content=chunks(), headers={"Content-Type": "image/jpeg"})
    assert "content-length" not in streamed.request.headers
    for r in (raw, form, streamed):
        assert r.status_code == 413, r.text
        assert "too large" in r.json()["error"] and "20.0 MiB" in r.json()["error"]


def test_oversized_upload_is_refused_before_the_body_is_read(searcher):
    """A Content-Length above the limit is answered at once: the body is never received."""
    app = create_app(searcher, max_upload_bytes=1000)
    received, sent = [], []

    async def receive():
        received.append(1)
        return {"type": "http.request", "body": b"x" * 10**6, "more_body": True}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
             "scheme": "http", "path": "/api/search/image", "raw_path": b"/api/search/image", "root_path": "",
             "query_string": b"", "server": ("test", 80), "client": ("test", 1),
             "headers": [(b"host", b"localhost:8000"), (b"content-type", b"image/jpeg"),
                         (b"content-length", str(10**12).encode())]}
    asyncio.run(app(scope, receive, send))
    assert sent[0]["status"] == 413 and received == []
    assert b"too large" in sent[1]["body"]


# --------------------------------------------------------------------------- the command line
def test_serve_without_an_index_fails_early(tmp_path, capsys):
    assert main(["serve", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no such index" in err


def test_serve_on_a_busy_port_fails_early(index_dir, capsys):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        assert main(["serve", str(index_dir), "--port", str(busy.getsockname()[1])]) == 2
    assert "cannot listen" in capsys.readouterr().err


@pytest.fixture(scope="module")
def live_server(index_dir, tmp_path_factory):
    """``vlkit serve INDEX --port 0`` in a real subprocess; yields the URL it prints."""
    log = tmp_path_factory.mktemp("serve-log") / "stderr.txt"
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "vlkit", "serve", str(index_dir), "--port", "0"],
                                stdout=subprocess.PIPE, stderr=err, text=True)
    try:
        deadline = time.monotonic() + 120
        line = ""
        while not line and time.monotonic() < deadline and proc.poll() is None:
            if select.select([proc.stdout], [], [], 0.5)[0]:
                line = proc.stdout.readline()
        match = re.search(r"at (http://127\.0\.0\.1:\d+/)", line)
        assert match, f"no URL printed: {line!r}; stderr: {log.read_text()[-2000:]}"
        url = match.group(1)
        while time.monotonic() < deadline:  # the socket listens already; wait for the app to answer
            try:
                if httpx.get(url + "api/info", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_serve_subprocess_answers_over_http(live_server):
    info = httpx.get(live_server + "api/info", timeout=30).json()
    assert info["images"] == 300
    hit = httpx.get(live_server + "api/search", params={"q": "a blue triangle", "k": 2}, timeout=30).json()
    assert len(hit["results"]) == 2
    thumb = httpx.get(live_server + hit["results"][0]["thumbnail"].lstrip("/"), timeout=30)
    assert thumb.status_code == 200 and thumb.content[:2] == b"\xff\xd8"
    page = httpx.get(live_server, timeout=30)
    assert page.status_code == 200 and "default-src 'self'" in page.headers["content-security-policy"]
    for asset in ("static/app.js", "static/style.css"):
        assert httpx.get(live_server + asset, timeout=30).status_code == 200


# --------------------------------------------------------------------------- the page in a browser
def test_page_end_to_end_in_chromium(live_server, dataset_rows, tmp_path):
    sync_playwright, expect = _playwright()
    expect.set_options(timeout=30_000)
    caption = dataset_rows["captions"][5][0]
    api_top = httpx.get(live_server + "api/search", params={"q": caption, "k": 8}, timeout=30).json()["results"][0]
    external, page_errors = [], []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.set_default_timeout(30_000)
            page.on("request", lambda req: None if req.url.startswith((live_server, "blob:", "data:"))
                    else external.append(req.url))
            page.on("pageerror", lambda exc: page_errors.append(str(exc)))
            page.goto(live_server)
            expect(page.get_by_test_id("index-info")).to_contain_text("300 images")

            # text -> images
            page.get_by_test_id("k-select").select_option("8")
            page.get_by_test_id("query-input").fill(caption)
            page.get_by_test_id("query-input").press("Enter")
            cards = page.get_by_test_id("result-card")
            expect(cards).to_have_count(8)
            expect(page.get_by_test_id("status")).to_contain_text("8 images for")
            first = cards.first
            expect(first).to_have_attribute("data-id", api_top["id"])
            expect(first.get_by_test_id("result-caption")).to_have_text(api_top["caption"])
            expect(first.get_by_test_id("result-score")).to_have_text(f"{api_top['score']:.3f}")
            page.wait_for_function("img => img.complete && img.naturalWidth > 0",
                                   arg=first.get_by_test_id("result-image").element_handle())
            page.wait_for_function("() => [...document.querySelectorAll('.card img')]"
                                   ".every(i => i.complete && i.naturalWidth > 0)")
            page.screenshot(path=str(tmp_path / "serve-text-search.png"))
            assert "q=" in page.url  # the search is in the address, to share or reload

            # image -> images through the file input
            row = 42
            page.get_by_test_id("file-input").set_input_files(
                {"name": "query.png", "mimeType": "image/png", "buffer": dataset_rows["images"][row]})
            expect(page.get_by_test_id("query-preview")).to_be_visible()
            expect(cards.first).to_have_attribute("data-id", dataset_rows["ids"][row])
            expect(cards).to_have_count(8)
            expect(cards.first.get_by_test_id("result-score")).to_have_text(re.compile(r"^(1\.000|0\.99\d)$"))

            # switching to captions searches the same image again
            page.locator("label[for=mode-captions]").click()
            rows = page.get_by_test_id("caption-result")
            expect(rows).to_have_count(8)
            captions_of = dict(zip(dataset_rows["ids"], dataset_rows["captions"]))
            top_id = rows.first.get_attribute("data-id")
            assert rows.first.get_by_test_id("caption-text").inner_text() in captions_of[top_id]

            # an image dropped on the zone searches by it (in the mode chosen now)
            page.locator("label[for=mode-images]").click()
            expect(cards).to_have_count(8)
            row = 99
            dropped = page.evaluate_handle(
                """b64 => { const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
                            const dt = new DataTransfer();
                            dt.items.add(new File([bytes], 'dropped.png', {type: 'image/png'}));
                            return dt; }""", base64.b64encode(dataset_rows["images"][row]).decode())
            page.get_by_test_id("dropzone").dispatch_event("drop", {"dataTransfer": dropped})
            expect(page.get_by_test_id("query-preview")).to_contain_text("dropped.png")
            expect(cards.first).to_have_attribute("data-id", dataset_rows["ids"][row])

            # "Similar" on a result searches by its thumbnail
            second = cards.nth(1).get_attribute("data-id")
            cards.nth(1).get_by_test_id("find-similar").click()
            expect(page.get_by_test_id("query-preview")).to_contain_text(second.split("/")[-1])
            expect(cards).to_have_count(8)

            # errors from the API are shown in the page
            page.get_by_test_id("query-input").fill("")
            page.get_by_test_id("search-button").click()
            expect(page.get_by_test_id("error")).to_have_text("the query is empty")
            expect(cards).to_have_count(0)
            page.get_by_test_id("file-input").set_input_files(
                {"name": "notes.txt", "mimeType": "text/plain", "buffer": b"not an image"})
            expect(page.get_by_test_id("error")).to_contain_text("not a readable image")
            expect(page.get_by_test_id("query-preview")).to_be_hidden()
            huge = tmp_path / "huge.jpg"
            with open(huge, "wb") as fh:  # sparse: nothing is written, the browser reads it from disk
                fh.truncate(MAX_IMAGE_BYTES + 1)
            page.get_by_test_id("file-input").set_input_files(huge)
            expect(page.get_by_test_id("error")).to_contain_text("too large")

            # and a new good search clears the error
            page.get_by_test_id("query-input").fill("a yellow circle")
            page.get_by_test_id("search-button").click()
            expect(cards).to_have_count(8)
            expect(page.get_by_test_id("error")).to_be_hidden()
        finally:
            browser.close()
    assert external == [], f"the page asked for outside resources: {external}"
    assert page_errors == []
