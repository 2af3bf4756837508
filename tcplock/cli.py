"""The ``tcplock`` command: options, hooks, signals and exit codes.

What it owns: turning the settings table (:mod:`tcplock.settings`) into the command line, the
config file and the ``TCPLOCK_*`` environment, and the parsed values into a running
:class:`~tcplock.server.TCPLock`; signals, systemd notification and the descriptor limit. The
rule it keeps: bad input is one line on standard error and exit status 2, never a traceback.

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
from typing import List, Optional, Sequence

import configargparse

from . import __version__
from .settings import ENV_PREFIX, LIBRARY, SETTINGS, parse_address, parse_duration

__all__ = ["main", "build_parser", "parse_args", "parse_duration", "parse_address", "ENV_PREFIX"]

log = logging.getLogger("tcplock")

#: The settings whose value is a shell command run as a hook (on-activate, on-timeout,
#: restart-cmd); a Python file given with --hooks may define the same hooks instead.
_COMMANDS = tuple(s for s in SETTINGS if s.kind == "command")


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


def _add_setting(parser: configargparse.ArgumentParser, setting) -> None:
    kwargs = dict(
        help=setting.help_text.replace("%", "%%"), default=setting.default, env_var=setting.env
    )
    if setting.action is not None:
        kwargs["action"] = setting.action
    if setting.action != "store_true":  # a flag takes no value
        kwargs.update(metavar=setting.metavar, type=setting.parse, choices=setting.choices)
    parser.add_argument(*setting.flags, **kwargs)


def build_parser() -> configargparse.ArgumentParser:
    """The parser of the command line, the config file and the environment: one option per
    setting of :data:`~tcplock.settings.SETTINGS`, in its order."""
    config = next(s for s in SETTINGS if s.name == "config")
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
        args_for_setting_config_path=list(config.flags),
        config_arg_help_message=config.help_text,
        config_arg_is_required=False,
        add_config_file_help=False,
    )
    # configargparse adds the config option itself; give it its metavar and variable.
    for action in p._actions:
        if getattr(action, "is_config_file_arg", False):
            action.metavar = config.metavar
            action.env_var = config.env
    for setting in SETTINGS:
        if setting is not config:
            _add_setting(p, setting)
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
    if args.backend:
        given = [
            flag
            for flag, given in (
                ("--proxy-host", _given(parser, "proxy_host", "--proxy-host")),
                ("-p/--proxy-port", args.proxy_port is not None),
                ("--demo", args.demo),
            )
            if given
        ]
        if given:
            parser.error(f"--backend names the backends: leave out {', '.join(given)}")
        twice = [b for i, b in enumerate(args.backend) if b in args.backend[:i]]
        if twice:
            host, port = twice[0]
            shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            parser.error(f"--backend {shown} is given twice")
    if args.demo:
        if args.proxy_port is not None:
            parser.error("--demo relays to its own backend: leave out -p/--proxy-port")
        if args.backend_cmd:
            parser.error("--demo relays to its own backend: leave out --backend-cmd")
        if args.listen is None:
            args.listen = ("127.0.0.1", 9000)
    else:
        missing = [
            "/".join(s.flags)
            for s in SETTINGS
            if s.required
            and getattr(args, s.dest) is None
            and not (s.name == "proxy-port" and args.backend)
        ]
        if missing:
            parser.error("the following arguments are required: " + ", ".join(missing))
    if args.backend_cmd and args.restart_cmd:
        parser.error(
            "--backend-cmd and --restart-cmd exclude each other: tcplock restarts the backends "
            "it runs"
        )
    if (args.restart_every or args.restart_on_timeout) and not (
        args.restart_cmd or args.hooks or args.backend_cmd
    ):
        parser.error(
            "--restart-every and --restart-on-timeout need --backend-cmd or --restart-cmd "
            "(or a restart() in --hooks)"
        )
    if args.restart_above_rss is not None and not args.backend_cmd:
        parser.error("--restart-above-rss needs --backend-cmd (a backend tcplock runs)")
    return args


def _given(parser, dest: str, flag: str) -> bool:
    """Whether a setting with a default was set at all: on the command line, in the
    environment or in a config file."""
    for source, entries in parser.get_source_to_settings_dict().items():
        if source == "defaults":
            continue
        for _key, (action, value) in entries.items():
            if source == "command_line":
                if any(arg == flag or arg.startswith(flag + "=") for arg in value):
                    return True
            elif action is not None and action.dest == dest:
                return True
    return False


def load_hooks(args) -> dict:
    """The hooks to use: shell commands from the options, Python functions from --hooks.

    The Python file is run once, at start-up, so that a mistake in it is reported before the
    first client arrives. Raises UsageError with a one-line message.
    """
    from .hooks import CommandHook

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
        raise UsageError(f"--hooks: no such file: {args.hooks}") from None
    except SyntaxError as e:
        raise UsageError(f"--hooks: {args.hooks}, line {e.lineno}: {e.msg}") from None
    except BaseException as e:  # the file's own code failed: report it, do not crash
        raise UsageError(f"--hooks: {args.hooks} failed to load: {type(e).__name__}: {e}") from None
    found = 0
    for setting in _COMMANDS:
        name, flag = setting.attr, setting.flags[-1]
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
        names = ", ".join(s.attr for s in _COMMANDS)
        raise UsageError(f"--hooks: {args.hooks} defines none of {names}")
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


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv, env=os.environ)

    from gevent import monkey

    # Patched here, never on import: hooks written in Python may then use blocking libraries
    # (subprocess, sockets, time.sleep) without stalling the other clients.
    monkey.patch_all()

    import gevent
    from gevent.event import Event

    from .logs import connection_writer, setup_logging
    from .server import TCPLock, format_address

    try:
        hooks = load_hooks(args)
    except UsageError as e:
        print(f"tcplock: error: {_one_line(str(e))}", file=sys.stderr)
        return 2
    if args.backend_cmd and hooks["restart"] is not None:
        print(
            f"tcplock: error: {args.hooks} defines restart(), and --backend-cmd is given: "
            "tcplock restarts the backends it runs",
            file=sys.stderr,
        )
        return 2
    if (
        (args.restart_every or args.restart_on_timeout)
        and hooks["restart"] is None
        and not args.backend_cmd
    ):
        print(
            f"tcplock: error: {args.hooks} defines no restart(reason), which "
            "--restart-every and --restart-on-timeout need",
            file=sys.stderr,
        )
        return 2
    # Batched: info lines reach the log within 0.02 s, a write() per batch (see BatchedStream).
    handler = setup_logging(args.log_level, args.log_format, batched=True)
    atexit.register(handler.flush)
    demo = None
    backends = args.backend or [(args.proxy_host, args.proxy_port)]
    if args.demo:
        from .demo import DemoBackend

        demo = DemoBackend(("127.0.0.1", 0))
        demo.start()
        backends = [("127.0.0.1", demo.server_port)]

    capacity = raise_descriptor_limit()
    # Every library setting by its own name; hooks as loaded, max-queue as the limit allows.
    kwargs = {
        attr: hooks[attr] if attr in hooks else getattr(args, setting.dest)
        for attr, setting in LIBRARY.items()
    }
    if kwargs["max_queue"] is None:
        kwargs["max_queue"] = default_max_queue(capacity, args.slots * len(backends))
    try:
        lock = TCPLock(args.listen, backends=backends, **kwargs)
    except ValueError as e:  # what the parser lets through but the lock refuses
        print(f"tcplock: error: {_one_line(str(e))}", file=sys.stderr)
        return 2
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
        "tcplock %s listening on %s, relaying to %s, %d slot(s)%s",
        __version__,
        listen,
        ", ".join(b.label for b in lock.backends),
        args.slots,
        " each" if len(lock.backends) > 1 else "",
    )
    log.info(
        "descriptor limit %d: room for about %d waiting clients; max-queue %d",
        capacity,
        default_max_queue(capacity, args.slots * len(lock.backends)),
        kwargs["max_queue"],
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
