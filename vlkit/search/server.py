"""The search web server: a JSON API over a :class:`~vlkit.search.searcher.Searcher` and the page that uses it.

Routes::

    GET  /                         the search page (static/index.html, app.js, style.css under /static)
    GET  /api/info                 index size, embedding size, model fingerprints, limits
    GET  /api/search?q=TEXT&k=N    images for a text query (videos, for an index of videos: each result then has
                                   ``media: "video"`` and its ``duration``, its thumbnail the middle frame)
    POST /api/search/image         images (mode=images) or captions (mode=captions) for an uploaded image:
                                   multipart field ``file``, or the raw bytes with an image/* content type;
                                   ``k`` and ``mode`` as query parameters (or multipart fields)
    POST /api/describe             captions written for an uploaded image by the served model when it has a text
                                   decoder (coca-*, or a captioner given as ``describer``): the upload as for
                                   /api/search/image, ``n`` (captions, 1 to 5, default 1) as a query parameter
                                   or multipart field; ``{"captions": [{"caption", "score"}], ...}``, best first
    GET  /api/thumbnail/{id}       the stored JPEG thumbnail of an image (ids may contain slashes)
    GET  /api/explain?id=ID&q=TEXT why the image matches the text: a PNG heat map over its thumbnail, computed
                                   on demand and cached (:mod:`vlkit.search.explainer`)

Every error is JSON ``{"error": "<message>"}`` with a 4xx status for the caller's mistakes (400 bad query or a
``Host`` the server does not answer for, 404 unknown id or route, 413 upload too large in bytes or in pixels,
415 unsupported upload type, 400 for a description asked of a model that cannot write one or an explanation
of a model run by onnxruntime), 503 while the index is being rebuilt, and 500 otherwise. Uploads are read as a
stream and refused as soon as they pass the limit (at once when Content-Length already says so); an image's
pixel count is checked from its header before it is decoded and before the model lock is taken. Model inference
runs in the threadpool, one query at a time (the model and tokenizer are shared). A rebuilt index is picked
up by the next request (see :class:`~vlkit.search.searcher.Searcher`).
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
import time
from pathlib import Path
from typing import AsyncIterator, Callable, Sequence, TypeVar
from urllib.parse import quote

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect

from vlkit import __version__
from vlkit.errors import VlkitError
from vlkit.data.decode import max_pixels
from vlkit.search.describe import MAX_DESCRIPTIONS, Describer
from vlkit.search.explainer import ExplanationCache
from vlkit.search.http_guard import LOOPBACK_HOSTS, AllowedHosts
from vlkit.inference.loading import LoadedModel
from vlkit.search.searcher import (MAX_IMAGE_BYTES, MAX_K, ImageHit, IndexUnavailable, QueryError,
                                   QueryImageTooLarge, Searcher, check_image, check_k)

STATIC_DIR = Path(__file__).resolve().parent / "static"
DEFAULT_K = 12
MODES = ("images", "captions")
MULTIPART_SLACK = 64 * 1024  # room for multipart boundaries and headers around the file
THUMBNAIL_CACHE = "public, max-age=3600"
# The page loads nothing from elsewhere; the policy makes the browser hold it to that.
PAGE_POLICY = ("default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; "
               "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'")

log = logging.getLogger(__name__)
T = TypeVar("T")


class ApiError(Exception):
    """An error answered as ``{"error": message}`` with ``status``."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def _too_large(limit: int, size: int | None = None) -> ApiError:
    got = f" ({_mib(size)})" if size is not None else ""
    return ApiError(413, f"the uploaded image is too large{got}; at most {_mib(limit)}")


def parse_k(raw: str | None, default: int) -> int:
    """``k`` from a query string: a plain integer from 1 to ``MAX_K``, else a :class:`QueryError`."""
    if raw is None:
        return default
    text = raw.strip()
    if not re.fullmatch(r"[+-]?\d{1,9}", text):
        check_k(raw)  # raises, naming the bad value
    return check_k(int(text))


