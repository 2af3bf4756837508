"""Backends that tcplock runs itself (--backend-cmd): started with the lock, restarted every K
clients, after a crash and above a memory limit, held until ready, and never left behind, even
when tcplock is killed.

The backend is ``tests/backends/pidserver.py``, which tells each client its process id."""

import json
import os
import re
import signal
import sys
import time
from pathlib import Path

import gevent
import pytest

from conftest import (
    LOOPBACK,
    connect,
    free_port,
    http,
    pids_in,
    process_alive,
    run_cli,
    wait_until,
)
from tcplock import TCPLock
from tcplock.status import Metrics, StatusServer
from tcplock.supervise import OUTPUT_LINES_PER_SECOND

pytestmark = pytest.mark.timeout(60)

PIDSERVER = Path(__file__).resolve().parent / "backends" / "pidserver.py"


def pidserver(*options):
    """A --backend-cmd running the pid server on the backend's port."""
    extra = " ".join(str(o) for o in options)
    return f"exec {sys.executable} {PIDSERVER} --port $TCPLOCK_BACKEND_PORT {extra}"


def ask(port, timeout=10.0):
    """One client: (pid, grandchild pid, backend index, backend label) of the backend that
    served it."""
    c = connect(port, timeout=timeout)
    try:
        c.sendall(b"?")
        line = b""
        while not line.endswith(b"\n"):
            chunk = c.recv(100)
            assert chunk, f"closed without an answer after {line!r}"
            line += chunk
    finally:
        c.close()
    pid, grandchild, index, label = line.decode().split()
    return int(pid), int(grandchild), int(index), label


alive = process_alive


def group_of(pid):
    with open(f"/proc/{pid}/stat", "rb") as f:
        data = f.read()
    return int(data[data.rindex(b")") + 2 :].split()[2])


def in_group(pgid):
    """The live processes of a process group."""
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit() and alive(int(name)):
            try:
                if group_of(int(name)) == pgid:
                    found.append(int(name))
            except (OSError, ValueError):
                pass
    return found


@pytest.fixture
def supervised(make_lock, pidfile):
    """A started lock running ``n`` pid servers itself (more settings as keywords)."""

    def make(n=1, *options, **kw):
        kw.setdefault("backend_cmd", pidserver("--pidfile", pidfile, *options))
        return make_lock([free_port() for _ in range(n)], **kw)

    return make


def test_each_backend_is_started_with_its_environment_and_its_output_is_logged(
    supervised, conn_log
):
    lock = supervised(2)
    labels = [b.label for b in lock.backends]
    wait_until(lambda: all(b.state == "up" for b in lock.backends), timeout=15)
    first, second = ask(lock.server_port), ask(lock.server_port)
    assert {first[2:], second[2:]} == {(1, labels[0]), (2, labels[1])}
    assert first[0] != second[0]
    status = {b["address"]: b for b in lock.status()["backends"]}
    for pid, _, _, label in (first, second):
        # The status names the process group that runs it, led by tcplock's watcher.
        assert group_of(pid) == status[label]["pid"]
        assert status[label]["rss_bytes"] > 1 << 20
    for label in labels:
        wait_until(
            lambda label=label: any(
                f"backend {label}: pidserver says hello on stderr" in line
                for line in conn_log.lines
            ),
            what="the backend's output in the log",
        )


def test_clients_wait_in_the_queue_until_the_backend_is_ready(supervised, tmp_path):
    ready = tmp_path / "ready"
    lock = supervised(1, ready_cmd=f"test -e {ready}")
    c = connect(lock.server_port)
    # The server listens within a fraction of a second; the client waits for the ready command.
    backend_port = lock.backends[0].address[1]

    def listening():
        try:
            connect(backend_port, timeout=1).close()
            return True
        except OSError:
            return False

    wait_until(listening, timeout=15, what="the backend to listen")
    gevent.sleep(0.3)  # time enough for a lock that wrongly took listening for ready to let it in
    assert lock.queued == 1 and lock.backends[0].state == "starting"
    assert lock.status()["backends"][0]["pid"] is not None
    ready.touch()
    c.settimeout(5)
    assert c.recv(100)
    c.close()
    assert lock.backends[0].state == "up"


