"""Load invariants: several hundred concurrent clients with mixed behaviour.

Whatever the mix, the backend never sees more than ``slots`` connections, every byte of every
well-behaved client comes back intact, clients are let in in accept order, every connection
ends with exactly one logged reason, and afterwards descriptors and greenlets are back to where
they started. The backend is a separate process that counts open connections itself, as its
kernel reports them, on every path a connection can take.
"""

import hashlib
import json
import random
import signal
import sys

import gevent
import pytest
from gevent import socket, subprocess

from conftest import (
    LogCapture,
    connect,
    conversations,
    live_greenlets,
    open_fds,
    recv_all,
    recv_exactly,
    reset,
    wait_until,
)

pytestmark = pytest.mark.timeout(120)

BEHAVIOURS = ["normal", "half_close", "reset_queued", "reset_active", "slow_reader", "large"]


def run_client(port, behaviour, rng):
    """Returns (behaviour, ok) where ok means the client's own expectation held."""
    size = {"large": 2 << 20, "slow_reader": 512 << 10}.get(behaviour, rng.randint(1, 20000))
    payload = rng.randbytes(size)
    c = connect(port, timeout=60)
    try:
        if behaviour == "reset_queued":
            gevent.sleep(rng.random() * 0.05)
            reset(c)
            return behaviour, True
        if behaviour == "reset_active":
            c.sendall(b"x")
            c.recv(1)  # echoed: we are active
            reset(c)
            return behaviour, True
        if behaviour == "normal":
            # Interleaved: send a piece, read it back.
            got = bytearray()
            for i in range(0, len(payload), 4096):
                piece = payload[i : i + 4096]
                c.sendall(piece)
                while len(got) < i + len(piece):
                    data = c.recv(65536)
                    if not data:
                        return behaviour, False
                    got += data
            c.shutdown(socket.SHUT_WR)
            rest = recv_all(c, timeout=60)
            return behaviour, bytes(got) + rest == payload
        sender = gevent.spawn(lambda: (c.sendall(payload), c.shutdown(socket.SHUT_WR)))
        h = hashlib.sha256()
        n = 0
        with gevent.Timeout(60):
            while True:
                data = c.recv(4096 if behaviour == "slow_reader" else 65536)
                if not data:
                    break
                if behaviour == "slow_reader":
                    gevent.sleep(0.0005)
                h.update(data)
                n += len(data)
        sender.join()
        return behaviour, n == len(payload) and h.digest() == hashlib.sha256(payload).digest()
    except OSError:
        # Only the resetting behaviours may see errors.
        return behaviour, behaviour.startswith("reset")
    finally:
        c.close()


@pytest.mark.parametrize("slots", [1, 3])
def test_mixed_load_keeps_every_invariant(make_backend, make_lock, conn_log, slots):
    backend = make_backend("echo")
    activations = []
    fds_before = open_fds()
    greenlets_before = live_greenlets()
    lock = make_lock(
        backend,
        slots=slots,
        on_activate=lambda conn: activations.append(conn.id),
        finish_timeout=5,
    )
    rng = random.Random(1234 + slots)
    plan = [rng.choice(BEHAVIOURS) for _ in range(300)]
    clients = []
    for i, behaviour in enumerate(plan):
        clients.append(gevent.spawn(run_client, lock.server_port, behaviour, random.Random(i)))
        if i % 25 == 0:
            gevent.sleep(0)  # let accepts happen as clients keep arriving
    gevent.joinall(clients, timeout=100, raise_error=True)
    assert all(g.ready() for g in clients)
    failures = [g.value for g in clients if not g.value[1]]
    assert failures == []

    # The backend never saw more than `slots` clients at once.
    wait_until(lambda: backend.all_closed.is_set())
    assert backend.most <= slots

    # Every client ended with exactly one logged reason.
    wait_until(lambda: not lock.connections, timeout=20)
    ends = []
    while not conn_log.ends.empty():
        ends.append(conn_log.ends.get()["end"])
    assert len(ends) == len(plan)
    allowed = {"closed", "client-reset", "left-queue"}
    assert set(ends) <= allowed, set(ends) - allowed

    # Slots were granted in accept order.
    assert activations == sorted(activations)

    # Afterwards a new client is served at once, and nothing leaked.
    c = connect(lock.server_port)
    c.sendall(b"after")
    c.shutdown(socket.SHUT_WR)
    assert recv_all(c, timeout=5) == b"after"
    c.close()
    wait_until(lambda: not lock.connections)
    assert lock.gate.held == 0 and lock.queued == 0
    lock.stop(timeout=0)
    wait_until(lambda: open_fds() <= fds_before + 2, what="descriptors back to baseline")
    wait_until(lambda: live_greenlets() <= greenlets_before + 2, what="greenlets back to baseline")


