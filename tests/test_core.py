"""The lock proxy in-process, on real loopback sockets: slots, FIFO, queue departures, TTL,
half-close, connect retry, queue limits, hooks, shutdown, the log line, socket options and
backpressure."""

import hashlib
import os
import queue
import socket as _stdsocket
import subprocess
import sys
import time

import gevent
import pytest
from gevent import socket
from gevent.event import Event

from conftest import (
    LOOPBACK,
    connect,
    holds_socket,
    kernel_tcp,
    live_greenlets,
    open_fds,
    pipes,
    process_socket,
    recv_all,
    recv_exactly,
    reset,
    tcp_state,
    wait_until,
)
from tcplock import TCPLock
from tcplock.hooks import CommandHook

pytestmark = pytest.mark.timeout(30)


def queued(lock, n):
    wait_until(lambda: lock.queued == n, what=f"{n} queued")


def active(lock, n):
    wait_until(lambda: len(lock.active) == n, what=f"{n} active")


# -- 1. slots --------------------------------------------------------------------------------


@pytest.mark.parametrize("slots", [1, 2, 3])
def test_backend_never_sees_more_than_slots_connections(make_backend, make_lock, slots):
    backend = make_backend("hold")
    lock = make_lock(backend, slots=slots)
    clients = [connect(lock.server_port) for _ in range(slots + 3)]
    for i, c in enumerate(clients):
        c.sendall(b"%d" % i)
    for _ in range(slots):
        backend.next_conn()
    queued(lock, 3)
    assert backend.current == slots

    # Let them through one by one (backend and client both end); the count never exceeds
    # the slots.
    def finish(conn):
        wait_until(lambda: conn.received)
        conn.release.set()
        clients[int(conn.received)].close()

    for _ in range(3):
        finish(next(c for c in backend.conns if not c.release.is_set()))
        backend.next_conn()
    for c in backend.conns:
        if not c.release.is_set():
            finish(c)
    wait_until(lambda: backend.all_closed.is_set() and len(backend.conns) == slots + 3)
    assert backend.most == slots


def test_slot_is_held_while_on_activate_runs(make_backend, make_lock):
    backend = make_backend("echo")
    in_hook = Event()
    go_on = Event()
    calls = []

    def on_activate(conn):
        calls.append(conn.id)
        in_hook.set()
        go_on.wait()

    lock = make_lock(backend, on_activate=on_activate)
    a = connect(lock.server_port)
    in_hook.wait(5)
    b = connect(lock.server_port)
    queued(lock, 1)
    gevent.sleep(0.05)
    assert calls == [1] and backend.count == 0
    go_on.set()
    a.sendall(b"a")
    assert recv_exactly(a, 1) == b"a"
    a.close()
    b.sendall(b"b")
    assert recv_exactly(b, 1) == b"b"
    assert calls == [1, 2]
    assert backend.most == 1


def test_next_client_waits_until_backend_side_has_finished(make_backend, make_lock, conn_log):
    # The client resets; the backend is still busy. The next client must not be let in until
    # tcplock has seen the backend finish.
    finishing = Event()

    def slow_to_finish(conn):
        while conn.sock.recv(65536):
            pass
        finishing.set()
        conn.release.wait()
        conn.sock.sendall(b"late reply")
        conn.sock.close()

    backend = make_backend(slow_to_finish)
    lock = make_lock(backend, finish_timeout=10)
    a = connect(lock.server_port)
    a.sendall(b"x")
    first = backend.next_conn()
    b = connect(lock.server_port)
    queued(lock, 1)
    reset(a)
    assert finishing.wait(5), "the backend was not half-closed after the client reset"
    gevent.sleep(0.1)
    assert backend.count == 1 and lock.queued == 1
    first.release.set()
    assert conn_log.next_end()["end"] == "client-reset"
    backend.next_conn()
    assert backend.most == 1
    b.close()


def test_backend_finish_after_client_reset_is_bounded(make_backend, make_lock, conn_log):
    backend = make_backend("never")
    lock = make_lock(backend, finish_timeout=0.2)
    a = connect(lock.server_port)
    backend.next_conn()
    b = connect(lock.server_port)
    queued(lock, 1)
    reset(a)
    end = conn_log.next_end()
    assert end["end"] == "client-reset"
    backend.next_conn()  # b got the slot although the first backend connection never closed
    b.close()


# -- 2. FIFO ---------------------------------------------------------------------------------


def test_clients_are_let_through_in_accept_order(make_backend, make_lock):
    backend = make_backend("hold")
    lock = make_lock(backend)
    first = connect(lock.server_port)
    first.sendall(b"first")
    backend.next_conn()
    clients = []
    for i in range(20):
        c = connect(lock.server_port)
        c.sendall(b"%02d" % i)
        clients.append(c)
        queued(lock, i + 1)
    order = []
    for _ in range(20):
        backend.conns[-1].release.set()
        conn = backend.next_conn()
        wait_until(lambda conn=conn: len(conn.received) >= 2)
        order.append(bytes(conn.received))
    backend.conns[-1].release.set()
    assert order == [b"%02d" % i for i in range(20)]


def test_client_arriving_as_slot_frees_queues_behind_waiters(make_backend, make_lock):
    backend = make_backend("hold")
    lock = make_lock(backend)
    a = connect(lock.server_port)
    a.sendall(b"a")
    held = backend.next_conn()
    b = connect(lock.server_port)
    b.sendall(b"b")
    queued(lock, 1)
    # Free the slot and, in the same instant, let a newcomer arrive.
    held.release.set()
    c = connect(lock.server_port)
    c.sendall(b"c")
    second = backend.next_conn()
    wait_until(lambda: second.received)
    assert bytes(second.received) == b"b"
    second.release.set()
    third = backend.next_conn()
    wait_until(lambda: third.received)
    assert bytes(third.received) == b"c"
    third.release.set()


# -- 3. queued clients that leave ------------------------------------------------------------


@pytest.mark.parametrize("how", ["close", "reset"])
def test_queued_client_that_leaves_never_reaches_backend(make_backend, make_lock, conn_log, how):
    backend = make_backend("hold")
    activations = []
    lock = make_lock(backend, on_activate=lambda conn: activations.append(conn.id))
    a = connect(lock.server_port)
    held = backend.next_conn()
    b = connect(lock.server_port)
    queued(lock, 1)
    (b.close if how == "close" else lambda: reset(b))()
    end = conn_log.next_end()
    assert end["end"] == "left-queue"
    assert lock.queued == 0
    c = connect(lock.server_port)
    c.sendall(b"c")
    queued(lock, 1)
    held.release.set()
    nxt = backend.next_conn()
    wait_until(lambda: nxt.received)
    assert bytes(nxt.received) == b"c"
    assert activations == [1, 3]
    a.close()
    c.close()


def test_queued_client_with_data_then_eof_stays_and_gets_its_answer(make_backend, make_lock):
    backend = make_backend("reply_at_eof")
    lock = make_lock(backend)
    a = connect(lock.server_port)
    a.sendall(b"first")
    backend.next_conn()
    b = connect(lock.server_port)
    b.sendall(b"request from b")
    b.shutdown(socket.SHUT_WR)
    queued(lock, 1)
    gevent.sleep(0.1)
    assert lock.queued == 1  # not taken for a departure
    a.shutdown(socket.SHUT_WR)
    assert recv_all(a) == b"got:first"
    assert recv_all(b) == b"got:request from b"


