"""SIGHUP reloads: the real command, its config file edited, then sent a real SIGHUP. What may
change takes effect (slots, the pool, hooks, the log format) without dropping a waiting client
or cutting an active connection; a config file with a mistake is logged with its file and line
and the running settings stay; what cannot change (the listen address) is logged as kept."""

import io
import json
import logging
import os
import re
import signal
import sys
from pathlib import Path

import pytest
from gevent import socket
from test_supervise import ask

from conftest import connect, free_port, http, recv_exactly, wait_until
from tcplock import TCPLock
from tcplock.cli import Reloader, backends_of, check_hooks, library_settings, load, load_hooks
from tcplock.demo import DemoBackend
from tcplock.hooks import CommandHook
from tcplock.settings import SETTINGS
from tcplock.status import StatusServer, read_token_file

pytestmark = pytest.mark.timeout(60)


def still_waiting(sock, wait=0.3):
    """Whether ``sock`` has been sent nothing (its client is still queued) within ``wait``."""
    sock.settimeout(wait)
    try:
        data = sock.recv(100)
    except socket.timeout:
        return True
    finally:
        sock.settimeout(5)
    raise AssertionError(f"got {data!r}")


def echoes(sock, data):
    sock.sendall(data)
    return recv_exactly(sock, len(data)) == data


class Conf:
    def __init__(self, path, **base):
        self.path, self.base = path, base

    def write(self, **values):
        items = {**self.base, **values}
        self.path.write_text("".join(f"{k} = {v}\n" for k, v in items.items() if v is not None))


def reload(p, conf=None, **values):
    """Edit the config file, send SIGHUP, and return the reload's outcome line."""
    if conf is not None:
        conf.write(**values)
    done = re.compile(r"reloaded: |reload failed")
    before = sum(1 for line in p.lines if done.search(line))
    p.signal(signal.SIGHUP)
    wait_until(lambda: sum(1 for line in p.lines if done.search(line)) > before, what="reload")
    return [line for line in p.lines if done.search(line)][before]


@pytest.fixture
def conf(tmp_path):
    return Conf(tmp_path / "tcplock.conf", listen="127.0.0.1:0", **{"proxy-host": "127.0.0.1"})


def test_more_slots_let_a_waiting_client_in_and_the_active_one_goes_on(cli, make_backend, conf):
    backend = make_backend("echo")
    conf.write(**{"proxy-port": backend.server_port, "slots": 1})
    p = cli("-c", str(conf.path))
    port = p.wait_ready()
    active = connect(port)
    assert echoes(active, b"first")
    waiting = connect(port)
    waiting.sendall(b"second")
    assert still_waiting(waiting)
    line = reload(p, conf, **{"proxy-port": backend.server_port, "slots": 2})
    assert line.endswith("reloaded: slots 1 -> 2"), line
    assert recv_exactly(waiting, 6) == b"second"  # let in, its request whole
    assert echoes(active, b"still here")  # not cut
    assert echoes(waiting, b"and more")
    active.close()
    waiting.close()
    assert p.proc.poll() is None


def test_a_backends_own_slots_change_on_reload(cli, make_backend, tmp_path):
    backend = make_backend("echo")
    address = f"127.0.0.1:{backend.server_port}"
    conf = Conf(tmp_path / "tcplock.conf", listen="127.0.0.1:0")
    conf.write(backend=f"[{address}]")
    p = cli("-c", str(conf.path))
    port = p.wait_ready()
    active = connect(port)
    assert echoes(active, b"first")
    waiting = connect(port)
    waiting.sendall(b"second")
    assert still_waiting(waiting)
    line = reload(p, conf, backend=f"[{address},slots=2]")
    assert line.endswith(f"reloaded: backends [{address}] -> [{address},slots=2]"), line
    assert recv_exactly(waiting, 6) == b"second"  # its backend's second slot
    assert echoes(active, b"still here")
    active.close()
    waiting.close()


