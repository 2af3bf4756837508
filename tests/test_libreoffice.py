"""examples/libreoffice/, for real: LibreOffice driven by unoserver, behind tcplock.

Installs what it needs on first use (Debian's LibreOffice without GUI, python3-uno, poppler's
pdftotext, and a venv with unoserver, cached under ~/.cache/tcplock-tests), then:

- runs many concurrent conversions through tcplock, which restarts unoserver every few
  conversions with the example's own restart command, and checks every PDF;
- freezes LibreOffice (SIGSTOP) in the middle of a conversion, which without tcplock hangs
  every client for ever, and checks that the lifetime cut and the restart bring the service
  back while the queued conversions are served;
- checks that unoserver-ctl never leaves a LibreOffice behind, even when unoserver is killed
  or its pid file is lost;
- follows the README: run-stack.sh serves a conversion, and Ctrl-C stops it all.

Each unoserver start costs about 5.5 s and each restart about 7.5 s (unoserver sleeps 5 s before
it listens); the whole module takes about a minute and a half on two cores.
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

from conftest import LOOPBACK, require_command

pytestmark = [pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "libreoffice"
CTL = EXAMPLE / "unoserver-ctl"
PACKAGES = "libreoffice-core-nogui libreoffice-writer-nogui python3-uno python3-venv"

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
    env = dict(os.environ, UNO_VENV=str(venv), PYTHON=sys.executable)
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


def _free_port(taken):
    """A port no one listens on, outside the ephemeral range (so no client connection is
    using it either) and away from a developer's own 2002/2003."""
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(20000, 30000)
        if port in taken:
            continue
        s = socket.socket()
        try:
            s.bind((LOOPBACK, port))
        except OSError:
            continue
        finally:
            s.close()
        taken.add(port)
        return port
    raise RuntimeError("no free port")


class Unoserver:
    """One unoserver instance, driven through the example's unoserver-ctl."""

    def __init__(self, venv, state):
        taken = set()
        self.xmlrpc_port = _free_port(taken)
        self.uno_port = _free_port(taken)
        self.state = state
        self.venv = venv
        self.env = {
            "UNO_VENV": str(venv),
            "UNO_XMLRPC_PORT": str(self.xmlrpc_port),
            "UNO_PORT": str(self.uno_port),
            "UNO_STATE_DIR": str(state),
        }

    def ctl(self, *args, timeout=120, check=True):
        env = {k: v for k, v in os.environ.items() if not k.startswith(("UNO_", "TCPLOCK_"))}
        env.update(self.env)
        done = subprocess.run(
            [str(CTL), *args],
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check:
            assert done.returncode == 0, (
                f"unoserver-ctl {' '.join(args)}: status {done.returncode}\n"
                f"{done.stdout}{done.stderr}\n--- unoserver log:\n{self.log()}"
            )
        return done

    def start(self):
        self.ctl("start")
        self.ctl("ready", timeout=120)

    def log(self):
        try:
            return (self.state / "unoserver.log").read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def pgid(self):
        try:
            return int((self.state / "unoserver.pid").read_text())
        except (OSError, ValueError):
            return None

    def processes(self):
        """{pid: comm} of every live process of this instance: in its process group, or
        naming its temporary directory on its command line (what unoserver-ctl looks for)."""
        pg = self.pgid()
        mark = str(self.state / "tmp").encode()
        found = {}
        for d in Path("/proc").iterdir():
            if not d.name.isdigit():
                continue
            try:
                stat = (d / "stat").read_text()
                cmdline = (d / "cmdline").read_bytes()
            except OSError:
                continue
            state, _ppid, pgrp = stat.rsplit(") ", 1)[1].split()[:3]
            if state == "Z":
                continue
            if (pg is not None and int(pgrp) == pg) or mark in cmdline:
                found[int(d.name)] = stat.split("(", 1)[1].rsplit(")", 1)[0]
        return found

    def pids_of(self, comm):
        return [pid for pid, c in self.processes().items() if c == comm]

    def stop_for_good(self):
        """Used by the fixture's finalizer: unoserver-ctl stop, then SIGKILL whatever is
        still there, so that no LibreOffice outlives the test."""
        try:
            self.ctl("stop", timeout=180, check=False)
        except subprocess.TimeoutExpired:
            pass
        for pid in self.processes():
            for sig in (signal.SIGCONT, signal.SIGKILL):
                try:
                    os.kill(pid, sig)
                except OSError:
                    pass


@pytest.fixture
def unoserver(uno_venv, tmp_path):
    server = Unoserver(uno_venv, tmp_path / "unoserver")
    yield server
    server.stop_for_good()


def start_tcplock(cli, uno, *args):
    lock = cli(
        "--listen",
        f"{LOOPBACK}:0",
        "--proxy-host",
        LOOPBACK,
        "--proxy-port",
        str(uno.xmlrpc_port),
        "--restart-cmd",
        f"{CTL} restart",
        "--hook-timeout",
        "150s",
        *args,
        env=uno.env,
    )
    lock.wait_ready()
    return lock


def stop_tcplock(lock, uno):
    """Let a restart in progress finish, then stop tcplock the way an operator would."""
    deadline = time.monotonic() + 120
    while count(lock, "restarting backend") > count(lock, "backend restarted"):
        assert time.monotonic() < deadline, "a restart never finished:\n" + lock.output()
        gevent.sleep(0.2)
    lock.signal(signal.SIGTERM)
    assert lock.wait(timeout=30) == 0, lock.output()


def alive(pid):
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1][0] != "Z"
    except OSError:
        return False


