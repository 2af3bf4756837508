"""The library as embedding code uses it: settings checked by the same rules as the command line,
settings and hooks changed on a running lock, lock.slot() for in-process work, a stopped lock,
and the faults found by attacking the core (a cut upload, bytes counted twice, a stray timeout
left by a hook, a restart abandoned at stop)."""

import socket as _stdsocket

import gevent
import pytest
from gevent.event import Event
from prometheus_client.parser import text_string_to_metric_families

from conftest import LOOPBACK, connect, recv_all, recv_exactly, wait_until
from tcplock import TCPLock
from tcplock.status import Metrics

pytestmark = pytest.mark.timeout(30)


# -- settings: one set of rules ------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, value",
    [
        ("connect_timeout", None),
        ("connect_timeout", -1),
        ("timeout", -1),
        ("timeout", "20s"),
        ("slots", 0),
        ("slots", True),
        ("finish_timeout", float("nan")),
        ("restart_every", 0),
        ("allow", ["not-a-network"]),
        ("on_activate", "echo hi"),
    ],
)
def test_a_bad_setting_is_a_value_error_naming_it(name, value):
    with pytest.raises(ValueError, match=name):
        TCPLock((LOOPBACK, 0), (LOOPBACK, 1), **{name: value})


def test_an_unknown_keyword_is_a_type_error():
    with pytest.raises(TypeError, match="bogus"):
        TCPLock((LOOPBACK, 0), (LOOPBACK, 1), bogus=1)


def test_none_is_no_limit_where_the_command_line_takes_off(make_backend, make_lock, conn_log):
    backend = make_backend("echo")
    lock = make_lock(backend, timeout=None, queue_timeout=None, hook_timeout=None)
    c = connect(lock.server_port)
    c.sendall(b"ping")
    assert recv_exactly(c, 4) == b"ping"
    c.close()
    assert conn_log.next_end()["end"] == "closed"


def test_a_setting_changed_on_a_running_lock_is_checked_and_applies(
    make_backend, make_lock, conn_log
):
    backend = make_backend("hold")
    lock = make_lock(backend)
    with pytest.raises(ValueError, match="timeout"):
        lock.timeout = -5
    lock.timeout = 0.2  # applies to the next connection
    c = connect(lock.server_port)
    backend.next_conn()
    assert conn_log.next_end()["end"] == "ttl"
    c.close()


def test_more_slots_on_a_running_lock_let_waiting_clients_in(make_backend, make_lock):
    backend = make_backend("hold")
    lock = make_lock(backend, slots=1)
    clients = [connect(lock.server_port) for _ in range(3)]
    backend.next_conn()
    wait_until(lambda: lock.queued == 2)
    lock.slots = 3
    backend.next_conn()
    backend.next_conn()
    assert backend.most == 3 and lock.queued == 0
    for c in clients:
        c.close()


def test_hooks_set_on_a_running_lock_run_for_the_next_clients(make_backend, make_lock, conn_log):
    backend = make_backend("hold")
    lock = make_lock(backend, timeout=0.2)
    c = connect(lock.server_port)
    backend.next_conn()
    assert conn_log.next_end()["end"] == "ttl"
    c.close()
    seen = []

    def on_activate(conn):
        gevent.sleep(0.01)  # a hook may block cooperatively
        seen.append(("activate", conn.id))

    def on_timeout(conn):
        gevent.sleep(0.01)
        seen.append(("timeout", conn.id))

    lock.on_activate = on_activate
    lock.on_timeout = on_timeout
    d = connect(lock.server_port)
    backend.next_conn()
    assert conn_log.next_end()["end"] == "ttl"
    wait_until(lambda: len(seen) == 2, what="both hooks")
    assert [kind for kind, _ in seen] == ["activate", "timeout"]
    assert not any("Error" in line for line in conn_log.lines)
    d.close()


# -- lock.slot(): in-process work in the same queue ------------------------------------------------


def test_slot_holds_the_backend_between_clients_in_fifo_order(make_backend, make_lock, conn_log):
    backend = make_backend("hold")
    lock = make_lock(backend)
    a = connect(lock.server_port)
    held = backend.next_conn()
    b = connect(lock.server_port)  # queued before the in-process holder
    wait_until(lambda: lock.queued == 1)
    order = []
    inside = Event()
    leave = Event()

    def maintenance():
        with lock.slot() as holder:
            order.append("slot")
            assert holder in lock.active
            inside.set()
            leave.wait()

    g = gevent.spawn(maintenance)
    wait_until(lambda: lock.queued == 2, what="the holder to queue")
    c = connect(lock.server_port)  # queued after it
    wait_until(lambda: lock.queued == 3)
    held.release.set()
    a.close()
    order.append(backend.next_conn().number)  # b first
    assert not inside.is_set()
    b.close()
    backend.conns[-1].release.set()
    assert inside.wait(5)
    entries = lock.status()["active"]
    assert [e["client"] for e in entries] == ["in-process"]
    assert backend.current == 0  # nobody relayed while the slot is held in-process
    assert lock.queued == 1  # c still waits
    leave.set()
    g.join(5)
    order.append(backend.next_conn().number)
    assert order == [2, "slot", 3]
    c.close()


