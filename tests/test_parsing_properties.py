"""Property-based tests of the command line, the config file and the environment.

The rule (cli.py's docstring): any input either starts tcplock or exits 2 with one line on
standard error, never a traceback. In process, :func:`tcplock.cli.parse_args` must return a
Namespace whose values keep their invariants, or exit 2 with one ``tcplock: error:`` line (0
only for --help/--version, which write to standard output); a few real ``python -m tcplock``
runs check the same end to end, including the --hooks loading that only ``main`` does.
"""

from __future__ import annotations

import atexit
import contextlib
import io
import ipaddress
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from conftest import limited_cli
from tcplock.cli import ENV_PREFIX, build_parser, parse_address, parse_args
from tcplock.settings import LIBRARY, validate

pytestmark = pytest.mark.timeout(120)

# --- the real options, taken from the parser --------------------------------------------------

_ACTIONS = [a for a in build_parser()._actions if a.option_strings]
_EXITING = {"-h", "--help", "--version"}  # print to stdout and exit 0
_NOT_SETTINGS = _EXITING | {"--check-config"}  # what the command does, not a setting's value
ALL_OPTIONS = sorted(s for a in _ACTIONS for s in a.option_strings)
# option string -> does it take a value?
TAKES_VALUE = {s: a.nargs != 0 for a in _ACTIONS for s in a.option_strings}
# option string -> every spelling of the same option
SPELLINGS = {s: tuple(a.option_strings) for a in _ACTIONS for s in a.option_strings}
LONG_NAMES = sorted(
    next(s for s in a.option_strings if s.startswith("--"))[2:] for a in _ACTIONS
)  # the config-file keys
SETTINGS = [n for n in LONG_NAMES if "--" + n not in _NOT_SETTINGS]
ENV_NAMES = {n: ENV_PREFIX + n.upper().replace("-", "_") for n in SETTINGS}


def _accepts(parse, text):
    try:
        return True, parse(text)
    except Exception:
        return False, None


def _duration_rule(parse):
    """Whether a duration option allows 'off' (None) and zero, asked of its own parser."""
    return dict(off=_accepts(parse, "off") == (True, None), zero=_accepts(parse, "0") == (True, 0))


def _minimum(parse):
    return next(n for n in (-1, 0, 1, 2) if _accepts(parse, str(n))[0])


_TYPE_NAME = {a.dest: getattr(a.type, "__name__", None) for a in _ACTIONS}
DURATIONS = {a.dest: _duration_rule(a.type) for a in _ACTIONS if _TYPE_NAME[a.dest] == "duration"}
COUNTS = {a.dest: _minimum(a.type) for a in _ACTIONS if _TYPE_NAME[a.dest] == "number"}
ADDRESSES = {a.dest for a in _ACTIONS if _TYPE_NAME[a.dest] == "parse_address"}
CHOICES = {a.dest: set(a.choices) for a in _ACTIONS if a.choices}
FLAGS = {a.dest for a in _ACTIONS if a.nargs == 0 and a.option_strings[-1] not in _NOT_SETTINGS}
ADDRESS_OPTIONS = {s for a in _ACTIONS if a.dest in ADDRESSES for s in a.option_strings}


def test_the_rules_read_from_the_parser_are_those_of_cli_py():
    """The invariants below are derived from the parser; pin the ones cli.py documents."""
    off_nonzero, nonzero, zero_ok = (
        dict(off=True, zero=False),
        dict(off=False, zero=False),
        dict(off=False, zero=True),
    )
    for name in ("timeout", "queue_timeout", "hook_timeout", "ready_timeout"):
        assert DURATIONS[name] == off_nonzero, name
    assert DURATIONS["connect_timeout"] == nonzero
    for name in ("finish_timeout", "client_finish_timeout", "drain_timeout"):
        assert DURATIONS[name] == zero_ok, name
    assert COUNTS["slots"] == COUNTS["restart_every"] == 1 and COUNTS["max_queue"] == 0
    assert "listen" in ADDRESSES
    assert CHOICES["log_level"] == {"debug", "info", "warning", "error"}
    assert {"demo", "restart_on_timeout"} <= FLAGS


# --- values -----------------------------------------------------------------------------------

