"""Serves a :class:`SimulatedTinker` over real loopback HTTP: Tinker's URLs and JSON, plus HTTP-level faults.

Requests are dispatched through a route table, :data:`ROUTES`. To serve another Tinker endpoint, add a
handler to it::

    @ROUTES.route("POST", "/api/v1/create_session")
    def _create_session(call: Call) -> Reply | BaseModel | Any: ...

A handler gets a :class:`Call` (the server, the simulated Tinker, path parameters, query, headers, body)
and returns a pydantic model or JSON-able value (sent as 200), or a :class:`Reply` (whose ``bytes`` body is
sent as it is, with its ``content_type``); it raises
:class:`HTTPError`, or lets a ``SimulatedAPIError`` escape, to answer an error as ``{"detail": ...}``.
Path patterns name parameters ``{name}`` (one segment) or ``{name:path}`` (may contain ``/``, as checkpoint
ids do); parameters arrive percent-decoded. Authentication and faults are applied before any handler runs.

The official ``tinker`` SDK's protocol (sessions, futures, protobuf training calls) is registered into the
same table by ``_sdk_routes``.
"""

from __future__ import annotations

import contextlib
import hmac
import itertools
import json
import logging
import re
import socket
import threading
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Literal
from urllib.parse import parse_qsl, unquote, urlsplit

from pydantic import BaseModel

from .._models import CheckpointList, Cursor, TrainingRunList
from .._redact import register_secret
from ._tinker import SimulatedAPIError, SimulatedTinker

__all__ = ["ROUTES", "Call", "HTTPError", "Reply", "Router", "ServedRequest", "SimulatedServer", "serve"]

logger = logging.getLogger("tinkex_recovery.simulated.server")

_MALFORMED = b'{"training_run_id": "'  # a body cut off mid-string


class HTTPError(Exception):
    """Raised by a handler: answer ``status_code`` with ``{"detail": detail}``."""

    def __init__(self, status_code: int, detail: str, headers: Mapping[str, str] | None = None) -> None:
        self.status_code = status_code
        self.detail = detail
        self.headers = dict(headers or {})
        super().__init__(f"{status_code}: {detail}")


@dataclass(frozen=True, slots=True)
class Reply:
    """A response with a status or headers other than a plain 200."""

    status: int = 200
    body: Any = None
    headers: Mapping[str, str] = field(default_factory=dict)
    content_type: str = "application/json"


@dataclass(frozen=True, slots=True)
class Call:
    """One request, as a handler sees it."""

    server: SimulatedServer
    method: str
    path: str
    params: dict[str, str]
    query: dict[str, str]
    headers: Message
    body: bytes

    @property
    def sim(self) -> SimulatedTinker:
        return self.server.sim

    def json(self) -> Any:
        """The request body as JSON; a 422 if it is not."""
        try:
            return json.loads(self.body or b"null")
        except ValueError:
            raise HTTPError(422, "the request body is not JSON") from None

    def query_int(self, name: str, default: int, *, minimum: int = 0) -> int:
        raw = self.query.get(name)
        if raw is None:
            return default
        try:
            value = int(raw)
        except ValueError:
            raise HTTPError(422, f"query parameter {name!r} must be an integer") from None
        if value < minimum:
            raise HTTPError(422, f"query parameter {name!r} must be >= {minimum}")
        return value


Handler = Callable[[Call], Any]


@dataclass(frozen=True, slots=True)
class _Route:
    method: str
    pattern: re.Pattern[str]
    handler: Handler


class Router:
    """Maps a method and a raw URL path to a handler."""

    _PARAM = re.compile(r"\{(\w+)(:path)?\}")

    def __init__(self) -> None:
        self._routes: list[_Route] = []

    def route(self, method: str, template: str) -> Callable[[Handler], Handler]:
        """Decorator: serve ``method template`` with the decorated function."""

        def register(handler: Handler) -> Handler:
            self.add(method, template, handler)
            return handler

        return register

    def add(self, method: str, template: str, handler: Handler) -> None:
        regex, pos = "", 0
        for m in self._PARAM.finditer(template):
            regex += re.escape(template[pos : m.start()])
            regex += f"(?P<{m.group(1)}>{'.+' if m.group(2) else '[^/]+'})"
            pos = m.end()
        regex += re.escape(template[pos:])
        self._routes.append(_Route(method.upper(), re.compile(f"^{regex}$"), handler))

    def resolve(self, method: str, path: str) -> tuple[Handler, dict[str, str]]:
        """The handler and decoded path parameters; :class:`HTTPError` 404 or 405 when nothing matches."""
        allowed = False
        for route in self._routes:
            m = route.pattern.match(path)
            if m is None:
                continue
            if route.method == method:
                return route.handler, {k: unquote(v) for k, v in m.groupdict().items()}
            allowed = True
        if allowed:
            raise HTTPError(405, "Method Not Allowed")
        raise HTTPError(404, "Not Found")


