"""The ``tcplock`` command end to end, as a subprocess: options, config file, environment,
precedence, bad input, bind failures, signals, command hooks and the demo."""

import re
import signal
import socket as _stdsocket

import gevent
import pytest
from gevent import socket

from conftest import LOOPBACK, connect, recv_all, recv_exactly, run_cli, wait_until
from tcplock.cli import parse_args, parse_duration

pytestmark = pytest.mark.timeout(60)


def test_version_and_help():
    status, out, err = run_cli("--version")
    assert status == 0 and out.startswith("tcplock ")
    status, out, err = run_cli("--help")
    assert status == 0
    for flag in ("--listen", "--proxy-port", "--slots", "--timeout", "--config", "--check-config"):
        assert flag in out


def test_console_script_is_installed():
    import os
    import subprocess
    import sysconfig

    # Where pip put this interpreter's scripts: .venv/bin in a virtual environment, which need
    # not be on PATH.
    exe = os.path.join(sysconfig.get_path("scripts"), "tcplock")
    assert os.access(exe, os.X_OK), f"the tcplock console script is not installed: {exe}"
    out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and out.stdout.startswith("tcplock ")


@pytest.mark.parametrize(
    "args, names",
    [
        (["-p", "8100"], "--listen"),
        (["-l", "9000"], "--proxy-port"),
        (["-l", "9000", "-p", "0"], "--proxy-port"),
        (["-l", "9000", "-p", "65536"], "--proxy-port"),
        (["-l", "9000", "-p", "http"], "--proxy-port"),
        (["-l", "nope", "-p", "1"], "--listen"),
        (["-l", "::1:9000", "-p", "1"], "--listen"),
        (["-l", "[::1]9000", "-p", "1"], "--listen"),
        (["-l", "9000", "-p", "1", "-n", "0"], "--slots"),
        (["-l", "9000", "-p", "1", "-n", "two"], "--slots"),
        (["-l", "9000", "-p", "1", "-t", "5x"], "--timeout"),
        (["-l", "9000", "-p", "1", "-t", "-1"], "--timeout"),
        (["-l", "9000", "-p", "1", "-t", "0"], "--timeout"),
        (["-l", "9000", "-p", "1", "--queue-timeout", "soon"], "--queue-timeout"),
        (["-l", "9000", "-p", "1", "--max-queue", "-1"], "--max-queue"),
        (["-l", "9000", "-p", "1", "--connect-timeout", "off"], "--connect-timeout"),
        (["-l", "9000", "-p", "1", "--log-level", "loud"], "--log-level"),
        (["-l", "9000", "-p", "1", "--proxy-host", ""], "--proxy-host"),
        (["-l", "9000", "-p", "1", "--bogus"], "--bogus"),
        (["--demo", "-p", "1"], "--proxy-port"),
    ],
)
def test_bad_input_is_one_line_naming_the_option_and_exit_2(args, names):
    status, out, err = run_cli(*args)
    assert status == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("tcplock: error:") and names in lines[0]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--timout", "5s"], "unrecognized option --timout (did you mean '--timeout'?)"),
        (
            ["--queue-timout=5s"],
            "unrecognized option --queue-timout (did you mean '--queue-timeout'?)",
        ),
        (["--time", "5s"], "unrecognized option --time (did you mean '--timeout'?)"),
        (["--proxyport", "2"], "unrecognized option --proxyport (did you mean '--proxy-port'?)"),
        (["--zzzzzz"], "unrecognized option --zzzzzz"),
        (["stray", "words"], "unrecognized arguments: stray words"),
    ],
)
def test_an_unknown_option_is_named_with_the_one_meant(args, message):
    # As an unknown config-file key or TCPLOCK_* variable is: one line, exit 2.
    status, out, err = run_cli("-l", "9000", "-p", "1", *args)
    assert status == 2 and out == ""
    assert err.splitlines() == [f"tcplock: error: {message} (see tcplock --help)"]


def test_missing_config_file_is_a_usage_error(tmp_path):
    status, _, err = run_cli("-c", str(tmp_path / "absent.conf"), "-l", "1", "-p", "1")
    assert status == 2 and "absent.conf" in err and len(err.strip().splitlines()) == 1


