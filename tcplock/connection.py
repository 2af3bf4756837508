"""A client connection: its states, from the queue to its end.

What it owns: the life of one connection as a state machine driven by the event loop::

    [header] -> queued -> granted -> [hook] -> connecting -> relaying -> ending -> ended

Each state has at most one timer and one watcher (or one step: a blocking call in a greenlet of
its own, see :mod:`tcplock.steps`), and leaving a state stops them; ``relaying`` has a watcher
per socket, as it relays a short exchange itself and hands anything else to a
:class:`~tcplock.relay.Relay` (see ``_relay``). Every way out leads to
:meth:`Connection.finish`, once. The rule it keeps: a slot is released exactly once, and only
after tcplock has finished with the backend side (the TTL hook and a due restart run while the
slot is still held), whatever ends the connection.

Its transitions are one table, :data:`TRANSITIONS` (state x event -> next state): a move the
table does not name is a bug, and raises :class:`IllegalTransition`. How each end reason ends
is another, :data:`END_RULES`: how each side's socket is closed, whether the end calls for a
restart, how its line is logged. Only a connection sets its own state and fields; the lock
keeps what is the lock's (membership, the gate, counters, the log line).

A connection is handed what it needs (its lock's settings and counters, the gate through the
lock, its backend); it never imports the server.
"""

from __future__ import annotations

import _socket
import logging
import struct
import time
from functools import partial
from typing import Callable, Dict, NamedTuple, Optional

from gevent import GreenletExit

from .backend import Connect, format_address
from .gate import Ticket
from .hooks import HookFailed, call_hook
from .liveness import watch_departure
from .proxyproto import HeaderError, HeaderReader, make_v1, make_v2
from .relay import BACKEND, BUFSIZE, CLIENT, Ended, Relay, read_watcher, recycle
from .steps import Step

__all__ = [
    "Connection",
    "END_REASONS",
    "END_RULES",
    "EndRule",
    "IllegalTransition",
    "STATES",
    "TRANSITIONS",
]

log = logging.getLogger("tcplock.server")

HEADER = "header"  # accept_proxy: reading the PROXY header, before admission to the queue
QUEUED = "queued"
GRANTED = "granted"
HOOK = "hook"
CONNECTING = "connecting"
RELAYING = "relaying"
HOLDING = "holding"  # an in-process holder (TCPLock.slot) using its slot
ENDING = "ending"  # ended; the TTL hook or a restart may still run with the slot held
ENDED = "ended"
STATES = (HEADER, QUEUED, GRANTED, HOOK, CONNECTING, RELAYING, HOLDING, ENDING, ENDED)

#: state -> {event: next state}. Every state but ``ended`` may ``end``.
TRANSITIONS: Dict[str, Dict[str, str]] = {
    HEADER: {"header-read": QUEUED, "end": ENDING},
    QUEUED: {"grant": GRANTED, "end": ENDING},
    GRANTED: {"requeue": QUEUED, "hold": HOLDING, "hook": HOOK, "connect": CONNECTING,
              "end": ENDING},
    HOOK: {"connect": CONNECTING, "end": ENDING},
    CONNECTING: {"relay": RELAYING, "requeue": QUEUED, "end": ENDING},
    RELAYING: {"end": ENDING},
    HOLDING: {"end": ENDING},
    ENDING: {"forget": ENDED},
    ENDED: {},
}  # fmt: skip


class IllegalTransition(RuntimeError):
    """A connection was moved where :data:`TRANSITIONS` does not lead: a bug in tcplock."""


class EndRule(NamedTuple):
    """How one end reason ends a connection."""

    #: The client's socket, if the connection held a slot: "fin" (an orderly close; it
    #: lingers if the backend closed first and it may still be sending) or "reset". A client
    #: that never held a slot always gets "fin".
    client: str
    #: The backend's socket, if one was connected: "fin" or "reset".
    backend: str
    #: Whether this end calls for a restart of its backend (with ``restart_on_timeout``), and
    #: runs the ``on_timeout`` hook first.
    timeout: bool
    #: The level of its log line, and whether such lines are rate-limited (refusals by
    #: address, which may come in floods).
    level: int
    limited: bool


