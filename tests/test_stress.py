"""Load invariants: several hundred concurrent clients with mixed behaviour.

Whatever the mix, the backend never sees more than ``slots`` connections, every byte of every
well-behaved client comes back intact, clients are let in in accept order, every connection
ends with exactly one logged reason, and afterwards descriptors and greenlets are back to where
they started.
"""

import gc
import hashlib
import os
import random

import gevent
import pytest
from gevent import socket
from greenlet import greenlet

from conftest import connect, recv_all, reset, wait_until

pytestmark = pytest.mark.timeout(120)

BEHAVIOURS = ["normal", "half_close", "reset_queued", "reset_active", "slow_reader", "large"]


def greenlet_count():
    gc.collect()
    return sum(1 for o in gc.get_objects() if isinstance(o, greenlet) and not o.dead)


def fd_count():
    return len(os.listdir("/proc/self/fd"))


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
    fds_before = fd_count()
    greenlets_before = greenlet_count()
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
    wait_until(lambda: fd_count() <= fds_before + 2, what="descriptors back to baseline")
    wait_until(lambda: greenlet_count() <= greenlets_before + 2, what="greenlets back to baseline")
