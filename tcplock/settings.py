"""Every setting of tcplock, declared once.

What it owns: the table :data:`SETTINGS`. Each :class:`Setting` there is at once the
command-line option (flags, metavar, the parser of its text, its help), the config-file key
(the long option without its dashes), the ``TCPLOCK_*`` environment variable, the library's
keyword argument and its validation (:func:`validate`), its default (:func:`default`), and its
row in the README's settings table and its entry in ``contrib/tcplock.conf``, both printed from
here (``python -m tcplock.settings --markdown`` / ``--conf``) and checked in full by a test.

The rule it keeps: the library takes what the command line takes. A duration the command line
lets be ``off`` is ``None`` ("no limit") in the library; one it does not, the library refuses
``None`` too. Anything else invalid (negative, NaN, infinite, a bool, a string, the wrong type)
is a :class:`ValueError` whose message starts with the setting's name, never a TypeError.

Importing this module loads no gevent module and starts nothing.
"""

from __future__ import annotations

import argparse
import ipaddress
import math
import numbers
import re
import textwrap
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple

__all__ = [
    "Setting",
    "SETTINGS",
    "LIBRARY",
    "ENV_PREFIX",
    "validate",
    "default",
    "check_together",
    "parse_duration",
    "parse_size",
    "format_size",
    "parse_address",
    "parse_backend",
    "check_backend_options",
    "PER_BACKEND",
    "parse_port",
    "render_markdown",
    "render_conf",
]

ENV_PREFIX = "TCPLOCK_"

# -- parsers of text (command line, config file, environment) ----------------------------------
# Each raises argparse.ArgumentTypeError with a one-line message; the parser names the option.

#: The longest duration any setting takes, in seconds (about 31 years).
MAX_SECONDS = 10**9
#: Duration units, longest first: a duration names each at most once, in this order.
_UNITS = {"d": 86400.0, "h": 3600.0, "m": 60.0, "min": 60.0, "s": 1.0, "ms": 0.001}
_NUMBER = r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)"
_PART = re.compile(rf"({_NUMBER})\s*(ms|min|d|h|m|s)\s*", re.IGNORECASE | re.ASCII)
_BARE = re.compile(rf"\s*({_NUMBER})\s*")
_OFF = ("off", "none", "never")
_DURATION_HINT = "use e.g. 500ms, 20s, 1m30s, 5min, 1h30m, 2d"


def _seconds(text: str) -> Optional[float]:
    """The seconds ``text`` says (a bare number, or parts such as ``1h30m`` with each unit at
    most once, longest first), or None if it is not a duration."""
    bare = _BARE.fullmatch(text)
    if bare:
        return float(bare.group(1))
    pos, total, last = len(text) - len(text.lstrip()), 0.0, None
    order = ("d", "h", "m", "s", "ms")
    while pos < len(text):
        m = _PART.match(text, pos)
        if not m:
            return None
        unit = m.group(2).lower()
        rank = order.index("m" if unit == "min" else unit)
        if last is not None and rank <= last:
            return None  # "30s1m", "1m1m": each unit once, longest first
        total += float(m.group(1)) * _UNITS[unit]
        pos, last = m.end(), rank
    return total if last is not None else None


def parse_duration(text: str, *, allow_off: bool = False, allow_zero: bool = False):
    """A duration as operators write it: ``500ms``, ``20s``, ``1m30s``, ``5min``, ``1h30m``,
    ``2d``, ``1.5s``, or a bare number of seconds; ``off`` where allowed."""
    if allow_off and text.strip().lower() in _OFF:
        return None
    value = _seconds(text)
    if value is None:
        extra = " or 'off'" if allow_off else ""
        raise argparse.ArgumentTypeError(
            f"invalid duration {_shown(text)} ({_DURATION_HINT}{extra})"
        )
    if value > MAX_SECONDS:
        raise argparse.ArgumentTypeError(f"duration {_shown(text)} is too long")
    if value == 0 and not allow_zero:
        hint = " (use 'off' for no limit)" if allow_off else ""
        raise argparse.ArgumentTypeError(f"duration must be more than zero{hint}")
    return value


#: The largest size any setting takes, in bytes (1 EiB).
MAX_BYTES = 1 << 60
_SIZE_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_SIZE = re.compile(
    r"\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*(?:([kmgt])(?:i?b)?|(b))?\s*", re.IGNORECASE | re.ASCII
)