@pytest.mark.parametrize("how", ["close", "reset", "data then close"])
def test_client_that_acted_before_it_was_accepted_is_judged_at_once(
    make_backend, make_lock, conn_log, how
):
    # Accepting is paused, so the client's handshake completes in the kernel's backlog and
    # whatever it does next is already there when tcplock first sees it.
    backend = make_backend("reply_at_eof")
    lock = make_lock(backend)
    a = connect(lock.server_port)
    a.sendall(b"first")
    backend.next_conn()
    lock.stop_accepting()
    b = connect(lock.server_port)
    if how == "reset":
        reset(b)
    else:
        if how == "data then close":
            b.sendall(b"request from b")
        b.shutdown(socket.SHUT_WR)
    lock.start_accepting()  # (on loopback, the packets were delivered within the calls above)
    if how == "data then close":
        queued(lock, 1)
        a.shutdown(socket.SHUT_WR)
        assert recv_all(a) == b"got:first"
        assert recv_all(b) == b"got:request from b"
        assert backend.current <= 1
    else:
        assert conn_log.next_end()["end"] == "left-queue"
        assert lock.queued == 0
        assert len(backend.conns) == 1
        a.close()


# -- 4. TTL ----------------------------------------------------------------------------------


def test_ttl_cuts_both_sides_and_on_timeout_runs_before_next_client(
    make_backend, make_lock, conn_log
):
    backend = make_backend("never")
    in_hook = Event()
    hook_may_return = Event()
    timeouts = []

    def on_timeout(conn):
        timeouts.append((conn.id, conn.end))
        in_hook.set()
        hook_may_return.wait()

    lock = make_lock(backend, timeout=0.3, on_timeout=on_timeout)
    a = connect(lock.server_port)
    first = backend.next_conn()
    started = time.monotonic()
    b = connect(lock.server_port)
    queued(lock, 1)
    with pytest.raises((ConnectionResetError, EOFError)):
        data = a.recv(10)
        raise EOFError(data)
    elapsed = time.monotonic() - started
    assert 0.28 <= elapsed <= 0.3 + 0.25, elapsed
    # The backend side was cut too.
    with gevent.Timeout(2):
        with pytest.raises(ConnectionResetError):
            if not first.sock.recv(10):
                raise ConnectionResetError("eof")
    assert in_hook.wait(2)
    assert timeouts == [(1, "ttl")]
    gevent.sleep(0.1)
    assert backend.count == 1 and lock.queued == 1  # b waits for the hook
    hook_may_return.set()
    backend.next_conn()
    assert conn_log.next_end()["end"] == "ttl"
    b.close()


def test_ttl_counts_from_backend_connection_not_queue_time(make_backend, make_lock):
    backend = make_backend("echo")
    lock = make_lock(backend, timeout=0.5)
    a = connect(lock.server_port)
    a.sendall(b"a")
    recv_exactly(a, 1)
    b = connect(lock.server_port)
    queued(lock, 1)
    gevent.sleep(0.4)
    a.close()
    b.sendall(b"b")
    assert recv_exactly(b, 1) == b"b"
    gevent.sleep(0.2)  # b has waited 0.6 s in all, but been active only ~0.2 s
    b.sendall(b"c")
    assert recv_exactly(b, 1) == b"c"


# -- 5. half-close and resets ----------------------------------------------------------------


def test_client_half_close_still_gets_reply(make_backend, make_lock, conn_log):
    backend = make_backend("reply_at_eof")
    lock = make_lock(backend)
    c = connect(lock.server_port)
    c.sendall(b"hello")
    c.shutdown(socket.SHUT_WR)
    assert recv_all(c) == b"got:hello"
    end = conn_log.next_end()
    assert end["end"] == "closed" and end["up"] == "5" and end["down"] == "9"


def test_backend_half_close_lets_client_keep_sending(make_backend, make_lock):
    def reader(conn):
        conn.sock.sendall(b"banner")
        conn.sock.shutdown(socket.SHUT_WR)
        while True:
            data = conn.sock.recv(65536)
            if not data:
                conn.eof.set()
                break
            conn.received += data

    backend = make_backend(reader)
    lock = make_lock(backend, finish_timeout=10)
    c = connect(lock.server_port)
    assert recv_all(c) == b"banner"  # EOF passed on to the client
    c.sendall(b"still talking")
    c.shutdown(socket.SHUT_WR)
    conn = backend.next_conn()
    assert conn.eof.wait(5)
    assert bytes(conn.received) == b"still talking"


@pytest.mark.parametrize("client_finish_timeout", [0, 10])
def test_client_finish_timeout_decides_whether_a_lingering_client_keeps_the_slot(
    make_backend, make_lock, conn_log, client_finish_timeout
):
    # The backend answers and half-closes (it would still read); the first client reads the
    # answer and its EOF but keeps its own side open.
    def answer_and_half_close(conn):
        conn.sock.sendall(b"answer %d" % conn.number)
        conn.sock.shutdown(socket.SHUT_WR)
        while conn.sock.recv(1024):
            pass
        conn.sock.close()

    backend = make_backend(answer_and_half_close)
    lock = make_lock(backend, finish_timeout=10, client_finish_timeout=client_finish_timeout)
    a = connect(lock.server_port)
    backend.next_conn()
    b = connect(lock.server_port)
    assert recv_all(a) == b"answer 1"
    if client_finish_timeout == 0:
        # The slot passed on as the backend closed: b is served while a is still open.
        assert recv_all(b) == b"answer 2"
        assert conn_log.next_end()["end"] == "closed"
    else:
        queued(lock, 1)
        gevent.sleep(0.2)
        assert lock.queued == 1 and backend.count == 1  # a still holds the slot
        a.close()
        assert conn_log.next_end()["end"] == "closed"
        assert recv_all(b) == b"answer 2"
    a.close()
    b.close()


def test_a_half_closed_backend_has_the_clients_eof_before_the_next_client_connects(
    make_backend, make_lock, conn_log, on_connect
):
    # The backend answers, half-closes and reads on; the client sends more and its EOF. That
    # EOF reaches the backend with the close of its socket, which must come before the next
    # client's connect, as the backend sees it: the kernel's state of the backend's earlier
    # sockets is read at the moment tcplock calls connect() toward the backend.
    def answer_half_close_read_to_eof(conn):
        conn.sock.recv(100)
        conn.sock.sendall(b"answer %d" % conn.number)
        conn.sock.shutdown(socket.SHUT_WR)
        while True:
            data = conn.sock.recv(65536)
            if not data:
                break
            conn.received += data
        gevent.sleep(0.5)  # keep the socket, so that its state can be read
        conn.sock.close()

    backend = make_backend(answer_half_close_read_to_eof)
    lock = make_lock(backend, finish_timeout=10, client_finish_timeout=10)
    seen = []  # the state of the backend's side of earlier connections, at each connect

    def recording(address):
        if address[1] == backend.server_port:
            seen.append([tcp_state(c.sock) for c in backend.conns])

    on_connect(recording)
    a = connect(lock.server_port)
    a.sendall(b"req a\n")
    backend.next_conn()
    b = connect(lock.server_port)
    queued(lock, 1)
    assert recv_all(a) == b"answer 1"
    a.sendall(b"late words from a")
    a.shutdown(socket.SHUT_WR)
    assert conn_log.next_end()["end"] == "closed"
    b.sendall(b"req b\n")
    assert recv_exactly(b, 8) == b"answer 2"
    assert bytes(backend.conns[0].received) == b"late words from a"
    assert seen[0] == [] and seen[1] == ["CLOSE"], seen  # a's EOF had reached the backend
    a.close()
    b.close()


@pytest.mark.parametrize("check,sends", [(True, False), (True, True), (False, False)])
def test_backend_that_closed_for_good_passes_the_slot_on_without_waiting_for_the_client(
    make_backend, make_lock, conn_log, check, sends
):
    def answer_and_close(conn):
        conn.sock.sendall(b"answer %d" % conn.number)
        conn.sock.close()

    backend = make_backend(answer_and_close)
    lock = make_lock(backend, finish_timeout=10, client_finish_timeout=10)
    lock.check_backend_close = check
    a = connect(lock.server_port)
    backend.next_conn()
    b = connect(lock.server_port)
    assert recv_all(a) == b"answer 1"  # a has its answer and EOF, and keeps its side open
    if sends:
        a.sendall(b"more")  # at once: bytes nothing on the backend's side can read
    if check:
        # Nothing on the backend's side can read a's bytes any more: b is served at once.
        assert recv_all(b) == b"answer 2"
        assert conn_log.next_end()["end"] == "closed"
        a.sendall(b"late")  # read and dropped while a lingers: no reset for a
        gevent.sleep(0.05)
        assert a.recv(1) == b""
    else:
        queued(lock, 1)
        gevent.sleep(0.2)
        assert lock.queued == 1 and backend.count == 1  # a holds the slot until it closes
        a.close()
        assert conn_log.next_end()["end"] == "closed"
        assert recv_all(b) == b"answer 2"
    a.close()
    b.close()