NUL_FREE = st.characters(blacklist_characters="\x00", codec="utf-8")
# fmt: off
INTERESTING = [
    "", " ", "=", "-", "--", "---", "0", "00", "-0", "1", "-1", "2", "65535", "65536", "-65535",
    "99999999999999999999999999", "1" * 5000, "1.5", ".5", "5.", ".", "1e3", "1e400", "inf",
    "-inf", "nan", "0x10", "1_000", "٣", "²", "１２", "5ms", "0ms", "0s", "0", "0.0", "000.000",
    "5 ms", " 5s ", "5MS", "2m", "1h", "999999999999h", "1000000000", "1000000001", "-5ms", "5x",
    "5 s s", "off", "OFF", " Off ", "none", "never", "no", "true", "false", "yes", "on",
    "[::1]:80", "[::1]", "[::1]:", "[]:80", "[::1]80", "::1:80", "0.0.0.0:80", "127.0.0.1:0",
    "127.0.0.1:", ":80", "localhost:65535", "localhost:65536", "a b:80", "[a b]:1", " 80 ", "8\n0",
    "\n", "a\nb", "\r", "\t", "a b", "10.0.0.0/8", "10.0.0.1/33", "::1/128", "::/0", "0.0.0.0/0",
    "fe80::1%eth0", "debug", "INFO", "Warning", "loud", "[a, b]", "[1]", "[]", "[10.0.0.0/8, ::1]",
    "--listen", "--demo", "-p", "--bogus", "--slots=2", "-n2", "/nonexistent/file.py", "/", ".",
    "x" * 300, "é", "日本", "\u2028", "\x85", "🙂",
]
# fmt: on
numbers = st.integers(min_value=-(10**30), max_value=10**30).map(str)
durations = st.builds(
    lambda n, unit, sp: f"{n}{sp}{unit}",
    st.one_of(
        st.integers(min_value=0, max_value=10**12),
        st.floats(min_value=0, max_value=1e12, allow_nan=False).map(lambda f: f"{f:.6f}"),
        st.sampled_from([".5", "1.", "0.000", "1e3", "-1"]),
    ),
    st.sampled_from(["", "ms", "s", "m", "h", "MS", "H", "x", "sec"]),
    st.sampled_from(["", " "]),
)
addresses = st.builds(
    lambda host, port: f"{host}:{port}" if host is not None else port,
    st.sampled_from([None, "127.0.0.1", "localhost", "0.0.0.0", "[::1]", "[::]", "::1", "", "a b"]),
    st.one_of(st.integers(min_value=-5, max_value=70000).map(str), st.sampled_from(["", "x", "٣"])),
)
lists = st.lists(
    st.sampled_from(["10.0.0.0/8", "::1", "a", "", "1", "[x]", "'q'"]), max_size=3
).map(lambda items: "[" + ", ".join(items) + "]")


def texts(alphabet=NUL_FREE, max_size=20):
    return st.text(alphabet=alphabet, max_size=max_size)


values = st.one_of(st.sampled_from(INTERESTING), numbers, durations, addresses, lists, texts())


def one_line_value(v):
    return v.replace("\n", " ").replace("\r", " ")


line_values = values.map(one_line_value)
ACTION_OF = {s: a for a in _ACTIONS for s in a.option_strings}
ACTION_OF.update({n: ACTION_OF["--" + n] for n in LONG_NAMES})  # config keys too


def plausible(action):
    """Values of the option's own kind, most of them valid, mixed with any values: so that many
    examples parse and get their invariants checked, and many do not."""
    kind = _TYPE_NAME[action.dest]
    if kind == "duration":
        good = st.one_of(durations, st.sampled_from(["off", "5s", "0", "250ms", "1.5m", "2"]))
    elif kind == "number":
        good = st.integers(min_value=0, max_value=20).map(str)
    elif kind == "parse_address":
        good = st.sampled_from(["127.0.0.1:0", "0", "9000", "[::1]:80", "0.0.0.0:80", "x:1"])
    elif kind == "parse_port":
        good = st.integers(min_value=1, max_value=65535).map(str)
    elif kind == "parse_proxy_port":
        good = st.one_of(
            st.integers(min_value=1, max_value=65535).map(str),
            st.sampled_from(["127.0.0.1:1", "[::1]:8100", "h:65535", ":1", "h:0"]),
        )
    elif kind == "_host":
        good = st.sampled_from(["localhost", "127.0.0.1", "[::1]", "db.example", " h "])
    elif kind == "_network":
        good = st.sampled_from(["10.0.0.0/8", "::1", "127.0.0.1", "192.168.1.0/24", "1.2.3.4/8"])
    elif action.choices:
        good = st.sampled_from(sorted(action.choices)).flatmap(
            lambda c: st.sampled_from([c, c.upper(), f" {c}"])
        )
    elif action.dest == "config_file":
        good = st.just("")
    else:
        good = texts()
    return st.one_of(good, good, good, good, values)