def test_healthz_is_down_until_a_supervised_backend_is_first_ready_not_while_it_restarts(
    supervised, tmp_path
):
    ready = tmp_path / "ready"
    lock = supervised(1, ready_cmd=f"test -e {ready}", restart_every=1)
    status = StatusServer((LOOPBACK, 0), lock)
    status.start()

    def health():
        code, _, body = http(status.server_port, path="/healthz")
        return code, json.loads(body)

    try:
        # Starting: its command runs, but it is not ready yet.
        assert lock.backends[0].state == "starting"
        assert health() == (503, {"status": "down", "backends_up": 0})
        ready.touch()
        wait_until(lambda: lock.backends[0].state == "up", timeout=10)
        assert health() == (200, {"status": "ok", "backends_up": 1})
        # Restarted after each client: once ready before, it counts as up meanwhile.
        ready.unlink()
        ask(lock.server_port)
        wait_until(lambda: lock.backends[0].state == "restarting", timeout=10)
        assert health() == (200, {"status": "ok", "backends_up": 1})
        ready.touch()
        wait_until(lambda: lock.backends[0].state == "up", timeout=10)
        assert health() == (200, {"status": "ok", "backends_up": 1})
    finally:
        status.stop(timeout=0)


def test_restart_every_k_clients_of_each_backend(supervised, pidfile):
    lock = supervised(2, restart_every=2)
    seen = {1: [], 2: []}
    for _ in range(10):
        pid, _, index, _ = ask(lock.server_port)
        seen[index].append(pid)
        wait_until(lambda: lock.active == [])
    for pids in seen.values():
        # (A client goes to the other backend while one restarts: not strictly in turn.)
        assert len(pids) >= 3, seen
        runs = [pids[i : i + 2] for i in range(0, len(pids), 2)]
        assert all(len(set(run)) == 1 for run in runs), seen
        assert len({run[0] for run in runs}) == len(runs), seen
        assert not alive(pids[0])  # the old one was stopped
    wait_until(lambda: not lock.restarting, timeout=10)
    assert [b.restarts for b in lock.backends] == [len(seen[i]) // 2 for i in (1, 2)]


def test_a_killed_backend_is_started_again_and_later_clients_are_served(
    supervised, pidfile, conn_log
):
    lock = supervised(1)
    holder = connect(lock.server_port, timeout=10)
    pid = int(holder.recv(100).split()[0])
    waiting = connect(lock.server_port)
    wait_until(lambda: lock.queued == 1)
    os.kill(pid, signal.SIGKILL)
    # The connection that was on it ends as the backend ended it.
    holder.settimeout(5)
    assert holder.recv(100) == b""
    holder.close()
    wait_until(lambda: any("its command was killed by SIGKILL" in m for m in conn_log.lines))
    assert lock.queued == 1
    record = next(r for r in conn_log.records if "killed by SIGKILL" in r.getMessage())
    assert record.levelname == "WARNING"
    assert lock.backends[0].up is False
    # The waiting client kept its place, and gets the new process.
    waiting.settimeout(10)
    new_pid = int(waiting.recv(100).split()[0])
    waiting.close()
    assert new_pid != pid and alive(new_pid)
    assert any("starting it again in 1s" in m for m in conn_log.lines)
    wait_until(lambda: lock.backends[0].state == "up")
    assert ask(lock.server_port)[0] == new_pid
    # Ending again soon after, it waits twice as long before it is started again.
    os.kill(new_pid, signal.SIGKILL)
    wait_until(lambda: any("starting it again in 2s" in m for m in conn_log.lines))
    assert not any(r.exc_info for r in conn_log.records)


@pytest.mark.timeout(30)
def test_a_command_that_writes_without_pause_does_not_hold_up_tcplock(
    supervised, pidfile, conn_log
):
    """Output that is always there to read (``yes`` in the backend's group, for as long as it
    runs) is passed on within a budget per second: clients are served meanwhile, the log says
    how many lines were dropped, what it logs stays within the budget, and the stop ends it."""
    started = time.monotonic()
    lock = supervised(1, backend_cmd="yes flood & " + pidserver("--pidfile", pidfile))
    ticks = []

    def tick():
        while True:
            gevent.sleep(0.01)
            ticks.append(time.monotonic())

    ticker = gevent.spawn(tick)
    try:
        for _ in range(3):
            assert ask(lock.server_port)[2] == 1
            wait_until(lambda: lock.active == [])
        wait_until(
            lambda: any("of its output dropped" in m for m in conn_log.lines),
            what="the count of dropped lines",
        )
        assert ask(lock.server_port)[2] == 1  # served while the flood goes on
        assert len(ticks) > 10  # the loop ran its timers all along (a second or more)
    finally:
        ticker.kill()
    label = lock.backends[0].label
    notes = [m for m in conn_log.lines if "of its output dropped" in m]
    for note in notes:
        count = re.match(rf"backend {re.escape(label)}: (\d+) lines? of its output dropped", note)
        assert count and int(count.group(1)) > 0, note
    logged = sum(1 for m in conn_log.lines if m == f"backend {label}: flood")
    took = time.monotonic() - started
    assert 0 < logged <= (took + 1) * OUTPUT_LINES_PER_SECOND
    lock.stop(timeout=0)
    assert not any(alive(pid) for pid in pids_in(pidfile))


def test_a_backend_above_its_memory_limit_is_restarted_before_its_next_client(supervised, conn_log):
    lock = supervised(1, "--hold-mb", 40, restart_above_rss=100 << 20)
    metrics = Metrics(lock)
    first = ask(lock.server_port)[0]
    wait_until(lambda: lock.active == [])
    assert ask(lock.server_port)[0] == first
    wait_until(lambda: lock.active == [])
    rss = lock.status()["backends"][0]["rss_bytes"]
    assert 80 << 20 < rss < 100 << 20
    text = metrics.exposition()[0].decode()
    label = lock.backends[0].label
    assert f'tcplock_backend_rss_bytes{{backend="{label}"}} {float(rss):.1f}' in text or (
        f'tcplock_backend_rss_bytes{{backend="{label}"}}' in text
    )
    assert ask(lock.server_port)[0] == first  # the third: now it holds 120 MiB and more
    fourth = ask(lock.server_port)[0]
    assert fourth != first
    line = next(m for m in conn_log.lines if "more than its limit" in m)
    assert f"backend {label} uses 1" in line and "MiB" in line and "limit of 100.0 MiB" in line
    assert lock.backends[0].restarts == 1


def test_a_backend_that_ignores_sigterm_is_killed_after_the_stop_timeout(pidfile, conn_log):
    lock = TCPLock(
        (LOOPBACK, 0),
        backends=[(LOOPBACK, free_port())],
        backend_cmd=pidserver("--pidfile", pidfile, "--ignore-term", "--fork"),
        stop_timeout=0.5,
    )
    lock.start()
    try:
        pid, grandchild, _, _ = ask(lock.server_port)
    finally:
        started = time.monotonic()
        lock.stop(timeout=0)
    took = time.monotonic() - started
    assert 0.5 <= took < 5
    assert not alive(pid) and not alive(grandchild)
    assert any("still running 0.5s after SIGTERM" in m for m in conn_log.lines)


def test_stopping_while_a_backend_is_not_yet_ready_stops_it(supervised, pidfile, conn_log):
    lock = supervised(1, ready_cmd="false", stop_timeout=5)
    wait_until(lambda: pids_in(pidfile), timeout=10, what="the pid server")
    started = time.monotonic()
    lock.stop(timeout=0)
    assert time.monotonic() - started < 3
    assert not any(alive(pid) for pid in pids_in(pidfile))


def test_a_stop_just_after_the_start_does_not_wait_for_the_stop_timeout():
    """Stopped at every moment of its first tens of milliseconds (before and while its command
    is being run), a backend's group ends on the SIGTERM, not after the stop timeout."""
    slow = []
    for delay in range(60):
        lock = TCPLock(
            (LOOPBACK, 0),
            backends=[(LOOPBACK, free_port())],
            backend_cmd="exec sleep 30",
            stop_timeout=5,
        )
        lock.start()
        gevent.sleep(delay / 1000)
        started = time.monotonic()
        lock.stop(timeout=0)
        took = time.monotonic() - started
        if took > 2:
            slow.append((delay, round(took, 1)))
            break
    assert not slow, f"stopped {slow[0][0]}ms after the start, it took {slow[0][1]}s"


def test_the_ready_command_also_decides_when_a_backend_that_was_down_is_back(make_lock, tmp_path):
    from gevent.server import StreamServer

    other = StreamServer((LOOPBACK, 0), lambda sock, _addr: sock.sendall(b"other\n"))
    other.start()
    (tmp_path / f"ready-{other.server_port}").touch()
    port = free_port()
    ready = tmp_path / f"ready-{port}"
    lock = make_lock(
        [port, other.server_port],
        ready_cmd=f"test -e {tmp_path}/ready-$TCPLOCK_BACKEND_PORT",
        check_interval=0.1,
    )
    try:
        c = connect(lock.server_port)
        assert c.recv(100) == b"other\n"  # the first was not ready at start: down
        c.close()
        first = lock.backends[0]
        assert first.state == "down"
        late = StreamServer((LOOPBACK, port), lambda sock, _addr: sock.sendall(b"back\n"))
        late.start()
        try:
            gevent.sleep(0.5)  # it accepts connections, but is not ready yet
            assert first.state == "down"
            ready.touch()
            wait_until(lambda: first.state == "up", timeout=5)
        finally:
            late.stop()
    finally:
        other.stop()


def test_the_library_refuses_a_restart_callable_with_a_backend_command():
    with pytest.raises(ValueError, match="backend_cmd and restart"):
        TCPLock((LOOPBACK, 0), backend_cmd="true", restart=print)
    with pytest.raises(ValueError, match="restart_above_rss needs backend_cmd"):
        TCPLock((LOOPBACK, 0), restart_above_rss=1 << 30)
    TCPLock((LOOPBACK, 0), backend_cmd="true", restart_every=3, restart_on_timeout=True)


# -- the command ----------------------------------------------------------------------------


def supervised_cli(cli, *args, backends=1, env=None):
    ports = [free_port() for _ in range(backends)]
    options = [a for p in ports for a in ("--backend", f"{LOOPBACK}:{p}")]
    return cli("-l", "127.0.0.1:0", *options, *args, env=env)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--backend-cmd", "x", "--restart-cmd", "y"], "--backend-cmd and --restart-cmd"),
        (["--restart-above-rss", "1G", "--restart-cmd", "y"], "--restart-above-rss needs"),
        (["--backend-cmd", "x", "--restart-above-rss", "lots"], "invalid size 'lots'"),
        (["--backend-cmd", ""], "the command is empty"),
    ],
)
def test_usage_errors(args, message):
    status, out, err = run_cli("-l", "0", "--backend", "127.0.0.1:1", *args)
    assert status == 2 and not out
    assert err.count("\n") == 1 and message in err and "Traceback" not in err


