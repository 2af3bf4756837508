"""Where settings come from, and what an operator is told when one is wrong: the real command
run with bad environment variables and config files (one line naming the variable, or the file
and line, exit 2), the unknown variable warned about at start, durations as operators write
them, and ``-p HOST:PORT``."""

import pytest

from conftest import connect, recv_exactly, run_cli
from tcplock.cli import parse_args
from tcplock.settings import parse_duration

pytestmark = pytest.mark.timeout(60)

BASE = ("-l", "127.0.0.1:0", "-p", "1")


def one_error_line(status, err):
    assert status == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("tcplock: error: "), err
    return lines[0][len("tcplock: error: ") :]


@pytest.mark.parametrize(
    "env, message",
    [
        (
            {"TCPLOCK_TIMEOUT": "banana"},
            "TCPLOCK_TIMEOUT: invalid duration 'banana' (use e.g. 500ms, 20s, 1m30s, 5min, "
            "1h30m, 2d or 'off')",
        ),
        ({"TCPLOCK_SLOTS": "many"}, "TCPLOCK_SLOTS: invalid number 'many'"),
        ({"TCPLOCK_SLOTS": "0"}, "TCPLOCK_SLOTS: must be at least 1, not 0"),
        ({"TCPLOCK_DEMO": "maybe"}, "TCPLOCK_DEMO: must be true or false, not 'maybe'"),
        (
            {"TCPLOCK_LOG_LEVEL": "loud"},
            "TCPLOCK_LOG_LEVEL: invalid choice 'loud' (choose from debug, info, warning, error)",
        ),
        (
            {"TCPLOCK_ALLOW": "[10.0.0.0/8, 10.0.0.1/33]"},
            "TCPLOCK_ALLOW: invalid network '10.0.0.1/33' (use e.g. 10.0.0.0/8, 192.168.1.5 or "
            "::1/128)",
        ),
        (
            {"TCPLOCK_HOOKS": "/nonexistent/hooks.py"},
            "TCPLOCK_HOOKS: no such file: /nonexistent/hooks.py",
        ),
        (
            {"TCPLOCK_RESTART_ON_TIMEOUT": "yes"},
            "TCPLOCK_RESTART_ON_TIMEOUT needs --backend-cmd or --restart-cmd "
            "(or a restart() in --hooks)",
        ),
        (
            {"TCPLOCK_CONFIG": "/nonexistent/tcplock.conf"},
            "TCPLOCK_CONFIG: cannot read config file /nonexistent/tcplock.conf: "
            "No such file or directory",
        ),
    ],
)
def test_a_bad_environment_variable_is_named(env, message):
    assert one_error_line(*run_cli(*BASE, env=env)[::2]) == message


def conf_error(tmp_path, text, *args):
    conf = tmp_path / "tcplock.conf"
    conf.write_bytes(text.encode() if isinstance(text, str) else text)
    status, _, err = run_cli("-c", str(conf), *args)
    return one_error_line(status, err).replace(str(conf), "FILE")


