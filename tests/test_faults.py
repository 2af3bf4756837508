"""Reliability under faults, floods and hostile input: backend resets and silence, flapping
backends, slow readers, noisy and hanging hooks, descriptor exhaustion, floods with a queue
limit, and access control."""

import hashlib
import os
import signal
import socket as _stdsocket
import sys

import gevent
import pytest
from gevent import socket, subprocess

from conftest import (
    LOOPBACK,
    Backend,
    connect,
    free_port,
    limited_cli,
    recv_all,
    recv_exactly,
    reset,
    wait_until,
)
from tcplock.hooks import CommandHook

pytestmark = pytest.mark.timeout(60)


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def closed_by_peer(sock, timeout=5):
    """True once the peer closed: EOF, or a reset (Linux resets a connection closed with unread
    data in it, as when the client had already sent its request)."""
    try:
        return recv_all(sock, timeout=timeout) == b""
    except ConnectionResetError:
        return True


def fd_count(pid="self"):
    return len(os.listdir(f"/proc/{pid}/fd"))


# -- backend faults --------------------------------------------------------------------------


def test_silent_backend_without_ttl_client_reset_after_half_close_frees_slot(
    make_backend, make_lock, conn_log
):
    # Nobody reads a client that has half-closed; its reset is noticed within about a second.
    backend = make_backend("never")
    lock = make_lock(backend, finish_timeout=0.2)
    a = connect(lock.server_port)
    a.sendall(b"request")
    a.shutdown(socket.SHUT_WR)
    backend.next_conn()
    b = connect(lock.server_port)
    wait_until(lambda: lock.queued == 1)
    reset(a)  # the client gives up; the backend never answers nor closes
    assert conn_log.next_end()["end"] == "client-reset"
    backend.next_conn()  # b got the slot
    b.close()


def test_flapping_backend_is_ridden_out_by_connect_retry(make_lock):
    port = free_port()
    lock = make_lock(port, connect_timeout=3.0)
    state = {"server": None, "running": True}

    def flap():
        # Down 100 ms, up 100 ms, repeatedly, like a service crash-looping under a supervisor.
        while state["running"]:
            gevent.sleep(0.1)
            server = Backend("echo")
            server.set_listener((LOOPBACK, port))
            server.start()
            state["server"] = server
            gevent.sleep(0.1)
            server.close()  # stop listening; established connections carry on
            state["server"] = None

    flapper = gevent.spawn(flap)
    try:
        for i in range(10):
            c = connect(lock.server_port)
            payload = b"request %d" % i
            c.sendall(payload)
            assert recv_exactly(c, len(payload)) == payload
            c.close()
    finally:
        state["running"] = False
        flapper.kill()
        if state["server"] is not None:
            state["server"].stop(timeout=0)


# -- slow readers and backpressure, measured on the real process -----------------------------


def test_slow_reader_keeps_memory_bounded_and_throttles_backend(cli):
    sent = {"n": 0}
    total = 256 << 20
    digest = hashlib.sha256()
    chunk = os.urandom(1 << 20)
    for _ in range(total // len(chunk)):
        digest.update(chunk)

    def streamer(conn):
        if conn.number == 1:
            return  # tcplock's check at start, closed at once
        while sent["n"] < total:
            conn.sock.sendall(chunk)
            sent["n"] += len(chunk)
        conn.sock.close()

    backend = Backend(streamer)
    backend.start()
    try:
        p = cli.to(backend)
        port = p.wait_ready()
        before = rss_kib(p.proc.pid)
        c = connect(port, timeout=30)
        c.setsockopt(_stdsocket.SOL_SOCKET, _stdsocket.SO_RCVBUF, 64 << 10)
        # Do not read: wait until the backend is stuck.
        last = -1
        while sent["n"] != last:
            last = sent["n"]
            gevent.sleep(0.3)
        assert sent["n"] < 64 << 20, f"backend was not throttled: {sent['n']} bytes sent"
        grown = rss_kib(p.proc.pid) - before
        assert grown < 8 << 10, f"tcplock grew by {grown} KiB holding a stalled stream"
        # Now read everything: nothing was lost.
        h = hashlib.sha256()
        got = 0
        with gevent.Timeout(60):
            while True:
                data = c.recv(1 << 20)
                if not data:
                    break
                h.update(data)
                got += len(data)
        assert got == total and h.hexdigest() == digest.hexdigest()
        c.close()
    finally:
        backend.stop(timeout=0)


# -- hooks that misbehave --------------------------------------------------------------------


def test_hook_printing_megabytes_does_not_block_the_proxy(make_backend, tmp_path):
    backend = make_backend("echo")
    port = free_port()
    log_path = tmp_path / "stderr"
    env = {k: v for k, v in os.environ.items() if not k.startswith("TCPLOCK_")}
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tcplock",
                "-l",
                f"127.0.0.1:{port}",
                "--proxy-host",
                "127.0.0.1",
                "-p",
                str(backend.server_port),
                "--slots",
                "2",
                "--on-activate",
                'if [ "$TCPLOCK_ACTIVATION" = 1 ]; then yes tcplock | head -c 50000000; fi',
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=log_file,
            env=env,
        )
    try:
        wait_until(lambda: b"listening on" in log_path.read_bytes(), timeout=10)
        rss_before = rss_kib(proc.pid)
        noisy = connect(port)
        noisy.sendall(b"noisy")
        quiet = connect(port)
        quiet.sendall(b"quiet")
        assert recv_exactly(quiet, 5) == b"quiet"
        assert recv_exactly(noisy, 5, timeout=30) == b"noisy"
        assert log_path.stat().st_size >= 50_000_000
        assert rss_kib(proc.pid) - rss_before < 8 << 10
        noisy.close()
        quiet.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0


