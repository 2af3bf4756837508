"""TCPLock: a StreamServer that lets at most N clients through to a backend, in arrival order.

What it owns: the life of each client connection — admit, queue, activate (hooks), connect the
backend, relay, end — and the graceful stop. The rule it keeps: every connection ends in exactly
one place (:meth:`TCPLock._end`), which closes both sockets, runs the
TTL hook if the lifetime was cut, releases the slot if one was held, and writes the one log line
that says how the connection ended.
"""

from __future__ import annotations

import _socket
import errno
import ipaddress
import logging
import os
import socket as _stdsocket
import struct
import sys
import time
from functools import partial
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import gevent
from gevent import Greenlet, socket
from gevent.event import Event
from gevent.server import StreamServer
from gevent.socket import wait_write

from .gate import Gate, Ticket
from .hooks import CommandHook, HookFailed, call_hook
from .peer import PeerCheck
from .relay import Relay, read_watcher, recycle

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
    "not-allowed",  # the client's address is not in the allow list
    "backend-refused",  # no backend connection could be made within connect_timeout
    "hook-failed",  # the on_activate hook failed; the client never reached the backend
    "shutdown",  # tcplock was stopping
    "error",  # a bug in tcplock (logged with a traceback)
)

# Ends after which a socket is closed with a reset rather than an orderly FIN: the peer must
# learn that the exchange did not complete.
_ABORT_CLIENT = frozenset({"backend-reset", "ttl", "shutdown", "error"})
_LINGER_RESET = struct.pack("ii", 1, 0)

_IN_PROGRESS = frozenset({errno.EINPROGRESS, errno.EAGAIN, errno.EWOULDBLOCK})
# Where the platform has it, a backend socket is made non-blocking by socket() itself.
_NONBLOCK = getattr(_socket, "SOCK_NONBLOCK", 0)

# accept() errors that mean "no descriptors or memory right now": back off and keep serving.
_EXHAUSTED = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})

Network = ipaddress._BaseNetwork


class _RateLimit:
    """Lets one message through per interval and counts the ones it held back."""

    __slots__ = ("interval", "_next", "held_back")

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._next = 0.0
        self.held_back = 0

    def ready(self) -> bool:
        now = time.monotonic()
        if now >= self._next:
            self._next = now + self.interval
            return True
        self.held_back += 1
        return False

    def take_held_back(self) -> int:
        n, self.held_back = self.held_back, 0
        return n


_RESTART_WHY = {"count": "after the set number of uses", "ttl": "after a connection timed out"}


