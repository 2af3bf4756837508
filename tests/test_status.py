"""Observing and steering: lock.status(), the HTTP endpoint (health, status, Prometheus
metrics, pause/resume, its token and its bounds), HAProxy's agent-check, and JSON log
lines."""

import json
import os
import re
import shutil
import signal
import time
import urllib.parse

import gevent
import pytest
from gevent.server import StreamServer
from prometheus_client.parser import text_string_to_metric_families

from conftest import (
    LOOPBACK,
    ChildProcess,
    connect,
    free_port,
    http,
    limited_cli,
    recv_all,
    recv_exactly,
    require_command,
    run_cli,
    wait_until,
)
from tcplock import __version__
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
    # The process's own metrics, and which tcplock it is.
    assert samples[("tcplock_build_info", (("version", __version__),))] == 1
    assert samples[("process_open_fds", ())] > 0
    assert samples[("process_max_fds", ())] > 0
    assert 0 < samples[("process_start_time_seconds", ())] <= time.time()
    assert samples[("process_resident_memory_bytes", ())] > 0


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


# -- /healthz ----------------------------------------------------------------------------------


def ask(port, method="GET", path="/status", headers=(), timeout=5.0):
    """One HTTP/1.1 request with ``headers`` (name, value pairs), as curl would send it, on a
    fresh connection: (status, headers, body)."""
    s = connect(port, timeout=timeout)
    try:
        lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", "Connection: close"]
        lines += [f"{name}: {value}" for name, value in headers]
        s.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        raw = recv_all(s, timeout=timeout)
    finally:
        s.close()
    head, _, payload = raw.partition(b"\r\n\r\n")
    head_lines = head.decode("latin-1").split("\r\n")
    found = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in head_lines[1:])}
    return int(head_lines[0].split()[1]), found, payload


def bearer(token):
    return [("Authorization", f"Bearer {token}")]


def health_of(port):
    code, headers, body = ask(port, path="/healthz")
    assert headers["content-type"] == "application/json"
    return code, json.loads(body)


def test_healthz_follows_the_backend_going_down_and_up_pause_drain_and_stop(make_lock):
    # A backend of our own on a fixed port, so that it can go away and come back there.
    def serve(port):
        server = StreamServer((LOOPBACK, port), lambda s, _a: recv_all(s) and None)
        server.start()
        return server

    backend = serve(0)
    port = backend.server_port
    lock = make_lock(port, connect_timeout=0.3, check_interval=0.05)
    agent = AgentCheck((LOOPBACK, 0), lock)
    agent.start()
    status = StatusServer((LOOPBACK, 0), lock, token="t0ken")  # /healthz needs none
    status.start()
    try:
        assert health_of(status.server_port) == (200, {"status": "ok", "backends_up": 1})
        # The backend's port closes; the next client finds it refusing: tcplock marks it down.
        backend.stop(timeout=0)
        c = connect(lock.server_port)
        assert recv_all(c) == b""  # ends backend-refused
        c.close()
        assert health_of(status.server_port) == (503, {"status": "down", "backends_up": 0})
        s = connect(agent.server_port)
        assert recv_all(s) == b"down#no backend is up\n"
        s.close()
        # It listens again: the check finds it, and tcplock is healthy again.
        backend = serve(port)
        wait_until(lambda: health_of(status.server_port)[0] == 200, what="healthy again")
        assert health_of(status.server_port) == (200, {"status": "ok", "backends_up": 1})
        # HEAD answers the same, without a body.
        code, headers, body = ask(status.server_port, "HEAD", "/healthz")
        assert code == 200 and body == b"" and int(headers["content-length"]) > 0
        lock.pause()
        assert health_of(status.server_port) == (503, {"status": "paused", "backends_up": 1})
        lock.resume()
        lock.drain_backend(f"127.0.0.1:{port}")
        assert health_of(status.server_port) == (503, {"status": "drained", "backends_up": 1})
        lock.enable_backend(f"127.0.0.1:{port}")
        assert health_of(status.server_port)[0] == 200
        assert ask(status.server_port, "POST", "/healthz")[0] == 405
        # Stopping: unhealthy while active connections drain.
        c = connect(lock.server_port)
        wait_until(lambda: len(lock.active) == 1)
        stopper = gevent.spawn(lock.stop, 5)
        wait_until(lambda: lock.draining)
        assert health_of(status.server_port) == (503, {"status": "stopping", "backends_up": 1})
        c.close()
        stopper.join(5)
    finally:
        status.stop(timeout=0)
        agent.stop(timeout=0)
        backend.stop(timeout=0)