_FIN, _RESET = "fin", "reset"
_INFO = logging.INFO

#: Every way a connection can end (its ``end=`` field), and how. Any end may be followed by a
#: restart that was due already (see Connection._wind_up); ``shutdown`` starts none.
END_RULES: Dict[str, EndRule] = {
    "closed": EndRule(_FIN, _FIN, False, _INFO, False),  # both sides finished normally
    # the client went away abruptly while active (the backend had a FIN, then is reset)
    "client-reset": EndRule(_FIN, _RESET, False, _INFO, False),
    "backend-reset": EndRule(_RESET, _RESET, False, _INFO, False),  # the backend went away
    "ttl": EndRule(_RESET, _RESET, True, _INFO, False),  # reached its maximum lifetime
    # the client kept sending after the backend closed: both cut, so a cut upload never
    # looks complete
    "client-finish-timeout": EndRule(_RESET, _RESET, False, _INFO, False),
    "left-queue": EndRule(_FIN, _RESET, False, _INFO, False),  # went away while waiting
    "queue-timeout": EndRule(_FIN, _RESET, False, _INFO, False),  # waited past queue_timeout
    # max_queue clients were already waiting (see also TCPLock._headers_full)
    "queue-full": EndRule(_FIN, _RESET, False, _INFO, False),
    "not-allowed": EndRule(_FIN, _RESET, False, _INFO, True),  # not in the allow list
    # accept_proxy: the peer is not in trusted_proxy; nothing was read
    "untrusted-proxy": EndRule(_FIN, _RESET, False, _INFO, True),
    # accept_proxy: no valid PROXY header within proxy_header_timeout
    "bad-proxy-header": EndRule(_FIN, _RESET, False, _INFO, False),
    # no backend connection could be made within connect_timeout
    "backend-refused": EndRule(_FIN, _RESET, False, _INFO, False),
    # the on_activate hook failed; the client never reached the backend
    "hook-failed": EndRule(_FIN, _RESET, False, _INFO, False),
    "shutdown": EndRule(_RESET, _RESET, False, _INFO, False),  # tcplock was stopping
    "error": EndRule(_RESET, _RESET, False, _INFO, False),  # a bug (logged with a traceback)
}

#: Every way a connection can end, as written in the log line's ``end=`` field.
END_REASONS = tuple(END_RULES)

_LINGER_RESET = struct.pack("ii", 1, 0)

_BOTH_DONE = Ended()  # how the common exchange ends: both sides closed
_ASKS = 1  # the backend is on loopback and its close may be asked about (peer.py)
_BACKEND_FIN = 2  # the backend's EOF has been read and passed on to the client


def close_socket(sock, abort: bool) -> None:
    """Close ``sock``; with ``abort``, with a reset instead of an orderly FIN."""
    try:
        if abort:
            sock.setsockopt(_socket.SOL_SOCKET, _socket.SO_LINGER, _LINGER_RESET)
    except OSError:
        pass
    sock.close()


