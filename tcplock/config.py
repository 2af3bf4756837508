"""Settings from where an operator writes them, each mistake reported with where it was made.

What it owns: reading the config file and the ``TCPLOCK_*`` environment into values, each text
parsed by its setting's own parser (:mod:`tcplock.settings`); merging them with what the
command line gave, in the order command line, environment, config file, defaults; and the rules
between settings. :func:`resolve` does all of it, at start-up, again on a reload, and for
``--check-config``, which prints the result back as a config file with where each value came
from (:func:`render_effective`).

The rule it keeps: a bad value is one :class:`ConfigError` line that says where it came from
(``TCPLOCK_TIMEOUT: ...``, ``/etc/tcplock.conf, line 7: timeout: ...``); a line of the file
that is not ``name = value``, a name that is no setting, and a setting given twice in the file
are errors too. An unknown ``TCPLOCK_*`` variable is not an error (the environment is shared
with other programs) but a warning, with the closest setting's variable if one is close.

The config file's format: ``name = value`` per line, the name being the long option without its
dashes; blank lines; comment lines starting with ``#`` or ``;``; a comment after a value
starting with whitespace and ``#``; a value may be quoted ('...' or "...") to keep its spaces;
the repeatable settings take a list, ``[a, b]``. Importing this module loads no gevent.
"""

from __future__ import annotations

import argparse
import difflib
import json
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Tuple

from .settings import ENV_PREFIX, SETTINGS, Setting

__all__ = [
    "ConfigError",
    "Resolved",
    "resolve",
    "read_config",
    "read_environment",
    "parse_text",
    "suggest",
    "format_text",
    "render_effective",
]

BY_NAME: Dict[str, Setting] = {s.name: s for s in SETTINGS}
BY_DEST: Dict[str, Setting] = {s.dest: s for s in SETTINGS}
BY_ENV: Dict[str, Setting] = {s.env: s for s in SETTINGS}

_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")
# name = value; the name as settings are spelt, or anything else up to the "=" (reported).
_LINE = re.compile(r"(?P<key>[^=\s]+)\s*=\s*(?P<value>.*)")
_COMMENT = re.compile(r"\s#")
# An item of a list that is a setting of the item before it ("slots=2").
_OPTION = re.compile(r"[a-z][a-z-]*=")


class ConfigError(ValueError):
    """A setting that cannot be taken, in one line that starts with where it was found."""


@dataclass
class Resolved:
    """The settings as the command has them: ``args`` by dest (argparse's names), ``sources``
    saying where each one not at its default came from, and ``warnings`` to log once."""

    args: argparse.Namespace
    sources: Dict[str, str] = field(default_factory=dict)
    warnings: List[str] = field(default_factory=list)
    config_file: Optional[str] = None
    #: What the command line gave (dest -> value): a reload reads the rest again over it.
    command_line: Dict[str, Any] = field(default_factory=dict)
    #: The settings whose value follows from another one's (dest -> that one's dest): the
    #: host of ``-p HOST:PORT``, the listen address of ``--demo``.
    derived: Dict[str, str] = field(default_factory=dict)

    def named(self, dest: str) -> str:
        """How a message names the setting ``dest``: by where it was given (``TCPLOCK_HOOKS``,
        ``hooks (/etc/tcplock.conf, line 3)``), by its option if on the command line or not
        given."""
        return _named(BY_DEST[dest], self.sources.get(dest, "command line"))


def _short(text: str) -> str:
    text = repr(text)
    return text if len(text) <= 60 else text[:57] + "..."


def _one_line(text: str) -> str:
    return text.replace("\r", "\\r").replace("\n", "\\n")


def parse_text(setting: Setting, text: str):
    """One text value of ``setting`` as its parser makes it; ConfigError with the reason."""
    if setting.action == "store_true":
        word = text.strip().lower()
        if word in _TRUE:
            return True
        if word in _FALSE:
            return False
        raise ConfigError(f"must be true or false, not {_short(text)}")
    try:
        value = setting.parse(text) if setting.parse is not None else text
    except (argparse.ArgumentTypeError, ValueError, TypeError) as e:
        raise ConfigError(str(e) or f"invalid value {_short(text)}") from None
    if setting.choices is not None and value not in setting.choices:
        raise ConfigError(
            f"invalid choice {_short(text)} (choose from {', '.join(setting.choices)})"
        )
    return value


