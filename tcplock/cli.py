"""The ``tcplock`` command: options, hooks, signals and exit codes.

What it owns: turning the settings table (:mod:`tcplock.settings`) into the command line, an
argparse parser with the table's groups (the config file and the ``TCPLOCK_*`` environment are
read by :mod:`tcplock.config`, which says where a bad value was written), and the resulting
values into a running :class:`~tcplock.server.TCPLock`; ``--check-config``, which makes the
same checks up to the lock made but not started; signals, systemd notification and the
descriptor limit. The rule it keeps: bad input is one line on standard error and exit status 2,
never a traceback; an unknown option is named with the one it was probably meant to be.

Only :func:`main` monkey-patches gevent (so that Python hooks may block cooperatively); importing
this module does not.
"""

from __future__ import annotations

import argparse
import atexit
import logging
import os
import signal
import sys
from typing import Callable, List, Optional, Sequence

from . import __version__
from .config import ConfigError, Resolved, render_effective, resolve, suggest
from .settings import (
    ENV_PREFIX,
    LIBRARY,
    SETTINGS,
    check_together,
    grouped,
    parse_address,
    parse_duration,
    validate,
)

__all__ = [
    "main",
    "build_parser",
    "load",
    "parse_args",
    "parse_duration",
    "parse_address",
    "ENV_PREFIX",
]

log = logging.getLogger("tcplock")

#: The settings whose value is a shell command run as a hook (on-activate, on-timeout,
#: restart-cmd); a Python file given with --hooks may define the same hooks instead.
_COMMANDS = tuple(s for s in SETTINGS if s.kind == "command")


def _option(dest: str) -> str:
    """A setting's long option (how a message names one given on the command line)."""
    return next(s.flags[-1] for s in SETTINGS if s.dest == dest)


def _one_line(text: str) -> str:
    return text.replace("\r", "\\r").replace("\n", "\\n")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2: a usage error is the caller's fault
        self.exit(2, f"{self.prog}: error: {_one_line(message)} (see {self.prog} --help)\n")

    def parse_args(self, args=None, namespace=None):
        # As argparse's, but an unknown option is named with the one it was probably meant to
        # be, as an unknown config-file key or TCPLOCK_* variable is (tcplock.config.suggest).
        namespace, extras = self.parse_known_args(args, namespace)
        if extras:
            unknown = [a for a in extras if a.startswith("-") and a.strip("-")]
            if unknown:
                word = unknown[0].split("=", 1)[0]
                flags = [f for a in self._actions for f in a.option_strings]
                self.error(f"unrecognized option {word}{suggest(word, flags)}")
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return namespace

    def _get_values(self, action, arg_strings):
        # argparse takes a lone "--" attached to an option ("--slots=--") as an empty list;
        # for our single-value options it is just a (bad) value, to be checked like any other.
        if action.nargs is None and arg_strings == ["--"]:
            value = self._get_value(action, "--")
            self._check_value(action, value)
            return value
        return super()._get_values(action, arg_strings)