def test_restarting_a_backend_tcplock_runs_needs_no_restart_command():
    from tcplock.cli import parse_args

    args = parse_args(
        ["-l", "0", "--backend", "127.0.0.1:1", "--backend-cmd", "x", "--restart-every", "5"],
        env={},
    )
    assert args.restart_every == 5 and args.restart_cmd is None


def test_a_command_that_exits_at_once_is_retried_with_a_growing_pause(cli):
    p = supervised_cli(
        cli, "--backend-cmd", "echo oops; exit 3", "--log-format", "json", "--status", "0"
    )
    p.wait_ready()
    retries = [p.wait_for(f"retrying in {n}s") for n in (1, 2)]
    for line in retries:
        record = json.loads(line)
        assert record["level"] == "ERROR"
        assert "its command exited with status 3 before it was ready" in record["message"]
    exited = json.loads(p.wait_for("its command exited with status 3"))
    assert exited["level"] == "WARNING"
    said = json.loads(p.wait_for("oops"))
    assert said["backend"] == said["message"].split()[1][:-1] and said["level"] == "INFO"
    assert p.proc.poll() is None
    assert "Traceback" not in p.output()
    p.signal(signal.SIGTERM)
    assert p.wait() == 0


def processes_of(p, pidfile):
    """The backend's pid server and its forked child, once listening, and the process group
    they are in."""
    wait_until(lambda: len(pids_in(pidfile)) == 2, timeout=15, what="the pid server")
    pids = pids_in(pidfile)
    pgid = group_of(pids[0])
    assert group_of(pids[1]) == pgid and pgid not in pids and alive(pgid)
    assert p.proc.pid not in in_group(pgid)
    return pids, pgid


