"""``dcdeploy web``: a read-only live page of the fleet (docs/web.md).

One :class:`Feed` per server: one store session, one set of watches, one refresher thread.
A watch firing (any number of them, from any number of nodes) only sets an event; the
refresher reads ``ops.status`` at most once per ``min_interval`` (bursts coalesce), turns it
into the page's JSON (:mod:`.model`) and hands it to every open page through Server-Sent
Events. Browsers never cause a store read: a hundred open pages cost what one costs.

The HTTP side is the standard library's ``ThreadingHTTPServer`` (one thread per open page,
which for an operator's page is a handful): no dependency, no JavaScript build step."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from ipaddress import ip_address
from typing import Any

import structlog
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from .. import ops
from ..metrics import Latest, fleet_registry, parse_listen
from ..store import SessionState, Store, StoreError
from .model import Timeline, page

DEFAULT_LISTEN = "127.0.0.1:8700"
DEFAULT_PORT = 8700
HISTORY_SHOWN = 15
KEEPALIVE_SECS = 15.0
SAFETY_REFRESH_SECS = 60.0  # one read a minute even with no watch firing (a lost session)
STATIC = {"/": ("index.html", "text/html; charset=utf-8"),
          "/app.js": ("app.js", "text/javascript; charset=utf-8"),
          "/style.css": ("style.css", "text/css; charset=utf-8")}


class ListenRefused(ValueError):
    pass


def check_listen(listen: str, allow_remote: bool) -> tuple[str, int]:
    """(host, port) to bind; a non-loopback address needs ``allow_remote`` (the page has
    no authentication of its own: docs/web.md puts it behind a reverse proxy)."""
    host, port = parse_listen("--listen", listen, DEFAULT_PORT)
    loopback = host == "localhost"
    if not loopback:
        try:
            loopback = ip_address(host).is_loopback
        except ValueError:
            loopback = False
    if not loopback and not allow_remote:
        raise ListenRefused(f"--listen {listen}: {host} is not a loopback address; the page "
                            "has no authentication of its own. Put it behind a reverse proxy "
                            "(docs/web.md) or pass --allow-remote to bind there anyway")
    return host, port


class Feed:
    """The store side: watches, coalesced reads, the latest page and its version."""

    def __init__(self, store: Store, min_interval: float = 0.4,
                 clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.min_interval = min_interval
        self.clock = clock
        self.log = structlog.get_logger("dcdeploy.web")
        self.latest = Latest()
        self.timeline = Timeline()
        self.reads = 0  # status reads made (one per refresh, whatever the number of pages)
        self.error: str | None = None
        self._poke = threading.Event()
        self._stop = threading.Event()
        self._changed = threading.Condition()
        self._page: dict[str, Any] | None = None
        self._version = 0
        self._thread = threading.Thread(target=self._run, name="web-feed", daemon=True)

    # -- watches (the store's threads: never block) ------------------------------------
    def poke(self) -> None:
        self._poke.set()

    def _on_session(self, state: SessionState) -> None:
        if state is SessionState.CONNECTED:
            self._poke.set()  # watches may have been lost with the session: read again

    def _arm(self) -> None:
        """Watch every node the page is made of, *before* reading it: a change made after
        this (even during the read) fires a watch and so a later refresh; none is lost
        between the read and the arming. The backend keeps one watcher per path and
        callback, so arming again on each refresh adds none."""
        watch = self.poke
        listed = {path: self.store.children(path, watch)
                  for path in ("services", "deploy", "hosts", "history")}
        for node in listed["deploy"]:
            self.store.exists(f"deploy/{node}", watch)
        for name in listed["hosts"]:
            self.store.exists(f"hosts/{name}", watch)
        for svc in listed["services"]:
            for path in (f"services/{svc}", f"staging/{svc}", f"released/{svc}"):
                self.store.exists(path, watch)
            for base in ("current", "staging"):
                for child in self.store.children(f"{base}/{svc}", watch):
                    self.store.exists(f"{base}/{svc}/{child}", watch)

    # -- the refresher ------------------------------------------------------------------
    def start(self) -> Feed:
        self.store.add_listener(self._on_session)
        self._poke.set()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._poke.set()
        with self._changed:
            self._changed.notify_all()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        last = 0.0
        while not self._stop.is_set():
            self._poke.wait(SAFETY_REFRESH_SECS)
            # Coalesce: everything that fires until min_interval after the last read is
            # served by one read.
            wait = last + self.min_interval - time.monotonic()
            if wait > 0 and self._stop.wait(wait):
                break
            self._poke.clear()
            last = time.monotonic()
            try:
                self.refresh()
            except StoreError as exc:
                self.error = f"store: {exc}"
                self.log.warning("web.read_failed", error=str(exc))
                self._publish_error()
            except Exception:  # the page must outlive one bad read
                self.log.exception("web.refresh_bug")

    def refresh(self) -> dict[str, Any]:
        self._arm()
        status = ops.status(self.store)
        history = ops.history(self.store, HISTORY_SHOWN)
        self.reads += 1
        now = self.clock()
        self.timeline.add(now, status)
        self.latest.set(status)
        self.error = None
        data = page(status, history, self.timeline, now)
        data["store"] = self.store.url
        with self._changed:
            self._page = data
            self._version += 1
            self._changed.notify_all()
        return data

    def _publish_error(self) -> None:
        with self._changed:
            if self._page is not None:
                self._page = {**self._page, "error": self.error}
                self._version += 1
                self._changed.notify_all()

    def wait_newer(self, seen: int, timeout: float) -> tuple[int, dict[str, Any] | None]:
        """Block until a page newer than version ``seen`` exists (or ``timeout``)."""
        with self._changed:
            self._changed.wait_for(lambda: self._version > seen or self._stop.is_set(),
                                   timeout)
            return self._version, self._page


def _handler(feed: Feed) -> type[BaseHTTPRequestHandler]:
    registry = fleet_registry(feed.latest)

    class Handler(BaseHTTPRequestHandler):
        server_version = "dcdeploy-web"

        def log_message(self, fmt: str, *args: Any) -> None:  # structlog, not stderr lines
            feed.log.debug("web.request", line=fmt % args)

        def _send(self, body: bytes, ctype: str, status: int = 200) -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path in STATIC:
                name, ctype = STATIC[path]
                body = resources.files(__package__).joinpath("static", name).read_bytes()
                self._send(body, ctype)
            elif path == "/state":
                _, data = feed.wait_newer(0, 10.0)
                self._send(json.dumps(data).encode(), "application/json")
            elif path == "/metrics":
                self._send(generate_latest(registry), CONTENT_TYPE_LATEST)
            elif path == "/events":
                self._events()
            else:
                self._send(b"not found\n", "text/plain", HTTPStatus.NOT_FOUND)

        def _events(self) -> None:
            """Server-Sent Events: the whole page's JSON on each change (it is small: a
            few kB for tens of hosts), a comment line to keep proxies from closing."""
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-store")
            self.send_header("X-Accel-Buffering", "no")  # nginx: do not buffer the stream
            self.end_headers()
            seen = 0
            try:
                while not feed._stop.is_set():
                    version, data = feed.wait_newer(seen, KEEPALIVE_SECS)
                    if version > seen and data is not None:
                        seen = version
                        self.wfile.write(b"data: " + json.dumps(data).encode() + b"\n\n")
                    else:
                        self.wfile.write(b": keepalive\n\n")
                    self.wfile.flush()
            except (BrokenPipeError, ConnectionResetError):
                return  # the page was closed

    return Handler


class WebServer:
    def __init__(self, store: Store, host: str, port: int, min_interval: float = 0.4) -> None:
        self.feed = Feed(store, min_interval)
        self.httpd = ThreadingHTTPServer((host, port), _handler(self.feed))
        self.httpd.daemon_threads = True
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="web-http",
                                        daemon=True)

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.httpd.server_address[:2]
        return str(host), int(port)

    def start(self) -> WebServer:
        self.feed.start()
        self._thread.start()
        return self

    def stop(self) -> None:
        self.feed.stop()
        self.httpd.shutdown()
        self.httpd.server_close()


def serve(store: Store, listen: str, allow_remote: bool,
          ready: Callable[[str], None] | None = None) -> None:
    """``dcdeploy web``: serve until interrupted."""
    host, port = check_listen(listen, allow_remote)
    server = WebServer(store, host, port).start()
    bound = server.address
    url = f"http://{bound[0] if ':' not in bound[0] else '[' + bound[0] + ']'}:{bound[1]}/"
    if ready:
        ready(url)
    try:
        threading.Event().wait()
    finally:
        server.stop()
