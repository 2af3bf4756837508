"""The restart policy: every K uses, after a TTL cut, as a barrier across slots, retried on
failure, and followed by a readiness wait; Python hooks loaded by the CLI."""

import signal
import time

import gevent
import pytest
from gevent import socket

from conftest import LOOPBACK, Backend, connect, recv_all, recv_exactly, run_cli, wait_until
from tcplock.hooks import CommandHook

pytestmark = pytest.mark.timeout(30)


def echo_once(port, payload=b"x"):
    c = connect(port)
    c.sendall(payload)
    data = recv_exactly(c, len(payload))
    c.close()
    return data


def test_restart_every_k_runs_before_the_next_activation(make_backend, make_lock):
    backend = make_backend("echo")
    events = []
    lock = make_lock(
        backend,
        on_activate=lambda conn: events.append(f"a{conn.activation}"),
        restart=lambda reason: events.append(f"restart:{reason}"),
        restart_every=3,
    )
    for i in range(7):
        echo_once(lock.server_port)
        wait_until(lambda i=i: lock.served == i + 1)
    wait_until(lambda: not lock.restarting)
    assert events == [
        "a1",
        "a2",
        "a3",
        "restart:count",
        "a4",
        "a5",
        "a6",
        "restart:count",
        "a7",
    ]
    assert lock.restarts == 2


def test_restart_with_several_slots_is_a_barrier(make_backend, make_lock):
    backend = make_backend("hold")
    seen_at_restart = []

    def restart(reason):
        seen_at_restart.append((backend.current, len(lock.active)))

    # No readiness probe here: it would be one more connection for the backend to count.
    lock = make_lock(backend, slots=2, restart=restart, restart_every=2, ready_timeout=None)
    a = connect(lock.server_port)
    a.sendall(b"a")
    b = connect(lock.server_port)
    b.sendall(b"b")
    first, second = backend.next_conn(), backend.next_conn()
    c = connect(lock.server_port)
    c.sendall(b"c")
    wait_until(lambda: lock.queued == 1)
    # A slot is free as soon as the first one finishes, but the restart is due: c must wait
    # until both finished and the restart ran.
    first.release.set()
    a.close()
    gevent.sleep(0.2)
    assert seen_at_restart == [] and lock.queued == 1 and backend.count == 2
    second.release.set()
    b.close()
    third = backend.next_conn()
    wait_until(lambda: third.received)
    assert bytes(third.received) == b"c"
    # The backend has no connection; the one "active" entry is the finished connection that
    # runs the restart while it still holds its slot.
    assert seen_at_restart == [(0, 1)]
    assert backend.most == 2
    c.close()


@pytest.mark.parametrize("slots", [2, 3])
def test_connections_granted_as_a_restart_is_due_keep_their_turn(make_backend, make_lock, slots):
    # Every activation calls for a restart; with several slots, connections granted while one
    # is due go back to the head of the queue until it is done. Those that come after them must
    # not reach the backend first.
    backend = make_backend("echo")
    during = []

    def restart(reason):
        during.append(backend.current)
        gevent.sleep(0.01)

    lock = make_lock(backend, slots=slots, restart=restart, restart_every=1)
    first = connect(lock.server_port)
    first.sendall(b"A")
    assert recv_exactly(first, 1) == b"A"
    tags = [bytes([ord("B") + i]) for i in range(8)]
    clients = []
    for i, tag in enumerate(tags):
        c = connect(lock.server_port)
        c.sendall(tag)
        clients.append(c)
        wait_until(lambda n=i + 1: lock.queued == n, what=f"{i + 1} queued")

    def talk(tag, c):
        assert recv_exactly(c, 1, timeout=10) == tag
        c.close()

    talkers = [gevent.spawn(talk, t, c) for t, c in zip(tags, clients)]
    first.close()
    gevent.joinall(talkers, timeout=20, raise_error=True)
    assert b"".join(bytes(c.received) for c in backend.conns) == b"ABCDEFGHI"
    assert set(during) == {0}


