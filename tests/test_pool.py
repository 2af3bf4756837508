"""A pool of backends behind one FIFO queue: slots per backend, strict arrival order across the
pool, a dead backend losing no client, a backend that comes back, restarts that hold only their
own backend, draining one backend, and how the pool shows in status, metrics, the agent-check,
the log, hooks and the command line."""

import json
import os
import re
import socket as _stdsocket
import time

import gevent
import pytest
from gevent.event import Event
from gevent.server import StreamServer
from prometheus_client.parser import text_string_to_metric_families

from conftest import (
    LOOPBACK,
    connect,
    free_port,
    http,
    limited_cli,
    recv_all,
    recv_exactly,
    run_cli,
    wait_until,
)
from tcplock import TCPLock
from tcplock.hooks import CommandHook
from tcplock.status import AgentCheck, StatusServer, agent_reply

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def make_pool(make_lock):
    def make(ports, **kw):
        kw.setdefault("connect_timeout", 5.0)
        return make_lock(list(ports), **kw)

    return make


def grant_order(lock):
    """(accept order, grant order) of every connection that ends, as it ends."""
    seen = []
    lock.end_observers.append(lambda c: seen.append((c.id, c.activation, c.backend)))
    return seen


def test_one_queue_over_three_backends_admits_in_arrival_order(make_backend, make_pool):
    backends = [make_backend("echo") for _ in range(3)]
    lock = make_pool([b.server_port for b in backends])
    ended = grant_order(lock)

    # The first three clients hold every slot, so the other 33 queue in arrival order.
    clients = []
    for i in range(36):
        c = connect(lock.server_port)
        c.sendall(b"%02d" % i)
        clients.append(c)
        wait_until(lambda n=i + 1: len(lock.connections) == n, what="the client accepted")
    assert lock.queued == 33 and all(b.current == 1 for b in backends)

    def finish(c, i):
        assert recv_exactly(c, 2, timeout=10) == b"%02d" % i
        c.close()

    jobs = [gevent.spawn(finish, c, i) for i, c in enumerate(clients)]
    gevent.joinall(jobs, timeout=20, raise_error=True)
    wait_until(lambda: len(ended) == 36, what="every connection to end")
    assert all(b.most == 1 for b in backends)  # one slot each
    assert sum(b.count for b in backends) == 36 and all(b.count >= 6 for b in backends)
    by_arrival = [activation for _id, activation, _b in sorted(ended, key=lambda e: e[0])]
    assert by_arrival == sorted(by_arrival)  # nobody let in ahead of an earlier client


def test_a_dead_backend_loses_no_client(make_backend, make_pool, conn_log):
    dying, *live = [make_backend("echo") for _ in range(3)]
    # connect_timeout is long: a client kept on the dead backend for it would time this test
    # out; each is sent on after one refused attempt instead. It answered its check at start,
    # then died: the first client given it finds it refusing.
    lock = make_pool([dying.server_port, *(b.server_port for b in live)], connect_timeout=60)
    dying.stop(timeout=0)
    clients = [connect(lock.server_port) for _ in range(12)]
    for i, c in enumerate(clients):
        c.sendall(b"%02d" % i)

    def finish(c, i):
        assert recv_exactly(c, 2, timeout=10) == b"%02d" % i
        c.close()

    gevent.joinall([gevent.spawn(finish, c, i) for i, c in enumerate(clients)], raise_error=True)
    ends = [conn_log.next_end()["end"] for _ in clients]
    assert ends == ["closed"] * 12
    states = [b["state"] for b in lock.status()["backends"]]
    assert states == ["down", "up", "up"]
    assert sum(b.count for b in live) == 12
    assert any("is down" in line for line in conn_log.lines)


def test_a_backend_that_comes_back_rejoins_the_pool(make_backend, make_pool, conn_log):
    port = free_port()
    other = make_backend("hold")
    lock = make_pool([port, other.server_port], check_interval=0.05)
    a = connect(lock.server_port)
    other.next_conn()  # the dead one refused its check at start: this one took the client
    wait_until(lambda: lock.status()["backends"][0]["state"] == "down")
    revived = StreamServer((LOOPBACK, port), lambda s, _a: s.sendall(b"back") or s.close())
    revived.start()
    try:
        wait_until(lambda: lock.status()["backends"][0]["state"] == "up", what="it rejoins")
        b = connect(lock.server_port)  # the other backend is busy: this goes to the revived one
        assert recv_all(b) == b"back"
        b.close()
        # Never up since the start (its first check was refused): now it is.
        assert any(f"backend 127.0.0.1:{port} is up" in line for line in conn_log.lines)
    finally:
        revived.stop(timeout=0)
        other.release_all()
        a.close()