# --- checking one outcome ---------------------------------------------------------------------


def one_line(text: str) -> bool:
    return text.endswith("\n") and "\n" not in text[:-1] and "\r" not in text


def run_parse(argv, env):
    """parse_args with stdout/stderr captured: ("ok", namespace) or ("exit", code, out, err).
    Any other exception propagates and fails the test."""
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            args = parse_args(list(argv), env=dict(env))
    except SystemExit as e:
        return ("exit", e.code, out.getvalue(), err.getvalue())
    return ("ok", args, out.getvalue(), err.getvalue())


def check_duration(name, value):
    rule = DURATIONS[name]
    if value is None:
        assert rule["off"], f"{name} may not be off"
        return
    assert isinstance(value, float) and math.isfinite(value), (name, value)
    assert value <= 10**9, (name, value)
    assert value > 0 or (rule["zero"] and value == 0), (name, value)


def is_address(value):
    return (
        isinstance(value, tuple)
        and len(value) == 2
        and isinstance(value[0], str)
        and value[0] != ""
        and isinstance(value[1], int)
        and 0 <= value[1] <= 65535
    )


def check_namespace(args):
    # The settings the issue names.
    assert is_address(args.listen), args.listen
    if args.proxy_port is None:
        assert args.demo, "no backend port without --demo"
    else:
        assert not args.demo
        assert isinstance(args.proxy_port, int) and 1 <= args.proxy_port <= 65535
    assert isinstance(args.proxy_host, str) and args.proxy_host
    assert not any(c.isspace() for c in args.proxy_host), args.proxy_host
    assert isinstance(args.slots, int) and args.slots >= 1
    assert args.max_queue is None or (isinstance(args.max_queue, int) and args.max_queue >= 0)
    assert args.allow is None or (
        isinstance(args.allow, list)
        and all(isinstance(n, (ipaddress.IPv4Network, ipaddress.IPv6Network)) for n in args.allow)
    )
    if args.restart_every or args.restart_on_timeout:
        assert args.restart_cmd or args.hooks or args.backend_cmd
    assert not (args.backend_cmd and args.restart_cmd)
    if args.restart_above_rss is not None:
        assert args.backend_cmd
    # Every option, by its kind (so options added later are covered too).
    for name in DURATIONS:
        check_duration(name, getattr(args, name))
    for name, minimum in COUNTS.items():
        value = getattr(args, name)
        assert value is None or (isinstance(value, int) and value >= minimum), (name, value)
    for name in ADDRESSES:
        value = getattr(args, name)
        assert value is None or is_address(value), (name, value)
    for name, choices in CHOICES.items():
        assert getattr(args, name) in choices, name
    for name in FLAGS:
        assert isinstance(getattr(args, name), bool), name
    for action in _ACTIONS:
        value = getattr(args, action.dest, None)
        if action.type is None and action.nargs is None and value is not None:
            assert isinstance(value, str), (action.dest, value)  # commands, file names
    # What the command line takes, the library takes as it is: the same rules.
    for attr, setting in LIBRARY.items():
        if setting.kind == "command":  # text here; the command makes a hook of it
            continue
        value = getattr(args, setting.dest)
        assert validate(attr, value) == (tuple(value) if isinstance(value, list) else value)


def check_outcome(result, names=None):
    """The property. ``names``: when given, a usage error must mention one of them."""
    kind, value, out, err = result
    event("parsed" if kind == "ok" else f"exit {value}")
    if kind == "ok":
        check_namespace(value)
        assert not err, err
        return
    code = value
    if code == 0:  # --help / --version (possibly abbreviated)
        assert out and not err, (out, err)
        return
    assert code == 2, f"exit status {code!r}, stderr {err!r}"
    assert "Traceback" not in err
    assert not out, out
    assert one_line(err), f"not one line: {err!r}"
    assert err.startswith("tcplock: error:"), err
    if names:
        assert any(n in err for n in names), f"{err!r} names none of {names}"