def test_peer_check_tells_closed_from_half_closed_and_ignores_other_hosts():
    from tcplock.peer import PeerCheck

    check = PeerCheck()
    listener = _stdsocket.socket()
    listener.bind((LOOPBACK, 0))
    listener.listen(1)
    ours = _stdsocket.create_connection(listener.getsockname())
    theirs, _ = listener.accept()
    assert check.closed(ours) is False
    theirs.shutdown(_stdsocket.SHUT_WR)
    assert ours.recv(1) == b""
    assert check.closed(ours) is False  # half-closed: it may still read
    theirs.close()
    assert check.closed(ours) is True
    ours.close()
    listener.close()

    class Remote:  # a connection to another host: nothing to ask the kernel about
        family = _stdsocket.AF_INET

        def getpeername(self):
            return ("192.0.2.1", 80)

        def getsockname(self):
            return ("192.0.2.2", 40000)

    assert check.closed(Remote()) is None
    check.close()


def test_backend_reset_ends_client_connection_at_once(make_backend, make_lock, conn_log):
    backend = make_backend("reset")
    lock = make_lock(backend)
    c = connect(lock.server_port)
    with gevent.Timeout(2):
        with pytest.raises((ConnectionResetError, EOFError)):
            if not c.recv(10):
                raise EOFError
    assert conn_log.next_end()["end"] == "backend-reset"


def test_backend_reset_mid_stream_frees_slot(make_backend, make_lock, conn_log):
    def reset_after_some(conn):
        conn.sock.sendall(b"partial")
        conn.sock.recv(10)
        reset(conn.sock)

    backend = make_backend(reset_after_some)
    lock = make_lock(backend)
    a = connect(lock.server_port)
    assert recv_exactly(a, 7) == b"partial"
    b = connect(lock.server_port)
    queued(lock, 1)
    a.sendall(b"go")
    assert conn_log.next_end()["end"] == "backend-reset"
    assert recv_exactly(b, 7) == b"partial"


# -- 6. backend connect retry ----------------------------------------------------------------


def test_backend_connect_is_retried_until_it_comes_up(make_lock, make_backend, conn_log):
    placeholder = _stdsocket.socket()
    placeholder.bind((LOOPBACK, 0))
    port = placeholder.getsockname()[1]
    placeholder.close()
    lock = make_lock(port, connect_timeout=5.0)
    c = connect(lock.server_port)
    c.sendall(b"early")
    gevent.sleep(0.3)  # the backend is "restarting"
    from conftest import Backend

    backend = Backend("echo")
    backend.set_listener((LOOPBACK, port))
    backend.start()
    try:
        assert recv_exactly(c, 5) == b"early"
    finally:
        c.close()
        backend.stop(timeout=0)


def test_backend_down_closes_client_and_passes_slot(make_lock, conn_log):
    placeholder = _stdsocket.socket()
    placeholder.bind((LOOPBACK, 0))
    port = placeholder.getsockname()[1]
    placeholder.close()
    lock = make_lock(port, connect_timeout=0.3)
    a = connect(lock.server_port)
    b = connect(lock.server_port)
    assert recv_all(a) == b""
    assert conn_log.next_end()["end"] == "backend-refused"
    assert recv_all(b) == b""
    assert conn_log.next_end()["end"] == "backend-refused"
    assert lock.gate.held == 0


def _warm(lock, listener):
    """The lock's check of the backend at start, then one connection through the lock to a
    plain listener: the lock has resolved the backend's address since, so the next connection
    is made from the event loop."""
    check, _ = listener.accept()
    assert check.recv(1) == b""  # closed at once
    check.close()
    c = connect(lock.server_port)
    b, _ = listener.accept()
    c.close()
    assert b.recv(1) == b""  # the lock closes first: no TIME_WAIT on the listener's port
    b.close()


def _lock_before_a_full_backend(make_lock, conn_log, connect_timeout):
    """A lock whose backend's accept queue is full: its next connection's SYN is dropped, so
    that connection stays under way (the SYN is sent again after about a second)."""
    listener = socket.socket()
    listener.bind((LOOPBACK, 0))
    listener.listen(0)  # one connection waiting to be accepted fills its queue
    lock = make_lock(listener.getsockname()[1], connect_timeout=connect_timeout)
    _warm(lock, listener)
    assert conn_log.next_end()["end"] == "closed"
    filler = _stdsocket.create_connection(listener.getsockname())
    return lock, listener, filler


def test_connections_without_hooks_cost_no_greenlet_each(make_lock):
    # Connections without hooks run in the event loop itself, with no greenlet of their own
    # (README): twenty relaying at once, and a hundred waiting, add no greenlet per connection,
    # and once they have ended nothing of theirs is left running. The backend is a plain
    # listener worked by this test's own greenlet, so that it adds none either.
    listener = socket.socket()
    listener.bind((LOOPBACK, 0))
    listener.listen(128)
    listener.settimeout(5)
    lock = make_lock(listener.getsockname()[1], slots=20)
    _warm(lock, listener)
    wait_until(lambda: not lock.connections, what="the warm-up connection ended")
    before = live_greenlets()
    pairs = []
    for i in range(20):
        c = connect(lock.server_port)
        c.sendall(b"ping %02d" % i)
        b, _ = listener.accept()
        assert recv_exactly(b, 7) == b"ping %02d" % i
        b.sendall(b"pong %02d" % i)
        assert recv_exactly(c, 7) == b"pong %02d" % i
        pairs.append((c, b))
    waiting = [connect(lock.server_port) for _ in range(100)]
    queued(lock, 100)
    assert len(lock.active) == 20
    assert live_greenlets() - before < 5
    for c in waiting:
        c.close()
    queued(lock, 0)
    for c, b in pairs:
        c.close()
        b.close()
    wait_until(lambda: not lock.connections, what="every connection ended")
    assert live_greenlets() <= before
    listener.close()


def test_a_backend_slow_to_accept_is_waited_for(make_lock, conn_log):
    lock, listener, filler = _lock_before_a_full_backend(make_lock, conn_log, 10.0)
    port = listener.getsockname()[1]
    c = connect(lock.server_port)
    c.sendall(b"ping")
    # The backend's queue is full, so tcplock's SYN was dropped: its connection is under way
    # (the kernel shows it), and the client holds the slot meanwhile.
    wait_until(lambda: "SYN_SENT" in kernel_tcp(port), what="a connection under way")
    assert len(lock.active) == 1 and lock.queued == 0
    listener.accept()[0].close()  # room again: the retransmitted SYN gets in (after ~1 s)
    listener.settimeout(5)
    b, _ = listener.accept()
    assert recv_exactly(b, 4) == b"ping"
    b.sendall(b"pong")
    assert recv_exactly(c, 4) == b"pong"
    c.close()
    assert recv_all(b) == b""
    b.close()
    assert conn_log.next_end()["end"] == "closed"
    for s in (filler, listener):
        s.close()


def test_a_backend_that_never_accepts_is_given_up_after_connect_timeout(make_lock, conn_log):
    lock, listener, filler = _lock_before_a_full_backend(make_lock, conn_log, 0.5)
    c = connect(lock.server_port)
    line = conn_log.next_end()
    assert line["end"] == "backend-refused"
    # The time spent connecting counts: not a second connect_timeout on top. (The loop's timers
    # count from the loop's time of the turn, which may be a few milliseconds behind the clock
    # that dates the activation on a loaded machine.)
    assert 0.48 <= float(line["active"]) < 0.9
    assert recv_all(c) == b""
    assert "SYN_SENT" not in kernel_tcp(listener.getsockname()[1])  # the attempt was given up
    for s in (c, filler, listener):
        s.close()


