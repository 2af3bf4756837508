"""Standbys (--spares): backends tcplock runs, started and kept ready out of service, that take
the place of one that must restart, so that no client waits on a restart while one is ready;
each backend's operational and admin state with its cause, in /status and the metrics.

The backend is ``tests/backends/pidserver.py`` (it tells each client its process id), here made
slow to start (``--start-delay``): a client that waited on a restart waited that long."""

import json
import os
import signal
import time

import gevent
import pytest
from test_supervise import alive, ask, group_of, in_group, pids_in, pidserver

from conftest import LOOPBACK, connect, free_port, http, run_cli, wait_until
from tcplock import TCPLock

pytestmark = pytest.mark.timeout(60)

START = 2.0  # how long a backend takes to start, in seconds


@pytest.fixture
def farm(make_lock, pidfile):
    def make(n, **kw):
        kw.setdefault("backend_cmd", pidserver("--pidfile", pidfile, "--start-delay", START))
        kw.setdefault("ready_timeout", 20.0)
        return make_lock([free_port() for _ in range(n)], **kw)

    return make


def states(lock):
    return [b["state"] for b in lock.status()["backends"]]


def one_up_one_standby(lock):
    wait_until(lambda: sorted(states(lock)) == ["standby", "up"], timeout=20, what="a standby")


def queued_while_paused(lock, n):
    """Pause the lock and queue ``n`` clients, each having asked; they wait, in order, for the
    caller's ``lock.resume()``."""
    lock.pause()
    clients = []
    for i in range(n):
        c = connect(lock.server_port, timeout=20)
        c.sendall(b"?")
        clients.append(c)
        wait_until(lambda k=i + 1: lock.queued == k, what=f"{i + 1} queued")
    return clients


def served_after_waiting(lock, conn_log):
    """One client: the pid that served it, and how long it waited in the queue."""
    pid = ask(lock.server_port, timeout=20)[0]
    return pid, float(conn_log.next_end(timeout=20)["queued"])


def test_with_a_standby_no_client_waits_on_a_restart(farm, conn_log):
    lock = farm(2, restart_every=2, spares=1)
    served = []
    for _ in range(3):
        # Three clients at once, each round: one of them is the second of a backend, whose
        # restart is then due; the client after it goes to the standby at once.
        one_up_one_standby(lock)
        served += [served_after_waiting(lock, conn_log) for _ in range(3)]
    assert max(queued for _, queued in served) < START / 2, served
    pids = [pid for pid, _ in served]
    assert pids[1] != pids[2]  # the second was the last of its backend before the restart
    assert len(set(pids)) >= 4  # the two first processes, and restarted ones
    # (A backend whose count comes while the other restarts keeps its clients until the other
    # is ready again: three restarts in these nine clients, not four.)
    wait_until(lambda: lock.restarts >= 3, timeout=20)


def test_without_a_standby_a_client_waits_on_the_restart(farm, conn_log):
    lock = farm(1, restart_every=2)
    wait_until(lambda: states(lock) == ["up"], timeout=20)
    waits = [served_after_waiting(lock, conn_log)[1] for _ in range(3)]
    assert waits[2] >= START * 0.9, waits  # the third waited for the restart


def test_backends_that_reach_their_count_together_restart_one_after_the_other(farm):
    # Two backends in service take clients in turn, so they reach --restart-every together;
    # one standby can take the place of one. The other keeps taking clients until the first
    # is ready again as the standby, then restarts in its turn: the pool is never a backend
    # short, and no client waits on a restart.
    lock = farm(3, spares=1, restart_every=2)
    wait_until(
        lambda: sorted(states(lock)) == ["standby", "up", "up"], timeout=20, what="a standby"
    )
    in_service, waits = [], []
    began = time.monotonic()
    while lock.restarts < 3 and time.monotonic() - began < 30:
        pair = [gevent.spawn(ask, lock.server_port, 20) for _ in range(2)]
        t0 = time.monotonic()
        gevent.joinall(pair, timeout=20, raise_error=True)
        waits.append(time.monotonic() - t0)
        in_service.append(states(lock).count("up"))
        gevent.sleep(0.05)
    assert lock.restarts >= 3, (lock.restarts, in_service)
    assert min(in_service) == 2, in_service
    assert max(waits) < START / 2, waits


