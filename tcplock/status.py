"""Seeing and steering a running lock: the HTTP status/metrics/control endpoint, its health
check and bearer token, Prometheus metrics, and HAProxy's agent-check.

What it owns: turning a :class:`~tcplock.server.TCPLock`'s state into answers. The rules it
keeps: nothing here can take much of the proxy's time — every answer is computed from
counters the lock keeps anyway, in the same event loop, with no lock held and no I/O beyond the
answer itself; the Prometheus exposition is made at most once per :data:`METRICS_MAX_AGE`;
at most ``max_rate`` requests a second are answered, as many more get a short 429, and then
the server accepts nothing until the second is over — and nothing here can starve the proxy of
descriptors: the status server holds at most ``max_connections`` connections (the rest wait
in the kernel's listen backlog), closes one whose request (head and body) has not arrived
within ``request_timeout``, refuses a request head over :data:`MAX_HEAD` bytes and a body over
:data:`MAX_BODY` bytes without reading it, never reads the body of a request it refuses, and
logs bad requests and accept failures as one line per interval.
"""

from __future__ import annotations

import errno
import hmac
import json
import logging
import os
import socket
import stat
import time
from io import BytesIO
from typing import Optional, Tuple

from gevent import Timeout
from gevent.pool import Pool
from gevent.pywsgi import Input, WSGIHandler, WSGIServer
from gevent.server import StreamServer

from . import page
from .server import (
    _EXHAUSTED,
    END_REASONS,
    Connection,
    TCPLock,
    _RateLimit,
    accept_exhausted,
    format_address,
)
from .settings import SETTINGS

__all__ = [
    "Metrics",
    "StatusServer",
    "AgentCheck",
    "agent_reply",
    "health",
    "is_up",
    "read_token_file",
    "MAX_CONNECTIONS",
    "REQUEST_TIMEOUT",
    "MAX_HEAD",
    "MAX_BODY",
    "MAX_RATE",
    "METRICS_MAX_AGE",
]

log = logging.getLogger(__name__)