def test_stop_cuts_a_connection_still_connecting(make_lock, conn_log):
    lock, listener, filler = _lock_before_a_full_backend(make_lock, conn_log, 10.0)
    port = listener.getsockname()[1]
    c = connect(lock.server_port)
    wait_until(lambda: "SYN_SENT" in kernel_tcp(port), what="a connection under way")
    lock.stop(timeout=0.2)
    assert conn_log.next_end()["end"] == "shutdown"
    assert lock.gate.held == 0 and not lock.connections
    # Nothing of the connection is left behind: the half-made backend connection is closed
    # (a socket kept open would go on sending its SYN), and the client is cut.
    assert "SYN_SENT" not in kernel_tcp(port)
    with pytest.raises((ConnectionResetError, EOFError)):
        if not c.recv(1):
            raise EOFError
    listener.accept()[0].close()  # room in the backend's queue: nobody takes it
    gevent.sleep(0)
    assert "SYN_SENT" not in kernel_tcp(port)
    for s in (c, filler, listener):
        s.close()


class _WatchedListener:
    """A plain backend that records, as it accepts each connection, how many of the ones it
    accepted before are still open from the other side (the kernel's state of its own end:
    ``CLOSE_WAIT`` once the peer has closed). It echoes what it reads."""

    def __init__(self, backlog):
        self.sock = socket.socket()
        self.sock.bind((LOOPBACK, 0))
        self.sock.listen(backlog)
        self.port = self.sock.getsockname()[1]
        self.accepted = []
        self.most_at_once = 0
        self._greenlets = []

    def serve(self):
        self._greenlets.append(gevent.spawn(self._serve))

    def _serve(self):
        while True:
            conn, _ = self.sock.accept()
            still_open = [c for c in self.accepted if tcp_state(c) == "ESTABLISHED"]
            self.most_at_once = max(self.most_at_once, len(still_open) + 1)
            self.accepted.append(conn)
            self._greenlets.append(gevent.spawn(self._echo, conn))

    @staticmethod
    def _echo(conn):
        while True:
            data = conn.recv(65536)
            if not data:
                return
            conn.sendall(data)

    def close(self):
        gevent.killall(self._greenlets)
        for c in [*self.accepted, self.sock]:
            c.close()


def test_a_client_arriving_while_the_start_check_is_slow_waits_for_its_answer(make_lock):
    # tcplock checks a backend it does not run at start. Here the check is slow: the backend's
    # accept queue is full, so its SYN is dropped and sent again about a second later. A
    # client arriving meanwhile is let through only once the check has answered, so that the
    # backend never has two connections from tcplock at once.
    backend = _WatchedListener(backlog=0)
    filler = _stdsocket.create_connection((LOOPBACK, backend.port))  # fills the queue
    try:
        lock = make_lock(backend.port, connect_timeout=5.0, check_interval=5.0)
        wait_until(lambda: "SYN_SENT" in kernel_tcp(backend.port), what="the check under way")
        backend.sock.accept()[0].close()  # room again: a SYN gets in
        backend.serve()
        c = connect(lock.server_port)
        c.sendall(b"ping")
        assert recv_exactly(c, 4) == b"ping"
        wait_until(lambda: len(backend.accepted) == 2, what="the check and the client")
        assert backend.most_at_once == 1
        assert lock.status()["backends"][0]["state"] == "up"
        c.close()
    finally:
        filler.close()
        backend.close()


def test_a_client_arriving_with_the_start_check_on_a_healthy_backend_is_served_at_once():
    # The check at start answers at once from a backend that accepts: a client arriving in
    # the same instant is served without waiting for a check interval (30 s here).
    backend = _WatchedListener(backlog=8)
    backend.serve()
    lock = TCPLock(
        (LOOPBACK, 0), backends=[(LOOPBACK, backend.port)], check_interval=30, connect_timeout=30
    )
    lock.start()
    try:
        c = connect(lock.server_port)
        c.sendall(b"ping")
        assert recv_exactly(c, 4, timeout=5) == b"ping"
        assert len(backend.accepted) == 2 and backend.most_at_once == 1
        c.close()
    finally:
        lock.stop(timeout=0)
        backend.close()


def test_backend_refusing_at_once_is_retried_until_it_comes_up(make_lock, conn_log):
    listener = socket.socket()
    listener.bind((LOOPBACK, 0))
    listener.listen(8)
    port = listener.getsockname()[1]
    lock = make_lock(port, connect_timeout=5.0)
    _warm(lock, listener)
    assert conn_log.next_end()["end"] == "closed"
    listener.close()  # down: connecting is refused at once
    c = connect(lock.server_port)
    c.sendall(b"early")
    gevent.sleep(0.3)
    from conftest import Backend

    backend = Backend("echo")
    backend.set_listener((LOOPBACK, port))
    backend.start()
    try:
        assert recv_exactly(c, 5) == b"early"
    finally:
        c.close()
        backend.stop(timeout=0)


def test_an_unexpected_error_in_a_connection_ends_only_that_connection(
    make_backend, make_lock, conn_log, on_connect
):
    # The fault: the second connection's connect() toward the backend raises an exception no
    # system call raises, in place of a bug in tcplock (which cannot be caused for real). It
    # ends that connection alone, as an error; the lock keeps serving.
    backend = make_backend("echo")
    lock = make_lock(backend)
    calls = []

    def fail_the_second(address):
        if address[1] == backend.server_port:
            calls.append(address)
            if len(calls) == 2:
                raise RuntimeError("injected")

    on_connect(fail_the_second)
    for expected in ("closed", "error", "closed"):
        if expected == "closed":
            c = connect(lock.server_port)
            c.sendall(b"x")
            assert recv_exactly(c, 1) == b"x"
            c.close()
        else:
            # An error: the client learns by a reset (on some event loops it comes before the
            # client's own connect() has returned).
            with pytest.raises((ConnectionResetError, BrokenPipeError)):
                c = connect(lock.server_port)
                try:
                    c.sendall(b"x")
                    recv_all(c)
                finally:
                    c.close()
        assert conn_log.next_end()["end"] == expected
    # Logged with its traceback.
    assert any(r.exc_info and str(r.exc_info[1]) == "injected" for r in conn_log.records), (
        conn_log.lines
    )
    assert lock.gate.held == 0 and backend.count == 2


# -- 7. queue limits -------------------------------------------------------------------------


def test_queue_timeout_closes_waiting_client(make_backend, make_lock, conn_log):
    backend = make_backend("hold")
    lock = make_lock(backend, queue_timeout=0.2)
    a = connect(lock.server_port)
    backend.next_conn()
    b = connect(lock.server_port)
    assert recv_all(b) == b""
    end = conn_log.next_end()
    assert end["end"] == "queue-timeout" and 0.15 <= float(end["queued"]) <= 1.0
    assert lock.queued == 0
    a.close()


def test_max_queue_turns_away_extra_clients_at_once(make_backend, make_lock, conn_log):
    backend = make_backend("hold")
    lock = make_lock(backend, max_queue=2)
    a = connect(lock.server_port)
    backend.next_conn()
    waiting = [connect(lock.server_port) for _ in range(2)]
    queued(lock, 2)
    extra = connect(lock.server_port)
    assert recv_all(extra, timeout=2) == b""
    assert conn_log.next_end()["end"] == "queue-full"
    assert lock.queued == 2
    for c in [a, *waiting]:
        c.close()


def test_max_queue_zero_admits_only_when_a_slot_is_free(make_backend, make_lock, conn_log):
    backend = make_backend("echo")
    lock = make_lock(backend, max_queue=0)
    a = connect(lock.server_port)
    a.sendall(b"a")
    assert recv_exactly(a, 1) == b"a"
    b = connect(lock.server_port)
    assert recv_all(b) == b""
    assert conn_log.next_end()["end"] == "queue-full"
    a.close()