def test_a_config_with_a_mistake_is_logged_with_file_and_line_and_the_old_one_stays(
    cli, make_backend, conf
):
    backend = make_backend("echo")
    port_setting = {"proxy-port": backend.server_port}
    conf.write(**port_setting, slots=1)
    p = cli("-c", str(conf.path))
    port = p.wait_ready()
    active = connect(port)
    assert echoes(active, b"one")
    line = reload(p, conf, **port_setting, slots=2, timeout="banana")
    assert line.endswith(
        f"ERROR reload failed; the running settings stay: {conf.path}, line 5: timeout: invalid "
        "duration 'banana' (use e.g. 500ms, 20s, 1m30s, 5min, 1h30m, 2d or 'off')"
    ), line
    waiting = connect(port)
    waiting.sendall(b"two")
    assert still_waiting(waiting)  # slots is still 1
    conf.write(**port_setting, slots=2)
    conf.path.write_text("[tcplock]\n" + conf.path.read_text())
    assert reload(p).endswith(
        f"stay: {conf.path}, line 1: '[tcplock]': sections are not used; "
        "write 'name = value' lines only"
    )
    assert still_waiting(waiting, 0.1)
    assert reload(p, conf, **port_setting, slots=2).endswith("reloaded: slots 1 -> 2")
    assert recv_exactly(waiting, 3) == b"two"
    assert echoes(active, b"three")
    active.close()
    waiting.close()


def test_switching_the_demo_on_is_refused_whole_and_the_old_settings_stay(cli, make_backend, conf):
    # The demo's backend starts only with tcplock: a file that turns it on (and so names no
    # backend) cannot be taken, and nothing of it may be applied, slots included.
    backend = make_backend("echo")
    port_setting = {"proxy-port": backend.server_port}
    conf.write(**port_setting, slots=1)
    p = cli("-c", str(conf.path))
    port = p.wait_ready()
    active = connect(port)
    assert echoes(active, b"one")
    waiting = connect(port)
    waiting.sendall(b"two")
    assert still_waiting(waiting)
    line = reload(p, conf, **{"proxy-host": None, "demo": "true", "slots": 2})
    assert line.endswith(
        f"ERROR reload failed; the running settings stay: {conf.path}, line 2: demo: "
        "switching it on needs a restart"
    ), p.output()
    assert still_waiting(waiting)  # slots is still 1
    assert echoes(active, b"three")
    assert reload(p, conf, **port_setting, slots=2).endswith("reloaded: slots 1 -> 2")
    assert recv_exactly(waiting, 3) == b"two"
    active.close()
    waiting.close()
    assert "Traceback" not in p.output()


def test_an_added_backend_gets_clients_and_a_removed_one_finishes_its_client_then_gets_none(
    cli, make_backend, conf
):
    a, b = make_backend("echo"), make_backend("echo")
    label_a, label_b = f"127.0.0.1:{a.server_port}", f"127.0.0.1:{b.server_port}"
    conf.base.pop("proxy-host")
    conf.write(backend=f"[{label_a}]", slots=1)
    p = cli("-c", str(conf.path), "--status", "127.0.0.1:0")
    port = p.wait_ready()
    status_port = int(re.search(r"status on http://127.0.0.1:(\d+)/", p.wait_for("status on"))[1])
    a.take_check()
    on_a = connect(port)
    assert echoes(on_a, b"a1")
    waiting = connect(port)
    waiting.sendall(b"w1")
    assert still_waiting(waiting)

    line = reload(p, conf, backend=f"[{label_a}, {label_b}]")
    assert line.endswith(f"reloaded: backends [{label_a}] -> [{label_a}, {label_b}]"), line
    assert recv_exactly(waiting, 2) == b"w1"  # the new backend took the waiting client
    wait_until(lambda: b.count == 2)  # that client, and tcplock's check of a backend joining
    assert a.count == 1

    line = reload(p, conf, backend=f"[{label_b}]")
    assert f"backend {label_a} leaves the pool once its 1 client(s) have finished" in p.output()
    states = {x["address"]: x["state"] for x in json.loads(http(status_port)[2])["backends"]}
    assert states == {label_a: "leaving", label_b: "up"}
    later = connect(port)
    later.sendall(b"l1")
    assert still_waiting(later)  # b is busy, and a takes no one new
    assert echoes(on_a, b"a2")  # a's client goes on
    on_a.close()
    p.wait_for(f"backend {label_a} has left the pool")
    assert still_waiting(later, 0.1)
    assert a.count == 1
    status = json.loads(http(status_port)[2])
    assert [x["address"] for x in status["backends"]] == [label_b]
    _, _, metrics = http(status_port, path="/metrics")
    assert label_b.encode() in metrics and label_a.encode() not in metrics
    waiting.close()
    assert recv_exactly(later, 2) == b"l1"  # on b
    assert a.count == 1 and b.count == 3
    later.close()