def test_hanging_and_crashing_hooks_leave_lock_usable(make_backend, make_lock, conn_log):
    backend = make_backend("echo")
    outcomes = iter(["hang", "crash", "ok"])

    def on_activate(conn):
        what = next(outcomes)
        if what == "hang":
            gevent.sleep(3600)
        elif what == "crash":
            raise MemoryError("simulated")

    lock = make_lock(backend, on_activate=on_activate, hook_timeout=0.2)
    for _ in range(2):
        c = connect(lock.server_port)
        assert recv_all(c) == b""
        assert conn_log.next_end()["end"] == "hook-failed"
    c = connect(lock.server_port)
    c.sendall(b"fine")
    assert recv_exactly(c, 4) == b"fine"


def test_hook_writing_to_blocked_output_is_killed_at_hook_timeout(make_backend, make_lock):
    # The hook's output is a pipe nobody reads: once it is full the hook blocks, and the hook
    # timeout ends it; tcplock itself never waits on that pipe.
    backend = make_backend("echo")
    r, w = os.pipe()
    hook = CommandHook(f"yes >&{w}", "on-activate")
    lock = make_lock(backend, on_activate=hook, hook_timeout=0.3)
    os.set_inheritable(w, True)
    try:
        c = connect(lock.server_port)
        assert recv_all(c) == b""
    finally:
        os.close(r)
        os.close(w)


# -- descriptor exhaustion -------------------------------------------------------------------


def test_descriptor_exhaustion_is_survived_logged_once_and_recovered(make_backend):
    backend = make_backend("echo")
    p = limited_cli(
        [
            "-l",
            "127.0.0.1:0",
            "--proxy-host",
            "127.0.0.1",
            "-p",
            str(backend.server_port),
            "--max-queue",
            "1000",
        ],
        nofile=64,
    )
    try:
        port = p.wait_ready()
        p.wait_for("descriptor limit 64")
        flood = []
        for _ in range(150):
            flood.append(connect(port))
        p.wait_for("cannot accept new clients: Too many open files")
        gevent.sleep(0.5)
        assert p.proc.poll() is None
        assert "Traceback" not in p.output()
        assert sum("cannot accept" in line for line in p.lines) == 1
        for c in flood:
            c.close()
        # Once the flood is gone, the next client is served.
        with gevent.Timeout(20):
            while True:
                c = connect(port)
                c.sendall(b"next")
                try:
                    if recv_exactly(c, 4, timeout=10) == b"next":
                        break
                except (EOFError, OSError):
                    pass
                finally:
                    c.close()
        assert "Traceback" not in p.output()
    finally:
        p.kill()


def test_no_descriptor_for_the_backend_is_a_refused_backend_not_an_error_cascade():
    # Every descriptor is taken by waiting clients and the backend refuses: each client that
    # gets the slot finds no descriptor for its backend socket. That is retried like a refused
    # connect, client after client; it once ended each as an error, at once, through the queue.
    placeholder = socket.socket()
    placeholder.bind((LOOPBACK, 0))
    dead_port = placeholder.getsockname()[1]
    placeholder.close()
    p = limited_cli(
        ["-l", "127.0.0.1:0", "--proxy-host", "127.0.0.1", "-p", str(dead_port),
         "--max-queue", "1000", "--connect-timeout", "0.2s"],
        nofile=64,
    )  # fmt: skip
    try:
        port = p.wait_ready()
        flood = []
        for _ in range(100):
            c = connect(port)
            c.sendall(b"x")
            flood.append(c)
        p.wait_for("cannot accept new clients")
        with gevent.Timeout(20):
            while sum("end=backend-refused" in line for line in p.lines) < 4:
                gevent.sleep(0.05)
        assert not any("end=error" in line for line in p.lines), p.output()
        assert "Traceback" not in p.output()
        assert p.proc.poll() is None
    finally:
        for c in flood:
            c.close()
        p.kill()