def test_with_every_backend_down_a_client_ends_backend_refused(make_pool, conn_log):
    lock = make_pool([free_port(), free_port()], connect_timeout=0.3)
    c = connect(lock.server_port)
    assert recv_all(c) == b""
    c.close()
    assert conn_log.next_end()["end"] == "backend-refused"
    assert [b["state"] for b in lock.status()["backends"]] == ["down", "down"]
    assert agent_reply(lock).startswith("down#")


def test_a_restart_holds_only_its_own_backend(make_backend, make_pool, conn_log):
    first, second = make_backend("echo"), make_backend("echo")
    restarting, done = Event(), Event()
    restarted = []

    def restart(reason, backend):
        restarted.append(backend.address)
        if backend.index == 1:
            restarting.set()
            done.wait()

    lock = make_pool(
        [first.server_port, second.server_port],
        restart=restart,
        restart_every=1,
        ready_timeout=None,  # no readiness probe: the backends count only clients
    )
    c = connect(lock.server_port)
    c.sendall(b"a")
    assert recv_exactly(c, 1) == b"a"
    c.close()
    assert restarting.wait(5)  # the first backend restarts, its slot still held
    assert lock.status()["backends"][0]["state"] == "restarting"
    for i in range(3):  # meanwhile the second serves the queue (restarting after each client)
        d = connect(lock.server_port)
        d.sendall(b"%d" % i)
        assert recv_exactly(d, 1) == b"%d" % i
        d.close()
        wait_until(lambda n=i: len(restarted) == n + 2, what="the second backend's restart")
    assert first.count == 1 and second.count == 3
    done.set()
    wait_until(lambda: lock.status()["backends"][0]["state"] == "up")


def test_slots_are_per_backend(make_backend, make_pool):
    backends = [make_backend("hold") for _ in range(2)]
    lock = make_pool([b.server_port for b in backends], slots=2)
    clients = [connect(lock.server_port) for _ in range(5)]
    wait_until(lambda: sum(b.current for b in backends) == 4, what="four clients in")
    wait_until(lambda: lock.queued == 1, what="the fifth to queue")
    assert [b.current for b in backends] == [2, 2] and lock.queued == 1
    assert lock.status()["slots"] == 2
    backends[1].conns[0].release.set()
    wait_until(lambda: lock.queued == 0)
    # Granted is not yet connected: wait for the backend to see the fifth client.
    wait_until(lambda: [b.current for b in backends] == [2, 2], what="the fifth on its backend")
    assert [b.most for b in backends] == [2, 2]
    for c in clients:
        c.close()


def test_drain_and_enable_one_backend_over_http(make_backend, make_pool):
    first, second = make_backend("hold"), make_backend("hold")
    lock = make_pool([first.server_port, second.server_port])
    status = StatusServer((LOOPBACK, 0), lock)
    status.start()
    try:
        a = connect(lock.server_port)
        first.next_conn()
        label = f"{LOOPBACK}:{first.server_port}"
        code, _, body = http(status.server_port, "POST", f"/backends/{label}/drain")
        assert code == 200 and json.loads(body)["state"] == "draining"
        assert http(status.server_port, "POST", "/backends/10.9.9.9:1/drain")[0] == 404
        assert http(status.server_port, "GET", f"/backends/{label}/drain")[0] == 405
        first.release_all()
        a.close()
        wait_until(lambda: first.current == 0)
        b, c = connect(lock.server_port), connect(lock.server_port)
        second.next_conn()
        wait_until(lambda: lock.queued == 1)
        assert first.count == 1  # drained: it takes no new client though it is free
        code, _, body = http(status.server_port, "POST", f"/backends/{label}/enable")
        assert code == 200 and json.loads(body)["state"] == "up"
        first.next_conn()  # the waiting client goes to it at once
        assert lock.queued == 0
        for s in (b, c):
            s.close()
    finally:
        status.stop(timeout=0)