class Connection(Ticket):
    """One client connection, as hooks and embedding code see it.

    It is its own place in the gate's queue (a :class:`~tcplock.gate.Ticket`: the gate calls
    its :meth:`wake`).

    Times are ``time.monotonic()`` values; the ``*_seconds`` properties are what to read.
    """

    __slots__ = (
        "lock", "id", "client", "sock", "upstream", "backend", "state", "activation",
        "queued_at", "activated_at", "ended_at", "bytes_up", "bytes_down", "end", "ticket",
        "watch", "timer", "relay", "pending", "peer", "destination", "bwatch", "recheck", "flat",
        "baddr",
    )  # fmt: skip

    def __init__(self, lock, sock, client, number: int, state: str = QUEUED) -> None:
        self.lock = lock
        #: A sequence number, in accept order, starting at 1.
        self.id = number
        #: The client's address tuple, as ``socket.getpeername()`` gives it (None for an
        #: in-process holder, see :meth:`TCPLock.slot`); with ``accept_proxy``, the source
        #: address of its PROXY header, once read, as ``(host, port)``.
        self.client = client
        #: Where the connection itself came from: the same as ``client``, unless a PROXY
        #: header gave the client's address (then this is the proxy's).
        self.peer = client
        #: The address the client connected to, as a PROXY header gave it; None: this
        #: connection's own local address.
        self.destination = None
        #: The client socket, and the backend socket once connected (None before and after).
        self.sock = sock
        self.upstream = None
        #: The backend it was given, once granted.
        self.backend = None
        #: One of :data:`STATES`: ``queued``, or ``header`` for one that sends a PROXY header
        #: first. Moved on only by the connection itself (:meth:`_to`).
        self.state = state
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
        #: Itself, once it has taken a place in the queue (None before, and once ended).
        self.ticket = None
        # As a Ticket (see gate.py): not cancelled, not out of the queue, no unit granted yet.
        self.cancelled = None
        self.dead = False
        self.unit = None
        self.watch = None
        self.timer = None
        #: The relay while it runs; once it has finished (``relay.reason`` set), how the
        #: exchange ended, until the connection has ended too.
        self.relay: Optional[Relay] = None
        #: What its state waits for besides a watcher or timer: a Step, or a Connect.
        self.pending = None
        # Relaying on the flat path (see _relay): the backend's read watcher, the timer of the
        # question about the backend's close, and _ASKS / _BACKEND_FIN.
        self.bwatch = None
        self.recheck = None
        self.flat = 0
        self.baddr = None  # the backend's address (for the question)

    # -- what hooks and embedding code read --------------------------------------------------

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

    @property
    def label(self) -> str:
        """The client as written in logs: ``host:port``, or ``in-process``."""
        return format_address(self.client) if self.client is not None else "in-process"

    def describe(self) -> str:
        """What its log line says: client, time waited, time active, bytes each way, end."""
        ended = self.ended_at or time.monotonic()
        activated = self.activated_at
        if activated is None:
            activated = ended  # never active: all of its time was waiting
        client = self.client  # (format_address and self.label inline: once per line)
        if client is None:
            who = "in-process"
        else:
            host = client[0]
            who = f"[{host}]:{client[1]}" if ":" in host else f"{host}:{client[1]}"
        backend = self.backend
        tail = ""
        if backend is not None and len(self.lock.backends) > 1:
            tail = " backend=" + backend.label
        return "%s queued=%.3fs active=%.3fs up=%d down=%d end=%s%s" % (  # noqa: UP031
            who,
            activated - self.queued_at,
            ended - activated,
            self.bytes_up,
            self.bytes_down,
            self.end,
            tail,
        )

    def fields(self) -> Dict[str, object]:
        """The connection as plain data: what its JSON log line, its ``/status`` entry and a
        command hook's environment are made from (one projection, so they cannot disagree)."""
        backend = self.backend or self.lock.backends[0]
        return {
            "id": self.id,
            "client": self.label,
            "backend": backend.label,
            "state": self.state,
            "activation": self.activation,
            "queued_seconds": round(self.queued_seconds, 3),
            "active_seconds": round(self.active_seconds, 3),
            "bytes_up": self.bytes_up,
            "bytes_down": self.bytes_down,
            "end": self.end,
        }

    def hook_env(self) -> Dict[str, str]:
        """The context a command hook finds in its environment."""
        f = self.fields()
        lock = self.lock
        client = self.client or ("", 0)
        env = {
            "TCPLOCK_CLIENT": f["client"],
            "TCPLOCK_CLIENT_HOST": str(client[0]),
            "TCPLOCK_CLIENT_PORT": str(client[1]),
            "TCPLOCK_CONNECTION_ID": str(f["id"]),
            "TCPLOCK_ACTIVATION": str(f["activation"] or 0),
            "TCPLOCK_SERVED": str(lock.served),
            "TCPLOCK_PREVIOUS_END": lock.last_end or "",
            "TCPLOCK_QUEUED": str(lock.queued),
            "TCPLOCK_SLOTS": str(lock.slots),
            "TCPLOCK_ACTIVE_SECONDS": f"{f['active_seconds']:.3f}",
            "TCPLOCK_BYTES_UP": str(f["bytes_up"]),
            "TCPLOCK_BYTES_DOWN": str(f["bytes_down"]),
        }
        env.update((self.backend or lock.backends[0]).env())
        if f["end"]:
            env["TCPLOCK_END"] = f["end"]
        return env

    def __repr__(self) -> str:
        return f"<Connection #{self.id} {self.label} {self.state}>"

    def _to(self, event: str) -> None:
        """Move on by :data:`TRANSITIONS`; an event its state does not take is a bug."""
        try:
            self.state = TRANSITIONS[self.state][event]
        except KeyError:
            raise IllegalTransition(f"{self!r}: no {event!r} from {self.state!r}") from None

    # -- header: the PROXY header, before admission ------------------------------------------
    # Read in the event loop like the rest: a read watcher and a timer, no greenlet.
    # HeaderReader takes only the header's bytes; what the client sent after it stays in the
    # kernel for the backend.

    def read_header(self) -> None:
        """Read the client's PROXY header; once it is complete, on to admission."""
        reader = HeaderReader()
        if self._header_read(reader):
            return None  # a proxy sends its header at once: usually it is all there
        lock = self.lock
        self.watch = lock.loop.io(self.sock.fileno(), 1)
        self.watch.start(self._header_readable, reader)
        self.timer = lock.loop.timer(lock.proxy_header_timeout)
        self.timer.start(self._header_timed_out)
        return None

    def _header_readable(self, reader: HeaderReader) -> None:
        if self.state is HEADER:
            self._guarded(partial(self._header_read, reader))

    def _header_read(self, reader: HeaderReader) -> bool:
        """Read what there is of the header; True once the connection has gone on (admitted,
        or ended)."""
        try:
            header = reader.read(self.sock)
        except HeaderError as e:
            self._bad_header(str(e))
            return True
        if header is None:
            return False
        self.stop_watching()
        if header.source is not None:
            self.client, self.destination = header.source, header.destination
        self._to("header-read")
        self.queued_at = time.monotonic()  # its wait starts now
        self.lock._let_in(self)
        return True

    def _header_timed_out(self) -> None:
        self._bad_header(f"no complete header within {self.lock.proxy_header_timeout:g}s")

    def _bad_header(self, why: str) -> None:
        limit = self.lock._header_log
        if limit.ready():
            more = limit.take_held_back()
            log.warning(
                "%s: bad PROXY header: %s%s",
                self.label,
                why,
                f" ({more} more in the last {limit.interval:.0f}s)" if more else "",
            )
        self.finish("bad-proxy-header")

    # -- queued: a place in the gate's queue ---------------------------------------------------

    def enqueue(self, queue_timeout: Optional[float]) -> None:
        """Take a place in the queue (or a free slot at once), waiting at most
        ``queue_timeout``."""
        self.ticket = self
        if self.lock.gate.enqueue(self):
            return self.lock._grant(self)
        return self._wait(queue_timeout)

    def _wait(self, queue_timeout: Optional[float]) -> None:
        """Watch the waiting client: for leaving, and against ``queue_timeout``."""
        sock, ticket = self.sock, self.ticket
        if sock is not None:
            # Most clients have sent their request by the time they are accepted: one look
            # now spares them the departure watch (the sweep looks after them, as after any
            # client that sent data).
            try:
                first = sock.recv(1, _socket.MSG_PEEK)
            except BlockingIOError:
                self.watch = watch_departure(self.lock.loop, sock, ticket)
            except OSError:
                return ticket.cancel("left-queue")
            else:
                if not first:
                    return ticket.cancel("left-queue")
        if queue_timeout is not None:
            self.timer = self.lock.loop.timer(queue_timeout)
            self.timer.start(ticket.cancel, "queue-timeout")
        return None

    def wake(self) -> None:
        """The gate granted its slot, or its wait was cancelled."""
        self.stop_watching()
        ticket = self.ticket
        if ticket.granted:
            self.lock._grant(self)
        else:
            self.lock.gate.discard(ticket)
            self.finish(ticket.cancelled or "queue-timeout")

    # -- granted: on to the backend ------------------------------------------------------------

    def grant(self, backend) -> None:
        """The gate gave it a slot of ``backend``."""
        self._to("grant")
        # From here on it holds the slot: its activation is set.
        self.activation = self.lock._activated(self)
        self.activated_at = time.monotonic()
        self.backend = backend
        self._proceed()

    def _proceed(self) -> None:
        lock = self.lock
        if lock._stopping:
            return self.finish("shutdown")
        backend = self.backend
        if backend.restart_reason is not None:
            # Granted a slot of its backend as a restart of it was called for: back to the head
            # of the queue, for another backend (a standby) or for the end of the restart.
            return self._requeue(counted=False)
        if self.sock is None:
            self._to("hold")
            return lock._holding(self)
        backend.used()
        hook = lock.on_activate
        if hook is not None:
            self._to("hook")
            args = ("on-activate", hook, self, lock.hook_timeout)
            step = self.pending = Step(call_hook, args, self._hooked)
            step.start()
            return None
        return self._connect()

    def _guarded(self, step: Callable[[], object]) -> None:
        # What a callback arms next must not strand the slot if it fails: a bug ends only
        # this connection, with a traceback.
        try:
            step()
        except Exception:
            log.exception("%s: unexpected error", self.label)
            self.finish("error")

    def _hooked(self, _result, error) -> None:
        self.pending = None
        if self.state is not HOOK:
            return None
        if error is not None:
            if isinstance(error, HookFailed):
                self.lock.hook_failures += 1
                log.error("%s: %s", self.label, error)
                return self.finish("hook-failed")
            if isinstance(error, GreenletExit):
                return self.finish("shutdown")
            log.error("%s: unexpected error", self.label, exc_info=error)
            return self.finish("error")
        if self.lock._stopping:
            return self.finish("shutdown")
        return self._guarded(self._connect)

    def _connect(self) -> None:
        self._to("connect")
        now = self.backend.connect_now()  # on loopback, usually: no Connect needed
        if now is not None:
            return self._on_backend(now[0], now[1], True)
        attempt = self.pending = Connect(
            self.backend,
            time.monotonic() + self.lock.connect_timeout,
            self._connected,
            self._backend_down,
        )
        attempt.start()

    def back_to_queue(self) -> bool:
        """If it is connecting, give up and go back to the head of the queue (its backend's
        command ended: it is to be started again, or another backend takes the client)."""
        if self.state is not CONNECTING:
            return False
        attempt, self.pending = self.pending, None
        if attempt is not None:
            attempt.cancel()
        self._requeue()
        return True

    def _requeue(self, counted: bool = True) -> None:
        """Its backend turned out to be down, or to be restarting (``counted``: whether it
        was counted as a use of the backend yet): back to the head of the queue, keeping its
        place, its slot of that backend given back (the lock's part: :meth:`TCPLock._requeue`)
        and its activation undone. One that waits again is watched again, within what is left
        of its ``queue_timeout``; while tcplock stops there is no queue to go back to."""
        lock = self.lock
        if lock._stopping:
            return self.finish("shutdown")
        backend, activation = self.backend, self.activation
        self._to("requeue")
        self.backend = None
        self.activation = self.activated_at = None
        lock._requeue(self, backend, activation, counted)
        if not self.ticket.granted:
            left = lock.queue_timeout
            if left is not None:
                left = max(0.001, left - (time.monotonic() - self.queued_at))
            self._wait(left)
        return None

    def _backend_down(self, error) -> bool:
        # Asked by the connect after each failed round: True sends the client elsewhere.
        return self.lock._backend_failed(self.backend, error)

    def _connected(self, sock, error) -> None:
        attempt, self.pending = self.pending, None
        if sock is None and attempt.gave_up:
            # The backend is down and another is up: back to the head of the queue.
            return self._requeue()
        if sock is None:
            log.warning(
                "%s: backend %s unavailable for %.1fs: %s",
                self.label,
                self.backend.label,
                self.lock.connect_timeout,
                getattr(error, "strerror", None) or error,
            )
            return self.finish("backend-refused")
        return self._on_backend(sock, attempt.sockaddr, attempt.local)

    def _on_backend(self, sock, sockaddr, local: bool) -> None:
        """Connected to its backend, at ``sockaddr``: on to relaying."""
        self.upstream = sock
        if not self.backend.up:
            self.backend.mark_up()  # it answered: no need to wait for its check
        lock = self.lock
        if (lock.send_proxy or lock.send_proxy_v2) and not self._send_proxy_header(sock):
            return None
        try:
            self._relay(sockaddr, local)
        except Exception:
            log.exception("%s: unexpected error", self.label)
            self.finish("error")
        return None

    def _send_proxy_header(self, sock) -> bool:
        """Send the backend a PROXY header (v2 or v1) naming the client and the address it
        connected to, before any byte of the client's. One send: the header is shorter than
        any MSS and goes into the empty send buffer of a new connection (the protocol's own
        advice is not to bother with partial sends). If it does not go out whole, the
        connection ends as ``backend-reset``, so that the backend never takes a cut header
        for a client's bytes. True if it was sent."""
        make = make_v2 if self.lock.send_proxy_v2 else make_v1
        header = b""
        try:
            header = make(self.client, self.destination or self.sock.getsockname())
            sent = sock.send(header)
            why = "the send buffer is full"
        except BlockingIOError:
            sent, why = 0, "the send buffer is full"
        except (OSError, ValueError) as e:
            sent, why = -1, getattr(e, "strerror", None) or e
        if sent == len(header):
            return True
        log.warning(
            "%s: could not send the PROXY header to backend %s: %s",
            self.label,
            self.backend.label,
            why,
        )
        self.finish("backend-reset")
        return False

    # -- relaying ------------------------------------------------------------------------------
    # The common path is flat: a short exchange (the request, the answer, the backend's close,
    # the client's) goes from socket to socket in the connection's own watcher callbacks, each
    # read sent on whole at once. Anything else hands the exchange to a Relay, which keeps
    # backpressure, splice and half-closes: a send the destination does not take whole, a read
    # that fills the buffer (bulk), the client's EOF or an error first, a backend that may
    # still read after its EOF.

    def _relay(self, baddr, local: bool) -> None:
        self._to("relay")
        lock = self.lock
        loop = lock.loop
        if lock.timeout:
            self.timer = timer = loop.timer(lock.timeout)
            timer.start(self.finish, "ttl")
        if local and lock.check_backend_close:
            self.flat = _ASKS
            self.baddr = baddr
        watch = self.watch = read_watcher(loop, self.sock.fileno())
        bwatch = self.bwatch = read_watcher(loop, self.upstream.fileno())
        watch.start(self._client_readable)
        bwatch.start(self._backend_readable)
        # The client has usually sent its request already: pass it on now rather than one
        # turn of the event loop later.
        self._client_readable()

    def _client_readable(self) -> None:
        view = self.lock._chunk
        try:
            n = self.sock.recv_into(view)
        except BlockingIOError:
            return None
        except OSError as e:
            return self._hand_over().failed(CLIENT, e)
        if not n:
            if self.flat & _BACKEND_FIN:  # both sides have finished
                return self._flat_end(_BOTH_DONE)
            return self._hand_over().eof(CLIENT)
        if self.flat & _BACKEND_FIN:
            # Bytes after the backend's EOF: they are for a backend that may still read, or
            # for none (then the exchange is over, and they are the lingering client's).
            if self._backend_gone():
                return None
            return self._hand_over(up=view[:n], backend_fin=True)
        try:
            m = self.upstream.send(view[:n])
        except BlockingIOError:
            m = 0
        except OSError as e:
            return self._hand_over().failed(BACKEND, e)
        self.bytes_up += m
        if m < n or n == BUFSIZE:
            self._hand_over(up=view[m:n])
        return None

    def _backend_readable(self) -> None:
        # Two reads at most: an answer and the backend's EOF often arrive together.
        view = self.lock._chunk
        for _ in (1, 2):
            try:
                n = self.upstream.recv_into(view)
            except BlockingIOError:
                return None
            except OSError as e:
                return self._hand_over().failed(BACKEND, e)
            if not n:
                return self._backend_eof()
            try:
                m = self.sock.send(view[:n])
            except BlockingIOError:
                m = 0
            except OSError as e:
                return self._hand_over().failed(CLIENT, e)
            self.bytes_down += m
            if m < n or n == BUFSIZE:
                return self._hand_over(down=view[m:n])
        return None

    def _backend_eof(self) -> None:
        limit = self.lock.client_finish_timeout
        if limit == 0:
            # The slot passes on now; the client gets the EOF once it has (and lingers).
            return self._flat_end(Ended(client_watch=self._take_client_watch(), client_fin=True))
        if not self.flat & _ASKS:
            return self._hand_over().eof(BACKEND)  # nothing to ask: the Relay times the client
        if self.lock.gate.waiting and self.backend.peer_check.closed(self.upstream, self.baddr):
            # (As _slot_wanted.) Someone waits for the slot, and nothing on the backend's side
            # can read any more: the slot passes on now; the client gets its EOF after, and
            # lingers.
            watch = self._take_client_watch()
            return self._flat_end(Ended(client_watch=watch, client_fin=True, backend_done=True))
        self.bwatch.stop()
        try:
            self.sock.shutdown(_socket.SHUT_WR)
        except OSError as e:
            return self._hand_over(backend_fin=True).failed(CLIENT, e)
        self.flat |= _BACKEND_FIN
        # Whether the backend closed for good matters now only if the client does not close
        # at once: asked when it sends more, or after Relay.backend_close_delay.
        self.recheck = timer = self.lock.loop.timer(Relay.backend_close_delay)
        timer.start(self._client_stays)
        return None

    def _client_stays(self) -> None:
        if self.state is RELAYING and self.relay is None and not self._backend_gone():
            self._hand_over(backend_fin=True)

    def _backend_gone(self) -> bool:
        """Ask whether the backend closed for good; if so the exchange is over (the client
        lingers): True."""
        recheck, self.recheck = self.recheck, None
        if recheck is not None:
            recheck.stop()
            recheck.close()
        if not self.backend.peer_check.closed(self.upstream, self.baddr):
            return False
        self._flat_end(Ended(client_watch=self._take_client_watch(), backend_done=True))
        return True

    def _slot_wanted(self) -> bool:
        """Whether a client waits for a slot: then the backend's close decides when this one
        passes on, and is worth asking about as soon as the backend's EOF comes."""
        return self.lock.gate.waiting > 0

    def _take_client_watch(self):
        watch, self.watch = self.watch, None
        watch.stop()
        return watch

    def _flat_end(self, outcome: Ended) -> None:
        self.relay = outcome
        self.finish("closed")

    def _hand_over(self, up=None, down=None, backend_fin: bool = False) -> Relay:
        """Hand the exchange to a Relay, with the chunk read but not (all) sent, if any, and
        whether the backend's EOF has been passed on (the question about it asked)."""
        watch, bwatch, recheck = self.watch, self.bwatch, self.recheck
        self.watch = self.bwatch = self.recheck = None
        watch.stop()
        bwatch.stop()
        if recheck is not None:
            recheck.stop()
            recheck.close()
        lock = self.lock
        relay = self.relay = Relay(self.sock, self.upstream, self)
        if self.flat & _ASKS and not backend_fin:
            check = self.backend.peer_check
            relay.backend_closed = partial(check.closed, self.upstream, self.baddr)
            relay.slot_wanted = self._slot_wanted
        relay.start(
            self._relayed,
            lock.finish_timeout,
            lock.client_finish_timeout,
            watch,
            bwatch,
            up,
            down,
            backend_fin,
        )
        return relay

    def _relayed(self) -> None:
        self.finish(self.relay.reason)

    # -- ending ------------------------------------------------------------------------------

    def finish(self, reason: str) -> None:
        """End the connection (the first call counts): stop what its state was waiting for,
        close the backend side, and with a slot held, run what must run before the slot passes
        on (the TTL hook, a due restart), release the slot, close the client's side."""
        state = self.state
        if state is ENDING or state is ENDED:
            return
        self._to("end")
        self.end = reason
        self.ended_at = time.monotonic()
        outcome = self.relay
        if outcome is not None and outcome.reason is None:
            outcome.stop()  # cut short: nothing of it is wanted
            outcome = self.relay = None
        self.stop_watching()
        pending = self.pending
        if pending is not None:
            # A hook's step or a connect under way: its callback sees ENDING and does nothing.
            self.pending = None
            pending.cancel()
        if self.upstream is not None and not (
            reason == "closed" and outcome is not None and outcome.backend_done
        ):
            # Closed now, before anyone else is let in; unless nothing more can reach the
            # backend, when closing is nothing it can see: that waits until after the release.
            graceful = (
                outcome is not None
                and outcome.backend_finished
                and END_RULES[reason].backend is _FIN
            )
            if graceful:
                self.upstream.close()
            else:
                close_socket(self.upstream, True)
            self.upstream = None
        if self.activation is None:  # it never held a slot
            self._settle()
            return self._forget()
        lock = self.lock
        if END_RULES[reason].timeout:
            self._settle()  # its line comes before what the hook logs
            hook = lock.on_timeout
            if hook is not None and not lock._stopping:
                step = self.pending = Step(
                    call_hook, ("on-timeout", hook, self, lock.hook_timeout), self._timeout_hooked
                )
                step.start()
                return None
        return self._wind_up()

    def _timeout_hooked(self, _result, error) -> None:
        self.pending = None
        if isinstance(error, HookFailed):
            self.lock.hook_failures += 1
            log.error("%s: %s", self.label, error)
        elif error is not None and not isinstance(error, GreenletExit):
            log.error("%s: on-timeout hook: unexpected error", self.label, exc_info=error)
        self._wind_up()

    def _wind_up(self) -> None:
        lock = self.lock
        backend = self.backend
        backend.after_use()
        timeout = END_RULES[self.end].timeout  # (finish() settled it before the TTL hook)
        if timeout and lock.restart_on_timeout:
            backend.request_restart(self.end)
        settled = timeout
        if backend.restart_reason is not None and not lock._stopping and backend.last_holder():
            if not settled:
                self._settle()  # its line comes before what the restart logs
            step = self.pending = backend.restart_now(self, self._release_settled)
            step.start()
            return
        self._release(settled)

    def _release_settled(self) -> None:
        self._release(True)

    def _release(self, settled: bool) -> None:
        self.pending = None
        lock = self.lock
        if not settled:
            lock._count(self)  # counted before the next client's hooks can look
        lock._release(self)
        if not settled:
            self._settle(counted=True)
        self._forget()

    def _settle(self, counted: bool = False) -> None:
        """Close the client's side (and the backend's, if still open) as its end's rule says,
        and have the lock account for it (its line): once (its end calls it once)."""
        outcome, self.relay = self.relay, None  # the finished relay, if any
        lock = self.lock
        try:
            upstream = self.upstream
            if upstream is not None:
                self.upstream = None
                upstream.close()
            sock = self.sock
            if sock is not None:
                # A client cut while active learns it with a reset; one turned away before it
                # got a slot gets an orderly close; one still open after the backend closed is
                # closed once it has finished sending (see liveness.Lingering).
                reason = self.end
                watch = outcome.client_watch if outcome is not None else None
                if reason == "closed" and outcome is not None and outcome.client_open:
                    lock.liveness.linger(sock, watch, outcome.client_fin)
                else:
                    if watch is not None:
                        recycle(watch, lock.loop)
                    close_socket(
                        sock, self.activation is not None and END_RULES[reason].client is _RESET
                    )
            else:
                lock._holding(self)  # an in-process holder that waited in vain
        finally:
            lock._account(self, counted)

    def _forget(self) -> None:
        self.ticket = None  # (itself: no cycle left to collect)
        self._to("forget")
        self.lock._forget(self)

    def abort(self) -> None:
        """Cut it now (the drain time is over): a step it waits for is killed, and what
        follows the step sees that tcplock is stopping."""
        state = self.state
        if self.pending is not None and state is ENDING:
            self.pending.cancel()
        elif state is QUEUED and self.ticket is not None:
            self.ticket.cancel("shutdown")  # out of the gate's queue, then ended
        elif state is not ENDING and state is not ENDED:
            self.finish("shutdown")

    def stop_watching(self) -> None:
        """Stop its state's watchers and timers."""
        watch, timer, bwatch = self.watch, self.timer, self.bwatch
        loop = self.lock.loop
        if watch is not None:
            self.watch = None
            recycle(watch, loop)
        if timer is not None:
            self.timer = None
            timer.stop()
            timer.close()
        if bwatch is not None:
            self.bwatch = None
            recycle(bwatch, loop)
        if self.recheck is not None:
            self.recheck.stop()
            self.recheck.close()
            self.recheck = None