def test_hooks_and_log_format_change_and_the_listen_address_is_kept(
    cli, make_backend, conf, tmp_path
):
    backend = make_backend("echo")
    out = tmp_path / "hooks.out"
    port_setting = {"proxy-port": backend.server_port}
    conf.write(**port_setting, **{"on-activate": f"echo first >> {out}"})
    p = cli("-c", str(conf.path))
    port = p.wait_ready()
    c = connect(port)
    assert echoes(c, b"x")
    c.close()
    line = reload(
        p,
        conf,
        **port_setting,
        listen="127.0.0.1:1",
        **{"on-activate": f"echo second >> {out}", "log-format": "json"},
    )
    assert "listen stays 127.0.0.1:0: changing it needs a restart" in p.output()
    assert json.loads(line)["message"] == (
        f"reloaded: on-activate echo first >> {out} -> echo second >> {out}; "
        "log-format text -> json"
    )
    c = connect(port)  # the same listener
    assert echoes(c, b"y")
    c.close()
    assert out.read_text().split() == ["first", "second"]
    ended = p.wait_for(r'"end": "closed"')
    assert json.loads(ended)["end"] == "closed"


# -- the library's side: TCPLock.set_backends on a running lock ---------------------------------


def test_set_backends_adds_and_removes_backends_on_a_running_lock(make_lock, make_backend):
    a, b = make_backend("echo"), make_backend("echo")
    lock = make_lock([a], slots=1)
    label_a, label_b = f"127.0.0.1:{a.server_port}", f"127.0.0.1:{b.server_port}"
    on_a = connect(lock.server_port)
    assert echoes(on_a, b"a")
    waiting = connect(lock.server_port)
    waiting.sendall(b"w")
    wait_until(lambda: lock.queued == 1)

    lock.set_backends([("127.0.0.1", a.server_port), ("127.0.0.1", b.server_port)])
    assert recv_exactly(waiting, 1) == b"w"  # the new backend took the head of the queue
    assert [x.label for x in lock.backends] == [label_a, label_b]
    wait_until(lambda: b.count == 2)  # that client, and tcplock's check of a backend joining

    lock.set_backends([("127.0.0.1", b.server_port)])
    assert [(x["address"], x["state"]) for x in lock.status()["backends"]] == [
        (label_b, "up"),
        (label_a, "leaving"),
    ]
    later = connect(lock.server_port)
    later.sendall(b"l")
    wait_until(lambda: lock.queued == 1)  # b is busy, and a takes no one new
    assert echoes(on_a, b"a2")
    on_a.close()
    wait_until(lambda: len(lock.backends) == 1, what="a to leave")
    assert lock.backend == ("127.0.0.1", b.server_port) and lock.queued == 1
    waiting.close()
    assert recv_exactly(later, 1) == b"l"
    assert (a.count, b.count) == (1, 3)
    later.close()