class _Shutdown(BaseException):
    """Raised into a connection's greenlet when the drain time after stop() has run out.

    A BaseException, like GreenletExit: hooks treat every Exception as their own failure, and a
    shutdown must pass through them."""


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
        "outcome",
        "ticket",
        "watch",
        "timer",
        "running",
        "relay",
        "connect_by",
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
        #: The greenlet serving this connection while it holds a slot: only where there are
        #: hooks to run or a backend that does not accept at once; otherwise the event loop
        #: drives it and this stays None. None again once it has ended (that greenlet goes
        #: on to serve other clients).
        self.greenlet: Optional[Greenlet] = None
        #: True from the grant of its slot.
        self.running = False
        self.relay: Optional[Relay] = None
        self.connect_by: Optional[float] = None
        self.ticket: Optional[Ticket] = None
        self.watch = None
        self.timer = None
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
        #: The relay, once it has finished: how the exchange ended, for _end and _settle.
        self.outcome: Optional[Relay] = None

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

    def describe(self) -> str:
        """What its log line says: client, time waited, time active, bytes each way, end."""
        ended = self.ended_at or time.monotonic()
        activated = self.activated_at
        if activated is None:
            queued, active = ended - self.queued_at, 0.0
        else:
            queued, active = activated - self.queued_at, ended - activated
        # (%-formatting: a quarter cheaper than the same as an f-string, once per connection)
        return "%s queued=%.3fs active=%.3fs up=%d down=%d end=%s" % (  # noqa: UP031
            format_address(self.client),
            queued,
            active,
            self.bytes_up,
            self.bytes_down,
            self.end,
        )

    def fields(self) -> Dict[str, object]:
        """The connection as plain data: what its JSON log line, its ``/status`` entry and a
        command hook's environment are made from (one projection, so they cannot disagree)."""
        return {
            "id": self.id,
            "client": format_address(self.client),
            "backend": format_address(self.lock.backend),
            "activation": self.activation,
            "queued_seconds": round(self.queued_seconds, 3),
            "active_seconds": round(self.active_seconds, 3),
            "bytes_up": self.bytes_up,
            "bytes_down": self.bytes_down,
            "end": self.end,
        }

    def stop_watching(self) -> None:
        """Stop the event-loop watchers of a waiting client."""
        for watcher in (self.watch, self.timer):
            if watcher is not None:
                watcher.stop()
                watcher.close()
        self.watch = self.timer = None

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
    #: Clients accepted per turn of the event loop. One: the listener stays readable while
    #: more are waiting, so the loop comes back for them, and no accept() is made to find the
    #: backlog empty. That call fails with EAGAIN, but only after the kernel has made and
    #: freed a socket and a file for it: it cost about 4 us, as much as Python spends on a
    #: whole hand-off's worth of gate and queue, and came about every other hand-off.
    max_accept = 1
    #: First pause before a failed restart is tried again; it doubles up to 30 s.
    restart_retry_delay = 1.0
    #: Seconds between checks for resets of waiting clients that have sent data (and for
    #: lingering clients whose time is up).
    sweep_interval = 1.0
    #: Once its slot has passed on, how long a client that has not closed may go on sending
    #: (what it sends is dropped) before its socket is closed, by the sweep, so up to
    #: sweep_interval later; and how many such clients at most (beyond that they are closed
    #: at once).
    linger_time = 5.0
    max_lingering = 256
    #: Called with each connection that has ended, in place of its INFO line through
    #: :mod:`logging` (the CLI sets one that writes the same line straight to its log stream:
    #: the logging machinery cost more than the rest of a hand-off). None: ``log.info``.
    connection_log: Optional[Callable[[Connection], object]] = None
    #: For a backend on loopback (Linux): once it has sent its FIN, ask the kernel whether it
    #: closed the connection for good; if so the slot passes on without waiting for the client
    #: (see client_finish_timeout). A backend that only half-closed is still waited for.
    check_backend_close = True

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
        client_finish_timeout: float = 10.0,
        hook_timeout: Optional[float] = 60.0,
        drain_timeout: float = 10.0,
        on_activate: Optional[Hook] = None,
        on_timeout: Optional[Hook] = None,
        restart: Optional[Callable[[str], object]] = None,
        restart_every: Optional[int] = None,
        restart_on_timeout: bool = False,
        ready_timeout: Optional[float] = 30.0,
        allow: Optional[Iterable] = None,
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
        for name, value in (
            ("finish_timeout", finish_timeout),
            ("client_finish_timeout", client_finish_timeout),
        ):
            if value is not None and value < 0:
                raise ValueError(f"{name} must be 0 or more, or None for no limit")
        if restart_every is not None and restart_every < 1:
            raise ValueError("restart_every must be at least 1, or None")
        if (restart_every or restart_on_timeout) and restart is None:
            raise ValueError("restart_every and restart_on_timeout need a restart callable")
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
        #: How long the backend may keep going after the client reset (its output is
        #: discarded) before the slot passes on.
        self.finish_timeout = finish_timeout
        #: How long the client may keep its side open after the backend closed before the slot
        #: passes on. 0 passes it on as soon as the backend has closed: only for backends that
        #: never half-close to go on reading. (The client's socket then lingers; see
        #: :attr:`linger_time`.)
        self.client_finish_timeout = client_finish_timeout
        self.hook_timeout = hook_timeout
        self.drain_timeout = drain_timeout
        self.on_activate = on_activate
        self.on_timeout = on_timeout
        #: Restarts the backend: called as ``restart(reason)`` (``"count"`` or ``"ttl"``) while
        #: no client is relayed.
        self.restart = restart
        #: Restart after every this many activations (before the next one is let in).
        self.restart_every = restart_every
        #: Restart after a connection was cut at its TTL (after on_timeout).
        self.restart_on_timeout = restart_on_timeout
        #: After a restart, wait up to this long for the backend to accept connections.
        self.ready_timeout = ready_timeout
        #: Restarts done, and restart attempts that failed.
        self.restarts = 0
        self.restart_failures = 0
        self._restart_reason: Optional[str] = None
        self._restart_done = Event()
        self._since_restart = 0
        self._parked = 0
        #: Networks clients may come from (None: any client that can reach the listener).
        self.allow: Optional[Tuple[Network, ...]] = (
            tuple(ipaddress.ip_network(n, strict=False) for n in allow)
            if allow is not None
            else None
        )
        #: accept() calls that failed for lack of descriptors or memory.
        self.accept_failures = 0
        self._accept_delay = self.min_delay
        self._accept_log = _RateLimit(10.0)
        self._refusal_log = _RateLimit(10.0)
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
        self._lingering: Dict[_Lingering, None] = {}
        #: Greenlets that finished a connection and wait to serve the next (see _work).
        self._workers: List[Greenlet] = []
        # Set while a connection's greenlet releases its slot, and the connection that the
        # release granted, which that greenlet then serves itself (see _spawn).
        self._releasing: Optional[Greenlet] = None
        self._handed: Optional[Connection] = None
        self._numbers = 0
        self._stopping = False
        self._addrinfo: Optional[list] = None
        self._peer_check = PeerCheck()
        self._activating = False
        self._hub = gevent.get_hub()
        self._operator_paused = False
        #: Finished connections by end reason, and their bytes in each direction.
        self.ended: Dict[str, int] = {}
        self.bytes_up_total = 0
        self.bytes_down_total = 0
        #: Hook calls (on_activate, on_timeout) that failed.
        self.hook_failures = 0
        #: Callables given each connection as it ends (after its log line); for metrics.
        self.end_observers: List[Callable[[Connection], object]] = []
        self.started_at = time.monotonic()
        self._tune_clients = True
        self._sweeper = None

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

    @property
    def paused(self) -> bool:
        """Whether :meth:`pause` is in force."""
        return self._operator_paused

    @property
    def draining(self) -> bool:
        """Whether :meth:`stop` has begun."""
        return self._stopping

    @property
    def restarting(self) -> bool:
        """Whether a restart is due or running (no client is let in meanwhile)."""
        return self._restart_reason is not None

    def pause(self) -> None:
        """Stop letting waiting clients in; they keep their places and newcomers queue behind
        them. Active connections are not touched. For maintenance on the backend."""
        if not self._operator_paused:
            self._operator_paused = True
            log.warning("paused: no client is let in until resumed")
            self._sync_gate()

    def resume(self) -> None:
        """Undo :meth:`pause`: the queue moves again, in order."""
        if self._operator_paused:
            self._operator_paused = False
            log.warning("resumed")
            self._sync_gate()

    def _sync_gate(self) -> None:
        if self._operator_paused or self._restart_reason is not None:
            self.gate.pause()
        else:
            self.gate.resume()

    def status(self) -> dict:
        """A snapshot of the lock, as plain data (what ``GET /status`` returns)."""
        from . import __version__

        now = time.monotonic()
        oldest = next((c for c in self._connections if c.activated_at is None), None)
        return {
            "version": __version__,
            "listen": format_address((self.server_host, self.server_port))
            if not self.closed
            else None,
            "backend": format_address(self.backend),
            "slots": self.slots,
            "queued": self.queued,
            "oldest_wait_seconds": round(now - oldest.queued_at, 3) if oldest else 0.0,
            "active": [
                {
                    "client": format_address(c.client),
                    "id": c.id,
                    "seconds": round(c.active_seconds, 3),
                    "bytes_up": c.bytes_up,
                    "bytes_down": c.bytes_down,
                }
                for c in self._active
            ],
            "served": self.served,
            "activations": self.activations,
            "ended": dict(self.ended),
            "restarts": self.restarts,
            "restart_failures": self.restart_failures,
            "hook_failures": self.hook_failures,
            "paused": self._operator_paused,
            "restarting": self.restarting,
            "draining": self._stopping,
            "uptime_seconds": round(now - self.started_at, 3),
        }

    # -- the life of a connection ----------------------------------------------------------------

    # A client's life starts in the event loop: do_read accepts it, do_handle admits it. A
    # client that has to wait gets no greenlet: its place in the queue is a Ticket, and the
    # loop watches its socket for departure (or, once it has sent data, the sweep looks for a
    # reset). Only once the slot is granted does a greenlet serve it (_spawn, _work, _serve),
    # one that finished an earlier connection where there is one. That keeps a waiting client
    # down to a few small objects.

    def do_read(self):
        try:
            fd, address = self.socket._accept()
        except BlockingIOError:
            return None
        except OSError as e:
            if e.errno not in _EXHAUSTED:
                raise
            self._accept_exhausted(e)
            return None
        self._accept_delay = self.min_delay
        # A plain non-blocking socket: the event loop watches it while the client waits and
        # the relay drives it from watchers, so gevent's socket wrapper is never needed.
        # (_socket, not socket: the CLI monkey-patches socket.socket into gevent's.)
        sock = _socket.socket(self.family, _socket.SOCK_STREAM, 0, fd)
        sock.setblocking(False)
        return sock, address

    def do_handle(self, sock, address) -> None:
        self._numbers += 1
        conn = Connection(self, sock, address, self._numbers)
        self._connections[conn] = None
        self._idle.clear()
        if self._stopping:
            return self._end(conn, False, "shutdown")
        if self.allow is not None and not self._allowed(address[0]):
            return self._end(conn, False, "not-allowed")
        if self._tune_clients:
            _tune(sock)
        if (
            self.max_queue is not None
            and self.gate.waiting >= self.max_queue
            and self.gate.would_wait()
        ):
            return self._end(conn, False, "queue-full")
        ticket = conn.ticket = Ticket(partial(self._woken, conn))
        if self.gate.enqueue(ticket):
            self._spawn(conn)
            return None
        # Most clients have sent their request by the time they are accepted: one look now
        # spares them the departure watch (the sweep looks after them, as after any client
        # that sent data).
        try:
            first = sock.recv(1, _stdsocket.MSG_PEEK)
        except BlockingIOError:
            conn.watch = _watch_departure(sock, ticket)
        except OSError:
            return ticket.cancel("left-queue")
        else:
            if not first:
                return ticket.cancel("left-queue")
        if self.queue_timeout is not None:
            conn.timer = self.loop.timer(self.queue_timeout)
            conn.timer.start(ticket.cancel, "queue-timeout")
        return None

    def start(self) -> None:
        super().start()
        if self._sweeper is None:
            self._sweeper = self.loop.timer(self.sweep_interval, self.sweep_interval)
            self._sweeper.start(self._sweep)

    def close(self) -> None:
        """Stop listening. Connections already accepted go on (stop() drains them); the sweep
        goes on while there are any, or lingering clients to close in time."""
        super().close()
        if not self._connections and not self._lingering:
            self._stop_sweeper()

    def _stop_sweeper(self) -> None:
        if self._sweeper is not None:
            self._sweeper.stop()
            self._sweeper.close()
            self._sweeper = None

    def _sweep(self) -> None:
        """Once a second, in the event loop: a waiting client that sent its request is no
        longer watched for readiness (its data keeps the socket readable), so look for a reset
        here. One that merely closed its sending side keeps its place, as it should. Lingering
        clients whose time is up are closed here too (one timer for all of them)."""
        for conn in list(self._connections):
            if (
                not conn.running
                and conn.ticket is not None
                and (conn.watch is None or not conn.watch.active)
            ):
                try:
                    gone = conn.sock.getsockopt(_stdsocket.SOL_SOCKET, _stdsocket.SO_ERROR)
                except OSError:
                    gone = True
                if gone and conn.ticket is not None:
                    conn.ticket.cancel("left-queue")
        lingering = self._lingering
        if lingering:
            now = time.monotonic()
            while lingering:
                oldest = next(iter(lingering))
                if oldest.until > now:
                    break
                oldest.close()
        if self.closed and not self._connections and not lingering:
            self._stop_sweeper()  # closed, and nothing left to look after

    def do_close(self, *args) -> None:
        pass  # every connection is closed by _end

    def handle(self, sock, address) -> None:  # pragma: no cover - StreamServer's hook, unused
        raise NotImplementedError("TCPLock admits clients in do_handle")

    def _woken(self, conn: Connection) -> None:
        """The gate granted a waiting client its slot, or its wait was cancelled."""
        conn.stop_watching()
        ticket = conn.ticket
        if ticket.granted:
            self._spawn(conn)
        else:
            self.gate.discard(ticket)
            self._end(conn, False, ticket.cancelled or "queue-timeout")

    def _spawn(self, conn: Connection) -> None:
        if self.on_activate is None and self.on_timeout is None and self.restart is None:
            if self._activating:
                # Granted by a connection that ended while being activated: start this one on
                # the next turn, not inside that one's call (a queue of such ends would
                # recurse through the whole queue).
                self.loop.run_callback(self._activate, conn)
            else:
                self._activate(conn)
            return
        self._spawn_greenlet(conn)

    def _spawn_greenlet(self, conn: Connection) -> None:
        # (A connection that comes from _activate, its backend not ready, is already active.)
        others = len(self._active) - (conn.activation is not None)
        if (
            self._releasing is not None
            and self._handed is None
            and not self._parked
            and others == self.gate.held - 1
        ):
            # The slot was released by a finishing connection's greenlet: it serves this one
            # next, straight away, instead of waking another through the event loop. Not if
            # another granted connection has yet to start or is parked for a restart: it was
            # granted first and must reach the backend first.
            conn.greenlet = self._releasing
            self._handed = conn
            return
        if self._workers:
            worker = self._workers.pop()
            conn.greenlet = worker
            self.loop.run_callback(worker.switch, conn)
        else:
            conn.greenlet = Greenlet.spawn(self._work, conn)

    def _work(self, conn: Connection) -> None:
        """A greenlet that serves granted connections one after another.

        A new greenlet per hand-off would cost its creation and a fresh interpreter stack for
        every connection; a finished one instead waits here, at most one per slot, to be handed
        the next connection by _spawn.
        """
        me = gevent.getcurrent()
        hub = gevent.get_hub()
        while True:
            turned = self.loop.iteration
            try:
                self._serve(conn)
                if self._handed_to(me) and self.loop.iteration == turned:
                    # That connection ended without waiting for anything (a hook that failed
                    # at once, say): let the event loop run before the next one, or a queue
                    # of such clients would be worked through with everything else stalled.
                    gevent.sleep(0)
            except BaseException:
                # Something escaped the connection (a gevent.Timeout a Python hook left
                # running, say): the client its release let in must still be served.
                if self._handed_to(me):
                    handed, self._handed = self._handed, None
                    self._spawn(handed)
                raise
            if self._handed_to(me):
                conn, self._handed = self._handed, None
                continue
            if self._stopping or len(self._workers) >= self.slots:
                return
            self._workers.append(me)
            try:
                conn = hub.switch()
                while not isinstance(conn, Connection):  # pragma: no cover - a stray wake-up
                    conn = hub.switch()
            except BaseException:
                # Killed while idle (stop(), or the greenlet collected): nothing to clean up.
                if me in self._workers:
                    self._workers.remove(me)
                return

    def _handed_to(self, me) -> bool:
        # The hand-off is meant for the greenlet whose release made it, and no other.
        return self._handed is not None and self._handed.greenlet is me

    # Without hooks nothing in a connection's life needs a greenlet: the event loop connects
    # it (on loopback the backend has accepted before connect() returns), relays it, and ends
    # it, in callbacks, as haproxy would. Only what has to wait its turn goes to a greenlet
    # (_serve): a backend that refused or is slow to answer (connect retries), or a name to
    # resolve.

    def _activate(self, conn: Connection) -> None:
        """A granted connection with no hooks to run: connect and relay from the event loop."""
        self._activating = True
        try:
            self._activate_now(conn)
        finally:
            self._activating = False

    def _activate_now(self, conn: Connection) -> None:
        conn.running = True
        if self._stopping:
            return self._end(conn, True, "shutdown")
        self._activated(conn)
        conn.connect_by = conn.activated_at + self.connect_timeout
        try:
            backend, err = self._connect_now()
            if backend is None:
                return self._spawn_greenlet(conn)  # retries, with the time that is left
            conn.upstream = backend
            if err:
                # Connecting: watch for the outcome, within connect_timeout.
                conn.watch = self.loop.io(backend.fileno(), 2)
                conn.watch.start(self._connect_done, conn)
                conn.timer = self.loop.timer(self.connect_timeout)
                conn.timer.start(self._connect_failed, conn)
            else:
                self._relay(conn, self._addrinfo[0][4])  # the address _connect_now used
        except Exception:
            log.exception("%s: unexpected error", format_address(conn.client))
            self._end(conn, True, "error")
        return None

    def _connect_done(self, conn: Connection) -> None:
        try:
            err = conn.upstream.getsockopt(_socket.SOL_SOCKET, _socket.SO_ERROR)
        except OSError as e:
            err = e.errno or errno.EBADF
        if err:
            return self._connect_failed(conn)
        conn.stop_watching()
        try:
            _tune_backend(conn.upstream)
            self._relay(conn)
        except Exception:
            log.exception("%s: unexpected error", format_address(conn.client))
            self._end(conn, True, "error")

    def _connect_failed(self, conn: Connection) -> None:
        """The first attempt failed or took too long: retry in a greenlet, in the time left."""
        conn.stop_watching()
        _close(conn.upstream, True)
        conn.upstream = None
        self._addrinfo = None
        self._spawn_greenlet(conn)

    def _ask_backend_close(self, relay: Relay, peer=None) -> None:
        # Made ahead, while the backend works on the request: when its FIN comes, only the
        # question itself is left to send.
        if self.check_backend_close:
            question = self._peer_check.question(relay.backend, peer)
            if question is not None:
                relay.backend_closed = partial(self._peer_check.ask, question)

    def _relay(self, conn: Connection, peer=None) -> None:
        relay = conn.relay = Relay(conn.sock, conn.upstream, conn)
        if self.timeout:
            conn.timer = self.loop.timer(self.timeout)
            conn.timer.start(self._cut, conn, "ttl")
        relay.start(partial(self._relayed, conn), self.finish_timeout, self.client_finish_timeout)
        if relay.reason is None:
            self._ask_backend_close(relay, peer)

    def _relayed(self, conn: Connection) -> None:
        relay = conn.outcome = conn.relay
        self._end(conn, True, relay.reason)

    def _cut(self, conn: Connection, reason: str) -> None:
        """End an event-driven connection now (its TTL, or the drain time after stop())."""
        if conn.relay is not None:
            conn.relay.stop()
        self._end(conn, True, reason)

    def _serve(self, conn: Connection) -> None:
        """The greenlet of a client that holds a slot, from the grant to the end."""
        conn.running = True
        reason = "error"
        try:
            if self._stopping:
                reason = "shutdown"
            else:
                reason = self._use_slot(conn)
        except _Shutdown:
            reason = "shutdown"
        except Exception:
            log.exception("%s: unexpected error", format_address(conn.client))
            reason = "error"
        finally:
            self._end(conn, True, reason)
            conn.greenlet = None  # it goes on to serve other clients

    def _use_slot(self, conn: Connection) -> str:
        """With the slot held: hooks, backend connection, relay under the TTL."""
        if conn.activation is None:  # else it came from _activate: the backend was not ready
            self._activated(conn)
        while self._restart_reason is not None and not self._stopping:
            # Granted just before a restart was called for: the restart comes first.
            if self._last_holder():
                self._restart(conn)
                break
            self._parked += 1  # wait for it, slot in hand; the last holder out runs it
            try:
                self._restart_done.wait()
            finally:
                self._parked -= 1
        if self._stopping:
            return "shutdown"
        self._since_restart += 1
        if self.restart_every and self._since_restart >= self.restart_every:
            self._request_restart("count")
        if self.on_activate is not None:
            try:
                call_hook("on-activate", self.on_activate, conn, self.hook_timeout)
            except HookFailed as e:
                self.hook_failures += 1
                log.error("%s: %s", format_address(conn.client), e)
                return "hook-failed"

        backend = self._connect_backend(conn)
        if backend is None:
            return "backend-refused"
        conn.upstream = backend
        relay = Relay(conn.sock, backend, conn)
        self._ask_backend_close(relay)
        ttl = gevent.Timeout(self.timeout) if self.timeout else None
        try:
            if ttl is not None:
                ttl.start()
            return relay.run(self.finish_timeout, self.client_finish_timeout)
        except gevent.Timeout as t:
            if t is not ttl:
                raise
            return "ttl"
        finally:
            if ttl is not None:
                ttl.close()
            conn.outcome = relay

    def _activated(self, conn: Connection) -> None:
        self.activations += 1
        conn.activation = self.activations
        conn.activated_at = time.monotonic()
        self._active[conn] = None

    def _end(self, conn: Connection, held: bool, reason: str) -> None:
        """The one place a connection ends: close the backend side, then (with the slot still
        held) the TTL hook and a due restart, and release the slot. The client's side is
        closed and the log line written once the slot has passed on, off the next client's
        way in; or, when a hook or a restart is to run first, before them (so that the client
        is not kept waiting, and what they log comes after the line)."""
        conn.end = reason
        conn.ended_at = time.monotonic()
        if conn.relay is not None:
            conn.relay.stop()
            conn.relay = None
        conn.stop_watching()
        settled = False
        outcome = conn.outcome
        try:
            try:
                # Once nothing more can reach the backend, closing its socket is not part of
                # the exchange as the backend sees it: that waits until the slot has passed
                # on (_settle). Otherwise it is closed now, before anyone else is let in.
                if conn.upstream is not None and not (
                    reason == "closed" and outcome is not None and outcome.backend_done
                ):
                    graceful = outcome is not None and outcome.backend_finished
                    _close(conn.upstream, not (graceful and reason != "ttl"))
                    conn.upstream = None
            finally:
                if reason == "ttl" or (held and self._restart_reason is not None):
                    settled = True
                    self._settle(conn, held, reason)
            if reason == "ttl":
                if self.on_timeout is not None:
                    try:
                        call_hook("on-timeout", self.on_timeout, conn, self.hook_timeout)
                    except HookFailed as e:
                        self.hook_failures += 1
                        log.error("%s: %s", format_address(conn.client), e)
                if self.restart_on_timeout:
                    self._request_restart("ttl")
        except _Shutdown:
            pass  # the drain time is over: the slot is released below, nothing more runs
        finally:
            try:
                if (
                    held
                    and self._restart_reason is not None
                    and not self._stopping
                    and self._last_holder()
                ):
                    self._restart(conn)
            except _Shutdown:
                pass
            finally:
                if held:
                    self._active.pop(conn, None)
                    me = gevent.getcurrent()
                    # (A release from an event-loop callback has no greenlet to hand over.)
                    self._releasing = None if me is self._hub else me
                    try:
                        self.gate.release()
                    finally:
                        self._releasing = None
                self._connections.pop(conn, None)
                conn.ticket = None  # its wake-up refers back to conn: no cycle left to collect
                try:
                    if not settled:
                        self._settle(conn, held, reason)
                finally:
                    if not self._connections:
                        self._idle.set()

    def _settle(self, conn: Connection, held: bool, reason: str) -> None:
        """Close the client's side (and the backend's, if _end left it), and account for the
        connection (its log line)."""
        outcome, conn.outcome = conn.outcome, None
        try:
            if conn.upstream is not None:
                upstream, conn.upstream = conn.upstream, None
                _close(upstream, False)
            # A client cut while active learns it with a reset; one turned away before it got
            # a slot gets an orderly close; one still open after the backend closed is closed
            # once it has finished sending (see _Lingering).
            watch = outcome.client_watch if outcome is not None else None
            if reason == "closed" and outcome is not None and outcome.client_open:
                self._linger(conn.sock, watch, outcome.client_fin)
            else:
                if watch is not None:
                    recycle(watch)
                _close(conn.sock, held and reason in _ABORT_CLIENT)
        finally:
            self._account(conn, held, reason)

    def _account(self, conn: Connection, held: bool, reason: str) -> None:
        """Counters, the connection's log line and the observers, as soon as it has ended (so
        the line comes before anything a hook or restart logs)."""
        if held:
            self.served += 1
            self.last_end = reason
        self.ended[reason] = self.ended.get(reason, 0) + 1
        self.bytes_up_total += conn.bytes_up
        self.bytes_down_total += conn.bytes_down
        if reason != "not-allowed" or self._log_refusal(conn):
            if self.connection_log is not None:
                try:
                    self.connection_log(conn)
                except Exception:
                    log.exception("connection_log %r failed", self.connection_log)
            elif log.isEnabledFor(logging.INFO):
                log.info("%s", conn.describe(), extra={"connection": conn})
        for observe in self.end_observers:
            try:
                observe(conn)
            except Exception:
                log.exception("end observer %r failed", observe)

    def _allowed(self, host: str) -> bool:
        try:
            ip = ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            return False
        if ip.version == 6 and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped  # an IPv4 client of a dual-stack listener
        return any(ip in net for net in self.allow)

    def _log_refusal(self, conn: Connection) -> bool:
        """Refused clients may come in floods: log them at most once per interval."""
        if not self._refusal_log.ready():
            return False
        more = self._refusal_log.take_held_back()
        if more:
            log.warning(
                "%d more clients were not allowed in the last %.0fs",
                more,
                self._refusal_log.interval,
            )
        return True

    # -- accepting ---------------------------------------------------------------------------

    def init_socket(self) -> None:
        super().init_socket()
        # Accepted sockets inherit these from the listener (Linux does; elsewhere each client
        # is tuned on accept), which saves five system calls per client.
        _tune(self.socket)
        self._tune_clients = not _inherits_options(self.socket)

    def _accept_exhausted(self, error: OSError) -> None:
        # Out of descriptors: the client stays in the kernel's backlog while we pause
        # accepting; connections that end free descriptors, and accepting resumes. One line
        # per interval instead of a traceback per attempt.
        self.accept_failures += 1
        if self._accept_log.ready():
            more = self._accept_log.take_held_back()
            log.error(
                "cannot accept new clients: %s%s; they wait in the listen backlog. Raise the "
                "descriptor limit (ulimit -n, LimitNOFILE=) or lower --max-queue",
                error.strerror or error,
                f" ({more} more times in the last {self._accept_log.interval:.0f}s)"
                if more
                else "",
            )
        self.stop_accepting()
        self._timer = self.loop.timer(self._accept_delay)
        self._timer.start(self._start_accepting_if_started)
        self._accept_delay = min(self._accept_delay * 2, self.max_delay)

    # -- restarts ----------------------------------------------------------------------------

    def _last_holder(self) -> bool:
        # Every other slot is free or held by a connection parked until the restart is done.
        return self.gate.held - self._parked == 1

    def _request_restart(self, reason: str) -> None:
        """Call for a restart: no new activations until it is done (a barrier across slots)."""
        if self.restart is None:
            return
        if self._restart_reason is not None:
            if reason == "ttl":
                self._restart_reason = reason  # the more telling reason, for the command
            return
        self._restart_reason = reason
        self._restart_done = Event()
        self._sync_gate()

    def _restart(self, conn: Connection) -> None:
        """Run the restart while holding the last slot in use; retry until it succeeds (or
        tcplock stops), so no client is ever let in to a half-restarted backend."""
        delay = self.restart_retry_delay
        attempt = 0
        done = False
        try:
            while not self._stopping:
                attempt += 1
                reason = self._restart_reason
                log.warning(
                    "restarting backend (%s)%s",
                    _RESTART_WHY.get(reason, reason),
                    f", attempt {attempt}" if attempt > 1 else "",
                )
                started = time.monotonic()
                try:
                    self._run_restart_hook(conn, reason)
                    self._wait_ready()
                except HookFailed as e:
                    self.restart_failures += 1
                    log.error("restart failed: %s; retrying in %gs", e, delay)
                    gevent.sleep(delay)
                    delay = min(delay * 2, 30.0)
                    continue
                done = True
                break
        finally:
            # Done, or abandoned because tcplock is stopping: either way nobody may stay parked.
            self._restart_reason = None
            self._restart_done.set()
            self._sync_gate()
        if done:
            self.restarts += 1
            self._since_restart = 0
            log.warning(
                "backend restarted in %.2fs (restart #%d)",
                time.monotonic() - started,
                self.restarts,
            )
        else:
            log.warning("restart abandoned: tcplock is stopping")

    def _run_restart_hook(self, conn: Connection, reason: str) -> None:
        hook = self.restart
        if isinstance(hook, CommandHook):
            extra = {"TCPLOCK_RESTART_REASON": reason, "TCPLOCK_RESTARTS": str(self.restarts)}
            call_hook("restart", lambda c: hook(c, extra), conn, self.hook_timeout)
        else:
            call_hook("restart", hook, reason, self.hook_timeout)

    def _wait_ready(self) -> None:
        """After a restart: wait until the backend accepts connections again."""
        if not self.ready_timeout:
            return
        deadline = time.monotonic() + self.ready_timeout
        delay = 0.05
        while True:
            try:
                probe = self._connect_once(max(0.001, deadline - time.monotonic()))
            except OSError as e:
                if time.monotonic() + delay >= deadline:
                    raise HookFailed(
                        f"backend not accepting connections {self.ready_timeout:g}s after the "
                        f"restart ({e.strerror or e})"
                    ) from None
                gevent.sleep(delay)
                delay = min(delay * 2, 1.0)
                continue
            probe.close()
            return

    def _connect_backend(self, conn: Connection):
        """Connect to the backend, retrying with backoff for up to connect_timeout (it may be
        restarting). Returns the socket, or None once the time is up."""
        deadline = conn.connect_by or time.monotonic() + self.connect_timeout
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

    def _connect_now(self):
        """One attempt that does not wait, for the event-driven path: ``(socket, 0)`` if the
        backend accepted within the call (as on loopback), ``(socket, errno)`` if the
        connection is under way, ``(None, errno)`` if it failed or the name has yet to be
        resolved (the greenlet path does both)."""
        addrs = self._addrinfo
        if addrs is None:
            try:  # an address, not a name: nothing to look up, nothing to wait for
                addrs = self._addrinfo = _socket.getaddrinfo(
                    self.backend[0],
                    self.backend[1],
                    0,
                    _socket.SOCK_STREAM,
                    _socket.IPPROTO_TCP,
                    _socket.AI_NUMERICHOST,
                )
            except OSError:
                return None, 0
        family, type_, proto, _name, sockaddr = addrs[0]
        try:
            s = _socket.socket(family, type_ | _NONBLOCK, proto)
        except OSError as e:
            # Out of descriptors, say: the greenlet path retries within connect_timeout.
            return None, e.errno or errno.EMFILE
        try:
            if not _NONBLOCK:
                s.setblocking(False)
            err = s.connect_ex(sockaddr)
            if err in _IN_PROGRESS:
                if not _connected(s):
                    return s, err
                err = 0
            if err:
                s.close()
                return None, err
            _tune_backend(s, not self._peer_check.local(sockaddr))
        except BaseException:
            s.close()
            raise
        return s, 0

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
        for i, (family, type_, proto, _name, sockaddr) in enumerate(addrs):
            # A plain non-blocking socket, like the client's: the relay drives both from the
            # event loop.
            s = _socket.socket(family, type_ | _NONBLOCK, proto)
            try:
                if not _NONBLOCK:
                    s.setblocking(False)
                err = s.connect_ex(sockaddr)
                if err in _IN_PROGRESS:
                    if _connected(s):
                        err = 0
                    else:
                        wait_write(s.fileno(), timeout)
                        err = s.getsockopt(_socket.SOL_SOCKET, _socket.SO_ERROR)
                if err:
                    raise OSError(err, os.strerror(err))
                _tune_backend(s, not self._peer_check.local(sockaddr))
            except OSError as e:
                s.close()
                error = e
                continue
            except BaseException:
                s.close()
                raise
            if i and self._addrinfo is addrs:
                # Try the address that answered first next time (a name whose first address
                # refuses, such as localhost's ::1 for a server on 127.0.0.1 only).
                self._addrinfo = [addrs[i], *addrs[:i], *addrs[i + 1 :]]
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
        self._restart_done.set()  # connections parked for a restart: none is coming now
        if not self.closed:
            self.close()
        self.gate.cancel_all("shutdown")
        if not self._idle.wait(timeout):
            remaining = list(self._connections)
            log.warning("drain time over; cutting %d connection(s)", len(remaining))
            for conn in remaining:
                # One that has not started yet sees _stopping when it does.
                if not conn.running:
                    continue
                if conn.greenlet is not None:
                    conn.greenlet.kill(_Shutdown, block=False)
                elif conn.end is None:
                    self._cut(conn, "shutdown")
            self._idle.wait(5)
        workers, self._workers = self._workers, []
        for worker in workers:
            worker.kill(block=False)
        for lingering in list(self._lingering):
            lingering.close()
        self._stop_sweeper()
        self._peer_check.close()

    def _linger(self, sock, watch=None, fin: bool = False) -> None:
        """Keep a client open that may still send (see _Lingering); ``fin``: the backend's EOF
        has yet to be passed on to it."""
        try:
            if fin:
                sock.shutdown(_stdsocket.SHUT_WR)
            room = len(self._lingering) < self.max_lingering
        except OSError:
            room = False  # the client is gone already: nothing to linger for
        if not room:
            if watch is not None:
                recycle(watch)
            _close(sock, False)
        else:
            until = time.monotonic() + self.linger_time
            _Lingering(self._lingering, sock, watch, self.loop, until)