# -- 8. hooks --------------------------------------------------------------------------------


def test_on_activate_gets_connection_with_client_address(make_backend, make_lock):
    backend = make_backend("echo")
    seen = []
    lock = make_lock(backend, on_activate=lambda conn: seen.append(conn))
    c = connect(lock.server_port)
    c.sendall(b"x")
    recv_exactly(c, 1)
    (conn,) = seen
    assert conn.client == c.getsockname()
    assert conn.activation == 1 and conn.id == 1
    c.close()


def test_raising_on_activate_closes_client_and_lock_keeps_working(
    make_backend, make_lock, conn_log
):
    backend = make_backend("echo")
    calls = []

    def on_activate(conn):
        calls.append(conn.id)
        if conn.id == 1:
            raise RuntimeError("restart failed")

    lock = make_lock(backend, on_activate=on_activate)
    a = connect(lock.server_port)
    assert recv_all(a) == b""
    end = conn_log.next_end()
    assert end["end"] == "hook-failed"
    assert any("restart failed" in line and "127.0.0.1:" in line for line in conn_log.lines)
    assert backend.count == 0
    b = connect(lock.server_port)
    b.sendall(b"ok")
    assert recv_exactly(b, 2) == b"ok"
    b.close()


def test_hook_running_past_hook_timeout_fails(make_backend, make_lock, conn_log):
    backend = make_backend("echo")
    lock = make_lock(backend, on_activate=lambda conn: gevent.sleep(30), hook_timeout=0.2)
    a = connect(lock.server_port)
    assert recv_all(a) == b""
    assert conn_log.next_end()["end"] == "hook-failed"
    assert backend.count == 0


def test_command_hook_gets_context_in_environment(make_backend, make_lock, tmp_path):
    backend = make_backend("echo")
    out = tmp_path / "env"
    hook = CommandHook(f"env | grep ^TCPLOCK_ | sort > {out}", "on-activate")
    lock = make_lock(backend, on_activate=hook)
    first = connect(lock.server_port)
    first.sendall(b"1")
    recv_exactly(first, 1)
    first.close()
    c = connect(lock.server_port)
    c.sendall(b"x")
    recv_exactly(c, 1)
    env = dict(line.split("=", 1) for line in out.read_text().splitlines())
    host, port = c.getsockname()
    assert env["TCPLOCK_CLIENT"] == f"{host}:{port}"
    assert env["TCPLOCK_CLIENT_HOST"] == host and env["TCPLOCK_CLIENT_PORT"] == str(port)
    assert env["TCPLOCK_EVENT"] == "on-activate"
    assert env["TCPLOCK_ACTIVATION"] == "2" and env["TCPLOCK_SERVED"] == "1"
    assert env["TCPLOCK_PREVIOUS_END"] == "closed"
    assert env["TCPLOCK_BACKEND"] == f"127.0.0.1:{backend.server_port}"
    c.close()


@pytest.mark.parametrize("command", ["exit 3", "kill -9 $$", "sleep 30"])
def test_failing_command_hook_is_logged_and_client_closed(
    make_backend, make_lock, conn_log, command
):
    backend = make_backend("echo")
    lock = make_lock(backend, on_activate=CommandHook(command, "on-activate"), hook_timeout=0.3)
    a = connect(lock.server_port)
    assert recv_all(a) == b""
    assert conn_log.next_end()["end"] == "hook-failed"
    assert any("on-activate hook" in line for line in conn_log.lines)
    assert backend.count == 0


def test_timed_out_command_hook_kills_its_process_group(make_backend, make_lock, tmp_path):
    backend = make_backend("echo")
    pidfile = tmp_path / "pid"
    hook = CommandHook(f"sleep 30 & echo $! > {pidfile}; wait", "on-activate")
    lock = make_lock(backend, on_activate=hook, hook_timeout=0.3)
    a = connect(lock.server_port)
    assert recv_all(a) == b""
    pid = int(pidfile.read_text())
    wait_until(lambda: not _alive(pid), what="the hook's child to be killed")


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_on_timeout_failure_is_logged_and_slot_passes_on(make_backend, make_lock, conn_log):
    backend = make_backend("never")

    def on_timeout(conn):
        raise RuntimeError("cleanup broke")

    lock = make_lock(backend, timeout=0.2, on_timeout=on_timeout)
    a = connect(lock.server_port)
    b = connect(lock.server_port)
    backend.next_conn()
    assert conn_log.next_end()["end"] == "ttl"
    backend.next_conn()  # the slot passed on, after the hook
    assert any("cleanup broke" in line for line in conn_log.lines)
    a.close()
    b.close()


# -- 9. shutdown -----------------------------------------------------------------------------


def test_stop_closes_queued_at_once_and_drains_active(make_backend, make_lock, conn_log):
    backend = make_backend("reply_at_eof")
    lock = make_lock(backend, drain_timeout=5)
    a = connect(lock.server_port)
    a.sendall(b"work")
    backend.next_conn()
    b = connect(lock.server_port)
    queued(lock, 1)
    stopper = gevent.spawn(lock.stop)
    assert recv_all(b, timeout=2) == b""
    assert conn_log.next_end()["end"] == "shutdown"
    assert not stopper.ready()
    with pytest.raises(OSError):
        connect(lock.server_port, timeout=1)
    a.shutdown(socket.SHUT_WR)
    assert recv_all(a) == b"got:work"
    stopper.join(timeout=5)
    assert stopper.ready()
    assert conn_log.next_end()["end"] == "closed"


def test_stop_cuts_active_connections_after_drain_timeout(make_backend, make_lock, conn_log):
    backend = make_backend("never")
    lock = make_lock(backend)
    a = connect(lock.server_port)
    backend.next_conn()
    started = time.monotonic()
    lock.stop(timeout=0.3)
    assert time.monotonic() - started < 3
    assert conn_log.next_end()["end"] == "shutdown"
    with pytest.raises((ConnectionResetError, EOFError)):
        if not a.recv(10):
            raise EOFError
    assert lock.gate.held == 0


# -- 10. the log line ------------------------------------------------------------------------


def test_one_log_line_per_connection_with_times_and_bytes(make_backend, make_lock, conn_log):
    backend = make_backend("echo")
    lock = make_lock(backend)
    c = connect(lock.server_port)
    c.sendall(b"x" * 1000)
    recv_exactly(c, 1000)
    c.shutdown(socket.SHUT_WR)
    recv_all(c)
    end = conn_log.next_end()
    assert end["client"] == "{}:{}".format(*c.getsockname())
    assert (end["up"], end["down"], end["end"]) == ("1000", "1000", "closed")
    assert float(end["queued"]) >= 0 and float(end["active"]) >= 0
    with pytest.raises(queue.Empty):
        conn_log.next_end(timeout=0.2)  # exactly one line


# -- 11. socket options and backpressure -----------------------------------------------------


def test_log_line_comes_after_the_slot_passed_on_unless_a_hook_or_restart_runs_first(
    make_backend, make_lock, conn_log
):
    echo = make_backend("echo")
    order = []
    plain = make_lock(echo)
    plain.end_observers.append(lambda conn: order.append(("line", plain.gate.held)))
    c = connect(plain.server_port)
    c.sendall(b"x")
    assert recv_exactly(c, 1) == b"x"
    c.close()
    assert conn_log.next_end()["end"] == "closed"
    # Nothing else to run: written once the slot is free, off the next client's way in.
    wait_until(lambda: order == [("line", 0)], what="line after the release")

    order.clear()
    restarting = make_lock(
        echo, restart=lambda reason: order.append("restart"), restart_every=1, ready_timeout=None
    )
    restarting.end_observers.append(lambda conn: order.append("line"))
    c = connect(restarting.server_port)
    c.sendall(b"x")
    assert recv_exactly(c, 1) == b"x"
    c.close()
    wait_until(lambda: len(order) == 2, what="line and restart")
    assert order == ["line", "restart"]

    order.clear()
    never = make_backend("never")
    cut = make_lock(never, timeout=0.2, on_timeout=lambda conn: order.append("on_timeout"))
    cut.end_observers.append(lambda conn: order.append("line"))
    c = connect(cut.server_port)
    wait_until(lambda: len(order) == 2, what="line and on_timeout")
    assert order == ["line", "on_timeout"]
    c.close()


