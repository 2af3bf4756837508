"""contrib/haproxy/: real HAProxy in front of two tcplock instances, each with its own backend.

HAProxy runs contrib/haproxy/haproxy.cfg as shipped, with only its documented placeholder
addresses replaced by free loopback ports, so the configuration users copy is the one tested.
Each backend names itself ("A" or "B") before echoing, so a client knows which instance served
it; HAProxy's stats CSV shows what HAProxy believes about each instance.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import re
import socket as _stdsocket
import time
from pathlib import Path

import gevent
import pytest
from gevent import subprocess

from conftest import (
    LOOPBACK,
    connect,
    http,
    recv_all,
    require_command,
    tcp_connections,
    wait_until,
)

pytestmark = pytest.mark.timeout(120)

CONFIG = Path(__file__).resolve().parent.parent / "contrib" / "haproxy" / "haproxy.cfg"

# Placeholder -> (name of the real value, times it must occur outside comments).
PLACEHOLDERS = {
    "127.0.0.1:9000": ("frontend", 1),
    "127.0.0.1:9001": ("a", 1),
    "127.0.0.1:9002": ("b", 1),
    "9101": ("a_agent", 2),  # check port + agent-port
    "9102": ("b_agent", 2),
    "127.0.0.1:8404": ("stats", 1),
    "/run/haproxy/admin.sock": ("socket", 1),
}
_PLACEHOLDER = re.compile(
    r"127\.0\.0\.1:(?:9000|9001|9002|8404)\b|(?<![\d.:])(?:9101|9102)\b|/run/haproxy/admin\.sock"
)


def render_config(text: str, values: dict) -> str:
    """The shipped config with each placeholder replaced; comments are left alone. Fails if a
    placeholder is missing or appears more often than expected, so an edit to the shipped file
    cannot silently leave the test running something else."""
    seen = dict.fromkeys(PLACEHOLDERS, 0)

    def sub(m):
        placeholder = m.group(0)
        seen[placeholder] += 1
        value = values[PLACEHOLDERS[placeholder][0]]
        return f"{LOOPBACK}:{value}" if placeholder.startswith(LOOPBACK) else value

    out = []
    for line in text.splitlines(keepends=True):
        out.append(line if line.lstrip().startswith("#") else _PLACEHOLDER.sub(sub, line))
    expected = {k: n for k, (_name, n) in PLACEHOLDERS.items()}
    assert seen == expected, f"placeholders in {CONFIG.name}: found {seen}, expected {expected}"
    return "".join(out)


def free_port() -> int:
    s = _stdsocket.socket()
    s.bind((LOOPBACK, 0))
    port = s.getsockname()[1]
    s.close()
    return port


def dechunk(body: bytes) -> bytes:
    out = b""
    while True:
        size, _, body = body.partition(b"\r\n")
        n = int(size.split(b";")[0], 16)
        if not n:
            return out
        out, body = out + body[:n], body[n + 2 :]


def tagged_echo(tag: bytes):
    """Backend behaviour: say which backend this is, then echo until EOF."""

    def behaviour(conn):
        conn.sock.sendall(tag + b"\n")
        while True:
            data = conn.sock.recv(65536)
            if not data:
                break
            conn.received += data
            conn.sock.sendall(data)

    return behaviour


class Instance:
    """One tcplock subprocess with its status and agent-check ports, taking the PROXY line
    HAProxy sends (send-proxy in the shipped config)."""

    def __init__(self, cli, backend_port):
        self.proc = cli(
            "--accept-proxy",
            "--listen",
            f"{LOOPBACK}:0",
            "--proxy-host",
            LOOPBACK,
            "--proxy-port",
            str(backend_port),
            "--status",
            f"{LOOPBACK}:0",
            "--agent-check",
            f"{LOOPBACK}:0",
        )
        self.port = self.proc.wait_ready()
        line = self.proc.wait_for(r"status on http://\S+:\d+/status")
        self.status_port = int(re.search(r":(\d+)/status", line).group(1))
        line = self.proc.wait_for(r"agent-check on \S+:\d+")
        self.agent_port = int(re.search(r"agent-check on \S+:(\d+)", line).group(1))

    def status(self) -> dict:
        code, _, body = http(self.status_port, "GET", "/status")
        assert code == 200
        return json.loads(body)

    def post(self, path):
        code, _, _ = http(self.status_port, "POST", path)
        assert code == 200

    def agent_reply(self) -> bytes:
        s = connect(self.agent_port)
        try:
            return recv_all(s)
        finally:
            s.close()


class Farm:
    def __init__(self, haproxy, frontend, stats, socket_path, log, a, b):
        self.haproxy = haproxy
        self.frontend = frontend
        self.stats_port = stats
        self.socket_path = socket_path
        self.log = log
        self.a = a
        self.b = b

    def haproxy_output(self) -> str:
        return self.log.read_text(errors="replace")

    def servers(self) -> dict:
        """HAProxy's view of each server of the tcplock backend, from its stats CSV."""
        code, headers, body = http(self.stats_port, "GET", "/;csv")
        assert code == 200
        if headers.get("transfer-encoding") == "chunked":  # even to an HTTP/1.0 request
            body = dechunk(body)
        rows = csv.DictReader(io.StringIO(body.decode().lstrip("# ")))
        return {
            r["svname"]: r for r in rows if r["pxname"] == "tcplock" and r["svname"] in ("a", "b")
        }

    def wait_servers(self, predicate, what, timeout=10.0):
        deadline = time.monotonic() + timeout
        while True:
            servers = self.servers()
            if predicate(servers):
                return servers
            if time.monotonic() > deadline or self.haproxy.poll() is not None:
                seen = {k: (v["status"], v["weight"], v["last_agt"]) for k, v in servers.items()}
                raise AssertionError(
                    f"timed out waiting for HAProxy to see {what}: {seen}\n"
                    + self.haproxy_output()[-3000:]
                )
            gevent.sleep(0.05)

    def runtime_api(self, command: str) -> str:
        s = _stdsocket.socket(_stdsocket.AF_UNIX)
        s.settimeout(5)
        try:
            s.connect(str(self.socket_path))
            s.sendall(command.encode() + b"\n")
            out = b""
            while True:
                data = s.recv(65536)
                if not data:
                    return out.decode()
                out += data
        finally:
            s.close()


