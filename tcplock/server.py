"""TCPLock: a StreamServer that lets at most N clients through to a backend, in arrival order.

What it owns: the life of each client connection — admit, queue, activate (hooks), connect the
backend, relay, end — and the graceful stop. The rule it keeps: every connection ends in exactly
one place (the ``finally`` of :meth:`TCPLock.handle`), which closes both sockets, runs the
TTL hook if the lifetime was cut, releases the slot if one was held, and writes the one log line
that says how the connection ended.
"""

from __future__ import annotations

import logging
import socket as _stdsocket
import struct
import time
from typing import Callable, Dict, List, Optional, Tuple

import gevent
from gevent import socket
from gevent.event import Event
from gevent.server import StreamServer

from .gate import Gate, Ticket
from .hooks import HookFailed, call_hook
from .relay import Relay

__all__ = ["TCPLock", "Connection", "END_REASONS", "format_address"]

log = logging.getLogger(__name__)

#: Every way a connection can end, as written in the log line's ``end=`` field.
END_REASONS = (
    "closed",  # both sides finished normally
    "client-reset",  # the client went away abruptly while active
    "backend-reset",  # the backend went away abruptly while active
    "ttl",  # the connection reached its maximum lifetime and was cut
    "left-queue",  # the client went away while waiting in the queue
    "queue-timeout",  # the client waited longer than queue_timeout
    "queue-full",  # max_queue clients were already waiting
    "backend-refused",  # no backend connection could be made within connect_timeout
    "hook-failed",  # the on_activate hook failed; the client never reached the backend
    "shutdown",  # tcplock was stopping
    "error",  # a bug in tcplock (logged with a traceback)
)

# Ends after which a socket is closed with a reset rather than an orderly FIN: the peer must
# learn that the exchange did not complete.
_ABORT_CLIENT = frozenset({"backend-reset", "ttl", "shutdown", "error"})
_LINGER_RESET = struct.pack("ii", 1, 0)


class _Shutdown(Exception):
    """Raised into a connection's greenlet when the drain time after stop() has run out."""


def format_address(addr) -> str:
    """``host:port``, with IPv6 hosts in brackets."""
    host, port = addr[0], addr[1]
    if ":" in host:
        return f"[{host}]:{port}"
    return f"{host}:{port}"


class Connection:
    """One client connection, as hooks and embedding code see it.

    Times are ``time.monotonic()`` values; the ``*_seconds`` properties are what to read.
    """

    __slots__ = (
        "lock",
        "id",
        "client",
        "sock",
        "upstream",
        "greenlet",
        "activation",
        "queued_at",
        "activated_at",
        "ended_at",
        "bytes_up",
        "bytes_down",
        "end",
    )

    def __init__(self, lock: TCPLock, sock, client: Tuple, number: int) -> None:
        self.lock = lock
        #: A sequence number, in accept order, starting at 1.
        self.id = number
        #: The client's address tuple, as ``socket.getpeername()`` gives it.
        self.client = client
        #: The client socket, and the backend socket once connected (None before and after).
        self.sock = sock
        self.upstream = None
        self.greenlet = gevent.getcurrent()
        #: Which activation this was (1 for the first client let through), or None if queued.
        self.activation: Optional[int] = None
        self.queued_at = time.monotonic()
        self.activated_at: Optional[float] = None
        self.ended_at: Optional[float] = None
        #: Bytes delivered from the client to the backend, and back.
        self.bytes_up = 0
        self.bytes_down = 0
        #: How the connection ended (one of END_REASONS), once it has.
        self.end: Optional[str] = None

    @property
    def queued_seconds(self) -> float:
        """Time spent waiting for a slot (so far, if still waiting)."""
        until = self.activated_at or self.ended_at or time.monotonic()
        return until - self.queued_at

    @property
    def active_seconds(self) -> float:
        """Time since the slot was granted (0 if it never was)."""
        if self.activated_at is None:
            return 0.0
        return (self.ended_at or time.monotonic()) - self.activated_at

    def hook_env(self) -> Dict[str, str]:
        """The context a command hook finds in its environment."""
        lock = self.lock
        host, port = self.client[0], self.client[1]
        env = {
            "TCPLOCK_CLIENT": format_address(self.client),
            "TCPLOCK_CLIENT_HOST": str(host),
            "TCPLOCK_CLIENT_PORT": str(port),
            "TCPLOCK_CONNECTION_ID": str(self.id),
            "TCPLOCK_ACTIVATION": str(self.activation or 0),
            "TCPLOCK_SERVED": str(lock.served),
            "TCPLOCK_PREVIOUS_END": lock.last_end or "",
            "TCPLOCK_QUEUED": str(lock.queued),
            "TCPLOCK_SLOTS": str(lock.slots),
            "TCPLOCK_BACKEND": format_address(lock.backend),
            "TCPLOCK_ACTIVE_SECONDS": f"{self.active_seconds:.3f}",
            "TCPLOCK_BYTES_UP": str(self.bytes_up),
            "TCPLOCK_BYTES_DOWN": str(self.bytes_down),
        }
        if self.end:
            env["TCPLOCK_END"] = self.end
        return env

    def __repr__(self) -> str:
        return f"<Connection #{self.id} {format_address(self.client)}>"


