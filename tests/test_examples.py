"""examples/embed_gevent.py, run as a real program: a gevent web app with a TCPLock inside it."""

import json
import re
import signal
import sys
from pathlib import Path

import gevent
import pytest
from gevent import socket
from gevent.event import Event

from conftest import LOOPBACK, ChildProcess, http, recv_all, wait_until

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "embed_gevent.py"


class Example(ChildProcess):
    """The example program as a subprocess, its stderr collected line by line."""

    STARTED = re.compile(r"tcplock on (\S+):(\d+), status page on http://(\S+):(\d+)/")
    clean_prefixes = ("EMBED_", "TCPLOCK_")

    def __init__(self, *args):
        self.started = Event()
        self.lock_port = self.http_port = None
        super().__init__([sys.executable, str(EXAMPLE), *args], cwd=ROOT)

    def on_line(self, line):
        m = self.STARTED.search(line)
        if m:
            self.lock_port, self.http_port = int(m.group(2)), int(m.group(4))
            self.started.set()

    def on_eof(self):
        self.started.set()

    def wait_started(self, timeout=20):
        self.started.wait(timeout)
        assert self.lock_port, "the example did not start:\n" + self.output()

    def status(self):
        code, _, body = http(self.http_port, "GET", "/status.json")
        assert code == 200, body
        return json.loads(body)


@pytest.fixture
def example():
    started = []

    def run(*args):
        ex = Example(*args)
        started.append(ex)
        return ex

    yield run
    for ex in started:
        ex.kill()


def client(port, payload):
    """Connect through the lock, send, read until the backend closes, then close."""
    s = socket.create_connection((LOOPBACK, port), timeout=10)
    try:
        s.sendall(payload)
        return recv_all(s, timeout=20)
    finally:
        s.close()


def test_embedded_lock_serialises_and_shows_its_queue(make_backend, example):
    backend = make_backend("hold")
    ex = example("--backend", f"{LOOPBACK}:{backend.server_port}", "--listen", "0", "--http", "0")
    ex.wait_started()
    backend.take_check()

    status = ex.status()
    assert status["queued"] == 0 and status["active"] == [] and status["slots"] == 1
    assert status["backend"] == f"{LOOPBACK}:{backend.server_port}"

    clients = [gevent.spawn(client, ex.lock_port, b"client %d" % i) for i in range(3)]
    first = backend.next_conn()
    # The other two wait in tcplock's queue, and the app's page says so.
    wait_until(lambda: ex.status()["queued"] == 2, timeout=10, what="2 queued on the page")
    status = ex.status()
    assert len(status["active"]) == 1
    assert backend.current == 1
    _, _, page = http(ex.http_port, "GET", "/")
    assert b'queued: <b id="queued">2</b>' in page and b'active: <b id="active">1</b>' in page

    # Each release lets exactly the next one in; the backend never has two at once.
    seen = [first]
    for left in (1, 0):
        seen[-1].release.set()
        seen.append(backend.next_conn(timeout=10))
        wait_until(lambda n=left: ex.status()["queued"] == n, timeout=10, what=f"{left} queued")
        assert backend.current == 1
    seen[-1].release.set()
    gevent.joinall(clients, timeout=20, raise_error=True)
    assert backend.most == 1 and backend.count == 3
    assert sorted(bytes(c.received) for c in seen) == [b"client 0", b"client 1", b"client 2"]
    wait_until(lambda: ex.status()["served"] == 3, timeout=10, what="3 served")
    assert ex.status()["active"] == []

    ex.proc.send_signal(signal.SIGTERM)
    assert ex.wait(timeout=15) == 0, "\n".join(ex.lines)
    assert ex.lines[-1] == "stopped"


def test_sigterm_while_busy_drains_then_exits_zero(make_backend, example):
    backend = make_backend("hold")
    ex = example(
        "--backend", f"{LOOPBACK}:{backend.server_port}", "--listen", "0", "--http", "0",
        "--drain", "0.5",
    )  # fmt: skip
    ex.wait_started()
    backend.take_check()
    active = gevent.spawn(client, ex.lock_port, b"busy")
    backend.next_conn()
    waiting = gevent.spawn(client, ex.lock_port, b"waiting")
    wait_until(lambda: ex.status()["queued"] == 1, timeout=10, what="1 queued")

    ex.proc.send_signal(signal.SIGTERM)
    # The waiting client is turned away at once, the active one is cut after the drain time;
    # the backend never sees the waiting one, and the program exits 0.
    assert ex.wait(timeout=15) == 0, "\n".join(ex.lines)
    assert "stopping: 1 active, 1 queued" in ex.lines
    for g in (active, waiting):
        g.join(timeout=10)
        assert g.ready()
    assert backend.count == 1