def test_restart_after_ttl_cut_runs_after_on_timeout_and_before_next(make_backend, make_lock):
    backend = make_backend("never")
    events = []
    lock = make_lock(
        backend,
        timeout=0.2,
        on_timeout=lambda conn: events.append("on_timeout"),
        on_activate=lambda conn: events.append(f"a{conn.activation}"),
        restart=lambda reason: events.append(f"restart:{reason}"),
        restart_on_timeout=True,
    )
    a = connect(lock.server_port)
    b = connect(lock.server_port)
    backend.next_conn()
    backend.next_conn()
    assert events[:4] == ["a1", "on_timeout", "restart:ttl", "a2"]
    a.close()
    b.close()


def test_failing_restart_is_retried_and_clients_keep_their_places(
    make_backend, make_lock, conn_log
):
    backend = make_backend("echo")
    attempts = []

    def restart(reason):
        attempts.append(reason)
        if len(attempts) < 3:
            raise RuntimeError("service did not come back")

    lock = make_lock(backend, restart=restart, restart_every=1)
    lock.restart_retry_delay = 0.05
    echo_once(lock.server_port, b"1")
    c = connect(lock.server_port)
    c.sendall(b"2")
    assert recv_exactly(c, 1) == b"2"
    assert attempts == ["count"] * 3
    assert lock.restart_failures == 2 and lock.restarts >= 1
    assert sum("restart failed" in line for line in conn_log.lines) == 2
    c.close()


def test_next_client_waits_until_backend_accepts_after_restart(make_lock):
    backend = Backend("echo")
    backend.start()
    port = backend.server_port
    state = {}

    def restart(reason):
        # Take the backend down; it comes back a little later, as a real service would.
        state["old"] = state.get("new", backend)
        state["old"].stop(timeout=0)

        def come_back():
            gevent.sleep(0.3)
            new = Backend("echo")
            new.set_listener((LOOPBACK, port))
            new.start()
            state["new"] = new
            state["up_at"] = time.monotonic()

        gevent.spawn(come_back)

    activations = []
    lock = make_lock(
        port,
        restart=restart,
        restart_every=1,
        connect_timeout=0.01,  # no connect retry to hide a premature activation
        on_activate=lambda conn: activations.append(time.monotonic()),
    )
    try:
        echo_once(lock.server_port)
        assert echo_once(lock.server_port, b"second") == b"second"
        assert activations[1] >= state["up_at"]
    finally:
        lock.stop(timeout=0)
        for b in (backend, state.get("new")):
            if b is not None:
                b.stop(timeout=0)


def test_backend_not_ready_after_restart_counts_as_failed_restart(make_lock, conn_log):
    placeholder = socket.socket()
    placeholder.bind((LOOPBACK, 0))
    port = placeholder.getsockname()[1]
    placeholder.close()
    calls = []
    lock = make_lock(port, restart=calls.append, restart_every=1, ready_timeout=0.1)
    lock.restart_retry_delay = 0.05
    c = connect(lock.server_port)
    assert recv_all(c) == b""  # backend-refused
    wait_until(lambda: len(calls) >= 2, what="the restart to be retried")
    assert any("not accepting connections" in line for line in conn_log.lines)


def test_restart_command_gets_reason_in_environment(make_backend, make_lock, tmp_path):
    backend = make_backend("echo")
    out = tmp_path / "restart"
    hook = CommandHook(
        f"echo $TCPLOCK_EVENT $TCPLOCK_RESTART_REASON $TCPLOCK_CLIENT >> {out}", "restart"
    )
    lock = make_lock(backend, restart=hook, restart_every=1)
    c = connect(lock.server_port)
    c.sendall(b"x")
    recv_exactly(c, 1)
    host, port = c.getsockname()
    c.close()
    wait_until(lambda: out.exists() and out.read_text())
    assert out.read_text().split() == ["restart", "count", f"{host}:{port}"]


def test_restart_settings_need_a_restart_hook(make_backend):
    from tcplock import TCPLock

    with pytest.raises(ValueError):
        TCPLock((LOOPBACK, 0), (LOOPBACK, 1), restart_every=2)
    status, _, err = run_cli("-l", "1", "-p", "1", "--restart-on-timeout")
    assert status == 2 and "--restart-cmd" in err