#: The endpoints every simulated server answers.
ROUTES = Router()


@ROUTES.route("GET", "/api/v1/training_runs/{run_id}")
def _get_training_run(call: Call) -> Any:
    scope = call.query.get("access_scope", "owned")
    if scope not in ("owned", "accessible"):
        raise HTTPError(422, f"access_scope must be 'owned' or 'accessible', not {scope!r}")
    return call.sim.get_training_run(call.params["run_id"])


@ROUTES.route("GET", "/api/v1/training_runs")
def _list_training_runs(call: Call) -> Any:
    """The SDK's ``RestClient.list_training_runs``: ``limit`` (default 20), ``offset``, ``access_scope``; every
    run the key owns (the simulation has one owner), the most recently created first."""
    scope = call.query.get("access_scope", "owned")
    if scope not in ("owned", "accessible"):
        raise HTTPError(422, f"access_scope must be 'owned' or 'accessible', not {scope!r}")
    offset = call.query_int("offset", 0)
    limit = call.query_int("limit", 20, minimum=1)
    if call.server.page_size is not None:
        limit = min(limit, call.server.page_size)
    page = call.sim.list_training_runs(limit=limit, offset=offset)
    return TrainingRunList(
        training_runs=page, cursor=Cursor(offset=offset, limit=limit, total_count=call.sim.run_count)
    )


@ROUTES.route("GET", "/api/v1/training_runs/{run_id}/checkpoints")
def _list_checkpoints(call: Call) -> Any:
    listing = call.sim.list_checkpoints(call.params["run_id"])
    page_size = call.server.page_size
    if page_size is None and "offset" not in call.query and "limit" not in call.query:
        return listing  # unpaginated, as the simulated Tinker keeps it: cursor null
    total = len(listing.checkpoints)
    offset = call.query_int("offset", 0)
    limit = call.query_int("limit", page_size or max(total, 1), minimum=1)
    if page_size is not None:
        limit = min(limit, page_size)
    return CheckpointList(
        checkpoints=listing.checkpoints[offset : offset + limit],
        cursor=Cursor(offset=offset, limit=limit, total_count=total),
    )


@dataclass(frozen=True, slots=True)
class ServedRequest:
    """A request the server received: ``status`` is what it answered, None if it dropped the connection."""

    method: str
    path: str
    query: dict[str, str]
    status: int | None
    connection: int  #: which TCP connection carried it (1, 2, ...): keep-alive reuse is visible


@dataclass(frozen=True, slots=True)
class _Fault:
    kind: Literal["status", "malformed", "drop", "delay", "echo_key"]
    status: int = 200
    headers: Mapping[str, str] = field(default_factory=dict)
    body: bytes = b""
    delay: float = 0.0


