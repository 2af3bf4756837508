"""The ``tcplock`` command: settings, logging, signals and exit codes.

What it owns: every setting is declared once, in :func:`build_parser`, and that declaration is
the command-line option, the config-file key (the long option without its dashes) and the
``TCPLOCK_*`` environment variable; the README's table is checked against it by a test. The
rule it keeps: bad input is one line on standard error and exit status 2, never a traceback.

Only :func:`main` monkey-patches gevent (so that Python hooks may block cooperatively); importing
this module does not.
"""

from __future__ import annotations

import argparse
import atexit
import logging
import os
import re
import signal
import sys
import time
from typing import Any, Callable, List, Optional, Sequence, Tuple

import configargparse

from . import __version__

__all__ = ["main", "build_parser", "parse_duration", "parse_address"]

log = logging.getLogger("tcplock")

ENV_PREFIX = "TCPLOCK_"
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m|h)?\s*", re.IGNORECASE)
_OFF = ("off", "none", "never")


def parse_duration(text: str, *, allow_off: bool = False, allow_zero: bool = False):
    """``500ms``, ``20s``, ``2m``, ``1h`` or a bare number of seconds; ``off`` where allowed."""
    if allow_off and text.strip().lower() in _OFF:
        return None
    m = _DURATION.fullmatch(text)
    if not m:
        extra = " or 'off'" if allow_off else ""
        raise argparse.ArgumentTypeError(
            f"invalid duration {text!r} (use e.g. 500ms, 20s, 2m, 1h{extra})"
        )
    value = float(m.group(1)) * _UNITS[(m.group(2) or "s").lower()]
    if value > 10**9:
        raise argparse.ArgumentTypeError(f"duration {text!r} is too long")
    if value == 0 and not allow_zero:
        hint = " (use 'off' for no limit)" if allow_off else ""
        raise argparse.ArgumentTypeError(f"duration must be more than zero{hint}")
    return value


def _duration(**kw):
    def parse(text: str):
        return parse_duration(text, **kw)

    parse.__name__ = "duration"
    return parse


def parse_port(text: str, *, allow_zero: bool = False) -> int:
    text = text.strip()
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"invalid port {text!r}")
    port = int(text)
    if not (0 if allow_zero else 1) <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port {port} is out of range (1-65535)")
    return port


def parse_address(text: str, default_host: str = "127.0.0.1") -> Tuple[str, int]:
    """``PORT``, ``HOST:PORT`` or ``[IPV6]:PORT``. A bare port binds loopback only: binding
    every interface has to be asked for (``0.0.0.0:PORT`` or ``[::]:PORT``)."""
    text = text.strip()
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not sep or not host:
            raise argparse.ArgumentTypeError(f"invalid address {text!r} (use [IPV6]:PORT)")
    elif ":" in text:
        host, _, port = text.rpartition(":")
        if ":" in host:
            raise argparse.ArgumentTypeError(
                f"invalid address {text!r} (write IPv6 addresses as [IPV6]:PORT)"
            )
        if not host:
            raise argparse.ArgumentTypeError(f"invalid address {text!r} (host is empty)")
    else:
        host, port = default_host, text
    if any(c.isspace() for c in host):
        raise argparse.ArgumentTypeError(f"invalid address {text!r} (space in the host)")
    return host, parse_port(port, allow_zero=True)


def _count(minimum: int):
    def parse(text: str) -> int:
        text = text.strip()
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid number {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, not {value}")
        return value

    parse.__name__ = "number"
    return parse


def _host(text: str) -> str:
    text = text.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    if not text or any(c.isspace() for c in text):
        raise argparse.ArgumentTypeError(f"invalid host {text!r}")
    return text


def _network(text: str):
    import ipaddress

    try:
        return ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid network {text!r} (use e.g. 10.0.0.0/8, 192.168.1.5 or ::1/128)"
        ) from None


def _one_line(text: str) -> str:
    return text.replace("\r", "\\r").replace("\n", "\\n")