# --- 1. random command lines ------------------------------------------------------------------

option_tokens = st.one_of(
    st.sampled_from(ALL_OPTIONS),
    st.sampled_from(ALL_OPTIONS)
    .filter(lambda s: s.startswith("--"))
    .flatmap(
        lambda s: st.integers(min_value=3, max_value=len(s)).map(lambda n: s[:n])
    ),  # abbreviations, some of them ambiguous
    st.builds(lambda o, v: f"{o}={v}", st.sampled_from(ALL_OPTIONS), values),
    st.builds(lambda o, v: o + v, st.sampled_from([s for s in ALL_OPTIONS if len(s) == 2]), values),
    st.sampled_from(["--bogus", "-x", "--", "-", "---", "--=", "--listen\n", "-l\n"]),
)
tokens = st.lists(st.one_of(option_tokens, values), max_size=12)


def option_pairs(options):
    """An option followed by a value when it takes one."""
    return st.sampled_from(options).flatmap(
        lambda o: (
            st.tuples(st.just(o), plausible(ACTION_OF[o])).map(list)
            if TAKES_VALUE[o]
            else st.just([o])
        )
    )


ORDINARY = [o for o in ALL_OPTIONS if o not in _EXITING]
structured = st.builds(
    lambda base, pairs: base + [t for p in pairs for t in p],
    st.sampled_from([[], ["-l", "9000", "-p", "1"], ["--demo"], ["-l", "127.0.0.1:0", "--demo"]]),
    st.lists(option_pairs(ORDINARY), max_size=5),
)


@settings(max_examples=400, deadline=None)
@given(st.one_of(tokens, structured, structured))
@example(["-l", "9000", "-p", "1", "foo\nbar"])  # an unrecognized argument with a newline
@example(["-l", "9000", "-p", "1", "-c", "/nonexistent\nx"])
@example(["-l", "9000", "-p", "1", "--max-queue", "0", "-n", "1" * 5000])
@example(["--demo", "-t", "off", "--finish-timeout", "0", "--drain-timeout", "0ms"])
@example(["-l", "9000", "-p", "1", "--slots=--"])  # '--' as an attached value
@example(["--help"])
@example(["--vers"])
def test_any_command_line_parses_or_is_a_one_line_usage_error(argv):
    check_outcome(run_parse(argv, {}))


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(ORDINARY), values, st.booleans())
@example("-t", "0", False)
@example("--finish-timeout", "-1", False)
@example("--restart-every", "3", False)
@example("--connect-timeout", "--", True)  # '--' attached to its option
@example("-n", "--", True)
def test_a_bad_value_is_reported_against_its_option(option, value, attached):
    """One option added to a valid command line, its value separate or attached (--opt=value,
    -nvalue): if that makes the command line invalid, the message says which option (a config
    file that cannot be read is reported as a config file)."""
    argv = ["-l", "9000", "-p", "1"]
    if not TAKES_VALUE[option]:
        argv.append(option)
    elif attached:
        argv.append(option + ("=" if option.startswith("--") else "") + value)
    else:
        argv += [option, value]
    names = SPELLINGS[option] + (("config file",) if option in ("-c", "--config") else ())
    check_outcome(run_parse(argv, {}), names=names)


# --- 2. random config files -------------------------------------------------------------------

keys = st.one_of(
    st.sampled_from(LONG_NAMES),
    st.sampled_from(
        ["bogus", "Slots", "SLOTS", "proxy_port", "slot", "d", "c", "-", "--slots", ""]
    ),
    texts(st.characters(blacklist_characters="\x00\n\r=:#;[]", codec="utf-8"), max_size=8),
)
separators = st.sampled_from(["=", " = ", "  =  ", ":", " : ", " ", "=="])
config_lines = st.one_of(
    st.builds(lambda k, s, v: f"{k}{s}{v}", keys, separators, line_values),
    st.sampled_from(SETTINGS).flatmap(
        lambda k: plausible(ACTION_OF[k]).map(lambda v: f"{k} = {one_line_value(v)}")
    ),
    st.sampled_from(SETTINGS).flatmap(
        lambda k: plausible(ACTION_OF[k]).map(lambda v: f"{k} = {one_line_value(v)}")
    ),
    st.builds(lambda k, s, v: f"{k}{s}{v}", st.sampled_from(SETTINGS), separators, lists),
    st.sampled_from(LONG_NAMES),  # a bare key: a flag set to true
    st.sampled_from(["", "   ", "# comment", "; comment", "[section]", "---", "= 5", "[", "]"]),
    st.builds(lambda k, v: f"{k} = {v}  # trailing", st.sampled_from(SETTINGS), line_values),
    texts(st.characters(blacklist_characters="\x00\n\r", codec="utf-8"), max_size=30),
)


