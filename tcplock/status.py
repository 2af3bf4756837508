"""Seeing and steering a running lock: the HTTP status/metrics/control endpoint, Prometheus
metrics, and HAProxy's agent-check.

What it owns: turning a :class:`~tcplock.server.TCPLock`'s state into answers. The rule it
keeps: nothing here can slow the proxy down — every answer is computed from counters the lock
keeps anyway, in the same event loop, with no lock held and no I/O beyond the answer itself.
"""

from __future__ import annotations

import json
import logging
from typing import Tuple

from gevent.pywsgi import WSGIServer
from gevent.server import StreamServer

from .server import END_REASONS, Connection, TCPLock

__all__ = ["Metrics", "StatusServer", "AgentCheck", "agent_reply"]

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
        lock.end_observers.append(self.observe)

    def observe(self, conn: Connection) -> None:
        if conn.activated_at is not None:
            self.queue_wait.observe(conn.queued_seconds)
            self.duration.observe(conn.active_seconds)

    def exposition(self) -> Tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


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
                    "1 while the backend answers (0: down, checked every check_interval).",
                    labels=["backend"],
                ),
                lambda b: int(b.up),
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


class StatusServer(WSGIServer):
    """``GET /status`` (JSON), ``GET /metrics`` (Prometheus), ``POST /pause``,
    ``POST /resume``, ``POST /backends/HOST:PORT/drain`` and ``.../enable``; on its own
    address, in the lock's process and event loop."""

    def __init__(self, listener, lock: TCPLock) -> None:
        self.lock = lock
        self.metrics = Metrics(lock)
        super().__init__(listener, self.app, log=None, error_log=log)

    def app(self, environ, start_response):
        method = environ["REQUEST_METHOD"]
        path = environ.get("PATH_INFO", "")
        routes = {
            ("GET", "/status"): self._status,
            ("GET", "/metrics"): self._metrics,
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
                {"error": "not found", "paths": sorted({p for _, p in routes})},
            )
        return handler(start_response)

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

    def _metrics(self, start_response):
        body, content_type = self.metrics.exposition()
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
    up = [b for b in lock.backends if b.up]
    if not up:
        return "down#no backend is up\n"
    serving = [b for b in up if b.open]
    if not serving:
        return "drain\n"
    slots = sum(b.slots for b in serving)
    busy = sum(b.held for b in serving) + lock.queued
    weight = max(1, 100 * slots // (slots + busy))
    return f"up ready {weight}%\n"


class AgentCheck(StreamServer):
    """Answers each connection with one :func:`agent_reply` line, then closes."""

    def __init__(self, listener, lock: TCPLock) -> None:
        self.lock = lock
        super().__init__(listener)

    def handle(self, sock, address) -> None:
        try:
            sock.sendall(agent_reply(self.lock).encode())
        except OSError:
            pass