class SimulatedServer:
    """A running loopback server (made by :func:`serve`): its URL, its request log and its fault controls.

    Faults queue up: each request takes the next queued fault, if any, before authentication and routing.
    ``latency`` delays every response; ``page_size`` makes checkpoint listings paginate; ``keep_alive = False``
    closes every connection after its response, so no server thread outlives the request it serves.
    """

    def __init__(
        self, sim: SimulatedTinker, api_key: str, routes: Router, *, host: str = "127.0.0.1", port: int = 0
    ) -> None:
        self.sim = sim
        self._api_key = api_key.encode()
        self._routes = routes
        self._cond = threading.Condition()
        self._faults: deque[_Fault] = deque()
        self._requests: list[ServedRequest] = []
        self._latency = 0.0
        self._in_flight = 0
        self._peak_in_flight = 0
        self.page_size: int | None = None
        self.keep_alive = True
        self._stopping = threading.Event()
        self._closing = False
        self._connections: set[socket.socket] = set()
        self._connection_ids = itertools.count(1)
        self._httpd = _HTTPServer(self, host, port)
        address = self._httpd.server_address
        self.host = str(address[0])
        self.port = int(address[1])
        self.base_url = f"http://{self.host}:{self.port}"
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="tinkex-sim-http", daemon=True
        )

    # -- faults ---------------------------------------------------------------------------------------
    def fail_next(
        self,
        n: int = 1,
        status_code: int = 503,
        *,
        retry_after: float | None = None,
        should_retry: bool | None = None,
        detail: str = "simulated HTTP fault",
    ) -> None:
        """The next ``n`` requests answer ``status_code`` with ``{"detail": detail}``, and ``Retry-After``
        (seconds) and ``x-should-retry`` headers when given."""
        headers: dict[str, str] = {}
        if retry_after is not None:
            headers["Retry-After"] = f"{retry_after:g}"
        if should_retry is not None:
            headers["x-should-retry"] = "true" if should_retry else "false"
        body = json.dumps({"detail": detail}).encode()
        self._queue(n, _Fault("status", status=status_code, headers=headers, body=body))

    def malform_next(self, n: int = 1, body: bytes = _MALFORMED) -> None:
        """The next ``n`` requests get a 200 whose body is ``body`` (by default, JSON cut off mid-way)."""
        self._queue(n, _Fault("malformed", body=body))

    def drop_next(self, n: int = 1) -> None:
        """The next ``n`` requests are read, then their connection is closed without an answer."""
        self._queue(n, _Fault("drop"))

    def delay_next(self, n: int = 1, seconds: float = 1.0) -> None:
        """The next ``n`` responses are sent ``seconds`` late (on top of :attr:`latency`)."""
        self._queue(n, _Fault("delay", delay=seconds))

    def echo_key_next(self, n: int = 1, status_code: int = 503, *, header: bool = True) -> None:
        """The next ``n`` requests answer ``status_code`` with the API key they carried echoed back, as a careless
        server might: in the body (``{"detail": "... <key> ...", "api_key": "<key>"}``) and, if ``header``, in an
        ``X-Echo-API-Key`` header. For tests that no log line, error or event repeats a key."""
        self._queue(n, _Fault("echo_key", status=status_code, headers={"X-Echo-API-Key": ""} if header else {}))

    def clear_faults(self) -> None:
        """Forget every queued fault (``latency`` stays)."""
        with self._cond:
            self._faults.clear()

    @property
    def latency(self) -> float:
        """Seconds every response is delayed by."""
        return self._latency

    @latency.setter
    def latency(self, seconds: float) -> None:
        if not seconds >= 0:
            raise ValueError(f"latency must be >= 0 seconds, got {seconds!r}")
        self._latency = float(seconds)

    @property
    def requests(self) -> tuple[ServedRequest, ...]:
        """Every request received so far, in order."""
        with self._cond:
            return tuple(self._requests)

    def wait_for_requests(self, count: int, timeout: float) -> bool:
        """Block until ``count`` requests have been received (not necessarily answered); False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: len(self._requests) >= count, timeout)

    def _queue(self, n: int, fault: _Fault) -> None:
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"n must be an integer >= 0, got {n!r}")
        with self._cond:
            self._faults.extend([fault] * n)

    # -- lifecycle ------------------------------------------------------------------------------------
    def _start(self) -> None:
        self._thread.start()

    def _stop(self) -> None:
        """Stop accepting, cut every open connection, and join every thread the server started."""
        self._httpd.shutdown()
        with self._cond:
            self._closing = True
            connections = list(self._connections)
        for conn in connections:
            _shutdown(conn)
        self._stopping.set()  # wakes delayed responses, whose connections are already cut
        self._thread.join()
        self._httpd.server_close()  # joins the handler threads

    def __str__(self) -> str:
        return self.base_url

    def __repr__(self) -> str:
        return f"<SimulatedServer {self.base_url}>"

    # -- one request (on a handler thread) ------------------------------------------------------------
    def _opened(self, conn: socket.socket) -> int | None:
        """Track a new connection; None if the server is stopping (the connection is then cut)."""
        with self._cond:
            if self._closing:
                return None
            self._connections.add(conn)
            return next(self._connection_ids)

    def _closed(self, conn: socket.socket) -> None:
        with self._cond:
            self._connections.discard(conn)

    def _answer(self, method: str, raw_path: str, headers: Message, body: bytes) -> tuple[_Fault | None, Reply]:
        split = urlsplit(raw_path)
        query = dict(parse_qsl(split.query))
        with self._cond:
            fault = self._faults.popleft() if self._faults else None
        if fault is not None and fault.kind == "status":
            return fault, Reply(fault.status, fault.body, fault.headers)
        if fault is not None and fault.kind == "malformed":
            return fault, Reply(200, fault.body)
        if fault is not None and fault.kind == "drop":
            return fault, Reply(0)
        if fault is not None and fault.kind == "echo_key":
            sent = headers.get("X-API-Key") or ""
            echoed = {"detail": f"request with API key {sent} refused", "api_key": sent}
            return fault, _json_reply(Reply(fault.status, echoed, {name: sent for name in fault.headers}))
        key = (headers.get("X-API-Key") or "").encode()
        if not hmac.compare_digest(key, self._api_key):
            return fault, _json_reply(Reply(401, {"detail": "Invalid API key"}))
        try:
            handler, params = self._routes.resolve(method, split.path)
            result = handler(Call(self, method, split.path, params, query, headers, body))
        except HTTPError as exc:
            result = Reply(exc.status_code, {"detail": exc.detail}, exc.headers)
        except SimulatedAPIError as exc:
            result = Reply(exc.status_code, {"detail": exc.detail})
        except Exception:
            logger.exception("simulated server: handler for %s %s raised", method, split.path)
            result = Reply(500, {"detail": "Internal Server Error"})
        return fault, _json_reply(result if isinstance(result, Reply) else Reply(200, result))

    def _record(self, method: str, raw_path: str, status: int | None, connection: int) -> None:
        split = urlsplit(raw_path)
        request = ServedRequest(method, split.path, dict(parse_qsl(split.query)), status, connection)
        with self._cond:
            self._requests.append(request)
            self._cond.notify_all()

    @property
    def peak_in_flight(self) -> int:
        """The most responses held back (by :attr:`latency` or a delay) at once: how concurrent a client is."""
        with self._cond:
            return self._peak_in_flight

    def _pause(self, fault: _Fault | None) -> None:
        delay = self._latency + (fault.delay if fault is not None and fault.kind == "delay" else 0.0)
        if delay > 0:
            with self._cond:
                self._in_flight += 1
                self._peak_in_flight = max(self._peak_in_flight, self._in_flight)
            try:
                self._stopping.wait(delay)  # cut short when the server stops
            finally:
                with self._cond:
                    self._in_flight -= 1


def _json_reply(reply: Reply) -> Reply:
    body = reply.body
    if isinstance(body, bytes):
        return reply
    if isinstance(body, BaseModel):
        body = body.model_dump(mode="json")
    return Reply(reply.status, json.dumps(body).encode(), reply.headers, reply.content_type)


def _shutdown(conn: socket.socket) -> None:
    with contextlib.suppress(OSError):  # already closed by the peer
        conn.shutdown(socket.SHUT_RDWR)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as Tinker's servers do
    disable_nagle_algorithm = True  # headers and body go out in two writes: no 40 ms delayed-ACK stall
    timeout = 30.0  # a backstop for a stuck client; stopping the server cuts connections at once
    server: _HTTPServer
    _connection_id = 0

    def setup(self) -> None:
        super().setup()
        connection_id = self.server.owner._opened(self.connection)
        if connection_id is None:
            _shutdown(self.connection)
        else:
            self._connection_id = connection_id

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.owner._closed(self.connection)

    def _dispatch(self) -> None:
        owner = self.server.owner
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length > 0 else b""
        fault, reply = owner._answer(self.command, self.path, self.headers, body)
        dropped = fault is not None and fault.kind == "drop"
        owner._record(self.command, self.path, None if dropped else reply.status, self._connection_id)
        owner._pause(fault)
        if dropped:
            self.close_connection = True
            return
        self.send_response(reply.status)
        if not owner.keep_alive:
            self.send_header("Connection", "close")  # also ends this handler's loop
        self.send_header("Content-Type", reply.content_type)
        self.send_header("Content-Length", str(len(reply.body)))
        for name, value in reply.headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(reply.body)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _dispatch  # noqa: N815 (http.server's names)

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("simulated server: " + format, *args)


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = False
    block_on_close = True  # server_close() joins every handler thread
    request_queue_size = 128  # socketserver's 5 drops SYNs when a pool of connections opens at once (1 s stall)

    def __init__(self, owner: SimulatedServer, host: str = "127.0.0.1", port: int = 0) -> None:
        self.owner = owner
        super().__init__((host, port), _Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that gave up (a timeout, a closed pool) is normal here; never print to stderr.
        logger.debug("simulated server: error on a connection from %s", client_address, exc_info=True)


@contextlib.contextmanager
def serve(sim: SimulatedTinker, api_key: str, *, host: str = "127.0.0.1", port: int = 0) -> Iterator[SimulatedServer]:
    """Serve ``sim`` on ``host:port`` (a free port by default) until the ``with`` block ends.

    Requests must carry ``X-API-Key: api_key`` (else 401). No server thread survives the block.
    """
    if not isinstance(api_key, str) or not api_key:
        raise ValueError("serve() needs a non-empty api_key")
    register_secret(api_key)
    server = SimulatedServer(sim, api_key, ROUTES, host=host, port=port)
    server._start()
    try:
        yield server
    finally:
        server._stop()