def test_the_start_up_line_names_the_restarts_of_a_backend_tcplock_runs(cli, pidfile):
    p = supervised_cli(
        cli, "--backend-cmd", pidserver("--pidfile", pidfile), "--restart-above-rss", "100M"
    )
    p.wait_ready()
    line = p.wait_for("listening on")
    assert "restart above 100.0 MiB of memory and when its command ends;" in line, line


def test_no_backend_process_is_left_after_tcplock_stops(cli, pidfile):
    p = supervised_cli(cli, "--backend-cmd", pidserver("--fork", "--pidfile", pidfile))
    p.wait_ready()
    pids, pgid = processes_of(p, pidfile)
    assert ask(p.port)[0] == pids[0]
    p.signal(signal.SIGTERM)
    assert p.wait() == 0
    # tcplock returned only once they were gone.
    assert not any(alive(pid) for pid in pids) and in_group(pgid) == []
    p.wait_for("stopped")


def test_backends_die_with_a_killed_tcplock(cli, pidfile):
    p = supervised_cli(cli, "--backend-cmd", pidserver("--fork", "--pidfile", pidfile))
    p.wait_ready()
    pids, pgid = processes_of(p, pidfile)
    p.signal(signal.SIGKILL)
    p.wait()
    wait_until(lambda: in_group(pgid) == [], timeout=10, what="the backend's processes to die")
    assert not any(alive(pid) for pid in pids + [pgid])