# Keepalive: a peer whose host vanished is noticed after about a minute of silence, not the
# kernel's default of over two hours.
_KEEPALIVE = tuple(
    (getattr(socket, name), value)
    for name, value in (("TCP_KEEPIDLE", 30), ("TCP_KEEPINTVL", 10), ("TCP_KEEPCNT", 3))
    if hasattr(socket, name)
)


def _tune(sock) -> None:
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        for option, value in _KEEPALIVE:
            sock.setsockopt(socket.IPPROTO_TCP, option, value)
    except OSError:
        pass  # the peer may already be gone; the relay will see it


def _tune_backend(sock, keepalive: bool = True) -> None:
    sock.setsockopt(_socket.IPPROTO_TCP, _socket.TCP_NODELAY, 1)
    # (Not on loopback: the kernel answers the probes for a backend that hangs, and closes
    # the connection of one that dies, so they could never tell anything.)
    if keepalive:
        sock.setsockopt(_socket.SOL_SOCKET, _socket.SO_KEEPALIVE, 1)


def _connected(sock) -> bool:
    """Whether a non-blocking connect has completed already, as it usually has on loopback
    (the handshake runs within the connect call): then there is nothing to wait for."""
    try:
        sock.getpeername()
    except OSError:
        return False
    return True


def _inherits_options(listener) -> bool:
    return sys.platform.startswith("linux") and listener.family in (
        socket.AF_INET,
        socket.AF_INET6,
    )