def test_bind_failure_is_one_line_and_exit_1(make_backend):
    taken = _stdsocket.socket()
    taken.bind((LOOPBACK, 0))
    taken.listen(1)
    port = taken.getsockname()[1]
    try:
        status, _, err = run_cli("-l", f"{LOOPBACK}:{port}", "-p", "1")
    finally:
        taken.close()
    assert status == 1
    assert err.strip().splitlines() == [
        f"tcplock: cannot listen on {LOOPBACK}:{port}: Address already in use"
    ]


def test_durations_and_addresses_parse():
    assert parse_duration("500ms") == 0.5
    assert parse_duration("20s") == 20 and parse_duration("2m") == 120
    assert parse_duration("1h") == 3600 and parse_duration("1.5") == 1.5
    assert parse_duration("off", allow_off=True) is None
    args = parse_args(["-l", "9000", "-p", "8100"], env={})
    assert args.listen == ("127.0.0.1", 9000) and args.proxy_host == "localhost"
    args = parse_args(["-l", "[::1]:9000", "-p", "8100"], env={})
    assert args.listen == ("::1", 9000)
    args = parse_args(["-l", "0.0.0.0:9000", "-p", "8100", "-t", "20000ms"], env={})
    assert args.listen == ("0.0.0.0", 9000) and args.timeout == 20.0


def test_precedence_command_line_then_environment_then_config_file(tmp_path):
    conf = tmp_path / "tcplock.conf"
    conf.write_text(
        "# comment\nlisten = 9001\nproxy-port = 8101\nslots = 3\ntimeout = 30s\n"
        "queue-timeout = 1m\n"
    )
    env = {"TCPLOCK_SLOTS": "4", "TCPLOCK_TIMEOUT": "40s", "TCPLOCK_CONFIG": str(conf)}
    args = parse_args(["--timeout", "50s"], env=env)
    assert args.listen == ("127.0.0.1", 9001)  # config file
    assert args.proxy_port == 8101  # config file
    assert args.slots == 4  # environment beats config file
    assert args.timeout == 50  # command line beats both
    assert args.queue_timeout == 60
    assert args.connect_timeout == 5  # default


def test_config_file_and_environment_drive_a_real_run(cli, make_backend, tmp_path):
    backend = make_backend("hold")
    conf = tmp_path / "tcplock.conf"
    conf.write_text("listen = 127.0.0.1:0\nproxy-host = 127.0.0.1\nslots = 1\n")
    p = cli(
        "-c", str(conf), env={"TCPLOCK_PROXY_PORT": str(backend.server_port), "TCPLOCK_SLOTS": "2"}
    )
    port = p.wait_ready()
    backend.take_check()
    clients = [connect(port) for _ in range(3)]
    backend.next_conn()
    backend.next_conn()
    gevent.sleep(0.2)
    assert backend.count == 2  # slots = 2 from the environment
    for c in clients:
        c.close()
    backend.release_all()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_closes_queued_clients_and_drains_active_then_exits_0(cli, make_backend, sig):
    backend = make_backend("reply_at_eof")
    p = cli.to(backend, "--drain-timeout", "10s")
    port = p.wait_ready()
    active = connect(port)
    active.sendall(b"work")
    backend.next_conn()
    waiting = connect(port)
    p.wait_for("")  # any output so far
    gevent.sleep(0.1)
    p.signal(sig)
    assert recv_all(waiting) == b""
    p.wait_for(r"end=shutdown")
    assert p.proc.poll() is None  # still draining
    active.shutdown(socket.SHUT_WR)
    assert recv_all(active) == b"got:work"
    assert p.wait() == 0
    assert any("end=closed" in line for line in p.lines)
    assert "Traceback" not in p.output()


def test_sighup_ignored_when_tcplock_started_stays_ignored(make_backend):
    # As under nohup: a hang-up that the parent chose to ignore does not stop tcplock
    # (found by a second reader, with this test).
    from conftest import CLIProcess

    backend = make_backend("echo")
    p = CLIProcess(
        ["-l", "127.0.0.1:0", "--proxy-host", "127.0.0.1", "-p", str(backend.server_port)],
        preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN),
    )
    try:
        port = p.wait_ready()
        p.signal(signal.SIGHUP)
        # Serving one client takes tcplock's loop through several turns, by which time a
        # handled hang-up would have closed the listener; the next client is still served.
        for _ in range(2):
            c = connect(port)
            c.sendall(b"x")
            assert recv_exactly(c, 1) == b"x"
            c.close()
        assert p.proc.poll() is None, p.output()
        assert "stopping" not in p.output() and "reloading" not in p.output(), p.output()
    finally:
        p.kill()


