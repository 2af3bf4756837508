"""The two-way byte pump between a client and its backend connection.

What it owns: moving bytes, passing on half-closes, and deciding how the exchange ended
(``closed``, ``client-reset``, ``backend-reset`` or ``client-finish-timeout``). The rule it
keeps: at most one chunk per direction is in flight, so a reader that stops reading stops the
writer (backpressure reaches the sender through the kernel's socket buffers, never through
memory of ours).

Each direction is driven by the event loop itself: a watcher on the source calls a function
that reads one chunk and writes it on; if the destination is full, the function swaps to a
watcher on the destination until the chunk is out. No greenlet per direction, so no switch per
read or write. How the exchange ends is decided in the same callbacks, and reported by a
callback too (:meth:`Relay.start`, which may also take over an exchange a connection began
relaying itself). Every watcher is stopped when the relay ends or is stopped.
It knows nothing of slots, hooks or lifetimes, and works on plain non-blocking sockets.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import sys
from typing import Callable, Optional, Tuple

import gevent

from .peer import is_loopback

__all__ = ["Relay", "Ended", "CLIENT", "BACKEND", "BUFSIZE", "SPLICE"]

#: Bytes read per system call, and the most one direction holds at once.
BUFSIZE = 64 * 1024

#: Zero-copy relaying through a pipe (Linux): used once a direction shows bulk traffic.
SPLICE = hasattr(os, "splice") and sys.platform.startswith("linux")
#: Bytes moved per splice call (the pipe is sized to match); also the most in flight.
SPLICE_CHUNK = 1 << 20
#: Full buffers a direction copies before it opens its pipe: setting a pipe up costs more than
#: copying a few buffers (see BENCHMARKS.md), so an exchange of up to this many never pays it.
SPLICE_AFTER = 2
_F_SETPIPE_SZ = 1031
#: Congestion control for bulk traffic sent to a peer on loopback (see _Direction._open_pipe).
LOOPBACK_CONGESTION = b"reno"
_TCP_CONGESTION = getattr(socket, "TCP_CONGESTION", None)
_SPLICE_FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)

CLIENT = "client"
BACKEND = "backend"

# Buffers are reused across connections: a fresh 64 KiB buffer is zeroed memory every time.
_BUFFERS: list = []
_KEEP_BUFFERS = 32


def _new_buffer():
    buf = bytearray(BUFSIZE)
    return buf, memoryview(buf)


# So are read watchers (on libev, where a watcher takes a new descriptor by assignment): a new
# one costs its creation and a check of the descriptor (a system call). Each is kept with its
# loop, and given only to that loop. On other loops (libuv) a watcher is made afresh.
_READERS: list = []
_KEEP_READERS = 64


_POOLABLE: dict = {}  # type of loop -> whether its watchers may be pooled


def _poolable(loop) -> bool:
    kind = type(loop)
    poolable = _POOLABLE.get(kind)
    if poolable is None:
        poolable = _POOLABLE[kind] = kind.__module__.startswith("gevent.libev")
    return poolable


def read_watcher(loop, fd: int):
    """A stopped event-loop watcher for ``fd`` turning readable: an idle one where there is one.
    Give it back with :func:`recycle`."""
    readers = _READERS
    if readers and readers[-1][0] is loop:
        watcher = readers.pop()[1]
        watcher.fd = fd
        return watcher
    return loop.io(fd, 1)


def recycle(watcher, loop=None) -> None:
    """Stop a watcher from :func:`read_watcher` (which drops its callback) and keep it for
    reuse by ``loop``, or close it."""
    watcher.stop()
    if loop is not None and len(_READERS) < _KEEP_READERS:
        poolable = _POOLABLE.get(type(loop))
        if poolable or (poolable is None and _poolable(loop)):
            _READERS.append((loop, watcher))
            return
    watcher.close()


_Failure = Optional[Tuple[str, OSError]]


class _Direction:
    """One direction of the relay, as event-loop callbacks.

    States: reading (the source's watcher is on), writing (a chunk is partly out; the
    destination's watcher is on), done (EOF seen and passed on), or stopped. ``discard`` turns
    it into a sink: what the source sends is read and dropped (the backend's reply to a client
    that has gone).
    """

    __slots__ = (
        "relay", "src", "dst", "src_side", "dst_side", "up", "counter", "on_read",
        "on_write", "buf", "view", "sent", "size", "pipe", "discard", "done", "other",
        "ask_first", "full",
    )  # fmt: skip

    def __init__(self, relay, src, dst, up: bool, on_read=None) -> None:
        self.relay = relay
        self.src, self.dst = src, dst
        #: Client to backend (bytes_up), or back (bytes_down).
        self.up = up
        self.src_side, self.dst_side = (CLIENT, BACKEND) if up else (BACKEND, CLIENT)
        self.counter = relay.counter
        self.on_read = on_read if on_read is not None else read_watcher(relay.loop, src.fileno())
        self.on_write = None  # made when the destination first fills up (rarely, for replies)
        self.buf, self.view = _BUFFERS.pop() if _BUFFERS else _new_buffer()
        self.sent = self.size = 0
        self.pipe: Optional[Tuple[int, int]] = None
        self.discard = False
        self.done = False
        self.other: Optional[_Direction] = None  # the opposite direction
        #: Client bytes read after the backend's FIN: whether the backend closed for good
        #: is asked before they are passed on (Relay.client_sent_after_fin).
        self.ask_first = False
        self.full = 0  # reads that filled the buffer (see SPLICE_AFTER)

    def start(self) -> None:
        self.on_read.start(self.readable)

    def stop(self) -> None:
        self.on_read.stop()
        if self.on_write is not None:
            self.on_write.stop()

    def close(self) -> None:
        # Closed watchers still hold their callbacks (bound methods of this object): drop
        # them, so that a finished relay is freed by reference counting, not the cycle
        # collector. (A recycled one is stopped, which drops its callback.)
        if self.on_read is not None:
            recycle(self.on_read, self.relay.loop)
        if self.on_write is not None:
            self.on_write.close()
        self.on_read = self.on_write = self.relay = self.other = None
        if self.view is not None:
            if len(_BUFFERS) < _KEEP_BUFFERS:
                _BUFFERS.append((self.buf, self.view))
            self.buf = self.view = None
        if self.pipe is not None:
            os.close(self.pipe[0])
            os.close(self.pipe[1])
            self.pipe = None

    def _fail(self, side: str, error: OSError) -> None:
        self.stop()
        self.relay.failed(side, error)

    def _eof(self) -> None:
        self.on_read.stop()
        self.done = True
        # Pass the EOF on, unless the other way is done too: then both sockets are closed at
        # once, which sends the same FIN without a system call of its own.
        if not self.discard and not self.other.done:
            if self.src_side == BACKEND:
                # Passed on in Relay.changed(), unless the exchange ends there and then: the
                # caller sends it then, once the slot has passed on (Relay.client_fin).
                self.relay.client_fin = True
            else:
                try:
                    self.dst.shutdown(socket.SHUT_WR)
                except OSError as e:
                    return self._fail(self.dst_side, e)
                # The backend has the client's EOF: once it has finished too, closing its
                # socket is nothing it can see. (Not so when the EOF is left to the close.)
                self.relay.backend_done = True
        self.relay.changed()

    # -- plain copying through the buffer --------------------------------------------------------

    def readable(self, reads: int = 2) -> None:
        if self.pipe is not None:
            return self._splice_in()
        # Two reads at most per call: a reply and the end of stream often arrive together,
        # and seeing the EOF now saves a turn of the event loop; more would starve others.
        while reads:
            reads -= 1
            try:
                n = self.src.recv_into(self.buf)
            except BlockingIOError:
                return
            except OSError as e:
                return self._fail(self.src_side, e)
            if not n:
                return self._eof()
            if self.discard:
                continue
            if self.ask_first and self.relay.client_sent_after_fin():
                return  # the backend has closed for good: the exchange is over
            self.sent, self.size = 0, n
            self._write()
            if self.size:
                return  # the destination is full: wait for it
            if n == BUFSIZE and SPLICE and self.pipe is None:
                self.full += 1
                if self.full < SPLICE_AFTER:
                    continue
                # Full buffers mean bulk: move the rest without copying it.
                return self._open_pipe()

    def _write(self) -> None:
        try:
            m = self.dst.send(self.view[self.sent : self.size])
        except BlockingIOError:
            m = 0
        except OSError as e:
            return self._fail(self.dst_side, e)
        if self.up:
            self.counter.bytes_up += m
        else:
            self.counter.bytes_down += m
        self.sent += m
        if self.sent < self.size:
            if self.on_read.active:
                self._wait_for_room()
            return
        self.sent = self.size = 0

    def _wait_for_room(self) -> None:
        # Stop reading the source until the destination has taken the chunk in flight.
        self.on_read.stop()
        if self.on_write is None:
            self.on_write = self.relay.loop.io(self.dst.fileno(), 2)
        self.on_write.start(self.writable)

    def writable(self) -> None:
        if self.pipe is not None:
            return self._splice_out()
        self._write()
        if self.size == 0:
            self.on_write.stop()
            self.on_read.start(self.readable)

    # -- zero-copy through a pipe ----------------------------------------------------------------

    def _open_pipe(self) -> None:
        try:
            r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            return  # out of descriptors: keep copying
        try:
            fcntl.fcntl(w, _F_SETPIPE_SZ, SPLICE_CHUNK)
        except OSError:
            pass  # a smaller pipe only means more calls
        self.pipe = (r, w)
        if _TCP_CONGESTION is not None and LOOPBACK_CONGESTION:
            # On loopback there is no network to share and nothing to be fair to: bulk traffic
            # to a local peer is sent with Reno, which does not pace (a pacing default such as
            # BBR holds it back; BENCHMARKS.md has the figures), and which any process may
            # choose. Elsewhere the system's choice stands.
            try:
                if is_loopback(self.dst.getpeername()):
                    self.dst.setsockopt(socket.IPPROTO_TCP, _TCP_CONGESTION, LOOPBACK_CONGESTION)
            except OSError:
                pass  # not allowed or not there: the system's choice stands

    def _splice_in(self) -> None:
        try:
            n = os.splice(self.src.fileno(), self.pipe[1], SPLICE_CHUNK, flags=_SPLICE_FLAGS)
        except BlockingIOError:
            return
        except OSError as e:
            return self._fail(self.src_side, e)
        if not n:
            return self._eof()
        self.size = n
        self._splice_out()
        if self.size and self.on_read is not None and self.on_read.active:
            self._wait_for_room()  # (on_read is None if a failure just ended the relay)

    def _splice_out(self) -> None:
        if self.discard:
            # Empty the pipe into nothing: the client this was for is gone.
            self._drain_pipe()
        while self.size:
            try:
                m = os.splice(self.pipe[0], self.dst.fileno(), self.size, flags=_SPLICE_FLAGS)
            except BlockingIOError:
                return
            except OSError as e:
                return self._fail(self.dst_side, e)
            if self.up:
                self.counter.bytes_up += m
            else:
                self.counter.bytes_down += m
            self.size -= m
        if not self.on_read.active and self.on_write is not None:
            self.on_write.stop()
            self.on_read.start(self.readable)

    def _drain_pipe(self) -> None:
        while self.size:
            try:
                self.size -= len(os.read(self.pipe[0], min(self.size, BUFSIZE)))
            except OSError:
                self.size = 0

    def hold(self, chunk) -> None:
        """Send on ``chunk``, read from the source before this direction took over; until it
        is out, the source is not read."""
        n = len(chunk)
        self.view[:n] = chunk
        self.sent, self.size = 0, n
        self._write()

    def sink(self) -> None:
        """Discard from now on: drop what is pending and keep reading the source to its EOF."""
        self.discard = True
        if self.on_write is not None:
            self.on_write.stop()
        if self.pipe is not None:
            self._drain_pipe()
        self.sent = self.size = 0
        if not self.done:
            self.on_read.start(self.readable)


class Relay:
    """Relays between two connected non-blocking sockets until both directions are done.

    ``counter`` is any object with integer attributes ``bytes_up`` (client to backend) and
    ``bytes_down`` (backend to client); they are updated as bytes are delivered.

    :meth:`start` takes a callback, called from the event loop once the exchange has ended;
    :attr:`reason` then says how it ended. :meth:`stop` cuts it short (no callback then).
    """

    #: Seconds between checks that a client which has finished sending is still connected.
    client_check_interval = 1.0
    #: After the backend's FIN, how long a client that neither closes nor sends may keep the
    #: exchange open before the kernel is asked whether the backend closed for good (see
    #: backend_closed). A client that closes within it is never asked about.
    backend_close_delay = 0.005

    # The state of an exchange, as class-level defaults: an instance stores only what changes
    # (this runs once per connection, and most of these never change).

    #: How the exchange ended (``closed``, ``client-reset``, ``backend-reset`` or
    #: ``client-finish-timeout``); None while it runs, or if it was stopped.
    reason: Optional[str] = None
    #: True once the backend side has been seen to finish (EOF or drained): the caller may
    #: close it gracefully. False means the caller should abort it.
    backend_finished = False
    #: True if the exchange ended while the client could still send: the backend had closed
    #: (for good, or the client's finish time ran out).
    client_open = False
    #: When the exchange ended with the client still open: the (stopped) event-loop watcher
    #: of the client's socket, for the caller to go on watching it with, and then to give
    #: back with :func:`recycle`. Watching the socket afresh would cost system calls to
    #: register it with the event loop again.
    client_watch = None
    #: True if the exchange ended with the backend's EOF not yet passed on to the client: the
    #: caller shuts the client's side down (it closes for good or lingers).
    client_fin = False
    #: True if the exchange ended "closed" with nothing more to reach the backend: it has the
    #: client's EOF, or it closed the connection for good. The caller may then close the
    #: backend socket after passing the slot on: the backend cannot tell.
    backend_done = False
    failure: _Failure = None
    #: Optional: called once the backend has finished sending; True means it has closed the
    #: connection for good (nothing on its side can read any more), so the exchange is over
    #: without waiting for the client (see peer.py).
    backend_closed: Optional[Callable[[], Optional[bool]]] = None
    #: Optional, with backend_closed: whether the slot is wanted (a client waits). Then the
    #: backend's close is asked about as soon as its EOF comes, so that the slot passes on at
    #: once; else only when the client sends more, or after backend_close_delay.
    slot_wanted: Optional[Callable[[], bool]] = None
    _on_done: Optional[Callable[[], object]] = None
    _up: Optional[_Direction] = None
    _down: Optional[_Direction] = None
    _finish_timeout: Optional[float] = None
    _client_finish_timeout: Optional[float] = None
    _timer = None
    _recheck = None
    _expired = False
    _finishing = False
    _client_time_up = False
    _backend_fin_seen = False

    def __init__(self, client, backend, counter) -> None:
        self.client = client
        self.backend = backend
        self.counter = counter
        self.loop = gevent.get_hub().loop

    def start(
        self,
        on_done: Callable[[], object],
        finish_timeout: Optional[float],
        client_finish_timeout: Optional[float],
        client_watch=None,
        backend_watch=None,
        up_chunk=None,
        down_chunk=None,
        backend_fin: bool = False,
    ) -> None:
        """Start relaying. ``on_done()`` is called once when the exchange has ended (see
        :attr:`reason`), unless :meth:`stop` came first: from an event-loop callback, or from
        within this call if the exchange ends at once. It may start the next relay.

        Two limits bound the waits that depend on a peer the other side is done with:
        ``finish_timeout``, how long the backend may keep talking after the client reset (its
        reply is discarded), and ``client_finish_timeout``, how long the client may keep its
        side open after the backend closed (0: not at all; the exchange ends as ``closed``).
        None is no limit.

        The exchange may have begun elsewhere (a connection's flat path): then it is taken
        over with the stopped read watchers of both sockets, a chunk read from either side but
        not yet sent on (``up_chunk`` from the client, ``down_chunk`` from the backend), and
        ``backend_fin``: the backend's EOF was read and passed on to the client, and whether
        the backend closed for good has been asked (it had not)."""
        self._on_done = on_done
        self._finish_timeout = finish_timeout
        self._client_finish_timeout = client_finish_timeout
        up = self._up = _Direction(self, self.client, self.backend, True, client_watch)
        down = self._down = _Direction(self, self.backend, self.client, False, backend_watch)
        up.other, down.other = down, up
        up.start()
        if backend_fin:
            down.done = True
            self._backend_fin_seen = True
            if client_finish_timeout is not None:
                self._timer = self.loop.timer(client_finish_timeout)
                self._timer.start(self._client_finish_expired)
        else:
            down.start()
        if up_chunk is not None and up_chunk:
            up.hold(up_chunk)
        if down_chunk is not None and down_chunk and self._down is not None:
            down.hold(down_chunk)

    def eof(self, side: str) -> None:
        """The EOF of ``side`` (CLIENT or BACKEND) was read before this relay took over."""
        direction = self._up if side == CLIENT else self._down
        if direction is not None:
            direction._eof()

    def stop(self) -> None:
        """Stop relaying now; no callback. The sockets are left to the caller."""
        self._on_done = None
        self._release()

    # Called from the directions' callbacks and the timers, in the event loop. Each call looks
    # at the state and either waits on (arming a timer where a wait has a limit) or ends.

    def changed(self) -> None:
        if self.reason is not None or self._up is None:
            return
        up, down = self._up, self._down
        if self._finishing:
            if down.done or self.failure is not None or self._expired:
                self.backend_finished = down.done and self.failure is None
                self._end("client-reset")
        elif self.failure is not None:
            if self.failure[0] == BACKEND:
                self._end("backend-reset")
            else:
                self._finish_backend()
        elif self._client_time_up:
            # The backend closed its side, the client went on sending past its finish time:
            # what reached the backend is not the whole upload, and it must not look whole.
            self._end("client-finish-timeout")
        elif self._expired or (up.done and down.done):
            self.backend_finished = True
            self.client_open = not up.done
            self._end("closed")
        elif self._timer is None:
            if down.done:
                if self._backend_fin_seen:
                    return None  # (no client_finish_timeout: nothing more to arm)
                self._backend_fin_seen = True
                # The backend has finished sending; the client gets a bounded time to finish
                # too (it may still be sending, and the backend reading). Whether the backend
                # closed for good (then nothing more of the client's can reach it, and the
                # exchange is over at once) matters only if the client does not close at
                # once: it is asked when the client sends more, or after backend_close_delay.
                limit = self._client_finish_timeout
                if limit == 0:
                    return self._expire()
                wanted = self.slot_wanted
                if wanted is not None and wanted() and self.backend_closed():
                    self.backend_done = True
                    return self._expire()
                if self.client_fin:
                    self.client_fin = False
                    try:
                        self.client.shutdown(socket.SHUT_WR)
                    except OSError as e:
                        return self.failed(CLIENT, e)
                if self.backend_closed is not None:
                    # (The client's time starts once the answer is known: see _ask_backend.)
                    up.ask_first = True
                    self._recheck = self.loop.timer(self.backend_close_delay)
                    self._recheck.start(self._ask_backend)
                elif limit is not None:
                    self._timer = self.loop.timer(limit)
                    self._timer.start(self._client_finish_expired)
            elif up.done:
                # The client has finished sending; the backend may take as long as it needs
                # (the TTL bounds it) to answer. Nobody reads the client meanwhile, so look
                # now and then whether it is still there.
                every = self.client_check_interval
                self._timer = self.loop.timer(every, every)
                self._timer.start(self._check_client)

    def failed(self, side: str, error: OSError) -> None:
        if self.failure is None:
            self.failure = (side, error)
        self.changed()

    def _expire(self) -> None:
        self._expired = True
        self.changed()

    def _client_finish_expired(self) -> None:
        self._client_time_up = True
        self.changed()

    def _ask_backend(self) -> bool:
        """Ask (once) whether the backend closed for good; if so, end the exchange. True if it
        ended."""
        recheck, self._recheck = self._recheck, None
        if recheck is None:
            return False
        recheck.stop()
        recheck.close()
        up = self._up
        if up is not None:
            up.ask_first = False
        if self.reason is not None or self._finishing or self.failure is not None:
            return False
        if self.backend_closed():
            self.backend_done = True
            self._expire()
            return True
        limit = self._client_finish_timeout
        if limit is not None and self._timer is None:
            self._timer = self.loop.timer(limit)
            self._timer.start(self._client_finish_expired)
        return False

    def client_sent_after_fin(self) -> bool:
        """The client sent bytes after the backend's FIN: True if the backend has closed for
        good, which ends the exchange (the bytes are the lingering client's, dropped)."""
        return self._ask_backend()

    def _check_client(self) -> None:
        if _gone(self.client):
            self.failed(CLIENT, OSError(errno.ECONNRESET, "client gone"))

    def _finish_backend(self) -> None:
        """The client is gone: half-close toward the backend and let it finish, discarding what
        it still sends, so that the next client never overlaps this one (for at most
        ``finish_timeout``)."""
        up, down = self._up, self._down
        up.stop()
        if not up.done:
            try:
                self.backend.shutdown(socket.SHUT_WR)
            except OSError:
                return self._end("client-reset")
        if down.done:
            self.backend_finished = True
            return self._end("client-reset")
        self.failure = None  # from here on only the backend's own end matters
        self._finishing = True
        self._expired = False
        self._stop_timer()
        down.sink()
        if self._finish_timeout is not None:
            self._timer = self.loop.timer(self._finish_timeout)
            self._timer.start(self._expire)

    def _end(self, reason: str) -> None:
        # Straight away: the caller hands the slot on without waiting for a later turn of the
        # loop. The direction that got here touches nothing once it returns.
        self.reason = reason
        self._done()

    def _done(self) -> None:
        self._release()
        on_done, self._on_done = self._on_done, None
        if on_done is not None:
            on_done()

    def _release(self) -> None:
        self._stop_timer()
        up, down = self._up, self._down
        self._up = self._down = None
        if up is not None and self.client_open and self.reason == "closed":
            up.on_read.stop()
            self.client_watch, up.on_read = up.on_read, None
        for d in (up, down):
            if d is not None:
                d.close()  # which stops its watchers

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.stop()
            self._timer.close()
            self._timer = None
        if self._recheck is not None:
            self._recheck.stop()
            self._recheck.close()
            self._recheck = None


class Ended:
    """How an exchange that needed no Relay ended (``closed``): the attributes a finished
    Relay has."""

    __slots__ = ("client_watch", "client_open", "client_fin", "backend_done")
    reason = "closed"
    backend_finished = True

    def __init__(self, client_watch=None, client_fin: bool = False, backend_done: bool = False):
        self.client_watch = client_watch
        self.client_open = client_watch is not None
        self.client_fin = client_fin
        self.backend_done = backend_done


def _gone(sock) -> bool:
    """Whether the socket has a pending error (reset, keepalive timeout), without reading."""
    try:
        return bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR))
    except OSError:
        return True