@pytest.mark.parametrize("own", [False, True], ids=["slots", "own-slots"])
def test_with_several_slots_no_client_waits_on_a_restart_while_a_standby_is_ready(farm, own):
    # Every client calls for a restart of its backend. Let in together, the second and third
    # are granted the two slots of the same backend (the standby put in service for the first
    # one's restart); the second's grant makes that backend's restart due as the third is
    # granted its other slot. A standby is ready: the third goes to it, and waits on no
    # restart. The slots are the lock's, or each backend's own.
    lock = farm(3, spares=2, restart_every=1, **({} if own else {"slots": 2}))
    if own:
        lock.set_backends([(LOOPBACK, b.address[1], {"slots": 2}) for b in lock.backends])
    wait_until(
        lambda: sorted(states(lock)) == ["standby", "standby", "up"], timeout=20, what="standbys"
    )
    clients = queued_while_paused(lock, 3)

    def answer(c):
        line = b""
        while not line.endswith(b"\n"):
            chunk = c.recv(100)
            assert chunk, f"closed without an answer after {line!r}"
            line += chunk
        c.close()
        return int(line.split()[2]), time.monotonic() - resumed

    resumed = time.monotonic()
    lock.resume()
    served = [gevent.spawn(answer, c) for c in clients]
    gevent.joinall(served, timeout=20, raise_error=True)
    served = [g.value for g in served]
    assert max(waited for _, waited in served) < START / 2, served
    assert sorted(index for index, _ in served) == [1, 2, 3], served


def test_clients_sent_back_as_their_backend_restarts_keep_their_order(farm):
    # Four clients, let in together, each calling for a restart: the first takes the backend
    # in service, the standby put in its place is granted the next three at once, and the
    # second's grant makes its restart due. No standby is left: the third and fourth go back
    # to the head of the queue, and are let in again in their order.
    lock = farm(2, spares=1, slots=3, restart_every=1)
    one_up_one_standby(lock)
    let_in = {}  # client number -> when it was let in (for good)
    lock.end_observers.append(
        lambda c: let_in.__setitem__(c.id, time.monotonic() - c.active_seconds)
    )
    clients = queued_while_paused(lock, 4)
    lock.resume()
    for c in clients:
        c.settimeout(20)
        assert c.recv(100)
        c.close()
    wait_until(lambda: len(let_in) == 4, timeout=20, what="four ends")
    assert let_in[3] < let_in[4], let_in


def test_a_standby_that_crashes_is_started_again_and_gets_no_client_before_ready(
    farm, pidfile, tmp_path
):
    ready = {i: tmp_path / f"ready-{i}" for i in (1, 2)}
    for path in ready.values():
        path.touch()
    lock = farm(2, spares=1, ready_cmd=f"test -e {tmp_path}/ready-$TCPLOCK_BACKEND_INDEX")
    one_up_one_standby(lock)
    status = lock.status()["backends"]
    standby = next(i for i, b in enumerate(status, 1) if b["state"] == "standby")
    in_service = 3 - standby
    pgid = status[standby - 1]["pid"]
    wait_until(lambda: len(pids_in(pidfile)) == 2, timeout=15, what="both pid servers")
    [pid] = [p for p in pids_in(pidfile) if alive(p) and group_of(p) == pgid]
    ready[standby].unlink()  # its next start is not ready until the file is back
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: lock.status()["backends"][standby - 1]["cause"] == "crashed")
    # Take the backend in service out: clients now have only the standby to wait for.
    lock.drain_backend(lock.backends[in_service - 1].label)
    client = connect(lock.server_port)
    port = lock.backends[standby - 1].address[1]

    def listening():
        try:
            connect(port, timeout=1).close()
            return True
        except OSError:
            return False

    wait_until(listening, timeout=20, what="the standby started again")
    gevent.sleep(0.5)  # time enough for a lock that wrongly took listening for ready
    assert lock.queued == 1 and states(lock)[standby - 1] == "restarting"
    ready[standby].touch()
    client.sendall(b"?")
    client.settimeout(10)
    answer = client.recv(100).split()
    client.close()
    assert int(answer[0]) != pid and int(answer[2]) == standby
    entry = lock.status()["backends"][standby - 1]
    assert (entry["state"], entry["admin"]) == ("up", "enabled")