def test_status_metrics_agent_check_and_log_per_backend(make_backend, make_pool, conn_log):
    backends = [make_backend("echo") for _ in range(2)]
    lock = make_pool([b.server_port for b in backends])
    status = StatusServer((LOOPBACK, 0), lock)
    status.start()
    agent = AgentCheck((LOOPBACK, 0), lock)
    agent.start()
    try:
        c = connect(lock.server_port)
        c.sendall(b"x")
        assert recv_exactly(c, 1) == b"x"
        c.close()
        line = conn_log.next_end()
        assert any(f"backend={LOOPBACK}:{backends[0].server_port}" in x for x in conn_log.lines)
        assert line["end"] == "closed"
        st = json.loads(http(status.server_port)[2])
        assert [b["address"] for b in st["backends"]] == [
            f"{LOOPBACK}:{b.server_port}" for b in backends
        ]
        first = st["backends"][0]
        assert first["slots"] == 1 and first["active"] == 0 and first["state"] == "up"
        assert first["activations"] == 1 and first["restarts"] == 0
        assert first["last_end"] == "closed"
        body = http(status.server_port, path="/metrics")[2].decode()
        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(body)
            for s in f.samples
        }
        label = (("backend", f"{LOOPBACK}:{backends[0].server_port}"),)
        assert samples[("tcplock_backend_up", label)] == 1
        assert samples[("tcplock_backend_active_connections", label)] == 0
        assert samples[("tcplock_backend_connections_total", label)] == 1
        assert samples[("tcplock_backend_restarts_total", label)] == 0
        s = connect(agent.server_port)
        assert recv_all(s) == b"up ready 100%\n"
        s.close()
    finally:
        status.stop(timeout=0)
        agent.stop(timeout=0)


@pytest.mark.parametrize("form", ["flags", "config", "environment"])
def test_the_command_takes_a_pool_in_each_form(form, make_backend, cli, tmp_path):
    backends = [make_backend("echo") for _ in range(2)]
    addresses = [f"127.0.0.1:{b.server_port}" for b in backends]
    marks = tmp_path / "indexes"
    args = ["-l", "127.0.0.1:0", "--on-activate", f"echo $TCPLOCK_BACKEND_INDEX >> {marks}"]
    env = {}
    if form == "flags":
        for a in addresses:
            args += ["--backend", a]
    elif form == "config":
        conf = tmp_path / "pool.conf"
        conf.write_text(f"backend = [{', '.join(addresses)}]\n")
        args += ["-c", str(conf)]
    else:
        env["TCPLOCK_BACKEND"] = f"[{', '.join(addresses)}]"
    proc = cli(*args, env=env)
    port = proc.wait_ready()
    assert all(a in proc.output() for a in addresses)
    for b in backends:
        b.take_check()
    hold = connect(port)  # one client on each backend at once
    hold.sendall(b"1")
    assert recv_exactly(hold, 1) == b"1"
    other = connect(port)
    other.sendall(b"2")
    assert recv_exactly(other, 1) == b"2"
    assert [b.count for b in backends] == [1, 1]
    assert sorted(marks.read_text().split()) == ["1", "2"]
    hold.close()
    other.close()


@pytest.mark.parametrize("form", ["flags", "config", "environment"])
def test_a_backend_takes_its_own_slots_in_each_form(form, make_backend, cli, tmp_path):
    backends = [make_backend("hold") for _ in range(2)]
    own, other = (f"127.0.0.1:{b.server_port}" for b in backends)
    args, env = ["-l", "127.0.0.1:0", "--status", "127.0.0.1:0"], {}
    if form == "flags":
        args += ["--backend", f"{own},slots=2", "--backend", other]
    elif form == "config":
        conf = tmp_path / "pool.conf"
        conf.write_text(f"backend = [{own},slots=2, {other}]\n")
        args += ["-c", str(conf)]
    else:
        env["TCPLOCK_BACKEND"] = f"[{own}, slots=2, {other}]"
    proc = cli(*args, env=env)
    port = proc.wait_ready()
    assert f"relaying to {own},slots=2, {other}, 1 slot(s) each" in proc.wait_for("listening on")
    status_port = int(re.search(r"status on http://\S+:(\d+)/", proc.wait_for("status on"))[1])
    clients = [connect(port) for _ in range(4)]

    def status():
        return json.loads(http(status_port)[2])

    wait_until(lambda: status()["queued"] == 1, what="the fourth client to wait")
    assert [b["active"] for b in status()["backends"]] == [2, 1]
    assert [b["slots"] for b in status()["backends"]] == [2, 1]
    for c in clients:
        c.close()


