"""examples/libreoffice/, for real: a farm of unoservers (each with its LibreOffice) run and
supervised by one tcplock command, the example's run-stack.sh.

Installs what it needs on first use (Debian's LibreOffice without GUI, python3-uno, poppler's
pdftotext, and a venv with unoserver from PyPI made by the example's install.sh, cached under
~/.cache/tcplock-tests); outside CI a missing program skips the module with the reason. Then,
against one farm of two unoservers and a standby (run-stack.sh's default SPARES=1) shared by
the tests (a LibreOffice start costs about 6 s):

- many conversions at once, one LibreOffice killed with SIGKILL in the middle of a conversion:
  at most that conversion fails, every other one gives its PDF, and tcplock starts the dead
  unoserver again by itself;
- a frozen LibreOffice (SIGSTOP) in the middle of a conversion: the other unoserver keeps
  serving, the frozen request is cut at its lifetime and the frozen LibreOffice replaced;
- the farm was started with SIGINT ignored, as `run-stack.sh &` in a script starts it, and
  still stops on SIGINT, leaving no process behind.

Every process of the farm carries a mark in its environment (the farm's own UNO_STATE_DIR); a
test finds them by it, and the fixture's finalizer kills every process group holding one.
"""

from __future__ import annotations

import os
import random
import re
import signal
import sys
import time
from pathlib import Path

import gevent
import pytest
from gevent import socket, subprocess

from conftest import LOOPBACK, ChildProcess, require_command