def test_drain_and_enable_work_on_standbys_and_status_gives_state_admin_and_cause(farm):
    lock = farm(3, spares=1)
    wait_until(lambda: sorted(states(lock)) == ["standby", "up", "up"], timeout=20)
    status = lock.status()["backends"]
    standby = next(b for b in status if b["state"] == "standby")
    assert standby["operational"] == "standby" and standby["admin"] == "enabled"
    assert standby["standby"] is True and standby["cause"] == "started"
    serving = next(b for b in status if b["state"] == "up")
    # Drained, a backend in service is replaced by the standby at once.
    lock.drain_backend(serving["address"])
    entry = {b["address"]: b for b in lock.status()["backends"]}
    assert entry[serving["address"]]["admin"] == "draining"
    assert entry[serving["address"]]["cause"] == "drain request"
    assert entry[standby["address"]]["state"] == "up"
    assert entry[standby["address"]]["cause"] == "replaces one out of service"
    # Enabled again, it is the one too many: it stands by.
    lock.enable_backend(serving["address"])
    entry = {b["address"]: b for b in lock.status()["backends"]}
    assert entry[serving["address"]]["state"] == "standby"
    assert entry[serving["address"]]["cause"] == "enable request"
    # A standby drained stays out of service, and is not promoted.
    lock.drain_backend(serving["address"])
    assert sorted(states(lock)) == ["draining", "up", "up"]


def test_the_library_checks_spares():
    with pytest.raises(ValueError, match="spares needs backend_cmd"):
        TCPLock((LOOPBACK, 0), backends=[(LOOPBACK, 1), (LOOPBACK, 2)], spares=1)
    with pytest.raises(ValueError, match="fewer than the backends"):
        TCPLock((LOOPBACK, 0), backends=[(LOOPBACK, 1)], spares=1, backend_cmd="true")
    lock = TCPLock((LOOPBACK, 0), backends=[(LOOPBACK, 1), (LOOPBACK, 2)], backend_cmd="true")
    with pytest.raises(ValueError, match="fewer than the backends"):
        lock.spares = 2
    assert lock.spares == 0


@pytest.mark.parametrize(
    "args, message",
    [
        (["--spares", "1"], "--spares needs --backend-cmd"),
        (["--spares", "2", "--backend-cmd", "x"], "fewer than the backends"),
        (["--spares", "-1", "--backend-cmd", "x"], "--spares"),
    ],
)
def test_usage_errors(args, message):
    status, out, err = run_cli(
        "-l", "0", "--backend", "127.0.0.1:1", "--backend", "127.0.0.1:2", *args
    )
    assert status == 2 and not out
    assert err.count("\n") == 1 and message in err and "Traceback" not in err


@pytest.mark.parametrize("form", ["flags", "config", "environment"])
def test_the_command_keeps_a_standby_and_leaves_no_process_when_killed(
    form, cli, pidfile, tmp_path
):
    ports = [free_port() for _ in range(2)]
    args = ["-l", "127.0.0.1:0", "--status", "127.0.0.1:0"]
    args += [a for p in ports for a in ("--backend", f"{LOOPBACK}:{p}")]
    args += ["--backend-cmd", pidserver("--fork", "--pidfile", pidfile)]
    env = {}
    if form == "flags":
        args += ["--spares", "1"]
    elif form == "config":
        conf = tmp_path / "spares.conf"
        conf.write_text("spares = 1\n")
        args += ["-c", str(conf)]
    else:
        env["TCPLOCK_SPARES"] = "1"
    p = cli(*args, env=env)
    p.wait_ready()
    assert "with 1 of the backends kept ready as standbys" in p.wait_for("listening on")
    line = p.wait_for(r"status on http://127.0.0.1:\d+/status")
    status_port = int(line.rsplit(":", 1)[1].split("/")[0])

    def backends():
        return json.loads(http(status_port)[2])["backends"]

    wait_until(lambda: sorted(b["state"] for b in backends()) == ["standby", "up"], timeout=20)
    metrics = http(status_port, path="/metrics")[2].decode()
    standby = next(b["address"] for b in backends() if b["state"] == "standby")
    assert f'tcplock_backend_standby{{backend="{standby}"}} 1.0' in metrics
    p.wait_for(f"backend {standby} is ready as a standby")
    wait_until(lambda: len(pids_in(pidfile)) == 4, timeout=15, what="both pid servers")
    pids = pids_in(pidfile)
    groups = {group_of(pid) for pid in pids}
    p.signal(signal.SIGKILL)
    p.wait()
    wait_until(lambda: not any(in_group(g) for g in groups), timeout=10, what="no process left")
    assert not any(alive(pid) for pid in pids)