def parse_size(text: str, *, allow_off: bool = True) -> Optional[int]:
    """A number of bytes: ``800M``, ``2G``, ``1.5G``, ``512K``, ``1T`` (binary multiples:
    1K is 1024 bytes; ``800MB`` and ``800MiB`` read the same) or a bare number of bytes;
    ``off`` where allowed."""
    if allow_off and text.strip().lower() in _OFF:
        return None
    m = _SIZE.fullmatch(text)
    if not m:
        extra = " or 'off'" if allow_off else ""
        raise argparse.ArgumentTypeError(
            f"invalid size {text!r} (use e.g. 800M, 2G, 512K or a number of bytes{extra})"
        )
    unit = (m.group(2) or m.group(3) or "").lower()
    value = float(m.group(1)) * _SIZE_UNITS[unit]
    if value > MAX_BYTES:
        raise argparse.ArgumentTypeError(f"size {text!r} is too large")
    if int(value) < 1:
        raise argparse.ArgumentTypeError("size must be at least one byte (use 'off' for no limit)")
    return int(value)


def _size(text: str) -> Optional[int]:
    return parse_size(text)


_size.__name__ = "size"


def format_size(value: int) -> str:
    """Bytes as people read them: ``812.4 MiB``, ``2.0 GiB``, ``512 B``."""
    for unit, scale in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if value >= scale:
            return f"{value / scale:.1f} {unit}"
    return f"{value} B"


def _shell(text: str) -> str:
    """A shell command: any text but an empty one."""
    if not text.strip():
        raise argparse.ArgumentTypeError("the command is empty")
    return text


_shell.__name__ = "shell"


def _duration(**kw):
    def parse(text: str):
        return parse_duration(text, **kw)

    parse.__name__ = "duration"
    return parse


#: The largest count any setting takes (slots, max-queue, restart-every).
MAX_COUNT = 10**9
_INTEGER = re.compile(r"(-?)0*([0-9]+)")


def parse_integer(text: str, minimum: int, maximum: int, what: str = "number") -> int:
    """A whole number as operators write it: ASCII digits only (no ``+``, no ``_``, no
    exponent, no other script's digits), from ``minimum`` (at least 0) to ``maximum``; a ``-``
    is read only to say that the number is too small. Every count and every port is read by
    this one parser."""
    text = text.strip()
    m = _INTEGER.fullmatch(text)
    if m is None:
        raise argparse.ArgumentTypeError(f"invalid {what} {_shown(text)}")
    sign, digits = m.groups()
    # Its length first: a number of thousands of digits is never converted.
    negative = sign == "-" and digits != "0"
    high = not negative and (len(digits) > len(str(maximum)) or int(digits) > maximum)
    low = negative or (not high and int(digits) < minimum)
    if not (high or low):
        return int(digits)
    shown = sign + (digits if len(digits) <= 30 else digits[:27] + "...")
    if what == "number":
        bound = f"at least {minimum}" if low else f"at most {maximum}"
        raise argparse.ArgumentTypeError(f"must be {bound}, not {shown}")
    raise argparse.ArgumentTypeError(f"{what} {shown} is out of range ({minimum}-{maximum})")


def parse_port(text: str, *, allow_zero: bool = False) -> int:
    return parse_integer(text, 0 if allow_zero else 1, 65535, "port")


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


def parse_backend(text: str):
    """``HOST:PORT`` or ``[IPV6]:PORT``: a backend's address, with its host, then the backend's
    own settings, if any, after commas (``127.0.0.1:2002,slots=2``): ``(host, port)``, or
    ``(host, port, {attr: value})`` with settings of its own."""
    address, *parts = text.split(",")
    host, port = _backend_address(address)
    if not parts:
        return host, port
    options: Dict[str, Any] = {}
    for part in parts:
        name, sep, value = part.strip().partition("=")
        setting = PER_BACKEND.get(name.strip())
        if not sep or setting is None:
            known = ", ".join(f"{n}=VALUE" for n in PER_BACKEND)
            raise argparse.ArgumentTypeError(
                f"invalid backend option {_shown(part.strip())} in {_shown(text.strip())} "
                f"(a backend takes {known})"
            )
        if setting.attr in options:
            raise argparse.ArgumentTypeError(
                f"backend option {name.strip()} is given twice in {_shown(text.strip())}"
            )
        try:
            options[setting.attr] = setting.parse(value)
        except argparse.ArgumentTypeError as e:
            raise argparse.ArgumentTypeError(
                f"backend option {name.strip()} in {_shown(text.strip())}: {e}"
            ) from None
    return host, port, options


def _backend_address(text: str) -> Tuple[str, int]:
    host, port = parse_address(text, default_host="")
    if not host:
        raise argparse.ArgumentTypeError(f"invalid backend {text.strip()!r} (use HOST:PORT)")
    if port == 0:
        raise argparse.ArgumentTypeError(f"invalid backend {text.strip()!r} (port 0)")
    return host, port