def test_what_a_crashed_command_left_behind_dies_with_a_killed_tcplock(cli, pidfile):
    """The command's own process dies and leaves a child behind; tcplock is killed with SIGKILL
    during the pause before the restart. The child does not outlive it."""
    p = supervised_cli(cli, "--backend-cmd", pidserver("--fork", "--pidfile", pidfile))
    p.wait_ready()
    (main, child), pgid = processes_of(p, pidfile)
    os.kill(main, signal.SIGKILL)
    p.wait_for("its command was killed by SIGKILL")
    p.signal(signal.SIGKILL)
    p.wait()
    wait_until(lambda: not alive(child), timeout=10, what="the left-behind child to die")
    wait_until(lambda: in_group(pgid) == [], timeout=10, what="the whole group to die")


#: A helper in the backend's group that ignores SIGTERM, beside a command that ends on it.
HELPER = "(trap '' TERM; exec sleep 300) & "


def helped_backend(cli, pidfile, marked):
    """tcplock running a pid server with a helper that ignores SIGTERM; (tcplock, the pid
    server's pid, the group's id), once all three processes of the group run."""
    p = supervised_cli(
        cli,
        "--backend-cmd",
        HELPER + pidserver("--pidfile", pidfile),
        "--stop-timeout",
        "30",
        env=marked.env,
    )
    p.wait_ready()
    wait_until(lambda: pids_in(pidfile), timeout=15, what="the pid server")
    main = pids_in(pidfile)[0]
    pgid = group_of(main)
    wait_until(lambda: len(in_group(pgid)) == 3, what="the watcher, the helper, the pid server")
    return p, main, pgid


def test_a_helper_that_ignores_sigterm_dies_with_tcplock_killed_while_it_stops(
    cli, pidfile, marked
):
    """tcplock is stopping (SIGTERM): the command has ended, a helper ignoring SIGTERM is
    left, and tcplock is killed with SIGKILL within its stop timeout. The helper dies too."""
    p, main, pgid = helped_backend(cli, pidfile, marked)
    p.signal(signal.SIGTERM)
    wait_until(lambda: not alive(main) and not alive(pgid), what="the command to end")
    assert len(in_group(pgid)) >= 1  # the helper, waiting for the stop timeout
    p.signal(signal.SIGKILL)
    p.wait()
    wait_until(
        lambda: marked.alive() == [] and in_group(pgid) == [],
        timeout=10,
        what="the group's processes to die",
    )


def test_a_helper_left_by_a_crashed_command_dies_with_tcplock_killed_before_it_notices(
    cli, pidfile, marked
):
    """The command dies by itself while tcplock is held up (stopped, here) and cannot kill
    what is left of its group yet; then tcplock is killed with SIGKILL. The helper, which
    ignores SIGTERM, dies too."""
    p, main, pgid = helped_backend(cli, pidfile, marked)
    p.signal(signal.SIGSTOP)
    try:
        os.kill(main, signal.SIGKILL)
        wait_until(lambda: not alive(main) and not alive(pgid), what="the command to end")
        assert len(in_group(pgid)) >= 1  # the helper
    finally:
        p.signal(signal.SIGKILL)
    p.wait()
    wait_until(
        lambda: marked.alive() == [] and in_group(pgid) == [],
        timeout=10,
        what="the group's processes to die",
    )


