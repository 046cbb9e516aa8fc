"""What guards the search server's HTTP: the hosts it answers for, and how long a client may take to send.

* :class:`AllowedHosts` answers 400 to a request whose ``Host`` header names a host the server was not started
  for. A page on another site that rebinds its own name to 127.0.0.1 (DNS rebinding) sends its own name as the
  host, so it cannot read the API of a server on this machine.
* :class:`BoundedH11Protocol` closes a connection whose request headers are not complete within
  ``header_timeout`` seconds, or whose body is not complete within ``body_timeout`` seconds after its headers;
  without it a client that sends half a request holds its connection open for ever.
"""

from __future__ import annotations

import ipaddress
import json
import logging
from typing import Iterable

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")
ANY_HOST = "*"
DEFAULT_HEADER_TIMEOUT = 10.0
DEFAULT_BODY_TIMEOUT = 30.0
UNSPECIFIED_ADDRESSES = ("", "0.0.0.0", "::")

log = logging.getLogger(__name__)


def host_name(value: str) -> str:
    """A host as a ``Host`` header carries it, without its port: IPv6 addresses in brackets, lower case."""
    value = value.strip().lower()
    if value.startswith("["):
        return value.split("]", 1)[0] + "]"
    try:
        if isinstance(ipaddress.ip_address(value), ipaddress.IPv6Address):
            return f"[{value}]"
    except ValueError:
        pass
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


def allowed_hosts_for(bind_host: str, extra: Iterable[str] = ()) -> list[str]:
    """The hosts a server listening on ``bind_host`` answers for: the loopback names, ``bind_host`` itself when
    it is a specific address or name, and ``extra`` (``*`` allows any host).

    Raises:
        ValueError: an entry of ``extra`` is empty or holds a space, a slash or a wildcard other than ``*``.
    """
    hosts = list(LOOPBACK_HOSTS)
    if bind_host.strip() not in UNSPECIFIED_ADDRESSES:
        hosts.append(host_name(bind_host))
    for entry in extra:
        entry = entry.strip()
        if entry != ANY_HOST and (not entry or any(c in entry for c in " /*?#@")):
            raise ValueError(f"not a host name: {entry!r} (give names or addresses, or * for any host)")
        hosts.append(entry if entry == ANY_HOST else host_name(entry))
    return list(dict.fromkeys(hosts))


class AllowedHosts:
    """ASGI middleware: answer 400 with a JSON error to a request whose ``Host`` is not in ``hosts``.

    Args:
        app: the application to guard.
        hosts: allowed host names (ports are ignored; IPv6 addresses in brackets); ``*`` allows any host.
    """

    def __init__(self, app, hosts: Iterable[str]):
        self.app = app
        self.hosts = frozenset(h if h == ANY_HOST else host_name(h) for h in hosts)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] not in ("http", "websocket") or ANY_HOST in self.hosts:
            await self.app(scope, receive, send)
            return
        raw = dict(scope.get("headers") or []).get(b"host", b"").decode("latin-1")
        host = host_name(raw) if raw.strip() else ""
        if host in self.hosts:
            await self.app(scope, receive, send)
            return
        message = (f"host {raw!r} is not allowed: this server answers for {', '.join(sorted(self.hosts))}; "
                   "start it with --allowed-hosts to add a name" if raw else "the request has no Host header")
        body = json.dumps({"error": message}).encode()
        await send({"type": "http.response.start", "status": 400,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


class BoundedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline on receiving each request's headers and then its body.

    The header deadline runs from the moment the server waits for a request (a new connection, or the end of
    the previous response) to the end of the headers; the body deadline from the end of the headers to the end
    of the body. A connection past its deadline is closed. Subclass with other class attributes (as
    :func:`bounded_protocol` does) to change the limits.
    """

    header_timeout: float = DEFAULT_HEADER_TIMEOUT
    body_timeout: float = DEFAULT_BODY_TIMEOUT

    def connection_made(self, transport) -> None:  # type: ignore[override]
        self._phase: str | None = None
        self._deadline = None
        super().connection_made(transport)
        self._watch()

    def connection_lost(self, exc: Exception | None) -> None:
        self._set_deadline(None)
        super().connection_lost(exc)

    def handle_events(self) -> None:
        super().handle_events()
        self._watch()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._watch()

    def _watch(self) -> None:
        """Start the deadline of the phase the client is in (headers, body, or none while it waits for us)."""
        state = self.conn.their_state
        self._set_deadline("headers" if state is h11.IDLE else "body" if state is h11.SEND_BODY else None)

    def _set_deadline(self, phase: str | None) -> None:
        if phase == getattr(self, "_phase", None):
            return
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        self._phase = phase
        if phase is not None and not self.transport.is_closing():
            timeout = self.header_timeout if phase == "headers" else self.body_timeout
            self._deadline = self.loop.call_later(timeout, self._expired, phase, timeout)

    def _expired(self, phase: str, timeout: float) -> None:
        self._deadline = None
        if not self.transport.is_closing():
            log.info("%s: request %s not received within %.0f s; closing the connection",
                     "%s:%d" % self.client if self.client else "client", phase, timeout)
            self.transport.close()


def bounded_protocol(header_timeout: float = DEFAULT_HEADER_TIMEOUT,
                     body_timeout: float = DEFAULT_BODY_TIMEOUT) -> type[BoundedH11Protocol]:
    """A :class:`BoundedH11Protocol` with these limits, to pass to ``uvicorn.Config(http=...)``.

    Raises:
        ValueError: a limit that is not a positive number of seconds.
    """
    for name, value in (("header timeout", header_timeout), ("body timeout", body_timeout)):
        if not value > 0:
            raise ValueError(f"the {name} must be a positive number of seconds, not {value}")
    return type("BoundedH11Protocol", (BoundedH11Protocol,),
                {"header_timeout": float(header_timeout), "body_timeout": float(body_timeout)})