@pytest.fixture
def farm(make_backend, cli, tmp_path):
    haproxy = require_command("haproxy", "haproxy")
    backend_a = make_backend(tagged_echo(b"A"))
    backend_b = make_backend(tagged_echo(b"B"))
    a = Instance(cli, backend_a.server_port)
    b = Instance(cli, backend_b.server_port)

    frontend, stats = free_port(), free_port()
    socket_path = tmp_path / "admin.sock"
    values = {
        "frontend": str(frontend),
        "a": str(a.port),
        "b": str(b.port),
        "a_agent": str(a.agent_port),
        "b_agent": str(b.agent_port),
        "stats": str(stats),
        "socket": str(socket_path),
    }
    config = tmp_path / "haproxy.cfg"
    config.write_text(render_config(CONFIG.read_text(), values))
    check = subprocess.run(
        [haproxy, "-c", "-f", str(config)], capture_output=True, text=True, timeout=30
    )
    assert check.returncode == 0, check.stdout + check.stderr
    log = tmp_path / "haproxy.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [haproxy, "-f", str(config), "-db"],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    f = Farm(proc, frontend, stats, socket_path, log, a, b)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                f.servers()
                break
            except OSError:
                assert proc.poll() is None, "haproxy exited:\n" + f.haproxy_output()
                assert time.monotonic() < deadline, "haproxy did not start:\n" + f.haproxy_output()
                gevent.sleep(0.05)
        # Both instances up, and the agent heard from (L7OK: it answered "up").
        f.wait_servers(
            lambda s: all(v["status"] == "UP" and v["agent_status"] == "L7OK" for v in s.values()),
            "both instances up with their agents answering",
        )
        yield f
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)