# -- the backend's own view, from another process ---------------------------------------------

# An echo server in a process of its own, one thread for everything (so that nothing of it holds
# a socket busy while it looks at another). At each accept it counts the connections still open
# besides the new one, as its kernel has them: a connection is over once this process has closed
# it, or once the peer reset it (TCP state CLOSE). One that the peer opened and closed without
# sending a byte (a readiness probe: connect, close) is over once its FIN is in (CLOSE_WAIT).
# Any other connection is open, whatever this process has had time to notice. It prints its
# port, and a JSON summary when its standard input closes.
ECHO_BACKEND = r"""
import json, os, selectors, socket, struct, sys

CLOSE, CLOSE_WAIT = 7, 8
sel = selectors.DefaultSelector()
conns = {}  # socket -> [record, bytes waiting to be echoed]
records = []
most = 0


def over(sock):
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 136)
    received = struct.unpack_from("Q", info, 128)[0] if len(info) >= 136 else 1
    # (The peer's FIN counts as one byte received.)
    return info[0] == CLOSE or (info[0] == CLOSE_WAIT and received <= 1)


def end(sock, how):
    rec, _ = conns.pop(sock)
    rec["end"] = how
    sel.unregister(sock)
    sock.close()


def accept(listener):
    global most
    sock, _ = listener.accept()
    sock.setblocking(False)
    others = [c[0]["n"] for s, c in conns.items() if not over(s)]
    most = max(most, len(others) + 1)
    rec = {"n": len(records) + 1, "bytes": 0, "end": None, "head": "", "with": others}
    records.append(rec)
    conns[sock] = [rec, b""]
    sel.register(sock, selectors.EVENT_READ, serve)


def serve(sock):
    rec, pending = conns[sock]
    try:
        if pending:
            pending = pending[sock.send(pending) :]
        else:
            data = sock.recv(65536)
            if not data:
                return end(sock, "eof")
            if len(rec["head"]) < 7:
                rec["head"] += data[: 7 - len(rec["head"])].decode("latin-1")
            rec["bytes"] += len(data)
            pending = data[sock.send(data) :]
    except BlockingIOError:
        pass
    except OSError as e:
        return end(sock, e.__class__.__name__)
    conns[sock][1] = pending
    sel.modify(sock, selectors.EVENT_WRITE if pending else selectors.EVENT_READ, serve)


def finish(stdin):
    summary = {"most": most, "still_open": len(conns), "records": records}
    sys.stdout.write(json.dumps(summary) + "\n")
    sys.stdout.flush()
    os._exit(0)


listener = socket.socket()
listener.bind(("127.0.0.1", 0))
listener.listen(1024)
listener.setblocking(False)
sel.register(listener, selectors.EVENT_READ, accept)
sel.register(sys.stdin, selectors.EVENT_READ, finish)
print(listener.getsockname()[1], flush=True)
while True:
    for key, _ in sel.select():
        key.data(key.fileobj)
"""