def test_drain_timeout_cuts_and_second_signal_cuts_at_once(cli, make_backend):
    backend = make_backend("never")
    p = cli.to(backend, "--drain-timeout", "1m")
    port = p.wait_ready()
    c = connect(port)
    backend.next_conn()
    p.signal(signal.SIGINT)
    p.wait_for("draining")
    p.signal(signal.SIGINT)
    assert p.wait(timeout=10) == 0
    assert any("end=shutdown" in line for line in p.lines)
    c.close()


def test_cli_command_hooks_run_with_context(cli, make_backend, tmp_path):
    backend = make_backend("never")
    out = tmp_path / "hooks"
    p = cli.to(
        backend,
        "--timeout",
        "300ms",
        "--on-activate",
        f"echo activate $TCPLOCK_CLIENT >> {out}",
        "--on-timeout",
        f"echo timeout $TCPLOCK_CLIENT $TCPLOCK_END >> {out}",
    )
    port = p.wait_ready()
    c = connect(port)
    backend.next_conn()
    p.wait_for("end=ttl")
    wait_until(lambda: len(out.read_text().splitlines()) == 2, what="the on-timeout hook")
    host, cport = c.getsockname()
    assert out.read_text().splitlines() == [
        f"activate {host}:{cport}",
        f"timeout {host}:{cport} ttl",
    ]
    c.close()


def test_hook_output_comes_after_the_lines_logged_before_the_hook(cli, make_backend):
    backend = make_backend("never")
    p = cli.to(
        backend,
        "--timeout",
        "300ms",
        "--on-activate",
        "echo ACTIVATE-$TCPLOCK_CONNECTION_ID >&2",
        "--on-timeout",
        "echo TIMEOUT-$TCPLOCK_CONNECTION_ID >&2",
    )
    port = p.wait_ready()
    a = connect(port)
    b = connect(port)
    p.wait_for("TIMEOUT-2")
    lines = [
        line for line in p.lines if "end=" in line or "ACTIVATE-" in line or "TIMEOUT-" in line
    ]
    kinds = ["ttl" if "end=ttl" in line else line.strip().split()[-1] for line in lines]
    # Each connection's line comes before its on-timeout output, and the first connection's
    # line before the second's on-activate output.
    assert kinds[:6] == ["ACTIVATE-1", "ttl", "TIMEOUT-1", "ACTIVATE-2", "ttl", "TIMEOUT-2"], lines
    a.close()
    b.close()


def test_listen_on_ipv6_loopback(cli, make_backend):
    if not _stdsocket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        probe = _stdsocket.socket(_stdsocket.AF_INET6)
        probe.bind(("::1", 0))
        probe.close()
    except OSError:
        pytest.skip("IPv6 loopback not configured")
    backend = make_backend("echo")
    p = cli("-l", "[::1]:0", "--proxy-host", "127.0.0.1", "-p", str(backend.server_port))
    port = p.wait_ready()
    c = socket.create_connection(("::1", port), timeout=5)
    c.sendall(b"six")
    assert recv_exactly(c, 3) == b"six"
    c.close()


def test_bare_port_listens_on_loopback_only(cli, make_backend):
    backend = make_backend("echo")
    probe = _stdsocket.socket()
    probe.bind((LOOPBACK, 0))
    free = probe.getsockname()[1]
    probe.close()
    p = cli("-l", str(free), "-p", str(backend.server_port))
    p.wait_ready()
    assert f"listening on 127.0.0.1:{free}" in p.output()
    # ss shows the listening address: 127.0.0.1, not 0.0.0.0
    import subprocess

    ss = subprocess.run(["ss", "-ltnH", f"sport = :{free}"], capture_output=True, text=True)
    if ss.returncode == 0:
        local = ss.stdout.split()[3]
        assert local == f"127.0.0.1:{free}", ss.stdout