@pytest.mark.parametrize(
    "text, message",
    [
        (
            "# a comment\n\nlisten = 9000\nproxy-port = 1\nslots = 2\n\ntimeout = banana\n",
            "FILE, line 7: timeout: invalid duration 'banana' (use e.g. 500ms, 20s, 1m30s, 5min, "
            "1h30m, 2d or 'off')",
        ),
        ("listen = 9000\nbogus-key = 1\n", "FILE, line 2: unknown setting 'bogus-key'"),
        (
            "listen = 9000\ntimout = 5s\n",
            "FILE, line 2: unknown setting 'timout' (did you mean 'timeout'?)",
        ),
        (
            "listen = 9000\nproxy_port = 1\n",
            "FILE, line 2: unknown setting 'proxy_port' (did you mean 'proxy-port'?)",
        ),
        ("listen 9000\n", "FILE, line 1: 'listen 9000': write 'listen = VALUE'"),
        ("slots: 3\n", "FILE, line 1: 'slots: 3': write 'slots = VALUE'"),
        ("demo\n", "FILE, line 1: 'demo': write 'demo = VALUE'"),
        ("just words here\n", "FILE, line 1: 'just words here': expected 'name = value'"),
        (
            "[tcplock]\nlisten = 9000\n",
            "FILE, line 1: '[tcplock]': sections are not used; write 'name = value' lines only",
        ),
        ("slots = 2\r\nslots = 3\r\n", "FILE, line 2: slots is already set on line 1"),
        (
            "config = /etc/other.conf\n",
            "FILE, line 1: config: a config file cannot name another one",
        ),
        (
            "listen = 9000\nproxy-port = 99999\n",
            "FILE, line 2: proxy-port: port 99999 is out of range (1-65535)",
        ),
        ("allow = []\n", "FILE, line 1: allow: give one or more values, as [a, b], not '[]'"),
        (
            "restart-on-timeout = sometimes\n",
            "FILE, line 1: restart-on-timeout: must be true or false, not 'sometimes'",
        ),
        (
            b"listen = 9000\nslots = \xff\n",
            "FILE, line 2: not valid UTF-8 text (invalid start byte)",
        ),
        (
            "listen = 9000\nproxy-port = 1\nhooks = /nonexistent/hooks.py\n",
            "hooks (FILE, line 3): no such file: /nonexistent/hooks.py",
        ),
        (
            "listen = 9000\nproxy-port = 1\nrestart-every = 5\n",
            "restart-every (FILE, line 3) needs --backend-cmd or --restart-cmd "
            "(or a restart() in --hooks)",
        ),
        (
            'listen = 9000\non-activate = "echo hi\n',
            'FILE, line 2: on-activate: the " at its start is never closed',
        ),
        (
            "listen = 9000\nproxy-host = 127.0.0.1\nbackend = [127.0.0.1:2]\n",
            "backend (FILE, line 3) names the backends: leave out proxy-host (FILE, line 2)",
        ),
    ],
)
def test_a_bad_config_file_names_the_file_and_line(tmp_path, text, message):
    assert conf_error(tmp_path, text) == message


def test_a_bad_config_value_names_the_line_even_when_the_command_line_sets_the_rest(tmp_path):
    # The file is checked whole: a bad line is reported although its setting is overridden.
    assert conf_error(tmp_path, "listen = 9000\nslots = x\n", "-p", "1", "-n", "2") == (
        "FILE, line 2: slots: invalid number 'x'"
    )


def test_an_unknown_tcplock_variable_is_warned_about_once_at_start(cli, make_backend):
    backend = make_backend("echo")
    p = cli.to(backend, env={"TCPLOCK_TIMOUT": "5s", "TCPLOCK_SLOTS": "2"})
    port = p.wait_ready()
    c = connect(port)
    c.sendall(b"x")
    assert recv_exactly(c, 1) == b"x"
    c.close()
    warnings = [line for line in p.lines if "WARNING" in line]
    assert len(warnings) == 1, p.output()
    assert warnings[0].endswith(
        "WARNING TCPLOCK_TIMOUT is not a tcplock setting; ignored (did you mean 'TCPLOCK_TIMEOUT'?)"
    )


def test_a_config_file_may_start_with_a_byte_order_mark(tmp_path):
    conf = tmp_path / "tcplock.conf"
    conf.write_bytes(b"\xef\xbb\xbflisten = 9000\nproxy-port = 8100\n")
    args = parse_args(["-c", str(conf)], env={})
    assert args.listen == ("127.0.0.1", 9000) and args.proxy_port == 8100


def test_config_file_values_comments_quotes_and_lists(tmp_path):
    conf = tmp_path / "tcplock.conf"
    conf.write_text(
        "; an ini-style comment\n"
        "listen = 127.0.0.1:9000   # where clients connect\n"
        "proxy-port = 8100\n"
        "on-activate = 'echo one # two'  # the quotes keep the hash\n"
        'on-timeout = echo "$TCPLOCK_CLIENT" # a comment\n'
        'allow = ["10.0.0.0/8", "::1"]\n'
        "restart-on-timeout = yes\n"
        "restart-cmd = true\n"
        "timeout = 1m30s\n"
    )
    args = parse_args(["-c", str(conf)], env={})
    assert args.listen == ("127.0.0.1", 9000) and args.proxy_port == 8100
    assert args.on_activate == "echo one # two"
    assert args.on_timeout == 'echo "$TCPLOCK_CLIENT"'
    assert [str(n) for n in args.allow] == ["10.0.0.0/8", "::1/128"]
    assert args.restart_on_timeout is True and args.timeout == 90


