"""The search page's "why?": ``GET /api/explain`` draws the heat map over the thumbnail, cached per model, id
and query, under the same limits as the other routes."""

from __future__ import annotations

import io

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def served(synth, explain_run, tmp_path_factory):
    from vlkit.inference.loading import load_for_inference
    from vlkit.search.index import build_index
    from vlkit.search.searcher import Searcher
    from vlkit.search.server import create_app

    out = tmp_path_factory.mktemp("explain_serve") / "index"
    loaded = load_for_inference(explain_run)
    loaded.precision = "fp32"
    build_index(loaded, synth, out)
    searcher = Searcher(out)
    app = create_app(searcher)
    with TestClient(app, base_url="http://127.0.0.1:8000") as client:
        yield client, app, searcher


def expected_png(searcher, image_id: str, query: str) -> np.ndarray:
    """The heat map drawn straight from the explanation of the stored thumbnail (no server, no cache)."""
    from vlkit.explain.figures import overlay
    from vlkit.explain.gradcam import explain

    thumbnail = searcher.thumbnail(image_id)
    model = searcher.loaded.model
    transform = model.preprocess.image_transform(train=False)
    result = explain(model, searcher.loaded.tokenizer, transform.normalize(transform(thumbnail)[None]), query)
    image = Image.open(io.BytesIO(thumbnail)).convert("RGB")
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    square = image.crop((left, top, left + side, top + side)).resize((224, 224))
    return np.asarray(overlay(square, result.heat.numpy()))


def test_why_draws_the_heat_map_over_the_thumbnail_and_caches_it(served):
    client, app, searcher = served
    hits = client.get("/api/search", params={"q": "a red circle", "k": 3}).json()["results"]
    first = hits[0]["id"]
    r = client.get("/api/explain", params={"id": first, "q": "a red circle"})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    drawn = np.asarray(Image.open(io.BytesIO(r.content)).convert("RGB"))
    assert drawn.shape == (224, 224, 3)
    np.testing.assert_allclose(drawn.astype(int), expected_png(searcher, first, "a red circle").astype(int), atol=3)

    cache = app.state.explanations
    computed = cache.computed
    again = client.get("/api/explain", params={"id": first, "q": "a red circle"})
    assert again.content == r.content and cache.computed == computed  # from the cache
    other = client.get("/api/explain", params={"id": first, "q": "a blue square"})
    assert other.status_code == 200 and other.content != r.content and cache.computed == computed + 1

    cache.size = 2  # least recently used dropped first
    client.get("/api/explain", params={"id": hits[1]["id"], "q": "a red circle"})
    client.get("/api/explain", params={"id": hits[2]["id"], "q": "a red circle"})
    assert len(cache._cache) == 2 and not cache.cached(first, "a red circle")
    assert cache.cached(hits[2]["id"], "a red circle")


def test_why_has_the_limits_of_the_other_routes(served):
    client, _, _ = served
    missing = client.get("/api/explain", params={"id": "no-such-image", "q": "a red circle"})
    assert missing.status_code == 404 and "no-such-image" in missing.json()["error"]
    assert client.get("/api/explain", params={"q": "a red circle"}).status_code == 400
    assert "missing query" in client.get("/api/explain", params={"id": "x"}).json()["error"]
    long = client.get("/api/explain", params={"id": "x", "q": "a" * 1001})
    assert long.status_code == 400 and "too long" in long.json()["error"]
    foreign = client.get("/api/explain", params={"id": "x", "q": "a"}, headers={"host": "evil.example"})
    assert foreign.status_code == 400


def test_the_page_offers_why_for_text_queries():
    """The page's script adds a "why?" button to result cards of a text query, pointing at /api/explain."""
    from vlkit.search.server import STATIC_DIR

    script = (STATIC_DIR / "app.js").read_text()
    assert "/api/explain?" in script and 'text: "why?"' in script and "imageCard(r, i + 1, body.query)" in script