def count(lock, text):
    return sum(text in line for line in lock.lines)


def conn_ends(lock):
    return [m.group(5) for m in map(CONN_LINE.search, lock.lines) if m]


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

    def __init__(self, uno, port, src, dst):
        self.src, self.dst = src, dst
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            [
                str(uno.venv / "bin" / "unoconvert"),
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

    def describe(self):
        return f"{self.src.name}: rc={self.rc} after {self.seconds:.1f}s\n{self.output}"


def assert_pdf_of(conv, marker):
    assert conv.rc == 0, conv.describe()
    data = conv.dst.read_bytes()
    assert data.startswith(b"%PDF-"), conv.describe()
    assert b"%%EOF" in data[-64:], conv.describe()
    text = subprocess.run(
        ["pdftotext", str(conv.dst), "-"], capture_output=True, text=True, timeout=60
    )
    assert text.returncode == 0, text.stderr
    assert marker in text.stdout, f"{conv.dst.name} does not contain {marker!r}"


def marker_of(i):
    return f"Document-{i:02d}-{random.Random(i).randrange(10**6):06d}"


# -- tests ------------------------------------------------------------------------------------


def test_concurrent_conversions_with_restarts_every_few(unoserver, cli, tmp_path):
    """Nine clients at once through one tcplock that restarts unoserver every 3 conversions:
    every client gets its own document back as a PDF, and the restarts really happen."""
    unoserver.start()
    # One unoconvert = two connections (info, then convert): every 6 connections is every 3
    # conversions.
    lock = start_tcplock(cli, unoserver, "--timeout", "60s", "--restart-every", "6")
    n = 9
    convs = []
    for i in range(n):
        src = tmp_path / f"in_{i}.txt"
        write_text(src, marker_of(i), lines=20 + 10 * i)
        convs.append(Conversion(unoserver, lock.port, src, tmp_path / f"out_{i}.pdf"))
    gevent.joinall([gevent.spawn(c.wait, 240) for c in convs])
    for i, c in enumerate(convs):
        assert_pdf_of(c, marker_of(i))

    # Every request got through unbroken: 2 connections a conversion, all ended normally.
    deadline = time.monotonic() + 30
    while len(conn_ends(lock)) < 2 * n and time.monotonic() < deadline:
        gevent.sleep(0.1)
    assert conn_ends(lock) == ["closed"] * (2 * n), lock.output()
    assert count(lock, "backend restarted") >= 2, lock.output()
    assert count(lock, "restart failed") == 0, lock.output()
    assert count(lock, "]: restarted in") >= 2, lock.output()  # unoserver-ctl's own line

    stop_tcplock(lock, unoserver)
    unoserver.ctl("stop")
    assert unoserver.processes() == {}


def test_frozen_libreoffice_is_cut_and_restarted_while_the_queue_moves(unoserver, cli, tmp_path):
    """SIGSTOP LibreOffice in the middle of a conversion. Without tcplock, that conversion and
    every later one hang for ever (unoconvert has no timeout, and unoserver serves one request
    at a time). With it, the connection is cut at its lifetime, unoserver is restarted, and the
    conversions queued behind it are served."""
    unoserver.start()
    ttl = 8
    lock = start_tcplock(cli, unoserver, "--timeout", f"{ttl}s", "--restart-on-timeout")
    log = unoserver.state / "unoserver.log"
    log_start = log.stat().st_size

    # About 400 KB of text: a conversion of a couple of seconds, long enough to freeze it in
    # the middle, and short enough that its retry fits in the lifetime.
    big = tmp_path / "big.txt"
    write_text(big, "BigDocument", lines=5000)
    frozen_conv = Conversion(unoserver, lock.port, big, tmp_path / "big.pdf")

    # unoserver logs "Opening ..." when it hands the document to LibreOffice.
    deadline = time.monotonic() + 60
    while b"for input" not in log.read_bytes()[log_start:]:
        assert time.monotonic() < deadline, "the conversion never started:\n" + unoserver.log()
        assert frozen_conv.proc.poll() is None, "the conversion ended before it was frozen"
        gevent.sleep(0.02)
    frozen = unoserver.pids_of("soffice.bin")
    assert len(frozen) == 1, unoserver.processes()
    os.kill(frozen[0], signal.SIGSTOP)
    stopped_at = time.monotonic()

    queued = []
    for i in range(3):
        src = tmp_path / f"queued_{i}.txt"
        write_text(src, marker_of(i))
        queued.append(Conversion(unoserver, lock.port, src, tmp_path / f"queued_{i}.pdf"))

    lock.wait_for(r"restarting backend \(after a connection timed out\)", timeout=ttl + 30)
    lock.wait_for(r"backend restarted in", timeout=150)
    lock.wait_for(r"end=ttl", timeout=30)

    gevent.joinall([gevent.spawn(c.wait, 180) for c in queued])
    for i, c in enumerate(queued):
        assert_pdf_of(c, marker_of(i))
    # They waited for the cut and the restart, not for ever.
    assert max(c.seconds for c in queued) < ttl + 150

    # The frozen client: tcplock reset its connection. Python's XML-RPC client then re-sends
    # the request once on a new connection, which waits its turn and is served by the new
    # LibreOffice; so it usually succeeds. Either way it ends, and cleanly.
    frozen_conv.wait(180)
    print(f"frozen client: rc={frozen_conv.rc} after {frozen_conv.seconds:.1f}s")
    assert frozen_conv.rc != "hung", frozen_conv.describe()
    if frozen_conv.rc == 0:
        assert_pdf_of(frozen_conv, "BigDocument")
    else:
        assert "Traceback" in frozen_conv.output or "Error" in frozen_conv.output

    # The frozen request was cut at the lifetime, with no answer. (On a slow machine its repeat
    # may outlive the lifetime too, and be cut a second time.) The frozen LibreOffice is gone.
    cut = [m for m in map(CONN_LINE.search, lock.lines) if m and m.group(5) == "ttl"]
    assert 1 <= len(cut) <= 2, lock.output()
    assert float(cut[0].group(2)) == pytest.approx(ttl, abs=1.0)
    assert int(cut[0].group(4)) == 0
    assert time.monotonic() - stopped_at < 300
    assert not alive(frozen[0]), "the frozen LibreOffice is still there"
    assert unoserver.pids_of("soffice.bin"), "no LibreOffice after the restart"

    stop_tcplock(lock, unoserver)
    unoserver.ctl("stop")
    assert unoserver.processes() == {}


def test_unoserver_ctl_leaves_nothing_behind(unoserver):
    """start is idempotent; a lost pid file or a killed unoserver leaves no orphan LibreOffice
    (which would hold the UNO port and take a new unoserver's connection); stop is idempotent."""
    unoserver.start()
    first = unoserver.pgid()
    unoserver.ctl("start")
    assert unoserver.pgid() == first
    assert len(unoserver.pids_of("soffice.bin")) == 1

    # The pid file is lost: the next start finds the old instance and replaces it.
    (unoserver.state / "unoserver.pid").unlink()
    unoserver.ctl("start")
    second = unoserver.pgid()
    assert second != first
    assert all(
        int(Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()[2]) == second
        for pid in unoserver.processes()
    ), unoserver.processes()

    # unoserver itself dies: its LibreOffice lives on, and stop still gets rid of it.
    unoserver.ctl("ready", timeout=120)
    os.kill(second, signal.SIGKILL)
    gevent.sleep(0.5)
    assert unoserver.pids_of("soffice.bin"), "LibreOffice should have outlived unoserver"
    unoserver.ctl("stop")
    assert unoserver.processes() == {}
    unoserver.ctl("stop")
    assert unoserver.ctl("status", check=False).returncode == 3
    for port in (unoserver.xmlrpc_port, unoserver.uno_port):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers do: TIME_WAIT is fine
        try:
            s.bind((LOOPBACK, port))  # nobody listens there any more
            s.listen()
        finally:
            s.close()


def test_run_stack_serves_and_stops_cleanly(unoserver, tmp_path):
    """The README's steps: run-stack.sh starts everything, a conversion goes through, and
    Ctrl-C stops tcplock and then unoserver."""
    port = _free_port({unoserver.xmlrpc_port, unoserver.uno_port})
    env = {k: v for k, v in os.environ.items() if not k.startswith(("UNO_", "TCPLOCK_"))}
    env.update(unoserver.env, TCPLOCK_PORT=str(port), STATUS_PORT="off", PYTHON=sys.executable)
    out = tmp_path / "stack.log"
    with open(out, "wb") as f:
        stack = subprocess.Popen(
            [str(EXAMPLE / "run-stack.sh")],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=f,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 120
        while f"listening on {LOOPBACK}:{port}" not in out.read_text():
            assert stack.poll() is None, out.read_text()
            assert time.monotonic() < deadline, out.read_text()
            gevent.sleep(0.1)
        src = tmp_path / "hello.txt"
        write_text(src, "HelloStack")
        conv = Conversion(unoserver, port, src, tmp_path / "hello.pdf")
        conv.wait(120)
        assert_pdf_of(conv, "HelloStack")
        assert unoserver.pids_of("soffice.bin")

        stack.send_signal(signal.SIGINT)  # Ctrl-C
        assert stack.wait(timeout=60) == 0, out.read_text()
    finally:
        if stack.poll() is None:
            os.killpg(stack.pid, signal.SIGKILL)
            stack.wait()
    log = out.read_text()
    assert log.index("stopping:") < log.index("stopping unoserver"), log
    assert unoserver.processes() == {}, log