def config_file(data: bytes):
    fd, path = tempfile.mkstemp(prefix="tcplock-prop-", suffix=".conf")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return path


def run_with_config(data: bytes, argv, env):
    path = config_file(data)
    try:
        return run_parse(["-c", path, *argv], env)
    finally:
        os.unlink(path)


config_bases = st.sampled_from([[], ["-l", "9000", "-p", "1"], ["--demo"]])


@settings(max_examples=300, deadline=None)
@given(
    st.lists(config_lines, max_size=10),
    st.sampled_from(["\n", "\r\n"]),
    config_bases,
)
@example(["listen = 127.0.0.1:0", "proxy-port = 1", "demo = [yes]"], "\n", [])
@example(["listen = 127.0.0.1:0", "restart-on-timeout = []"], "\n", ["-p", "1"])
@example(
    ["listen = 9000", "listen = 9001", "allow = [10.0.0.0/8, ::1]", "slots: 3"], "\n", ["-p", "1"]
)
def test_any_config_file_parses_or_is_a_one_line_usage_error(lines, newline, argv):
    data = newline.join(lines).encode("utf-8")
    check_outcome(run_with_config(data, argv, {}))


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=40), config_bases)
@example(b"slots = \xff\n", ["-l", "9000", "-p", "1"])
def test_a_config_file_that_is_not_text_is_a_usage_error(data, argv):
    check_outcome(run_with_config(b"slots = 2\n" + data, argv, {}))


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(SETTINGS), st.one_of(line_values, lists))
@example("demo", "[1]")
@example("restart-on-timeout", "[a, b]")
@example("slots", "[1, 2]")
@example("slots", "--")
def test_a_bad_config_value_is_reported_against_its_key(key, value):
    if key == "config":  # a config file naming another config file is not read: nothing to report
        return
    result = run_with_config(f"{key} = {value}\n".encode(), ["-l", "9000", "-p", "1"], {})
    check_outcome(result, names=(key,))


# --- 3. random environments -------------------------------------------------------------------

env_keys = st.one_of(
    st.sampled_from(sorted(ENV_NAMES.values())),
    st.sampled_from(
        ["TCPLOCK_HELP", "TCPLOCK_VERSION", "TCPLOCK_BOGUS", "TCPLOCK_", "tcplock_slots"]
    ),
)
env_values = st.one_of(values, lists)
env_items = st.one_of(
    st.tuples(env_keys, env_values),
    st.sampled_from(SETTINGS).flatmap(
        lambda n: st.tuples(st.just(ENV_NAMES[n]), plausible(ACTION_OF[n]))
    ),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(env_items, max_size=6).map(dict), config_bases)
@example({"TCPLOCK_DEMO": "maybe"}, [])
@example(
    {"TCPLOCK_ALLOW": "[10.0.0.0/8, ::1]", "TCPLOCK_LISTEN": "0", "TCPLOCK_PROXY_PORT": "1"}, []
)
@example({"TCPLOCK_CONFIG": "/nonexistent"}, [])
@example({"TCPLOCK_SLOTS": "--"}, ["-l", "9000", "-p", "1"])
def test_any_environment_parses_or_is_a_one_line_usage_error(env, argv):
    check_outcome(run_parse(argv, env))


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(SETTINGS), env_values)
def test_a_bad_environment_value_is_reported_against_its_variable(name, value):
    env_name = ENV_NAMES[name]
    names = (name, env_name) + (("config file",) if name == "config" else ())
    check_outcome(run_parse(["-l", "9000", "-p", "1"], {env_name: value}), names=names)


# --- 4. the real command, as a subprocess -----------------------------------------------------