def test_default_max_queue_fits_the_descriptor_limit(make_backend):
    backend = make_backend("hold")
    p = limited_cli(
        ["-l", "127.0.0.1:0", "--proxy-host", "127.0.0.1", "-p", str(backend.server_port)],
        nofile=128,
    )
    try:
        port = p.wait_ready()
        line = p.wait_for("max-queue")
        # 128 - 64 reserved - 6 for the active connection - 16 for lingering clients
        assert "max-queue 42" in line
        clients = [connect(port) for _ in range(100)]
        backend.next_conn()
        p.wait_for("end=queue-full")
        gevent.sleep(0.3)
        assert not any("cannot accept" in line for line in p.lines)
        assert "Traceback" not in p.output()
        for c in clients:
            c.close()
    finally:
        p.kill()


# -- floods ----------------------------------------------------------------------------------


def test_flood_with_max_queue_turns_away_at_once_and_keeps_fifo(make_backend, cli):
    backend = make_backend("hold")
    p = cli.to(backend, "--max-queue", "50", "--finish-timeout", "0")
    port = p.wait_ready()
    backend.take_check()
    baseline_fds = fd_count(p.proc.pid)
    first = connect(port)
    first.sendall(b"first")
    held = backend.next_conn()
    clients = []
    for i in range(300):
        c = connect(port)
        c.sendall(b"%03d" % i)
        clients.append(c)
    # The turned-away 250 are closed at once.
    turned_away = 0
    for c in clients[50:]:
        assert closed_by_peer(c)
        turned_away += 1
    assert turned_away == 250
    wait_until(
        lambda: fd_count(p.proc.pid) <= baseline_fds + 50 + 2 + 2,
        what="turned-away descriptors to be freed",
    )
    # The 50 that queued are served in the order they arrived.
    order = []
    held.release.set()
    first.close()
    for _ in range(50):
        conn = backend.next_conn()
        wait_until(lambda conn=conn: len(conn.received) >= 3)
        order.append(int(conn.received[:3]))
        conn.release.set()
        clients[order[-1]].close()
    assert order == list(range(50))
    # Still usable.
    c = connect(port)
    c.sendall(b"after")
    conn = backend.next_conn()
    wait_until(lambda: conn.received == b"after")
    conn.release.set()
    for c in clients:
        c.close()


# -- access control --------------------------------------------------------------------------


def test_allow_list_rejects_other_networks_before_queueing(make_backend, make_lock, conn_log):
    backend = make_backend("hold")
    lock = make_lock(backend, allow=["10.0.0.0/8", "fd00::/8"])
    rejected = []
    for _ in range(30):
        c = connect(lock.server_port)
        rejected.append(c)
    for c in rejected:
        assert recv_all(c) == b""
        c.close()
    wait_until(lambda: not lock.connections)
    assert backend.count == 0 and lock.queued == 0
    ends = []
    while True:
        try:
            ends.append(conn_log.next_end(timeout=0.2)["end"])
        except Exception:
            break
    assert ends == ["not-allowed"]  # one line, the rest held back


@pytest.mark.parametrize("allow", [["127.0.0.1"], ["127.0.0.0/8", "::1/128"]])
def test_allowed_network_is_served(make_backend, make_lock, allow):
    backend = make_backend("echo")
    lock = make_lock(backend, allow=allow)
    c = connect(lock.server_port)
    c.sendall(b"hi")
    assert recv_exactly(c, 2) == b"hi"


def _ipv6_loopback():
    try:
        s = _stdsocket.socket(_stdsocket.AF_INET6)
        s.bind(("::1", 0))
        s.close()
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _ipv6_loopback(), reason="IPv6 loopback not configured")
def test_allow_list_for_ipv6_clients(make_backend):
    from tcplock import TCPLock

    backend = make_backend("echo")
    for allow, served in ((["::1/128"], True), (["127.0.0.0/8"], False)):
        lock = TCPLock(("::1", 0), (LOOPBACK, backend.server_port), allow=allow)
        lock.start()
        try:
            c = socket.create_connection(("::1", lock.server_port), timeout=5)
            c.sendall(b"v6")
            if served:
                assert recv_exactly(c, 2) == b"v6"
            else:
                assert closed_by_peer(c)
            c.close()
        finally:
            lock.stop(timeout=0)


def test_allow_bad_network_is_usage_error():
    from conftest import run_cli

    status, _, err = run_cli("-l", "1", "-p", "1", "--allow", "10.0.0.0/33")
    assert status == 2 and "--allow" in err and len(err.strip().splitlines()) == 1