def test_slot_times_out_in_the_queue(make_backend, make_lock):
    backend = make_backend("hold")
    lock = make_lock(backend)
    a = connect(lock.server_port)
    backend.next_conn()
    with pytest.raises(TimeoutError):
        with lock.slot(timeout=0.1):
            pass
    assert lock.queued == 0
    a.close()


def test_slot_waits_for_a_due_restart(make_backend, make_lock):
    backend = make_backend("echo")
    restarted = Event()
    lock = make_lock(backend, restart=lambda reason: restarted.set(), restart_every=1)
    c = connect(lock.server_port)
    c.sendall(b"x")
    assert recv_exactly(c, 1) == b"x"
    c.close()
    with lock.slot(timeout=5):
        assert restarted.is_set()  # the restart ran before the slot was handed over
    assert lock.restarts == 1


# -- a stopped lock --------------------------------------------------------------------------------


def test_a_stopped_lock_cannot_be_started_again(make_backend):
    backend = make_backend("echo")
    lock = TCPLock((LOOPBACK, 0), (LOOPBACK, backend.server_port))
    lock.start()
    lock.stop(0)
    with pytest.raises(RuntimeError, match="stopped"):
        lock.start()


# -- faults found by attacking the core ------------------------------------------------------------


def test_an_upload_cut_at_client_finish_time_resets_the_backend(make_backend, make_lock, conn_log):
    # The backend answers, half-closes and reads on; the client keeps uploading past its
    # finish time. What reached the backend is not the whole upload: it must not get a clean
    # EOF, and the log says why the connection was cut.
    got = {}

    def answer_then_read(conn):
        conn.sock.recv(100)
        conn.sock.sendall(b"answer")
        conn.sock.shutdown(_stdsocket.SHUT_WR)
        total = 0
        try:
            while True:
                data = conn.sock.recv(65536)
                if not data:
                    got["end"] = "eof"
                    break
                total += len(data)
        except ConnectionResetError:
            got["end"] = "reset"
        got["bytes"] = total
        conn.sock.close()

    backend = make_backend(answer_then_read)
    lock = make_lock(backend, finish_timeout=10, client_finish_timeout=0.3)
    c = connect(lock.server_port)
    c.sendall(b"start")
    assert recv_all(c, timeout=5) == b"answer"  # the backend's EOF reached the client

    def upload():
        try:
            while True:
                c.sendall(b"u" * 4096)
                gevent.sleep(0.01)
        except OSError:
            pass

    g = gevent.spawn(upload)
    end = conn_log.next_end(timeout=5)
    assert end["end"] == "client-finish-timeout"
    wait_until(lambda: "end" in got, what="the backend to see the end")
    assert got["end"] == "reset"
    g.kill()
    c.close()


def test_bytes_are_counted_once_while_a_restart_holds_the_slot(make_backend, make_lock):
    backend = make_backend("echo")
    running, finish = Event(), Event()

    def restart(reason):
        running.set()
        finish.wait()

    lock = make_lock(backend, restart=restart, restart_every=1)
    metrics = Metrics(lock)

    def relayed():
        body = metrics.exposition()[0].decode()
        for family in text_string_to_metric_families(body):
            if family.name == "tcplock_bytes":
                return {s.labels["direction"]: s.value for s in family.samples}
        raise AssertionError("no tcplock_bytes")

    c = connect(lock.server_port)
    c.sendall(b"z" * 100_000)
    assert recv_exactly(c, 100_000) == b"z" * 100_000
    c.close()
    assert running.wait(5)
    assert lock.active  # the connection keeps its slot while its restart runs
    assert relayed() == {"up": 100_000, "down": 100_000}
    finish.set()
    wait_until(lambda: not lock.active, what="the restart to finish")
    assert relayed() == {"up": 100_000, "down": 100_000}