def test_both_sockets_have_nodelay_and_the_client_keepalive(make_backend, make_lock):
    from tcplock.peer import PeerCheck

    backend = make_backend("hold")
    lock = make_lock(backend)
    c = connect(lock.server_port)
    there = backend.next_conn()
    # tcplock's two sockets of this connection, found by their addresses.
    toward_client = process_socket((LOOPBACK, lock.server_port), c.getsockname())
    toward_backend = process_socket(there.sock.getpeername(), (LOOPBACK, backend.server_port))
    with toward_client as client_side, toward_backend as backend_side:
        assert client_side is not None and backend_side is not None
        for s in (client_side, backend_side):
            assert s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        assert client_side.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE)
        # A backend on loopback gets no keepalive: the kernel answers its probes for a hung
        # backend and closes a dead one's connections. Any other backend does.
        assert not backend_side.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE)
    check = PeerCheck()
    assert check.local(("127.0.0.1", 1)) and check.local(("::1", 1, 0, 0))
    assert not check.local(("192.0.2.1", 1)) and not check.local(("2001:db8::1", 1, 0, 0))
    c.close()


@pytest.mark.parametrize("size", [65535, 65536, 65537, 131072, 3 * 65536 + 7])
def test_answers_around_the_buffer_size_arrive_whole_both_ways(
    make_backend, make_lock, conn_log, size
):
    # A request and an answer of about one or a few buffers each: where a short exchange
    # turns into bulk (a full buffer), or meets a side that cannot take a whole read at once
    # (a client with a small receive buffer that reads late), nothing is lost, doubled or
    # reordered on either side.
    request = os.urandom(size)
    answer = os.urandom(size)

    def echo_digest_then_answer(conn):
        got = bytearray()
        while len(got) < size:
            data = conn.sock.recv(1 << 20)
            if not data:
                break
            got += data
        conn.received = got
        conn.sock.sendall(answer)
        conn.sock.close()

    backend = make_backend(echo_digest_then_answer)
    lock = make_lock(backend)
    c = socket.socket()
    c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    c.settimeout(10)
    c.connect((LOOPBACK, lock.server_port))
    c.sendall(request)
    wait_until(lambda: backend.conns and len(backend.conns[0].received) == size)
    gevent.sleep(0.05)  # the answer meets a full receive buffer
    assert recv_all(c) == answer
    c.close()
    line = conn_log.next_end()
    assert line["end"] == "closed"
    assert bytes(backend.conns[0].received) == request
    assert (int(line["up"]), int(line["down"])) == (size, size)


def test_an_answer_a_client_takes_a_little_at_a_time_arrives_whole(
    make_backend, make_lock, conn_log
):
    # The client's socket takes little at a time (small buffers on both ends of it), so that
    # tcplock's sends to it are cut short mid-answer: what is left of each read must still go
    # out, once and in order. (Accepted sockets inherit the listener's send buffer on Linux.)
    answer = os.urandom(300_000)

    def answer_in_pieces(conn):
        conn.sock.recv(2)
        for i in range(0, len(answer), 10_000):
            conn.sock.sendall(answer[i : i + 10_000])
        conn.sock.close()

    backend = make_backend(answer_in_pieces)
    lock = make_lock(backend, client_finish_timeout=10)
    lock.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    c = socket.socket()
    c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    c.settimeout(10)
    c.connect((LOOPBACK, lock.server_port))
    c.sendall(b"go")
    backend.next_conn()
    gevent.sleep(0.1)  # the answer meets full buffers
    assert recv_all(c, timeout=10) == answer
    c.close()
    line = conn_log.next_end()
    assert line["end"] == "closed" and int(line["down"]) == len(answer)


def test_backend_that_stops_reading_stalls_the_client_without_buffering(make_backend, make_lock):
    reading = Event()

    def slow_reader(conn):
        reading.wait()
        h = hashlib.sha256()
        while True:
            data = conn.sock.recv(1 << 20)
            if not data:
                break
            h.update(data)
            conn.received = bytearray(b"%d" % (int(conn.received or b"0") + len(data)))
        conn.sock.sendall(h.hexdigest().encode())
        conn.sock.close()

    backend = make_backend(slow_reader)
    lock = make_lock(backend)
    payload = os.urandom(32 << 20)
    c = connect(lock.server_port, timeout=30)
    sender = gevent.spawn(c.sendall, payload)
    active(lock, 1)
    conn = lock.active[0]
    # Wait until the relay is stuck: its count stops moving.
    last = -1
    while conn.bytes_up != last:
        last = conn.bytes_up
        gevent.sleep(0.2)
    assert conn.bytes_up < 16 << 20, "tcplock kept reading although the backend did not"
    assert not sender.ready()
    reading.set()
    sender.join(timeout=20)
    c.shutdown(socket.SHUT_WR)
    assert recv_all(c, timeout=20).decode() == hashlib.sha256(payload).hexdigest()


@pytest.mark.parametrize("zero_copy", [True, False])
def test_large_payload_is_relayed_intact_both_ways(make_backend, make_lock, monkeypatch, zero_copy):
    # Both ways at once in bulk, through splice() and a pipe per direction where the platform
    # has it (the pipes show among the process's descriptors while the data moves), else
    # through Python; intact either way, and no pipe is left behind.
    from tcplock import relay

    if zero_copy and not relay.SPLICE:
        pytest.skip("no splice() here")
    monkeypatch.setattr(relay, "SPLICE", zero_copy)
    backend = make_backend("echo")
    lock = make_lock(backend)
    before = pipes()
    most = [0]

    def sample():
        while True:
            most[0] = max(most[0], len(pipes() - before))
            gevent.sleep(0.002)

    sampler = gevent.spawn(sample)
    payload = os.urandom(8 << 20)
    c = connect(lock.server_port, timeout=30)
    sender = gevent.spawn(lambda: (c.sendall(payload), c.shutdown(socket.SHUT_WR)))
    got = recv_all(c, timeout=30)
    sender.join()
    sampler.kill()
    assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()
    assert most[0] == (2 if zero_copy else 0)
    c.close()
    wait_until(lambda: not lock.connections, what="the connection ended")
    assert not pipes() - before


def test_bulk_traffic_to_a_peer_on_loopback_is_not_paced(make_backend, make_lock):
    # Once a direction moves bulk data (zero-copy), the socket it sends on uses Reno when its
    # peer is on loopback: the system's default may pace (BBR), for no network to share.
    from tcplock import relay

    if not relay.SPLICE or not hasattr(socket, "TCP_CONGESTION"):
        pytest.skip("no splice() or TCP_CONGESTION here")
    probe = _stdsocket.socket()
    try:
        probe.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, b"reno")
    except OSError:
        pytest.skip("this system does not let a process choose reno")
    finally:
        probe.close()
    backend = make_backend("echo")
    lock = make_lock(backend)
    c = connect(lock.server_port, timeout=30)
    payload = os.urandom(4 << 20)
    sender = gevent.spawn(c.sendall, payload)
    assert recv_exactly(c, len(payload)) == payload  # both ways in bulk; the client still open
    sender.join()
    there = backend.next_conn()

    def congestion(sock):
        assert sock is not None
        return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, 16).rstrip(b"\0")

    with process_socket(there.sock.getpeername(), (LOOPBACK, backend.server_port)) as s:
        assert congestion(s) == b"reno"  # client to backend
    with process_socket((LOOPBACK, lock.server_port), c.getsockname()) as s:
        assert congestion(s) == b"reno"  # backend to client
    c.close()