@pytest.fixture
def echo_process():
    """Starts the echo backend process; returns (port, finish) where finish() ends it and
    returns its summary. The process is killed at teardown if it is still running."""
    procs = []

    def start():
        proc = subprocess.Popen(
            [sys.executable, "-c", ECHO_BACKEND], stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        procs.append(proc)
        port = int(proc.stdout.readline())

        def finish():
            proc.stdin.close()
            summary = json.loads(proc.stdout.readline())
            assert proc.wait(timeout=5) == 0
            return summary

        return port, finish

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def client(c, i, kind, rng):
    """One client on its connected socket; returns (i, kind, ok). Each client that sends
    anything starts with its number, so that the backend can tell who reached it, and in which
    order."""
    head = b"%06d\n" % i
    try:
        if kind == "leaves":  # leaves the queue (or the slot, if it already had it) at once
            gevent.sleep(rng.random() * 0.03)
            (c.close if rng.random() < 0.5 else lambda: reset(c))()
            return i, kind, True
        if kind == "complete":
            payload = head + rng.randbytes(rng.randint(1, 20000))
            c.sendall(payload)
            c.shutdown(socket.SHUT_WR)
            return i, kind, recv_all(c, timeout=30) == payload
        if kind in ("closes_early", "resets"):
            c.sendall(head + rng.randbytes(64 << 10))
            recv_exactly(c, 1, timeout=30)  # relayed: it holds the slot
            c.close() if kind == "closes_early" else reset(c)  # unread data: the close is an RST
            return i, kind, True
        if kind == "overstays":  # holds the connection open until the timeout cuts it
            c.sendall(head)
            assert recv_exactly(c, 7, timeout=30) == head
            try:
                return i, kind, recv_all(c, timeout=10) == b""
            except ConnectionResetError:
                return i, kind, True
        raise AssertionError(kind)
    except OSError as e:
        return i, kind, f"{e!r}"
    finally:
        c.close()


PATHS = {
    # name: (TCPLock settings, or the command's options for "cli"; how many clients overstay)
    "plain": ({}, 0),
    "python-hook": ({"on_activate": "record"}, 0),
    "two-slots": ({"slots": 2}, 0),
    "restart-every": ({"restart": lambda reason: None, "restart_every": 7}, 0),
    "timeout": ({"timeout": 0.25}, 3),
    "cli": (["--finish-timeout", "5", "--client-finish-timeout", "5"], 0),
}


# About 5 s each on two idle cores; the bounds leave room for a machine shared with other work.
@pytest.mark.timeout(90)
@pytest.mark.parametrize("path", list(PATHS))
def test_the_backend_process_never_sees_more_than_slots_connections(
    echo_process, make_lock, cli, conn_log, on_connect, path
):
    settings, overstaying = PATHS[path]
    port, finish = echo_process()
    granted = []
    # In this process, at the very moment of each connect() toward the backend: how many
    # earlier connections to it are still held open at both ends.
    open_at_connect = []

    def connecting(address):
        if address[1] == port:
            open_at_connect.append(conversations(port))

    on_connect(connecting)
    if path == "cli":  # the command, in a process of its own
        slots = 1
        proc = cli.to(port, *settings)
        lock_port = proc.wait_ready()
    else:
        settings = dict(settings)
        if settings.get("on_activate") == "record":
            settings["on_activate"] = lambda conn: granted.append(conn.id)
        slots = settings.get("slots", 1)
        lock = make_lock(port, finish_timeout=5, **settings)
        lock_port = lock.server_port
    rng = random.Random(f"stress {path}")
    kinds = rng.choices(
        ["complete", "leaves", "closes_early", "resets"], weights=[60, 20, 10, 10], k=300
    )
    for i in rng.sample(range(20, len(kinds)), overstaying):
        kinds[i] = "overstays"
    clients = []
    for i, kind in enumerate(kinds):
        # One connect after the other, from this greenlet (each returns once the kernel has the
        # connection in the lock's listen queue): tcplock accepts them in this order.
        c = connect(lock_port, timeout=10)
        clients.append(gevent.spawn(client, c, i, kind, random.Random(i)))
        if i % 10 == 0:
            gevent.sleep(0.001)  # let the lock work as clients keep arriving
    gevent.joinall(clients, timeout=75, raise_error=True)
    assert [g.value for g in clients if g.value[2] is not True] == []
    if path == "cli":
        wait_until(
            lambda: sum(" end=" in line for line in proc.lines) == len(kinds),
            timeout=10,
            what="a line for every connection",
        )
        proc.signal(signal.SIGTERM)
        assert proc.wait() == 0
        lines = [LogCapture.LINE.search(line) for line in proc.lines]
        ends_seen = [m.group("end") for m in lines if m]
    else:
        wait_until(lambda: not lock.connections, timeout=10, what="every connection ended")
        ends_seen = []
        while not conn_log.ends.empty():
            ends_seen.append(conn_log.ends.get()["end"])
    summary = finish()

    # As the kernel had it whenever tcplock connected to the backend (in-process paths; the
    # readiness probes after a restart count too), and as the backend process saw it at each
    # accept: never more than `slots` connections at once.
    assert max(open_at_connect, default=0) < slots, sorted(open_at_connect)[-3:]
    assert path == "cli" or len(open_at_connect) >= len(summary["records"])
    crowded = [r for r in summary["records"] if len(r["with"]) >= slots]
    assert summary["most"] <= slots, crowded[:3]
    assert summary["still_open"] == 0

    # Every client that sent something reached the backend exactly once, in accept order.
    reached = [int(r["head"]) for r in summary["records"] if len(r["head"]) == 7]
    senders = [i for i, kind in enumerate(kinds) if kind != "leaves"]
    assert sorted(reached) == senders
    if slots == 1:
        assert reached == senders
    else:
        # With several slots, clients let in together may reach it in either order, but none
        # overtakes a client let in `slots` turns before it.
        assert all(a < b for k, a in enumerate(reached) for b in reached[k + slots :])
    assert granted == sorted(granted)

    # Every connection ended once, for a reason its client gave.
    assert len(ends_seen) == len(kinds)
    assert set(ends_seen) <= {"closed", "client-reset", "left-queue", "ttl"}, set(ends_seen)
    assert ends_seen.count("ttl") == overstaying