def _close(sock, abort: bool) -> None:
    try:
        if abort:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    except OSError:
        pass
    sock.close()


class _Lingering:
    """The last of a client whose slot passed on when the backend closed, before the client did.

    Its socket stays open, what it still sends is read and dropped, and it is closed once the
    client has finished sending, or by the lock's sweep once ``until`` (a monotonic time) has
    passed. Closing it at once would answer the client's next bytes with a reset, and a reset
    destroys whatever of the reply is still queued for it. ``watch`` is the relay's watcher of
    the socket, if it left one (None: a new one is made).
    """

    __slots__ = ("sock", "registry", "watch", "until")

    def __init__(self, registry: dict, sock, watch, loop, until: float) -> None:
        self.sock = sock
        self.registry = registry
        self.until = until
        # No read now: the client has seldom sent anything yet, and if it has (or has closed),
        # the watcher fires on the next turn of the loop. The registry is in order of
        # ``until``: the sweep closes from its front.
        registry[self] = None
        self.watch = watch if watch is not None else read_watcher(loop, sock.fileno())
        self.watch.start(self.readable)

    def readable(self) -> None:
        """Read what is there, and close once the client has finished."""
        reads = 4  # a client that floods is read again on the next turn
        while reads:
            reads -= 1
            try:
                if not self.sock.recv(65536):
                    break
            except BlockingIOError:
                return
            except OSError:
                break
        else:
            return
        self.close()

    def close(self) -> None:
        if self.sock is None:
            return
        recycle(self.watch)
        self.registry.pop(self, None)
        self.sock.close()
        self.sock = self.registry = self.watch = None


def _watch_departure(sock, ticket: Ticket):
    """Watch a waiting client for leaving, without reading its bytes.

    Runs in the event loop itself: when the socket turns readable, peek. Nothing there but EOF,
    or an error, means the client left; data means it is waiting with a request, which stays in
    the kernel's buffer for the backend. Readiness no longer says anything then, so this watch
    stops and the lock's once-a-second sweep (:meth:`TCPLock._sweep`) looks for a reset instead.
    """
    watcher = gevent.get_hub().loop.io(sock.fileno(), 1)

    def readable():
        try:
            data = sock.recv(1, _stdsocket.MSG_PEEK)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        watcher.stop()
        if not data:
            ticket.cancel("left-queue")

    watcher.start(readable)
    return watcher