def test_locks_in_two_threads_each_with_its_own_hub_serve_side_by_side():
    # A program may run gevent in several threads, each with its own hub and event loop, and a
    # lock in each. Whatever tcplock keeps for reuse across connections, a connection in one
    # thread is driven by its own thread's loop only: both relay every byte, at the same time.
    import threading

    from conftest import Backend

    results = {}
    start = threading.Barrier(2, timeout=10)

    def run(name):
        try:
            backend = Backend("echo")
            backend.start()
            lock = TCPLock((LOOPBACK, 0), (LOOPBACK, backend.server_port), finish_timeout=0.05)
            lock.start()
            start.wait()
            try:
                for i in range(200):
                    payload = b"%s %d" % (name.encode(), i)
                    c = connect(lock.server_port)
                    c.sendall(payload)
                    assert recv_exactly(c, len(payload)) == payload
                    c.close()
                    if i % 10 == 0:
                        time.sleep(0.001)  # let the other thread run (and release the GIL)
                wait_until(lambda: not lock.connections, what="the last connection ended")
                results[name] = lock.served
            finally:
                lock.stop(timeout=0)
                backend.stop(timeout=0)
                gevent.get_hub().destroy(destroy_loop=True)
        except BaseException as e:  # reported by the main thread
            results[name] = e

    threads = [threading.Thread(target=run, args=(n,)) for n in ("one", "two")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(25)
    assert results == {"one": 200, "two": 200}


# -- embedding -------------------------------------------------------------------------------


def test_importing_tcplock_does_not_monkey_patch():
    code = (
        "import tcplock, tcplock.server, tcplock.cli\n"
        "from tcplock import TCPLock\n"
        "from gevent import monkey\n"
        "assert not monkey.is_anything_patched(), monkey.saved\n"
        "import socket, gevent.socket\n"
        "assert socket.socket is not gevent.socket.socket\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=30)


def test_library_reports_queue_and_active(make_backend, make_lock):
    backend = make_backend("hold")
    lock = make_lock(backend)
    a = connect(lock.server_port)
    backend.next_conn()
    b = connect(lock.server_port)
    queued(lock, 1)
    assert lock.queued == 1
    assert [c.client for c in lock.active] == [a.getsockname()]
    assert [c.client for c in lock.connections] == [a.getsockname(), b.getsockname()]
    assert lock.active[0].active_seconds > 0 and lock.connections[1].queued_seconds > 0


def test_invalid_library_arguments_are_rejected():
    for kw in (
        {"slots": 0},
        {"timeout": 0},
        {"max_queue": -1},
        {"queue_timeout": -1},
        {"finish_timeout": -1},
        {"client_finish_timeout": -0.5},
    ):
        with pytest.raises(ValueError):
            TCPLock((LOOPBACK, 0), (LOOPBACK, 1), **kw)


def test_waiting_clients_cost_no_greenlet_each(make_backend, make_lock):
    backend = make_backend("hold")
    lock = make_lock(backend)
    first = connect(lock.server_port)
    backend.next_conn()
    before = live_greenlets()
    waiting = [connect(lock.server_port) for _ in range(200)]
    queued(lock, 200)
    assert live_greenlets() - before < 10
    for c in [first, *waiting]:
        c.close()


def test_waiting_client_that_sent_data_then_resets_leaves_the_queue(
    make_backend, make_lock, conn_log, monkeypatch
):
    monkeypatch.setattr(TCPLock, "sweep_interval", 0.05)
    backend = make_backend("hold")
    activations = []
    lock = make_lock(backend, on_activate=lambda conn: activations.append(conn.id))
    a = connect(lock.server_port)
    held = backend.next_conn()
    b = connect(lock.server_port)
    b.sendall(b"request")
    queued(lock, 1)
    gevent.sleep(0.1)  # its data has been seen: readiness watching has stopped
    reset(b)
    assert conn_log.next_end()["end"] == "left-queue"
    assert lock.queued == 0
    held.release.set()
    a.close()
    gevent.sleep(0.1)
    assert activations == [1] and backend.count == 1


def test_connections_served_with_a_hook_leave_nothing_running_after_stop(
    make_backend, make_lock, conn_log
):
    # Whatever runs the hooks does not pile up with the clients served, and nothing of it is
    # left running, nor any descriptor open, once stop() has returned.
    backend = make_backend("echo")
    before = live_greenlets()
    fds = open_fds()
    lock = make_lock(backend, slots=2, on_activate=lambda conn: None)
    alive = []
    for _ in range(6):
        c = connect(lock.server_port)
        c.sendall(b"x")
        assert recv_exactly(c, 1) == b"x"
        c.close()
        assert conn_log.next_end()["end"] == "closed"
        wait_until(lambda: not lock.active and backend.all_closed.is_set(), what="slot released")
        alive.append(live_greenlets() - before)
    assert max(alive) <= lock.slots + 2, alive  # not one per client served
    lock.stop(timeout=1)
    wait_until(lambda: live_greenlets() <= before, what="nothing left running after stop()")
    wait_until(lambda: open_fds() <= fds, what="no descriptor left open after stop()")


def test_finished_connections_are_freed_without_the_cycle_collector(make_backend, make_lock):
    import gc

    backend = make_backend("echo")
    lock = make_lock(backend)

    def one():
        c = connect(lock.server_port)
        c.sendall(b"x")
        assert recv_exactly(c, 1) == b"x"
        c.close()
        wait_until(lambda: lock.served == served + 1, what="connection finished")

    served = lock.served
    one()  # warm up: buffers and whatever else is kept for reuse
    gc.collect()
    gc.disable()
    try:
        for _ in range(20):
            served = lock.served
            one()
        # Every hand-off allocating reference cycles would make the collector run (and walk
        # all live objects) again and again under load.
        assert gc.collect() == 0
    finally:
        gc.enable()


def test_an_exception_escaping_a_connection_does_not_strand_the_next_client(
    make_backend, make_lock, conn_log
):
    # A Python hook that leaves a gevent.Timeout running (a BaseException, beyond the handling
    # of a hook's errors). Whether it cuts its connection (end=error) or fires into a greenlet
    # that has nothing left to cut, the next client must be served once that connection is
    # over, and no slot may be lost or doubled.
    leaked = []

    def sloppy_hook(conn):
        if not leaked:
            leaked.append(gevent.Timeout(0.3))
            leaked[0].start()

    backend = make_backend("hold")
    lock = make_lock(backend, on_activate=sloppy_hook)
    a = connect(lock.server_port)
    first = backend.next_conn()
    b = connect(lock.server_port)
    b.sendall(b"b")
    queued(lock, 1)
    wait_until(lambda: not leaked[0].pending, what="the stray timeout to fire")
    gevent.sleep(0.05)  # what it set off has happened
    if conn_log.ends.empty():  # it cut nothing: a is still being relayed
        assert len(lock.active) == 1 and lock.queued == 1 and backend.count == 1
        a.close()
        first.release.set()
    assert conn_log.next_end()["end"] in ("error", "closed")
    nxt = backend.next_conn()  # b, let in by a's release, is served
    if not first.release.is_set():
        # a was cut: its backend connection was over before b's, as the backend's kernel saw.
        assert tcp_state(first.sock) in ("CLOSE_WAIT", "CLOSE")
        first.release.set()
    wait_until(lambda: nxt.received)
    assert bytes(nxt.received) == b"b"
    assert len(lock.active) == 1 and lock.gate.held == 1
    nxt.release.set()
    b.close()
    wait_until(lambda: not lock.connections, what="b ended")
    assert lock.gate.held == 0
    a.close()


def test_clients_that_end_without_waiting_do_not_stall_the_event_loop(
    make_backend, make_lock, conn_log
):
    # Queued clients whose on_activate fails at once end without waiting for anything; working
    # through them must still let the event loop run between them.
    failing = []

    def on_activate(conn):
        if failing:
            raise RuntimeError("backend under maintenance")

    backend = make_backend("echo")
    lock = make_lock(backend, on_activate=on_activate)
    first = connect(lock.server_port)
    first.sendall(b"a")
    assert recv_exactly(first, 1) == b"a"
    waiting = []
    for _ in range(50):
        c = connect(lock.server_port)
        c.sendall(b"q")
        waiting.append(c)
    queued(lock, 50)
    ticks = []
    failing.append(True)

    def ticker():
        while True:
            ticks.append(lock.queued)
            gevent.sleep(0)

    t = gevent.spawn(ticker)
    gevent.sleep(0)  # the ticker has run once
    first.close()
    wait_until(lambda: lock.queued == 0 and not lock.active, what="queue worked through")
    t.kill()
    # The ticker ran while the queue was being worked through, not only before and after.
    assert any(0 < n < 50 for n in ticks), ticks[:5]
    for c in waiting:
        c.close()


def test_stop_cuts_every_client_let_in_by_releases_in_one_turn(make_backend, make_lock, conn_log):
    # Two slots and a hook. P and B end in the same turn of the loop; their releases let in
    # A, whose hook fails at once, and then C and D. stop() must then cut C and D both, at
    # once: each backend connection is closed, each client is cut, no slot is left held, and
    # nothing of the lock is left running.
    def on_activate(conn):
        if conn.id == 3:
            raise RuntimeError("A fails at once")

    backend = make_backend("hold")
    before = live_greenlets()
    lock = make_lock(backend, slots=2, on_activate=on_activate)
    p = connect(lock.server_port)
    held_p = backend.next_conn()
    b = connect(lock.server_port)
    held_b = backend.next_conn()
    waiting = [connect(lock.server_port) for _ in range(3)]  # A (#3), C (#4), D (#5)
    queued(lock, 3)
    held_p.release.set()  # both backend connections close in the same turn
    held_b.release.set()
    wait_until(lambda: {c.id for c in lock.active} == {4, 5}, what="C and D active")
    c_d = [backend.next_conn(), backend.next_conn()]
    started = time.monotonic()
    lock.stop(timeout=0)
    assert time.monotonic() - started < 2
    assert lock.connections == [] and lock.gate.held == 0
    for there in c_d:  # the backend saw both connections end
        wait_until(lambda there=there: there.eof.is_set() or there.error, what="backend EOF")
    for c in waiting[1:]:  # and both clients were cut
        with pytest.raises((ConnectionResetError, EOFError)):
            if not c.recv(1):
                raise EOFError
    backend.release_all()
    wait_until(lambda: backend.all_closed.is_set(), what="the backend's side closed")
    wait_until(lambda: live_greenlets() <= before, what="nothing left running after stop()")
    for c in (p, b, *waiting):
        c.close()


def test_a_finished_connection_is_a_record_that_holds_nothing(make_backend, make_lock, conn_log):
    # An embedding program may keep a finished connection (an end observer here). It is a
    # record: its fields no longer change, it is no longer among the lock's connections, it
    # holds no socket open, and keeping it keeps nothing of the lock running after stop().
    backend = make_backend("hold")
    before = live_greenlets()
    lock = make_lock(backend, on_activate=lambda conn: None)
    finished = []
    lock.end_observers.append(finished.append)
    a = connect(lock.server_port)
    a.sendall(b"a")
    backend.next_conn()
    b = connect(lock.server_port)
    b.sendall(b"b")
    queued(lock, 1)
    a_address = a.getsockname()
    a.close()
    backend.conns[0].release.set()
    assert conn_log.next_end()["end"] == "closed"
    nxt = backend.next_conn()
    wait_until(lambda: finished, what="the end observer")
    (record,) = finished

    def fields():
        return (
            record.end,
            record.active_seconds,
            record.queued_seconds,
            record.bytes_up,
            record.bytes_down,
        )

    then = fields()
    wait_until(lambda: nxt.received)  # b is being served meanwhile
    gevent.sleep(0.05)
    assert fields() == then and then[0] == "closed" and then[3] == 1
    assert record not in lock.connections and [c.id for c in lock.active] == [2]
    assert not holds_socket((LOOPBACK, lock.server_port), a_address)
    b.close()
    nxt.release.set()
    lock.stop(timeout=1)
    wait_until(lambda: live_greenlets() <= before, what="nothing left running after stop()")
    assert finished[0] is record


def test_a_lingering_client_is_closed_in_time_while_stop_drains(
    make_backend, make_lock, conn_log, monkeypatch
):
    # The sweep that closes lingering clients goes on while stop() drains the others (found
    # by a second reader, with this test).
    monkeypatch.setattr(TCPLock, "linger_time", 0.2)

    def behaviour(conn):
        conn.release.wait()
        if conn.number == 2:
            conn.sock.sendall(b"answer")
        conn.sock.close()

    backend = make_backend(behaviour)
    lock = make_lock(backend, slots=2, client_finish_timeout=0)
    a = connect(lock.server_port)
    first = backend.next_conn()
    b = connect(lock.server_port)
    second = backend.next_conn()
    port = lock.server_port
    stopper = gevent.spawn(lock.stop, 10)
    wait_until(lambda: lock.draining, what="stop() under way")
    second.release.set()
    assert conn_log.next_end()["end"] == "closed"
    assert recv_exactly(b, 6) == b"answer"  # b lingers: it has not closed
    assert holds_socket((LOOPBACK, port), b.getsockname())  # tcplock still holds its socket
    wait_until(
        lambda: not holds_socket((LOOPBACK, port), b.getsockname()),
        timeout=3,
        what="b's socket closed while a still drains",
    )
    assert not stopper.ready()
    first.release.set()
    stopper.join(5)
    assert stopper.ready()
    a.close()
    b.close()


def test_client_still_sending_when_its_slot_passes_on_gets_the_whole_reply(
    make_backend, make_lock, conn_log
):
    # The backend answers and closes; with client_finish_timeout=0 the slot passes on at once,
    # while part of the answer is still queued for the client, which has not read yet. The
    # client then sends more (a pipelined request, say): that must not reset the connection
    # and destroy the rest of the answer. (512 KiB: more than the client's socket takes
    # before it reads, less than tcplock's send buffer.)
    size = 512 * 1024
    payload = os.urandom(size)

    def answer_and_close(conn):
        conn.sock.recv(100)
        conn.sock.sendall(payload)
        conn.sock.close()

    backend = make_backend(answer_and_close)
    lock = make_lock(backend, client_finish_timeout=0)
    c = connect(lock.server_port)
    c.sendall(b"request\n")
    end = conn_log.next_end()
    assert end["end"] == "closed" and end["down"] == str(size)
    c.sendall(b"more")
    assert recv_all(c) == payload
    c.close()


def test_a_client_that_never_closes_is_closed_after_the_linger_time(
    make_backend, make_lock, conn_log, monkeypatch
):
    monkeypatch.setattr(TCPLock, "linger_time", 0.2)
    payload = os.urandom(512 * 1024)  # more than the client's socket takes before it reads

    def answer_and_close(conn):
        conn.sock.sendall(payload)
        conn.sock.close()

    backend = make_backend(answer_and_close)
    lock = make_lock(backend, client_finish_timeout=0)
    c = connect(lock.server_port)
    ours = ((LOOPBACK, lock.server_port), c.getsockname())  # tcplock's socket for c
    assert conn_log.next_end()["end"] == "closed"
    assert holds_socket(*ours)  # part of the answer is not acknowledged yet
    c.sendall(b"ignored")  # read and dropped
    started = time.monotonic()
    assert recv_all(c) == payload  # and then EOF...
    wait_until(lambda: not holds_socket(*ours), what="the lingering socket closed")
    assert time.monotonic() - started < 3
    with pytest.raises(OSError):  # ...and the socket is closed: more data is refused
        for _ in range(20):
            c.sendall(b"x" * 65536)
            gevent.sleep(0.01)
    c.close()