def test_healthz_is_down_until_a_backend_not_run_by_tcplock_first_answers(make_lock):
    # Nothing listens on the backend's port at start: it is checked at once, found down,
    # and /healthz says so before any client has tried it; it is checked again every
    # check_interval, and found when it listens.
    port = free_port()
    lock = make_lock(port, check_interval=0.05)
    status = StatusServer((LOOPBACK, 0), lock)
    status.start()
    backend = None
    try:
        assert health_of(status.server_port) == (503, {"status": "down", "backends_up": 0})
        assert agent_reply(lock) == "down#no backend is up\n"
        wait_until(lambda: lock.status()["backends"][0]["state"] == "down")
        assert health_of(status.server_port) == (503, {"status": "down", "backends_up": 0})
        backend = StreamServer((LOOPBACK, port), lambda s, _a: recv_all(s) and None)
        backend.start()
        wait_until(lambda: health_of(status.server_port)[0] == 200, what="healthy")
        assert health_of(status.server_port) == (200, {"status": "ok", "backends_up": 1})
        assert agent_reply(lock) == "up ready 100%\n"
    finally:
        status.stop(timeout=0)
        if backend is not None:
            backend.stop(timeout=0)


def test_healthz_is_not_ok_when_the_only_backend_up_is_leaving_the_pool(make_backend, make_lock):
    # A reload names a new backend that does not answer; the old one finishes its client and
    # takes no new one: nobody arriving now would be let through, as the agent-check says.
    lock = make_lock(make_backend("echo"))
    status = StatusServer((LOOPBACK, 0), lock)
    status.start()
    client = connect(lock.server_port)
    try:
        wait_until(lambda: lock.status()["active"], what="a client relayed")
        assert health_of(status.server_port)[0] == 200
        lock.set_backends([(LOOPBACK, free_port())])
        wait_until(lambda: agent_reply(lock) == "drain\n", what="the agent's drain")
        assert health_of(status.server_port) == (503, {"status": "drained", "backends_up": 1})
    finally:
        client.close()
        status.stop(timeout=0)


# -- the token ---------------------------------------------------------------------------------


def test_with_a_token_every_endpoint_but_healthz_needs_it(make_backend, make_lock):
    lock = make_lock(make_backend("echo"))
    server = StatusServer((LOOPBACK, 0), lock, token="s3cr3t-T0ken")
    server.start()
    port = server.server_port
    try:
        endpoints = [
            ("GET", "/status"),
            ("GET", "/metrics"),
            ("POST", "/pause"),
            ("POST", "/resume"),
            ("POST", "/backends/127.0.0.1:1/drain"),
            ("GET", "/no-such-path"),  # 401, not 404: nothing is told without the token
        ]
        wrong = [
            [],
            bearer("s3cr3t-T0ke"),
            bearer("s3cr3t-T0ken-"),
            bearer(""),
            [("Authorization", "Basic czNjcjN0LVQwa2Vu")],
            [("Authorization", "s3cr3t-T0ken")],
        ]
        for method, path in endpoints:
            for headers in wrong:
                code, found, body = ask(port, method, path, headers)
                assert code == 401, (method, path, headers)
                assert found["www-authenticate"].startswith('Bearer realm="tcplock"')
                assert "Bearer" in json.loads(body)["error"]
        assert lock.paused is False  # the POST /pause without the token did nothing
        assert health_of(port)[0] == 200
        code, _, body = ask(port, headers=bearer("s3cr3t-T0ken"))
        assert code == 200 and json.loads(body)["slots"] == 1
        assert ask(port, "GET", "/metrics", [("Authorization", "bearer s3cr3t-T0ken")])[0] == 200
        assert ask(port, "POST", "/pause", bearer("s3cr3t-T0ken"))[0] == 200
        assert lock.paused is True
        assert ask(port, "GET", "/no-such-path", bearer("s3cr3t-T0ken"))[0] == 404
        # A new token (what a reload sets) holds from the next request on; None opens it.
        server.token = "n3w"
        assert ask(port, headers=bearer("s3cr3t-T0ken"))[0] == 401
        assert ask(port, headers=bearer("n3w"))[0] == 200
        server.token = None
        assert ask(port)[0] == 200
        for bad in ("", "two words", "\u00e9t\u00e9", 5):
            with pytest.raises(ValueError, match="token"):
                server.token = bad
    finally:
        server.stop(timeout=0)