def check_backend_options(options) -> Dict[str, Any]:
    """A library backend's own settings, ``{attr: value}`` (the attrs of :data:`PER_BACKEND`),
    each checked as the setting itself is; ValueError naming the option otherwise."""
    if not isinstance(options, dict):
        raise ValueError(f"backend settings must be a dict, not {_shown(options)}")
    checked = {}
    for attr, value in options.items():
        if not any(s.attr == attr for s in PER_BACKEND.values()):
            known = ", ".join(s.attr for s in PER_BACKEND.values())
            raise ValueError(f"{_shown(attr)} is not a backend's own setting (one of: {known})")
        checked[attr] = validate(attr, value)
    return checked


def parse_proxy_port(text: str):
    """``PORT``, or ``HOST:PORT`` / ``[IPV6]:PORT`` naming the backend's host as well (as a
    (host, port) pair, which the command splits into --proxy-host and --proxy-port)."""
    if ":" in text:
        return _backend_address(text)
    return parse_port(text)


def _count(minimum: int):
    def parse(text: str) -> int:
        return parse_integer(text, minimum, MAX_COUNT)

    parse.__name__ = "number"
    return parse


def _host(text: str) -> str:
    """A host name or address, without a port (``[IPV6]`` in brackets or not): a host with a
    port would otherwise be looked up as a name, and fail only when the first client comes."""
    text = text.strip()
    bracketed = text.startswith("[")
    if (bracketed and "]:" in text) or (not bracketed and text.count(":") == 1):
        if text.rpartition(":")[2].strip():
            raise argparse.ArgumentTypeError(
                f"{text!r} has a port: use --proxy-port HOST:PORT or --backend HOST:PORT instead"
            )
        raise argparse.ArgumentTypeError(f"invalid host {text!r}")
    if bracketed and text.endswith("]"):
        text = text[1:-1]
    if not text or any(c.isspace() for c in text):
        raise argparse.ArgumentTypeError(f"invalid host {text!r}")
    return text


def _network(text: str):
    try:
        return ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid network {text!r} (use e.g. 10.0.0.0/8, 192.168.1.5 or ::1/128)"
        ) from None


# -- checks of Python values (the library) ------------------------------------------------------
# Each returns the value normalised, or raises ValueError with a message that follows the
# setting's name ("must be ..."); validate() puts the name in front. They test types before
# comparing, so that no input raises anything but ValueError.


def _shown(value) -> str:
    """``repr(value)``, short, and never failing (a huge int or a broken __repr__ would)."""
    try:
        text = repr(value)
    except Exception:
        text = f"<a {type(value).__name__}>"
    return text if len(text) <= 60 else text[:57] + "..."


def _check_duration(off: bool, zero: bool) -> Callable[[Any], Optional[float]]:
    what = "0 or a positive number of seconds" if zero else "a positive number of seconds"
    if off:
        what += ", or None for no limit"

    def check(value):
        if value is None and off:
            return None
        if isinstance(value, numbers.Real) and not isinstance(value, bool):
            try:
                seconds = float(value)
            except Exception:  # a Real too large for a float, or one that refuses
                seconds = math.inf
            if math.isfinite(seconds) and (seconds > 0 or (zero and seconds == 0)):
                if seconds <= MAX_SECONDS:
                    return seconds
                raise ValueError(f"must be at most {MAX_SECONDS} seconds, not {_shown(value)}")
        raise ValueError(f"must be {what}, not {_shown(value)}")

    return check


def _check_count(minimum: int, none: Optional[str]) -> Callable[[Any], Optional[int]]:
    what = f"a whole number from {minimum} to {MAX_COUNT}"
    if none:
        what += f", or None for {none}"

    def check(value):
        if value is None and none:
            return None
        if isinstance(value, numbers.Integral) and not isinstance(value, bool):
            if minimum <= value <= MAX_COUNT:
                return int(value)
        raise ValueError(f"must be {what}, not {_shown(value)}")

    return check


def _check_size(value):
    if value is None:
        return None
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        if 1 <= value <= MAX_BYTES:
            return int(value)
    raise ValueError(
        f"must be a number of bytes from 1 to 2**60, or None for no limit, not {_shown(value)}"
    )


def _check_shell(value):
    if value is None:
        return None
    if isinstance(value, str) and value.strip() and "\0" not in value:
        return value
    raise ValueError(f"must be a shell command (a non-empty string) or None, not {_shown(value)}")


def _check_bool(value):
    if isinstance(value, bool):
        return value
    raise ValueError(f"must be True or False, not {_shown(value)}")


def _check_hook(value):
    if value is None or callable(value):
        return value
    raise ValueError(f"must be a callable or None, not {_shown(value)}")


_NETWORK_TYPES = (
    ipaddress.IPv4Network,
    ipaddress.IPv6Network,
    ipaddress.IPv4Address,
    ipaddress.IPv6Address,
)