def parse_mode(raw: str | None) -> str:
    """``mode`` of an image search: ``images`` (the default) or ``captions``."""
    mode = (raw or "images").strip().lower()
    if mode not in MODES:
        raise QueryError(f"mode must be 'images' or 'captions', not {raw!r}")
    return mode


def parse_n(raw: str | None) -> int:
    """``n`` of a description: the number of captions, 1 to :data:`MAX_DESCRIPTIONS` (default 1)."""
    if raw is None:
        return 1
    text = raw.strip()
    if not re.fullmatch(r"[+-]?\d{1,3}", text) or not 1 <= int(text) <= MAX_DESCRIPTIONS:
        raise QueryError(f"n must be an integer from 1 to {MAX_DESCRIPTIONS}, not {raw!r}")
    return int(text)


def thumbnail_url(image_id: str) -> str:
    """The URL of an image's thumbnail (the id percent-encoded, its slashes kept)."""
    return "/api/thumbnail/" + quote(image_id, safe="/")


def image_result(hit: ImageHit) -> dict:
    """The JSON of one image found: ``id``, ``score``, ``caption``, ``captions``, ``thumbnail`` (its URL); a
    video found in an index of videos also has ``media: "video"`` and its ``duration`` in seconds (its
    thumbnail is its middle frame)."""
    out = {"id": hit.id, "score": hit.score, "caption": hit.caption, "captions": hit.captions,
           "thumbnail": thumbnail_url(hit.id)}
    if hit.media == "video":
        out.update(media="video", duration=hit.duration)
    return out


async def _limited(chunks: AsyncIterator[bytes], limit: int, max_image: int) -> AsyncIterator[bytes]:
    """Pass ``chunks`` on, answering 413 as soon as more than ``limit`` bytes have come."""
    total = 0
    async for chunk in chunks:
        total += len(chunk)
        if total > limit:
            raise _too_large(max_image)
        yield chunk


def _declared_length(request: Request) -> int | None:
    value = request.headers.get("content-length")
    return int(value) if value and value.isdigit() else None


class _Service:
    """What the routes share: the searcher, a lock around the model and the limits."""

    def __init__(self, searcher: Searcher, max_upload_bytes: int, default_k: int, describer: Describer):
        self.searcher = searcher
        self.describer = describer
        self.max_upload = max_upload_bytes
        self.default_k = check_k(default_k)
        self.lock = threading.Lock()

    def locked(self, fn: Callable[..., T], *args) -> T:
        """Run ``fn(*args)`` holding the model lock (called in the threadpool)."""
        with self.lock:
            return fn(*args)

    def etag(self, image_id: str) -> str:
        info = self.searcher.info  # a rebuilt index gives its thumbnails new tags
        salt = f"{info.model_tag}-{info.built_at}"
        return '"' + hashlib.sha1(f"{salt}/{image_id}".encode()).hexdigest()[:20] + '"'

    async def read_upload(self, request: Request) -> tuple[bytes, dict[str, str]]:
        """The uploaded image's bytes and any form fields, refusing oversized bodies without reading them."""
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        multipart = ctype == "multipart/form-data"
        limit = self.max_upload + (MULTIPART_SLACK if multipart else 0)
        declared = _declared_length(request)
        if declared is not None and declared > limit:
            raise _too_large(self.max_upload, declared if not multipart else None)
        if multipart:
            return await self._read_multipart(request, limit)
        if ctype and not (ctype.startswith("image/") or ctype == "application/octet-stream"):
            raise ApiError(415, f"unsupported upload type {ctype!r}: send the image in the multipart field "
                                "'file', or as the request body with an image/* content type")
        chunks = [chunk async for chunk in _limited(request.stream(), limit, self.max_upload)]
        return b"".join(chunks), {}

    async def _read_multipart(self, request: Request, limit: int) -> tuple[bytes, dict[str, str]]:
        stream = _limited(request.stream(), limit, self.max_upload)
        parser = MultiPartParser(request.headers, stream, max_files=1, max_fields=8)
        try:
            form = await parser.parse()
        except MultiPartException as exc:
            raise ApiError(400, f"malformed multipart upload: {exc.message}") from None
        try:
            upload = form.get("file")
            if upload is None or isinstance(upload, str):
                raise ApiError(400, "no image: send it in the multipart field 'file'")
            data = await upload.read()
            fields = {key: value for key, value in form.multi_items() if isinstance(value, str)}
        finally:
            await form.close()
        if len(data) > self.max_upload:
            raise _too_large(self.max_upload, len(data))
        return data, fields