def _token_file(tmp_path, content="cli-t0ken\n", mode=0o600):
    path = tmp_path / "status-token"
    path.write_text(content)
    path.chmod(mode)
    return path


@pytest.mark.parametrize(
    "content, mode, message",
    [
        ("t0ken\n", 0o644, r"open to group or others \(mode 0644\).*chmod 600"),
        ("t0ken\n", 0o640, r"open to group or others \(mode 0640\)"),
        ("t0ken\n", 0o602, r"open to group or others \(mode 0602\)"),
        ("\n  \n", 0o600, r"is empty"),
        ("one two\n", 0o600, r"printable ASCII"),
        (None, None, r"no such file"),
    ],
)
def test_a_token_file_that_is_open_to_others_empty_or_missing_is_refused(
    tmp_path, content, mode, message
):
    path = tmp_path / "status-token" if content is None else _token_file(tmp_path, content, mode)
    code, out, err = run_cli(
        "-l", "0", "-p", "1", "--status", "0", "--status-token-file", str(path)
    )
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("tcplock: error: --status-token-file: ") and re.search(message, err)


def test_a_token_file_needs_the_status_endpoint(tmp_path):
    code, _, err = run_cli("-l", "0", "-p", "1", "--status-token-file", str(_token_file(tmp_path)))
    assert code == 2 and err.count("\n") == 1 and "give --status too" in err


def test_cli_status_token_with_and_without_it(cli, make_backend, tmp_path):
    path = _token_file(tmp_path)
    # From a config file too, under its config key.
    conf = tmp_path / "tcplock.conf"
    conf.write_text(f"status = 127.0.0.1:0\nstatus-token-file = {path}\n")
    p = cli.to(make_backend("echo"), "-c", str(conf))
    p.wait_ready()
    line = p.wait_for(r"status on http://")
    assert "token required" in line
    port = int(re.search(r"http://127\.0\.0\.1:(\d+)/", line).group(1))
    assert ask(port)[0] == 401
    assert ask(port, headers=bearer("wrong"))[0] == 401
    code, _, body = ask(port, headers=bearer("cli-t0ken"))
    assert code == 200 and json.loads(body)["queued"] == 0
    assert health_of(port) == (200, {"status": "ok", "backends_up": 1})
    p.signal(signal.SIGTERM)
    assert p.wait() == 0
    assert "cli-t0ken" not in p.output()  # the token is never logged