def _check_networks(value):
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise ValueError(
            f"must be an iterable of networks (e.g. ['10.0.0.0/8']) or None, not {_shown(value)}"
        )
    try:
        items = list(value)
    except Exception:  # an iterable that fails to iterate
        raise ValueError(f"must be an iterable of networks or None, not {_shown(value)}") from None
    networks = []
    for item in items:
        try:
            if isinstance(item, _NETWORK_TYPES):
                networks.append(ipaddress.ip_network(item, strict=False))
                continue
            if isinstance(item, str):
                networks.append(ipaddress.ip_network(item.strip(), strict=False))
                continue
        except ValueError:
            pass
        raise ValueError(
            f"has an invalid network {_shown(item)} (use e.g. 10.0.0.0/8, 192.168.1.5 or ::1/128)"
        )
    return tuple(networks)


# -- how a value reads as text (help, README, sample config) -----------------------------------


def _show_duration(value) -> str:
    return "off" if value is None else f"{value:g}s"


def _show_flag(value) -> str:
    return "on" if value else "off"


# -- the table ---------------------------------------------------------------------------------

#: The groups of settings, in the order of ``--help``, the README and the sample config.
GROUPS: Tuple[str, ...] = (
    "general",
    "listening",
    "backends",
    "limits and timeouts",
    "hooks",
    "restarts",
    "supervised backends",
    "status",
    "logging",
    "PROXY protocol",
)


@dataclass(frozen=True)
class Setting:
    """One setting. ``name`` is the config-file key and the long option without its dashes."""

    #: The long option without its dashes, e.g. ``"queue-timeout"``: the config-file key.
    name: str
    #: The option strings, e.g. ``("-t", "--timeout")``; the last is ``--`` + name.
    flags: Tuple[str, ...]
    #: What it does, in one line, without its default (:attr:`help_text` adds that).
    help: str
    #: What the value is: duration, count, size, address, port, host, networks, command (a
    #: hook: a shell command or, in the library, a callable), shell (a shell command that
    #: is not a hook), file, choice or flag.
    kind: str
    #: The TCPLock keyword argument and attribute, or None for a setting of the command only.
    attr: Optional[str] = None
    metavar: Optional[str] = None
    #: Text (command line, config file, environment) to value; None keeps the text as it is.
    parse: Optional[Callable[[str], Any]] = None
    #: A library value to its normalised form; raises ValueError (see :func:`validate`).
    check: Optional[Callable[[Any], Any]] = None
    #: The library's default (the command's too, unless ``shown`` says otherwise).
    default: Any = None
    #: How the default reads, in words, where it is not a value that could be written.
    shown: Optional[str] = None
    #: A value for the sample config, where the default is not one worth showing.
    example: Optional[str] = None
    #: The argparse action, for flags ("store_true") and repeatable options ("append").
    action: Optional[str] = None
    choices: Optional[Tuple[str, ...]] = None
    #: Needed by the command (unless --demo).
    required: bool = False
    #: Whether it may be changed on a running lock.
    reload: bool = False
    #: Whether a backend may have its own value, written in its ``--backend`` value as
    #: ``HOST:PORT,name=value`` (the backend reads it from :attr:`Backend.settings`).
    per_backend: bool = False
    #: Its group in ``--help``, the README and the sample config: one of :data:`GROUPS`.
    group: str = ""

    def __post_init__(self) -> None:
        if self.group not in GROUPS:
            raise ValueError(f"setting {self.name}: group {self.group!r} is not in GROUPS")

    @property
    def dest(self) -> str:
        """The attribute argparse stores it under."""
        return self.name.replace("-", "_")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper().replace("-", "_")

    @property
    def default_text(self) -> Optional[str]:
        """The default as the docs give it; None where there is none."""
        if self.required:
            return None
        if self.shown is not None:
            return self.shown
        if self.kind == "duration":
            return _show_duration(self.default)
        if self.kind == "flag":
            return _show_flag(self.default)
        if self.kind in ("address", "size") and self.default is None:
            return "off"  # an address not given is a server not started; a size, no limit
        return None if self.default is None else str(self.default)

    @property
    def help_text(self) -> str:
        """The help with its default, as ``--help`` and the sample config give it."""
        if self.required:
            return f"{self.help} (required)"
        shown = self.default_text
        return self.help if shown is None else f"{self.help} (default: {shown})"

    @property
    def sample(self) -> str:
        """The value the sample config shows."""
        if self.example is not None:
            return self.example
        return self.default_text or ""


def _duration_setting(name, flags, *, off=False, zero=False, **kw) -> Setting:
    return Setting(
        name,
        flags,
        kind="duration",
        metavar="DURATION",
        parse=_duration(allow_off=off, allow_zero=zero),
        check=_check_duration(off, zero),
        reload=True,
        **kw,
    )


