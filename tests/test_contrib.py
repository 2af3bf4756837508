"""contrib/: gunicorn with one tcplock for all its workers, and the systemd unit.

The gunicorn tests run real gunicorn (gevent worker, 4 processes) in front of a backend in this
process that records how many connections it has at once. The systemd tests check the unit with
``systemd-analyze`` where it is installed, and in any case run the command the unit runs, with
the sample config, and check that it talks to $NOTIFY_SOCKET as ``Type=notify`` expects.
"""

import array
import importlib
import json
import os
import random
import re
import shlex
import shutil
import signal
import socket as _stdsocket
import subprocess as _stdsubprocess
import sys
import time
from pathlib import Path

import gevent
import pytest
import readme_commands as rc
from gevent import subprocess
from gevent.event import Event

from conftest import (
    LOOPBACK,
    ChildProcess,
    connect,
    http,
    recv_all,
    require_command,
    run_cli,
    wait_until,
)

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parent.parent
CONTRIB = ROOT / "contrib"
GUNICORN_DIR = CONTRIB / "gunicorn"
UNIT = CONTRIB / "systemd" / "tcplock.service"


# --- helpers ------------------------------------------------------------------------------


def free_port():
    """A port for a server started by a subprocess. Port 0 would leave the kernel to pick one,
    but the port must be known before the subprocess starts; so take a free one below the
    ephemeral range, where no outgoing connection can take it meanwhile."""
    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
        low = int(f.read().split()[0])
    for _ in range(100):
        port = random.randrange(max(1024, low - 12000), low)
        with _stdsocket.socket() as s:
            try:
                s.bind((LOOPBACK, port))
            except OSError:
                continue
            return port
    raise AssertionError("no free port found")


def slow_reply(conn):
    """Backend behaviour: read the request to EOF, work for 50 ms (cooperatively), answer, close."""
    while True:
        data = conn.sock.recv(65536)
        if not data:
            break
        conn.received += data
    gevent.sleep(0.05)
    conn.sock.sendall(b"answer to " + bytes(conn.received))
    conn.sock.close()


