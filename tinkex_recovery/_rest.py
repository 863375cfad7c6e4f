"""An httpx client for the two Tinker REST endpoints recovery reads, with calls bounded in time.

The official SDK's ``RestClient`` retries a 5xx for up to 300 s inside one call, which would freeze a poll
cycle for minutes. Here every call ends within ``timeout`` seconds: transient failures (connection errors,
timeouts, 408, 429, 5xx) get a few retries that honour ``Retry-After`` and ``x-should-retry``; 401, 403
and 404 fail at once; anything that is not the JSON Tinker sends becomes :class:`MalformedResponse`.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import math
import os
import random
import threading
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass
from http import HTTPStatus
from types import TracebackType
from typing import Any, Self, TypeVar
from urllib.parse import quote, urlencode

import httpx
from pydantic import ValidationError

from ._exceptions import (
    AuthenticationError,
    ClientClosed,
    MalformedResponse,
    MissingAPIKey,
    PermissionDenied,
    RunNotFound,
    TinkerAPIError,
    TinkerConnectionError,
    TinkerStatusError,
)
from ._models import Checkpoint, CheckpointList, TrainingRun, TrainingRunList, validate_run_id
from ._redact import mask, redact, register_secret
from ._retry import backoff_delay

__all__ = ["DEFAULT_BASE_URL", "TinkerRest"]

logger = logging.getLogger("tinkex_recovery.rest")

DEFAULT_BASE_URL = "https://tinker.thinkingmachines.dev/services/tinker-prod"
"""The production Tinker service: the base URL when neither ``base_url=`` nor ``TINKER_BASE_URL`` is given."""

_MAX_BODY = 16 * 1024 * 1024  # a checkpoint listing is kilobytes; more is not Tinker talking
_MAX_PAGES = 1000
_DETAIL_CHARS = 200
# Characters left as they are in a path segment: Tinker's run ids contain ':' and the SDK sends it raw.
_SEGMENT_SAFE = ":@!$&'()*+,;="
_Model = TypeVar("_Model", TrainingRun, CheckpointList, TrainingRunList)
_STATUS_ERRORS: dict[int, type[TinkerStatusError]] = {
    401: AuthenticationError,
    403: PermissionDenied,
    404: RunNotFound,
}


class _APIKeyAuth(httpx.Auth):
    """Adds ``X-API-Key`` per request, so the key is not in the client's default headers."""

    def __init__(self, api_key: str) -> None:
        self._api_key = api_key

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        request.headers["X-API-Key"] = self._api_key
        yield request

    def __repr__(self) -> str:
        return f"<APIKeyAuth {mask(self._api_key)}>"


@dataclass(frozen=True, slots=True)
class _Failure:
    """Why one attempt failed, and whether another attempt may help."""

    reason: str
    retryable: bool
    status: int | None = None
    detail: str | None = None
    retry_after: float | None = None
    cause: BaseException | None = None


def _is_loopback(url: httpx.URL) -> bool:
    if url.host == "localhost":
        return True
    try:
        return ipaddress.ip_address(url.host).is_loopback
    except ValueError:
        return False


def _positive(name: str, value: float) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool) or not value > 0:
        raise ValueError(f"{name} must be a number > 0, got {value!r}")
    return float(value)