def _flag_setting(name, help, attr, **kw) -> Setting:
    """An on/off setting of the library, off by default, that a reload may change."""
    kw.setdefault("example", "on")
    return Setting(
        name,
        ("--" + name,),
        help,
        kind="flag",
        attr=attr,
        check=_check_bool,
        default=False,
        action="store_true",
        reload=True,
        **kw,
    )


def _command_setting(name, attr, help, example, **kw) -> Setting:
    return Setting(
        name,
        (f"--{name}",),
        help,
        kind="command",
        attr=attr,
        metavar="CMD",
        check=_check_hook,
        example=example,
        reload=True,
        **kw,
    )


def _shell_setting(name, attr, help, example, reload, **kw) -> Setting:
    return Setting(
        name,
        (f"--{name}",),
        help,
        kind="shell",
        attr=attr,
        metavar="CMD",
        parse=_shell,
        check=_check_shell,
        example=example,
        reload=reload,
        **kw,
    )


_ADDRESS = dict(kind="address", metavar="[HOST:]PORT", parse=parse_address)

#: Every setting; ``--help`` and the docs give them by group (:func:`grouped`), each group in
#: this order.
SETTINGS: Tuple[Setting, ...] = (
    Setting(
        "config",
        ("-c", "--config"),
        "read settings from FILE (lines of 'name = value')",
        kind="file",
        metavar="FILE",
        group="general",
    ),
    Setting(
        "listen",
        ("-l", "--listen"),
        "where clients connect; a bare PORT listens on 127.0.0.1 only",
        required=True,
        example="9000",
        **_ADDRESS,
        group="listening",
    ),
    Setting(
        "proxy-host",
        ("--proxy-host",),
        "host of the backend service",
        kind="host",
        metavar="HOST",
        parse=_host,
        default="localhost",
        reload=True,
        group="backends",
    ),
    Setting(
        "proxy-port",
        ("-p", "--proxy-port"),
        "port of the backend service, or HOST:PORT for its host and port (then without "
        "--proxy-host)",
        kind="port",
        metavar="[HOST:]PORT",
        parse=parse_proxy_port,
        required=True,
        example="2003",
        reload=True,
        group="backends",
    ),
    Setting(
        "backend",
        ("--backend",),
        "a backend of the pool, as HOST:PORT ([IPV6]:PORT), then settings of its own after "
        "commas (HOST:PORT,slots=2); repeatable: one queue in front of them all",
        kind="addresses",
        metavar="HOST:PORT[,NAME=VALUE]",
        parse=parse_backend,
        action="append",
        shown="the one of --proxy-host and --proxy-port",
        example="[127.0.0.1:2003, 127.0.0.1:2004]",
        reload=True,
        group="backends",
    ),
    Setting(
        "slots",
        ("-n", "--slots"),
        "how many clients each backend takes at once (one backend's own: --backend "
        "HOST:PORT,slots=N)",
        kind="count",
        attr="slots",
        metavar="N",
        parse=_count(1),
        check=_check_count(1, None),
        default=1,
        reload=True,
        per_backend=True,
        group="backends",
    ),
    _duration_setting(
        "timeout",
        ("-t", "--timeout"),
        help="maximum lifetime of a relayed connection; then both sides are cut",
        attr="timeout",
        off=True,
        group="limits and timeouts",
    ),
    _duration_setting(
        "queue-timeout",
        ("--queue-timeout",),
        help="close a client that has waited this long for a slot",
        attr="queue_timeout",
        off=True,
        group="limits and timeouts",
    ),
    Setting(
        "max-queue",
        ("--max-queue",),
        "close at once a client arriving when N are already waiting",
        kind="count",
        attr="max_queue",
        metavar="N",
        parse=_count(0),
        check=_check_count(0, "no limit"),
        shown="as many as the descriptor limit leaves room for",
        example="1000",
        reload=True,
        group="limits and timeouts",
    ),
    Setting(
        "allow",
        ("--allow",),
        "admit only clients from this network (repeatable, e.g. 10.0.0.0/8 or ::1/128); "
        "others are closed at once",
        kind="networks",
        attr="allow",
        metavar="CIDR",
        parse=_network,
        check=_check_networks,
        action="append",
        shown="any client that reaches --listen",
        example="[127.0.0.0/8, ::1/128, 10.1.2.0/24]",
        reload=True,
        group="listening",
    ),
    _flag_setting(
        "accept-proxy",
        "clients arrive through a proxy that sends a PROXY protocol header (v1 or v2): the "
        "client address it gives is used for the log, --allow, hooks and status; a connection "
        "without a valid header is closed",
        "accept_proxy",
        group="PROXY protocol",
    ),
    Setting(
        "trusted-proxy",
        ("--trusted-proxy",),
        "with --accept-proxy, take headers only from peers in this network (repeatable); a "
        "connection from elsewhere is closed unread",
        kind="networks",
        attr="trusted_proxy",
        metavar="CIDR",
        parse=_network,
        check=_check_networks,
        action="append",
        shown="loopback (127.0.0.0/8, ::1/128)",
        example="[127.0.0.1/32, 10.0.0.5/32]",
        reload=True,
        group="PROXY protocol",
    ),
    _duration_setting(
        "proxy-header-timeout",
        ("--proxy-header-timeout",),
        help="with --accept-proxy, close a connection whose header is not complete within this "
        "time",
        attr="proxy_header_timeout",
        default=5.0,
        group="PROXY protocol",
    ),
    _flag_setting(
        "send-proxy",
        "send a PROXY protocol v1 header to the backend on each connection, with the client's "
        "address",
        "send_proxy",
        group="PROXY protocol",
    ),
    _flag_setting(
        "send-proxy-v2",
        "the same with a v2 (binary) header; not together with --send-proxy",
        "send_proxy_v2",
        example=None,
        group="PROXY protocol",
    ),
    _duration_setting(
        "connect-timeout",
        ("--connect-timeout",),
        help="keep retrying the backend connection this long",
        attr="connect_timeout",
        default=5.0,
        group="backends",
    ),
    _duration_setting(
        "check-interval",
        ("--check-interval",),
        help="how often a backend that is down is checked with a TCP connect; it rejoins the "
        "pool when it answers",
        attr="check_interval",
        default=2.0,
        group="backends",
    ),
    _duration_setting(
        "finish-timeout",
        ("--finish-timeout",),
        help="how long the backend may go on after the client reset; what it sends is discarded",
        attr="finish_timeout",
        zero=True,
        default=10.0,
        group="limits and timeouts",
    ),
    _duration_setting(
        "client-finish-timeout",
        ("--client-finish-timeout",),
        help="how long the client may keep its side open after the backend closed (a backend "
        "on loopback that closed for good passes the slot on at once); 0 passes the slot on "
        "as soon as the backend closes, for backends that never half-close to go on reading",
        attr="client_finish_timeout",
        zero=True,
        default=10.0,
        group="limits and timeouts",
    ),
    _command_setting(
        "on-activate",
        "on_activate",
        "shell command run before each client is let through; it waits for the command",
        "/usr/local/bin/check-backend",
        group="hooks",
    ),
    _command_setting(
        "on-timeout",
        "on_timeout",
        "shell command run after a connection was cut at its timeout, before the next "
        "client is let through",
        "systemctl restart unoserver",
        group="hooks",
    ),
    _duration_setting(
        "hook-timeout",
        ("--hook-timeout",),
        help="a hook running longer than this is killed and counts as failed",
        attr="hook_timeout",
        off=True,
        default=60.0,
        group="hooks",
    ),
    _command_setting(
        "restart-cmd",
        "restart",
        "shell command that restarts the backend; run while no client is relayed",
        "systemctl restart unoserver",
        group="restarts",
    ),
    Setting(
        "restart-every",
        ("--restart-every",),
        "restart the backend after every K clients, before the next",
        kind="count",
        attr="restart_every",
        metavar="K",
        parse=_count(1),
        check=_check_count(1, "never"),
        shown="never",
        example="50",
        reload=True,
        group="restarts",
    ),
    _flag_setting(
        "restart-on-timeout",
        "restart the backend after a connection was cut at its timeout",
        "restart_on_timeout",
        group="restarts",
    ),
    _duration_setting(
        "ready-timeout",
        ("--ready-timeout",),
        help="after a restart (or a start of --backend-cmd), wait this long for the backend to "
        "be ready before letting the next client in; if it is not, the restart is retried",
        attr="ready_timeout",
        off=True,
        default=30.0,
        group="restarts",
    ),
    _shell_setting(
        "backend-cmd",
        "backend_cmd",
        "shell command that runs a backend, started by tcplock for each backend (environment: "
        "TCPLOCK_BACKEND_HOST, _PORT, _INDEX) and restarted when a restart is due or it exits; "
        "replaces --restart-cmd",
        "unoserver --port $TCPLOCK_BACKEND_PORT",
        reload=False,
        group="supervised backends",
    ),
    _shell_setting(
        "ready-cmd",
        "ready_cmd",
        "shell command that tells whether a backend is ready (exit status 0), tried every "
        "0.5s after a start or restart and by the check of a backend that is down; without "
        "it, ready means accepting a TCP connection",
        "unoping --port $TCPLOCK_BACKEND_PORT",
        reload=True,
        group="restarts",
    ),
    Setting(
        "restart-above-rss",
        ("--restart-above-rss",),
        "restart a --backend-cmd backend before its next client once its processes use more "
        "memory than this (resident, summed over its process group), e.g. 800M or 2G",
        kind="size",
        attr="restart_above_rss",
        metavar="SIZE",
        parse=_size,
        check=_check_size,
        example="800M",
        reload=True,
        group="supervised backends",
    ),
    _duration_setting(
        "stop-timeout",
        ("--stop-timeout",),
        help="when a --backend-cmd backend is stopped (a restart, tcplock stopping), how long "
        "its process group has after SIGTERM before it gets SIGKILL",
        attr="stop_timeout",
        zero=True,
        default=10.0,
        group="supervised backends",
    ),
    Setting(
        "spares",
        ("--spares",),
        "with --backend-cmd: keep N of the backends started and ready but out of service, as "
        "standbys; when a backend in service must restart (or its command ends), a ready "
        "standby takes its place at once, and the restarted one becomes a standby",
        kind="count",
        attr="spares",
        metavar="N",
        parse=_count(0),
        check=_check_count(0, None),
        default=0,
        reload=True,
        group="supervised backends",
    ),
    Setting(
        "hooks",
        ("--hooks",),
        "Python file defining on_activate(conn), on_timeout(conn) and/or restart(reason) "
        "(or restart(reason, backend))",
        kind="file",
        metavar="FILE.py",
        example="/etc/tcplock/hooks.py",
        reload=True,
        group="hooks",
    ),
    _duration_setting(
        "drain-timeout",
        ("--drain-timeout",),
        help="on SIGTERM/SIGINT, how long active connections may finish",
        attr="drain_timeout",
        zero=True,
        default=10.0,
        group="limits and timeouts",
    ),
    Setting(
        "status",
        ("--status",),
        "serve GET / (a status page for a browser), GET /healthz, GET /status (JSON), GET "
        "/metrics (Prometheus), POST /pause, POST /resume and POST /backends/HOST:PORT/drain "
        "or /enable over HTTP here; a bare PORT is on 127.0.0.1",
        example="9100",
        **_ADDRESS,
        group="status",
    ),
    Setting(
        "status-token-file",
        ("--status-token-file",),
        "make every --status endpoint but /healthz require 'Authorization: Bearer TOKEN', "
        "TOKEN being the content of FILE; FILE must be its owner's only (chmod 600)",
        kind="file",
        metavar="FILE",
        example="/etc/tcplock/status-token",
        reload=True,
        group="status",
    ),
    Setting(
        "status-max-rate",
        ("--status-max-rate",),
        "how many requests a second the --status endpoint answers; as many more that second "
        "get 429 (Retry-After: 1), then it accepts no more until the second is over",
        kind="count",
        metavar="N",
        parse=_count(1),
        default=200,
        reload=True,
        group="status",
    ),
    Setting(
        "agent-check",
        ("--agent-check",),
        "answer HAProxy's agent-check here: 'down' when no backend is up, 'drain' while "
        "paused, stopping or no backend takes clients, else 'up ready' with a weight that "
        "falls as the load grows",
        example="9101",
        **_ADDRESS,
        group="status",
    ),
    Setting(
        "log-level",
        ("--log-level",),
        "debug, info (one line per connection), warning or error",
        kind="choice",
        metavar="LEVEL",
        parse=str.lower,
        choices=("debug", "info", "warning", "error"),
        default="info",
        reload=True,
        group="logging",
    ),
    Setting(
        "log-format",
        ("--log-format",),
        "text, or json for one JSON object per line with the same fields",
        kind="choice",
        metavar="FORMAT",
        parse=str.lower,
        choices=("text", "json"),
        default="text",
        reload=True,
        group="logging",
    ),
    Setting(
        "demo",
        ("--demo",),
        "start a bundled demo backend and relay to it, instead of --proxy-port",
        kind="flag",
        default=False,
        action="store_true",
        group="backends",
    ),
)