def test_start_up_line_shows_the_settings_that_matter(cli, make_backend, tmp_path):
    hooks = tmp_path / "hooks.py"
    hooks.write_text("def on_timeout(conn):\n    pass\n")
    a, b = make_backend("echo"), make_backend("echo")
    p = cli(
        "-l", "127.0.0.1:0", "--backend", f"127.0.0.1:{a.server_port}",
        "--backend", f"127.0.0.1:{b.server_port}", "-n", "2", "-t", "90s",
        "--queue-timeout", "2m", "--allow", "127.0.0.0/8", "--allow", "::1",
        "--on-activate", "true", "--restart-cmd", "true", "--restart-every", "50",
        "--restart-on-timeout", "--hooks", str(hooks),
    )  # fmt: skip
    p.wait_ready()
    (line,) = [line for line in p.lines if "listening on" in line]
    assert line.endswith(
        f"listening on 127.0.0.1:{p.port}, relaying to 127.0.0.1:{a.server_port}, "
        f"127.0.0.1:{b.server_port}, 2 slot(s) each; timeout 90s, queue-timeout 120s, "
        "connect-timeout 5s; restart every 50 clients and after a timeout; "
        f"allow 127.0.0.0/8 ::1/128; hooks on-activate (command), on-timeout ({hooks}), "
        "restart (command)"
    ), line
    p = cli("-l", "127.0.0.1:0", "-p", str(a.server_port))
    p.wait_ready()
    assert p.lines[0].endswith(
        f"relaying to localhost:{a.server_port}, 1 slot(s); timeout off, queue-timeout off, "
        "connect-timeout 5s; restart never; allow any; hooks none"
    ), p.lines[0]


def test_demo_backend_shows_one_client_at_a_time(cli):
    p = cli("--demo", "-l", "127.0.0.1:0")
    port = p.wait_ready()
    a = connect(port)
    greeting = a.recv(200)
    assert b"clients connected now: 1" in greeting
    b = connect(port)
    gevent.sleep(0.2)
    b.settimeout(0.2)
    with pytest.raises(OSError):
        b.recv(200)  # queued behind a
    a.sendall(b"hi\n")
    assert a.recv(200) == b"echo: HI\n"
    a.close()
    b.settimeout(5)
    wait_until(lambda: True)
    assert b"clients connected now: 1" in b.recv(200)
    b.close()