HOOK_SOURCES = {
    "good.py": "def on_activate(conn):\n    pass\n\ndef restart(reason):\n    pass\n",
    "syntax.py": "def on_activate(conn)\n    pass\n",
    "raises.py": "raise RuntimeError('boom\\nsecond line')\n",
    "exits.py": "import sys\nsys.exit(3)\n",
    "empty.py": "x = 1\n",
    "notfunc.py": "on_activate = 5\n",
}


HOOK_DIR = tempfile.mkdtemp(prefix="tcplock-prop-hooks-")
atexit.register(shutil.rmtree, HOOK_DIR, ignore_errors=True)
for _name, _source in HOOK_SOURCES.items():
    with open(os.path.join(HOOK_DIR, _name), "w") as _f:
        _f.write(_source)
HOOK_FILES = [os.path.join(HOOK_DIR, n) for n in [*HOOK_SOURCES, "missing.py"]] + [HOOK_DIR]


# Options that run shell commands take harmless ones (no client ever connects, so they do not
# run anyway); addresses that would parse are replaced by 127.0.0.1:0; --hooks takes the files
# above; --config is left to the in-process tests; --help/--version exit 0; --check-config has
# tests of its own (test_check_config.py).
_SUBPROCESS_SKIP = {"-c", "--config", "--hooks", *_NOT_SETTINGS}
_COMMANDS = {"--on-activate", "--on-timeout", "--restart-cmd"}
SUBPROCESS_OPTIONS = [o for o in ALL_OPTIONS if o not in _SUBPROCESS_SKIP]


def _loopback_only(value):
    """A value that would be a valid address becomes 127.0.0.1:0: the tests bind nothing else."""
    return "127.0.0.1:0" if _accepts(parse_address, value)[0] else value


def subprocess_pair():
    def pair(option):
        if option in _COMMANDS:
            commands = st.sampled_from(["true", ":", "", "exit 1"])
            return st.tuples(st.just(option), commands).map(list)
        if not TAKES_VALUE[option]:
            return st.just([option])
        value = plausible(ACTION_OF[option]).filter(lambda v: "\x00" not in v)
        if option in ADDRESS_OPTIONS:
            value = value.map(_loopback_only)
        if option.startswith("--"):
            return st.one_of(
                st.tuples(st.just(option), value).map(list),
                value.map(lambda v: [f"{option}={v}"]),
            )
        return st.tuples(st.just(option), value).map(list)

    return st.one_of(
        st.sampled_from(SUBPROCESS_OPTIONS).flatmap(pair),
        st.sampled_from(HOOK_FILES).map(lambda h: ["--hooks", h]),
    )


