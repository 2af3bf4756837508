"""Observing and steering: lock.status(), the HTTP endpoint (status, Prometheus metrics,
pause/resume), HAProxy's agent-check, and JSON log lines."""

import json
import signal

import gevent
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import connect, http, recv_all, recv_exactly, wait_until
from tcplock.status import AgentCheck, StatusServer, agent_reply

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def status_of():
    servers = []

    def start(lock):
        server = StatusServer(("127.0.0.1", 0), lock)
        server.start()
        servers.append(server)
        return server.server_port

    yield start
    for s in servers:
        s.stop(timeout=0)


def test_status_reports_queue_active_and_counts(make_backend, make_lock, status_of):
    backend = make_backend("hold")
    lock = make_lock(backend, slots=1)
    port = status_of(lock)
    a = connect(lock.server_port)
    a.sendall(b"12345")
    held = backend.next_conn()
    wait_until(lambda: len(held.received) == 5)
    waiting = [connect(lock.server_port) for _ in range(3)]
    wait_until(lambda: lock.queued == 3)
    gevent.sleep(0.05)
    code, headers, body = http(port)
    assert code == 200 and headers["content-type"] == "application/json"
    st = json.loads(body)
    assert st["slots"] == 1 and st["queued"] == 3
    assert st["oldest_wait_seconds"] >= 0.05
    (entry,) = st["active"]
    assert entry["client"] == "{}:{}".format(*a.getsockname())
    assert entry["bytes_up"] == 5 and entry["seconds"] > 0
    assert st["paused"] is False and st["draining"] is False
    assert st["version"] and st["uptime_seconds"] > 0
    waiting[0].close()
    wait_until(lambda: lock.queued == 2)
    st = json.loads(http(port)[2])
    assert st["ended"] == {"left-queue": 1} and st["served"] == 0


def test_metrics_are_prometheus_exposition(make_backend, make_lock, status_of):
    backend = make_backend("echo")
    lock = make_lock(backend, slots=2)
    port = status_of(lock)
    for payload in (b"abc", b"defgh"):
        c = connect(lock.server_port)
        c.sendall(payload)
        recv_exactly(c, len(payload))
        c.close()
    wait_until(lambda: lock.served == 2)
    code, headers, body = http(port, path="/metrics")
    assert code == 200 and headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    assert samples[("tcplock_slots", ())] == 2
    assert samples[("tcplock_active_connections", ())] == 0
    assert samples[("tcplock_queued_connections", ())] == 0
    assert samples[("tcplock_connections_total", (("reason", "closed"),))] == 2
    assert samples[("tcplock_connections_total", (("reason", "ttl"),))] == 0
    assert samples[("tcplock_restarts_total", ())] == 0
    assert samples[("tcplock_hook_failures_total", ())] == 0
    assert samples[("tcplock_bytes_total", (("direction", "up"),))] == 8
    assert samples[("tcplock_bytes_total", (("direction", "down"),))] == 8
    assert samples[("tcplock_queue_wait_seconds_count", ())] == 2
    assert samples[("tcplock_connection_duration_seconds_count", ())] == 2


def test_pause_holds_queue_and_resume_moves_it_in_order(make_backend, make_lock, status_of):
    backend = make_backend("hold")
    lock = make_lock(backend)
    port = status_of(lock)
    a = connect(lock.server_port)
    a.sendall(b"a")
    first = backend.next_conn()
    b = connect(lock.server_port)
    b.sendall(b"b")
    wait_until(lambda: lock.queued == 1)
    code, _, body = http(port, "POST", "/pause")
    assert code == 200 and json.loads(body) == {"paused": True}
    c = connect(lock.server_port)  # arrives while paused: queues
    c.sendall(b"c")
    wait_until(lambda: lock.queued == 2)
    # The active connection is untouched: it finishes; nobody is let in.
    first.release.set()
    a.close()
    wait_until(lambda: lock.served == 1)
    gevent.sleep(0.1)
    assert backend.count == 1 and lock.queued == 2
    assert json.loads(http(port)[2])["paused"] is True
    assert http(port, "POST", "/resume")[0] == 200
    second = backend.next_conn()
    wait_until(lambda: second.received)
    assert bytes(second.received) == b"b"
    second.release.set()
    b.close()
    third = backend.next_conn()
    wait_until(lambda: third.received)
    assert bytes(third.received) == b"c"
    third.release.set()