class Client:
    """A client through HAProxy. ``who`` is the backend that served it, once it has been let in."""

    def __init__(self, port, payload: bytes):
        self.sock = connect(port, timeout=20)
        self.payload = payload
        self.who = None

    def read_who(self, timeout=5.0) -> bytes:
        line = b""
        with gevent.Timeout(timeout):
            while not line.endswith(b"\n"):
                data = self.sock.recv(1)
                if not data:
                    raise EOFError(f"closed before naming its backend: {line!r}")
                line += data
        self.who = line[:-1]
        return self.who

    def finish(self, timeout=10.0) -> bytes:
        """Send the payload, half-close, and check the whole echo comes back; returns who."""
        self.sock.sendall(self.payload)
        self.sock.shutdown(_stdsocket.SHUT_WR)
        rest = recv_all(self.sock, timeout=timeout)
        if self.who is None:
            who, sep, rest = rest.partition(b"\n")
            assert sep, f"no backend name in {rest!r}"
            self.who = who
        assert rest == self.payload, (self.payload, rest)
        self.sock.close()
        return self.who


def queued(f):
    return f.a.status()["queued"], f.b.status()["queued"]


def test_pausing_one_instance_sends_new_clients_to_the_other_and_loses_nobody(farm):
    f = farm
    started = time.monotonic()

    # Two clients held open: leastconn puts the second on the instance the first did not take.
    first = Client(f.frontend, b"first")
    first.read_who()
    second = Client(f.frontend, b"second")
    second.read_who()
    assert {first.who, second.who} == {b"A", b"B"}
    held_a, held_b = (first, second) if first.who == b"A" else (second, first)

    # More clients, one at a time, until one is waiting in A's queue. Each sends its request
    # and half-closes while it waits, as tcplock allows; those that queued on B wait there.
    waiting_a, waiting_b = None, []
    for i in range(8):
        before = queued(f)
        c = Client(f.frontend, f"waiting-{i}".encode())
        c.sock.sendall(c.payload)
        c.sock.shutdown(_stdsocket.SHUT_WR)
        deadline = time.monotonic() + 5
        while sum(queued(f)) != sum(before) + 1:
            assert time.monotonic() < deadline, f"client {i} never queued: {queued(f)}"
            gevent.sleep(0.02)
        if queued(f)[0] > before[0]:
            waiting_a, waiting_since = c, time.monotonic()
            break
        waiting_b.append(c)
    assert waiting_a is not None, "HAProxy never queued a client on A"

    # Let B's clients through, so B is idle before A is paused.
    assert held_b.finish() == b"B"
    for c in waiting_b:
        rest = recv_all(c.sock, timeout=10)
        assert rest == b"B\n" + c.payload
        c.sock.close()

    # Pause A: its agent says "drain" at once, and within about one agent-inter HAProxy stops
    # choosing it.
    f.a.post("/pause")
    assert f.a.agent_reply() == b"drain\n"
    wait_until(lambda: f.b.agent_reply() == b"up ready 100%\n", what="B idle, slot free")
    paused_at = time.monotonic()
    f.wait_servers(
        lambda s: s["a"]["status"].startswith("DRAIN") and s["b"]["status"] == "UP",
        "A draining",
        timeout=5,
    )
    drained_after = time.monotonic() - paused_at
    assert drained_after < 3, drained_after

    # 20 new clients at once, each with its own payload: every one is served, by B, intact.
    clients = [Client(f.frontend, f"client-{i}-".encode() * (i + 1)) for i in range(20)]
    jobs = [gevent.spawn(c.finish, 20) for c in clients]
    gevent.joinall(jobs, timeout=30, raise_error=True)
    assert all(j.successful() for j in jobs)
    assert [c.who for c in clients] == [b"B"] * 20

    # Meanwhile A's active client carries on, and its waiting client is still waiting.
    held_a.sock.sendall(b"still here")
    assert held_a.sock.recv(100) == b"still here"
    status = f.a.status()
    assert status["paused"] is True
    assert status["queued"] == 1 and len(status["active"]) == 1

    # A maintenance of a few seconds: HAProxy must not cut the half-closed client waiting on A
    # (as a short "timeout server-fin" would).
    gevent.sleep(max(0.0, 4.0 - (time.monotonic() - waiting_since)))
    assert f.a.status()["queued"] == 1

    # Resume A: the held client finishes, then the waiting one is served, in order.
    f.a.post("/resume")
    assert held_a.finish() == b"A"
    rest = recv_all(waiting_a.sock, timeout=10)
    assert rest == b"A\n" + waiting_a.payload
    waiting_a.sock.close()

    # HAProxy sends new clients to A again once the agent says "ready".
    f.wait_servers(
        lambda s: all(v["status"] == "UP" and v["weight"] == "100" for v in s.values()),
        "both instances up again at full weight",
        timeout=5,
    )
    again = [Client(f.frontend, f"again-{i}".encode()) for i in range(2)]
    for c in again:
        c.read_who()
    assert {c.who for c in again} == {b"A", b"B"}
    for c in again:
        c.finish()

    # Nobody was lost or cut: every connection either instance saw ended normally, and the
    # health checks (on the agent ports) never reached the locks as clients.
    served_a = 1 + 1 + 1  # held, waiting, again
    served_b = 1 + len(waiting_b) + 20 + 1
    wait_ends = time.monotonic() + 5
    while True:
        sa, sb = f.a.status(), f.b.status()
        if sa["ended"].get("closed") == served_a and sb["ended"].get("closed") == served_b:
            break
        assert time.monotonic() < wait_ends, (sa["ended"], sb["ended"], served_a, served_b)
        gevent.sleep(0.05)
    assert sa["ended"] == {"closed": served_a} and sb["ended"] == {"closed": served_b}
    assert time.monotonic() - started < 60