def _split_list(text: str) -> Optional[List[str]]:
    """``[a, b]`` (or a JSON list of strings) as its items; None if ``text`` is no list."""
    text = text.strip()
    if not (text.startswith("[") and text.endswith("]")):
        return None
    try:
        items = json.loads(text)
        if isinstance(items, list) and all(isinstance(i, str) for i in items):
            return items
    except ValueError:
        pass
    inner = text[1:-1].strip()
    if not inner:
        return []
    items: List[str] = []
    for item in inner.split(","):
        item = item.strip()
        if items and _OPTION.match(item):  # "[HOST:PORT,slots=2, ...]": a backend's own setting
            items[-1] += "," + item
        else:
            items.append(item)
    return items


def parse_value(setting: Setting, text: str):
    """A value of a config file or a variable: a list for a repeatable setting (``[a, b]``, or
    one item on its own), one value otherwise."""
    if setting.action != "append":
        return parse_text(setting, text)
    items = _split_list(text)
    if items is None:
        items = [text]
    if not items or any(not item for item in items):
        raise ConfigError(f"give one or more values, as [a, b], not {_short(text)}")
    return [parse_text(setting, item) for item in items]


def suggest(word: str, names) -> str:
    """`` (did you mean 'NAME'?)`` with the name of ``names`` closest to ``word``, if one is
    close; empty otherwise."""
    close = difflib.get_close_matches(word, list(names), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _unquote(value: str, where: str, key: str) -> str:
    """A value as written after ``=``: without a trailing comment (whitespace, then ``#``), and
    without the quotes around it, if quoted ('...' or "..."), which keep a ``#`` in it."""
    quote = value[:1]
    if quote in ("'", '"'):
        close = value.find(quote, 1)
        if close < 0:
            raise ConfigError(f"{where}: {key}: the {quote} at its start is never closed")
        rest = value[close + 1 :].strip() if close > 0 else None
        if rest == "" or (rest and rest.startswith("#")):
            return value[1:close]
    comment = _COMMENT.search(value)
    if comment:
        value = value[: comment.start()]
    return value.strip()


def read_config(path: str) -> Dict[str, Tuple[Any, str]]:
    """The settings of the config file at ``path``: dest -> (value, "PATH, line N")."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror or e}") from None
    if data.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte order mark, as some editors write
        data = data[3:]
    found: Dict[str, Tuple[Any, str]] = {}
    lines: Dict[str, int] = {}
    for number, raw in enumerate(data.split(b"\n"), 1):
        where = f"{path}, line {number}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ConfigError(f"{where}: not valid UTF-8 text ({e.reason})") from None
        line = line.strip()
        if not line or line[0] in "#;":
            continue
        if "\x00" in line:
            raise ConfigError(f"{where}: a NUL character")
        if line.startswith("[") and line.endswith("]"):
            raise ConfigError(
                f"{where}: {_short(line)}: sections are not used; write 'name = value' lines only"
            )
        m = _LINE.fullmatch(line)
        if m is None:
            word = line.split()[0].rstrip(":")
            hint = f"write '{word} = VALUE'" if word in BY_NAME else "expected 'name = value'"
            raise ConfigError(f"{where}: {_short(line)}: {hint}")
        key, value = m.group("key"), m.group("value")
        setting = BY_NAME.get(key)
        if setting is None:
            names = [s.name for s in SETTINGS if s.name != "config"]
            raise ConfigError(
                f"{where}: unknown setting {_short(key)}{suggest(key.strip('-'), names)}"
            )
        if setting.name == "config":
            raise ConfigError(f"{where}: config: a config file cannot name another one")
        value = _unquote(value, where, key)
        if key in lines:
            raise ConfigError(f"{where}: {key} is already set on line {lines[key]}")
        lines[key] = number
        try:
            found[setting.dest] = (parse_value(setting, value), where)
        except ConfigError as e:
            raise ConfigError(f"{where}: {key}: {e}") from None
    return found


def read_environment(env: Mapping[str, str]) -> Tuple[Dict[str, Tuple[Any, str]], List[str]]:
    """The settings of ``TCPLOCK_*`` variables: dest -> (value, variable); and a warning for
    each variable of that prefix that is no setting."""
    found: Dict[str, Tuple[Any, str]] = {}
    warnings = []
    for name in sorted(env):
        if not name.startswith(ENV_PREFIX):
            continue
        setting = BY_ENV.get(name)
        if setting is None:
            known = [s.env[len(ENV_PREFIX) :] for s in SETTINGS]
            hint = suggest(name[len(ENV_PREFIX) :], known).replace("'", "'" + ENV_PREFIX, 1)
            warnings.append(f"{_one_line(name)} is not a tcplock setting; ignored{hint}")
            continue
        if setting.name == "config":
            continue  # read by resolve() itself
        try:
            found[setting.dest] = (parse_value(setting, env[name]), name)
        except ConfigError as e:
            raise ConfigError(f"{name}: {e}") from None
    return found, warnings


def _named(setting: Setting, where: str) -> str:
    """How a message names a setting given at ``where``."""
    if where == "command line":
        return "/".join(setting.flags)
    if where.startswith(ENV_PREFIX):
        return where
    return f"{setting.name} ({where})"


def resolve(command_line: Mapping[str, Any], env: Mapping[str, str]) -> Resolved:
    """The settings: ``command_line`` (dest -> value, only those given there) over the
    environment, over the config file (``-c``, or ``TCPLOCK_CONFIG``), over the defaults; then
    the rules between them. ConfigError, naming where, for anything that cannot be taken."""
    config_path = command_line.get("config")
    config_where = "-c/--config"
    if config_path is None and env.get(BY_NAME["config"].env):
        config_path, config_where = env[BY_NAME["config"].env], BY_NAME["config"].env
    from_env, warnings = read_environment(env)
    from_file = {}
    if config_path:
        try:
            from_file = read_config(config_path)
        except ConfigError as e:
            message = str(e)
            if message.startswith("cannot read"):
                message = f"{config_where}: {message}"
            raise ConfigError(message) from None
    values = {s.dest: s.default for s in SETTINGS}
    sources: Dict[str, str] = {}
    for layer in (from_file, from_env):
        for dest, (value, where) in layer.items():
            values[dest], sources[dest] = value, where
    for dest, value in command_line.items():
        values[dest], sources[dest] = value, "command line"
    values["config"] = config_path or None
    args = argparse.Namespace(**values)
    derived = _check_together(args, sources)
    return Resolved(args, sources, warnings, config_path or None, dict(command_line), derived)


def _check_together(args: argparse.Namespace, sources: Dict[str, str]) -> Dict[str, str]:
    """The rules between settings, on the merged values; normalises -p HOST:PORT. Returns the
    settings whose value it set from another's (dest -> that one's dest)."""
    derived = {}

    def named(dest):
        return _named(BY_DEST[dest], sources.get(dest, "command line"))

    if isinstance(args.proxy_port, tuple):  # -p HOST:PORT names the host too
        if "proxy_host" in sources:
            raise ConfigError(
                f"{named('proxy_port')} names the host: leave out {named('proxy_host')}"
            )
        args.proxy_host, args.proxy_port = args.proxy_port
        derived["proxy_host"] = "proxy_port"
    if args.backend:
        given = [
            named(dest)
            for dest, given in (
                ("proxy_host", "proxy_host" in sources),
                ("proxy_port", args.proxy_port is not None),
                ("demo", args.demo),
            )
            if given
        ]
        if given:
            raise ConfigError(
                f"{named('backend')} names the backends: leave out {', '.join(given)}"
            )
        addresses = [b[:2] for b in args.backend]
        twice = [a for i, a in enumerate(addresses) if a in addresses[:i]]
        if twice:
            host, port = twice[0]
            shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            raise ConfigError(f"{named('backend')}: {shown} is given twice")
    if args.demo:
        if args.proxy_port is not None:
            raise ConfigError(
                f"{named('demo')} relays to its own backend: leave out {named('proxy_port')}"
            )
        if args.backend_cmd:
            raise ConfigError(
                f"{named('demo')} relays to its own backend: leave out {named('backend_cmd')}"
            )
        if args.listen is None:
            args.listen = ("127.0.0.1", 9000)
            derived["listen"] = "demo"
    else:
        missing = [
            "/".join(s.flags)
            for s in SETTINGS
            if s.required
            and getattr(args, s.dest) is None
            and not (s.name == "proxy-port" and args.backend)
        ]
        if missing:
            raise ConfigError("the following arguments are required: " + ", ".join(missing))
    if args.status_token_file and args.status is None:
        raise ConfigError(
            f"{named('status_token_file')} protects the --status endpoint: give --status too"
        )
    if "status_max_rate" in sources and args.status is None:
        raise ConfigError(
            f"{named('status_max_rate')} bounds the --status endpoint: give --status too"
        )
    if args.backend_cmd and args.restart_cmd:
        raise ConfigError(
            f"{named('backend_cmd')} and {named('restart_cmd')} exclude each other: tcplock "
            "restarts the backends it runs"
        )
    if (args.restart_every or args.restart_on_timeout) and not (
        args.restart_cmd or args.hooks or args.backend_cmd
    ):
        given = [named(d) for d in ("restart_every", "restart_on_timeout") if getattr(args, d)]
        raise ConfigError(
            f"{' and '.join(given)} need{'s' if len(given) == 1 else ''} --backend-cmd or "
            "--restart-cmd "
            "(or a restart() in --hooks)"
        )
    if args.send_proxy and args.send_proxy_v2:
        raise ConfigError(
            f"{named('send_proxy')} and {named('send_proxy_v2')} exclude each other: give one"
        )
    if args.spares and not args.backend_cmd:
        raise ConfigError(f"{named('spares')} needs --backend-cmd (backends tcplock runs)")
    if args.restart_above_rss is not None and not args.backend_cmd:
        raise ConfigError(
            f"{named('restart_above_rss')} needs --backend-cmd (a backend tcplock runs)"
        )
    return derived


# -- the settings as a config file (--check-config) ---------------------------------------------

_DURATION_PARTS = (("d", 86400), ("h", 3600), ("m", 60))
_SIZE_PARTS = (("T", 1 << 40), ("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10))


def format_text(setting: Setting, value) -> Optional[str]:
    """``value`` of ``setting`` as a config file writes it (parse_value reads it back the
    same), or None if no text gives it (a setting that is not set and takes no ``off``)."""
    if value is None:
        try:
            return "off" if parse_text(setting, "off") is None else None
        except ConfigError:
            return None
    if isinstance(value, list):
        return "[" + ", ".join(format_text(setting, v) or "" for v in value) + "]"
    if isinstance(value, bool):
        return "on" if value else "off"
    if setting.kind == "duration":
        parts, rest = [], value
        for unit, size in _DURATION_PARTS:
            if rest >= size:
                n = int(rest // size)
                parts.append(f"{n}{unit}")
                rest -= n * size
        if rest or not parts:
            parts.append(f"{rest:.6f}".rstrip("0").rstrip(".") + "s")
        return "".join(parts)
    if setting.kind == "size":
        unit = next((u for u, size in _SIZE_PARTS if value % size == 0), "")
        return f"{value // dict(_SIZE_PARTS).get(unit, 1)}{unit}"
    if isinstance(value, tuple) and len(value) == 2:  # an address
        host, port = value
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    text = str(value)
    if text != text.strip() or text[:1] in ("'", '"') or _COMMENT.search(text):
        quote = "'" if "'" not in text else '"'
        return f"{quote}{text}{quote}"
    return text


def render_effective(resolved: Resolved, effective: Optional[Mapping[str, Any]] = None) -> str:
    """The settings as a config file, grouped as ``--help`` has them, each line saying where its
    value came from (an option, a variable, the config file and line, or the default); those
    at their default are commented out. ``effective``: values (by dest) that the command works
    out from the default, shown in its place (max-queue from the descriptor limit)."""
    from .settings import grouped

    args, lines, effective = resolved.args, [], effective or {}
    for group, settings in grouped():
        lines.append(f"\n# -- {group} --")
        for s in settings:
            value = getattr(args, s.dest)
            if s.name == "config":
                where = _label(resolved, s.dest) if "config" in resolved.sources else s.env
                where = where if value is not None else "default"
                lines.append(f"# config file: {value or 'none'}  # {where}")
                continue
            given = s.dest in resolved.sources or s.dest in resolved.derived
            if not given and s.dest in effective:
                value = effective[s.dest]
            text = format_text(s, value)
            if not given:
                text = text if text is not None else (s.default_text or "(none)")
                where = f"default: {s.shown}" if s.dest in effective and s.shown else "default"
                lines.append(f"# {s.name} = {text}  # {where}")
            else:
                lines.append(f"{s.name} = {_one_line(text or '')}  # {_label(resolved, s.dest)}")
    return "\n".join(lines).lstrip("\n") + "\n"


def _label(resolved: Resolved, dest: str) -> str:
    """Where the value of ``dest`` came from, as --check-config gives it."""
    if dest in resolved.derived:
        other = resolved.derived[dest]
        return "from " + _label(resolved, other)
    where = resolved.sources[dest]
    return "/".join(BY_DEST[dest].flags) if where == "command line" else where