DURATIONS = [
    ("500ms", 0.5),
    ("1.5s", 1.5),
    ("20s", 20),
    ("1m30s", 90),
    ("1m 30s", 90),
    ("5min", 300),
    ("2m", 120),
    ("1h30m", 5400),
    ("1h", 3600),
    ("2d", 172800),
    ("1d2h3m4s5ms", 93784.005),
    ("2M", 120),
    ("5MS", 0.005),
    ("45", 45),
    (".5", 0.5),
]
BAD_DURATIONS = ["banana", "", "1m30", "30s1m", "1m1m", "5min2m", "-1s", "1e3", "5x", "m", "٣s"]


@pytest.mark.parametrize("text, seconds", DURATIONS)
def test_durations_as_operators_write_them(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", BAD_DURATIONS)
def test_what_is_not_a_duration(text):
    with pytest.raises(Exception, match="invalid duration"):
        parse_duration(text)


def test_a_duration_reaches_the_running_command(tmp_path):
    conf = tmp_path / "tcplock.conf"
    conf.write_text("listen = 9000\nproxy-port = 1\nqueue-timeout = 1h30m\n")
    args = parse_args(["-c", str(conf), "--timeout", "2d"], env={"TCPLOCK_HOOK_TIMEOUT": "5min"})
    assert (args.queue_timeout, args.timeout, args.hook_timeout) == (5400, 172800, 300)


def test_proxy_port_takes_host_and_port(cli, make_backend):
    args = parse_args(["-l", "9000", "-p", "[::1]:8100"], env={})
    assert (args.proxy_host, args.proxy_port) == ("::1", 8100)
    backend = make_backend("echo")
    p = cli("-l", "127.0.0.1:0", "-p", f"127.0.0.1:{backend.server_port}")
    port = p.wait_ready()
    assert f"relaying to 127.0.0.1:{backend.server_port}" in p.output()
    c = connect(port)
    c.sendall(b"hi")
    assert recv_exactly(c, 2) == b"hi"
    c.close()


@pytest.mark.parametrize(
    "args, env, message",
    [
        (
            ["-p", "h:1", "--proxy-host", "g"],
            {},
            "-p/--proxy-port names the host: leave out --proxy-host",
        ),
        (
            ["-p", "h:1"],
            {"TCPLOCK_PROXY_HOST": "g"},
            "-p/--proxy-port names the host: leave out TCPLOCK_PROXY_HOST",
        ),
    ],
)
def test_proxy_port_with_a_host_and_proxy_host_too_is_an_error(args, env, message):
    assert one_error_line(*run_cli("-l", "9000", *args, env=env)[::2]) == message


def test_proxy_port_with_a_bad_host_port_names_the_option():
    message = one_error_line(*run_cli("-l", "9000", "-p", "h:99999")[::2])
    assert message.startswith("argument -p/--proxy-port: ") and "99999" in message


HOST_WITH_PORT = "has a port: use --proxy-port HOST:PORT or --backend HOST:PORT instead"


@pytest.mark.parametrize("host", ["localhost:2003", "127.0.0.1:2003", "[::1]:2003"])
def test_proxy_host_with_a_port_is_a_usage_error_wherever_it_is_written(tmp_path, host):
    # Taken, it would be looked up as a name, and the first client would wait out
    # --connect-timeout for "Name or service not known".
    assert one_error_line(*run_cli(*BASE, "--proxy-host", host)[::2]) == (
        f"argument --proxy-host: {host!r} {HOST_WITH_PORT} (see tcplock --help)"
    )
    assert one_error_line(*run_cli(*BASE, env={"TCPLOCK_PROXY_HOST": host})[::2]) == (
        f"TCPLOCK_PROXY_HOST: {host!r} {HOST_WITH_PORT}"
    )
    assert conf_error(tmp_path, f"listen = 9000\nproxy-host = {host}\n", "-p", "1") == (
        f"FILE, line 2: proxy-host: {host!r} {HOST_WITH_PORT}"
    )


@pytest.mark.parametrize(
    "host, taken", [("::1", "::1"), ("[::1]", "::1"), ("db.local", "db.local")]
)
def test_proxy_host_takes_names_and_addresses_ipv6_too(host, taken):
    assert parse_args(["-l", "9000", "-p", "1", "--proxy-host", host], env={}).proxy_host == taken