pytestmark = [pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "libreoffice"
PACKAGES = "libreoffice-core-nogui libreoffice-writer-nogui python3-uno python3-venv"
UNO_PORT_OFFSET = 1000  # LibreOffice's UNO port: the unoserver's port + this (unoserver-backend)
TTL = 10  # CONVERSION_TTL of the shared farm, in seconds

CONN_LINE = re.compile(r"queued=([\d.]+)s active=([\d.]+)s up=(\d+) down=(\d+) end=(\S+)")


# -- setup ------------------------------------------------------------------------------------


def _fail_or_skip(reason):
    if os.environ.get("CI"):
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def uno_venv():
    """The Debian packages, and a venv with unoserver made by the example's install.sh."""
    require_command("soffice", PACKAGES)
    require_command("pdftotext", "poppler-utils")
    venv = Path(os.environ.get("UNO_VENV") or Path.home() / ".cache/tcplock-tests/uno-venv")
    env = dict(os.environ, UNO_VENV=str(venv), PYTHON=sys.executable, PYTHONPATH=str(ROOT))
    done = subprocess.run(
        [str(EXAMPLE / "install.sh")],
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=900,
    )
    if done.returncode != 0:
        _fail_or_skip(f"install.sh failed:\n{done.stdout}\n{done.stderr}")
    return venv


def _bindable(port):
    s = socket.socket()
    try:
        s.bind((LOOPBACK, port))
        return True
    except OSError:
        return False
    finally:
        s.close()


def free_ports(count):
    """``count`` consecutive free ports outside the ephemeral range, whose UNO ports (+1000)
    are free too, and a port for tcplock."""
    rng = random.Random()
    for _ in range(500):
        base = rng.randrange(20000, 28000)
        wanted = [base + i for i in range(count + 1)]
        wanted += [p + UNO_PORT_OFFSET for p in wanted[:count]]
        if all(_bindable(p) for p in wanted):
            return wanted[:count], base + count
    raise RuntimeError("no free ports")


def _proc_fields(pid):
    """(state, pgid, comm, environ bytes) of a process, or None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        environ = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return None
    comm = stat.split("(", 1)[1].rsplit(")", 1)[0]
    fields = stat.rsplit(") ", 1)[1].split()
    return fields[0], int(fields[2]), comm, environ


class Farm:
    """run-stack.sh with two unoservers and a standby on free ports, its state under a
    directory of its own.
    Started with SIGINT ignored (as `cmd &` in a script starts it) and in a session of its
    own, with the checkout's tcplock."""

    def __init__(self, venv, state):
        self.venv = venv
        self.state = state
        self.ports, self.port = free_ports(3)  # two in service and a standby
        self.mark = f"UNO_STATE_DIR={state}".encode()
        self.stack = None

    def start(self):
        env = {
            "UNO_VENV": str(self.venv),
            "UNO_STATE_DIR": str(self.state),
            "UNO_PORT_OFFSET": str(UNO_PORT_OFFSET),
            "LISTEN_PORT": str(self.port),
            "FIRST_PORT": str(self.ports[0]),
            "UNOSERVERS": str(len(self.ports) - 1),  # and SPARES, by default 1
            "STATUS_PORT": "off",
            "CONVERSION_TTL": f"{TTL}s",
            "DRAIN_TIMEOUT": "20s",
            "PYTHON": sys.executable,
            "PYTHONPATH": str(ROOT),
        }

        def session_without_sigint():
            os.setsid()
            signal.signal(signal.SIGINT, signal.SIG_IGN)

        self.stack = ChildProcess(
            [str(EXAMPLE / "run-stack.sh")], env=env, preexec_fn=session_without_sigint
        )
        self.stack.wait_for(rf"listening on {LOOPBACK}:{self.port}\b", timeout=60)
        for port in self.ports:
            self.wait_answering(port, timeout=120)
        self.stack.wait_for("is ready as a standby", timeout=60)

    @property
    def running(self):
        return self.stack is not None and self.stack.proc.poll() is None

    def wait_answering(self, port, timeout):
        """Until the unoserver on ``port`` answers a real call (directly, not through tcplock)."""
        deadline = time.monotonic() + timeout
        while True:
            done = subprocess.run(
                [str(self.venv / "bin" / "unoping"), "--host", LOOPBACK, "--port", str(port)],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=30,
            )
            if done.returncode == 0:
                return
            assert time.monotonic() < deadline, (
                f"the unoserver on {port} does not answer:\n{self.output()}"
            )
            gevent.sleep(0.3)

    def processes(self):
        """{pid: comm} of every live process of this farm (tcplock, the unoservers, their
        LibreOffices and whatever runs them): all carry its mark in their environment."""
        found = {}
        for d in Path("/proc").iterdir():
            if d.name.isdigit():
                f = _proc_fields(int(d.name))
                if f and f[0] != "Z" and self.mark in f[3].split(b"\0"):
                    found[int(d.name)] = f[2]
        return found

    def soffice(self, port):
        """The pids of the soffice.bin of the unoserver on ``port``."""
        found = []
        want = f"TCPLOCK_BACKEND_PORT={port}".encode()
        for pid, comm in self.processes().items():
            f = _proc_fields(pid)
            if comm == "soffice.bin" and f and want in f[3].split(b"\0"):
                found.append(pid)
        return found

    def lines_since(self, index):
        return self.stack.lines[index:]

    def output(self):
        return self.stack.output() if self.stack else ""

    def kill_all(self):
        """SIGCONT and SIGKILL every process group holding a process of this farm."""
        for _ in range(3):
            groups = {f[1] for f in map(_proc_fields, self.processes()) if f}
            if not groups:
                break
            for pg in groups:
                for sig in (signal.SIGCONT, signal.SIGKILL):
                    try:
                        os.killpg(pg, sig)
                    except OSError:
                        pass
            gevent.sleep(0.2)
        if self.stack is not None:
            self.stack.kill()


@pytest.fixture(scope="module")
def shared_farm(uno_venv, tmp_path_factory):
    farm = Farm(uno_venv, tmp_path_factory.mktemp("farm") / "state")
    yield farm
    farm.kill_all()


@pytest.fixture
def farm(shared_farm):
    """The module's farm, started if it does not run (the first test, or after the stop test)."""
    if not shared_farm.running:
        shared_farm.kill_all()
        shared_farm.start()
    return shared_farm


def alive(pid):
    f = _proc_fields(pid)
    return f is not None and f[0] != "Z"


# -- conversions ------------------------------------------------------------------------------


def write_text(path, marker, lines=20):
    rng = random.Random(marker)
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta"]
    body = "\n".join(
        f"{marker} line {i}: " + " ".join(rng.choice(words) for _ in range(10))
        for i in range(lines)
    )
    path.write_text(body + "\n")


class Conversion:
    """One unoconvert run through tcplock, in the background (a gevent subprocess, so that
    tcplock's log keeps being read meanwhile)."""

    def __init__(self, venv, port, src, dst):
        self.src, self.dst = src, dst
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            [
                str(venv / "bin" / "unoconvert"),
                "--host",
                LOOPBACK,
                "--port",
                str(port),
                # Send the file's bytes and get the PDF back over the connection, as a client
                # on another machine would, instead of passing paths to the server.
                "--host-location",
                "remote",
                str(src),
                str(dst),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        self.rc = None
        self.output = ""
        self.seconds = None

    def wait(self, timeout):
        try:
            out, _ = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate()
            self.rc = "hung"
        else:
            self.rc = self.proc.returncode
        self.seconds = time.monotonic() - self.started
        self.output = out.decode(errors="replace")
        return self.rc

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def describe(self):
        seconds = "?" if self.seconds is None else f"{self.seconds:.1f}"
        return f"{self.src.name}: rc={self.rc} after {seconds}s\n{self.output[-2000:]}"


@pytest.fixture
def convert(uno_venv, tmp_path):
    """convert(port, marker, lines) -> a running Conversion of a text holding ``marker``; every
    one still running at the end of the test is killed."""
    started = []

    def run(port, marker, lines=20):
        src = tmp_path / f"{marker}.txt"
        write_text(src, marker, lines)
        conv = Conversion(uno_venv, port, src, tmp_path / f"{marker}.pdf")
        conv.marker = marker
        started.append(conv)
        return conv

    yield run
    for conv in started:
        conv.kill()


def wait_all(convs, timeout):
    gevent.joinall([gevent.spawn(c.wait, timeout) for c in convs])


def assert_pdf(conv):
    assert conv.rc == 0, conv.describe()
    data = conv.dst.read_bytes()
    assert data.startswith(b"%PDF-"), conv.describe()
    assert b"%%EOF" in data[-64:], conv.describe()
    text = subprocess.run(
        ["pdftotext", str(conv.dst), "-"], capture_output=True, text=True, timeout=60
    )
    assert text.returncode == 0, text.stderr
    assert conv.marker in text.stdout, f"{conv.dst.name} does not contain {conv.marker!r}"


def wait_line(farm, since, pattern, timeout):
    """The first line of the farm's log after line ``since`` that matches ``pattern``."""
    rx = re.compile(pattern)
    deadline = time.monotonic() + timeout
    while True:
        for line in farm.lines_since(since):
            if rx.search(line):
                return line
        assert time.monotonic() < deadline, f"no line matching {pattern!r}:\n{farm.output()}"
        assert farm.running, f"the farm stopped:\n{farm.output()}"
        gevent.sleep(0.05)


def converting_on(farm, since, timeout):
    """The port of the unoserver that has just begun a conversion: unoserver logs "Opening
    <its temporary directory>/... for input" as it hands a document to LibreOffice."""
    ports = "|".join(map(str, farm.ports))
    line = wait_line(farm, since, rf"Opening {re.escape(str(farm.state))}/({ports})/", timeout)
    return int(re.search(rf"/({ports})/", line).group(1))


def new_soffice(farm, port, old, timeout):
    """Wait until the unoserver on ``port`` runs a LibreOffice other than ``old`` and answers."""
    deadline = time.monotonic() + timeout
    while True:
        pids = farm.soffice(port)
        if pids and old not in pids:
            break
        assert time.monotonic() < deadline, f"no new LibreOffice on {port}:\n{farm.output()}"
        gevent.sleep(0.2)
    farm.wait_answering(port, timeout=max(1.0, deadline - time.monotonic()))
    return pids


# -- tests ------------------------------------------------------------------------------------


def test_a_killed_libreoffice_costs_at_most_its_own_conversion(farm, convert):
    """Fourteen conversions at once through the two unoservers; one LibreOffice is killed with
    SIGKILL while it converts; four more conversions are sent while it is down. At most the
    conversion it was running fails; every other one gives its own PDF; the standby takes the
    dead one's place, tcplock starts that unoserver again by itself, and it is the standby."""
    since = len(farm.stack.lines)
    first = [convert(farm.port, f"Batch1-{i:02d}", lines=60 + 20 * i) for i in range(14)]

    victim = converting_on(farm, since, timeout=120)
    [killed] = farm.soffice(victim)
    os.kill(killed, signal.SIGKILL)
    later = [convert(farm.port, f"Later-{i:02d}", lines=40) for i in range(4)]

    wait_all(first + later, timeout=240)
    failed = [c for c in first + later if c.rc != 0]
    assert len(failed) <= 1, "\n".join(c.describe() for c in failed) + "\n" + farm.output()
    for c in first + later:
        if c not in failed:
            assert_pdf(c)
    for c in later:
        assert_pdf(c)

    # The standby took its place at once; it was started again without help, with a
    # LibreOffice of its own, and is the standby now; the farm converts on.
    wait_line(farm, since, r"backend \S+ \(standby\) takes clients now", timeout=5)
    assert not alive(killed)
    new_soffice(farm, victim, killed, timeout=120)
    wait_line(farm, since, rf"backend \S+:{victim} is ready as a standby", timeout=60)
    again = [convert(farm.port, f"Again-{i:02d}", lines=40) for i in range(6)]
    wait_all(again, timeout=180)
    for c in again:
        assert_pdf(c)


def test_a_frozen_libreoffice_is_cut_at_the_ttl_and_replaced(farm, convert):
    """SIGSTOP the LibreOffice that converts a big document. The other unoserver keeps serving
    the conversions sent meanwhile; the frozen request is cut at its lifetime (CONVERSION_TTL),
    with no answer; its unoserver is restarted with a new LibreOffice; the frozen client ends."""
    since = len(farm.stack.lines)
    big = convert(farm.port, "BigDocument", lines=3000)  # ~250 KB: a few seconds to convert
    frozen_port = converting_on(farm, since, timeout=60)
    [frozen] = farm.soffice(frozen_port)
    os.kill(frozen, signal.SIGSTOP)

    small = [convert(farm.port, f"Meanwhile-{i}") for i in range(3)]
    wait_all(small, timeout=120)
    for c in small:
        assert_pdf(c)
    # Served by the other unoserver, before the frozen request ran out of time.
    assert not any(CONN_LINE.search(x) and "end=ttl" in x for x in farm.lines_since(since)), (
        farm.output()
    )

    cut = CONN_LINE.search(wait_line(farm, since, r"end=ttl", timeout=TTL + 60))
    assert float(cut.group(2)) == pytest.approx(TTL, abs=1.5)
    assert int(cut.group(4)) == 0  # no answer ever came
    new_soffice(farm, frozen_port, frozen, timeout=120)
    assert not alive(frozen), "the frozen LibreOffice is still there"

    # The frozen client: its connection was reset. Python's XML-RPC client then sends the
    # request once more, and a live unoserver usually converts it; either way it ends.
    big.wait(180)
    assert big.rc != "hung", big.describe()
    if big.rc == 0:
        assert_pdf(big)


def test_stops_on_sigint_though_started_with_it_ignored_and_leaves_nothing(farm, convert):
    """The farm was started with SIGINT ignored (`run-stack.sh &` in a script does that): a
    SIGINT still stops it, and once tcplock has exited, no unoserver or LibreOffice is left and
    their ports are free. (The next test that needs the farm starts a new one.)"""
    conv = convert(farm.port, "BeforeStop")
    wait_all([conv], timeout=120)
    assert_pdf(conv)
    assert {"soffice.bin", "unoserver"} <= set(farm.processes().values()), farm.processes()

    farm.stack.signal(signal.SIGINT)
    assert farm.stack.wait(timeout=90) == 0, farm.output()
    left = farm.processes()
    assert left == {}, f"left behind: {left}\n{farm.output()}"
    for port in [farm.port, *farm.ports, *(p + UNO_PORT_OFFSET for p in farm.ports)]:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is fine
        try:
            s.bind((LOOPBACK, port))  # nobody listens there any more
            s.listen()
        finally:
            s.close()
