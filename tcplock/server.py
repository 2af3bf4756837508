"""TCPLock: a StreamServer that lets at most N clients through to a backend, in arrival order.

What it owns: accepting and admitting clients, the pool's membership (which backends are open
to the queue, and which stand by), pausing, the graceful stop, and what embedding code reads.
Watching waiting clients for departure, the sweep and lingering clients are
:mod:`tcplock.liveness`'s. A connection's own life, from its grant to its end, is
:class:`~tcplock.connection.Connection`'s; the backend and its restarts are
:class:`~tcplock.backend.Backend`'s; the queue is :class:`~tcplock.gate.Gate`'s.

The rule it keeps: every connection accepted is in :attr:`TCPLock.connections` until it has
ended, and :meth:`TCPLock.stop` returns only once none is left (or the drain time has cut
them).
"""

from __future__ import annotations

import _socket
import errno
import ipaddress
import logging
import sys
import time
from collections import deque
from contextlib import contextmanager
from typing import Callable, Dict, Iterator, List, Optional

import gevent
from gevent import socket
from gevent.event import Event
from gevent.server import StreamServer

from . import settings as _settings
from .backend import RESTARTING, STARTING, Backend, format_address
from .connection import END_REASONS, END_RULES, HEADER, HOLDING, QUEUED, Connection
from .gate import Gate
from .liveness import Liveness
from .relay import BUFSIZE

__all__ = ["TCPLock", "Connection", "END_REASONS", "format_address"]

log = logging.getLogger(__name__)

# accept() errors that mean "no descriptors or memory right now": back off and keep serving.
_EXHAUSTED = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})

Network = ipaddress._BaseNetwork

_ON_ITS_WAY = (STARTING, RESTARTING)  # a backend's states on its way to be ready

#: Whom a PROXY header is taken from when ``trusted_proxy`` is None.
LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))


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


#: The settings a backend may have its own value of, by library name.
_PER_BACKEND = frozenset(s.attr for s in _settings.PER_BACKEND.values())


def _check_backends(addresses) -> list:
    """The backends, as a list of ``((host, port), settings)``, from ``(host, port)`` or
    ``(host, port, {attr: value})`` items (a backend's own settings); ValueError naming
    backends."""
    try:
        items = list(addresses)
    except TypeError:
        raise ValueError(f"backends must be a list of (host, port), not {addresses!r}") from None
    if not items:
        raise ValueError("backends must name at least one (host, port)")
    checked = []
    for item in items:
        options = {}
        try:
            if isinstance(item, tuple) and len(item) == 3:
                host, port, options = item
            else:
                host, port = item
        except (TypeError, ValueError):
            raise ValueError(f"backends: {item!r} is not a (host, port) pair") from None
        if not isinstance(host, str) or not host or isinstance(port, bool):
            raise ValueError(f"backends: {item!r} is not a (host, port) pair")
        try:
            port = int(port)
        except (TypeError, ValueError):
            raise ValueError(f"backends: {item!r} has no valid port") from None
        if not 1 <= port <= 65535:
            raise ValueError(f"backends: port {port} is out of range (1-65535)")
        if any((host, port) == address for address, _ in checked):
            raise ValueError(f"backends: {host}:{port} is given twice")
        try:
            options = _settings.check_backend_options(options)
        except ValueError as e:
            raise ValueError(f"backends: {host}:{port}: {e}") from None
        checked.append(((host, port), options))
    return checked


class _Setting:
    """A setting of the lock as an attribute: checked by the settings table's rules whenever it
    is set, at construction or on a running lock. Reading it is a plain attribute read (this
    descriptor has no ``__get__``: the value lives in the instance)."""

    __slots__ = ("name",)

    def __set_name__(self, owner, name: str) -> None:
        self.name = name

    def __set__(self, lock, value) -> None:
        value = _settings.validate(self.name, value)
        if self.name == "spares" and "gate" in lock.__dict__:
            lock._check_spares(sum(1 for b in lock.backends if not b.leaving), value)
        lock.__dict__[self.name] = value
        if "gate" in lock.__dict__ and self.name in _PER_BACKEND:
            for backend in lock.backends:  # those without their own value take this one
                backend.apply_settings()
            lock.gate.resized()
        if self.name == "spares" and "gate" in lock.__dict__:
            lock._sync_gate()