def test_sighup_reads_the_token_file_again(cli, make_backend, tmp_path):
    """A real SIGHUP: a new token in the file replaces the old at once; a token file made
    readable by others is refused and the running token stays; a config file without the
    setting leaves the status port open."""
    path = _token_file(tmp_path, "first-t0ken\n")
    conf = tmp_path / "tcplock.conf"
    setting = f"status = 127.0.0.1:0\nstatus-token-file = {path}\n"
    conf.write_text(setting)
    p = cli.to(make_backend("echo"), "-c", str(conf))
    p.wait_ready()
    port = int(re.search(r"http://127\.0\.0\.1:(\d+)/", p.wait_for(r"status on http://")).group(1))
    outcome = re.compile(r"reloaded: |reload failed")

    def reload():
        before = sum(1 for line in p.lines if outcome.search(line))
        p.signal(signal.SIGHUP)
        wait_until(lambda: sum(1 for line in p.lines if outcome.search(line)) > before)
        return [line for line in p.lines if outcome.search(line)][before]

    assert ask(port, headers=bearer("first-t0ken"))[0] == 200
    _token_file(tmp_path, "second-t0ken\n")
    assert "reloaded" in reload()
    assert ask(port, headers=bearer("first-t0ken"))[0] == 401
    assert ask(port, headers=bearer("second-t0ken"))[0] == 200
    _token_file(tmp_path, "third-t0ken\n", 0o644)
    line = reload()
    assert "reload failed" in line and "open to group or others" in line, line
    assert ask(port, headers=bearer("third-t0ken"))[0] == 401
    assert ask(port, headers=bearer("second-t0ken"))[0] == 200
    conf.write_text("status = 127.0.0.1:0\n")
    assert "reloaded" in reload()
    assert ask(port)[0] == 200
    assert health_of(port)[0] == 200
    p.signal(signal.SIGTERM)
    assert p.wait() == 0
    assert not re.search(r"(first|second|third)-t0ken", p.output())


# -- the status port's bounds --------------------------------------------------------------------


def test_idle_and_slow_status_connections_are_closed_at_the_request_timeout(
    make_backend, make_lock
):
    lock = make_lock(make_backend("echo"))
    server = StatusServer((LOOPBACK, 0), lock, request_timeout=0.5, max_connections=8)
    server.start()
    try:
        start = time.monotonic()
        idle = [connect(server.server_port) for _ in range(5)]
        half = connect(server.server_port)
        half.sendall(b"GET /status HTTP/1.1\r\nHost: x\r\n")  # headers never finish
        slow = connect(server.server_port)

        def trickle():  # a header byte every 0.1 s: each read succeeds, the head never ends
            slow.sendall(b"GET /status HTTP/1.1\r\n")
            for ch in b"X-Long: " + b"a" * 100:
                try:
                    slow.sendall(bytes([ch]))
                except OSError:
                    return
                gevent.sleep(0.1)

        trickler = gevent.spawn(trickle)
        for s in idle:
            assert recv_all(s, timeout=5) == b""
        assert 0.4 < time.monotonic() - start < 3
        reply = recv_all(half, timeout=5)
        assert reply.startswith(b"HTTP/1.1 408 ")
        assert recv_all(slow, timeout=5).startswith(b"HTTP/1.1 408 ")
        assert time.monotonic() - start < 3  # the trickle did not extend its time
        trickler.kill()
        # A keep-alive connection idle after its answer is closed at the timeout too.
        kept = connect(server.server_port)
        kept.sendall(b"GET /status HTTP/1.1\r\nHost: x\r\n\r\n")
        first = time.monotonic()
        reply = recv_all(kept, timeout=5)
        assert reply.startswith(b"HTTP/1.1 200 ") and b'"slots"' in reply
        assert 0.4 < time.monotonic() - first < 3
        for s in [*idle, half, slow, kept]:
            s.close()
    finally:
        server.stop(timeout=0)


def test_status_connections_are_bounded_in_number_and_head_size(make_backend, make_lock):
    lock = make_lock(make_backend("echo"))
    server = StatusServer((LOOPBACK, 0), lock, request_timeout=30, max_connections=3)
    server.start()
    try:
        held = [connect(server.server_port) for _ in range(3)]
        for s in held:
            s.sendall(b"GET /status HTTP/1.1\r\n")
        # The fourth waits in the listen backlog: no answer while the three are held...
        waiting = connect(server.server_port)
        waiting.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        waiting.settimeout(0.3)
        with pytest.raises(OSError):  # timed out: nothing came back
            waiting.recv(1)
        # ... and is answered as soon as one of them goes.
        held[0].close()
        waiting.settimeout(5)
        assert recv_all(waiting).startswith(b"HTTP/1.1 200 ")
        waiting.close()
        # A request head over 8 KiB is refused with 431, and the connection closed.
        s = connect(server.server_port)
        s.sendall(b"GET /status HTTP/1.1\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n")
        assert recv_all(s).startswith(b"HTTP/1.1 431 ")
        s.close()
        # Many headers of reasonable size add up the same way.
        s = connect(server.server_port)
        s.sendall(b"GET /status HTTP/1.1\r\n" + (b"X-H: " + b"b" * 90 + b"\r\n") * 100 + b"\r\n")
        assert recv_all(s).startswith(b"HTTP/1.1 431 ")
        s.close()
        # Just under the limit is fine.
        code = ask(server.server_port, headers=[("X-Pad", "c" * 7000)])[0]
        assert code == 200
        for s in held[1:]:
            s.close()
    finally:
        server.stop(timeout=0)