def test_wrong_method_or_path_is_an_http_error(make_backend, make_lock, status_of):
    lock = make_lock(make_backend("echo"))
    port = status_of(lock)
    code, headers, _ = http(port, "GET", "/pause")
    assert code == 405 and headers["allow"] == "POST"
    assert http(port, "GET", "/nope")[0] == 404
    assert lock.paused is False


def test_agent_check_reflects_load_and_state(make_backend, make_lock):
    backend = make_backend("hold")
    lock = make_lock(backend, slots=1)
    agent = AgentCheck(("127.0.0.1", 0), lock)
    agent.start()
    try:

        def ask():
            s = connect(agent.server_port)
            try:
                return recv_all(s).decode()
            finally:
                s.close()

        assert ask() == "up ready 100%\n"
        a = connect(lock.server_port)
        backend.next_conn()
        assert ask() == "up ready 50%\n"
        waiting = [connect(lock.server_port) for _ in range(3)]
        wait_until(lambda: lock.queued == 3)
        assert ask() == "up ready 20%\n"
        lock.pause()
        assert ask() == "drain\n"
        lock.resume()
        assert ask().startswith("up ready")
        for c in [a, *waiting]:
            c.close()
    finally:
        agent.stop(timeout=0)


def test_agent_reply_drains_while_restarting_and_stopping(make_backend, make_lock):
    backend = make_backend("echo")
    replies = []
    lock = make_lock(
        backend, restart=lambda reason: replies.append(agent_reply(lock)), restart_every=1
    )
    c = connect(lock.server_port)
    c.sendall(b"x")
    recv_exactly(c, 1)
    c.close()
    wait_until(lambda: replies)
    assert replies == ["drain\n"]
    wait_until(lambda: not lock.restarting, what="the restart done")
    assert agent_reply(lock).startswith("up ready")
    # While stop() drains an active connection, the agent says drain.
    lock = make_lock(backend)
    c = connect(lock.server_port)
    c.sendall(b"y")
    recv_exactly(c, 1)
    assert agent_reply(lock).startswith("up ready")
    stopper = gevent.spawn(lock.stop, 5)
    wait_until(lambda: lock.draining, what="stop() under way")
    assert agent_reply(lock) == "drain\n"
    c.close()
    stopper.join(5)
    assert stopper.ready()


def test_cli_status_agent_check_and_json_log(cli, make_backend):
    backend = make_backend("echo")
    p = cli.to(backend, "--status", "127.0.0.1:0", "--agent-check", "0", "--log-format", "json")
    p.wait_ready()
    status_port = int(p.wait_for(r"status on http://").rsplit(":", 1)[1].split("/")[0])
    agent_port = int(p.wait_for(r"agent-check on").rsplit(":", 1)[1].rstrip('"}'))
    c = connect(p.port)
    c.sendall(b"json")
    recv_exactly(c, 4)
    c.close()
    line = p.wait_for(r'"end":')
    record = json.loads(line)
    assert record["end"] == "closed" and record["bytes_up"] == 4 and record["bytes_down"] == 4
    assert record["client"].startswith("127.0.0.1:")
    assert {"queued_seconds", "active_seconds", "time", "level"} <= set(record)
    st = json.loads(http(status_port)[2])
    assert st["ended"] == {"closed": 1}
    s = connect(agent_port)
    assert recv_all(s) == b"up ready 100%\n"
    s.close()
    assert http(status_port, "POST", "/pause")[0] == 200
    s = connect(agent_port)
    assert recv_all(s) == b"drain\n"
    s.close()
    p.signal(signal.SIGTERM)
    assert p.wait() == 0
    for line in p.lines:
        json.loads(line)  # every line is JSON