def test_agent_weights_follow_the_queue(farm):
    """A busy instance reports a lower weight, and HAProxy applies it (weight 100 x N%)."""
    f = farm
    held = Client(f.frontend, b"held")
    held.read_who()
    busy = f.a if held.who == b"A" else f.b
    assert busy.agent_reply() == b"up ready 50%\n"
    name = "a" if busy is f.a else "b"
    f.wait_servers(lambda s: s[name]["weight"] == "50", f"{name} at weight 50", timeout=5)
    held.finish()
    f.wait_servers(lambda s: s[name]["weight"] == "100", f"{name} back at 100", timeout=5)


def test_retiring_an_instance_through_the_runtime_api(farm):
    """README's "Removing an instance": A gets no new clients but keeps serving those it has
    (it is not paused). The agent must be disabled first: its next "ready" undoes a drain set
    through the runtime API."""
    f = farm
    first = Client(f.frontend, b"first")
    first.read_who()
    second = Client(f.frontend, b"second")
    second.read_who()
    on_a, on_b = (first, second) if first.who == b"A" else (second, first)
    assert (on_a.who, on_b.who) == (b"A", b"B")
    assert on_b.finish() == b"B"

    # With the agent on, a drain does not stick.
    undone = "Server tcplock/a is UP (leaving forced drain)"
    assert undone not in f.haproxy_output()
    assert f.runtime_api("set server tcplock/a state drain").strip() == ""
    wait_until(lambda: undone in f.haproxy_output(), what="the agent undoing the drain")
    assert f.servers()["a"]["status"] == "UP"

    assert f.runtime_api("disable agent tcplock/a").strip() == ""
    assert f.runtime_api("set server tcplock/a state drain").strip() == ""
    f.wait_servers(lambda s: s["a"]["status"].startswith("DRAIN"), "A drained by the runtime API")
    gevent.sleep(2.5)  # more than two agent-inter: the drain sticks
    assert f.servers()["a"]["status"].startswith("DRAIN")
    clients = [Client(f.frontend, f"retire-{i}".encode()) for i in range(6)]
    jobs = [gevent.spawn(c.finish, 20) for c in clients]
    gevent.joinall(jobs, timeout=30, raise_error=True)
    assert [c.who for c in clients] == [b"B"] * 6
    assert on_a.finish() == b"A"  # A's own client was never disturbed
    wait_until(lambda: not f.a.status()["active"], what="A idle")
    status = f.a.status()
    assert status["paused"] is False and status["queued"] == 0
    assert status["ended"] == {"closed": 1}

    # Bringing it back: ready, and the agent on again.
    f.runtime_api("set server tcplock/a state ready")
    f.runtime_api("enable agent tcplock/a")
    f.wait_servers(lambda s: s["a"]["status"] == "UP", "A back in rotation")