#: The settings a backend may have its own value of, by name (see :func:`parse_backend`).
PER_BACKEND: Dict[str, Setting] = {s.name: s for s in SETTINGS if s.per_backend}


def grouped():
    """(group, its settings) for each of :data:`GROUPS`, in order."""
    return [(g, [s for s in SETTINGS if s.group == g]) for g in GROUPS]


#: The settings of the library, by TCPLock keyword argument.
LIBRARY: Dict[str, Setting] = {s.attr: s for s in SETTINGS if s.attr is not None}


def default(attr: str):
    """The library's default for the keyword argument ``attr`` (KeyError for no such one)."""
    return LIBRARY[attr].default


def validate(attr: str, value):
    """``value`` for the library setting ``attr``, normalised (a duration as a float, ``allow``
    as a tuple of networks); ValueError, naming the setting, if the command line would not
    take it either."""
    setting = LIBRARY.get(attr) if isinstance(attr, str) else None
    if setting is None:
        raise ValueError(f"{_shown(attr)} is not a setting of TCPLock")
    try:
        return setting.check(value)
    except ValueError as e:
        raise ValueError(f"{attr} {e}") from None


def check_together(values: Dict[str, Any]) -> None:
    """The rules between settings: restarting after a count or a timeout needs a restart (a
    callable, or a backend tcplock runs itself); a backend tcplock runs is restarted by
    tcplock, not by a restart callable; a memory limit and spares need a backend tcplock runs;
    one PROXY header version at most is sent."""
    supervised = values.get("backend_cmd") is not None
    if supervised and values.get("restart") is not None:
        raise ValueError(
            "backend_cmd and restart exclude each other: tcplock restarts the "
            "backends it runs itself"
        )
    wants = values.get("restart_every") or values.get("restart_on_timeout")
    if wants and values.get("restart") is None and not supervised:
        raise ValueError(
            "restart_every and restart_on_timeout need a restart callable or backend_cmd"
        )
    if values.get("spares") and not supervised:
        raise ValueError("spares needs backend_cmd (backends tcplock runs and restarts)")
    if values.get("restart_above_rss") is not None and not supervised:
        raise ValueError("restart_above_rss needs backend_cmd (a backend tcplock runs)")
    if values.get("send_proxy") and values.get("send_proxy_v2"):
        raise ValueError("send_proxy and send_proxy_v2 exclude each other: set one")