def _add_setting(parser, setting) -> None:
    # No default here: the command line says only what it was given (argparse.SUPPRESS), and
    # tcplock.config puts it over the environment, the config file and the defaults.
    kwargs = dict(
        help=f"{setting.help_text} [env var: {setting.env}]".replace("%", "%%"),
        default=argparse.SUPPRESS,
    )
    if setting.action is not None:
        kwargs["action"] = setting.action
    if setting.action != "store_true":  # a flag takes no value
        kwargs.update(metavar=setting.metavar, type=setting.parse, choices=setting.choices)
    parser.add_argument(*setting.flags, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    """The parser of the command line: one option per setting of
    :data:`~tcplock.settings.SETTINGS`, by group, and ``--check-config`` and ``--version``. It
    reads the command line only (the config file and the environment are
    :mod:`tcplock.config`'s) and leaves out what was not given there."""
    p = _Parser(
        prog="tcplock",
        usage=(
            "%(prog)s -l [HOST:]PORT (-p [HOST:]PORT | --backend HOST:PORT ... | --demo) "
            "[OPTION ...]\n       %(prog)s --check-config [OPTION ...]"
        ),
        description=(
            "A TCP proxy that lets at most N clients at a time (default 1) through to a backend "
            "service, in strict arrival order, with a maximum lifetime per connection and hooks "
            "that run between clients."
        ),
        epilog=(
            "Every option can also be set in the config file as 'name = value' (the long option "
            "without its dashes) or in the environment as TCPLOCK_NAME (upper case, '-' as '_'). "
            "Precedence: command line, environment, config file, defaults. Durations take "
            "500ms, 20s, 1m30s, 5min, 1h30m, 2d; a bare number is seconds."
        ),
        allow_abbrev=False,
        add_help=False,
    )
    for group, settings in grouped():
        options = p.add_argument_group(group)
        if group == "general":
            options.add_argument("-h", "--help", action="help", help="print this help and exit")
            options.add_argument(
                "--version",
                action="version",
                version=f"tcplock {__version__}",
                help="print the version and exit",
            )
            options.add_argument(
                "--check-config",
                action="store_true",
                default=argparse.SUPPRESS,
                help="read and check the settings as a start would (the config file, the "
                "environment, the --hooks and token files, the rules between settings), print "
                "them with where each came from, and exit: 0 if they are valid, 2 if not; no "
                "port is bound and no backend started",
            )
        for setting in settings:
            _add_setting(options, setting)
    return p


def load(argv: Optional[Sequence[str]] = None, env=None) -> Resolved:
    """The settings from ``argv``, ``env`` (the process's environment if None) and the config
    file, with where each came from; a usage error exits 2 with one line."""
    return _read(argv, os.environ if env is None else env)[0]


def _read(argv, env):
    """(the settings, whether --check-config was given): see :func:`load`."""
    parser = build_parser()
    given = vars(parser.parse_args(argv))
    check = given.pop("check_config", False)
    try:
        return resolve(given, env), check
    except ConfigError as e:  # it says where: the file and line, or the variable
        parser.exit(2, f"{parser.prog}: error: {_one_line(str(e))}\n")


def parse_args(argv: Optional[Sequence[str]] = None, env=None) -> argparse.Namespace:
    """The settings as a Namespace (see :func:`load`)."""
    return load(argv, env).args


def load_hooks(args, named: Optional[Callable[[str], str]] = None) -> dict:
    """The hooks to use: shell commands from the options, Python functions from --hooks.

    The Python file is run once, at start-up, so that a mistake in it is reported before the
    first client arrives. Raises UsageError with a one-line message, naming each setting as
    ``named(dest)`` does (:meth:`~tcplock.config.Resolved.named`: where it was given; its
    option by default).
    """
    from .hooks import CommandHook

    if named is None:
        named = _option
    where = named("hooks")

    hooks = {}
    for setting in _COMMANDS:  # labelled by the hook they are: on-activate, on-timeout, restart
        command = getattr(args, setting.dest)
        hooks[setting.attr] = (
            CommandHook(command, setting.attr.replace("_", "-")) if command else None
        )
    if not args.hooks:
        return hooks
    import runpy

    try:
        namespace = runpy.run_path(args.hooks, run_name="tcplock_hooks")
    except FileNotFoundError:
        raise UsageError(f"{where}: no such file: {args.hooks}") from None
    except SyntaxError as e:
        raise UsageError(f"{where}: {args.hooks}, line {e.lineno}: {e.msg}") from None
    except BaseException as e:  # the file's own code failed: report it, do not crash
        raise UsageError(f"{where}: {args.hooks} failed to load: {type(e).__name__}: {e}") from None
    found = 0
    for setting in _COMMANDS:
        name, flag = setting.attr, named(setting.dest)
        fn = namespace.get(name)
        if fn is None:
            continue
        if not callable(fn):
            raise UsageError(f"{where}: {name} in {args.hooks} is not a function")
        if hooks[name] is not None:
            raise UsageError(f"{where}: {args.hooks} defines {name}, and {flag} is given too")
        hooks[name] = fn
        found += 1
    if not found:
        names = ", ".join(s.attr for s in _COMMANDS)
        raise UsageError(f"{where}: {args.hooks} defines none of {names}")
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


def max_status_connections(capacity: int) -> int:
    """Connections the --status server holds at once (more wait in the kernel's listen
    backlog): at most 64, and a sixteenth of the descriptor limit."""
    return max(1, min(64, capacity // 16))


#: Descriptors an active connection may hold: client, backend, and a pipe each way for bulk
#: data.
_FDS_PER_CONNECTION = 6


def max_slots(capacity: int, backends: int) -> int:
    """Slots per backend whose connections, all active at once, fit in the descriptor limit."""
    return capacity // (_FDS_PER_CONNECTION * backends)


def default_max_queue(capacity: int, slots: int, status_connections: int = 0) -> int:
    """Waiting clients the descriptor limit has room for: each holds one descriptor, each
    active connection up to six (client, backend, and a pipe each way for bulk data), each
    lingering client one (see max_lingering), and each connection of the status server one
    (``status_connections``, see max_status_connections)."""
    return max(
        0,
        capacity
        - _RESERVED_FDS
        - _FDS_PER_CONNECTION * slots
        - max_lingering(capacity)
        - status_connections,
    )


def _summary(lock, hooks: dict, hooks_file: Optional[str]) -> str:
    """What a client will meet, for the start-up line: time limits, restart policy, allow
    list and hooks."""
    from .hooks import CommandHook

    def duration(value) -> str:
        return "off" if value is None else f"{value:g}s"

    policy = []
    if lock.restart_every:
        policy.append(f"every {lock.restart_every} clients")
    if lock.restart_on_timeout:
        policy.append("after a timeout")
    if lock.restart_above_rss is not None:
        from .settings import format_size

        policy.append(f"above {format_size(lock.restart_above_rss)} of memory")
    if lock.backend_cmd is not None:
        policy.append("when its command ends")
    if lock.spares:
        policy.append(f"with {lock.spares} of the backends kept ready as standbys")
    given = []
    for setting in _COMMANDS:
        hook = hooks.get(setting.attr)
        if hook is not None:
            source = "command" if isinstance(hook, CommandHook) else hooks_file
            given.append(f"{setting.attr.replace('_', '-')} ({source})")
    return "; ".join(
        [
            f"timeout {duration(lock.timeout)}, queue-timeout {duration(lock.queue_timeout)}, "
            f"connect-timeout {duration(lock.connect_timeout)}",
            "restart " + (" and ".join(policy) if policy else "never"),
            "allow " + (" ".join(str(n) for n in lock.allow) if lock.allow is not None else "any"),
            "hooks " + (", ".join(given) if given else "none"),
        ]
    )


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


def check_hooks(args, hooks: dict) -> None:
    """The hooks' rules: restarting after a count or a timeout needs a restart hook or a
    backend command, and a backend command takes no restart hook."""
    if args.backend_cmd and hooks["restart"] is not None:
        raise UsageError(
            f"{args.hooks} defines restart(), and --backend-cmd is given: tcplock restarts the "
            "backends it runs"
        )
    if (
        (args.restart_every or args.restart_on_timeout)
        and hooks["restart"] is None
        and not args.backend_cmd
    ):
        raise UsageError(
            f"{args.hooks} defines no restart(reason), which "
            "--restart-every and --restart-on-timeout need"
        )


def start_checks(loaded: Resolved):
    """(hooks, status token): what a start, a reload and --check-config check past the
    settings themselves. The --hooks file is run, and the token file read; UsageError, in one
    line naming where, for what cannot be taken."""
    args = loaded.args
    hooks = load_hooks(args, loaded.named)
    check_hooks(args, hooks)
    token = None
    if args.status_token_file:
        from .status import read_token_file

        try:
            token = read_token_file(args.status_token_file)
        except ValueError as e:
            raise UsageError(f"--status-token-file: {e}") from None
    return hooks, token


def make_lock(args, hooks: dict, capacity: int, backends: list):
    """The lock the settings describe, not started (nothing is bound); ValueError for what
    the parser lets through but the lock refuses."""
    from .server import TCPLock

    kwargs = library_settings(args, hooks, capacity, backends)
    return TCPLock(args.listen, backends=backends, **kwargs)


def check_config(loaded: Resolved) -> int:
    """--check-config: the checks of a start, up to the lock made but not started; the settings
    printed as a config file, with where each came from. 0 if they are valid, 2 if not."""
    for warning in loaded.warnings:
        print(f"tcplock: warning: {_one_line(warning)}", file=sys.stderr)
    args = loaded.args
    try:
        hooks, _token = start_checks(loaded)
        # The demo's backend is not started: a stand-in address takes its place.
        backends = [("127.0.0.1", 1)] if args.demo else backends_of(args)
        lock = make_lock(args, hooks, raise_descriptor_limit(), backends)
    except (UsageError, ValueError) as e:
        print(f"tcplock: error: {_one_line(str(e))}", file=sys.stderr)
        return 2
    print(
        f"# tcplock {__version__}: the settings are valid. Each is given as it would be used, "
        "with where it came\n# from; those at their default are commented out.\n"
    )
    print(render_effective(loaded, {"max_queue": lock.max_queue}), end="")
    return 0


def backends_of(args) -> list:
    """The pool's addresses the settings name (the demo's own backend is not among them)."""
    return list(args.backend or [(args.proxy_host, args.proxy_port)])


def pool_slots(args, backends: list) -> List[int]:
    """Each backend's slots: its own (``HOST:PORT,slots=N``), or ``--slots``."""
    return [b[2].get("slots", args.slots) if len(b) == 3 else args.slots for b in backends]


def library_settings(args, hooks: dict, capacity: int, backends: list) -> dict:
    """Every library setting by its own name: hooks as loaded, max-queue as the descriptor
    limit allows unless it is set (one waiting client at least: a queue of none would turn
    every client away while the slots are taken). UsageError if the slots' connections would
    not fit in the descriptor limit. ``backends`` are the pool's, as the settings give them."""
    slots = pool_slots(args, backends)
    limit = (
        f"the descriptor limit of {capacity} allows: at most %d (each connection may hold "
        f"{_FDS_PER_CONNECTION} descriptors; raise the limit with ulimit -n or LimitNOFILE=)"
    )
    most = max_slots(capacity, len(slots))
    if slots == [args.slots] * len(slots) and args.slots > most:
        each = f" for each of {len(slots)} backends" if len(slots) > 1 else ""
        raise UsageError(f"--slots {args.slots}{each} is more than " + limit % most)
    if sum(slots) > max_slots(capacity, 1):
        raise UsageError(
            f"the backends' slots ({' + '.join(map(str, slots))}) are more than "
            + limit % max_slots(capacity, 1)
            + " in all"
        )
    kwargs = {
        attr: hooks[attr] if attr in hooks else getattr(args, setting.dest)
        for attr, setting in LIBRARY.items()
    }
    if kwargs["max_queue"] is None:
        status = max_status_connections(capacity) if args.status is not None else 0
        kwargs["max_queue"] = max(1, default_max_queue(capacity, sum(slots), status))
    return kwargs


def _show(value) -> str:
    """A setting's value as a reload's log line gives it."""
    if value is None:
        return "off"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return f"{value:g}s"
    if isinstance(value, tuple) and len(value) in (2, 3) and isinstance(value[1], int):
        from .backend import format_address

        own = value[2] if len(value) == 3 else {}  # a backend's own settings
        return format_address(value[:2]) + "".join(f",{k}={v}" for k, v in own.items())
    if isinstance(value, list):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    return _one_line(str(value))


#: What a reload cannot change on a running process (its listeners, and the demo backend): a
#: change is logged and the running value kept.
_FIXED = tuple(s for s in SETTINGS if not s.reload and s.name != "config")
#: The settings that name the pool (a reload's log line names the pool instead).
_POOL = ("proxy-host", "proxy-port", "backend")


class Reloader:
    """SIGHUP: read the config file and the environment again, over the command line as it was
    given, and apply what may change on a running lock (the settings whose ``reload`` is set).

    Everything is read and checked first (the settings, the --hooks file, the rules between
    them); a mistake is logged, with its file and line or its variable, and the running
    settings stay, all of them. Then the lock's settings are set (new values apply to what
    starts after: a connection already relaying keeps its lifetime), the pool is made the one
    named (:meth:`~tcplock.server.TCPLock.set_backends`: a removed backend finishes its clients
    first), and the log level and format change. A waiting client keeps its place and an
    active connection goes on. The environment of a running process cannot change, so what
    it sets, as what the command line sets, stays as it was.
    """

    def __init__(self, lock, loaded: Resolved, handler, capacity: int, extras, demo) -> None:
        import gevent.lock

        self.lock = lock
        self.args = loaded.args
        self.command_line = loaded.command_line
        self.handler = handler
        self.capacity = capacity
        self.extras = extras
        self.demo = demo
        self._one_at_a_time = gevent.lock.Semaphore()

    def __call__(self) -> None:
        with self._one_at_a_time:
            if self.lock.draining:
                return
            try:
                self.reload()
            except Exception:  # a bug, not a bad setting: the process goes on serving
                log.exception("reload failed; the running settings stay")

    def reload(self) -> bool:
        """Read and apply the settings; False (logged) if they cannot be taken."""
        old = self.args
        log.warning("reloading: reading %s and the environment", old.config or "no config file")
        try:
            resolved = resolve(self.command_line, os.environ)
            new = resolved.args
            if new.demo and self.demo is None:
                # The demo's backend starts only with tcplock, and a file that turns the demo
                # on names no other: there would be no pool to relay to.
                raise UsageError(
                    f"{resolved.sources['demo']}: demo: switching it on needs a restart"
                )
            kept = self.keep_fixed(old, new)
            hooks, token = start_checks(resolved)
            backends = None if self.demo is not None else backends_of(new)
            pool = backends or [b.address for b in self.lock.backends]
            values = library_settings(new, hooks, self.capacity, pool)
            for attr, value in values.items():
                values[attr] = validate(attr, value)
            check_together(values)
        except (ConfigError, UsageError, ValueError) as e:
            log.error("reload failed; the running settings stay: %s", _one_line(str(e)))
            return False
        for name, running in kept:
            log.warning("reload: %s stays %s: changing it needs a restart", name, running)
        for name, _address, server in self.extras:
            if name == "status":
                server.token = token
                server.max_rate = new.status_max_rate
        lock = self.lock
        for attr, value in values.items():
            setattr(lock, attr, value)
        if backends is not None:  # (named as they are: nothing changes)
            lock.set_backends(backends)
        if (new.log_level, new.log_format) != (old.log_level, old.log_format):
            self.set_logging(new.log_level, new.log_format)
        changed = [
            f"{s.name} {_show(getattr(old, s.dest))} -> {_show(getattr(new, s.dest))}"
            for s in SETTINGS
            if s.reload and s.name not in _POOL and getattr(new, s.dest) != getattr(old, s.dest)
        ]
        if backends_of(new) != backends_of(old):
            changed.append(f"backends {_show(backends_of(old))} -> {_show(backends_of(new))}")
        if new.hooks:
            changed.append(f"{new.hooks} loaded again")
        self.args = new
        log.warning("reloaded: %s", "; ".join(changed) or "no setting changed")
        return True

    def keep_fixed(self, old, new) -> list:
        """Put the running values of what a reload cannot change back into ``new``, before
        anything is made of it: what the file now says of them is never applied, nor checked
        against the rest. The (name, running value) of each the file or environment changed."""
        kept = []
        for s in _FIXED:
            if getattr(new, s.dest) != getattr(old, s.dest):
                kept.append((s.name, _show(getattr(old, s.dest))))
                setattr(new, s.dest, getattr(old, s.dest))
        if self.demo is not None:  # the demo's backend stays; so do the settings naming one
            for dest in ("proxy_host", "proxy_port", "backend"):
                setattr(new, dest, getattr(old, dest))
        return kept

    def set_logging(self, level: str, fmt: str) -> None:
        from .logs import JSONFormatter, TextFormatter

        self.handler.setFormatter(JSONFormatter() if fmt == "json" else TextFormatter())
        logging.getLogger().setLevel(getattr(logging, level.upper()))
        self.lock.connection_log = connection_log(self.handler)


def connection_log(handler):
    """The lock's writer of connection lines, if they are logged at the level set."""
    from .logs import connection_writer

    if logging.getLogger("tcplock.server").isEnabledFor(logging.INFO):
        return connection_writer(handler)
    return None


def main(argv: Optional[List[str]] = None) -> int:
    loaded, check = _read(argv, os.environ)
    args = loaded.args

    from gevent import monkey

    # Patched here, never on import: hooks written in Python may then use blocking libraries
    # (subprocess, sockets, time.sleep) without stalling the other clients.
    monkey.patch_all()
    if check:
        return check_config(loaded)

    import gevent
    from gevent.event import Event

    from .logs import setup_logging
    from .server import LOOPBACK, format_address

    try:
        hooks, token = start_checks(loaded)
    except UsageError as e:
        print(f"tcplock: error: {_one_line(str(e))}", file=sys.stderr)
        return 2
    # Batched: info lines reach the log within 0.02 s, a write() per batch (see BatchedStream).
    handler = setup_logging(args.log_level, args.log_format, batched=True)
    atexit.register(handler.flush)
    for warning in loaded.warnings:
        log.warning("%s", warning)
    demo = None
    backends = backends_of(args)
    if args.demo:
        from .demo import DemoBackend

        demo = DemoBackend(("127.0.0.1", 0))
        demo.start()
        backends = [("127.0.0.1", demo.server_port)]

    capacity = raise_descriptor_limit()
    status_connections = max_status_connections(capacity) if args.status is not None else 0
    try:
        lock = make_lock(args, hooks, capacity, backends)
    except (UsageError, ValueError) as e:  # what the parser lets through but the lock refuses
        print(f"tcplock: error: {_one_line(str(e))}", file=sys.stderr)
        return 2
    lock.max_lingering = max_lingering(capacity)
    lock.connection_log = connection_log(handler)
    if demo is not None:
        # The demo's backend runs in this process and is serving already: no check at start,
        # whose connection it would count as its first client.
        lock.backends[0].mark_up()
    # Handlers first: a supervisor may send SIGTERM as soon as it sees the first log line.
    stop = Event()
    hurry = Event()

    def on_signal():
        if stop.is_set():
            hurry.set()
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        gevent.signal_handler(sig, on_signal)
    # SIGHUP reloads (each in a greenlet of its own; one at a time), unless it was ignored
    # when tcplock started (nohup, a supervisor): then it stays ignored.
    extras = []
    reloader = Reloader(lock, loaded, handler, capacity, extras, demo)
    if signal.getsignal(signal.SIGHUP) != signal.SIG_IGN:
        gevent.signal_handler(signal.SIGHUP, reloader)
    try:
        lock.start()
    except OSError as e:
        reason = os.strerror(e.errno) if e.errno else str(e)
        print(f"tcplock: cannot listen on {format_address(args.listen)}: {reason}", file=sys.stderr)
        return 1
    try:
        if args.status is not None:
            from .status import StatusServer

            status = StatusServer(
                args.status,
                lock,
                token=token,
                max_connections=status_connections,
                max_rate=args.status_max_rate,
            )
            extras.append(("status", args.status, status))
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
        "tcplock %s listening on %s, relaying to %s, %d slot(s)%s; %s",
        __version__,
        listen,
        ", ".join(  # each with its own settings, as its --backend value gives them
            b.label + "".join(f",{k}={v}" for k, v in b.settings.items()) for b in lock.backends
        ),
        args.slots,
        " each" if len(lock.backends) > 1 else "",
        _summary(lock, hooks, args.hooks),
    )
    log.info(
        "descriptor limit %d: room for about %d waiting clients; max-queue %d",
        capacity,
        default_max_queue(capacity, sum(b.slots for b in lock.backends), status_connections),
        lock.max_queue,
    )
    if args.accept_proxy:
        trusted = lock.trusted_proxy if lock.trusted_proxy is not None else LOOPBACK
        log.info(
            "clients come through a proxy: PROXY headers taken from %s only",
            ", ".join(str(n) for n in trusted),
        )
    if args.send_proxy or args.send_proxy_v2:
        log.info("backends are sent a PROXY %s header", "v2" if args.send_proxy_v2 else "v1")
    for name, address, server in extras:
        where = format_address((address[0], server.server_port))
        if name == "status":
            where = f"http://{where}/status"
            if token is not None:
                where += ", token required but for /healthz"
        log.info("%s on %s", name, where)
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
        lock.drain_timeout,
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