def test_backends_own_slots_count_against_the_descriptor_limit():
    # 20000 descriptors leave room for 3333 connections at once, whichever backend has them.
    pool = ["--backend", "127.0.0.1:1,slots=3000", "--backend", "127.0.0.1:2,slots=334"]
    p = limited_cli(["-l", "127.0.0.1:0", *pool], nofile=20000)
    try:
        assert p.wait() == 2, p.output()
        [line] = p.lines
        assert line.startswith("tcplock: error: the backends' slots (3000 + 334) are more"), line
        assert "descriptor limit of 20000 allows: at most 3333" in line, line
    finally:
        p.kill()


def test_a_backend_keeps_its_own_slots_when_the_global_value_changes(make_backend):
    backends = [make_backend("echo") for _ in range(2)]
    a, b = ((LOOPBACK, x.server_port) for x in backends)
    lock = TCPLock((LOOPBACK, 0), backends=[(*a, {"slots": 2}), b])
    lock.start()
    try:
        assert [x["slots"] for x in lock.status()["backends"]] == [2, 1]
        lock.slots = 3
        assert [x["slots"] for x in lock.status()["backends"]] == [2, 3]
        lock.set_backends([a, (*b, {"slots": 4})])  # taken away and given, on a running lock
        assert [x["slots"] for x in lock.status()["backends"]] == [3, 4]
    finally:
        lock.stop(timeout=0)


@pytest.mark.parametrize(
    "env, where",
    [
        ({"TCPLOCK_BACKEND": "127.0.0.1:2003,slot=2"}, "TCPLOCK_BACKEND"),
        ({"TCPLOCK_BACKEND": "[127.0.0.1:2003,slots=0, 127.0.0.1:2004]"}, "TCPLOCK_BACKEND"),
        ({}, "line 1"),
    ],
)
def test_a_bad_backend_option_names_where_it_was_written(env, where, tmp_path):
    conf = tmp_path / "bad.conf"
    conf.write_text("backend = 127.0.0.1:2003,slots=two\n")
    args = ["-l", "127.0.0.1:0"] + ([] if env else ["-c", str(conf)])
    status, _out, err = run_cli(*args, env=env)
    assert status == 2 and len(err.strip().splitlines()) == 1, err
    assert where in err and "slot" in err and "Traceback" not in err


@pytest.mark.parametrize(
    "args",
    [
        ["--backend", "127.0.0.1:2003,slot=2"],
        ["--backend", "127.0.0.1:2003,slots=0"],
        ["--backend", "127.0.0.1:2003,slots"],
        ["--backend", "127.0.0.1:2003,slots=1,slots=2"],
        ["--backend", "127.0.0.1:2003", "-p", "2004"],
        ["--backend", "127.0.0.1:2003", "--proxy-host", "127.0.0.1"],
        ["--backend", "127.0.0.1:2003", "--demo"],
        ["--backend", "2003"],
        ["--backend", "127.0.0.1:0"],
        ["--backend", "127.0.0.1:70000"],
        ["--backend", "[::1]"],
        ["--backend", "127.0.0.1:2003", "--backend", "127.0.0.1:2003"],
    ],
)
def test_backend_usage_errors(args):
    status, _out, err = run_cli("-l", "127.0.0.1:0", *args)
    assert status == 2
    assert len(err.strip().splitlines()) == 1 and "--backend" in err and "Traceback" not in err


def test_the_library_checks_backends():
    for bad in ([], [("127.0.0.1", 0)], [("127.0.0.1",)], [("127.0.0.1", 1), ("127.0.0.1", 1)]):
        with pytest.raises(ValueError, match="backends"):
            TCPLock((LOOPBACK, 0), backends=bad)
    with pytest.raises(ValueError, match="not both"):
        TCPLock((LOOPBACK, 0), (LOOPBACK, 1), backends=[(LOOPBACK, 2)])
    for own in ({"slot": 2}, {"slots": 0}, {"slots": "2"}, [("slots", 2)]):
        with pytest.raises(ValueError, match="backends: 127.0.0.1:1: .*slot"):
            TCPLock((LOOPBACK, 0), backends=[("127.0.0.1", 1, own)])
    lock = TCPLock((LOOPBACK, 0), backends=[("::1", 2003), ("127.0.0.1", "2004")])
    assert [b.label for b in lock.backends] == ["[::1]:2003", "127.0.0.1:2004"]