def _answer(sock, timeout):
    """What comes back until the server closes (a reset after the answer counts as closed:
    bytes sent to a closed socket are answered by one), and how long that took."""
    start, chunks = time.monotonic(), []
    try:
        with gevent.Timeout(timeout):
            while True:
                data = sock.recv(65536)
                if not data:
                    break
                chunks.append(data)
    except ConnectionResetError:
        pass
    return b"".join(chunks), time.monotonic() - start


def test_a_request_body_is_bounded_and_a_refused_one_is_never_read(make_backend, make_lock):
    lock = make_lock(make_backend("echo"))
    server = StatusServer(
        (LOOPBACK, 0), lock, token="t0ken", request_timeout=1.0, max_connections=4
    )
    server.start()
    trickling = []
    try:
        # Six connections, more than the server holds, each announcing a body of 1 GB and
        # sending a byte of it every 0.2 s, without the token: each is refused with 413 at
        # once, unread, and closed; none is held.
        def trickle(s):
            try:
                s.sendall(b"POST /pause HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000000\r\n\r\n")
                while True:
                    gevent.sleep(0.2)
                    s.sendall(b"x")
            except OSError:
                return

        conns = [connect(server.server_port) for _ in range(6)]
        trickling = [gevent.spawn(trickle, s) for s in conns]
        for s in conns:
            reply, took = _answer(s, timeout=3)
            assert reply.startswith(b"HTTP/1.1 413 "), reply
            assert b"Connection: close" in reply and took < 0.9
        assert health_of(server.server_port)[0] == 200
        assert not lock.paused
        # A small body on a request refused for want of the token: 401 at once, and the
        # connection is closed without waiting for the body.
        s = connect(server.server_port)
        s.sendall(b"POST /pause HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n")
        reply, took = _answer(s, timeout=3)
        assert reply.startswith(b"HTTP/1.1 401 ") and took < 0.9
        s.close()
        # A body of unknown length is refused too.
        s = connect(server.server_port)
        s.sendall(b"POST /pause HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        reply, took = _answer(s, timeout=3)
        assert reply.startswith(b"HTTP/1.1 411 ") and took < 0.9
        s.close()
        # An accepted request whose small body trickles: answered, and its body must still
        # arrive within the request deadline, or the connection is closed then.
        s = connect(server.server_port)
        start = time.monotonic()
        s.sendall(
            b"POST /pause HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer t0ken\r\n"
            b"Content-Length: 100\r\n\r\n"
        )
        slow = gevent.spawn(lambda: [gevent.sleep(0.2) or s.sendall(b"y") for _ in range(100)])
        reply, _ = _answer(s, timeout=3)
        assert reply.startswith(b"HTTP/1.1 200 ") and lock.paused
        assert time.monotonic() - start < 2.5
        slow.kill()
        s.close()
        # A whole small body is read after the answer: the connection carries the next one.
        s = connect(server.server_port)
        auth = b"Authorization: Bearer t0ken\r\n"
        s.sendall(b"POST /resume HTTP/1.1\r\nHost: x\r\n" + auth + b"Content-Length: 2\r\n\r\n{}")
        s.sendall(b"GET /status HTTP/1.1\r\nHost: x\r\n" + auth + b"Connection: close\r\n\r\n")
        reply, _ = _answer(s, timeout=3)
        assert reply.startswith(b"HTTP/1.1 200 ") and reply.count(b"HTTP/1.1 200 ") == 2
        assert not lock.paused
        s.close()
    finally:
        for g in trickling:
            g.kill()
        server.stop(timeout=0)


def test_requests_beyond_the_rate_get_429_then_wait_for_the_next_second(make_backend, make_lock):
    lock = make_lock(make_backend("echo"))
    server = StatusServer((LOOPBACK, 0), lock, max_rate=5)
    server.start()
    try:
        start = time.monotonic()
        codes = [ask(server.server_port, path="/healthz") for _ in range(10)]
        assert [c for c, _, _ in codes] == [200] * 5 + [429] * 5
        assert codes[-1][1]["retry-after"] == "1"
        assert json.loads(codes[-1][2]) == {"error": "over 5 requests a second"}
        # As many refused as answered: the next connection waits in the listen backlog
        # until the second is over, and is answered then.
        s = connect(server.server_port)
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        reply = recv_all(s, timeout=3)
        assert reply.startswith(b"HTTP/1.1 200 "), reply
        assert time.monotonic() - start >= 0.95
        s.close()
    finally:
        server.stop(timeout=0)


def test_the_rate_is_a_setting_that_a_reload_changes(cli, make_backend, tmp_path):
    # --status-max-rate from the config file (TCPLOCK_STATUS_MAX_RATE and the flag are the
    # same setting): 3 answered, then 429; a real SIGHUP with the file edited to 50 raises it.
    conf = tmp_path / "tcplock.conf"
    conf.write_text("status = 127.0.0.1:0\nstatus-max-rate = 3\n")
    p = cli.to(make_backend("echo"), "-c", str(conf))
    p.wait_ready()
    port = _status_port(p)

    def codes(n):
        return [ask(port, path="/healthz")[0] for _ in range(n)]

    def next_second_codes(n):
        # The budget is per second: wait for the next one (the last 429s stop accepting).
        gevent.sleep(1.05)
        return codes(n)

    assert codes(5) == [200] * 3 + [429] * 2
    conf.write_text("status = 127.0.0.1:0\nstatus-max-rate = 50\n")
    p.signal(signal.SIGHUP)
    assert "status-max-rate 3 -> 50" in p.wait_for(r"reloaded: ")
    assert next_second_codes(10) == [200] * 10
    p.signal(signal.SIGTERM)
    assert p.wait() == 0


@pytest.mark.parametrize(
    "args, env, message",
    [
        (["--status", "0", "--status-max-rate", "0"], {}, "--status-max-rate: .*at least 1"),
        ([], {"TCPLOCK_STATUS_MAX_RATE": "50"}, "TCPLOCK_STATUS_MAX_RATE bounds the --status "),
        (["--status-max-rate", "50"], {}, "--status-max-rate bounds the --status endpoint"),
    ],
)
def test_a_bad_status_rate_is_a_usage_error(args, env, message):
    code, out, err = run_cli("-l", "0", "-p", "1", *args, env=env)
    assert code == 2 and re.search(message, err) and len(err.strip().splitlines()) == 1, err


def test_answers_on_a_keep_alive_connection_are_not_held_back(make_backend, make_lock):
    # A client asking again and again on one connection (a scraper, a dashboard) gets each
    # answer at once. An answer's head and body held back until the client acknowledges the
    # head took about 40 ms each (the kernel's delayed ACK): 30 of them over 1.1 s, where
    # they take a few milliseconds. The bound is far from both.
    lock = make_lock(make_backend("echo"))
    server = StatusServer((LOOPBACK, 0), lock)
    server.start()
    s = connect(server.server_port)
    try:
        reader = s.makefile("rb")
        start = time.monotonic()
        for _ in range(30):
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            with gevent.Timeout(5):
                assert reader.readline().startswith(b"HTTP/1.1 200 ")
                length = None
                while True:
                    line = reader.readline()
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                    if line in (b"\r\n", b""):
                        break
                assert json.loads(reader.read(length))["status"] == "ok"
        assert time.monotonic() - start < 0.5
        reader.close()
    finally:
        s.close()
        server.stop(timeout=0)


def _status_port(p):
    return int(re.search(r"status on http://\S+:(\d+)/", p.wait_for("status on")).group(1))


def test_half_sent_status_requests_under_a_low_descriptor_limit_do_not_stall_the_lock(
    make_backend,
):
    # 125 half-sent requests on the status port, with 120 descriptors: the status server
    # holds only its share of the budget, the rest wait in its listen backlog (128 long), and
    # the lock's clients are served at once all along.
    backend = make_backend("echo")
    p = limited_cli(
        ["-l", "127.0.0.1:0", "--proxy-host", "127.0.0.1", "-p", str(backend.server_port),
         "--status", "127.0.0.1:0"],
        nofile=120,
    )  # fmt: skip
    flood = []
    try:
        port = p.wait_ready()
        status_port = _status_port(p)
        for _ in range(125):
            s = connect(status_port)
            s.sendall(b"GET /status HTTP/1.1\r\nHost: x\r\n")
            flood.append(s)
        start = time.monotonic()
        for i in range(40):
            c = connect(port)
            c.sendall(b"client %d" % i)
            assert recv_exactly(c, len(b"client %d" % i), timeout=3) == b"client %d" % i
            c.close()
        assert time.monotonic() - start < 5
        # And several at once, as many as the queue has room for.
        clients = [connect(port) for _ in range(20)]
        for i, c in enumerate(clients):
            c.sendall(b"%02d" % i)
        for i, c in enumerate(clients):
            assert recv_exactly(c, 2, timeout=5) == b"%02d" % i
            c.close()
        assert p.proc.poll() is None
        assert not any("cannot accept" in line for line in p.lines), p.output()
        assert "Traceback" not in p.output()
    finally:
        for s in flood:
            s.close()
        p.kill()


def test_the_status_server_has_its_share_of_the_descriptor_budget(make_backend):
    backend = make_backend("hold")
    p = limited_cli(
        ["-l", "127.0.0.1:0", "--proxy-host", "127.0.0.1", "-p", str(backend.server_port),
         "--status", "127.0.0.1:0"],
        nofile=128,
    )  # fmt: skip
    try:
        p.wait_ready()
        # 128 - 64 reserved - 6 for the active connection - 16 lingering - 8 for status
        assert "max-queue 34" in p.wait_for("max-queue")
    finally:
        p.kill()


def test_malformed_requests_and_accept_failures_are_one_line_each_never_a_traceback(
    make_backend,
):
    backend = make_backend("echo")
    p = limited_cli(
        ["-l", "127.0.0.1:0", "--proxy-host", "127.0.0.1", "-p", str(backend.server_port),
         "--status", "127.0.0.1:0", "--agent-check", "127.0.0.1:0", "--max-queue", "1000"],
        nofile=64,
    )  # fmt: skip
    flood = []
    try:
        port = p.wait_ready()
        status_port = _status_port(p)
        agent_port = int(p.wait_for(r"agent-check on").rsplit(":", 1)[1])
        bad = [
            b"garbage\r\n\r\n",
            b"GET / HTTP/9.9\r\n\r\n",
            b"GET /status HTTP/1.1\r\n" + b"X: y\r\n" * 101 + b"\r\n",  # over 100 headers
            b"GET /status HTTP/1.1\r\nContent-Length: -5\r\n\r\n",
            b"GET /status HTTP/1.1\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n",
            b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n\r\n",
        ]
        for request in bad * 5:
            s = connect(status_port)
            s.sendall(request)
            assert re.match(rb"HTTP/1.1 4\d\d ", recv_all(s)), request[:40]
            s.close()
        p.wait_for(r"status: .* from 127\.0\.0\.1:")
        # Descriptors run out: the lock's clients take them all.
        for _ in range(100):
            flood.append(connect(port))
        p.wait_for("cannot accept new clients")
        for _ in range(10):
            flood.append(connect(status_port))
            flood.append(connect(agent_port))
        p.wait_for("status: cannot accept connections: Too many open files")
        p.wait_for("agent-check: cannot accept connections: Too many open files")
        for s in flood:
            s.close()
        flood.clear()
        # Descriptors back: the status port answers again.
        with gevent.Timeout(20):
            while True:
                try:
                    if health_of(status_port)[0] == 200:
                        break
                except (OSError, IndexError, ValueError):
                    gevent.sleep(0.1)
        p.signal(signal.SIGTERM)
        assert p.wait() == 0
        out = p.output()
        assert "Traceback" not in out, out
        assert sum("status: " in line and " from 127.0.0.1:" in line for line in p.lines) == 1
        assert sum("status: cannot accept" in line for line in p.lines) == 1
        assert sum("agent-check: cannot accept" in line for line in p.lines) == 1
    finally:
        for s in flood:
            s.close()
        p.kill()


# -- Prometheus, with the token ------------------------------------------------------------------

CONTRIB = os.path.join(os.path.dirname(__file__), "..", "contrib", "prometheus")


def _contrib_config(tmp_path, credentials, target=None, interval=None):
    """contrib/prometheus/prometheus.yml with its credentials file (and target, interval)
    pointed at this test's."""
    with open(os.path.join(CONTRIB, "prometheus.yml")) as f:
        text = f.read()
    assert "credentials_file: /etc/prometheus/tcplock-status-token" in text
    text = text.replace("/etc/prometheus/tcplock-status-token", str(credentials))
    if target:
        assert '"127.0.0.1:9100"' in text
        text = text.replace('"127.0.0.1:9100"', f'"{target}"')
    if interval:
        assert "scrape_interval: 15s" in text
        text = text.replace("scrape_interval: 15s", f"scrape_interval: {interval}")
    path = tmp_path / "prometheus.yml"
    path.write_text(text)
    return path


def test_contrib_prometheus_config_passes_promtool(tmp_path):
    promtool = require_command("promtool", "prometheus")
    credentials = _token_file(tmp_path)
    config = _contrib_config(tmp_path, credentials)
    done = gevent.subprocess.run(
        [promtool, "check", "config", str(config)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr


def _prometheus_query(port, query):
    path = "/api/v1/query?query=" + urllib.parse.quote(query)
    code, _, body = ask(port, path=path)
    assert code == 200, body
    return json.loads(body)["data"]["result"]


def test_prometheus_scrapes_with_the_token_from_its_credentials_file(cli, make_backend, tmp_path):
    require_command("promtool", "prometheus")
    prometheus = shutil.which("prometheus")
    if prometheus is None:
        pytest.skip("the prometheus package installs no prometheus server here")
    token = _token_file(tmp_path)
    p = cli.to(make_backend("echo"), "--status", "127.0.0.1:0", "--status-token-file", str(token))
    p.wait_ready()
    status_port = _status_port(p)
    # Prometheus starts with a wrong token: its scrapes get 401, and it says the target is down.
    credentials = tmp_path / "prometheus-token"
    credentials.write_text("not-the-token\n")
    credentials.chmod(0o600)
    config = _contrib_config(
        tmp_path, credentials, target=f"127.0.0.1:{status_port}", interval="200ms"
    )
    web = free_port()
    server = ChildProcess(
        [prometheus, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
         f"--web.listen-address=127.0.0.1:{web}"],
    )  # fmt: skip
    try:
        server.wait_for("Server is ready to receive web requests", timeout=60)

        def up():
            result = _prometheus_query(web, 'up{job="tcplock"}')
            return result[0]["value"][1] if result else None

        with gevent.Timeout(30):
            while up() != "0":
                gevent.sleep(0.2)
        # The right token in the file: the next scrapes get in.
        credentials.write_text(token.read_text())
        with gevent.Timeout(30):
            while up() != "1":
                gevent.sleep(0.2)
        (build,) = _prometheus_query(web, "tcplock_build_info")
        assert build["metric"]["version"] == __version__
        assert _prometheus_query(web, 'tcplock_slots{job="tcplock"}')[0]["value"][1] == "1"
    finally:
        server.proc.terminate()
        server.wait(timeout=30)
        server.kill()