def create_app(searcher: Searcher, *, max_upload_bytes: int = MAX_IMAGE_BYTES,
               default_k: int = DEFAULT_K, allowed_hosts: Sequence[str] = LOOPBACK_HOSTS,
               describer: LoadedModel | None = None) -> FastAPI:
    """The search web application over ``searcher``.

    Args:
        searcher: the index to search.
        max_upload_bytes: the largest image upload accepted (413 above it).
        default_k: results returned when a request gives no ``k``.
        allowed_hosts: the hosts it answers for (``Host`` header, any port); others get 400. The default is
            this machine's loopback names; ``["*"]`` allows any host, which lets any web page a browser on
            this machine opens read the API (DNS rebinding).
        describer: the generative model that writes ``/api/describe``'s captions (default: the searcher's model,
            when it has a text decoder).

    Returns:
        A FastAPI application; serve it with uvicorn (``vlkit serve`` does).

    Example:
        >>> app = create_app(Searcher("runs/index"))  # doctest: +SKIP
        >>> uvicorn.run(app, port=8000)  # doctest: +SKIP
    """
    describe = Describer(describer if describer is not None else (lambda: searcher.loaded))
    svc = _Service(searcher, max_upload_bytes, default_k, describe)
    app = FastAPI(title="vlkit search", version=__version__, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = svc
    app.add_middleware(AllowedHosts, hosts=allowed_hosts)
    _add_error_handlers(app)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", headers={
            "Content-Security-Policy": PAGE_POLICY, "X-Content-Type-Options": "nosniff",
            "Cache-Control": "no-cache"})

    @app.get("/api/info")
    def info() -> dict:
        searcher.refresh()
        i = searcher.info
        return {"images": i.images, "media": i.media, "frames": i.frames, "captions": i.captions, "dim": i.dim,
                "dataset": Path(i.dataset).name,
                "split": i.split, "model_tag": i.model_tag, "query_model_tag": searcher.loaded.tag,
                "search": i.search, "built_at": i.built_at, "max_k": MAX_K, "default_k": svc.default_k,
                "max_upload_bytes": svc.max_upload, "max_pixels": max_pixels(), "vlkit_version": __version__,
                "can_describe": describe.available, "max_descriptions": MAX_DESCRIPTIONS,
                "can_explain": explanations.available}

    @app.get("/api/search")
    def search_text(q: str | None = None, k: str | None = None) -> dict:
        if q is None:
            raise QueryError("missing query: pass the text as ?q=...")
        n = parse_k(k, svc.default_k)
        start = time.perf_counter()
        hits = svc.locked(searcher.search_text, q, n)
        return {"query": q, "k": n, "took_ms": round((time.perf_counter() - start) * 1000, 1),
                "results": [image_result(h) for h in hits]}

    @app.post("/api/search/image")
    async def search_image(request: Request) -> dict:
        params = request.query_params
        # Check the cheap parameters before reading the upload.
        k_raw, mode_raw = params.get("k"), params.get("mode")
        if k_raw is not None:
            parse_k(k_raw, svc.default_k)
        if mode_raw is not None:
            parse_mode(mode_raw)
        data, fields = await svc.read_upload(request)
        n = parse_k(k_raw if k_raw is not None else fields.get("k"), svc.default_k)
        mode = parse_mode(mode_raw if mode_raw is not None else fields.get("mode"))
        await run_in_threadpool(check_image, data)  # the pixel limit, from the header, outside the model lock
        start = time.perf_counter()
        if mode == "captions":
            hits = await run_in_threadpool(svc.locked, searcher.image_to_text, data, n)
            results = [{"id": h.id, "text": h.text, "score": h.score, "thumbnail": thumbnail_url(h.id)}
                       for h in hits]
        else:
            found = await run_in_threadpool(svc.locked, searcher.search_image, data, n)
            results = [image_result(h) for h in found]
        return {"mode": mode, "k": n, "took_ms": round((time.perf_counter() - start) * 1000, 1),
                "results": results}

    @app.post("/api/describe")
    async def describe_image(request: Request) -> dict:
        n_raw = request.query_params.get("n")
        if n_raw is not None:
            parse_n(n_raw)
        describe.require()  # before the upload is read: a model that cannot write captions answers at once
        data, fields = await svc.read_upload(request)
        n = parse_n(n_raw if n_raw is not None else fields.get("n"))
        await run_in_threadpool(check_image, data)  # the pixel limit, from the header, outside the model lock
        start = time.perf_counter()
        written = await run_in_threadpool(svc.locked, describe.describe, data, n)
        return {"n": n, "took_ms": round((time.perf_counter() - start) * 1000, 1),
                "model_tag": describe.loaded.tag,
                "captions": [{"caption": text, "score": score} for text, score in written]}

    explanations = ExplanationCache(searcher)
    app.state.explanations = explanations

    @app.get("/api/explain")
    def explain_match(id: str | None = None, q: str | None = None) -> Response:  # noqa: A002 (the query key)
        image_id, query = explanations.check(id, q)
        searcher.refresh()
        explanations.require()  # an onnxruntime model answers at once
        picture = explanations.get(image_id, query, svc.locked)
        if picture is None:
            raise ApiError(404, f"no image with id {image_id!r} in this index")
        return Response(picture, media_type="image/png", headers={"Cache-Control": "no-cache"})

    @app.get("/api/thumbnail/{image_id:path}")
    def thumbnail(image_id: str, request: Request) -> Response:
        searcher.refresh()
        etag = svc.etag(image_id)
        headers = {"ETag": etag, "Cache-Control": THUMBNAIL_CACHE}
        if etag in request.headers.get("if-none-match", ""):  # only ever sent for ids this index holds
            return Response(status_code=304, headers=headers)
        data = searcher.thumbnail(image_id)
        if data is None:
            raise ApiError(404, f"no image with id {image_id!r} in this index")
        return Response(data, media_type="image/jpeg", headers=headers)

    return app