# Buckets for waits and connection lifetimes: a hand-off takes milliseconds, a document
# conversion seconds to minutes.
_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class Metrics:
    """Prometheus metrics of one lock, in a registry of their own (several locks may share a
    process). Gauges and counters are read from the lock at scrape time; the two histograms
    are fed as connections end."""

    def __init__(self, lock: TCPLock) -> None:
        from prometheus_client import CollectorRegistry, Histogram

        self.lock = lock
        self.registry = CollectorRegistry(auto_describe=True)
        self.queue_wait = Histogram(
            "tcplock_queue_wait_seconds",
            "Time clients waited for a slot (clients that got one).",
            buckets=_BUCKETS,
            registry=self.registry,
        )
        self.duration = Histogram(
            "tcplock_connection_duration_seconds",
            "Time connections held their slot.",
            buckets=_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(_LockCollector(lock))
        _process_metrics(self.registry)
        lock.end_observers.append(self.observe)

    def observe(self, conn: Connection) -> None:
        if conn.activated_at is not None:
            self.queue_wait.observe(conn.queued_seconds)
            self.duration.observe(conn.active_seconds)

    def exposition(self) -> Tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def _process_metrics(registry) -> None:
    """The process's own metrics (``process_*``: CPU, memory, descriptors and their limit,
    start time; ``python_info``) and ``tcplock_build_info{version="..."} 1``."""
    from prometheus_client import Info, PlatformCollector, ProcessCollector

    from . import __version__

    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    Info("tcplock_build", "The version of tcplock running.", registry=registry).info(
        {"version": __version__}
    )


class _LockCollector:
    def __init__(self, lock: TCPLock) -> None:
        self.lock = lock

    def describe(self):
        return list(self.collect())

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        lock = self.lock
        active = lock.active
        yield GaugeMetricFamily(
            "tcplock_active_connections", "Connections holding a slot.", value=len(active)
        )
        yield GaugeMetricFamily(
            "tcplock_queued_connections", "Clients waiting for a slot.", value=lock.queued
        )
        yield GaugeMetricFamily("tcplock_slots", "Number of slots.", value=lock.slots)
        yield GaugeMetricFamily(
            "tcplock_paused", "1 while paused by the operator.", value=int(lock.paused)
        )
        ended = CounterMetricFamily(
            "tcplock_connections", "Finished connections, by end reason.", labels=["reason"]
        )
        for reason in END_REASONS:
            ended.add_metric([reason], lock.ended.get(reason, 0))
        yield ended
        yield CounterMetricFamily("tcplock_restarts", "Backend restarts done.", value=lock.restarts)
        yield CounterMetricFamily(
            "tcplock_restart_failures",
            "Backend restart attempts that failed.",
            value=lock.restart_failures,
        )
        yield CounterMetricFamily(
            "tcplock_hook_failures", "Hook calls that failed.", value=lock.hook_failures
        )
        by_backend = [
            (
                GaugeMetricFamily(
                    "tcplock_backend_up",
                    "1 while the backend is up (0: down, checked every check_interval, or "
                    "not yet ready since tcplock started).",
                    labels=["backend"],
                ),
                lambda b: int(is_up(b)),
            ),
            (
                GaugeMetricFamily(
                    "tcplock_backend_standby",
                    "1 while the backend is a ready standby, kept out of service (--spares).",
                    labels=["backend"],
                ),
                lambda b: int(b.operational == "standby"),
            ),
            (
                GaugeMetricFamily(
                    "tcplock_backend_active_connections",
                    "Connections holding a slot of the backend.",
                    labels=["backend"],
                ),
                lambda b: b.held,
            ),
            (
                GaugeMetricFamily(
                    "tcplock_backend_slots", "Slots of the backend.", labels=["backend"]
                ),
                lambda b: b.slots,
            ),
            (
                CounterMetricFamily(
                    "tcplock_backend_connections",
                    "Clients let through to the backend.",
                    labels=["backend"],
                ),
                lambda b: b.activations,
            ),
            (
                CounterMetricFamily(
                    "tcplock_backend_restarts", "Restarts of the backend done.", labels=["backend"]
                ),
                lambda b: b.restarts,
            ),
        ]
        for family, value in by_backend:
            for b in lock.backends:
                family.add_metric([b.label], value(b))
            yield family
        supervised = [b for b in lock.backends if b.process is not None]
        if supervised:
            rss = GaugeMetricFamily(
                "tcplock_backend_rss_bytes",
                "Resident memory of the processes of a backend tcplock runs (--backend-cmd), "
                "summed over its process group.",
                labels=["backend"],
            )
            for b in supervised:
                value = b.process.rss()
                if value is not None:
                    rss.add_metric([b.label], value)
            yield rss
        relayed = CounterMetricFamily(
            "tcplock_bytes",
            "Bytes relayed, by direction (up: client to backend).",
            labels=["direction"],
        )
        # A connection's bytes join the totals when it ends; one still holding its slot after
        # that (its restart or on-timeout hook running) is counted there, not here too.
        live = [c for c in active if c.end is None]
        relayed.add_metric(["up"], lock.bytes_up_total + sum(c.bytes_up for c in live))
        relayed.add_metric(["down"], lock.bytes_down_total + sum(c.bytes_down for c in live))
        yield relayed


#: The status server's bounds, by default: how many connections it holds at once (others wait
#: in the kernel's listen backlog, using no descriptor of tcplock's), how long a request may
#: take to arrive in full (request line, headers and body, counted from when the server starts
#: waiting for it; an idle keep-alive connection is closed then too), the largest request
#: head (request line and headers) it reads, the largest body it takes (no endpoint reads
#: one; a larger one is refused with 413 unread), and how many requests a second it answers
#: (as many more get 429; then it accepts nothing until the second is over).
MAX_CONNECTIONS = 64
REQUEST_TIMEOUT = 10.0
MAX_HEAD = 8192
MAX_BODY = 1024
MAX_RATE = next(s.default for s in SETTINGS if s.name == "status-max-rate")
#: How old, in seconds, the ``/metrics`` answer may be: it is made again at most this often.
METRICS_MAX_AGE = 1.0

# Bad requests and accept failures: one line per interval, with a count of the rest.
_LOG_INTERVAL = 10.0
# The longest token a token file may hold.
_MAX_TOKEN = 4096


def is_up(backend) -> bool:
    """Whether a backend counts as up for ``/healthz``, the agent-check and
    ``tcplock_backend_up``: it has been ready since tcplock started, and has not been found
    down since (a restart of one that was ready, for a policy, keeps it up)."""
    return backend.up and backend.been_ready


def health(lock: TCPLock) -> Tuple[bool, dict]:
    """Whether a client arriving now would be let through in its turn, and the short JSON
    answer of ``GET /healthz``: ``status`` is ``ok``, or why not (``stopped``: not listening,
    ``stopping``, ``paused``, ``down``: no backend is up, ``drained``: every backend that is
    up is drained or leaving the pool), and ``backends_up`` counts the backends that are up.

    A paused lock still queues clients, but lets none through until it is resumed; a load
    balancer should send them elsewhere meanwhile, so it is not healthy. A backend that is
    restarting counts as up: clients queue for the moment the restart takes, as they do for a
    busy slot, once it has been ready; one that has not been ready since tcplock started (a
    supervised one starting, another whose first check has not answered) is down. Whether a
    backend is up is what tcplock last saw (:func:`is_up`); nothing is checked to answer."""
    up = [b for b in lock.backends if is_up(b)]
    if lock.draining:
        status = "stopping"
    elif not lock.started:
        status = "stopped"
    elif lock.paused:
        status = "paused"
    elif not up:
        status = "down"
    elif all(b.draining or b.leaving for b in up):
        status = "drained"
    else:
        status = "ok"
    return status == "ok", {"status": status, "backends_up": len(up)}


def read_token_file(path) -> str:
    """The bearer token held in the file ``path``, without surrounding white space.

    Raises ValueError, with one line for the operator, if the file is missing, unreadable or
    not a regular file, if its group or others have any permission on it (mode & 0o077), or
    if it is empty, over 4 KiB, or not one word of printable ASCII."""
    try:
        # O_NONBLOCK: a FIFO given by mistake must not hang the start-up.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ValueError(f"no such file: {path}") from None
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror or e}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ValueError(f"{path} is not a regular file")
        if st.st_mode & 0o077:
            mode = stat.S_IMODE(st.st_mode)
            raise ValueError(
                f"{path} is open to group or others (mode {mode:04o}); make it its owner's "
                f"only: chmod 600 {path}"
            )
        chunks, size = [], 0
        while size <= _MAX_TOKEN:
            chunk = os.read(fd, _MAX_TOKEN + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror or e}") from None
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if len(data) > _MAX_TOKEN:
        raise ValueError(f"{path} holds over {_MAX_TOKEN} bytes; a token is one short line")
    token = data.strip()
    if not token:
        raise ValueError(f"{path} is empty")
    if not all(0x21 <= c <= 0x7E for c in token):
        raise ValueError(
            f"{path} must hold one token of printable ASCII characters, with no space inside"
        )
    return token.decode("ascii")