def test_a_restart_due_on_a_backend_that_refused_still_runs(make_backend, make_pool):
    # The first client is the K-th of the dead backend (K = 1) and is sent on to the live one:
    # the restart it called for runs all the same, and the dead backend does not stay closed
    # as "restarting". (It answered its check at start, then died.)
    dying, live = make_backend("echo"), make_backend("echo")
    restarted = []
    lock = make_pool(
        [dying.server_port, live.server_port],
        restart=lambda reason, backend: restarted.append(backend.index),
        restart_every=1,
        ready_timeout=None,
    )
    dying.stop(timeout=0)
    c = connect(lock.server_port)
    c.sendall(b"x")
    assert recv_exactly(c, 1) == b"x"
    c.close()
    wait_until(lambda: 1 in restarted, what="the dead backend's restart")
    wait_until(lambda: lock.status()["backends"][0]["state"] == "down")
    assert live.count == 1


def test_the_agent_weight_falls_as_the_pool_fills(make_backend, make_pool):
    backends = [make_backend("hold") for _ in range(2)]
    lock = make_pool([b.server_port for b in backends])
    assert agent_reply(lock) == "up ready 100%\n"
    a = connect(lock.server_port)
    backends[0].next_conn()
    assert agent_reply(lock) == "up ready 66%\n"
    b = connect(lock.server_port)
    backends[1].next_conn()
    assert agent_reply(lock) == "up ready 50%\n"
    c = connect(lock.server_port)
    wait_until(lambda: lock.queued == 1)
    assert agent_reply(lock) == "up ready 40%\n"
    lock.drain_backend(f"{LOOPBACK}:{backends[0].server_port}")
    assert agent_reply(lock) == "up ready 33%\n"  # one slot takes clients: one on it, one waits
    lock.drain_backend(f"{LOOPBACK}:{backends[1].server_port}")
    assert agent_reply(lock) == "drain\n"
    for s in (a, b, c):
        s.close()


def test_a_backend_that_does_not_answer_is_left_for_another(make_backend, make_pool, conn_log):
    # A backend whose accept queue is full drops the SYN: the connection is never refused,
    # it times out. The client then goes to the next backend, and the silent one is down.
    # (The check at start fills its queue: it answered, and accepts nothing more.)
    silent = _stdsocket.socket()
    silent.bind((LOOPBACK, 0))
    silent.listen(0)
    try:
        live = make_backend("echo")
        lock = make_pool([silent.getsockname()[1], live.server_port], connect_timeout=0.5)
        c = connect(lock.server_port)
        c.sendall(b"hello")
        assert recv_exactly(c, 5, timeout=10) == b"hello"
        c.close()
        assert conn_log.next_end()["end"] == "closed"
        assert [b["state"] for b in lock.status()["backends"]] == ["down", "up"]
    finally:
        silent.close()


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead for our purposes
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except OSError:
        return False


def test_orphaned_restart_with_no_holder_outlives_stop(make_backend, make_lock, tmp_path):
    # The K-th client of a dead backend is sent on to the live one; the restart it called for
    # runs with no connection holding the backend. stop() must not leave it running.
    dying, live = make_backend("echo"), make_backend("echo")
    pidfile = tmp_path / "pid"
    hook = CommandHook(f"echo $$ > {pidfile}; exec sleep 30", "restart")
    lock = make_lock(
        [dying.server_port, live.server_port],
        restart=hook,
        restart_every=1,
        ready_timeout=None,
        connect_timeout=5,
    )
    dying.stop(timeout=0)  # it answered its check at start; now it refuses
    c = connect(lock.server_port)
    c.sendall(b"x")
    assert recv_exactly(c, 1) == b"x"
    c.close()
    wait_until(lambda: pidfile.exists() and pidfile.read_text().strip(), what="restart runs")
    pid = int(pidfile.read_text())
    lock.stop(timeout=0.2)
    gevent.sleep(0.5)
    try:
        assert not _alive(pid), "the restart command outlived stop()"
    finally:
        try:
            os.killpg(pid, 9)
        except OSError:
            pass