def test_a_dead_instance_loses_no_new_client(farm):
    """B's tcplock dies (SIGKILL: no "drain" first). Until two health checks have failed,
    leastconn still sends B new clients; "retries" with "option redispatch 1" moves each of
    them to A at once instead of failing it."""
    f = farm
    f.b.proc.kill()
    assert f.servers()["b"]["status"].startswith("UP")  # HAProxy has not noticed yet
    clients = [Client(f.frontend, f"after-death-{i}".encode()) for i in range(10)]
    jobs = [gevent.spawn(c.finish, 20) for c in clients]
    gevent.joinall(jobs, timeout=30, raise_error=True)
    assert [c.who for c in clients] == [b"A"] * 10
    assert int(f.servers()["b"]["wredis"]) > 0  # some really were sent to B first
    f.wait_servers(lambda s: s["b"]["status"].startswith("DOWN"), "B down", timeout=10)


def test_tcplock_sees_each_client_not_haproxy(farm):
    """With send-proxy, tcplock's log and /status name the client. On loopback the client and
    HAProxy share 127.0.0.1, so the port tells them apart: the client's own, not the port of
    HAProxy's connection to tcplock."""
    f = farm
    clients = [Client(f.frontend, f"who-{i}".encode()) for i in range(2)]
    for c in clients:
        c.read_who()
    instance = {b"A": f.a, b"B": f.b}
    for c in clients:
        port = c.sock.getsockname()[1]
        (entry,) = instance[c.who].status()["active"]
        assert entry["client"] == f"{LOOPBACK}:{port}"
        # HAProxy's side of its connection to tcplock has a port of its own.
        listen = instance[c.who].port
        haproxy_ports = {remote for local, remote, *_ in tcp_connections(listen) if local == listen}
        assert haproxy_ports and port not in haproxy_ports
    for c in clients:
        port = c.sock.getsockname()[1]
        c.finish()
        instance[c.who].proc.wait_for(rf"{LOOPBACK}:{port} queued=\S+ active=\S+ .* end=closed")
    # A client that skips HAProxy sends no PROXY line: it is closed, never reaching a backend.
    direct = connect(f.a.port)
    direct.sendall(b"hello\n")
    with contextlib.suppress(ConnectionResetError):  # "hello" unread: the close may be a reset
        assert recv_all(direct) == b""
    f.a.proc.wait_for(rf"{LOOPBACK}:{direct.getsockname()[1]} .* end=bad-proxy-header")
    direct.close()
    assert "bad-proxy-header" not in f.b.proc.output()


def sections(text: str) -> dict:
    """{"defaults": [[word, ...], ...], "backend tcplock": [...], ...}, comments dropped."""
    out, current = {}, None
    for line in text.splitlines():
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        if not line[0].isspace():
            current = out.setdefault(" ".join(words), [])
        else:
            current.append(words)
    return out


def test_shipped_config_keeps_the_promises_of_its_comments():
    """What the live tests cannot reach in seconds: timeouts long enough for a queue, and none
    that would cut a half-closed client waiting its turn."""
    config = sections(CONFIG.read_text())
    defaults, backend = config["defaults"], config["backend tcplock"]
    timeouts = {words[1]: words[2] for words in defaults if words[0] == "timeout"}
    assert timeouts["client"] == timeouts["server"], "HAProxy: keep them equal in TCP mode"
    assert timeouts["client"].endswith("m") and int(timeouts["client"][:-1]) >= 5
    assert "client-fin" not in timeouts and "server-fin" not in timeouts
    assert "tunnel" not in timeouts
    assert {"connect", "queue", "check"} <= set(timeouts)
    assert ["mode", "tcp"] in defaults and ["balance", "leastconn"] in backend
    assert ["option", "redispatch", "1"] in defaults
    assert not any(w[0] == "timeout" for w in backend + config["frontend tcplock_in"])
    default = next(w for w in backend if w[0] == "default-server")
    assert default[default.index("weight") + 1] == "100"
    servers = [w for w in backend if w[0] == "server"]
    assert len(servers) >= 2
    for w in servers:
        # Health check and agent on the agent port: never a client in tcplock's queue.
        assert w[w.index("port") + 1] == w[w.index("agent-port") + 1]
        assert "check" in w and "agent-check" in w and "maxconn" not in w
        assert "send-proxy" in w  # tcplock runs with --accept-proxy