def test_a_leaving_backend_named_again_stays_and_bad_pools_change_nothing(make_lock, make_backend):
    a, b = make_backend("echo"), make_backend("echo")
    lock = make_lock([a, b], slots=1)
    on_a = connect(lock.server_port)
    assert echoes(on_a, b"a")
    held = next(x for x in lock.backends if x.held)
    other = next(x for x in lock.backends if x is not held)
    lock.set_backends([other.address])
    assert held.state == "leaving"
    lock.set_backends([held.address, other.address])  # before it has left: it stays
    assert [x.state for x in lock.backends] == ["up", "up"]
    assert [x.index for x in lock.backends] == [1, 2]
    for bad in ([], [("127.0.0.1", 0)], [held.address, held.address], "x"):
        with pytest.raises(ValueError):
            lock.set_backends(bad)
    assert [x.address for x in lock.backends] == [held.address, other.address]
    on_a.close()
    wait_until(lambda: not held.held)
    c = connect(lock.server_port)
    assert echoes(c, b"c")  # both still serve
    c.close()


def test_a_leaving_backend_whose_restart_fails_leaves_instead_of_retrying(make_lock, make_backend):
    # A backend taken out of the pool may be gone for good: a restart of it that fails is not
    # retried (which would keep it in the pool as "leaving" for ever).
    a, b = make_backend("echo"), make_backend("echo")
    lock = make_lock(
        [a, b],
        slots=1,
        restart=CommandHook("exit 1", "restart"),
        restart_every=1,
        ready_timeout=None,
    )
    lock.restart_retry_delay = 0.01
    c = connect(lock.server_port)
    assert echoes(c, b"a")
    held = next(x for x in lock.backends if x.held)
    other = next(x for x in lock.backends if x is not held)
    lock.set_backends([other.address])
    c.close()  # its restart is due: it runs once, fails, and the backend leaves
    wait_until(lambda: [x.address for x in lock.backends] == [other.address], what="it to leave")
    assert held.restart_failures == 1
    d = connect(lock.server_port)
    assert echoes(d, b"d")
    d.close()


# -- every setting: a reload changes what reloads, and nothing else ----------------------------
# Driven by the settings table: each setting is set to one value, the file is edited to
# another and then to none, and after each reload every setting in force is compared with what
# a tcplock started afresh would have (from the edited file for what reloads, from the first
# file for the rest). A setting of a kind added later needs two values below, and is covered.

# Two values of each kind of setting, as a config file writes them.
TWO_VALUES = {
    "duration": ("3s", "4s"),
    "count": ("5", "6"),
    "flag": ("true", "false"),
    "networks": ("[10.0.0.0/8]", "[10.1.0.0/16]"),
    "command": ("echo a", "echo b"),
    "shell": ("echo a", "echo b"),
    "size": ("800M", "900M"),
    "host": ("127.0.0.1", "localhost"),
    "port": ("2001", "2002"),
    "addresses": ("[127.0.0.1:2001]", "[127.0.0.1:2002]"),
    "address": ("127.0.0.1:2001", "127.0.0.1:2002"),
}
# What else the file needs for a setting to be taken (the rules between settings).
NEEDS = {
    "restart-every": {"backend-cmd": "sleep 1"},
    "restart-on-timeout": {"backend-cmd": "sleep 1"},
    "restart-above-rss": {"backend-cmd": "sleep 1"},
    "spares": {  # fewer than the backends
        "backend-cmd": "sleep 1",
        "proxy-host": None,
        "proxy-port": None,
        "backend": "[" + ", ".join(f"127.0.0.1:{2000 + i}" for i in range(7)) + "]",
    },
    "status-token-file": {"status": "127.0.0.1:0"},
    "status-max-rate": {"status": "127.0.0.1:0"},
    "backend": {"proxy-host": None, "proxy-port": None},
    "demo": {"proxy-host": None, "proxy-port": None},
}
ALL = [s for s in SETTINGS if s.name != "config"]