def run_command(argv, timeout=10.0):
    """Run ``python -m tcplock``. If it starts (logs 'listening on'), SIGTERM it once it has
    also told systemd READY=1, which it does after installing its signal handlers. Returns
    (started, returncode, stderr, stdout)."""
    tmp = tempfile.mkdtemp(prefix="tcplock-prop-")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(os.path.join(tmp, "notify"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
    env["PYTHONUNBUFFERED"] = "1"
    env["NOTIFY_SOCKET"] = os.path.join(tmp, "notify")
    proc = subprocess.Popen(
        [sys.executable, "-m", "tcplock", *argv],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    lines = []
    started = threading.Event()

    def read():
        for raw in proc.stderr:
            line = raw.decode(errors="replace")
            lines.append(line)
            if "listening on" in line:
                started.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + timeout
        while proc.poll() is None and not started.is_set() and time.monotonic() < deadline:
            started.wait(0.05)
        if started.is_set():
            notify.settimeout(max(0.1, deadline - time.monotonic()))
            with contextlib.suppress(OSError):  # no READY=1: signal anyway
                while b"READY=1" not in notify.recv(4096):
                    pass
            proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"neither started nor exited within {timeout}s: {argv!r}\n{''.join(lines)}")
        reader.join(timeout=5)
        return started.is_set(), rc, "".join(lines), proc.stdout.read().decode(errors="replace")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()
        notify.close()
        shutil.rmtree(tmp, ignore_errors=True)


subprocess_argv = st.builds(
    lambda base, pairs: base + [t for p in pairs for t in p],
    st.sampled_from([["-p", "1"], ["--demo"], []]),
    st.lists(subprocess_pair(), max_size=4),
)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(subprocess_argv)
@example(["--demo", "--hooks", os.path.join(HOOK_DIR, "good.py"), "--restart-every", "2"])
@example(["-p", "1", "--hooks", os.path.join(HOOK_DIR, "raises.py")])
@example(["-p", "1", "--hooks", os.path.join(HOOK_DIR, "syntax.py")])
@example(["-p", "1", "--slots=--"])
def test_the_command_starts_or_exits_2_with_one_line(argv):
    # Last, so that they win: only ever an ephemeral port on 127.0.0.1, and the plain info line
    # that says it started (an invalid --log-level earlier is still an error).
    argv = argv + ["--listen", "127.0.0.1:0", "--log-level", "info"]
    if "--log-format" in ALL_OPTIONS:
        argv += ["--log-format", "text"]
    started, rc, err, out = run_command(argv)
    event("started" if started else f"exit {rc}")
    assert "Traceback" not in err, err
    if started:
        assert rc == 0, f"exit {rc} after SIGTERM:\n{err}"
        assert "listening on 127.0.0.1:" in err, err
    else:
        assert rc == 2, f"exit {rc}:\n{err}"
        assert one_line(err) and err.startswith("tcplock: error:"), repr(err)
        assert not out, out
    # --check-config passes exactly what starts, and fails with the start's own error.
    checked, check_rc, check_err, check_out = run_command(["--check-config", *argv])
    assert not checked and "Traceback" not in check_err, check_err
    if started:
        assert check_rc == 0 and check_out, f"exit {check_rc}:\n{check_err}"
    else:
        assert (check_rc, check_err, check_out) == (2, err, ""), check_err


# --- 5. numbers: ASCII digits within range, and slots within the descriptor limit -------------

_WHOLE = ("number", "parse_port", "parse_proxy_port", "parse_address", "parse_backend")
NUMBER_OPTIONS = sorted(a.option_strings[-1] for a in _ACTIONS if _TYPE_NAME[a.dest] in _WHOLE)


@pytest.mark.parametrize("option", NUMBER_OPTIONS)
@pytest.mark.parametrize("number", ["٩٠٠٠", "99999999999999999999", "1e9", "-1"])
def test_every_number_and_port_is_ascii_digits_within_range(option, number):
    action = ACTION_OF[option]
    value = number if _TYPE_NAME[action.dest] in _WHOLE[:3] else f"127.0.0.1:{number}"
    base = ["-l", "9000"] + ([] if option == "--backend" else ["-p", "1"])
    for argv, env, names in (
        ([*base, option, value], {}, SPELLINGS[option]),
        (base, {ENV_NAMES[option[2:]]: value}, (ENV_NAMES[option[2:]],)),
    ):
        kind, code, out, err = run_parse(argv, env)
        assert (kind, code, out) == ("exit", 2, ""), (argv, env, err)
        assert one_line(err) and err.startswith("tcplock: error:"), err
        assert any(n in err for n in names), err


def ended_with_one_line(p):
    assert p.wait() == 2, p.output()
    assert len(p.lines) == 1 and p.lines[0].startswith("tcplock: error: "), p.output()
    return p.lines[0]


@pytest.mark.parametrize(
    "pool, most",
    [(["-p", "1"], 3333), (["--backend", "127.0.0.1:1", "--backend", "127.0.0.1:2"], 1666)],
)
def test_slots_beyond_the_descriptor_limit_are_one_line_naming_both(pool, most):
    p = limited_cli(["-l", "127.0.0.1:0", *pool, "--slots", str(most + 1)], nofile=20000)
    try:
        line = ended_with_one_line(p)
        assert f"--slots {most + 1}" in line and "descriptor limit of 20000" in line, line
        assert f"at most {most}" in line, line
    finally:
        p.kill()
    p = limited_cli(["-l", "127.0.0.1:0", *pool, "--slots", str(most)], nofile=20000)
    try:
        p.wait_ready()
    finally:
        p.kill()


@pytest.mark.parametrize("slots, nofile", [(3300, 20000), (1, 64)])
def test_the_default_max_queue_is_never_zero(slots, nofile):
    p = limited_cli(["-l", "127.0.0.1:0", "-p", "1", "--slots", str(slots)], nofile=nofile)
    try:
        p.wait_ready()
        line = p.wait_for("max-queue")
        assert f"descriptor limit {nofile}: room for about 0 waiting clients; max-queue 1" in line
    finally:
        p.kill()
