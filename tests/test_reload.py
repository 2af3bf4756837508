"""SIGHUP reloads: the real command, its config file edited, then sent a real SIGHUP. What may
change takes effect (slots, the pool, hooks, the log format) without dropping a waiting client
or cutting an active connection; a config file with a mistake is logged with its file and line
and the running settings stay; what cannot change (the listen address) is logged as kept."""

import json
import re
import signal

import pytest
from gevent import socket

from conftest import connect, http, recv_exactly, wait_until
from tcplock.hooks import CommandHook

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