# -- Python hooks from the CLI ---------------------------------------------------------------


HOOKS = """
import time
calls = []

def on_activate(conn):
    if conn.activation == 1:
        time.sleep(2)  # blocking call: monkey-patched by the CLI, so others go on
    with open({out!r}, "a") as f:
        f.write("activate %s %s\\n" % (conn.activation, conn.client[0]))

def restart(reason):
    with open({out!r}, "a") as f:
        f.write("restart %s\\n" % reason)
"""


def test_python_hooks_file_blocks_cooperatively(cli, make_backend, tmp_path):
    backend = make_backend("echo")
    out = tmp_path / "out"
    hooks = tmp_path / "hooks.py"
    hooks.write_text(HOOKS.format(out=str(out)))
    p = cli.to(backend, "--slots", "2", "--hooks", str(hooks))
    port = p.wait_ready()
    slow = connect(port)
    slow.sendall(b"slow")
    gevent.sleep(0.2)
    # While the first client's hook sleeps, the second is served.
    assert echo_once(port, b"fast") == b"fast"
    assert out.read_text() == "activate 2 127.0.0.1\n"
    assert recv_exactly(slow, 4, timeout=10) == b"slow"
    assert out.read_text().splitlines()[-1] == "activate 1 127.0.0.1"
    slow.close()
    p.signal(signal.SIGTERM)
    assert p.wait() == 0


def test_python_restart_hook_from_cli(cli, make_backend, tmp_path):
    backend = make_backend("echo")
    out = tmp_path / "out"
    hooks = tmp_path / "hooks.py"
    hooks.write_text(HOOKS.format(out=str(out)).replace("conn.activation == 1", "False"))
    p = cli.to(backend, "--hooks", str(hooks), "--restart-every", "2")
    port = p.wait_ready()
    for _ in range(3):
        echo_once(port)
    p.wait_for("backend restarted")
    assert out.read_text().splitlines() == [
        "activate 1 127.0.0.1",
        "activate 2 127.0.0.1",
        "restart count",
        "activate 3 127.0.0.1",
    ]


def test_a_python_restart_hook_that_raises_is_one_log_line_per_attempt(cli, make_backend, tmp_path):
    backend = make_backend("echo")
    count = tmp_path / "count"
    hooks = tmp_path / "hooks.py"
    hooks.write_text(
        "def restart(reason):\n"
        f"    with open({str(count)!r}, 'a') as f:\n"
        "        f.write('x')\n"
        "    raise RuntimeError('the service will not stop')\n"
    )
    p = cli.to(backend, "--hooks", str(hooks), "--restart-every", "1")
    port = p.wait_ready()
    echo_once(port)
    wait_until(lambda: count.exists() and len(count.read_text()) >= 2, what="a retried restart")
    p.wait_for("RuntimeError: the service will not stop; retrying")
    p.signal(signal.SIGINT)
    assert p.wait() == 0
    assert "Traceback" not in p.output(), p.output()


@pytest.mark.parametrize(
    "content, message",
    [
        ("def on_activate(conn):\n    return (\n", "line"),
        ("raise RuntimeError('no database')\n", "RuntimeError: no database"),
        ("x = 1\n", "defines none of"),
        ("on_activate = 5\n", "not a function"),
        (None, "no such file"),
    ],
)
def test_bad_hooks_file_is_reported_at_startup(tmp_path, content, message):
    hooks = tmp_path / "hooks.py"
    if content is not None:
        hooks.write_text(content)
    status, _, err = run_cli("-l", "127.0.0.1:0", "-p", "1", "--hooks", str(hooks))
    assert status == 2, err
    assert message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_hooks_file_and_same_command_hook_conflict(tmp_path):
    hooks = tmp_path / "hooks.py"
    hooks.write_text("def on_activate(conn):\n    pass\n")
    status, _, err = run_cli("-l", "1", "-p", "1", "--hooks", str(hooks), "--on-activate", "true")
    assert status == 2 and "--on-activate" in err