Hook = Callable[[Connection], object]


class TCPLock(StreamServer):
    """A TCP proxy that relays at most ``slots`` clients to ``backend`` at a time, FIFO.

    All durations are in seconds; ``None`` switches a limit off. Importing this class does not
    monkey-patch anything; it runs in any gevent program. Call :meth:`start` (non-blocking) or
    :meth:`serve_forever`, and :meth:`stop` to drain and close.
    """

    #: Listen backlog: a burst of clients waits in the kernel rather than being refused.
    backlog = 1024

    def __init__(
        self,
        listen: Tuple[str, int] = ("127.0.0.1", 9000),
        backend: Tuple[str, int] = ("localhost", 8100),
        *,
        slots: int = 1,
        timeout: Optional[float] = None,
        queue_timeout: Optional[float] = None,
        max_queue: Optional[int] = None,
        connect_timeout: float = 5.0,
        finish_timeout: float = 10.0,
        hook_timeout: Optional[float] = 60.0,
        drain_timeout: float = 10.0,
        on_activate: Optional[Hook] = None,
        on_timeout: Optional[Hook] = None,
    ) -> None:
        if slots < 1:
            raise ValueError("slots must be at least 1")
        for name, value in (
            ("timeout", timeout),
            ("queue_timeout", queue_timeout),
            ("hook_timeout", hook_timeout),
        ):
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be positive, or None for no limit")
        if max_queue is not None and max_queue < 0:
            raise ValueError("max_queue must be 0 or more, or None for no limit")
        super().__init__(tuple(listen))
        #: Where clients are relayed to, as (host, port).
        self.backend = (backend[0], int(backend[1]))
        self.slots = slots
        #: Maximum lifetime of an active connection, counted from the moment the backend
        #: connection is made (hooks and connecting have limits of their own).
        self.timeout = timeout
        self.queue_timeout = queue_timeout
        self.max_queue = max_queue
        self.connect_timeout = connect_timeout
        #: How long a peer may keep going once the other side has finished: the backend after
        #: the client reset (its output is discarded), the client after the backend closed.
        self.finish_timeout = finish_timeout
        self.hook_timeout = hook_timeout
        self.drain_timeout = drain_timeout
        self.on_activate = on_activate
        self.on_timeout = on_timeout
        self.gate = Gate(slots)
        #: Activations so far (slots granted).
        self.activations = 0
        #: Connections that held a slot and have finished.
        self.served = 0
        #: How the most recent connection that held a slot ended.
        self.last_end: Optional[str] = None
        self._connections: Dict[Connection, None] = {}  # insertion-ordered set
        self._active: Dict[Connection, None] = {}
        self._idle = Event()
        self._idle.set()
        self._numbers = 0
        self._stopping = False
        self._addrinfo: Optional[list] = None

    # -- what embedding code reads ---------------------------------------------------------------

    @property
    def queued(self) -> int:
        """How many clients are waiting for a slot."""
        return self.gate.waiting

    @property
    def active(self) -> List[Connection]:
        """The connections holding a slot, oldest first."""
        return list(self._active)

    @property
    def connections(self) -> List[Connection]:
        """Every connection tcplock holds (queued and active), in accept order."""
        return list(self._connections)

    # -- the life of a connection ----------------------------------------------------------------

    def handle(self, sock, address) -> None:
        self._numbers += 1
        conn = Connection(self, sock, address, self._numbers)
        self._connections[conn] = None
        self._idle.clear()
        held = False
        relay: Optional[Relay] = None
        backend = None
        reason = "error"
        try:
            _tune(sock)
            if self._stopping:
                reason = "shutdown"
                return
            ticket = Ticket()
            if self.gate.would_wait():
                if self.max_queue is not None and self.gate.waiting >= self.max_queue:
                    reason = "queue-full"
                    return
                watch = _watch_departure(sock, ticket)
                try:
                    held = self.gate.acquire(ticket, self.queue_timeout)
                finally:
                    watch.stop()
                    watch.close()
            else:
                held = self.gate.acquire(ticket)
            if not held:
                reason = ticket.cancelled or "queue-timeout"
                return

            self.activations += 1
            conn.activation = self.activations
            conn.activated_at = time.monotonic()
            self._active[conn] = None
            if self.on_activate is not None:
                try:
                    call_hook("on-activate", self.on_activate, conn, self.hook_timeout)
                except HookFailed as e:
                    log.error("%s: %s", format_address(address), e)
                    reason = "hook-failed"
                    return

            backend = self._connect_backend(conn)
            if backend is None:
                reason = "backend-refused"
                return
            conn.upstream = backend
            relay = Relay(sock, backend, conn)
            ttl = gevent.Timeout(self.timeout) if self.timeout else None
            try:
                if ttl is not None:
                    ttl.start()
                reason = relay.run(self.finish_timeout)
            except gevent.Timeout as t:
                if t is not ttl:
                    raise
                reason = "ttl"
            finally:
                if ttl is not None:
                    ttl.close()
        except _Shutdown:
            reason = "shutdown"
        except Exception:
            log.exception("%s: unexpected error", format_address(address))
            reason = "error"
        finally:
            conn.end = reason
            conn.ended_at = time.monotonic()
            conn.upstream = None
            try:
                # A client cut while active learns it with a reset; one turned away before it
                # got a slot gets an orderly close.
                _close(sock, held and reason in _ABORT_CLIENT)
                if backend is not None:
                    graceful = relay is not None and relay.backend_finished and reason != "ttl"
                    _close(backend, not graceful)
                if reason == "ttl" and self.on_timeout is not None:
                    try:
                        call_hook("on-timeout", self.on_timeout, conn, self.hook_timeout)
                    except HookFailed as e:
                        log.error("%s: %s", format_address(address), e)
            finally:
                if held:
                    self._active.pop(conn, None)
                    self.served += 1
                    self.last_end = reason
                    self.gate.release()
                self._connections.pop(conn, None)
                if not self._connections:
                    self._idle.set()
                log.info(
                    "%s queued=%.3fs active=%.3fs up=%d down=%d end=%s",
                    format_address(address),
                    conn.queued_seconds,
                    conn.active_seconds,
                    conn.bytes_up,
                    conn.bytes_down,
                    reason,
                )

    def _connect_backend(self, conn: Connection):
        """Connect to the backend, retrying with backoff for up to connect_timeout (it may be
        restarting). Returns the socket, or None once the time is up."""
        deadline = time.monotonic() + self.connect_timeout
        delay = 0.01
        while True:
            remaining = deadline - time.monotonic()
            try:
                return self._connect_once(max(remaining, 0.001))
            except OSError as e:
                error = e
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            gevent.sleep(min(delay, remaining))
            delay = min(delay * 2, 0.5)
        log.warning(
            "%s: backend %s unavailable for %.1fs: %s",
            format_address(conn.client),
            format_address(self.backend),
            self.connect_timeout,
            error.strerror or error,
        )
        return None

    def _connect_once(self, timeout: float):
        # The backend's name is resolved once and kept until a connection fails, so the usual
        # hand-off costs no resolver round trip.
        addrs = self._addrinfo
        if addrs is None:
            addrs = socket.getaddrinfo(
                self.backend[0], self.backend[1], 0, socket.SOCK_STREAM, socket.IPPROTO_TCP
            )
            self._addrinfo = addrs
        error: OSError = OSError("no address")
        for family, type_, proto, _name, sockaddr in addrs:
            s = socket.socket(family, type_, proto)
            try:
                s.settimeout(timeout)
                s.connect(sockaddr)
                s.settimeout(None)
            except OSError as e:
                s.close()
                error = e
                continue
            _tune(s)
            return s
        self._addrinfo = None
        raise error

    # -- stopping --------------------------------------------------------------------------------

    def stop(self, timeout: Optional[float] = None) -> None:
        """Stop gracefully: stop accepting, close queued clients at once, give active ones
        ``timeout`` seconds (default :attr:`drain_timeout`) to finish, then cut them."""
        if timeout is None:
            timeout = self.drain_timeout
        self._stopping = True
        if not self.closed:
            self.close()
        self.gate.cancel_all("shutdown")
        if not self._idle.wait(timeout):
            remaining = list(self._connections)
            log.warning("drain time over; cutting %d connection(s)", len(remaining))
            for conn in remaining:
                conn.greenlet.kill(_Shutdown, block=False)
            self._idle.wait(5)


def _tune(sock) -> None:
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    except OSError:
        pass  # the peer may already be gone; the relay will see it


def _close(sock, abort: bool) -> None:
    try:
        if abort:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    except OSError:
        pass
    sock.close()


def _watch_departure(sock, ticket: Ticket):
    """Watch a queued client for leaving, without reading its bytes.

    Runs in the event loop itself (no greenlet per queued client): when the socket turns
    readable, peek. Nothing there but EOF, or an error, means the client left; data means it is
    waiting with a request, which stays in the kernel's buffer for the backend, and watching
    stops (the relay will see whatever happens to it next).
    """
    raw = sock._sock  # the real non-blocking socket: the hub must not block or switch
    watcher = gevent.get_hub().loop.io(sock.fileno(), 1)

    def readable():
        try:
            data = raw.recv(1, _stdsocket.MSG_PEEK)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        watcher.stop()
        if not data:
            ticket.cancel("left-queue")

    watcher.start(readable)
    return watcher
