"""The two-way byte pump between a client and its backend connection.

What it owns: moving bytes, passing on half-closes, and deciding how the exchange ended
(``closed``, ``client-reset`` or ``backend-reset``). The rule it keeps: at most one chunk per
direction is in flight, so a reader that stops reading stops the writer (backpressure reaches the
sender through the kernel's socket buffers, never through memory of ours).

It knows nothing of slots, hooks or lifetimes: the caller bounds :meth:`Relay.run` with a
``gevent.Timeout`` for the TTL, and the pumps are killed when ``run`` leaves for any reason.
"""

from __future__ import annotations

import fcntl
import os
import socket
import sys
from typing import Optional, Tuple

import gevent
from gevent import Greenlet

__all__ = ["Relay", "CLIENT", "BACKEND", "BUFSIZE"]

#: Bytes read per system call, and the most one direction holds at once.
BUFSIZE = 64 * 1024

CLIENT = "client"
BACKEND = "backend"

_Failure = Optional[Tuple[str, OSError]]


#: Zero-copy relaying through a pipe (Linux): used once a direction shows bulk traffic.
SPLICE = hasattr(os, "splice") and sys.platform.startswith("linux")
#: Bytes moved per splice call (the pipe is sized to match); also the most in flight.
SPLICE_CHUNK = 1 << 20
_F_SETPIPE_SZ = 1031
_SPLICE_FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)


def _pump(src, dst, counter, attr: str, src_side: str, dst_side: str) -> _Failure:
    """Copy src to dst until src says EOF, then shut down dst's write side.

    Returns None after a clean EOF, or ``(side, error)`` naming the side whose socket failed.
    Failures are returned, not raised: a peer resetting its connection is an ordinary event for
    a proxy, not an error worth a traceback.

    Small exchanges go through one buffer with recv/send. A read that fills the whole buffer
    means more is coming: on Linux the rest then moves with splice() through a pipe, so the
    bytes never enter Python (each chunk is written out before the next is read, so at most one
    chunk is in flight either way).
    """
    buf = bytearray(BUFSIZE)
    view = memoryview(buf)
    recv_into = src.recv_into
    sendall = dst.sendall
    while True:
        try:
            n = recv_into(buf)
        except OSError as e:
            return src_side, e
        if not n:
            break
        try:
            sendall(view[:n])
        except OSError as e:
            return dst_side, e
        setattr(counter, attr, getattr(counter, attr) + n)
        if n == BUFSIZE and SPLICE:
            del view, buf
            failure = _splice_pump(src, dst, counter, attr, src_side, dst_side)
            if failure is not None:
                return failure
            break
    try:
        dst.shutdown(socket.SHUT_WR)
    except OSError as e:
        return dst_side, e
    return None


def _splice_pump(src, dst, counter, attr, src_side, dst_side) -> _Failure:
    """The bulk half of :func:`_pump`: socket to pipe to socket until EOF."""
    try:
        pipe_r, pipe_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return _copy_rest(src, dst, counter, attr, src_side, dst_side)
    hub = gevent.get_hub()
    src_fd, dst_fd = src.fileno(), dst.fileno()
    readable = hub.loop.io(src_fd, 1)
    writable = hub.loop.io(dst_fd, 2)
    splice = os.splice
    try:
        try:
            fcntl.fcntl(pipe_w, _F_SETPIPE_SZ, SPLICE_CHUNK)
        except OSError:
            pass  # a smaller pipe only means more calls
        while True:
            try:
                n = splice(src_fd, pipe_w, SPLICE_CHUNK, flags=_SPLICE_FLAGS)
            except BlockingIOError:
                hub.wait(readable)
                continue
            except OSError as e:
                return src_side, e
            if not n:
                return None
            left = n
            while left:
                try:
                    left -= splice(pipe_r, dst_fd, left, flags=_SPLICE_FLAGS)
                except BlockingIOError:
                    hub.wait(writable)
                except OSError as e:
                    return dst_side, e
            setattr(counter, attr, getattr(counter, attr) + n)
    finally:
        readable.close()
        writable.close()
        os.close(pipe_r)
        os.close(pipe_w)


def _copy_rest(src, dst, counter, attr, src_side, dst_side) -> _Failure:
    buf = bytearray(BUFSIZE)
    view = memoryview(buf)
    while True:
        try:
            n = src.recv_into(buf)
        except OSError as e:
            return src_side, e
        if not n:
            return None
        try:
            dst.sendall(view[:n])
        except OSError as e:
            return dst_side, e
        setattr(counter, attr, getattr(counter, attr) + n)


class Relay:
    """Relays between two connected gevent sockets; one greenlet per direction.

    ``counter`` is any object with integer attributes ``bytes_up`` (client to backend) and
    ``bytes_down`` (backend to client); they are updated as bytes are delivered.
    """

    #: Seconds between checks that a client which has finished sending is still connected.
    client_check_interval = 1.0

    def __init__(self, client, backend, counter) -> None:
        self.client = client
        self.backend = backend
        self.counter = counter
        #: True once the backend side has been seen to finish (EOF or drained): the caller may
        #: close it gracefully. False means the caller should abort it.
        self.backend_finished = False

    def run(self, finish_timeout: Optional[float]) -> str:
        """Relay until both directions are done; return the end reason.

        ``finish_timeout`` bounds the two waits that depend on a peer that has nothing left to
        say: how long the backend may keep talking after the client reset (its reply is
        discarded), and how long the client may keep its side open after the backend closed.
        """
        c, b = self.client, self.backend
        up = Greenlet.spawn(_pump, c, b, self.counter, "bytes_up", CLIENT, BACKEND)
        down = Greenlet.spawn(_pump, b, c, self.counter, "bytes_down", BACKEND, CLIENT)
        try:
            gevent.wait((up, down), count=1)
            failure = _failure(up) or _failure(down)
            if failure is None:
                if not down.ready():
                    # The client has finished sending; the backend may take as long as it needs
                    # (the TTL bounds it) to answer. Nobody reads the client meanwhile, so look
                    # now and then whether it is still there (a reset, or keepalive giving up).
                    while not down.ready():
                        down.join(self.client_check_interval)
                        if not down.ready() and _gone(c):
                            failure = (CLIENT, OSError("client gone while waiting for reply"))
                            break
                elif not up.ready():
                    # The backend has finished; the client gets a bounded time to finish too.
                    self.backend_finished = True
                    up.join(finish_timeout)
                failure = failure or _failure(up) or _failure(down)
            if failure is None:
                self.backend_finished = True
                return "closed"
            side, _err = failure
            if side == BACKEND:
                return "backend-reset"
            gevent.killall((up, down))
            self.backend_finished = self._finish_backend(finish_timeout)
            return "client-reset"
        finally:
            gevent.killall((up, down))

    def _finish_backend(self, finish_timeout: Optional[float]) -> bool:
        """The client is gone: half-close toward the backend and let it finish, discarding what
        it still sends, so that the next client never overlaps this one. True if it finished."""
        b = self.backend
        try:
            b.shutdown(socket.SHUT_WR)
        except OSError:
            return False
        sink = bytearray(BUFSIZE)
        try:
            with gevent.Timeout(finish_timeout, False):
                while b.recv_into(sink):
                    pass
                return True
        except OSError:
            return False
        return False


def _gone(sock) -> bool:
    """Whether the socket has a pending error (reset, keepalive timeout), without reading."""
    try:
        return bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR))
    except OSError:
        return True


def _failure(g: Greenlet) -> _Failure:
    if not g.ready():
        return None
    if not g.successful():
        raise g.exception  # a bug in the pump itself, not a peer's doing
    return g.value