def _add_error_handlers(app: FastAPI) -> None:
    """Answer every error as ``{"error": message}``."""

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return _error(exc.status, exc.message)

    @app.exception_handler(QueryError)
    async def query_error(request: Request, exc: QueryError) -> JSONResponse:
        return _error(400, str(exc))

    @app.exception_handler(QueryImageTooLarge)
    async def image_too_large(request: Request, exc: QueryImageTooLarge) -> JSONResponse:
        return _error(413, str(exc))

    @app.exception_handler(IndexUnavailable)
    async def index_unavailable(request: Request, exc: IndexUnavailable) -> JSONResponse:
        log.warning("%s %s: %s", request.method, request.url.path, exc)
        return JSONResponse({"error": str(exc)}, status_code=503, headers={"Retry-After": "2"})

    @app.exception_handler(ClientDisconnect)
    async def client_gone(request: Request, exc: ClientDisconnect) -> JSONResponse:
        return _error(400, "the client closed the connection before the request was complete")

    @app.exception_handler(VlkitError)
    async def vlkit_error(request: Request, exc: VlkitError) -> JSONResponse:
        log.error("%s %s: %s", request.method, request.url.path, exc)
        return _error(500, str(exc))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = [f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors()]
        return _error(400, "; ".join(parts) or "bad request")

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("%s %s failed", request.method, request.url.path)
        return _error(500, f"internal error ({type(exc).__name__}); see the server log")