class _Parser(configargparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2: a usage error is the caller's fault
        self.exit(2, f"{self.prog}: error: {_one_line(message)} (see {self.prog} --help)\n")

    def _get_values(self, action, arg_strings):
        # argparse takes a lone "--" attached to an option ("--slots=--", or a config-file or
        # environment value of "--") as an empty list; for our single-value options it is just
        # a (bad) value, to be checked like any other.
        if action.nargs is None and arg_strings == ["--"]:
            value = self._get_value(action, "--")
            self._check_value(action, value)
            return value
        return super()._get_values(action, arg_strings)

    def convert_item_to_command_line_arg(self, action, key, value):
        if isinstance(value, list) and action is not None and action.nargs == 0:
            self.error(f"{key} is a flag: set it to true or false, not to a list")
        return super().convert_item_to_command_line_arg(action, key, value)


def build_parser() -> configargparse.ArgumentParser:
    p = _Parser(
        prog="tcplock",
        description=(
            "A TCP proxy that lets at most N clients at a time (default 1) through to a backend "
            "service, in strict arrival order, with a maximum lifetime per connection and hooks "
            "that run between clients."
        ),
        epilog=(
            "Every option can also be set in the config file as 'name = value' (the long option "
            "without its dashes) or in the environment as TCPLOCK_NAME (upper case, '-' as '_'). "
            "Precedence: command line, environment, config file, defaults. Durations take "
            "500ms, 20s, 2m, 1h; a bare number is seconds."
        ),
        auto_env_var_prefix=ENV_PREFIX,
        allow_abbrev=False,
        args_for_setting_config_path=["-c", "--config"],
        config_arg_help_message="read settings from FILE (lines of 'name = value')",
        config_arg_is_required=False,
        add_config_file_help=False,
    )
    # configargparse adds -c/--config; give it a metavar and an env var of its own.
    for action in p._actions:
        if getattr(action, "is_config_file_arg", False):
            action.metavar = "FILE"
            action.env_var = ENV_PREFIX + "CONFIG"
    add = p.add_argument
    add(
        "-l",
        "--listen",
        metavar="[HOST:]PORT",
        type=parse_address,
        help="where clients connect; a bare PORT listens on 127.0.0.1 only (required)",
    )
    add(
        "--proxy-host",
        metavar="HOST",
        type=_host,
        default="localhost",
        help="host of the backend service (default: %(default)s)",
    )
    add(
        "-p",
        "--proxy-port",
        metavar="PORT",
        type=parse_port,
        help="port of the backend service (required)",
    )
    add(
        "-n",
        "--slots",
        metavar="N",
        type=_count(1),
        default=1,
        help="how many clients may use the backend at once (default: %(default)s)",
    )
    add(
        "-t",
        "--timeout",
        metavar="DURATION",
        type=_duration(allow_off=True),
        default=None,
        help="maximum lifetime of a relayed connection; then both sides are cut (default: off)",
    )
    add(
        "--queue-timeout",
        metavar="DURATION",
        type=_duration(allow_off=True),
        default=None,
        help="close a client that has waited this long for a slot (default: off)",
    )
    add(
        "--max-queue",
        metavar="N",
        type=_count(0),
        default=None,
        help="close at once a client arriving when N are already waiting (default: as many as "
        "the descriptor limit leaves room for)",
    )
    add(
        "--allow",
        metavar="CIDR",
        type=_network,
        action="append",
        help="admit only clients from this network (repeatable, e.g. 10.0.0.0/8 or ::1/128); "
        "others are closed at once (default: any client that reaches --listen)",
    )
    add(
        "--connect-timeout",
        metavar="DURATION",
        type=_duration(),
        default=5.0,
        help="keep retrying the backend connection this long (default: 5s)",
    )
    add(
        "--finish-timeout",
        metavar="DURATION",
        type=_duration(allow_zero=True),
        default=10.0,
        help="how long the backend may go on after the client reset; what it sends is "
        "discarded (default: 10s)",
    )
    add(
        "--client-finish-timeout",
        metavar="DURATION",
        type=_duration(allow_zero=True),
        default=10.0,
        help="how long the client may keep its side open after the backend closed (a backend "
        "on loopback that closed for good passes the slot on at once); 0 passes the slot on "
        "as soon as the backend closes, for backends that never half-close to go on reading "
        "(default: 10s)",
    )
    add(
        "--on-activate",
        metavar="CMD",
        help="shell command run before each client is let through; it waits for the command",
    )
    add(
        "--on-timeout",
        metavar="CMD",
        help="shell command run after a connection was cut at its timeout, before the next "
        "client is let through",
    )
    add(
        "--hook-timeout",
        metavar="DURATION",
        type=_duration(allow_off=True),
        default=60.0,
        help="a hook running longer than this is killed and counts as failed (default: 60s)",
    )
    add(
        "--restart-cmd",
        metavar="CMD",
        help="shell command that restarts the backend; run while no client is relayed",
    )
    add(
        "--restart-every",
        metavar="K",
        type=_count(1),
        default=None,
        help="restart the backend after every K clients, before the next (default: never)",
    )
    add(
        "--restart-on-timeout",
        action="store_true",
        help="restart the backend after a connection was cut at its timeout",
    )
    add(
        "--ready-timeout",
        metavar="DURATION",
        type=_duration(allow_off=True),
        default=30.0,
        help="after a restart, wait this long for the backend to accept connections before "
        "letting the next client in; if it does not, the restart is retried (default: 30s)",
    )
    add(
        "--hooks",
        metavar="FILE.py",
        help="Python file defining on_activate(conn), on_timeout(conn) and/or restart(reason)",
    )
    add(
        "--drain-timeout",
        metavar="DURATION",
        type=_duration(allow_zero=True),
        default=10.0,
        help="on SIGTERM/SIGINT/SIGHUP, how long active connections may finish (default: 10s)",
    )
    add(
        "--status",
        metavar="[HOST:]PORT",
        type=parse_address,
        help="serve GET /status (JSON), GET /metrics (Prometheus), POST /pause and "
        "POST /resume over HTTP here; a bare PORT is on 127.0.0.1 (default: off)",
    )
    add(
        "--agent-check",
        metavar="[HOST:]PORT",
        type=parse_address,
        help="answer HAProxy's agent-check here: 'drain' while paused, restarting or "
        "stopping, else 'up ready' with a weight that falls as the queue grows (default: off)",
    )
    add(
        "--log-level",
        metavar="LEVEL",
        default="info",
        type=str.lower,
        choices=["debug", "info", "warning", "error"],
        help="debug, info (one line per connection), warning or error (default: info)",
    )
    add(
        "--log-format",
        metavar="FORMAT",
        default="text",
        type=str.lower,
        choices=["text", "json"],
        help="text, or json for one JSON object per line with the same fields (default: text)",
    )
    add(
        "--demo",
        action="store_true",
        help="start a bundled demo backend and relay to it (instead of --proxy-port)",
    )
    p.add_argument("--version", action="version", version=f"tcplock {__version__}", env_var=None)
    return p


def parse_args(argv: Optional[Sequence[str]] = None, env=None) -> argparse.Namespace:
    parser = build_parser()
    try:
        args = parser.parse_args(argv, env_vars=env if env is not None else None)
    except configargparse.ConfigFileParserException as e:
        parser.error(str(e))
    except UnicodeDecodeError as e:
        parser.error(f"the config file is not valid UTF-8 text ({e.reason} at byte {e.start})")
    if args.demo:
        if args.proxy_port is not None:
            parser.error("--demo relays to its own backend: leave out -p/--proxy-port")
        if args.listen is None:
            args.listen = ("127.0.0.1", 9000)
    else:
        missing = [
            name
            for name, value in (("-l/--listen", args.listen), ("-p/--proxy-port", args.proxy_port))
            if value is None
        ]
        if missing:
            parser.error("the following arguments are required: " + ", ".join(missing))
    if (args.restart_every or args.restart_on_timeout) and not (args.restart_cmd or args.hooks):
        parser.error(
            "--restart-every and --restart-on-timeout need --restart-cmd "
            "(or a restart() in --hooks)"
        )
    return args


def load_hooks(args) -> dict:
    """The hooks to use: shell commands from the options, Python functions from --hooks.

    The Python file is run once, at start-up, so that a mistake in it is reported before the
    first client arrives. Raises UsageError with a one-line message.
    """
    from .hooks import CommandHook

    hooks = {
        "on_activate": CommandHook(args.on_activate, "on-activate") if args.on_activate else None,
        "on_timeout": CommandHook(args.on_timeout, "on-timeout") if args.on_timeout else None,
        "restart": CommandHook(args.restart_cmd, "restart") if args.restart_cmd else None,
    }
    if not args.hooks:
        return hooks
    import runpy

    try:
        namespace = runpy.run_path(args.hooks, run_name="tcplock_hooks")
    except FileNotFoundError:
        raise UsageError(f"--hooks: no such file: {args.hooks}") from None
    except SyntaxError as e:
        raise UsageError(f"--hooks: {args.hooks}, line {e.lineno}: {e.msg}") from None
    except BaseException as e:  # the file's own code failed: report it, do not crash
        raise UsageError(f"--hooks: {args.hooks} failed to load: {type(e).__name__}: {e}") from None
    found = 0
    for name, flag in (
        ("on_activate", "--on-activate"),
        ("on_timeout", "--on-timeout"),
        ("restart", "--restart-cmd"),
    ):
        fn = namespace.get(name)
        if fn is None:
            continue
        if not callable(fn):
            raise UsageError(f"--hooks: {name} in {args.hooks} is not a function")
        if hooks[name] is not None:
            raise UsageError(f"--hooks: {args.hooks} defines {name}, and {flag} is given too")
        hooks[name] = fn
        found += 1
    if not found:
        raise UsageError(f"--hooks: {args.hooks} defines none of on_activate, on_timeout, restart")
    return hooks


# Descriptors kept for everything that is not a client: the listener, the event loop, logs,
# hook pipes, readiness probes, and a margin.
_RESERVED_FDS = 64


def raise_descriptor_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; return the resulting soft limit."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as e:
            log.warning("could not raise the descriptor limit from %d to %d: %s", soft, target, e)
    return soft


def max_lingering(capacity: int) -> int:
    """Clients whose slot passed on before they closed that are kept open at once (the rest
    are closed at once): at most 256, and an eighth of the descriptor limit."""
    return min(256, capacity // 8)


def default_max_queue(capacity: int, slots: int) -> int:
    """Waiting clients the descriptor limit has room for: each holds one descriptor, each
    active connection up to six (client, backend, and a pipe each way for bulk data), and each
    lingering client one (see max_lingering)."""
    return max(0, capacity - _RESERVED_FDS - 6 * slots - max_lingering(capacity))


def notify(state: str) -> None:
    """Tell systemd (Type=notify) about our state; a no-op outside systemd."""
    import socket

    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    if path.startswith("@"):  # an abstract socket
        path = "\0" + path[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.connect(path)
            s.sendall(state.encode())
    except OSError as e:
        log.warning("could not notify systemd at %s: %s", path, e)


class UsageError(Exception):
    """Bad settings, found after parsing: one line for the operator, exit status 2."""


class TextFormatter(logging.Formatter):
    """``time LEVEL message``; the date and time part is formatted once per second, not once
    per line (there is a line for every connection)."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(message)s")
        self._second = None
        self._stamp = ""

    def formatTime(self, record: logging.LogRecord, datefmt=None) -> str:
        return self.stamp(record.created, record.msecs)

    def stamp(self, created: float, msecs: float) -> str:
        second = int(created)
        if second != self._second:
            self._second = second
            self._stamp = time.strftime("%Y-%m-%d %H:%M:%S", self.converter(created))
        return f"{self._stamp},{int(msecs):03d}"

    def connection_line(self, conn, created: float) -> str:
        """A connection's INFO line, as :meth:`format` makes it from its record."""
        return f"{self.stamp(created, _msecs(created))} INFO {conn.describe()}"

    def format(self, record: logging.LogRecord) -> str:
        # What logging.Formatter.format does for this fixed layout, without its generic steps.
        record.message = record.getMessage()
        line = f"{self.formatTime(record)} {record.levelname} {record.message}"
        if record.exc_info or record.exc_text or record.stack_info:
            record.asctime = self.formatTime(record)
            return super().format(record)
        return line


class BatchedStream:
    """The log's output: lines are gathered and written together, at most ``delay`` seconds
    after the first of them, or at once when ``limit`` characters are waiting or on
    :meth:`flush`. At thousands of connections a second, a write() per line cost more CPU than
    all the rest of the logging; now it is one per batch. Written from the event loop (a
    timer); needs gevent's hub.

    A line may also be given as the function that makes it (:meth:`defer`): it is made when
    the batch is written, with the others, in one loop. Made one at a time, each in the midst
    of a hand-off, a connection's line cost several times as much.
    """

    #: What a deferred line counts for against ``limit``, before it is made.
    deferred_size = 128

    def __init__(self, stream, delay: float = 0.02, limit: int = 1 << 16) -> None:
        self.stream = stream
        self.delay = delay
        self.limit = limit
        self._parts: list = []  # text, or (make, a, b): the text is make(a, b)
        self._size = 0
        self._timer = None

    def write(self, text: str) -> None:
        self._parts.append(text)
        self._added(len(text))

    def defer(self, make: Callable[[Any, Any], str], a, b) -> None:
        """Add the text ``make(a, b)``, to be made when the batch is written."""
        self._parts.append((make, a, b))
        self._added(self.deferred_size)

    def _added(self, size: int) -> None:
        self._size += size
        if self._size >= self.limit:
            self.flush()
        elif self._timer is None:
            import gevent

            # A new timer per batch: a libev timer started again once it has fired would
            # fire at once.
            self._timer = gevent.get_hub().loop.timer(self.delay, ref=False)
            self._timer.start(self.flush)

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.stop()
            self._timer.close()
            self._timer = None
        if not self._parts:
            return
        parts, self._parts = self._parts, []
        self._size = 0
        for i, part in enumerate(parts):
            if part.__class__ is tuple:
                try:
                    parts[i] = part[0](part[1], part[2])
                except Exception as e:  # a line that cannot be made must not cost the others
                    parts[i] = f"(a log line could not be made: {e!r})\n"
        text = "".join(parts)
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):
            pass  # nowhere to log to: the proxy goes on

    def close(self) -> None:
        self.flush()


class LineHandler(logging.StreamHandler):
    """A StreamHandler without its lock, that flushes at once only what matters.

    The CLI logs from one thread, the event loop's, and a line is written without yielding, so
    lines cannot interleave. Under gevent's monkey-patching the handler's lock is a
    Python-level RLock, and taking it twice per line (emit and flush) cost more than writing
    the line. Over a :class:`BatchedStream`, a warning or an error is written out at once
    (with the lines before it); an info line waits for its batch.
    """

    def createLock(self) -> None:
        self.lock = None

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.stream.write(self.format(record) + self.terminator)
            if record.levelno >= logging.WARNING or not isinstance(self.stream, BatchedStream):
                self.flush()
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)

    def handle(self, record: logging.LogRecord):
        rv = self.filter(record)
        if isinstance(rv, logging.LogRecord):  # Python 3.12+: a filter may return a record
            record = rv
        if rv:
            self.emit(record)
        return rv

    def flush(self) -> None:
        stream = self.stream
        if stream is not None and hasattr(stream, "flush"):
            stream.flush()


class JSONFormatter(logging.Formatter):
    """One JSON object per line. A connection's line carries its fields as such
    (``client``, ``queued_seconds``, ``active_seconds``, ``bytes_up``, ``bytes_down``,
    ``end``); other lines carry ``message``."""

    def format(self, record: logging.LogRecord) -> str:
        import json

        data = {"time": self._time(record), "level": record.levelname}
        conn = getattr(record, "connection", None)
        if conn is not None:
            self._add_connection(data, conn)
        else:
            data["message"] = record.getMessage()
        if record.exc_info:
            data["exception"] = self.formatException(record.exc_info)
        return json.dumps(data)

    def connection_line(self, conn, created: float) -> str:
        """A connection's INFO line, as :meth:`format` makes it from its record."""
        import json

        record = logging.makeLogRecord({"created": created, "msecs": _msecs(created)})
        data = {"time": self._time(record), "level": "INFO"}
        self._add_connection(data, conn)
        return json.dumps(data)

    def _time(self, record: logging.LogRecord) -> str:
        return (
            self.formatTime(record, "%Y-%m-%dT%H:%M:%S")
            + f".{int(record.msecs):03d}"
            + time.strftime("%z", self.converter(record.created))
        )

    @staticmethod
    def _add_connection(data: dict, conn) -> None:
        from .server import format_address

        data.update(
            client=format_address(conn.client),
            queued_seconds=round(conn.queued_seconds, 3),
            active_seconds=round(conn.active_seconds, 3),
            bytes_up=conn.bytes_up,
            bytes_down=conn.bytes_down,
            end=conn.end,
        )


def _msecs(created: float) -> float:
    # As logging.LogRecord computes it.
    return int((created - int(created)) * 1000) + 0.0


def connection_writer(handler: logging.StreamHandler):
    """A :attr:`TCPLock.connection_log` that writes each connection's line straight to the
    handler's stream, the line the handler would write for its record (over a
    :class:`BatchedStream`, made when the batch is written). A record through the logging
    machinery cost more than everything else in a hand-off."""
    line = handler.formatter.connection_line
    stream = handler.stream
    if isinstance(stream, BatchedStream):

        def make(conn, created: float) -> str:
            return line(conn, created) + "\n"

        def defer(conn) -> None:
            stream.defer(make, conn, time.time())

        return defer

    def write(conn) -> None:
        try:
            stream.write(line(conn, time.time()) + "\n")
            stream.flush()
        except (OSError, ValueError):
            pass  # as the handler would: a log that cannot be written does not stop the proxy

    return write


def _setup_logging(level: str, fmt: str = "text", batched: bool = False) -> logging.Handler:
    # tcplock's log lines need none of the caller's file and line, thread, or process: skip
    # computing them for every record (under gevent, naming the "thread" of each greenlet is
    # costly). _srcfile = None is the logging module's own switch for the caller lookup.
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    logging._srcfile = None
    handler = LineHandler(BatchedStream(sys.stderr) if batched else sys.stderr)
    if fmt == "json":
        handler.setFormatter(JSONFormatter())
    else:
        handler.setFormatter(TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper()))
    return handler


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv, env=os.environ)

    from gevent import monkey

    # Patched here, never on import: hooks written in Python may then use blocking libraries
    # (subprocess, sockets, time.sleep) without stalling the other clients.
    monkey.patch_all()

    import gevent
    from gevent.event import Event

    from .server import TCPLock, format_address

    try:
        hooks = load_hooks(args)
    except UsageError as e:
        print(f"tcplock: error: {_one_line(str(e))}", file=sys.stderr)
        return 2
    if (args.restart_every or args.restart_on_timeout) and hooks["restart"] is None:
        print(
            f"tcplock: error: {args.hooks} defines no restart(reason), which "
            "--restart-every and --restart-on-timeout need",
            file=sys.stderr,
        )
        return 2
    # Batched: info lines reach the log within 0.02 s, a write() per batch (see BatchedStream).
    handler = _setup_logging(args.log_level, args.log_format, batched=True)
    atexit.register(handler.flush)
    demo = None
    backend = (args.proxy_host, args.proxy_port)
    if args.demo:
        from .demo import DemoBackend

        demo = DemoBackend(("127.0.0.1", 0))
        demo.start()
        backend = ("127.0.0.1", demo.server_port)

    capacity = raise_descriptor_limit()
    max_queue = args.max_queue
    if max_queue is None:
        max_queue = default_max_queue(capacity, args.slots)
    lock = TCPLock(
        args.listen,
        backend,
        slots=args.slots,
        timeout=args.timeout,
        queue_timeout=args.queue_timeout,
        max_queue=max_queue,
        allow=args.allow,
        connect_timeout=args.connect_timeout,
        finish_timeout=args.finish_timeout,
        client_finish_timeout=args.client_finish_timeout,
        hook_timeout=args.hook_timeout,
        drain_timeout=args.drain_timeout,
        on_activate=hooks["on_activate"],
        on_timeout=hooks["on_timeout"],
        restart=hooks["restart"],
        restart_every=args.restart_every,
        restart_on_timeout=args.restart_on_timeout,
        ready_timeout=args.ready_timeout,
    )
    lock.max_lingering = max_lingering(capacity)
    if logging.getLogger("tcplock.server").isEnabledFor(logging.INFO):
        lock.connection_log = connection_writer(handler)
    # Handlers first: a supervisor may send SIGTERM as soon as it sees the first log line.
    stop = Event()
    hurry = Event()

    def on_signal():
        if stop.is_set():
            hurry.set()
        stop.set()

    # SIGHUP as well: there is no configuration to reload, and its default action would kill
    # the process on the spot, cutting every client and losing the batched log lines. Unless
    # it was ignored when tcplock started (nohup, a supervisor): then it stays ignored.
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        if sig == signal.SIGHUP and signal.getsignal(sig) == signal.SIG_IGN:
            continue
        gevent.signal_handler(sig, on_signal)
    try:
        lock.start()
    except OSError as e:
        reason = os.strerror(e.errno) if e.errno else str(e)
        print(f"tcplock: cannot listen on {format_address(args.listen)}: {reason}", file=sys.stderr)
        return 1
    extras = []
    try:
        if args.status is not None:
            from .status import StatusServer

            extras.append(("status", args.status, StatusServer(args.status, lock)))
        if args.agent_check is not None:
            from .status import AgentCheck

            extras.append(("agent-check", args.agent_check, AgentCheck(args.agent_check, lock)))
        for name, address, server in extras:
            failed = (name, address)
            server.start()
    except OSError as e:
        lock.stop(0)
        reason = os.strerror(e.errno) if e.errno else str(e)
        print(
            f"tcplock: cannot listen on {format_address(failed[1])} ({failed[0]}): {reason}",
            file=sys.stderr,
        )
        return 1
    listen = format_address((args.listen[0], lock.server_port))
    log.info(
        "tcplock %s listening on %s, relaying to %s, %d slot(s)",
        __version__,
        listen,
        format_address(backend),
        args.slots,
    )
    log.info(
        "descriptor limit %d: room for about %d waiting clients; max-queue %d",
        capacity,
        default_max_queue(capacity, args.slots),
        max_queue,
    )
    for name, address, server in extras:
        where = format_address((address[0], server.server_port))
        log.info("%s on %s", name, f"http://{where}/status" if name == "status" else where)
    if demo is not None:
        log.info(
            "demo: run 'nc %s %d' in two terminals; the second waits for the first to quit",
            args.listen[0],
            lock.server_port,
        )

    notify("READY=1\nSTATUS=listening on " + listen)
    stop.wait()
    notify("STOPPING=1")
    log.info(
        "stopping: %d active, %d queued; draining for up to %gs (signal again to cut now)",
        len(lock.active),
        lock.queued,
        args.drain_timeout,
    )
    stopper = gevent.spawn(lock.stop)
    gevent.wait([stopper, hurry], count=1)
    if not stopper.ready():
        lock.stop(0)
        stopper.join()
    for _name, _address, server in extras:
        server.stop(timeout=1)
    if demo is not None:
        demo.stop()
    log.info("stopped")
    handler.flush()
    return 0
