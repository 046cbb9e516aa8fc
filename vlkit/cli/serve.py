"""``vlkit serve``: the search page and its JSON API over an index, on a local web server."""

from __future__ import annotations

import argparse
import socket
import sys

from vlkit.cli import pixel_limit
from vlkit.errors import VlkitError

DEFAULT_HEADER_TIMEOUT = 10.0  # seconds to send a request's headers
DEFAULT_BODY_TIMEOUT = 30.0  # seconds to send its body (a 20 MiB image over a slow link)


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
                   "model (its embedding size must match the index); with --runtime onnx also a folder written by "
                   "'vlkit export --format onnx'")
    p.add_argument("--runtime", choices=("torch", "onnx"), default="torch",
                   help="what embeds the queries: torch (default), or onnx: onnxruntime (pip install "
                   "'vlkit[onnx]'), from an ONNX export given as --model (no PyTorch weights needed) or the "
                   "model exported to a temporary folder at start; same hits and scores (queries in fp32: an index "
                   "embedded in bf16 gets a note). /api/describe (captions) "
                   "needs the PyTorch model and answers that the served model cannot describe images")
    p.add_argument("--allowed-hosts", metavar="HOSTS", default="",
                   help="comma-separated host names or addresses the server answers for besides the loopback "
                   "names and --host (requests naming another host get 400); needed to reach a server started "
                   "with --host 0.0.0.0 by name or address from other machines. '*' allows any host: UNSAFE, "
                   "it lets any web page opened on a machine that can reach the server read its API")
    p.add_argument("--header-timeout", type=float, default=DEFAULT_HEADER_TIMEOUT, metavar="SECONDS",
                   help="close a connection whose request headers are not complete within this time "
                   f"(default {DEFAULT_HEADER_TIMEOUT:g})")
    p.add_argument("--body-timeout", type=float, default=DEFAULT_BODY_TIMEOUT, metavar="SECONDS",
                   help="close a connection whose request body is not complete within this time after its "
                   f"headers (default {DEFAULT_BODY_TIMEOUT:g})")
    p.add_argument("--max-pixels", type=pixel_limit, dest="serve_max_pixels", metavar="N",
                   help="refuse (413) query images of more than N pixels, read from their header before "
                   "decoding (default: $VLKIT_MAX_PIXELS or 64000000)")
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


def server_config(app, protocol: type):
    """The uvicorn configuration ``vlkit serve`` runs ``app`` with (h11 with request deadlines)."""
    import uvicorn

    return uvicorn.Config(app, http=protocol, log_level="warning", access_log=False)


def url_of(host: str, port: int) -> str:
    """The address to open in a browser."""
    shown = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    return f"http://[{shown}]:{port}/" if ":" in shown else f"http://{shown}:{port}/"


def _check_options(args: argparse.Namespace) -> tuple[list[str], type]:
    """The allowed hosts and the HTTP protocol class, or a :class:`VlkitError` naming the bad option."""
    from vlkit.data.decode import max_pixels, set_max_pixels
    from vlkit.search.http_guard import allowed_hosts_for, bounded_protocol

    for name, value in (("--header-timeout", args.header_timeout), ("--body-timeout", args.body_timeout)):
        if not 0 < value < float("inf"):
            raise VlkitError(f"{name} must be a positive number of seconds, not {value:g}")
    try:
        hosts = allowed_hosts_for(args.host, [h for h in args.allowed_hosts.split(",") if h.strip()])
    except ValueError as exc:
        raise VlkitError(f"--allowed-hosts: {exc}") from None
    if args.serve_max_pixels is not None:  # the same as the global 'vlkit --max-pixels N serve ...'
        set_max_pixels(args.serve_max_pixels)
    max_pixels()  # a bad $VLKIT_MAX_PIXELS is reported now, not at the first query
    return hosts, bounded_protocol(args.header_timeout, args.body_timeout)


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

    hosts, protocol = _check_options(args)
    if args.runtime == "onnx":
        from vlkit.export.onnx_runtime import require_onnxruntime

        require_onnxruntime()  # one line before the port is taken or the model loaded
    sock = bind(args.host, args.port)  # a busy port fails before the model is loaded
    try:
        searcher = Searcher(args.index, model=args.model, runtime=args.runtime)
    except BaseException:
        sock.close()
        raise
    app = create_app(searcher, allowed_hosts=hosts)
    port = sock.getsockname()[1]
    info = searcher.info
    runtime = " with onnxruntime" if args.runtime == "onnx" else ""
    print(f"serving {args.index} ({info.images} images, {info.captions} captions, {info.dim}-d){runtime} "
          f"at {url_of(args.host, port)}  (Ctrl+C to stop)", flush=True)
    if "*" in hosts:
        print("vlkit: warning: --allowed-hosts '*' answers requests for any host name: any web page opened on a "
              "machine that reaches this server can read its API", file=sys.stderr, flush=True)
    elif args.host.strip() in ("", "0.0.0.0", "::"):
        print(f"vlkit: note: answering for the hosts {', '.join(hosts)}; pass --allowed-hosts with this machine's "
              "name or address to reach it from others", file=sys.stderr, flush=True)
    precision = getattr(info, "precision", "fp32")
    if args.runtime == "onnx" and precision != "fp32":
        from vlkit.cli.search import ONNX_PRECISION_NOTE

        print(f"vlkit: note: the index was embedded in {precision}; {ONNX_PRECISION_NOTE}", file=sys.stderr,
              flush=True)
    server = uvicorn.Server(server_config(app, protocol))
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    return 0