class TinkerRest:
    """Reads training runs and their checkpoints from Tinker's REST API.

    It is the engine's status source as it is: ``RecoveryEngine(policy, status=TinkerRest())``. One pool
    of ``max_connections`` keep-alive connections serves every thread that calls it. The key comes
    from ``api_key`` or ``TINKER_API_KEY``, the URL from ``base_url``, ``TINKER_BASE_URL`` or
    :data:`DEFAULT_BASE_URL`.

    Time: ``timeout`` bounds a whole call, retries and pages included (keep it well under the poll
    interval); ``connect_timeout`` and ``read_timeout`` bound each attempt. ``sleep`` and ``monotonic`` are
    the time the retry loop uses (inject fakes to record waits); ``transport`` is the I/O seam.
    Use as a context manager, or call :meth:`close`.
    """

    def __init__(
        self,
        *,
        api_key: str | None = None,
        base_url: str | httpx.URL | None = None,
        timeout: float = 10.0,
        connect_timeout: float = 3.0,
        read_timeout: float = 5.0,
        max_retries: int = 3,
        backoff: float = 0.5,
        max_backoff: float = 4.0,
        jitter: float = 0.25,
        max_connections: int = 16,
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], object] | None = None,
        monotonic: Callable[[], float] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        key = api_key if api_key is not None else os.environ.get("TINKER_API_KEY", "")
        if not isinstance(key, str) or not key.strip():
            raise MissingAPIKey("no Tinker API key: pass api_key= or set the TINKER_API_KEY environment variable")
        if key != key.strip() or any(not c.isprintable() for c in key):
            raise ValueError("the Tinker API key contains whitespace or control characters")
        register_secret(key)
        self._api_key = key
        self._timeout = _positive("timeout", timeout)
        self._connect_timeout = _positive("connect_timeout", connect_timeout)
        self._read_timeout = _positive("read_timeout", read_timeout)
        if not isinstance(max_retries, int) or max_retries < 0:
            raise ValueError(f"max_retries must be an integer >= 0, got {max_retries!r}")
        if not isinstance(max_connections, int) or max_connections < 1:
            raise ValueError(f"max_connections must be an integer >= 1, got {max_connections!r}")
        if backoff < 0 or max_backoff < backoff or not 0 <= jitter <= 1:
            raise ValueError("need 0 <= backoff <= max_backoff and 0 <= jitter <= 1")
        self._max_retries = max_retries
        self._backoff = float(backoff)
        self._max_backoff = float(max_backoff)
        self._jitter = float(jitter)
        self._rng = rng or random.Random()
        self._closed = threading.Event()
        self._slots = threading.BoundedSemaphore(max_connections)
        self._sleep: Callable[[float], object] = sleep or self._closed.wait
        self._monotonic = monotonic or time.monotonic

        url = httpx.URL(str(base_url or os.environ.get("TINKER_BASE_URL") or DEFAULT_BASE_URL))
        if url.scheme not in ("http", "https") or not url.host or url.query or url.fragment:
            raise ValueError(f"base_url must be an http(s) URL without a query or fragment, got {str(url)!r}")
        self._base_url = url.copy_with(path=url.path.rstrip("/") or "/")
        self._prefix = str(self._base_url).rstrip("/")  # request URLs are built on it as strings: see _url()
        self._client = httpx.Client(
            base_url=self._base_url,
            auth=_APIKeyAuth(key),
            headers={"Accept": "application/json", "User-Agent": "tinkex-recovery"},
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
            transport=transport,
            follow_redirects=False,
            # A proxy from the environment must not capture a loopback server (tests, the simulated demo).
            trust_env=not _is_loopback(url),
        )

    # -- the status protocol ---------------------------------------------------------------------------
    def get_training_run(self, run_id: str) -> TrainingRun:
        """``GET /api/v1/training_runs/{run_id}?access_scope=owned``."""
        run_id = validate_run_id(run_id)
        what = f"GET training run {run_id}"
        deadline = self._monotonic() + self._timeout
        data = self._get_json(
            f"/api/v1/training_runs/{self._segment(run_id)}",
            {"access_scope": "owned"},
            what=what,
            run_id=run_id,
            deadline=deadline,
        )
        run = self._parse(TrainingRun, data, what=what, run_id=run_id)
        if run.training_run_id != run_id:
            raise MalformedResponse(
                f"{what}: the server answered with run {run.training_run_id!r} instead", run_id=run_id
            )
        return run

    def list_checkpoints(self, run_id: str) -> CheckpointList:
        """``GET /api/v1/training_runs/{run_id}/checkpoints``, every page: the cursor is followed while it says
        more exist. A checkpoint seen on two pages (the list moved under us) is kept once."""
        run_id = validate_run_id(run_id)
        what = f"GET checkpoints of run {run_id}"
        path = f"/api/v1/training_runs/{self._segment(run_id)}/checkpoints"
        deadline = self._monotonic() + self._timeout
        found: dict[str, Checkpoint] = {}
        params: dict[str, int] | None = None  # the first request asks for the server's default page, as the SDK does
        for _ in range(_MAX_PAGES):
            data = self._get_json(path, params, what=what, run_id=run_id, deadline=deadline)
            page = self._parse(CheckpointList, data, what=what, run_id=run_id)
            for checkpoint in page.checkpoints:
                found.setdefault(checkpoint.tinker_path, checkpoint)
            cursor = page.cursor
            if cursor is None or not cursor.has_more:
                return CheckpointList(checkpoints=list(found.values()))
            offset = cursor.offset + cursor.limit
            if cursor.limit < 1 or (params is not None and offset <= params["offset"]):
                raise MalformedResponse(f"{what}: the pagination cursor does not advance ({cursor})", run_id=run_id)
            params = {"offset": offset, "limit": cursor.limit}
        raise MalformedResponse(f"{what}: more than {_MAX_PAGES} pages", run_id=run_id)

    def list_training_runs(self, limit: int = 20, offset: int = 0) -> TrainingRunList:
        """``GET /api/v1/training_runs?limit=..&offset=..&access_scope=owned``: one page of the account's runs,
        as the SDK's ``RestClient.list_training_runs`` asks for it; the cursor says whether more exist."""
        for name, value, least in (("limit", limit, 1), ("offset", offset, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")
        what = f"GET training runs (offset {offset}, limit {limit})"
        deadline = self._monotonic() + self._timeout
        params = {"limit": limit, "offset": offset, "access_scope": "owned"}
        data = self._get_json("/api/v1/training_runs", params, what=what, run_id=None, deadline=deadline)
        return self._parse(TrainingRunList, data, what=what, run_id=None)

    # -- lifecycle -------------------------------------------------------------------------------------
    @property
    def base_url(self) -> httpx.URL:
        """The Tinker URL this client talks to (``TINKER_BASE_URL``, or the production service)."""
        return self._base_url

    def close(self) -> None:
        """Close the connection pool and wake any retry wait. Idempotent."""
        self._closed.set()
        self._client.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<TinkerRest base_url={str(self._base_url)!r} api_key={mask(self._api_key)!r}>"

    # -- one call: attempts, retries, the time bound ---------------------------------------------------
    @staticmethod
    def _segment(value: str) -> str:
        return quote(value, safe=_SEGMENT_SAFE)

    def _url(self, path: str, params: dict[str, Any] | None) -> httpx.URL:
        # One parse of a whole URL: httpx's own joining of a path to base_url and merging of params parse it three
        # times, the larger part of a poll's CPU time (the path's run id is already quoted by _segment).
        return httpx.URL(f"{self._prefix}{path}?{urlencode(params)}" if params else f"{self._prefix}{path}")

    def _get_json(
        self, path: str, params: dict[str, Any] | None, *, what: str, run_id: str | None, deadline: float
    ) -> Any:
        attempt = 0
        while True:
            if self._closed.is_set():
                raise ClientClosed("this TinkerRest is closed")
            attempt += 1
            outcome = self._attempt(path, params, what=what, run_id=run_id, deadline=deadline)
            if not isinstance(outcome, _Failure):
                return outcome
            if not outcome.retryable or attempt > self._max_retries:
                raise self._error(outcome, what=what, run_id=run_id, attempts=attempt)
            delay = outcome.retry_after
            if delay is None:
                delay = backoff_delay(
                    attempt, base=self._backoff, cap=self._max_backoff, jitter=self._jitter, u=self._rng.random()
                )
            remaining = deadline - self._monotonic()
            if delay >= remaining:
                raise self._error(
                    outcome,
                    what=what,
                    run_id=run_id,
                    attempts=attempt,
                    note=f"no time left in the {self._timeout:g}s bound",
                )
            logger.debug(
                "%s: %s; retry %d of %d in %.3fs", what, redact(outcome.reason), attempt, self._max_retries, delay
            )
            self._sleep(delay)

    def _attempt(
        self, path: str, params: dict[str, Any] | None, *, what: str, run_id: str | None, deadline: float
    ) -> Any:
        """One request: the decoded JSON of a 2xx, or a :class:`_Failure` saying what went wrong."""
        remaining = deadline - self._monotonic()
        if remaining <= 0:
            return _Failure(f"no time left in the {self._timeout:g}s bound", retryable=False)
        timeout = httpx.Timeout(
            connect=min(self._connect_timeout, remaining),
            read=min(self._read_timeout, remaining),
            write=min(self._read_timeout, remaining),
            pool=remaining,
        )
        # No more requests reach httpcore's pool than it has connections: when requests queue inside it,
        # httpcore 1.0.9 may close a connection under a request that was just given it (encode/httpcore#1110).
        if not self._slots.acquire(timeout=remaining):
            return _Failure(f"every connection stayed busy for the {self._timeout:g}s bound", retryable=False)
        try:
            request = self._client.build_request("GET", self._url(path, params), timeout=timeout)
            response = self._client.send(request, stream=True)
            try:
                body = self._read(response, deadline, what=what, run_id=run_id)
            finally:
                response.close()
        except httpx.TransportError as exc:  # connection refused or dropped, timeouts, protocol errors
            return _Failure(f"{type(exc).__name__}: {exc or 'no detail'}", retryable=True, cause=exc)
        finally:
            self._slots.release()
        status = response.status_code
        if 200 <= status < 300:
            try:
                return json.loads(body)
            except ValueError as exc:
                raise MalformedResponse(
                    f"{what}: HTTP {status} with a body that is not JSON ({len(body)} bytes)", run_id=run_id
                ) from exc
        return _Failure(
            f"HTTP {status}",
            retryable=self._should_retry(response),
            status=status,
            detail=self._detail(body),
            retry_after=self._retry_after(response),
        )

    def _read(self, response: httpx.Response, deadline: float, *, what: str, run_id: str | None) -> bytes:
        chunks: list[bytes] = []
        size = 0
        for chunk in response.iter_bytes():
            size += len(chunk)
            if size > _MAX_BODY:
                raise MalformedResponse(f"{what}: the response body exceeds {_MAX_BODY} bytes", run_id=run_id)
            if self._monotonic() > deadline:
                raise httpx.ReadTimeout("the call's time bound ran out while reading", request=response.request)
            chunks.append(chunk)
        return b"".join(chunks)

    @staticmethod
    def _should_retry(response: httpx.Response) -> bool:
        # The server's explicit word wins, as in the official SDK.
        header = str(response.headers.get("x-should-retry", "")).strip().lower()
        if header in ("true", "false"):
            return header == "true"
        return response.status_code in (408, 429) or response.status_code >= 500

    @staticmethod
    def _retry_after(response: httpx.Response) -> float | None:
        """Seconds the server asked us to wait (``retry-after-ms`` or ``Retry-After`` in seconds)."""
        for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
            raw = response.headers.get(name)
            if raw is None:
                continue
            try:
                seconds = float(raw) * scale
            except ValueError:
                continue  # an HTTP date: fall back to our own backoff
            if math.isfinite(seconds) and seconds >= 0:
                return seconds
        return None

    @staticmethod
    def _detail(body: bytes) -> str | None:
        """A short, single-line, redacted rendering of an error body (FastAPI's ``{"detail": ...}``)."""
        try:
            data = json.loads(body)
            text = str(data.get("detail", data)) if isinstance(data, dict) else str(data)
        except ValueError:
            text = body.decode("utf-8", "replace")
        text = " ".join(redact(text).split())
        return text[:_DETAIL_CHARS] or None

    def _error(
        self, failure: _Failure, *, what: str, run_id: str | None, attempts: int, note: str | None = None
    ) -> TinkerAPIError:
        tries = f"after {attempts} attempt{'s' if attempts != 1 else ''}"
        extra = f"; {note}" if note else ""
        if failure.status is None:
            error: TinkerAPIError = TinkerConnectionError(
                redact(f"{what}: {failure.reason} ({tries}{extra})"), run_id=run_id
            )
        else:
            reason = f"HTTP {failure.status}"
            with contextlib.suppress(ValueError):
                reason += f" {HTTPStatus(failure.status).phrase}"
            if failure.status == 401:
                reason += " (the API key was rejected)"
            if failure.detail:
                reason += f": {failure.detail}"
            cls = _STATUS_ERRORS.get(failure.status, TinkerStatusError)
            error = cls(redact(f"{what}: {reason} ({tries}{extra})"), status_code=failure.status, run_id=run_id)
        error.__cause__ = failure.cause
        return error

    @staticmethod
    def _parse(model: type[_Model], data: Any, *, what: str, run_id: str | None) -> _Model:
        if not isinstance(data, dict):
            raise MalformedResponse(f"{what}: expected a JSON object, got {type(data).__name__}", run_id=run_id)
        try:
            return model.coerce(data)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "<root>"
            raise MalformedResponse(
                f"{what}: unexpected JSON, {exc.error_count()} error(s); first at {where}: {first['msg']}",
                run_id=run_id,
            ) from exc
