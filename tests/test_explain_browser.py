"""The search page's "why?" in Chromium: the heat map from ``GET /api/explain`` laid over the centre square of
the card's thumbnail, fetched once and cached by the server, a route error written on the card; and the route
under the limits of the others (the model lock, a model that cannot be explained, a rebuilt index)."""

from __future__ import annotations

import io
import os
import threading

import httpx
import numpy as np
import pytest
from PIL import Image

from .browser import CHROMIUM, CHROMIUM_ARGS, playwright, serving
from .test_explain_serve import expected_png

pytestmark = pytest.mark.usefixtures("one_thread")

QUERY = "a red circle"
WIDE = (96, 64)  # the synthetic 64 px squares on a grey band each side: thumbnails wider than tall


def wide_shapes(root, seed: int, n: int = 10):
    """``n`` synthetic shapes images widened to 96 x 64 (the square in the middle), ingested into Lance."""
    from vlkit.data.ingest import ingest
    from vlkit.data.synth import generate

    manifest = generate(root / "shapes", n, seed=seed)
    for path in sorted((root / "shapes" / "images").glob("*.png")):
        with Image.open(path) as square:
            wide = Image.new("RGB", WIDE, (128, 128, 128))
            wide.paste(square.convert("RGB"), ((WIDE[0] - square.width) // 2, 0))
        wide.save(path)
    ingest([manifest], root / "shapes.lance", progress=False)
    return root / "shapes.lance"


def index_of(explain_run, dataset, out):
    from vlkit.inference.loading import load_for_inference
    from vlkit.search.index import build_index

    loaded = load_for_inference(explain_run)
    loaded.precision = "fp32"
    build_index(loaded, dataset, out)
    return out


@pytest.fixture(scope="module")
def index_dir(explain_run, tmp_path_factory):
    root = tmp_path_factory.mktemp("explain_browser")
    return index_of(explain_run, wide_shapes(root, seed=5), root / "index")


@pytest.fixture
def app(index_dir):
    """A fresh app (an empty heat-map cache) over the module's index."""
    from vlkit.search.searcher import Searcher
    from vlkit.search.server import create_app

    return create_app(Searcher(index_dir))


def explain_url(base: str, image_id: str, query: str = QUERY) -> str:
    return str(httpx.URL(base + "api/explain", params={"id": image_id, "q": query}))


def test_why_in_chromium(app, index_dir):
    sync_playwright, expect = playwright()
    expect.set_options(timeout=30_000)
    cache = app.state.explanations
    searcher = cache.searcher
    asked, page_errors = [], []
    with serving(app) as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.set_default_timeout(30_000)
            page.on("pageerror", lambda exc: page_errors.append(str(exc)))
            page.on("request", lambda req: asked.append(req.url) if "/api/explain" in req.url else None)
            page.goto(url)
            expect(page.get_by_test_id("index-info")).to_contain_text("10 images")
            page.get_by_test_id("k-select").select_option("4")
            page.get_by_test_id("query-input").fill(QUERY)
            page.get_by_test_id("query-input").press("Enter")
            cards = page.get_by_test_id("result-card")
            expect(cards).to_have_count(4)
            card = cards.first
            image_id = card.get_attribute("data-id")
            heat = card.get_by_test_id("heat-map")
            why = card.get_by_test_id("explain")
            expect(heat).to_have_count(0)
            assert asked == []  # nothing is computed before it is asked for

            # "why?" lays the route's picture over the thumbnail
            why.click()
            expect(heat).to_be_visible()
            expect(why).to_have_attribute("aria-pressed", "true")
            expect(card.get_by_test_id("explain-error")).to_be_hidden()
            page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=heat.element_handle())
            size = heat.evaluate("img => [img.naturalWidth, img.naturalHeight]")
            assert size == [224, 224]
            rgba = heat.evaluate("""img => { const c = document.createElement('canvas');
                c.width = img.naturalWidth; c.height = img.naturalHeight;
                const g = c.getContext('2d'); g.drawImage(img, 0, 0);
                return Array.from(g.getImageData(0, 0, c.width, c.height).data); }""")
            drawn = np.asarray(rgba, dtype=int).reshape(224, 224, 4)[..., :3]  # the pixels the page holds
            reference = expected_png(searcher, image_id, QUERY).astype(int)
            np.testing.assert_allclose(drawn, reference, atol=3)
            plain = Image.open(io.BytesIO(searcher.thumbnail(image_id))).convert("RGB")
            side = min(plain.size)
            left = (plain.width - side) // 2
            centre = np.asarray(plain.crop((left, 0, left + side, side)).resize((224, 224)), dtype=int)
            assert (np.abs(drawn - centre).max(-1) > 60).sum() > 100  # heat is drawn over the thumbnail

            # ... over the centre square of the thumbnail as the card shows it (contained in a square box)
            thumb = card.get_by_test_id("result-image")
            natural_w, natural_h = thumb.evaluate("img => [img.naturalWidth, img.naturalHeight]")
            assert natural_w > natural_h  # the thumbnails are wider than tall
            box, over = thumb.bounding_box(), heat.bounding_box()
            shown_h = box["width"] * natural_h / natural_w  # the picture's height inside the box
            want = {"x": box["x"] + (box["width"] - shown_h) / 2, "y": box["y"] + (box["height"] - shown_h) / 2,
                    "width": shown_h, "height": shown_h}
            assert over == pytest.approx(want, abs=1.0)
            assert shown_h < 0.8 * box["width"]

            # computed once: hidden and shown again without asking, asked again by new cards from the cache
            assert cache.computed == 1 and cache.hits == 0 and len(asked) == 1
            why.click()
            expect(heat).to_be_hidden()
            expect(why).to_have_attribute("aria-pressed", "false")
            why.click()
            expect(heat).to_be_visible()
            assert len(asked) == 1
            page.get_by_test_id("query-input").press("Enter")  # the same search: new cards
            expect(cards.first.get_by_test_id("heat-map")).to_have_count(0)
            expect(cards.first).to_have_attribute("data-id", image_id)
            cards.first.get_by_test_id("explain").click()
            expect(cards.first.get_by_test_id("heat-map")).to_be_visible()
            assert len(asked) == 2 and cache.computed == 1 and cache.hits == 1

            # a route error is written on the card, with no broken picture; asking again once it is gone works
            other = cards.nth(1)
            aside = index_dir.with_name(index_dir.name + "-aside")
            os.rename(index_dir, aside)  # as while 'vlkit index' replaces it
            try:
                other.get_by_test_id("explain").click()
                message = other.get_by_test_id("explain-error")
                expect(message).to_be_visible()
                expect(message).to_contain_text("missing or being rebuilt")
            finally:
                os.rename(aside, index_dir)
            expect(other.get_by_test_id("heat-map")).to_have_count(0)
            expect(other.get_by_test_id("explain")).to_have_attribute("aria-pressed", "false")
            assert other.evaluate("card => [...card.querySelectorAll('img')]"
                                  ".every(i => i.complete && i.naturalWidth > 0)")  # no broken picture
            other.get_by_test_id("explain").click()
            expect(other.get_by_test_id("heat-map")).to_be_visible()
            expect(message).to_be_hidden()
            assert cache.computed == 2

            # a server that cannot explain (an onnxruntime model) offers no "why?"
            def cannot_explain(route):
                body = route.fetch().json()
                route.fulfill(json={**body, "can_explain": False})

            page.route("**/api/info", cannot_explain)
            page.goto(url + "?q=" + QUERY.replace(" ", "+") + "&k=4")
            expect(cards).to_have_count(4)
            expect(page.get_by_test_id("index-info")).to_contain_text("10 images")
            page.get_by_test_id("query-input").press("Enter")
            expect(cards).to_have_count(4)
            expect(page.get_by_test_id("explain")).to_have_count(0)
        finally:
            browser.close()
    assert page_errors == []


def test_an_onnxruntime_model_cannot_be_explained(app):
    """A model without PyTorch weights is refused at once with 400 and says so in /api/info."""
    from vlkit.export.onnx_runtime import OnnxEncoders

    cache = app.state.explanations
    loaded = cache.searcher.loaded
    torch_model = loaded.model
    with serving(app) as url:
        assert httpx.get(url + "api/info").json()["can_explain"] is True
        image_id = httpx.get(url + "api/search", params={"q": QUERY, "k": 1}).json()["results"][0]["id"]
        loaded.model = OnnxEncoders(None, None, torch_model.preprocess, loaded.embed_dim, "clip")
        try:
            assert httpx.get(url + "api/info").json()["can_explain"] is False
            refused = httpx.get(explain_url(url, image_id))
        finally:
            loaded.model = torch_model
        assert refused.status_code == 400
        assert "OnnxEncoders" in refused.json()["error"] and "--runtime torch" in refused.json()["error"]
        assert cache.computed == 0
        assert httpx.get(explain_url(url, image_id)).status_code == 200


def test_explanations_wait_for_the_model_but_cached_ones_do_not(app):
    """Heat maps are computed under the model lock the searches take (one model call at a time); one already
    computed is answered while the model is busy."""
    svc, cache = app.state.service, app.state.explanations
    with serving(app) as url:
        ids = [h["id"] for h in httpx.get(url + "api/search", params={"q": QUERY, "k": 2}).json()["results"]]
        first = httpx.get(explain_url(url, ids[0]), timeout=30)
        assert first.status_code == 200 and cache.computed == 1
        answers = {}
        with svc.lock:  # the model busy with another query
            waiting = threading.Thread(target=lambda: answers.update(
                new=httpx.get(explain_url(url, ids[1]), timeout=60)))
            waiting.start()
            waiting.join(1.5)
            assert waiting.is_alive() and cache.computed == 1  # it waits for the model
            again = httpx.get(explain_url(url, ids[0]), timeout=5)
            assert again.status_code == 200 and again.content == first.content and cache.hits == 1
            search = threading.Thread(target=lambda: answers.update(
                search=httpx.get(url + "api/search", params={"q": QUERY, "k": 1}, timeout=60)))
            search.start()
            search.join(0.5)
            assert search.is_alive()  # the searches wait for the same lock
        waiting.join(30)
        search.join(30)
        assert answers["new"].status_code == 200 and answers["search"].status_code == 200
        assert cache.computed == 2


def test_a_rebuilt_index_gets_new_heat_maps(explain_run, tmp_path):
    """The cache is keyed by the index's version too: a rebuilt index holding other images under the same ids
    (another dataset) answers with heat maps of its own images, not the cached ones."""
    from vlkit.search.searcher import Searcher
    from vlkit.search.server import create_app

    out = index_of(explain_run, wide_shapes(tmp_path / "a", seed=5, n=4), tmp_path / "index")
    app = create_app(Searcher(out))
    cache = app.state.explanations
    with serving(app) as url:
        image_id = httpx.get(url + "api/search", params={"q": QUERY, "k": 1}).json()["results"][0]["id"]
        before = httpx.get(explain_url(url, image_id), timeout=30)
        assert before.status_code == 200 and cache.computed == 1
        index_of(explain_run, wide_shapes(tmp_path / "b", seed=6, n=4), out)  # the same ids, other images
        after = httpx.get(explain_url(url, image_id), timeout=30)
        assert after.status_code == 200 and cache.computed == 2 and after.content != before.content
        drawn = np.asarray(Image.open(io.BytesIO(after.content)).convert("RGB"), dtype=int)
        np.testing.assert_allclose(drawn, expected_png(cache.searcher, image_id, QUERY).astype(int), atol=3)