def two_values(setting, tmp_path):
    if setting.kind == "choice":
        return setting.choices[:2]
    if setting.kind == "file":  # a hooks file, a token file
        paths = [tmp_path / f"{setting.name}-{n}" for n in "ab"]
        for path, n in zip(paths, "ab"):
            path.write_text(f"def on_activate(conn):\n    return {n!r}\n" if setting.name ==
                            "hooks" else f"token-{n}\n")  # fmt: skip
            path.chmod(0o600)
        return tuple(str(p) for p in paths)
    return TWO_VALUES[setting.kind]


class Running:
    """tcplock's settings as ``main`` makes them from a config file, in process: the lock (not
    started), its status server (not started) and the reloader SIGHUP calls."""

    def __init__(self, path):
        loaded = load(["-c", str(path)], env={})
        args = loaded.args
        hooks = load_hooks(args, loaded.named)
        check_hooks(args, hooks)
        self.demo = DemoBackend(("127.0.0.1", 0)) if args.demo else None
        backends = [("127.0.0.1", 1)] if self.demo else backends_of(args)
        kwargs = library_settings(args, hooks, 4096, backends)
        self.lock = TCPLock(args.listen, backends=backends, **kwargs)
        token = read_token_file(args.status_token_file) if args.status_token_file else None
        self.status = StatusServer(
            ("127.0.0.1", 0), self.lock, token=token, max_rate=args.status_max_rate
        )
        extras = [("status", args.status, self.status)] if args.status else []
        self.handler = logging.StreamHandler(io.StringIO())
        self.reloader = Reloader(self.lock, loaded, self.handler, 4096, extras, self.demo)
        self.reloader.set_logging(args.log_level, args.log_format)

    def in_force(self, setting):
        """What ``setting`` is on this tcplock, as its lock, status server and log have it."""
        lock = self.lock
        if setting.kind == "command" or setting.name == "hooks":
            hook = getattr(lock, setting.attr or "on_activate")
            return hook.command if isinstance(hook, CommandHook) else hook and hook(None)
        if setting.attr is not None:
            return getattr(lock, setting.attr)
        if setting.name in ("proxy-host", "proxy-port", "backend"):
            return [b.address for b in lock.backends]
        if setting.name == "status-token-file":
            return self.status.token
        if setting.name == "status-max-rate":
            return self.status.max_rate
        if setting.name == "log-level":
            return logging.getLogger().level
        if setting.name == "log-format":
            record = logging.LogRecord("tcplock", logging.WARNING, "", 0, "x", (), None)
            return self.handler.format(record)[:1]
        # The listeners (listen, status, agent-check) and the demo backend are made once, at
        # the start; the command's settings say which.
        return getattr(self.reloader.args, setting.dest)

    def settings(self):
        return {s.name: self.in_force(s) for s in ALL}


def started(path):
    """What a tcplock started from the config file at ``path`` has in force; None if it would
    not start (exit 2). The log level is the process's: it is put back as it was."""
    root = logging.getLogger()
    level = root.level
    try:
        return Running(path).settings()
    except SystemExit as e:
        assert e.code == 2
        return None
    finally:
        root.setLevel(level)


@pytest.fixture
def keep_logging():
    root = logging.getLogger()
    level, handlers = root.level, root.handlers[:]
    yield
    root.setLevel(level)
    root.handlers[:] = handlers