def test_systemd_readiness_and_stopping_notifications(cli, make_backend, tmp_path):
    path = str(tmp_path / "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    backend = make_backend("echo")
    p = cli("-l", "127.0.0.1:0", "-p", str(backend.server_port), env={"NOTIFY_SOCKET": path})
    with gevent.Timeout(10):
        ready = sock.recv(1000).decode()
    assert ready.startswith("READY=1") and f":{p.wait_ready()}" in ready
    p.signal(signal.SIGTERM)
    with gevent.Timeout(10):
        assert sock.recv(1000) == b"STOPPING=1"
    assert p.wait() == 0
    sock.close()


def test_text_log_lines_carry_date_time_and_milliseconds():
    import logging
    import re

    from tcplock.logs import TextFormatter

    fmt = TextFormatter()
    lines = []
    for created, msecs in ((1_800_000_000, 123), (1_800_000_000, 987), (1_800_000_001, 500)):
        record = logging.LogRecord("tcplock", logging.INFO, "", 0, "hello %s", ("x",), None)
        record.created, record.msecs = created + msecs / 1000, msecs
        lines.append(fmt.format(record))
    pattern = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO hello x")
    assert all(pattern.fullmatch(line) for line in lines), lines
    assert [line[17:23] for line in lines] == ["00,123", "00,987", "01,500"]


@pytest.mark.parametrize("kind", ["text", "json"])
def test_connection_lines_written_directly_match_the_formatters_lines(kind):
    import io
    import logging

    from tcplock.logs import (
        BatchedStream,
        JSONFormatter,
        LineHandler,
        TextFormatter,
        connection_writer,
    )
    from tcplock.server import Connection, TCPLock

    lock = TCPLock(("127.0.0.1", 0), ("127.0.0.1", 8100))  # never started
    conn = Connection(lock, None, ("127.0.0.1", 4321), 1)
    conn.queued_at, conn.activated_at, conn.ended_at = 100.0, 100.25, 101.5
    conn.bytes_up, conn.bytes_down, conn.end = 60, 145, "closed"
    fmt = JSONFormatter() if kind == "json" else TextFormatter()
    for created in (1_800_000_000.0, 1_800_000_000.987, 1_800_000_001.5):
        record = logging.LogRecord("tcplock.server", logging.INFO, "", 0, "%s", None, None)
        record.args = (conn.describe(),)
        record.created, record.msecs = created, int((created - int(created)) * 1000) + 0.0
        record.connection = conn
        assert fmt.connection_line(conn, created) == fmt.format(record)
    line = fmt.connection_line(conn, 1_800_000_000.0)
    assert "127.0.0.1:4321" in line and "closed" in line and "145" in line, line
    if kind == "json":  # the connection's fields, as /status and the hooks have them
        import json

        record = json.loads(line)
        assert record.pop("level") == "INFO" and record.pop("time").startswith("20")
        assert record == conn.fields()
        assert {
            "client",
            "queued_seconds",
            "active_seconds",
            "bytes_up",
            "bytes_down",
            "end",
        } <= set(record)
    out = io.StringIO()
    handler = LineHandler(out)
    handler.setFormatter(fmt)
    connection_writer(handler)(conn)
    assert out.getvalue().count("\n") == 1 and "127.0.0.1:4321" in out.getvalue()
    # Over the batched stream the line is made when the batch is written, the same line, in
    # its place among the others.
    out = io.StringIO()
    handler = LineHandler(BatchedStream(out, delay=60))
    handler.setFormatter(fmt)
    logger = logging.getLogger("tcplock.test-deferred")
    logger.propagate, logger.handlers[:] = False, [handler]
    logger.warning("before")  # written at once
    connection_writer(handler)(conn)
    handler.stream.write("after\n")
    assert out.getvalue().count("\n") == 1
    handler.flush()
    lines = out.getvalue().splitlines()
    assert len(lines) == 3 and "before" in lines[0] and lines[2] == "after"

    def timeless(line):
        if kind == "json":
            import json

            return {k: v for k, v in json.loads(line).items() if k != "time"}
        return line.split(" ", 2)[2]

    assert timeless(lines[1]) == timeless(fmt.connection_line(conn, 1_800_000_000.0))


def test_log_lines_are_written_in_batches_and_warnings_at_once():
    import logging

    import gevent

    from tcplock.logs import BatchedStream, LineHandler, TextFormatter

    class Counting:
        def __init__(self):
            self.writes = []

        def write(self, text):
            self.writes.append(text)

        def flush(self):
            pass

    out = Counting()
    stream = BatchedStream(out, delay=0.05, limit=10_000)
    handler = LineHandler(stream)
    handler.setFormatter(TextFormatter())
    logger = logging.getLogger("tcplock.test-batched")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        for i in range(100):
            logger.info("line %d", i)
        assert out.writes == []  # gathered, not yet written
        with gevent.Timeout(2):
            while not out.writes:
                gevent.sleep(0.01)
        assert len(out.writes) == 1 and out.writes[0].count("\n") == 100
        out.writes.clear()
        for i in range(40):  # lines spread over 8 delays: a handful of writes, not one each
            logger.info("spread %d", i)
            gevent.sleep(0.01)
        handler.flush()
        assert sum(w.count("\n") for w in out.writes) == 40
        assert len(out.writes) <= 15, len(out.writes)
        out.writes.clear()
        logger.info("before")
        logger.warning("now")  # written at once, after the line before it
        assert len(out.writes) == 1 and out.writes[0].splitlines()[0].endswith("INFO before")
        assert out.writes[0].splitlines()[1].endswith("WARNING now")
        for i in range(400):  # past the limit: written without waiting for the timer
            logger.info("filler %d", i)
        assert len(out.writes) >= 2
        logger.info("last")
        handler.flush()
        assert out.writes[-1].endswith("INFO last\n")
        assert sum(w.count("\n") for w in out.writes) == 2 + 400 + 1
    finally:
        logger.removeHandler(handler)
        stream.close()


def test_cli_log_handler_writes_plain_lines_tracebacks_and_honours_filters():
    import io
    import logging

    from tcplock.logs import LineHandler, TextFormatter

    out = io.StringIO()
    handler = LineHandler(out)
    handler.setFormatter(TextFormatter())
    logger = logging.getLogger("tcplock.test-handler")
    logger.propagate = False
    logger.addHandler(handler)
    try:
        logger.warning("plain %d", 1)
        try:
            raise ZeroDivisionError("boom")
        except ZeroDivisionError:
            logger.exception("failed %s", "here")
        handler.addFilter(lambda record: "secret" not in record.getMessage())
        logger.warning("a secret line")
        logger.warning("after")
    finally:
        logger.removeHandler(handler)
    lines = out.getvalue().splitlines()
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} WARNING plain 1", lines[0])
    assert lines[1].endswith(" ERROR failed here")
    assert lines[2] == "Traceback (most recent call last):"
    assert lines[-2] == "ZeroDivisionError: boom"
    assert lines[-1].endswith(" WARNING after")
    assert not any("secret" in line for line in lines)