def test_requeued_client_still_has_its_queue_timeout(make_backend, make_lock, conn_log):
    live, dying = make_backend("hold"), make_backend("echo")
    lock = make_lock([live.server_port, dying.server_port], queue_timeout=0.3, connect_timeout=5)
    dying.stop(timeout=0)  # it answered its check at start; now it refuses
    a = connect(lock.server_port)
    live.next_conn()  # A holds the live backend's only slot
    b = connect(lock.server_port)  # B is granted the dead one, refused, back to the queue
    b.sendall(b"req")
    wait_until(lambda: lock.queued == 1, what="B back in the queue")
    started = time.monotonic()
    try:
        try:  # closed at its queue timeout: with its request unread, the kernel resets it
            assert recv_all(b, timeout=3) == b""
        except ConnectionResetError:
            pass
        assert time.monotonic() - started < 2
        assert conn_log.next_end(timeout=1)["end"] == "queue-timeout"
    finally:
        live.release_all()
        a.close()
        b.close()


def test_requeued_client_that_leaves_is_noticed(make_backend, make_lock, conn_log):
    live, dying = make_backend("hold"), make_backend("echo")
    lock = make_lock([live.server_port, dying.server_port], connect_timeout=5)
    dying.stop(timeout=0)  # it answered its check at start; now it refuses
    a = connect(lock.server_port)
    live.next_conn()
    b = connect(lock.server_port)  # sends nothing; goes to the dead one, back to the queue
    wait_until(lambda: lock.queued == 1, what="B back in the queue")
    b.close()  # B gives up waiting
    try:
        assert conn_log.next_end(timeout=3)["end"] == "left-queue"
        assert lock.queued == 0
    finally:
        live.release_all()
        a.close()


def test_a_client_requeued_while_stopping_is_ended_and_leaves_nothing(
    make_backend, make_lock, conn_log
):
    # X is connecting to a backend that drops SYNs when stop() begins; when its connect times
    # out it is put back in the queue, after stop() cancelled the queue. It must end as
    # shutdown, and stop() must not trip over its ticket left in the gate.
    import socket as _stdsocket

    silent = _stdsocket.socket()
    silent.bind((LOOPBACK, 0))
    silent.listen(0)  # the check at start fills its queue: it answered, then drops SYNs
    live = make_backend("hold")
    lock = make_lock([silent.getsockname()[1], live.server_port], connect_timeout=0.5)
    try:
        x = connect(lock.server_port)
        x.sendall(b"x")
        wait_until(lambda: lock.backends[0].held == 1, what="X connecting to the silent one")
        y = connect(lock.server_port)
        y.sendall(b"y")
        live.next_conn()
        stopper = gevent.spawn(lock.stop, 1.5)
        stopper.join(5)
        assert stopper.ready()
        stopper.get()  # raises what stop() raised
        assert lock.gate.held == 0 and not lock.connections
    finally:
        silent.close()
        live.release_all()


def counters(lock, status_port):
    """Every count of clients let through and finished, as the lock, /status and /metrics
    give them."""
    st = json.loads(http(status_port)[2])
    body = http(status_port, path="/metrics")[2].decode()
    samples = [s for f in text_string_to_metric_families(body) for s in f.samples]
    return {
        "lock": (lock.activations, lock.served, [b.activations for b in lock.backends]),
        "status": (st["activations"], st["served"], [b["activations"] for b in st["backends"]]),
        "metrics by backend": [
            s.value for s in samples if s.name == "tcplock_backend_connections_total"
        ],
        "ended": dict(lock.ended),
        "metrics by end": {
            s.labels["reason"]: s.value
            for s in samples
            if s.name == "tcplock_connections_total" and s.value
        },
    }