@pytest.mark.parametrize("setting", ALL, ids=lambda s: s.name)
def test_a_reload_changes_what_reloads_and_keeps_the_rest_whatever_the_file_says(
    setting, tmp_path, conn_log, keep_logging, monkeypatch
):
    for name in [n for n in os.environ if n.startswith("TCPLOCK_")]:
        monkeypatch.delenv(name)
    first_value, second_value = two_values(setting, tmp_path)
    base = {"listen": "127.0.0.1:2000", "proxy-host": "127.0.0.1", "proxy-port": "2000"}
    base.update(NEEDS.get(setting.name, {}))
    first = Conf(tmp_path / "first.conf", **base)
    first.write(**{setting.name: first_value})
    running = Running(first.path)
    at_first = started(first.path)
    assert running.settings() == at_first
    edited = Conf(tmp_path / "tcplock.conf", **base)
    monkeypatch.setattr(running.reloader, "command_line", {"config": str(edited.path)})
    for value in (second_value, None):  # edited, then deleted
        if setting.name == "demo" and value is not None:
            edited.write(**{setting.name: value, "proxy-port": "2000"})
        else:
            edited.write(**{setting.name: value})
        before = running.settings()
        if started(edited.path) is None:  # what would not start is not taken: nothing changes
            expected = before
        else:  # what reloads as the edited file says, the rest as it was
            expected = started(edited.path if setting.reload else first.path)
        conn_log.lines.clear()
        taken = running.reloader.reload()
        assert running.settings() == expected, conn_log.lines
        assert taken == (started(edited.path) is not None), conn_log.lines
        said = "\n".join(conn_log.lines)
        changed = started(edited.path) not in (None, at_first)
        if not setting.reload and changed:
            assert f"reload: {setting.name} stays " in said, said
            assert re.search(f"reloaded: .*{setting.name} ", said) is None, said
        else:
            assert f"{setting.name} stays" not in said, said


# -- a backend's command: kept by a reload, edited or deleted in the file -----------------------

PIDSERVER = Path(__file__).resolve().parent / "backends" / "pidserver.py"
CRASHED = "its command was killed by SIGKILL"


def served_by(port):
    """The process id of the backend that serves one client."""
    return ask(port)[0]


def test_a_backend_cmd_edited_or_deleted_stays_and_the_next_restart_runs_the_running_one(
    cli, conf, tmp_path
):
    started = tmp_path / "started"

    def command(name):
        return (
            f"echo {name} >> {started}; "
            f"exec {sys.executable} {PIDSERVER} --port $TCPLOCK_BACKEND_PORT"
        )

    conf.base.pop("proxy-host")
    conf.base["backend"] = f"[127.0.0.1:{free_port()}]"
    conf.write(**{"backend-cmd": command("first")})
    p = cli("-c", str(conf.path), "--status", "127.0.0.1:0")
    port = p.wait_ready()
    status_port = int(re.search(r"status on http://127.0.0.1:(\d+)/", p.wait_for("status on"))[1])
    pid = served_by(port)
    kept = f"reload: backend-cmd stays {command('first')}: changing it needs a restart"
    crashes = 0
    try:
        for edit in (command("second"), None):  # edited, then deleted
            line = reload(p, conf, **{"backend-cmd": edit})
            assert line.endswith("reloaded: no setting changed"), p.output()
            assert p.output().count(kept) == (1 if edit else 2)
            os.kill(pid, signal.SIGKILL)  # a crash: tcplock starts the command again
            crashes += 1
            wait_until(lambda n=crashes: p.output().count(CRASHED) == n, what="the crash")
            new_pid = served_by(port)
            assert new_pid != pid
            pid = new_pid
            assert started.read_text().split() == ["first"] * (crashes + 1)
            status = json.loads(http(status_port)[2])
            assert [b["state"] for b in status["backends"]] == ["up"]
        assert "Traceback" not in p.output() and "error" not in p.output().lower()
    finally:
        p.signal(signal.SIGTERM)
        assert p.wait() == 0


def test_a_reload_to_more_slots_than_the_descriptor_limit_allows_changes_nothing(
    tmp_path, conn_log, keep_logging
):
    conf = Conf(tmp_path / "tcplock.conf", listen="127.0.0.1:2000", **{"proxy-port": "2000"})
    conf.write(slots=2)
    running = Running(conf.path)  # under a descriptor limit of 4096: at most 682 slots
    before = running.settings()
    conf.write(slots=683, timeout="5s")
    assert not running.reloader.reload()
    assert running.settings() == before
    assert conn_log.lines[-1] == (
        "reload failed; the running settings stay: --slots 683 is more than the descriptor "
        "limit of 4096 allows: at most 682 (each connection may hold 6 descriptors; raise the "
        "limit with ulimit -n or LimitNOFILE=)"
    )
