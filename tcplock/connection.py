"""A client connection: its states, from the queue to its end.

What it owns: the life of one connection as a state machine driven by the event loop::

    [header] -> queued -> granted -> [parked] -> [hook] -> connecting -> relaying -> ending -> ended

Each state has at most one timer and one watcher (or one step: a blocking call in a greenlet of
its own, see :mod:`tcplock.steps`), and leaving a state stops them. Every way out leads to
:meth:`Connection.finish`, once. The rule it keeps: a slot is released exactly once, and only
after tcplock has finished with the backend side (the TTL hook and a due restart run while the
slot is still held), whatever ends the connection.

A connection is handed what it needs (its lock's settings and counters, the gate through the
lock, its backend); it never imports the server.
"""

from __future__ import annotations

import _socket
import logging
import struct
import time
from functools import partial
from typing import Callable, Dict, Optional

from gevent import GreenletExit

from .backend import Connect, format_address
from .hooks import HookFailed, call_hook
from .proxyproto import make_v1, make_v2
from .relay import Relay
from .steps import Step

__all__ = ["Connection", "END_REASONS", "STATES"]

log = logging.getLogger("tcplock.server")

#: Every way a connection can end, as written in the log line's ``end=`` field.
END_REASONS = (
    "closed",  # both sides finished normally
    "client-reset",  # the client went away abruptly while active
    "backend-reset",  # the backend went away abruptly while active
    "ttl",  # the connection reached its maximum lifetime and was cut
    "client-finish-timeout",  # the client kept sending after the backend closed; both were cut
    "left-queue",  # the client went away while waiting in the queue
    "queue-timeout",  # the client waited longer than queue_timeout
    "queue-full",  # max_queue clients were already waiting (see also TCPLock._headers_full)
    "not-allowed",  # the client's address is not in the allow list
    "untrusted-proxy",  # accept_proxy: the peer is not in trusted_proxy; nothing was read
    "bad-proxy-header",  # accept_proxy: no valid PROXY header within proxy_header_timeout
    "backend-refused",  # no backend connection could be made within connect_timeout
    "hook-failed",  # the on_activate hook failed; the client never reached the backend
    "shutdown",  # tcplock was stopping
    "error",  # a bug in tcplock (logged with a traceback)
)

HEADER = "header"  # accept_proxy: reading the PROXY header, before admission to the queue
QUEUED = "queued"
GRANTED = "granted"
PARKED = "parked"  # granted, waiting for a restart of its backend to finish
HOOK = "hook"
CONNECTING = "connecting"
RELAYING = "relaying"
HOLDING = "holding"  # an in-process holder (TCPLock.slot) using its slot
ENDING = "ending"  # ended; the TTL hook or a restart may still run with the slot held
ENDED = "ended"
STATES = (HEADER, QUEUED, GRANTED, PARKED, HOOK, CONNECTING, RELAYING, HOLDING, ENDING, ENDED)

# Ends after which the client's socket is closed with a reset rather than an orderly FIN: the
# client must learn that the exchange did not complete.
_ABORT_CLIENT = frozenset({"backend-reset", "ttl", "client-finish-timeout", "shutdown", "error"})
_LINGER_RESET = struct.pack("ii", 1, 0)


def close_socket(sock, abort: bool) -> None:
    """Close ``sock``; with ``abort``, with a reset instead of an orderly FIN."""
    try:
        if abort:
            sock.setsockopt(_socket.SOL_SOCKET, _socket.SO_LINGER, _LINGER_RESET)
    except OSError:
        pass
    sock.close()