def test_a_timeout_a_hook_left_running_harms_no_connection(make_backend, make_lock, conn_log):
    backend = make_backend("hold")

    def careless(conn):
        gevent.Timeout(0.1).start()  # never cancelled

    lock = make_lock(backend, on_activate=careless)
    a = connect(lock.server_port)
    held = backend.next_conn()
    gevent.sleep(0.3)  # well past the stray timeout
    assert lock.status()["active"][0]["end"] is None
    a.sendall(b"still here")
    wait_until(lambda: bytes(held.received) == b"still here")
    held.release.set()
    a.close()
    assert conn_log.next_end()["end"] == "closed"


def test_stop_abandons_a_hanging_restart_and_says_so(make_backend, make_lock, conn_log):
    backend = make_backend("echo")
    started = Event()

    def hang(reason):
        started.set()
        gevent.sleep(60)

    lock = make_lock(backend, restart=hang, restart_every=1)
    c = connect(lock.server_port)
    c.sendall(b"x")
    assert recv_exactly(c, 1) == b"x"
    c.close()
    assert started.wait(5)
    waiting = connect(lock.server_port)
    wait_until(lambda: lock.queued == 1)
    lock.stop(0.2)
    assert lock.connections == [] and lock.active == []
    stopping_at = next(i for i, line in enumerate(conn_log.lines) if "drain time over" in line)
    later = conn_log.lines[stopping_at:]
    assert any("restart abandoned" in line for line in later)
    assert not any("retrying" in line for line in later)
    assert recv_all(waiting) == b""
    waiting.close()


def test_a_backend_name_is_looked_up(make_backend, conn_log):
    backend = make_backend("echo")
    lock = TCPLock((LOOPBACK, 0), ("localhost", backend.server_port), connect_timeout=2)
    lock.start()
    try:
        c = connect(lock.server_port)
        c.sendall(b"by name")
        assert recv_exactly(c, 7) == b"by name"
        c.close()
        assert conn_log.next_end()["end"] == "closed"
    finally:
        lock.stop(0)


def test_a_timeout_a_restart_hook_left_running_does_not_cut_the_readiness_wait(make_lock, conn_log):
    # A Python restart hook that leaves a gevent.Timeout running (as the design says hooks may):
    # it fires in the restart's greenlet during wait_ready, and the restart ends as if done,
    # uncounted and unlogged, before the backend is ready.
    from gevent.server import StreamServer

    def echo(sock, _addr):
        data = sock.recv(100)
        sock.sendall(data)
        sock.close()

    server = StreamServer((LOOPBACK, 0), echo)
    server.start()
    port = server.server_port
    servers = [server]

    def restart(reason):
        gevent.Timeout(0.05).start()  # left running
        servers[-1].stop()

        def back():
            s = StreamServer((LOOPBACK, port), echo)
            s.start()
            servers.append(s)

        gevent.spawn_later(0.5, back)

    lock = make_lock(port, restart=restart, restart_every=1, ready_timeout=5, connect_timeout=5)
    try:
        c = connect(lock.server_port)
        c.sendall(b"x")
        assert recv_exactly(c, 1) == b"x"
        c.close()
        wait_until(lambda: len(servers) == 2, what="the backend to be back")
        # Counted once the readiness wait sees it back: a stray timeout cutting the wait would
        # end the restart uncounted.
        wait_until(lambda: lock.restarts == 1, timeout=5, what="the restart to be counted")
        assert not lock.restarting
    finally:
        for s in servers:
            s.stop(timeout=0)


def test_a_hook_whose_own_timeout_expires_is_a_hook_failure(make_backend, make_lock, conn_log):
    # A hook that uses gevent.Timeout itself, and lets it expire, failed: end=hook-failed, like
    # any other hook failure, not end=error with a traceback (which says "a bug in tcplock").
    backend = make_backend("echo")

    def on_activate(conn):
        with gevent.Timeout(0.01):
            gevent.sleep(1)

    lock = make_lock(backend, on_activate=on_activate)
    c = connect(lock.server_port)
    c.sendall(b"x")
    end = conn_log.next_end()["end"]
    c.close()
    assert end == "hook-failed"
    assert lock.hook_failures == 1
    assert not any(r.exc_info for r in conn_log.records)


def test_a_restart_hook_whose_own_timeout_expires_is_a_failed_restart(make_backend, make_lock):
    backend = make_backend("echo")
    calls = []

    def restart(reason):
        calls.append(reason)
        if len(calls) == 1:
            with gevent.Timeout(0.01):
                gevent.sleep(1)

    lock = make_lock(backend, restart=restart, restart_every=1, ready_timeout=None)
    lock.restart_retry_delay = 0.01
    c = connect(lock.server_port)
    c.sendall(b"x")
    assert recv_exactly(c, 1) == b"x"
    c.close()
    wait_until(lambda: not lock.restarting, what="the restart to be over")
    assert lock.restart_failures == 1 and lock.restarts == 1 and len(calls) == 2