def test_a_client_requeued_by_a_refusing_backend_is_counted_once(
    make_backend, make_pool, conn_log, tmp_path
):
    seen = tmp_path / "activations"
    hook = CommandHook(f"echo $TCPLOCK_ACTIVATION $TCPLOCK_CLIENT >> {seen}", "on-activate")
    dying, live = make_backend("echo"), make_backend("echo")
    lock = make_pool([dying.server_port, live.server_port], on_activate=hook, connect_timeout=60)
    dying.stop(timeout=0)  # it answered its check at start; now it refuses
    status = StatusServer((LOOPBACK, 0), lock)
    status.start()
    try:
        clients = []
        for i in range(3):  # the first is granted the dead backend, refused, and requeued
            c = connect(lock.server_port)
            c.sendall(b"%d" % i)
            assert recv_exactly(c, 1, timeout=10) == b"%d" % i
            clients.append(c.getsockname())
            c.close()
            assert conn_log.next_end()["end"] == "closed"
        assert [b.state for b in lock.backends] == ["down", "up"]
        assert counters(lock, status.server_port) == {
            "lock": (3, 3, [0, 3]),
            "status": (3, 3, [0, 3]),
            "metrics by backend": [0, 3],
            "ended": {"closed": 3},
            "metrics by end": {"closed": 3},
        }
        # The hook ran twice for the first client (once per grant), with the same number.
        by_client = {}
        for line in seen.read_text().split("\n")[:-1]:
            number, client = line.split()
            by_client.setdefault(client, set()).add(int(number))
        assert by_client == {f"{h}:{p}": {n} for n, (h, p) in enumerate(clients, 1)}
        assert len(seen.read_text().split("\n")[:-1]) == 4
    finally:
        status.stop(timeout=0)


def test_a_requeued_client_that_leaves_the_queue_is_not_counted_as_let_through(
    make_backend, make_lock, conn_log
):
    live, dying = make_backend("hold"), make_backend("echo")
    lock = make_lock([live.server_port, dying.server_port], connect_timeout=5)
    dying.stop(timeout=0)  # it answered its check at start; now it refuses
    status = StatusServer((LOOPBACK, 0), lock)
    status.start()
    a = connect(lock.server_port)
    try:
        live.next_conn()  # A holds the live backend's only slot
        b = connect(lock.server_port)  # granted the dead one, refused, back to the queue
        wait_until(lambda: lock.queued == 1, what="B back in the queue")
        b.close()
        assert conn_log.next_end(timeout=3)["end"] == "left-queue"
        live.release_all()
        a.close()
        conn_log.next_end(timeout=3)
        got = counters(lock, status.server_port)
        ended = got.pop("ended")
        assert got.pop("metrics by end") == ended and sum(ended.values()) == 2
        assert got == {
            "lock": (1, 1, [1, 0]),
            "status": (1, 1, [1, 0]),
            "metrics by backend": [1, 0],
        }
    finally:
        live.release_all()
        a.close()
        status.stop(timeout=0)


def test_no_check_of_a_down_backend_runs_while_a_client_holds_it(make_pool, conn_log, tmp_path):
    # A backend that is down is checked (here by a ready command that takes a while) until it
    # answers; being the only one, it still takes clients, each tried on it for connect_timeout.
    # A check and a client never have it at once: no check starts while a client holds it, and
    # no client is let in while a check of it runs.
    runs = tmp_path / "checks"
    stamp = "$(date +%s.%N)"
    command = f"echo start {stamp} >> {runs}; sleep 0.3; echo end {stamp} >> {runs}; exit 1"
    lock = make_pool([free_port()], ready_cmd=command, check_interval=0.05, connect_timeout=0.5)
    wait_until(lambda: lock.status()["backends"][0]["state"] == "down", what="down")
    held = []
    lock.end_observers.append(lambda c: held.append((time.time() - c.active_seconds, time.time())))
    for _ in range(3):
        # Each client comes as a check runs, and the checks go on after it.
        begun = runs.read_text().count("start")
        wait_until(lambda n=begun: runs.read_text().count("start") > n, what="a check")
        c = connect(lock.server_port)
        assert recv_all(c, timeout=10) == b""
        c.close()
        assert conn_log.next_end(timeout=10)["end"] == "backend-refused"
    checks, started = [], None
    for line in runs.read_text().split("\n"):
        if line.startswith("start "):
            started = float(line.split()[1])
        elif line.startswith("end ") and started is not None:
            checks.append((started, float(line.split()[1])))
            started = None
    if started is not None:
        checks.append((started, float("inf")))  # still running
    assert len(checks) >= 4
    overlaps = [
        (check, client)
        for check in checks
        for client in held
        if check[0] < client[1] - 0.02 and check[1] > client[0] + 0.02
    ]
    assert not overlaps, overlaps