class Connection:
    """One client connection, as hooks and embedding code see it.

    Times are ``time.monotonic()`` values; the ``*_seconds`` properties are what to read.
    """

    __slots__ = (
        "lock", "id", "client", "sock", "upstream", "backend", "state", "activation",
        "queued_at", "activated_at", "ended_at", "bytes_up", "bytes_down", "end", "ticket",
        "watch", "timer", "relay", "pending", "peer", "destination",
    )  # fmt: skip

    def __init__(self, lock, sock, client, number: int) -> None:
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
        #: One of :data:`STATES`.
        self.state = QUEUED
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
        self.ticket = None
        self.watch = None
        self.timer = None
        #: The relay while it runs; once it has finished (``relay.reason`` set), how the
        #: exchange ended, until the connection has ended too.
        self.relay: Optional[Relay] = None
        #: What its state waits for besides a watcher or timer: a Step, or a Connect.
        self.pending = None

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
            queued, active = ended - self.queued_at, 0.0
        else:
            queued, active = activated - self.queued_at, ended - activated
        client = self.client  # (self.label, without the property's calls: once per line)
        line = "%s queued=%.3fs active=%.3fs up=%d down=%d end=%s" % (  # noqa: UP031
            format_address(client) if client is not None else "in-process",
            queued,
            active,
            self.bytes_up,
            self.bytes_down,
            self.end,
        )
        if self.backend is not None and len(self.lock.backends) > 1:
            line += " backend=" + self.backend.label
        return line

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

    # -- granted: on to the backend ------------------------------------------------------------

    def granted(self, backend) -> None:
        """The gate gave it a slot of ``backend``."""
        self.lock._activated(self)  # from here on it holds the slot: activation is set
        self.backend = backend
        self.state = GRANTED
        self._proceed()

    def _proceed(self) -> None:
        lock = self.lock
        if lock._stopping:
            return self.finish("shutdown")
        backend = self.backend
        if backend.restart_reason is not None:
            # Granted just before a restart was called for: the restart comes first. The last
            # holder runs it; the others wait for it, slot in hand.
            self.state = PARKED
            if backend.last_holder():
                self.run_restart()
            else:
                backend.parked.append(self)
            return None
        if self.sock is None:
            self.state = HOLDING
            return lock._holding(self)
        backend.used()
        hook = lock.on_activate
        if hook is not None:
            self.state = HOOK
            args = ("on-activate", hook, self, lock.hook_timeout)
            step = self.pending = Step(call_hook, args, self._hooked)
            step.start()
            return None
        return self._connect()

    def run_restart(self) -> None:
        """Run its backend's due restart, holding its slot while it runs; then go on."""
        step = self.pending = self.backend.restart_now(self, self._unparked)
        step.start()

    def unpark(self) -> None:
        """The restart it waited for is over (or abandoned at shutdown)."""
        if self.state is PARKED:
            self._guarded(self._proceed)

    def _unparked(self) -> None:
        self.pending = None
        if self.state is PARKED:
            self._guarded(self._proceed)

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
        self.state = CONNECTING
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
        self.lock._requeue(self)
        return True

    def _backend_down(self, error) -> bool:
        # Asked by the connect after each failed round: True sends the client elsewhere.
        return self.lock._backend_failed(self.backend, error)

    def _connected(self, sock, error) -> None:
        attempt, self.pending = self.pending, None
        if sock is None and attempt.gave_up:
            # The backend is down and another is up: back to the head of the queue.
            return self.lock._requeue(self)
        if sock is None:
            log.warning(
                "%s: backend %s unavailable for %.1fs: %s",
                self.label,
                self.backend.label,
                self.lock.connect_timeout,
                getattr(error, "strerror", None) or error,
            )
            return self.finish("backend-refused")
        self.upstream = sock
        if not self.backend.up:
            self.backend.mark_up()  # it answered: no need to wait for its check
        lock = self.lock
        if (lock.send_proxy or lock.send_proxy_v2) and not self._send_proxy_header(sock):
            return None
        try:
            self._relay(attempt.sockaddr)
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

    def _relay(self, peer) -> None:
        self.state = RELAYING
        lock = self.lock
        relay = self.relay = Relay(self.sock, self.upstream, self)
        if lock.timeout:
            self.timer = timer = relay.loop.timer(lock.timeout)
            timer.start(self.finish, "ttl")
        relay.start(self._relayed, lock.finish_timeout, lock.client_finish_timeout)
        if relay.reason is None and lock.check_backend_close:
            # Asked only when the client, after the backend's FIN, sends more or stays open
            # (see Relay.backend_close_delay): a client that closes at once is not asked about.
            relay.backend_closed = partial(self.backend.peer_check.closed, self.upstream, peer)

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
        self.state = ENDING
        self.end = reason
        self.ended_at = time.monotonic()
        outcome = self.relay
        if outcome is not None and outcome.reason is None:
            outcome.stop()  # cut short: nothing of it is wanted
            outcome = self.relay = None
        self.stop_watching()
        if state is PARKED and self in self.backend.parked:
            self.backend.parked.remove(self)
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
            graceful = outcome is not None and outcome.backend_finished and reason == "closed"
            close_socket(self.upstream, not graceful)
            self.upstream = None
        if self.activation is None:  # it never held a slot
            self.lock._settle(self)
            return self.lock._forget(self)
        lock = self.lock
        if reason == "ttl":
            lock._settle(self)  # its line comes before what the hook logs
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
        if self.end == "ttl" and lock.restart_on_timeout:
            backend.request_restart("ttl")
        settled = self.end == "ttl"  # (finish() settled it before the TTL hook)
        if backend.restart_reason is not None and not lock._stopping and backend.last_holder():
            if not settled:
                lock._settle(self)  # its line comes before what the restart logs
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
            lock._settle(self, counted=True)
        lock._forget(self)

    def abort(self) -> None:
        """Cut it now (the drain time is over): a step it waits for is killed, and what
        follows the step sees that tcplock is stopping."""
        state = self.state
        if self.pending is not None and (state is ENDING or state is PARKED):
            self.pending.cancel()
        elif state is QUEUED and self.ticket is not None:
            self.ticket.cancel("shutdown")  # out of the gate's queue, then ended
        elif state is not ENDING and state is not ENDED:
            self.finish("shutdown")

    def stop_watching(self) -> None:
        """Stop its state's watcher and timer."""
        watch, timer = self.watch, self.timer
        if watch is not None:
            self.watch = None
            watch.stop()
            watch.close()
        if timer is not None:
            self.timer = None
            timer.stop()
            timer.close()
