"""Watching clients that tcplock is not relaying: waiting ones for departure, lingering ones
until they are done.

What it owns: the departure watch of a waiting client (:func:`watch_departure`), the lock's
once-a-second sweep, and lingering clients (:class:`Lingering`): those whose slot passed on when
the backend closed, before they closed too. The rules it keeps: a waiting client is watched
without a byte of it being read (its request stays in the kernel for the backend), and a
lingering client is closed once it has finished sending, or after the lock's ``linger_time``,
never with a reset that would destroy the end of its answer.

It reads the lock's connections and settings; it sets no connection's state or fields: a
waiting client that left is told to its ticket, which ends its connection.
"""

from __future__ import annotations

import socket as _stdsocket
import time
from typing import Dict

from .gate import Ticket
from .relay import read_watcher, recycle

__all__ = ["Liveness", "Lingering", "watch_departure"]


def watch_departure(loop, sock, ticket: Ticket):
    """Watch a waiting client for leaving, without reading its bytes.

    Runs in the event loop itself: when the socket turns readable, peek. Nothing there but EOF,
    or an error, means the client left; data means it is waiting with a request, which stays in
    the kernel's buffer for the backend. Readiness no longer says anything then, so this watch
    stops and the lock's once-a-second sweep (:meth:`Liveness.sweep`) looks for a reset instead.
    """
    watcher = loop.io(sock.fileno(), 1)

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


class Liveness:
    """The sweep and the lingering clients of one lock (``lock.sweep_interval``,
    ``lock.linger_time`` and ``lock.max_lingering`` are read when used)."""

    __slots__ = ("lock", "lingering", "_sweeper")

    def __init__(self, lock) -> None:
        self.lock = lock
        #: Lingering clients, in order of their deadline: the sweep closes from the front.
        self.lingering: Dict[Lingering, None] = {}
        self._sweeper = None

    def start(self) -> None:
        if self._sweeper is None:
            every = self.lock.sweep_interval
            self._sweeper = self.lock.loop.timer(every, every)
            self._sweeper.start(self.sweep)

    def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.stop()
            self._sweeper.close()
            self._sweeper = None

    def sweep(self) -> None:
        """Once a second, in the event loop: a waiting client that sent its request is no
        longer watched for readiness (its data keeps the socket readable), so look for a reset
        here. One that merely closed its sending side keeps its place, as it should. Lingering
        clients whose time is up are closed here too (one timer for all of them), and a backend
        tcplock runs that lost a process while idle is called for a restart. And the lock
        takes a sample for its history (:meth:`TCPLock.history`)."""
        lock = self.lock
        lock._sample()
        for conn in lock.connections:
            if (
                conn.state == "queued"
                and conn.sock is not None
                and conn.ticket is not None
                and (conn.watch is None or not conn.watch.active)
            ):
                try:
                    gone = conn.sock.getsockopt(_stdsocket.SOL_SOCKET, _stdsocket.SO_ERROR)
                except OSError:
                    gone = True
                if gone and conn.ticket is not None:
                    conn.ticket.cancel("left-queue")
        for backend in lock.backends:  # a backend tcplock runs that lost a process
            backend.check_process()
        lingering = self.lingering
        if lingering:
            now = time.monotonic()
            while lingering:
                oldest = next(iter(lingering))
                if oldest.until > now:
                    break
                oldest.close()
        if lock.closed and not lock.connections and not lingering:
            self.stop()  # closed, and nothing left to look after

    def linger(self, sock, watch=None, fin: bool = False) -> None:
        """Keep a client open that may still send (see :class:`Lingering`); ``fin``: the
        backend's EOF has yet to be passed on to it. ``watch``: the relay's watcher of its
        socket, if it left one."""
        lock = self.lock
        try:
            if fin:
                sock.shutdown(_stdsocket.SHUT_WR)
            room = len(self.lingering) < lock.max_lingering
        except OSError:
            room = False  # the client is gone already: nothing to linger for
        if not room:
            if watch is not None:
                recycle(watch, lock.loop)
            sock.close()
        else:
            until = time.monotonic() + lock.linger_time
            Lingering(self.lingering, sock, watch, lock.loop, until)

    def close_all(self) -> None:
        for lingering in list(self.lingering):
            lingering.close()


class Lingering:
    """The last of a client whose slot passed on when the backend closed, before the client did.

    Its socket stays open, what it still sends is read and dropped, and it is closed once the
    client has finished sending, or by the lock's sweep once ``until`` (a monotonic time) has
    passed. Closing it at once would answer the client's next bytes with a reset, and a reset
    destroys whatever of the reply is still queued for it. ``watch`` is the relay's watcher of
    the socket, if it left one (None: a new one is made).
    """

    __slots__ = ("sock", "registry", "watch", "until", "loop")

    def __init__(self, registry: dict, sock, watch, loop, until: float) -> None:
        self.sock = sock
        self.registry = registry
        self.until = until
        self.loop = loop
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
        recycle(self.watch, self.loop)
        self.registry.pop(self, None)
        self.sock.close()
        self.sock = self.registry = self.watch = None