class TCPLock(StreamServer):
    """A TCP proxy that relays at most ``slots`` clients to ``backend`` at a time, FIFO.

    The keyword arguments are the settings of :mod:`tcplock.settings` (the same rules as the
    command line; None switches a limit off where the command line takes ``off``); each is also
    an attribute that may be changed on a running lock. All durations are in seconds. Importing
    this class does not monkey-patch anything; it runs in any gevent program. Call :meth:`start`
    (non-blocking) or :meth:`serve_forever`, and :meth:`stop` to drain and close.
    """

    #: Listen backlog: a burst of clients waits in the kernel rather than being refused.
    backlog = 1024
    #: Clients accepted per turn of the event loop. One: the listener stays readable while
    #: more are waiting, so the loop comes back for them, and no accept() is made only to find
    #: the backlog empty (see BENCHMARKS.md).
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
    #: How many samples :meth:`history` keeps: one per sweep (sweep_interval), so five minutes.
    history_length = 300
    #: Called with each connection that has ended, in place of its INFO line through
    #: :mod:`logging`. None: ``log.info``.
    connection_log: Optional[Callable[[Connection], object]] = None
    #: For a backend on loopback (Linux): once it has sent its FIN, ask the kernel whether it
    #: closed the connection for good; if so the slot passes on without waiting for the client
    #: (see client_finish_timeout). A backend that only half-closed is still waited for.
    check_backend_close = True

    for _name in _settings.LIBRARY:
        locals()[_name] = _Setting()
        locals()[_name].__set_name__(None, _name)
    del _name

    def __init__(self, listen=("127.0.0.1", 9000), backend=None, *, backends=None, **options):
        unknown = sorted(set(options) - set(_settings.LIBRARY))
        if unknown:
            raise TypeError(f"TCPLock() got an unexpected keyword argument {unknown[0]!r}")
        values = {}
        for name in _settings.LIBRARY:
            values[name] = _settings.validate(
                name, options[name] if name in options else _settings.default(name)
            )
        _settings.check_together(values)
        super().__init__(tuple(listen))
        self.__dict__.update(values)
        if backend is not None and backends is not None:
            raise ValueError("give backend (one) or backends (a pool), not both")
        if backends is None:
            backends = [("localhost", 8100) if backend is None else backend]
        addresses = _check_backends(backends)
        self._check_spares(len(addresses))
        #: The backends clients are relayed to, in the order given: a pool behind one queue.
        self.backends: List[Backend] = [
            Backend(address, self, i, options) for i, (address, options) in enumerate(addresses, 1)
        ]
        self.gate = Gate(units=self.backends)
        self._leaving = 0  # backends leaving the pool (see set_backends)
        self._leavers = set()  # the stops of process groups of backends that left the pool
        #: accept() calls that failed for lack of descriptors or memory.
        self.accept_failures = 0
        self._accept_delay = self.min_delay
        self._accept_log = _RateLimit(10.0)
        self._refusal_log = _RateLimit(10.0)
        self._header_log = _RateLimit(10.0)
        #: Connections still sending their PROXY header (the ``header`` state).
        self._reading: Dict[Connection, None] = {}
        #: Activations so far (slots granted), each client once: one sent back to the queue by
        #: a backend that refused it is counted again only when it is let through again.
        self.activations = 0
        self._activation_numbers = 0
        #: The activation numbers of clients sent back to the queue: they keep theirs.
        self._requeued: Dict[Connection, int] = {}
        #: Connections that held a slot and have finished.
        self.served = 0
        #: How the most recent connection that held a slot ended.
        self.last_end: Optional[str] = None
        #: Finished connections by end reason, and their bytes in each direction.
        self.ended: Dict[str, int] = {}
        self.bytes_up_total = 0
        self.bytes_down_total = 0
        #: Hook calls (on_activate, on_timeout) that failed.
        self.hook_failures = 0
        #: Callables given each connection as it ends (after its log line); for metrics.
        self.end_observers: List[Callable[[Connection], object]] = []
        self.started_at = time.monotonic()
        self._connections: Dict[Connection, None] = {}  # insertion-ordered set
        self._active: Dict[Connection, None] = {}
        self._holders: Dict[Connection, Event] = {}
        self._idle = Event()
        self._idle.set()
        #: The sweep and the lingering clients.
        self.liveness = Liveness(self)
        # The buffer of every connection's flat path (see Connection._relay): a read is sent
        # on whole before its callback returns, or handed to a Relay with what is left of it.
        self._chunk = memoryview(bytearray(BUFSIZE))
        self._numbers = 0
        self._stopping = False
        self._activating = False
        self._operator_paused = False
        self._tune_clients = True
        self._samples = deque(maxlen=self.history_length)  # (when, queued, active, rate)
        self._sampled = (self.started_at, 0)  # when the last sample was taken, and _numbers then

    # -- what embedding code reads ---------------------------------------------------------------

    @property
    def backend(self):
        """Where clients are relayed to, as (host, port)."""
        return self.backends[0].address

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
        """Whether a restart is due or running on any backend (that backend takes no new
        client meanwhile)."""
        return any(b.restart_reason is not None for b in self.backends)

    @property
    def restarts(self) -> int:
        """Restarts done."""
        return sum(b.restarts for b in self.backends)

    @property
    def restart_failures(self) -> int:
        """Restart attempts that failed."""
        return sum(b.restart_failures for b in self.backends)

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
        """Open or close each backend to the queue by its state, and move the queue."""
        if self._leaving:
            self._retire()
        self._update_open()
        if self._operator_paused:
            self.gate.pause()
        else:
            self.gate.resume()

    def _check_spares(self, count: int, spares: Optional[int] = None) -> None:
        spares = self.spares if spares is None else spares
        if spares and self.backend_cmd is None:
            raise ValueError("spares needs backend_cmd (backends tcplock runs and restarts)")
        if spares >= count:
            raise ValueError(
                f"spares ({spares}) must be fewer than the backends ({count}): at least one "
                "takes clients"
            )

    def _standby_wanted(self, backend: Backend) -> bool:
        """Whether ``backend``, ready now, is to be a standby: the others in service already
        fill the pool less its ``spares``."""
        if not self.spares:
            return False
        pool = [b for b in self.backends if not b.leaving]
        serving = [
            b for b in pool if b is not backend and b.ready and not b.standby and not b.draining
        ]
        return len(serving) >= len(pool) - self.spares

    def _standby_coming(self, backend: Backend) -> bool:
        """Whether ``backend``'s restart for its count (``restart_every``) is to wait: no
        standby is ready to take its place, but one is on its way (another backend of the pool
        is starting or restarting). Until it is ready, ``backend`` keeps taking clients, and
        its restart is called for at its first client after that, rather than leaving the pool
        a backend short meanwhile (backends in service that take clients in turn reach their
        count together, and one standby covers one of them). With no standby coming, the
        restart is not put off."""
        if not self.spares:
            return False
        others = [b for b in self.backends if b is not backend and not b.leaving]
        if any(b.standby and not b.draining for b in others):
            return False
        return any(b.operational in _ON_ITS_WAY for b in others)

    def _replace_with_standbys(self) -> None:
        """A ready standby takes the place, at once, of each backend out of service (restarting,
        down, drained) while fewer than the pool less its ``spares`` take clients."""
        pool = [b for b in self.backends if not b.leaving]
        room = len(pool) - self.spares
        serving = sum(1 for b in pool if b.ready and not b.standby and not b.draining)
        for b in pool:
            if serving >= room:
                return
            if b.standby and b.ready and not b.draining:
                b.note("replaces one out of service", standby=False)
                log.warning("backend %s (standby) takes clients now", b.label)
                serving += 1
        for b in reversed(pool):  # more in service than that (spares raised): the last stand by
            if serving <= room:
                return
            if b.ready and not b.standby and not b.draining:
                b.note("spares raised", standby=True)
                log.warning("backend %s finishes its clients and stands by", b.label)
                serving -= 1

    def _update_open(self) -> None:
        # A backend takes new clients unless it drains, restarts or stands by, or awaits its
        # first check or a check of it runs, or it is down while another is up (with none up,
        # every backend is tried, so that a client fails as it would with one).
        if self.spares:
            self._replace_with_standbys()
        backends = self.backends
        any_up = any(b.up and not b.draining and not b.leaving for b in backends)
        for b in backends:
            b.open = (
                not b.draining
                and not b.leaving
                and not b.standby
                and b.restart_reason is None
                and not b.checking
                and (b.up or not any_up)
            )

    def _backend_failed(self, backend: Backend, error) -> bool:
        """Connecting to ``backend`` failed: it is down. True if another backend is up to take
        the client instead (the connection goes back to the head of the queue)."""
        backend.mark_down(error)
        self._update_open()
        return any(b.open and b.up for b in self.backends if b is not backend)

    def _requeue(
        self, conn: Connection, backend: Backend, activation: int, counted: bool = True
    ) -> None:
        """The lock's part of sending a granted client back to the head of the queue (see
        :meth:`Connection._requeue`): its slot of ``backend`` given back, keeping its place,
        and its grant not counted (it keeps its ``activation`` number for the next), nor its
        use of ``backend`` if it was ``counted``."""
        if counted:
            backend.activations -= 1
            backend.since_restart -= 1
        self.activations -= 1
        requeued = self._requeued
        requeued[conn] = activation
        self._active.pop(conn, None)
        # Behind those sent back before it that were let in before it (in queue order).
        self.gate.requeue(conn.ticket, lambda t: requeued.get(t, activation) < activation)
        self.gate.release(backend)
        backend.reconcile()
        if backend.leaving:
            self._retire()

    def set_backends(self, addresses) -> None:
        """Make the pool these backends, ``[(host, port), ...]``, in this order (the same rules
        as ``backends=``), on a running lock. One not in the pool joins it at once and takes
        clients from the queue. One left out takes no new client (state ``leaving``), finishes
        the clients it has (and a restart of it under way), and then leaves the pool, its
        status and its metrics; named again before that, it stays. The queue keeps its order
        throughout; no waiting client and no active connection is touched."""
        addresses = _check_backends(addresses)
        self._check_spares(len(addresses))
        current = {b.address: b for b in self.backends}
        pool, joined = [], []
        for index, (address, options) in enumerate(addresses, 1):
            b = current.pop(address, None)
            if b is None:
                b = Backend(address, self, index, options)
                joined.append(b)
                log.warning("backend %s joins the pool", b.label)
            elif b.leaving:
                b.leaving = False
                b.note("named again")
                self._leaving -= 1
                log.warning("backend %s stays in the pool", b.label)
            elif b.settings != options:
                b.settings = options
                b.apply_settings()
            b.index = index
            pool.append(b)
        for b in current.values():  # after the others: lock.backend is a backend that stays
            if not b.leaving:
                b.leaving = True
                b.note("left out")
                self._leaving += 1
                log.warning(
                    "backend %s leaves the pool once its %d client(s) have finished",
                    b.label,
                    b.held,
                )
            pool.append(b)
        self.backends = pool
        self.gate.units = pool
        self._sync_gate()
        if self.started:
            for b in joined:  # a backend tcplock runs: its command starts now (a no-op for others)
                b.start_process()

    def _retire(self) -> None:
        """Take the leaving backends that have finished out of the pool."""
        gone = [b for b in self.backends if b.leaving and not b.held and b.restart_step is None]
        if not gone:
            return
        self.backends = [b for b in self.backends if b not in gone]
        self.gate.units = self.backends
        self._leaving -= len(gone)
        for b in gone:
            b.close()
            log.warning("backend %s has left the pool", b.label)
            if b.process is not None:  # a backend tcplock runs: its process group goes too
                stopping = gevent.spawn(b.process.stop, self.stop_timeout)
                self._leavers.add(stopping)
                stopping.link(self._leavers.discard)

    def backend_named(self, address) -> Backend:
        """The backend at ``address`` (``"host:port"`` or a tuple); KeyError if none."""
        for b in self.backends:
            if address == b.label or tuple(address) == b.address:
                return b
        raise KeyError(address)

    def drain_backend(self, address) -> Backend:
        """Let one backend finish its clients and take no new ones (state ``draining``)."""
        b = self.backend_named(address)
        if not b.draining:
            b.draining = True
            b.note("drain request")
            log.warning("backend %s drains: no new clients until enabled", b.label)
            self._sync_gate()
        return b

    def enable_backend(self, address) -> Backend:
        """Undo :meth:`drain_backend`."""
        b = self.backend_named(address)
        if b.draining:
            b.draining = False
            b.note("enable request", standby=self._standby_wanted(b))
            log.warning("backend %s enabled", b.label)
            self._sync_gate()
        return b

    def status(self) -> dict:
        """A snapshot of the lock, as plain data (what ``GET /status`` returns)."""
        from . import __version__

        now = time.monotonic()
        oldest = next((c for c in self._connections if c.state is QUEUED), None)
        active = []
        for c in self._active:
            entry = c.fields()
            entry["seconds"] = entry["active_seconds"]
            active.append(entry)
        backends = [b.status() for b in self.backends]
        return {
            "version": __version__,
            "listen": format_address((self.server_host, self.server_port))
            if not self.closed
            else None,
            "backend": format_address(self.backend),
            "backends": backends,
            "slots": self.slots,
            "queued": self.queued,
            "oldest_wait_seconds": round(now - oldest.queued_at, 3) if oldest else 0.0,
            "active": active,
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

    def history(self) -> dict:
        """The last minutes of the lock, one sample per second, oldest first, as plain data
        (what ``GET /history`` returns): for each sample, how many seconds ago it was taken
        (``age_seconds``), the clients waiting then (``queued``), the connections holding a
        slot (``active``), and how many connections arrived per second since the sample
        before (``connections_per_second``)."""
        now = time.monotonic()
        samples = list(self._samples)
        return {
            "age_seconds": [round(now - s[0], 2) for s in samples],
            "queued": [s[1] for s in samples],
            "active": [s[2] for s in samples],
            "connections_per_second": [round(s[3], 2) for s in samples],
        }

    def _sample(self) -> None:
        now = time.monotonic()
        then, arrived = self._sampled
        rate = (self._numbers - arrived) / (now - then) if now > then else 0.0
        self._sampled = (now, self._numbers)
        self._samples.append((now, self.gate.waiting, len(self._active), rate))

    @contextmanager
    def slot(self, timeout: Optional[float] = None) -> Iterator[Connection]:
        """Hold a slot in this greenlet, for in-process work on the backend (maintenance
        between two clients, say)::

            with lock.slot(timeout=30):
                ...  # no client is relayed through this slot meanwhile

        The caller waits in the same FIFO queue as the TCP clients, and while it holds the slot
        it is listed in :attr:`active` (and ``/status``) as ``in-process``. A restart that is
        due runs before it gets the slot. Raises TimeoutError if no slot came within
        ``timeout`` seconds, RuntimeError if tcplock is stopping.
        """
        if self._stopping:
            raise RuntimeError("tcplock is stopping: no slot to be had")
        conn = self._admit(None, None)
        ready = self._holders[conn] = Event()
        conn.enqueue(timeout)
        try:
            ready.wait()
            if conn.state is not HOLDING:
                if conn.end == "queue-timeout":
                    raise TimeoutError(f"no slot within {timeout:g}s")
                raise RuntimeError(f"no slot: {conn.end}")
            yield conn
        finally:
            self._holders.pop(conn, None)
            if conn.state is QUEUED:
                conn.ticket.cancel("left-queue")
            else:
                conn.finish("closed")

    def _holding(self, conn: Connection) -> None:
        ready = self._holders.get(conn)
        if ready is not None:
            ready.set()

    # -- admission: from accept to the queue -----------------------------------------------------

    # A client's life starts in the event loop: do_read accepts it, do_handle admits it. A
    # client that has to wait gets no greenlet: its place in the queue is its connection (a
    # Ticket), and the loop watches its socket for departure (or, once it has sent data, the
    # sweep looks for a reset). From its grant on, the Connection drives itself from
    # event-loop callbacks; only what may block (a hook, a restart, a name lookup) runs as a
    # step in a greenlet.

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

    def _do_read(self) -> None:
        # The listener's watcher: one client per turn (max_accept), accepted and admitted here
        # rather than through BaseServer's loop of do_read and do_handle (it has no pool to be
        # full, and nothing here blocks). An error accepting or admitting is gevent's to
        # handle, as there: logged, and accepting paused a while.
        try:
            accepted = self.do_read()
            if accepted is None:
                return
            self.delay = self.min_delay
            self.do_handle(*accepted)
        except Exception as e:
            self.loop.handle_error(self, type(e), e, e.__traceback__)
            if self.is_fatal_error(e):
                self.close()
                sys.stderr.write(f"ERROR: {self} failed with {str(e) or repr(e)}\n")
                return
            if self.delay >= 0:
                self.stop_accepting()
                self._timer = self.loop.timer(self.delay)
                self._timer.start(self._start_accepting_if_started)
                self.delay = min(self.max_delay, self.delay * 2)

    def _admit(self, sock, address, state: str = QUEUED) -> Connection:
        self._numbers += 1
        conn = Connection(self, sock, address, self._numbers, state)
        self._connections[conn] = None
        self._idle.clear()
        return conn

    def do_handle(self, sock, address) -> None:
        if self._tune_clients:  # (where accepted sockets do not inherit the listener's options)
            _tune(sock)
        if self.accept_proxy and not self._stopping:
            # Reading the PROXY header is the connection's first state: no place in the queue
            # meanwhile, but a descriptor, so their number is bounded (_headers_full).
            conn = self._admit(sock, address, HEADER)
            trusted = self.trusted_proxy
            if not _within(address[0], LOOPBACK if trusted is None else trusted):
                return conn.finish("untrusted-proxy")
            if self._headers_full():
                return conn.finish("queue-full")
            self._reading[conn] = None
            return conn.read_header()
        return self._let_in(self._admit(sock, address))

    def _let_in(self, conn: Connection) -> None:
        """Admission by the client's address (the one in its PROXY header, if it sent one),
        then the queue."""
        if self._reading:
            self._reading.pop(conn, None)
        if self._stopping:
            return conn.finish("shutdown")
        if self.allow is not None and not self._allowed(conn.client[0]):
            return conn.finish("not-allowed")
        # Into the queue (or straight to a slot), unless the queue is full.
        max_queue = self.max_queue
        if max_queue is not None and self.gate.waiting >= max_queue and self.gate.would_wait():
            return conn.finish("queue-full")
        return conn.enqueue(self.queue_timeout)

    def _headers_full(self) -> bool:
        """Whether a new connection may not start on its header: each one still sending its
        header will take a free slot or a place in the queue, and holds a descriptor meanwhile,
        so those and the waiting clients together stay within ``max_queue`` and the free
        slots (the descriptor budget the command's default ``max_queue`` comes from)."""
        max_queue = self.max_queue
        if max_queue is None:
            return False
        gate = self.gate
        free = max(0, gate.slots - gate.held)
        return len(self._reading) + gate.waiting >= max_queue + free

    def _grant(self, conn: Connection) -> None:
        """The gate granted ``conn`` its slot: start it."""
        if self._activating:
            # Granted by a connection that ended while being granted: start this one on the
            # next turn, not inside that one's call (a queue of such ends would recurse through
            # the whole queue).
            self.loop.run_callback(self._grant, conn)
            return
        self._activating = True
        try:
            conn.grant(conn.unit)
        except Exception:
            log.exception("%s: unexpected error", conn.label)
            conn.finish("error")
        finally:
            self._activating = False

    def _allowed(self, host: str) -> bool:
        return _within(host, self.allow)

    # -- what a connection calls back --------------------------------------------------------

    def _activated(self, conn: Connection) -> int:
        """``conn`` holds a slot now: listed as active; its activation number."""
        self.activations += 1
        number = self._requeued.pop(conn, None)
        if number is None:
            self._activation_numbers += 1
            number = self._activation_numbers
        self._active[conn] = None
        return number

    def _release(self, conn: Connection) -> None:
        """Give the connection's slot back (to the head of the queue): once per grant (the
        connection's end calls it once)."""
        self._active.pop(conn, None)
        self.gate.release(conn.backend)
        if conn.backend.leaving:
            self._retire()

    def _forget(self, conn: Connection) -> None:
        """``conn`` has ended: no longer one of the lock's."""
        self._connections.pop(conn, None)
        if self._requeued:
            self._requeued.pop(conn, None)
        if self._reading:
            self._reading.pop(conn, None)
        if not self._connections:
            self._idle.set()

    def _count(self, conn: Connection) -> None:
        """The counters of a connection that has ended: before its slot passes on, so that
        the next client's hooks see it counted."""
        reason = conn.end
        if conn.activation is not None:
            self.served += 1
            self.last_end = conn.backend.last_end = reason
        self.ended[reason] = self.ended.get(reason, 0) + 1
        self.bytes_up_total += conn.bytes_up
        self.bytes_down_total += conn.bytes_down

    def _account(self, conn: Connection, counted: bool) -> None:
        """The connection's counters (unless ``counted``), its log line and the observers."""
        if not counted:
            self._count(conn)
        rule = END_RULES[conn.end]
        if not rule.limited or self._log_refusal():
            if self.connection_log is not None:
                try:
                    self.connection_log(conn)
                except Exception:
                    log.exception("connection_log %r failed", self.connection_log)
            elif log.isEnabledFor(rule.level):
                log.log(rule.level, "%s", conn.describe(), extra={"connection": conn})
        for observe in self.end_observers:
            try:
                observe(conn)
            except Exception:
                log.exception("end observer %r failed", observe)

    def _log_refusal(self) -> bool:
        """Refused clients may come in floods: log them at most once per interval."""
        if not self._refusal_log.ready():
            return False
        more = self._refusal_log.take_held_back()
        if more:
            log.warning(
                "%d more clients were turned away by address in the last %.0fs",
                more,
                self._refusal_log.interval,
            )
        return True

    # -- the server's life -----------------------------------------------------------------------

    def start(self) -> None:
        if self._stopping:
            raise RuntimeError("this TCPLock was stopped; make a new one to serve again")
        super().start()
        self.liveness.start()
        for backend in self.backends:  # clients wait in the queue until one is ready
            backend.start_process()

    def close(self) -> None:
        """Stop listening. Connections already accepted go on (stop() drains them); the sweep
        goes on while there are any, or lingering clients to close in time."""
        super().close()
        if not self._connections and not self.liveness.lingering:
            self.liveness.stop()

    def do_close(self, *args) -> None:
        pass  # every connection is closed by its own end

    def handle(self, sock, address) -> None:  # pragma: no cover - StreamServer's hook, unused
        raise NotImplementedError("TCPLock admits clients in do_handle")

    def stop(self, timeout: Optional[float] = None) -> None:
        """Stop gracefully: stop accepting, close queued clients at once, give active ones
        ``timeout`` seconds (default :attr:`drain_timeout`) to finish, then cut them. A
        stopped lock cannot be started again."""
        if timeout is None:
            timeout = self.drain_timeout
        self._stopping = True
        if not self.closed:
            self.close()
        self.gate.cancel_all("shutdown")
        for conn in list(self._reading):  # not in the queue yet: nothing to wait for
            conn.finish("shutdown")
        for backend in self.backends:
            if backend.process is not None and backend.restart_step is not None:
                backend.restart_step.kill()  # a backend tcplock runs is stopped, not restarted
        deadline = time.monotonic() + timeout
        if not self._idle.wait(timeout):
            remaining = list(self._connections)
            log.warning("drain time over; cutting %d connection(s)", len(remaining))
            for conn in remaining:
                conn.abort()
            self._idle.wait(5)
        # A restart that no connection holds (its last client was sent to another backend)
        # gets what is left of the drain time, then is cut like the others.
        if not self._restarts_over(deadline):
            for backend in self.backends:
                if backend.restart_step is not None:
                    backend.restart_step.kill()
            self._restarts_over(time.monotonic() + 5)
        self.liveness.close_all()
        self.liveness.stop()
        for backend in self.backends:
            backend.close()
        # The backends tcplock runs, all at once: each gets stop_timeout after SIGTERM, and
        # this returns only once every one of their processes is gone.
        stopping = [
            gevent.spawn(b.process.stop, self.stop_timeout)
            for b in self.backends
            if b.process is not None
        ]
        gevent.joinall(stopping + list(self._leavers))  # and those of backends that left

    def _restarts_over(self, deadline: float) -> bool:
        while any(b.restart_step is not None for b in self.backends):
            if time.monotonic() >= deadline:
                return False
            gevent.sleep(0.05)
        return True

    # -- accepting ---------------------------------------------------------------------------

    def init_socket(self) -> None:
        super().init_socket()
        # Accepted sockets inherit these from the listener (Linux does; elsewhere each client
        # is tuned on accept), which saves five system calls per client.
        _tune(self.socket)
        self._tune_clients = not _inherits_options(self.socket)

    def _accept_exhausted(self, error: OSError) -> None:
        accept_exhausted(
            self,
            error,
            "cannot accept new clients: %s; they wait in the listen backlog. Raise the "
            "descriptor limit (ulimit -n, LimitNOFILE=) or lower --max-queue",
        )


def accept_exhausted(server: StreamServer, error: OSError, message: str) -> None:
    """``accept()`` on ``server`` failed for lack of descriptors or memory (an errno in
    ``_EXHAUSTED``): pause accepting, so that whoever connects waits in the kernel's backlog,
    for ``server._accept_delay`` (doubled each time, up to ``max_delay``; the server resets it
    on a successful accept); connections that end free descriptors, and accepting resumes.
    ``message`` (with one ``%s`` for the reason) is logged at most once per interval of
    ``server._accept_log`` (a :class:`_RateLimit`), with a count of the times held back,
    instead of a traceback per attempt. ``server.accept_failures`` counts them all."""
    server.accept_failures += 1
    limit = server._accept_log
    if limit.ready():
        more = limit.take_held_back()
        reason = error.strerror or str(error)
        if more:
            reason += f" ({more} more times in the last {limit.interval:.0f}s)"
        log.error(message, reason)
    server.stop_accepting()
    server._timer = server.loop.timer(server._accept_delay)
    server._timer.start(server._start_accepting_if_started)
    server._accept_delay = min(server._accept_delay * 2, server.max_delay)


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


def _within(host: str, networks) -> bool:
    """Whether the address ``host`` is in one of ``networks``."""
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # an IPv4 client of a dual-stack listener
    return any(ip in net for net in networks)


def _inherits_options(listener) -> bool:
    return sys.platform.startswith("linux") and listener.family in (
        socket.AF_INET,
        socket.AF_INET6,
    )