def refused(port):
    try:
        _stdsocket.create_connection((LOOPBACK, port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False


# --- gunicorn ------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def gunicorn_installed():
    """gunicorn is not a dependency of tcplock; install it for these tests if it is missing."""
    try:
        import gunicorn  # noqa: F401
    except ImportError:
        _stdsubprocess.run(
            [sys.executable, "-m", "pip", "install", "--quiet", "gunicorn"],
            stdin=_stdsubprocess.DEVNULL,
            check=True,
            timeout=300,
        )
        importlib.invalidate_caches()
        import gunicorn  # noqa: F401


class Gunicorn(ChildProcess):
    """``gunicorn -k gevent -w 4 -c gunicorn.conf.py app:app`` in contrib/gunicorn."""

    LISTENING = re.compile(r"Listening at: http://[\d.]+:(\d+)")
    TCPLOCK = re.compile(r"tcplock \(pid (\d+)\) on 127\.0\.0\.1:(\d+)")
    WORKER = re.compile(r"Booting worker with pid: (\d+)")
    clean_prefixes = ("TCPLOCK_", "APP_")

    def __init__(self, env, runtime_dir, args=("-c", "gunicorn.conf.py", "app:app"), cwd=None):
        # XDG_RUNTIME_DIR: where gunicorn 25+ puts its control socket.
        runtime_dir.mkdir(exist_ok=True)
        workers = 4
        self.port = self.tcplock_pid = self.lock_port = None
        self.workers = set()
        self.booted = Event()
        self.expected_workers = workers
        # A gevent worker takes at most 5 connections at a time here, so that 20 requests at
        # once cannot all land in one worker: they are spread over the 4 worker processes.
        super().__init__(
            [sys.executable, "-m", "gunicorn", "-k", "gevent", "-w", str(workers)]
            + ["--worker-connections", "5", "-b", f"{LOOPBACK}:0", *args],
            env=dict(env, XDG_RUNTIME_DIR=str(runtime_dir)),
            cwd=cwd or GUNICORN_DIR,
        )

    def on_line(self, line):
        if m := self.LISTENING.search(line):
            self.port = int(m.group(1))
        elif m := self.TCPLOCK.search(line):
            self.tcplock_pid, self.lock_port = int(m.group(1)), int(m.group(2))
        elif m := self.WORKER.search(line):
            self.workers.add(int(m.group(1)))
            if len(self.workers) == self.expected_workers:
                self.booted.set()

    def on_eof(self):
        self.booted.set()

    def wait_booted(self, timeout=60):
        self.booted.wait(timeout)
        assert len(self.workers) == self.expected_workers and self.port, (
            "gunicorn did not start:\n" + self.output()
        )


@pytest.fixture
def gunicorn(gunicorn_installed, tmp_path):
    started = []

    def run(env, **kw):
        g = Gunicorn(env, tmp_path / f"run{len(started)}", **kw)
        started.append(g)
        return g

    yield run
    for g in started:
        g.kill()
        if g.tcplock_pid:  # never leave a tcplock behind, whatever the test did
            try:
                os.kill(g.tcplock_pid, signal.SIGKILL)
            except OSError:
                pass


def test_gunicorn_four_workers_share_one_lock(make_backend, gunicorn):
    backend = make_backend(slow_reply)
    lock_port = free_port()
    g = gunicorn(
        {"APP_BACKEND": f"{LOOPBACK}:{backend.server_port}", "APP_LOCK_PORT": str(lock_port)}
    )
    g.wait_booted()
    backend.take_check()
    assert g.lock_port == lock_port and g.tcplock_pid, g.output()
    # The master started tcplock before forking the workers, and only once.
    assert g.output().count(f"listening on 127.0.0.1:{lock_port}") == 1

    requests = fire(g.port, 20)
    for i, r in enumerate(requests):
        status, headers, body = r.value
        assert status == 200, body
        assert body == f"answer to GET /req/{i}\n".encode()
    pids = {r.value[1]["x-worker-pid"] for r in requests}
    assert len(pids) >= 2 and pids <= {str(p) for p in g.workers}, pids

    # Every request reached the backend, from several workers, never two at once.
    n = len(requests)
    assert backend.count == n
    assert backend.most == 1, f"the backend saw {backend.most} connections at once"

    # And the requests really were concurrent upstream: most of them waited in tcplock's queue
    # (its per-connection log lines go to gunicorn's stderr, written in batches).
    def queued_times():
        return [float(x) for x in re.findall(r"queued=([\d.]+)s .* end=closed", g.output())]

    wait_until(lambda: len(queued_times()) >= n, what="a log line per request")
    queued = queued_times()
    assert len(queued) == n, g.output()
    assert sum(q >= 0.04 for q in queued) >= n // 2, queued

    # SIGTERM: the workers finish, then on_exit stops tcplock; gunicorn exits 0.
    g.proc.send_signal(signal.SIGTERM)
    assert g.wait(timeout=60) == 0, g.output()
    assert f"tcplock (pid {g.tcplock_pid}) stopped" in g.output(), g.output()
    assert refused(lock_port)


def fire(port, n):
    """n HTTP requests at once; all must get an answer."""
    requests = [gevent.spawn(http, port, "GET", f"/req/{i}", timeout=30) for i in range(n)]
    gevent.joinall(requests, timeout=60, raise_error=True)
    assert all(r.ready() for r in requests)
    return requests


# The trap the README warns about: a TCPLock started in each worker (here at import of the app,
# which gunicorn does in each worker after the fork) is one lock per worker.
ONE_LOCK_PER_WORKER = """
import os

import app as real
from tcplock import TCPLock

host, _, port = os.environ["APP_BACKEND"].rpartition(":")
lock = TCPLock(("127.0.0.1", 0), (host, int(port)))
lock.start()
real.LOCK_ADDRESS = ("127.0.0.1", lock.server_port)
app = real.app
"""


def test_gunicorn_one_lock_per_worker_is_the_trap(make_backend, gunicorn, tmp_path):
    backend = make_backend(slow_reply)
    (tmp_path / "per_worker.py").write_text(ONE_LOCK_PER_WORKER)
    g = gunicorn(
        {"APP_BACKEND": f"{LOOPBACK}:{backend.server_port}", "PYTHONPATH": str(GUNICORN_DIR)},
        args=["per_worker:app"],
        cwd=tmp_path,
    )
    g.wait_booted()
    requests = fire(g.port, 20)
    assert all(r.value[0] == 200 for r in requests)
    pids = {r.value[1]["x-worker-pid"] for r in requests}
    assert len(pids) >= 2, pids
    # Several workers, several locks: the backend had more than one client at once.
    assert backend.most >= 2, backend.most


def test_gunicorn_without_backend_setting_fails_at_start(gunicorn):
    g = gunicorn({"APP_LOCK_PORT": str(free_port())})
    assert g.wait(timeout=60) != 0
    assert "APP_BACKEND must be HOST:PORT" in g.output()
    assert not g.workers  # it stopped before forking any worker


def test_gunicorn_fails_at_start_when_tcplock_cannot_listen(make_backend, gunicorn):
    backend = make_backend(slow_reply)
    taken = _stdsocket.socket()
    taken.bind((LOOPBACK, 0))
    taken.listen(1)
    try:
        g = gunicorn(
            {
                "APP_BACKEND": f"{LOOPBACK}:{backend.server_port}",
                "APP_LOCK_PORT": str(taken.getsockname()[1]),
            }
        )
        assert g.wait(timeout=60) != 0
    finally:
        taken.close()
    assert "tcplock exited with status 1 at start-up" in g.output(), g.output()
    assert not g.workers


def test_gunicorn_killed_leaves_no_tcplock_behind(make_backend, gunicorn):
    backend = make_backend(slow_reply)
    lock_port = free_port()
    g = gunicorn(
        {"APP_BACKEND": f"{LOOPBACK}:{backend.server_port}", "APP_LOCK_PORT": str(lock_port)}
    )
    g.wait_booted()
    assert http(g.port, "GET", "/x", timeout=30)[0] == 200
    # A master that dies without running on_exit: tcplock follows it (parent-death signal).
    g.proc.kill()
    g.wait(timeout=30)
    wait_until(lambda: refused(lock_port), timeout=20, what="tcplock to go away with gunicorn")


def test_gunicorn_reload_keeps_the_one_tcplock(make_backend, gunicorn):
    """SIGHUP reloads the config file and replaces the workers; the tcplock started at first
    is kept (and still stopped at exit), and no second one is started."""
    backend = make_backend(slow_reply)
    lock_port = free_port()
    # A gunicorn worker that gets its SIGTERM while it is still booting loses it, and lives on
    # until the master kills it after the graceful timeout: keep that short.
    g = gunicorn(
        {"APP_BACKEND": f"{LOOPBACK}:{backend.server_port}", "APP_LOCK_PORT": str(lock_port)},
        args=["--graceful-timeout", "3", "-c", "gunicorn.conf.py", "app:app"],
    )
    g.wait_booted()
    backend.take_check()
    fire(g.port, 8)
    g.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: len(g.workers) == 8, timeout=30, what="4 new workers after SIGHUP")
    fire(g.port, 8)
    assert backend.most == 1 and backend.count == 16
    assert g.output().count(f"listening on 127.0.0.1:{lock_port}") == 1
    g.proc.send_signal(signal.SIGTERM)
    assert g.wait(timeout=60) == 0, g.output()
    assert f"tcplock (pid {g.tcplock_pid}) stopped" in g.output(), g.output()
    assert refused(lock_port)


# --- systemd -------------------------------------------------------------------------------


def parse_unit(path):
    """A systemd unit file as {section: [(key, value), ...]} (keys may repeat)."""
    sections, current = {}, None
    for raw in Path(path).read_text().splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        key, sep, value = line.partition("=")
        assert sep and current is not None, f"not a unit line: {raw!r}"
        current.append((key.strip(), value.strip()))
    return sections


def unit_value(unit, section, key):
    values = [v for k, v in unit[section] if k == key]
    assert values, f"{key}= missing from [{section}]"
    return values[-1]


def exec_start():
    argv = shlex.split(unit_value(parse_unit(UNIT), "Service", "ExecStart"))
    if Path(argv[0]).name.startswith("python"):
        assert argv[1:3] == ["-m", "tcplock"], argv
        return argv[0], argv[3:]
    assert Path(argv[0]).name == "tcplock", argv
    return argv[0], argv[1:]


def unit_config_path(args):
    for flag in ("-c", "--config"):
        if flag in args:
            return args[args.index(flag) + 1]
    for a in args:
        if a.startswith("--config="):
            return a.split("=", 1)[1]
    return None


def seconds(text):
    """A systemd time span (30s, 1min 30s, 90) in seconds."""
    units = {"ms": 0.001, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600}
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", text):
        total += float(number) * units[unit or "s"]
    return total


def test_unit_is_hardened_and_of_type_notify():
    unit = parse_unit(UNIT)
    service = unit["Service"]
    want = {
        "Type": "notify",
        "NotifyAccess": "main",
        "Restart": "on-failure",
        "KillSignal": "SIGTERM",
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
    }
    for key, value in want.items():
        assert unit_value(unit, "Service", key) == value, key
    assert set(unit_value(unit, "Service", "RestrictAddressFamilies").split()) == {
        "AF_INET",
        "AF_INET6",
        "AF_UNIX",  # the notify socket, and D-Bus for 'systemctl restart' in a hook
    }
    keys = {k for k, _ in service}
    assert "DynamicUser" in keys or "User" in keys
    assert unit_value(unit, "Install", "WantedBy") == "multi-user.target"


def test_unit_command_uses_only_real_options_and_the_sample_config():
    _, args = exec_start()
    status, help_text, _ = run_cli("--help")
    assert status == 0
    options = set(re.findall(r"(?<![\w-])(--?[a-zA-Z][\w-]*)", help_text))
    for a in args:
        if a.startswith("-"):
            assert a.split("=", 1)[0] in options, f"ExecStart uses {a}, which tcplock lacks"
    config = unit_config_path(args)
    assert config, "ExecStart gives no -c config file"
    sample = CONTRIB / Path(config).name
    assert sample.is_file(), f"ExecStart reads {config}; contrib/ has no {sample.name} to copy"
    readme = (CONTRIB / "systemd" / "README.md").read_text()
    assert f"contrib/{sample.name}" in readme and config in readme


def test_unit_stop_timeout_covers_the_drain_time_and_the_backends_stop():
    unit = parse_unit(UNIT)
    stop = seconds(unit_value(unit, "Service", "TimeoutStopSec"))
    assert unit_value(unit, "Service", "KillMode") == "mixed"  # SIGTERM to tcplock alone
    _, args = exec_start()
    sample = (CONTRIB / Path(unit_config_path(args)).name).read_text()

    def configured(name):
        m = re.search(rf"^\s*{name}\s*=\s*(\S+)", sample, re.M)
        return seconds(m.group(1)) if m else 10.0  # tcplock's default for both

    # tcplock drains, then stops the backends it runs (--backend-cmd), each group given
    # stop-timeout after SIGTERM.
    needed = configured("drain-timeout") + configured("stop-timeout")
    assert stop > needed, f"TimeoutStopSec={stop}s would SIGKILL tcplock as it stops ({needed}s)"


def _recv_notify(sock, timeout):
    """One datagram from $NOTIFY_SOCKET with the sender's pid (SCM_CREDENTIALS)."""
    with gevent.Timeout(timeout, AssertionError("no sd_notify message in time")):
        while True:
            try:
                data, anc, _flags, _addr = sock.recvmsg(4096, _stdsocket.CMSG_SPACE(12))
                break
            except BlockingIOError:
                gevent.sleep(0.01)
    pid = None
    for level, kind, payload in anc:
        if level == _stdsocket.SOL_SOCKET and kind == _stdsocket.SCM_CREDENTIALS:
            pid = array.array("i", payload[:12])[0]
    return data.decode(), pid


def test_unit_command_with_sample_config_notifies_ready_and_stopping(make_backend, tmp_path):
    """What systemd would see: the unit's ExecStart, its config (the sample), READY=1 from the
    main process once it listens, STOPPING=1 and exit 0 on KillSignal, within TimeoutStopSec."""
    unit = parse_unit(UNIT)
    exe, args = exec_start()
    sample = CONTRIB / Path(unit_config_path(args)).name
    backend = make_backend("echo")
    notify_path = str(tmp_path / "notify")
    sock = _stdsocket.socket(_stdsocket.AF_UNIX, _stdsocket.SOCK_DGRAM)
    sock.bind(notify_path)
    sock.setsockopt(_stdsocket.SOL_SOCKET, _stdsocket.SO_PASSCRED, 1)
    sock.setblocking(False)
    # The unit's own command line, with the config file from contrib/ instead of /etc, and the
    # ports of this test given on the command line (which wins over the config file).
    args = [str(sample) if a == unit_config_path(args) else a for a in args]
    args += ["--listen", f"{LOOPBACK}:0", "--proxy-host", LOOPBACK]
    args += ["--proxy-port", str(backend.server_port)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("TCPLOCK_")}
    for assignment in [v for k, v in unit["Service"] if k == "Environment"]:
        env.update(a.split("=", 1) for a in shlex.split(assignment))
    env["NOTIFY_SOCKET"] = notify_path
    cmd = [sys.executable, "-m", "tcplock", *args] if Path(exe).name == "tcplock" else [exe, *args]
    proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        message, pid = _recv_notify(sock, 30)
        assert "READY=1" in message.split("\n"), message
        assert pid == proc.pid, "NotifyAccess=main: READY=1 must come from the main process"
        port = int(re.search(r"STATUS=listening on \S+:(\d+)", message).group(1))
        c = connect(port)
        c.sendall(b"hello")
        c.shutdown(_stdsocket.SHUT_WR)
        assert recv_all(c) == b"hello"
        c.close()

        started = time.monotonic()
        proc.send_signal(getattr(signal, unit_value(unit, "Service", "KillSignal")))
        message, pid = _recv_notify(sock, 30)
        assert "STOPPING=1" in message.split("\n") and pid == proc.pid, message
        stop = seconds(unit_value(unit, "Service", "TimeoutStopSec"))
        assert proc.wait(timeout=stop) == 0
        assert time.monotonic() - started < stop
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        sock.close()


def _unit_for_analyze(tmp_path):
    """The unit, with ExecStart's program replaced by the installed one (systemd-analyze checks
    that the program exists; /usr/local/bin/tcplock need not exist on the test machine)."""
    exe, _ = exec_start()
    installed = shutil.which(Path(exe).name) or sys.executable
    text = re.sub(
        r"^ExecStart=" + re.escape(exe), "ExecStart=" + installed, UNIT.read_text(), flags=re.M
    )
    assert installed in text
    copy = tmp_path / UNIT.name
    copy.write_text(text)
    return copy


def _systemd_analyze():
    return require_command("systemd-analyze", "systemd")


def _readme_install_lines():
    """The install lines of contrib/systemd/README.md that make the venv tcplock runs from."""
    block = (CONTRIB / "systemd" / "README.md").read_text().split("```sh\n", 1)[1]
    block = block.split("```", 1)[0]
    lines = [ln.split("#", 1)[0].strip() for ln in block.splitlines()]
    return [ln for ln in lines if ln and not ln.startswith(("cp ", "systemctl", "journalctl"))]


def test_unit_runs_the_program_the_readme_installs():
    exe, _ = exec_start()
    lines = _readme_install_lines()
    assert lines[0].startswith("python3 -m venv "), lines
    venv = lines[0].split()[-1]
    assert exe == f"{venv}/bin/tcplock", f"the README installs into {venv}, the unit runs {exe}"
    assert lines[1:] == [f"{venv}/bin/pip install ."], lines


@pytest.mark.timeout(600)
def test_systemd_analyze_verify_after_the_readme_install(tmp_path):
    """The README's install lines, run for real (into a temporary directory instead of the
    system's), give the program the unmodified unit names, and the unit then verifies."""
    analyze = _systemd_analyze()
    exe, _ = exec_start()
    lines = _readme_install_lines()
    venv = lines[0].split()[-1]
    here = str(tmp_path / "venv")
    for line in lines:
        cmd = shlex.split(line.replace(venv, here))
        if cmd[0] == "python3":
            cmd[0] = sys.executable
        done = _stdsubprocess.run(
            cmd, cwd=ROOT, capture_output=True, text=True, timeout=500, stdin=_stdsubprocess.DEVNULL
        )
        assert done.returncode == 0, f"{line}: {done.stdout[-1500:]}{done.stderr[-1500:]}"
    installed = exe.replace(venv, here)
    assert os.access(installed, os.X_OK), installed
    copy = tmp_path / UNIT.name
    copy.write_text(UNIT.read_text().replace(venv, here))
    _verify(analyze, copy)
    version = _stdsubprocess.run(
        [installed, "--version"], capture_output=True, text=True, timeout=60
    )
    assert version.stdout.startswith("tcplock "), version


def _verify(analyze, unit):
    out = _stdsubprocess.run(
        [analyze, "verify", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=_stdsubprocess.DEVNULL,
    )
    # verify exits 0 even for unknown keys or bad values: it only warns. Any line naming our
    # unit is a problem in it.
    complaints = [ln for ln in (out.stdout + out.stderr).splitlines() if unit.name in ln]
    assert out.returncode == 0 and not complaints, out.stdout + out.stderr


def test_systemd_analyze_verify(tmp_path):
    _verify(_systemd_analyze(), _unit_for_analyze(tmp_path))


def test_systemd_analyze_security_exposure_is_low(tmp_path):
    analyze = _systemd_analyze()
    copy = _unit_for_analyze(tmp_path)
    out = _stdsubprocess.run(
        [analyze, "security", "--offline=true", "--no-pager", str(copy)],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=_stdsubprocess.DEVNULL,
    )
    m = re.search(r"Overall exposure level for \S+: ([\d.]+)", out.stdout)
    if m is None and "offline" in out.stderr:
        pytest.skip(f"this systemd-analyze cannot assess a unit file offline: {out.stderr}")
    assert m, out.stdout + out.stderr
    # 0 is a fully sandboxed unit, 10 none at all; systemd calls under 2 "OK".
    assert float(m.group(1)) < 2.0, out.stdout
    # And the README gives the figure this systemd gives.
    readme = (CONTRIB / "systemd" / "README.md").read_text()
    stated = re.search(r"`systemd-analyze security tcplock` rates its exposure ([\d.]+)", readme)
    assert stated and stated.group(1) == m.group(1), f"README: {stated}, measured {m.group(1)}"


# --- the READMEs' commands, as written (see readme_commands.py) ------------------------------

GUNICORN_README = "contrib/gunicorn/README.md"


@pytest.mark.timeout(600)  # the first user of readme_clone waits for the quick start's install
def test_gunicorn_readme_as_written(readme_clone, make_backend):
    """contrib/gunicorn/README.md from the top of a fresh copy with the quick start's venv:
    gunicorn goes into the venv, (a) serves a request through the tcplock its master starts,
    and (b) one through a tcplock run apart; Ctrl-C stops each."""
    clone, _ = readme_clone
    rc.ensure_free(9000, 8000)
    make_backend(slow_reply, port=2003)
    rc.run(rc.command(GUNICORN_README, ".venv/bin/pip install gunicorn"), cwd=clone)
    cd = rc.command(GUNICORN_README, "cd contrib/gunicorn")
    own = rc.command(GUNICORN_README, "APP_BACKEND=127.0.0.1:2003 APP_LOCK_PORT=9000")
    apart = rc.command(GUNICORN_README, "APP_LOCK_PORT=9000 .venv/bin/python -m gunicorn")
    lock = None
    for cmd in (f"{cd}\n{own}", apart):
        if cmd.endswith(apart):  # (b): tcplock is a service of its own, on 9000
            lock = rc.Shell(".venv/bin/tcplock -l 9000 -p 2003", cwd=clone)
            lock.wait_for(r"listening on 127\.0\.0\.1:9000\b", timeout=30)
        shell = rc.Shell(cmd, cwd=clone, env={"XDG_RUNTIME_DIR": str(clone)})
        try:
            shell.wait_for(r"Listening at: http://127\.0\.0\.1:8000\b", timeout=60)
            wait_until(
                lambda s=shell: s.output().count("Booting worker") == 4,
                timeout=60,
                what="4 workers",
            )
            status, _, body = http(8000, "GET", "/readme", timeout=30)
            assert status == 200 and body == b"answer to GET /readme\n", body
            shell.stop(signal.SIGINT, timeout=60)
            assert refused(8000) and (lock is not None or refused(9000)), shell.output()
        finally:
            shell.kill()
            if lock is not None:
                lock.kill()


PROMETHEUS_README = "contrib/prometheus/README.md"


@pytest.mark.timeout(600)
def test_prometheus_readme_as_written(readme_clone, make_backend, tmp_path):
    """contrib/prometheus/README.md, and the README's curl with the token, from the top of a
    fresh copy, with /etc/ in a temporary directory (writing /etc needs root and changes the
    machine; prometheus.yml is read with the same change): the token is made, tcplock starts
    with it, Prometheus's copy is made and promtool accepts the config, and curl with the
    token gets the status."""
    clone, _ = readme_clone
    require_command("promtool", "prometheus")
    etc = tmp_path / "etc"
    (etc / "prometheus").mkdir(parents=True)
    rc.ensure_free(9000, 9100)
    make_backend("echo", port=2003)

    def here(cmd):
        return cmd.replace("/etc/", f"{etc}/")

    yml = clone / "contrib" / "prometheus" / "prometheus.yml"
    yml.write_text(here(yml.read_text()))
    for start in ("mkdir -p /etc/tcplock", "head -c 32 /dev/urandom", "chmod 600"):
        rc.run(here(rc.command(PROMETHEUS_README, start)), cwd=clone)
    token = (etc / "tcplock" / "status-token").read_text().strip()
    assert len(token) >= 32 and (etc / "tcplock" / "status-token").stat().st_mode & 0o777 == 0o600
    shell = rc.Shell(here(rc.command(PROMETHEUS_README, ".venv/bin/tcplock")), cwd=clone)
    try:
        shell.wait_for(r"listening on 127\.0\.0\.1:9000\b", timeout=30)
        rc.run(here(rc.command(PROMETHEUS_README, "install -m 600 -o prometheus")), cwd=clone)
        copy = etc / "prometheus" / "tcplock-status-token"
        assert copy.read_text().strip() == token and copy.stat().st_mode & 0o777 == 0o600
        rc.run(rc.command(PROMETHEUS_README, "promtool check config"), cwd=clone)
        curl = 'curl -s -H "Authorization: Bearer $(cat /etc/tcplock/status-token)"'
        for readme in (PROMETHEUS_README, "README.md"):
            out = rc.run(here(rc.command(readme, curl)), cwd=clone).stdout
            assert json.loads(out)["backend"] == "localhost:2003", out
        assert http(9100, "GET", "/status")[0] == 401
    finally:
        shell.stop(signal.SIGTERM)
        shell.kill()


HAPROXY_README = "contrib/haproxy/README.md"


@pytest.mark.timeout(300)
def test_haproxy_readme_as_written(readme_clone):
    """contrib/haproxy/README.md on one machine, from the top of a fresh copy with the quick
    start's venv activated: two demo tcplocks and HAProxy as the README starts them; a client
    through HAProxy is greeted by a demo; pausing one instance makes its agent answer drain,
    resuming makes it ready again, and the checks show both servers."""
    require_command("haproxy", "haproxy")
    require_command("nc", "netcat-openbsd")
    clone, _ = readme_clone
    rc.ensure_free(9000, 9001, 9002, 9101, 9102, 9201, 9202, 8404)
    block = "\n".join(
        rc.command(HAPROXY_README, start)
        for start in (
            "mkdir -p /run/haproxy",
            "tcplock --demo --accept-proxy --listen 9001",
            "tcplock --demo --accept-proxy --listen 9002",
            "haproxy -f",
        )
    )
    shell = rc.Shell(block, cwd=clone, env=rc.activated(clone))
    try:
        for port in (9001, 9002):
            shell.wait_for(rf"listening on 127\.0\.0\.1:{port}\b", timeout=30)

        def agent():
            return rc.run(rc.command(HAPROXY_README, "nc 127.0.0.1 9101"), cwd=clone).stdout

        def through_haproxy():
            try:
                c = connect(9000)
            except OSError:
                return b""
            try:
                return c.recv(200)
            finally:
                c.close()

        wait_until(
            lambda: through_haproxy().startswith(b"demo backend: you are client #"),
            timeout=30,
            what="a client through HAProxy to a demo",
        )
        assert agent() == "up ready 100%\n"
        paused = rc.run(
            rc.command(HAPROXY_README, "curl -s -X POST 127.0.0.1:9201/pause"), cwd=clone
        ).stdout
        assert json.loads(paused) == {"paused": True} and agent() == "drain\n"
        resumed = rc.run(
            rc.command(HAPROXY_README, "curl -s -X POST 127.0.0.1:9201/resume"), cwd=clone
        ).stdout
        assert json.loads(resumed) == {"paused": False} and agent() == "up ready 100%\n"
        status = rc.run(rc.command(HAPROXY_README, "curl -s 127.0.0.1:9201/status"), cwd=clone)
        assert json.loads(status.stdout)["paused"] is False
        csv = rc.run(
            rc.command(HAPROXY_README, 'curl -s "http://127.0.0.1:8404/;csv"'), cwd=clone
        ).stdout
        assert re.search(r"^tcplock,a,", csv, re.M) and re.search(r"^tcplock,b,", csv, re.M), csv
    finally:
        shell.stop(signal.SIGINT)
        shell.kill()
