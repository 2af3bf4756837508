"""examples/embed_gevent.py, run as a real program: a gevent web app with a TCPLock inside it."""

import json
import re
import signal
import sys
from pathlib import Path

import gevent
import pytest
import readme_commands as rc
from gevent import socket
from gevent.event import Event

from conftest import LOOPBACK, ChildProcess, http, recv_all, require_command, wait_until

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
        "--backend",
        f"{LOOPBACK}:{backend.server_port}",
        "--listen",
        "0",
        "--http",
        "0",
        "--drain",
        "0.5",
    )
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


# --- the READMEs' commands, as written (see readme_commands.py) ------------------------------


@pytest.mark.timeout(600)  # the first user of readme_clone waits for the quick start's install
def test_readme_command_as_written(readme_clone, make_backend):
    """examples/README.md's command, from the top of a fresh copy with the quick start's venv:
    a client is relayed through 9000 to the service on 2003, the page on 8080 shows the lock,
    and Ctrl-C stops it with status 0."""
    clone, _ = readme_clone
    cmd = rc.command("examples/README.md", ".venv/bin/python examples/embed_gevent.py")
    rc.ensure_free(9000, 8080)
    make_backend("echo", port=2003)
    shell = rc.Shell(cmd, cwd=clone)
    try:
        shell.wait_for(r"tcplock on 127\.0\.0\.1:9000, status page on http://127\.0\.0\.1:8080/")
        c = socket.create_connection((LOOPBACK, 9000), timeout=10)
        c.sendall(b"through the example")
        c.shutdown(socket.SHUT_WR)
        assert recv_all(c, timeout=10) == b"through the example"
        c.close()
        code, _, body = http(8080, "GET", "/status.json")
        assert code == 200 and json.loads(body)["served"] == 1, body
        assert shell.stop(signal.SIGINT) == 0, shell.output()
    finally:
        shell.kill()


DEBIAN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
LIBREOFFICE = "examples/libreoffice/README.md"


@pytest.mark.timeout(900)
def test_libreoffice_readme_as_written(readme_clone):
    """examples/libreoffice/README.md, steps 1 to 4 as written, from the top of a fresh copy,
    on the README's ports, with the PATH of a plain Debian (its python3 has no tcplock):
    install.sh makes the venv with unoserver and tcplock, run-stack.sh starts the farm, a
    document is converted through tcplock, and a LibreOffice killed with SIGKILL comes back."""
    require_command("soffice", "libreoffice-core-nogui libreoffice-writer-nogui python3-uno")
    clone, _ = readme_clone
    env = {"PATH": DEBIAN_PATH}
    rc.ensure_free(9000, 9100, 2003, 2004, 2005, 3003, 3004, 3005)
    rc.run(
        rc.command(LIBREOFFICE, "examples/libreoffice/install.sh"), cwd=clone, env=env, timeout=800
    )
    shell = rc.Shell(
        rc.command(LIBREOFFICE, "examples/libreoffice/run-stack.sh"), cwd=clone, env=env
    )
    try:
        printed = shell.wait_for(r"run-stack\.sh: .* -m tcplock ", timeout=30)
        shown = rc.command(LIBREOFFICE, "python3 -m tcplock --listen 127.0.0.1:9000")
        for flag in (
            "--listen 127.0.0.1:9000",
            "--backend 127.0.0.1:2003",
            "--slots 1",
            "--restart-every 100",
            "--status 127.0.0.1:9100",
        ):
            assert flag in shown and flag.split()[1] in printed, (flag, printed)
        shell.wait_for(r"listening on 127\.0\.0\.1:9000\b", timeout=60)

        def all_up():  # two in service and the standby (SPARES=1, run-stack.sh's default)
            code, _, body = http(9100, "GET", "/status")
            if code != 200:
                return False
            states = sorted(b["state"] for b in json.loads(body)["backends"])
            return states == ["standby", "up", "up"]

        wait_until(all_up, timeout=120, what="two unoservers up and the standby")
        rc.run(rc.command(LIBREOFFICE, "printf 'Hello from behind tcplock"), cwd=clone)
        convert = rc.command(LIBREOFFICE, "examples/libreoffice/.venv/bin/unoconvert")
        rc.run(convert, cwd=clone, timeout=120)
        assert (clone / "hello.pdf").read_bytes().startswith(b"%PDF")

        (clone / "hello.pdf").unlink()
        rc.run(rc.command(LIBREOFFICE, "kill -KILL $(pgrep"), cwd=clone)
        shell.wait_for(r"backend 127\.0\.0\.1:2003.* (ended|died|exited|was killed)", timeout=30)
        wait_until(all_up, timeout=120, what="the killed unoserver back up")
        rc.run(convert, cwd=clone, timeout=120)
        assert (clone / "hello.pdf").read_bytes().startswith(b"%PDF")
        assert shell.stop(signal.SIGINT, timeout=90) == 0, shell.output()[-3000:]
    finally:
        shell.kill()