def test_status_shows_each_backends_process_and_memory(cli, pidfile):
    p = supervised_cli(
        cli,
        "--backend-cmd",
        pidserver("--pidfile", pidfile),
        "--status",
        "127.0.0.1:0",
        backends=2,
    )
    p.wait_ready()
    line = p.wait_for(r"status on http://127.0.0.1:\d+/status")
    status_port = int(line.rsplit(":", 1)[1].split("/")[0])
    wait_until(lambda: len(pids_in(pidfile)) == 2, timeout=15)

    def backends():
        return json.loads(http(status_port)[2])["backends"]

    wait_until(lambda: all(b["state"] == "up" for b in backends()), timeout=15)
    for entry in backends():
        assert alive(entry["pid"]) and entry["rss_bytes"] > 1 << 20
    assert sorted(group_of(pid) for pid in pids_in(pidfile)) == sorted(b["pid"] for b in backends())
    metrics = http(status_port, path="/metrics")[2].decode()
    for entry in backends():
        assert f'tcplock_backend_rss_bytes{{backend="{entry["address"]}"}}' in metrics
    p.signal(signal.SIGTERM)
    assert p.wait() == 0


def test_a_backend_that_joins_a_running_pool_is_started_and_one_that_leaves_is_stopped(
    supervised,
):
    """The pool changed on a running lock (what a reload does): a new backend's command starts
    and it takes clients; a removed one finishes its client, then its process group ends."""
    lock = supervised(2)
    wait_until(lambda: all(b.state == "up" for b in lock.backends), timeout=15)
    first, second = (b.address for b in lock.backends)
    held = connect(lock.server_port)  # a client on the first backend, kept open
    held.sendall(b"?")
    answer = held.recv(100)
    pid, _, index, _ = answer.decode().split()
    assert index == "1"
    leaving = lock.status()["backends"][0]["pid"]
    assert in_group(leaving)
    third = (LOOPBACK, free_port())
    lock.set_backends([second, third])
    wait_until(lambda: lock.backend_named(third).state == "up", timeout=15)
    # The new backend runs its own process and serves; the leaving one gets no new client.
    clients = [connect(lock.server_port) for _ in range(3)]
    labels = set()
    for c in clients[:2]:
        c.sendall(b"?")
        labels.add(c.recv(100).decode().split()[3])
    assert labels == {f"{LOOPBACK}:{second[1]}", f"{LOOPBACK}:{third[1]}"}
    wait_until(lambda: lock.queued == 1, what="the third client to wait, not to go to the first")
    for c in clients:
        c.close()
    assert in_group(leaving), "a leaving backend's process runs until its client ends"
    held.close()
    wait_until(lambda: not in_group(leaving), timeout=15, what="the left backend's group gone")
    assert [b["address"] for b in lock.status()["backends"]] == [
        f"{LOOPBACK}:{second[1]}",
        f"{LOOPBACK}:{third[1]}",
    ]


def test_a_process_the_command_started_that_dies_gets_the_backend_started_again(supervised):
    """The command goes on, but a process of its group that was there when it became ready
    (LibreOffice under unoserver) died: the backend is started again, whether it was idle or
    serving, before another client reaches it."""
    lock = supervised(1, "--fork")
    wait_until(lambda: lock.backends[0].state == "up", timeout=15)
    pid, grandchild, _, _ = ask(lock.server_port)
    assert grandchild and alive(grandchild)
    os.kill(grandchild, signal.SIGKILL)  # while idle: noticed within a second or so
    wait_until(lambda: lock.status()["backends"][0]["restarts"] == 1, timeout=15)
    wait_until(lambda: lock.backends[0].state == "up", timeout=15)
    again, grandchild, _, _ = ask(lock.server_port)
    assert again != pid and not alive(pid)
    # While serving: the client's connection ends, and the next client waits for the restart.
    held = connect(lock.server_port)
    held.sendall(b"?")
    assert held.recv(100).split()[0] == str(again).encode()
    os.kill(grandchild, signal.SIGKILL)
    # Dead before the connection ends (a signal is delivered when its process next runs):
    # what has not died by then cannot be known to tcplock yet.
    wait_until(lambda: not alive(grandchild), timeout=10, what="the process to die")
    held.close()
    third, _, _, _ = ask(lock.server_port, timeout=20)
    assert third not in (pid, again)