# -- the docs, printed from the table ----------------------------------------------------------

CONF_HEADER = """\
# tcplock configuration: one "name = value" per line; the names are the long command-line
# options without their dashes. The command line and TCPLOCK_* environment variables override
# this file. Use it with: tcplock -c /etc/tcplock.conf
#
# Lines starting with # or ; are comments, as is whatever follows " #" on a line (quote a value,
# '...' or "...", to keep a # in it). A line that is not "name = value", an unknown name and a
# name given twice are errors, reported with the line's number.
#
# Durations take 500ms, 20s, 1m30s, 5min, 1h30m or 2d (a bare number is seconds); "off" removes
# a limit. Flags take true or false (yes/no, on/off). Give several networks as a list, as in
# "allow = [10.0.0.0/8, ::1/128]".
#
# Printed by 'python -m tcplock.settings --conf' from the settings table; every setting is here,
# the required ones set, the others commented out at their default or at an example value.
"""


def render_markdown() -> str:
    """The README's settings tables, one per group under a heading of its own."""
    return "\n".join(_markdown_table(group, settings) for group, settings in grouped())


def _markdown_table(group: str, settings) -> str:
    lines = [
        f"### {group[:1].upper()}{group[1:]}",
        "",
        "| Option | Config key | Environment | Default | Reloads | Meaning |",
        "|---|---|---|---|---|---|",
    ]
    for s in settings:
        flags = ", ".join(f"`{f}`" for f in s.flags)
        if s.required:
            shown = "required"
        elif s.default_text is None:
            shown = "none"
        elif s.shown is not None:
            shown = s.shown  # prose, not a value to write
        else:
            shown = f"`{s.default_text}`"
        reloads = "yes" if s.reload else "no"
        help_text = s.help.replace("|", "\\|")
        lines.append(f"| {flags} | `{s.name}` | `{s.env}` | {shown} | {reloads} | {help_text} |")
    return "\n".join(lines) + "\n"


def render_conf() -> str:
    """``contrib/tcplock.conf``: every setting a config file can hold, with its help."""
    parts = [CONF_HEADER]
    for group, settings in grouped():
        settings = [s for s in settings if s.name != "config"]  # a file does not name another
        if settings:
            title = f" {group[:1].upper()}{group[1:]} "
            parts.append(f"\n\n# {title:-^98}\n")
        for s in settings:
            parts.append(_conf_entry(s))
    return "".join(parts)


def _conf_entry(s: Setting) -> str:
    comment = textwrap.fill(
        s.help_text,
        width=100,
        initial_indent="# ",
        subsequent_indent="# ",
        break_on_hyphens=False,
        break_long_words=False,
    )
    line = f"{s.name} = {s.sample}"
    return f"\n{comment}\n{line if s.required else '# ' + line}\n"


def _main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tcplock.settings",
        description="Print the documentation made from the settings table.",
    )
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--markdown", action="store_true", help="the README's settings table")
    what.add_argument("--conf", action="store_true", help="the sample contrib/tcplock.conf")
    args = parser.parse_args(argv)
    print(render_markdown() if args.markdown else render_conf(), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
