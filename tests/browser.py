"""What the browser tests share: Debian's Chromium driven headless by Playwright, and a search app served on a
free loopback port in a thread of the test process (so a test can look at the app's state while the page uses
it)."""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def playwright():
    """``(sync_playwright, expect)`` from Playwright, or skip the test when Chromium or Playwright is missing."""
    if not CHROMIUM.exists():
        pytest.skip(f"no Chromium at {CHROMIUM}: the browser test needs it")
    try:
        from playwright.sync_api import expect, sync_playwright
    except ImportError:
        pytest.skip("the playwright package is not installed: the browser test needs it")
    return sync_playwright, expect


@contextmanager
def serving(app, header_timeout: float = 10, body_timeout: float = 30) -> Iterator[str]:
    """Serve ``app`` as ``vlkit serve`` does (uvicorn, h11 with request deadlines) on a free port of 127.0.0.1.

    Yields:
        The page's URL, ``http://127.0.0.1:PORT/``, once the server answers.
    """
    import uvicorn

    from vlkit.cli import serve as serve_cli
    from vlkit.search.http_guard import bounded_protocol

    sock = serve_cli.bind("127.0.0.1", 0)
    server = uvicorn.Server(serve_cli.server_config(app, bounded_protocol(header_timeout, body_timeout)))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while not server.started and time.monotonic() < deadline and thread.is_alive():
            time.sleep(0.05)
        assert server.started, "the server did not start within 20 s"
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()