def _check_token(token) -> Optional[bytes]:
    if token is None:
        return None
    if isinstance(token, bytes):
        token = token.decode("ascii", "replace")
    if not isinstance(token, str) or not token or not all(" " < c <= "~" for c in token):
        raise ValueError("token must be a non-empty string of printable ASCII without spaces")
    return token.encode("ascii")


class _HeadTooLarge(ValueError):
    pass


class _TooSlow(TimeoutError):
    """The request did not arrive within ``request_timeout`` (an OSError, with an errno as
    pywsgi expects of one: it closes the connection quietly when it comes while waiting for
    the request line)."""

    def __init__(self, *args) -> None:
        super().__init__(*(args or (errno.ETIMEDOUT, "request not received in time")))


class _Refused(ValueError):
    """A request answered ``code`` before its headers (429) or its body (411, 413) are read;
    its connection is closed after the answer."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


_REASONS = {
    400: "Bad Request",
    408: "Request Timeout",
    411: "Length Required",
    413: "Content Too Large",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large",
}


def _error_response(code: int, message: str) -> bytes:
    body = (json.dumps({"error": message}) + "\n").encode()
    retry = "Retry-After: 1\r\n" if code == 429 else ""
    return (
        f"HTTP/1.1 {code} {_REASONS[code]}\r\nConnection: close\r\n{retry}"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body


class _Handler(WSGIHandler):
    """pywsgi's handler, bounded: each request must arrive in full (head and body) within the
    server's ``request_timeout``, its head must fit in :data:`MAX_HEAD` bytes and its body in
    :data:`MAX_BODY` (a body of unknown length is refused too), a request beyond the server's
    rate is answered 429 unread, a socket operation that stalls for ``request_timeout`` fails,
    and what goes wrong is a rate-limited log line.

    No endpoint reads a body. A refused request's body (401, 404, 405, 411, 413, 429) is never
    read: its connection is closed after the answer. The body of one that is answered is read
    after the answer, within the same deadline, so that the connection can carry the next."""

    def __init__(self, sock, address, server, rfile=None) -> None:
        # Bounds every read and write (a client that stops reading its answer), on top of the
        # deadline for the whole request below.
        sock.settimeout(server.request_timeout)
        # pywsgi sends an answer's head and its body apart: without TCP_NODELAY the body waits
        # for the client to acknowledge the head, which a keep-alive client delays (about
        # 40 ms on Linux) while it waits for the rest.
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass  # not TCP (a Unix socket as the listener), or the client is gone already
        super().__init__(sock, address, server, rfile)

    def handle_one_request(self):
        deadline = self._deadline = Timeout.start_new(self.server.request_timeout, _TooSlow)
        try:
            return super().handle_one_request()
        finally:
            # Closed, not only cancelled, and let go of: left to the garbage collector, a
            # timer of gevent's libuv loop can abort the process.
            deadline.close()
            self._deadline = None

    def read_request(self, raw_requestline):
        try:
            if not self.server._admit():
                raise _Refused(429, f"over {self.server.max_rate} requests a second")
            parsed = super().read_request(raw_requestline)
            if self.headers.get("transfer-encoding") is not None:
                raise _Refused(411, f"a request body needs a Content-Length (at most {MAX_BODY})")
            if self.content_length and self.content_length > MAX_BODY:
                raise _Refused(413, f"request body over {MAX_BODY} bytes")
        except BaseException:
            self._deadline.cancel()
            raise
        if not self.content_length:
            self._deadline.cancel()  # the request is in: answering it is not bounded by it
        self._body_unread = False
        return parsed

    def start_response(self, status, headers, exc_info=None):
        if self.content_length and not status.startswith("2"):
            self._body_unread = True  # so the connection cannot carry another request
            headers = [*headers, ("Connection", "close")]
        return super().start_response(status, headers, exc_info)

    def run_application(self):
        try:
            super().run_application()
        finally:
            if self._body_unread:
                self.wsgi_input = Input(None, 0)  # what pywsgi reads the rest of the body from

    def MessageClass(self, fp, *args):
        # The headers, read up to what is left of MAX_HEAD after the request line, then parsed.
        budget = MAX_HEAD - len(self.requestline)
        lines = []
        while True:
            line = fp.readline(budget + 1)
            budget -= len(line)
            if budget < 0:
                raise _HeadTooLarge(f"request head over {MAX_HEAD} bytes")
            lines.append(line)
            if line in (b"\r\n", b"\n", b""):
                break
        return super().MessageClass(BytesIO(b"".join(lines)), *args)

    def read_requestline(self):
        line = super().read_requestline()
        if len(line) >= MAX_HEAD:  # pywsgi answers 414 and closes
            self.server._bad_request(self.client_address, f"request line over {MAX_HEAD} bytes")
        return line

    def _handle_client_error(self, ex):
        if isinstance(ex, _HeadTooLarge):
            code, message = 431, str(ex)
        elif isinstance(ex, _Refused):
            code, message = ex.code, str(ex)
        elif isinstance(ex, _TooSlow):
            code, message = 408, f"request not received within {self.server.request_timeout:g}s"
        else:
            # pywsgi's reason quotes the request (repr: one line); keep it short for the log.
            reason = str(ex)
            reason = reason if len(reason) <= 120 else reason[:117] + "..."
            code, message = 400, f"malformed request ({reason})"
        self.server._bad_request(self.client_address, message)
        return str(code), _error_response(code, message)

    def _log_error(self, t, v, tb):
        if issubclass(t, OSError):  # the client's side failed (a timeout, a reset): one line
            self.server._bad_request(self.client_address, f"{t.__name__}: {v}")
        elif issubclass(t, Exception):  # a fault of tcplock's: a traceback, in the log
            log.error("status: %s %s failed", self.command, self.path, exc_info=(t, v, tb))


class _Bounded:
    """For the servers of this module: accept() failing for lack of descriptors pauses
    accepting and logs one line per interval, as the client port does
    (:func:`tcplock.server.accept_exhausted`)."""

    _what = "status"

    def _init_bounds(self) -> None:
        #: accept() calls that failed for lack of descriptors or memory.
        self.accept_failures = 0
        self._accept_delay = self.min_delay
        self._accept_log = _RateLimit(_LOG_INTERVAL)

    def do_read(self):
        try:
            accepted = super().do_read()
        except OSError as e:
            if e.errno not in _EXHAUSTED:
                raise
            accept_exhausted(
                self,
                e,
                f"{self._what}: cannot accept connections: %s; they wait in the listen backlog",
            )
            return None
        self._accept_delay = self.min_delay
        return accepted


class StatusServer(_Bounded, WSGIServer):
    """``GET /healthz``, ``GET /status`` (JSON), ``GET /metrics`` (Prometheus), ``POST
    /pause``, ``POST /resume``, ``POST /backends/HOST:PORT/drain`` and ``.../enable``; on its
    own address, in the lock's process and event loop.

    ``token``: if given, every endpoint but ``/healthz`` needs ``Authorization: Bearer TOKEN``
    (401 otherwise; compared in constant time). Setting :attr:`token` on a running server
    changes it for the next request (None: no token needed).

    ``max_connections`` and ``request_timeout`` bound what clients of this server can hold
    (see :data:`MAX_CONNECTIONS`); a server with its own descriptor budget counts
    ``max_connections`` in it. ``max_rate`` bounds the time they can take: each second, that
    many requests are answered, as many more get ``429`` (``Retry-After: 1``) without their
    headers being read, and then the server accepts nothing more until the second is over.
    """

    #: One new connection per turn of the event loop: a burst of them is taken in turn with
    #: the lock's own work, not all before it.
    max_accept = 1

    def __init__(
        self,
        listener,
        lock: TCPLock,
        *,
        token=None,
        max_connections: int = MAX_CONNECTIONS,
        request_timeout: float = REQUEST_TIMEOUT,
        max_rate: int = MAX_RATE,
    ) -> None:
        if isinstance(max_connections, bool) or not isinstance(max_connections, int):
            raise ValueError(f"max_connections must be a whole number, not {max_connections!r}")
        if max_connections < 1:
            raise ValueError(f"max_connections must be at least 1, not {max_connections}")
        if isinstance(max_rate, bool) or not isinstance(max_rate, int) or max_rate < 1:
            raise ValueError(f"max_rate must be a whole number of at least 1, not {max_rate!r}")
        if isinstance(request_timeout, bool) or not (
            isinstance(request_timeout, (int, float)) and 0 < request_timeout < float("inf")
        ):
            raise ValueError(
                f"request_timeout must be a positive number of seconds, not {request_timeout!r}"
            )
        self.lock = lock
        self.token = token
        self.max_connections = max_connections
        self.request_timeout = float(request_timeout)
        self.max_rate = max_rate
        self.metrics = Metrics(lock)
        self._exposition = None  # (made at, body, content type)
        self._bad_log = _RateLimit(_LOG_INTERVAL)
        # This second's requests: when it ends, how many were answered and refused, and the
        # timer that starts accepting again once it ends, if it was used up.
        self._second_ends = 0.0
        self._answered = self._refused = 0
        self._reopen = None
        super().__init__(
            listener,
            self.app,
            spawn=Pool(max_connections),
            log=None,
            error_log=log,
            handler_class=_Handler,
        )
        self._init_bounds()

    @property
    def token(self) -> Optional[str]:
        """The bearer token every endpoint but ``/healthz`` needs, or None."""
        return None if self._token is None else self._token.decode("ascii")

    @token.setter
    def token(self, token) -> None:
        self._token = _check_token(token)

    def _admit(self) -> bool:
        """Whether a request that has begun is answered (else 429), within ``max_rate``."""
        now = time.monotonic()
        if now >= self._second_ends:
            self._second_ends = now + 1.0
            self._answered = self._refused = 0
        if self._answered < self.max_rate:
            self._answered += 1
            return True
        self._refused += 1
        if self._refused >= self.max_rate and self._reopen is None:
            self.stop_accepting()  # the rest wait in the listen backlog
            self._reopen = self.loop.timer(self._second_ends - now)
            self._reopen.start(self._next_second)
        return False

    def _next_second(self) -> None:
        # The timer's end is the second's end, even when it fires a little before the clock
        # says so (libuv's loop time lags, and its timers count whole milliseconds): the next
        # request begins a new second instead of getting one more 429.
        self._second_ends = 0.0
        self._stop_reopen()
        self._start_accepting_if_started()

    def _stop_reopen(self) -> None:
        if self._reopen is not None:
            self._reopen.stop()
            self._reopen.close()  # closed, not left to the garbage collector (libuv)
            self._reopen = None

    def _start_accepting_if_started(self, _event=None):
        if self._reopen is None:  # else the second's end does it
            super()._start_accepting_if_started(_event)

    def close(self) -> None:
        self._stop_reopen()
        super().close()

    def _bad_request(self, address, message: str) -> None:
        if self._bad_log.ready():
            more = self._bad_log.take_held_back()
            client = format_address(address[:2]) if isinstance(address, tuple) else address
            log.warning(
                "status: %s from %s%s",
                message,
                client,
                f" ({more} more in the last {self._bad_log.interval:.0f}s)" if more else "",
            )

    def app(self, environ, start_response):
        method = environ["REQUEST_METHOD"]
        path = environ.get("PATH_INFO", "")
        # Neither needs the token: the page holds no data (it asks for the token itself).
        if path in ("/healthz", "/"):
            if method not in ("GET", "HEAD"):
                return _reply(
                    start_response,
                    "405 Method Not Allowed",
                    {"error": "use GET"},
                    [("Allow", "GET, HEAD")],
                )
            serve = self._healthz if path == "/healthz" else page.serve
            body = serve(start_response)
            return [] if method == "HEAD" else body
        token = self._token
        if token is not None:
            scheme, _, given = environ.get("HTTP_AUTHORIZATION", "").strip().partition(" ")
            given = given.strip().encode("latin-1", "replace")
            if scheme.lower() != "bearer" or not hmac.compare_digest(given, token):
                challenge = 'Bearer realm="tcplock"'
                if scheme:
                    challenge += ', error="invalid_token"'
                return _reply(
                    start_response,
                    "401 Unauthorized",
                    {"error": "this endpoint needs the header Authorization: Bearer TOKEN"},
                    [("WWW-Authenticate", challenge)],
                )
        routes = {
            ("GET", "/status"): self._status,
            ("GET", "/metrics"): self._metrics,
            ("GET", "/history"): self._history,
            ("POST", "/pause"): self._pause,
            ("POST", "/resume"): self._resume,
        }
        handler = routes.get((method, path))
        if handler is None and path.startswith("/backends/"):
            return self._backend(method, path, start_response)
        if handler is None:
            allowed = [m for (m, p) in routes if p == path]
            if allowed:
                return _reply(
                    start_response,
                    "405 Method Not Allowed",
                    {"error": "use " + " or ".join(allowed)},
                    [("Allow", ", ".join(allowed))],
                )
            return _reply(
                start_response,
                "404 Not Found",
                {
                    "error": "not found",
                    "paths": sorted({p for _, p in routes} | _PATHS_BESIDE_ROUTES),
                },
            )
        return handler(start_response)

    def _healthz(self, start_response):
        healthy, answer = health(self.lock)
        status = "200 OK" if healthy else "503 Service Unavailable"
        body = (json.dumps(answer) + "\n").encode()
        start_response(
            status,
            [
                ("Content-Type", "application/json"),
                ("Content-Length", str(len(body))),
                ("Cache-Control", "no-store"),
            ],
        )
        return [body]

    def _backend(self, method, path, start_response):
        # POST /backends/HOST:PORT/drain or /enable
        address, _, action = path[len("/backends/") :].rpartition("/")
        actions = {"drain": self.lock.drain_backend, "enable": self.lock.enable_backend}
        if action not in actions:
            return _reply(
                start_response,
                "404 Not Found",
                {"error": "use POST /backends/HOST:PORT/drain or /backends/HOST:PORT/enable"},
            )
        if method != "POST":
            return _reply(
                start_response,
                "405 Method Not Allowed",
                {"error": "use POST"},
                [("Allow", "POST")],
            )
        try:
            backend = actions[action](address)
        except KeyError:
            known = [b.label for b in self.lock.backends]
            return _reply(
                start_response,
                "404 Not Found",
                {"error": f"no backend {address}", "backends": known},
            )
        return _reply(start_response, "200 OK", backend.status())

    def _status(self, start_response):
        return _reply(start_response, "200 OK", self.lock.status())

    def _history(self, start_response):
        return _reply(start_response, "200 OK", self.lock.history())

    def _metrics(self, start_response):
        made = self._exposition
        now = time.monotonic()
        if made is None or now - made[0] >= METRICS_MAX_AGE:
            made = self._exposition = (now, *self.metrics.exposition())
        _, body, content_type = made
        start_response(
            "200 OK", [("Content-Type", content_type), ("Content-Length", str(len(body)))]
        )
        return [body]

    def _pause(self, start_response):
        self.lock.pause()
        return _reply(start_response, "200 OK", {"paused": True})

    def _resume(self, start_response):
        self.lock.resume()
        return _reply(start_response, "200 OK", {"paused": False})


#: What the 404 body lists besides the routes' paths: the paths answered outside them.
_PATHS_BESIDE_ROUTES = {"/", "/healthz", "/backends/HOST:PORT/drain", "/backends/HOST:PORT/enable"}


def _reply(start_response, status: str, data, headers=()):
    body = (json.dumps(data, indent=1) + "\n").encode()
    start_response(
        status, [("Content-Type", "application/json"), ("Content-Length", str(len(body))), *headers]
    )
    return [body]


def agent_reply(lock: TCPLock) -> str:
    """The line HAProxy's agent-check reads: ``down`` (with the reason after ``#``) when no
    backend is up; ``drain`` while the lock lets nobody in (paused, stopping, or every backend
    that is up restarting or drained); else ``up ready`` with a weight that falls as the load
    grows: slots/(slots + clients holding a slot + clients waiting), over the backends that
    take clients (100% when idle)."""
    if lock.paused or lock.draining:
        return "drain\n"
    up = [b for b in lock.backends if is_up(b)]
    if not up:
        return "down#no backend is up\n"
    serving = [b for b in up if b.open]
    if not serving:
        return "drain\n"
    slots = sum(b.slots for b in serving)
    busy = sum(b.held for b in serving) + lock.queued
    weight = max(1, 100 * slots // (slots + busy))
    return f"up ready {weight}%\n"


class AgentCheck(_Bounded, StreamServer):
    """Answers each connection with one :func:`agent_reply` line, then closes. An answer
    never waits for the client, so a connection lasts one turn of the loop; accept failures
    are handled as on the status port."""

    _what = "agent-check"

    def __init__(self, listener, lock: TCPLock) -> None:
        self.lock = lock
        super().__init__(listener)
        self._init_bounds()

    def handle(self, sock, address) -> None:
        try:
            sock.sendall(agent_reply(self.lock).encode())
        except OSError:
            pass
