"""``vlkit serve``: the search page and its JSON API over an index, on a local web server."""

from __future__ import annotations

import argparse
import socket
import sys

from vlkit.errors import VlkitError


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``serve`` subcommand to ``sub``."""
    p = sub.add_parser(
        "serve",
        help="serve a search page and JSON API over an index",
        description="Open INDEX (made by 'vlkit index') and serve a web page to search it by text or by image, "
        "with a JSON API: GET /api/search?q=TEXT&k=N, POST /api/search/image, GET /api/thumbnail/ID, "
        "GET /api/info.",
    )
    p.add_argument("index", help="index directory written by 'vlkit index'")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1, this machine only; 0.0.0.0 for every interface)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000; 0 picks a free one)")
    p.add_argument("--model", metavar="RUN",
                   help="embed queries with this run, model directory or checkpoint instead of the index's own "
                   "model (its embedding size must match the index)")
    p.set_defaults(func=run)


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port``, or a :class:`VlkitError` saying why not."""
    if not 0 <= port <= 65535:
        raise VlkitError(f"--port must be from 0 to 65535, not {port}")
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    except socket.gaierror as exc:
        raise VlkitError(f"--host {host}: unknown address ({exc.strerror})") from None
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        if sys.platform != "win32":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise VlkitError(f"cannot listen on {host}:{port} ({exc.strerror or exc}); is another server using it? "
                         "pass another --port") from None
    sock.set_inheritable(True)
    return sock


def url_of(host: str, port: int) -> str:
    """The address to open in a browser."""
    shown = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    return f"http://[{shown}]:{port}/" if ":" in shown else f"http://{shown}:{port}/"


def run(args: argparse.Namespace) -> int:
    """Run ``vlkit serve``: check everything, then serve until interrupted."""
    from vlkit.search.index import read_index_info

    read_index_info(args.index)  # a missing or foreign index fails before the model is loaded
    try:
        import uvicorn

        from vlkit.search.server import create_app
    except ImportError as exc:
        raise VlkitError(f"'vlkit serve' needs fastapi, uvicorn and python-multipart ({exc}); "
                         "pip install fastapi uvicorn python-multipart") from None
    from vlkit.search.searcher import Searcher

    sock = bind(args.host, args.port)  # a busy port fails before the model is loaded
    try:
        searcher = Searcher(args.index, model=args.model)
    except BaseException:
        sock.close()
        raise
    app = create_app(searcher)
    port = sock.getsockname()[1]
    info = searcher.info
    print(f"serving {args.index} ({info.images} images, {info.captions} captions, {info.dim}-d) "
          f"at {url_of(args.host, port)}  (Ctrl+C to stop)", flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    return 0