# -- stopping while hooks or restarts run ----------------------------------------------------


def test_stop_abandons_a_hanging_restart_and_releases_everything(make_backend, make_lock):
    backend = make_backend("echo")
    calls = []

    def restart(reason):
        calls.append(reason)
        gevent.sleep(30)  # a restart that hangs: stop() must interrupt it, not retry it

    lock = make_lock(backend, restart=restart, restart_every=1)
    lock.restart_retry_delay = 0.01
    c = connect(lock.server_port)
    c.sendall(b"x")
    recv_exactly(c, 1)
    c.close()
    wait_until(lambda: calls, what="the restart to start")
    started = time.monotonic()
    lock.stop(timeout=0.2)
    assert time.monotonic() - started < 3
    assert lock.gate.held == 0 and not lock.connections
    gevent.sleep(0.3)
    assert calls == ["count"], "the restart was tried again after stop()"
    assert lock.restart_failures == 0


def test_no_restart_runs_for_a_connection_cut_at_shutdown(make_backend, make_lock):
    backend = make_backend("never")
    calls = []
    lock = make_lock(backend, restart=calls.append, restart_every=1)
    c = connect(lock.server_port)
    backend.next_conn()
    lock.stop(timeout=0.2)
    assert calls == [] and lock.gate.held == 0 and not lock.connections
    c.close()


def test_shutdown_during_on_activate_ends_as_shutdown_not_hook_failure(
    make_backend, make_lock, conn_log
):
    backend = make_backend("echo")
    lock = make_lock(backend, on_activate=lambda conn: gevent.sleep(30))
    c = connect(lock.server_port)
    wait_until(lambda: lock.active, what="the client to be active")
    lock.stop(timeout=0.2)
    assert conn_log.next_end()["end"] == "shutdown"
    assert lock.hook_failures == 0 and lock.ended == {"shutdown": 1}
    c.close()


def test_failing_end_observer_does_not_jam_restarts(make_backend, make_lock):
    backend = make_backend("echo")
    restarts = []
    lock = make_lock(backend, restart=restarts.append, restart_every=1, ready_timeout=None)

    def broken(conn):
        raise RuntimeError("observer bug")

    lock.end_observers.append(broken)
    for payload in (b"1", b"2"):
        c = connect(lock.server_port)
        c.sendall(payload)
        assert recv_exactly(c, 1) == payload
        c.close()
    wait_until(lambda: len(restarts) == 2, what="both restarts")


def test_connection_counts_as_active_while_its_on_timeout_hook_runs(make_backend, make_lock):
    backend = make_backend("never")
    seen = []
    lock = make_lock(
        backend, timeout=0.1, on_timeout=lambda conn: seen.append(len(lock.status()["active"]))
    )
    c = connect(lock.server_port)
    wait_until(lambda: seen, what="the on_timeout hook")
    assert seen == [1]
    c.close()


def test_stop_ends_a_connection_waiting_for_a_restart(make_backend, make_lock, conn_log):
    backend = make_backend("echo")
    calls = []
    lock = make_lock(backend, slots=3, restart=calls.append, restart_every=2, drain_timeout=10)
    # Three clients accepted in the same turn of the loop: the second activation calls for a
    # restart, and the third, granted already, waits again for the restart to be done.
    lock.max_accept = 3
    clients = []
    for _ in range(3):
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex((LOOPBACK, lock.server_port))
        clients.append(s)
    wait_until(
        lambda: lock.restarting and len(lock.connections) == 3 and backend.count == 2,
        what="two clients relayed and a third waiting for the restart",
    )
    stopper = gevent.spawn(lock.stop)
    gevent.sleep(0.1)
    for s in clients:
        try:
            s.shutdown(socket.SHUT_WR)  # the two active ones finish
        except OSError:
            pass  # the waiting one may have been cut already
    stopper.join(timeout=3)
    assert stopper.ready(), "stop() waited out the drain time for a waiting connection"
    assert calls == [] and lock.gate.held == 0 and not lock.connections
    assert backend.count == 2  # the third never reached the backend: its restart never ran
    for s in clients:
        s.close()
