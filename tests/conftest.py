"""Real loopback peers for the tests: backends with recorded behaviour, clients, and a fixture
that runs the ``tcplock`` command as a subprocess.

Everything here uses gevent sockets explicitly (the test process is not monkey-patched), so an
in-process TCPLock, its backends and its clients share one event loop and synchronise on events.
"""

from __future__ import annotations

import contextlib
import gc
import os
import re
import signal
import socket as _stdsocket
import struct
import sys
import time
import weakref

import gevent
import pytest
from gevent import socket, subprocess
from gevent.event import Event
from gevent.queue import Queue
from gevent.server import StreamServer
from greenlet import getcurrent, greenlet

from tcplock import TCPLock

LOOPBACK = "127.0.0.1"

# tcplock keeps SIGHUP ignored if it was ignored when it started (nohup, a supervisor), and the
# tests' SIGHUPs would then reload nothing. A suite run under nohup would pass that on to every
# process it starts: a handler of its own (a no-op: a hangup still does not end the run) is
# reset to the default in each of them, where an ignored signal would stay ignored.
if signal.getsignal(signal.SIGHUP) == signal.SIG_IGN:
    signal.signal(signal.SIGHUP, lambda signum, frame: None)


def free_port():
    """A loopback port nothing listens on (connecting to it is refused)."""
    s = _stdsocket.socket()
    s.bind((LOOPBACK, 0))
    port = s.getsockname()[1]
    s.close()
    return port


def connect(port, host=LOOPBACK, timeout=5.0):
    s = socket.create_connection((host, port), timeout=timeout)
    return s


def recv_all(sock, timeout=5.0):
    """Read until EOF; raises on reset."""
    chunks = []
    with gevent.Timeout(timeout):
        while True:
            data = sock.recv(65536)
            if not data:
                return b"".join(chunks)
            chunks.append(data)


def recv_exactly(sock, n, timeout=5.0):
    chunks, got = [], 0
    with gevent.Timeout(timeout):
        while got < n:
            data = sock.recv(n - got)
            if not data:
                raise EOFError(f"EOF after {got} of {n} bytes")
            chunks.append(data)
            got += len(data)
    return b"".join(chunks)


def reset(sock):
    """Close with an RST, as a crashing client would."""
    sock.setsockopt(_stdsocket.SOL_SOCKET, _stdsocket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


class BackendConn:
    """What a backend saw of one connection."""

    def __init__(self, sock, number):
        self.sock = sock
        self.number = number
        self.received = bytearray()
        self.release = Event()  # for the hold behaviour
        self.closed = Event()
        self.eof = Event()
        self.error = None


class Backend(StreamServer):
    """A loopback backend whose per-connection behaviour is a function; records concurrency.

    Behaviours: ``echo`` (echo until EOF, then close), ``hold`` (read and keep everything,
    close once ``conn.release`` is set), ``reply_at_eof`` (read to EOF, then send back what
    was read with a prefix, then close), ``reset`` (RST at once), ``never`` (accept, never read,
    never close until released), ``greet_echo`` (send a greeting then echo).
    """

    def __init__(self, behaviour="echo", port=0):
        super().__init__((LOOPBACK, port))
        self.behaviour = getattr(self, "_" + behaviour) if isinstance(behaviour, str) else behaviour
        self.current = 0
        self.most = 0
        self.count = 0
        self.conns = []
        self.arrivals = Queue()  # BackendConn, as they connect
        self.all_closed = Event()
        self.all_closed.set()

    def handle(self, sock, address):
        self.count += 1
        self.current += 1
        self.all_closed.clear()
        self.most = max(self.most, self.current)
        conn = BackendConn(sock, self.count)
        self.conns.append(conn)
        self.arrivals.put(conn)
        try:
            self.behaviour(conn)
        except OSError as e:
            conn.error = e
        finally:
            self.current -= 1
            conn.closed.set()
            if not self.current:
                self.all_closed.set()

    #: The started ones, by port (a lock given only a port finds its Backend here).
    started = weakref.WeakValueDictionary()

    def start(self):
        super().start()
        Backend.started[self.server_port] = self

    def next_conn(self, timeout=5.0):
        return self.arrivals.get(timeout=timeout)

    def take_check(self, timeout=5.0):
        """tcplock checks a backend it does not run once when it starts (a connection it
        closes at once, sending nothing but a PROXY header if it sends them): wait for that
        connection to end and take it off the record, so that the test counts its clients."""
        conn = self.next_conn(timeout)
        assert conn.number == 1, "a client reached the backend before the start check"
        conn.release.set()  # behaviours that hold a connection until released
        conn.closed.wait(1.0)  # (a behaviour of a test's own may wait for more)
        self.conns.remove(conn)
        self.count = self.most = 0

    def _read_some(self, conn, keep=True):
        data = conn.sock.recv(65536)
        if not data:
            conn.eof.set()
        elif keep:
            conn.received += data
        return data

    def _echo(self, conn):
        while True:
            data = self._read_some(conn)
            if not data:
                break
            conn.sock.sendall(data)

    def _hold(self, conn):
        def reader():
            try:
                while self._read_some(conn):
                    pass
            except OSError as e:
                conn.error = e

        g = gevent.spawn(reader)
        conn.release.wait()
        g.kill()
        conn.sock.close()

    def _reply_at_eof(self, conn):
        while self._read_some(conn):
            pass
        conn.sock.sendall(b"got:" + bytes(conn.received))
        conn.sock.close()

    def _reset(self, conn):
        reset(conn.sock)

    def _never(self, conn):
        conn.release.wait()
        conn.sock.close()

    def release_all(self):
        for c in self.conns:
            c.release.set()


@pytest.fixture
def make_backend():
    servers = []

    def make(behaviour="echo", port=0):
        b = Backend(behaviour, port)
        b.start()
        servers.append(b)
        return b

    yield make
    for b in servers:
        b.release_all()
        b.stop(timeout=0)


@pytest.fixture(scope="session")
def readme_clone(tmp_path_factory):
    """A fresh copy of the checkout in which the README's quick start has run, as written,
    from its top: it made ``.venv``, installed tcplock there and started the demo on port 9000.
    Two clients then see the lock at work and Ctrl-C (SIGINT) stops it; ``quick_start`` holds
    what they saw, for test_docs.py to check. The README commands' tests run in this copy."""
    import readme_commands as rc

    clone = rc.copy_checkout(tmp_path_factory.mktemp("clone"))
    rc.ensure_free(9000)
    shell = rc.Shell(
        rc.command("README.md", "python3 -m venv .venv && .venv/bin/pip install ."), cwd=clone
    )
    seen = {}
    try:
        shell.wait_for(r"listening on 127\.0\.0\.1:9000\b", timeout=600)
        first = connect(9000)
        seen["first"] = first.recv(200)
        second = connect(9000)
        second.settimeout(0.5)
        try:
            seen["second while the first is in"] = second.recv(200)
        except _stdsocket.timeout:
            seen["second while the first is in"] = b""
        first.close()
        second.settimeout(5)
        seen["second"] = second.recv(200)
        second.close()
        seen["exit status on Ctrl-C"] = shell.stop(signal.SIGINT)
    finally:
        shell.kill()
    seen["output"] = shell.output()
    yield clone, seen


@pytest.fixture
def make_lock():
    locks = []

    def make(backend, **kw):
        """A started lock before ``backend`` (a Backend or a port), or before a pool of them
        (a list)."""
        pool = backend if isinstance(backend, list) else [backend]
        ports = [b.server_port if hasattr(b, "server_port") else b for b in pool]
        kw.setdefault("connect_timeout", 1.0)
        # Test clients rarely close on their own once the backend has finished; a short finish
        # time frees the slot for the next client without each test closing every client.
        kw.setdefault("finish_timeout", 0.05)
        kw.setdefault("client_finish_timeout", kw["finish_timeout"])
        lock = TCPLock((LOOPBACK, 0), backends=[(LOOPBACK, p) for p in ports], **kw)
        lock.start()
        locks.append(lock)
        if kw.get("backend_cmd") is None:
            for p in ports:
                if p in Backend.started:
                    Backend.started[p].take_check()
        return lock

    yield make
    for lock in locks:
        lock.stop(timeout=0)


class LogCapture:
    """Collects tcplock's per-connection log lines and lets a test wait for them."""

    LINE = re.compile(
        r"(?P<client>\S+) queued=(?P<queued>[\d.]+)s active=(?P<active>[\d.]+)s "
        r"up=(?P<up>\d+) down=(?P<down>\d+) end=(?P<end>\S+)"
    )

    def __init__(self):
        self.lines = []
        self.records = []  # the logging records themselves (with exc_info, level, ...)
        self.ends = Queue()

    def feed(self, message):
        self.lines.append(message)
        m = self.LINE.search(message)
        if m:
            self.ends.put(m.groupdict())

    def next_end(self, timeout=5.0):
        return self.ends.get(timeout=timeout)


@pytest.fixture
def conn_log():
    import logging

    cap = LogCapture()

    class H(logging.Handler):
        def emit(self, record):
            cap.records.append(record)
            cap.feed(record.getMessage())

    handler = H(level=logging.DEBUG)
    logger = logging.getLogger("tcplock")
    old = logger.level
    logger.setLevel(logging.DEBUG)
    logger.addHandler(handler)
    yield cap
    logger.removeHandler(handler)
    logger.setLevel(old)


class ChildProcess:
    """A subprocess whose standard error is read line by line into ``lines``; subclasses look
    at each line in :meth:`on_line`. Environment variables starting with one of
    ``clean_prefixes`` are removed from the child's environment before ``env`` is applied."""

    clean_prefixes: tuple = ("TCPLOCK_",)

    def __init__(self, argv, env=None, cwd=None, preexec_fn=None):
        full_env = {k: v for k, v in os.environ.items() if not k.startswith(self.clean_prefixes)}
        full_env["PYTHONUNBUFFERED"] = "1"
        full_env.update(env or {})
        self.lines = []
        self.new_line = Event()
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=full_env,
            cwd=None if cwd is None else str(cwd),
            preexec_fn=preexec_fn,
        )
        self._reader = gevent.spawn(self._read)

    def _read(self):
        for raw in self.proc.stderr:
            line = raw.decode(errors="replace").rstrip("\n")
            self.lines.append(line)
            self.on_line(line)
            self.new_line.set()
            self.new_line.clear()
        self.on_eof()

    def on_line(self, line):
        pass

    def on_eof(self):
        pass

    def wait_for(self, pattern, timeout=10):
        """The first line (so far or to come) matching ``pattern``."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        seen = 0
        while True:
            for line in self.lines[seen:]:
                if rx.search(line):
                    return line
            seen = len(self.lines)
            left = deadline - time.monotonic()
            if left <= 0 or (self.proc.poll() is not None and self._reader.dead):
                raise AssertionError(f"no line matching {pattern!r}:\n" + self.output())
            self.new_line.wait(min(left, 0.5))

    def signal(self, sig=signal.SIGTERM):
        self.proc.send_signal(sig)

    def wait(self, timeout=15):
        rc = self.proc.wait(timeout=timeout)
        self._reader.join(timeout=5)
        return rc

    def output(self):
        return "\n".join(self.lines)

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


class CLIProcess(ChildProcess):
    """A ``tcplock`` subprocess; ``port`` is its listening port once it has logged it."""

    LISTENING = re.compile(r"listening on (\S+):(\d+),")

    def __init__(self, args, env=None, cwd=None, preexec_fn=None):
        self.port = None
        self.ready = Event()
        argv = [sys.executable, "-m", "tcplock", *args]
        super().__init__(argv, env=env, cwd=cwd, preexec_fn=preexec_fn)

    def on_line(self, line):
        m = self.LISTENING.search(line)
        if m and self.port is None:
            self.port = int(m.group(2))
            self.ready.set()

    def on_eof(self):
        self.ready.set()

    def wait_ready(self, timeout=10):
        assert self.ready.wait(timeout), "tcplock did not start:\n" + self.output()
        assert self.port, "tcplock did not start:\n" + self.output()
        return self.port


def limited_cli(args, nofile):
    """A tcplock command whose descriptor limit (RLIMIT_NOFILE) is ``nofile``."""

    def limit():
        import resource

        resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

    return CLIProcess(args, preexec_fn=limit)


@pytest.fixture
def cli():
    procs = []

    def run(*args, env=None, cwd=None):
        p = CLIProcess(list(args), env=env, cwd=cwd)
        procs.append(p)
        return p

    def to(backend, *args, **kw):
        """tcplock on a free loopback port in front of ``backend``, with more options."""
        port = str(backend if isinstance(backend, int) else backend.server_port)
        return run("-l", "127.0.0.1:0", "--proxy-host", "127.0.0.1", "-p", port, *args, **kw)

    run.to = to
    yield run
    for p in procs:
        p.kill()


def run_cli(*args, env=None, timeout=20):
    """Run the command to completion; returns (status, stdout, stderr)."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("TCPLOCK_")}
    if env:
        full_env.update(env)
    p = subprocess.run(
        [sys.executable, "-m", "tcplock", *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        env=full_env,
        timeout=timeout,
    )
    return p.returncode, p.stdout.decode(), p.stderr.decode()


def process_alive(pid):
    """Whether a process runs (a zombie does not)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return False
    return data[data.rindex(b")") + 2 :].split()[0] != b"Z"


@pytest.fixture
def marked():
    """An environment that marks every process started with it (and their children):
    ``marked.env`` to give, ``marked.alive()`` the marked processes that live. Whatever of
    them is left is killed after the test."""
    value = f"{os.getpid()}-{time.monotonic_ns()}"
    needle = f"TEST_LEFTOVER_MARK={value}".encode()

    class Marked:
        env = {"TEST_LEFTOVER_MARK": value}

        @staticmethod
        def alive():
            found = []
            for name in os.listdir("/proc"):
                if not name.isdigit():
                    continue
                try:
                    with open(f"/proc/{name}/environ", "rb") as f:
                        environ = f.read().split(b"\0")
                except OSError:
                    continue
                if needle in environ and process_alive(int(name)):
                    found.append(int(name))
            return found

    yield Marked
    for pid in Marked.alive():
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def wait_until(predicate, timeout=5.0, what="condition"):
    """Yield to the event loop until predicate() holds (for state with no event of its own)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        gevent.sleep(0.002)


def http(port, method="GET", path="/status", body=b"", timeout=5.0):
    """A minimal HTTP/1.0 request over a gevent socket: (status, headers, body)."""
    s = connect(port, timeout=timeout)
    try:
        head = f"{method} {path} HTTP/1.0\r\nHost: 127.0.0.1\r\nContent-Length: {len(body)}"
        s.sendall(head.encode() + b"\r\n\r\n" + body)
        raw = recv_all(s, timeout=timeout)
    finally:
        s.close()
    head, _, payload = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    return status, headers, payload


_apt_updated = False


def require_command(command: str, package: str) -> str:
    """Path of ``command``, installing Debian's ``package`` (or several, separated by spaces)
    the first time a test needs it, as
    on a fresh machine or in CI. Where installing is impossible (not root, no apt-get) or
    forbidden (TCPLOCK_TEST_NO_INSTALL), the test is skipped with the reason; under CI=true it
    fails instead, so a missing install step can never pass for green."""
    import shutil

    global _apt_updated
    path = shutil.which(command)
    if path:
        return path
    problem = None
    if os.environ.get("TCPLOCK_TEST_NO_INSTALL") and not os.environ.get("CI"):
        problem = (
            f"{command} is not installed (apt-get install {package}; "
            "TCPLOCK_TEST_NO_INSTALL forbids the tests to install it)"
        )
    elif os.geteuid() != 0 or not shutil.which("apt-get"):
        problem = f"{command} is not installed (apt-get install {package}, as root)"
    else:
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        import subprocess as _subprocess

        if not _apt_updated:
            _subprocess.run(
                ["apt-get", "-o", "DPkg::Lock::Timeout=300", "update", "-q"],
                env=env,
                capture_output=True,
                timeout=600,
            )
            _apt_updated = True
        done = _subprocess.run(
            [
                "apt-get",
                "-o",
                "DPkg::Lock::Timeout=300",
                "install",
                "-y",
                "-q",
                "--no-install-recommends",
                *package.split(),
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=1200,
        )
        path = shutil.which(command)
        if not path:
            problem = f"installing {package} failed: {done.stderr.strip()[-500:]}"
    if problem:
        if os.environ.get("CI"):
            pytest.fail(problem)
        pytest.skip(problem)
    return path


# -- what the kernel and the interpreter say about this process -------------------------------
#
# Tests look at tcplock from outside: its sockets as the kernel holds them, the system calls it
# makes, the descriptors and greenlets it leaves behind. None of this depends on how the lock is
# built inside.

TCP_STATES = {
    1: "ESTABLISHED",
    2: "SYN_SENT",
    3: "SYN_RECV",
    4: "FIN_WAIT1",
    5: "FIN_WAIT2",
    6: "TIME_WAIT",
    7: "CLOSE",
    8: "CLOSE_WAIT",
    9: "LAST_ACK",
    10: "LISTEN",
    11: "CLOSING",
}


def tcp_state(sock):
    """The kernel's TCP state of a socket (its ``TCP_INFO``), as a name such as ``CLOSE_WAIT``."""
    info = sock.getsockopt(_stdsocket.IPPROTO_TCP, _stdsocket.TCP_INFO, 8)
    return TCP_STATES.get(info[0], str(info[0]))


def kernel_tcp(remote_port):
    """The states of every TCP socket on this host whose peer is ``remote_port``, from
    /proc/net/tcp (sockets of any process, with or without a descriptor)."""
    states = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    fields = line.split()
                    if int(fields[2].rsplit(":", 1)[1], 16) == remote_port:
                        states.append(TCP_STATES.get(int(fields[3], 16), fields[3]))
        except FileNotFoundError:
            pass
    return states


def tcp_connections(port, families=(_stdsocket.AF_INET, _stdsocket.AF_INET6)):
    """Every TCP connection on this host with ``port`` at one end (TIME_WAIT aside), from the
    kernel's socket table (sock_diag): ``(local_port, remote_port, state, held)`` where
    ``held`` says whether a process still has the socket (False once it was closed and only
    the kernel finishes it). One netlink request per address family: a few milliseconds."""
    sock_diag_by_family, nlmsg_done, nlmsg_error = 20, 3, 2
    states = 0xFFF & ~(1 << 6) & ~(1 << 10)  # not TIME_WAIT, not LISTEN
    found = []
    nl = _stdsocket.socket(_stdsocket.AF_NETLINK, _stdsocket.SOCK_DGRAM, 4)  # NETLINK_SOCK_DIAG
    try:
        for family in families:
            request = struct.pack("=BBBBI48x", family, _stdsocket.IPPROTO_TCP, 0, 0, states)
            header = struct.pack("=IHHII", 16 + len(request), sock_diag_by_family, 0x301, 1, 0)
            nl.send(header + request)
            done = False
            while not done:
                data = nl.recv(1 << 16)
                offset = 0
                while offset < len(data):
                    length, kind = struct.unpack_from("=IH", data, offset)
                    if kind == nlmsg_done:
                        done = True
                        break
                    if kind == nlmsg_error:
                        raise OSError("sock_diag request failed")
                    body = offset + 16
                    state = data[body + 1]
                    sport, dport = struct.unpack_from(">HH", data, body + 4)
                    inode = struct.unpack_from("=I", data, body + 68)[0]
                    if port in (sport, dport):
                        found.append((sport, dport, TCP_STATES.get(state, str(state)), inode != 0))
                    offset += (length + 3) & ~3
    finally:
        nl.close()
    return found


def conversations(port):
    """How many TCP connections over IPv4 to ``port`` (a server's listening port) are still held
    open by the processes at both ends: neither side has closed its socket, nor has it been
    reset."""
    ends = {}
    for local, remote, state, held in tcp_connections(port, (_stdsocket.AF_INET,)):
        if state != "CLOSE":
            ends.setdefault(remote if local == port else local, []).append(held)
    return sum(1 for held in ends.values() if len(held) == 2 and all(held))


def open_fds():
    """How many descriptors this process has open."""
    return len(os.listdir("/proc/self/fd"))


def pipes():
    """The pipes this process holds a descriptor of, by inode."""
    found = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue
        if target.startswith("pipe:"):
            found.add(target)
    return found


def _root(g):
    while g.parent is not None:
        g = g.parent
    return g


def live_greenlets():
    """How many greenlets of this thread exist that have not finished. (Other threads', such as
    those of gevent's threadpool, which its resolver may start at any time, are not counted.)"""
    gc.collect()
    main = _root(getcurrent())
    return sum(
        1 for o in gc.get_objects() if isinstance(o, greenlet) and not o.dead and _root(o) is main
    )


@contextlib.contextmanager
def process_socket(local=None, peer=None):
    """A duplicate of the TCP socket this process holds with these addresses (as the kernel
    reports them), or None; the duplicate is closed on leaving, so the original's life is not
    prolonged beyond the ``with`` block. Socket options read through it are the original's."""
    found = None
    for name in os.listdir("/proc/self/fd"):
        try:
            if not os.readlink(f"/proc/self/fd/{name}").startswith("socket:"):
                continue
            dup = os.dup(int(name))
        except OSError:
            continue
        try:
            s = _stdsocket.socket(fileno=dup)
        except OSError:
            os.close(dup)
            continue
        try:
            if (
                s.type == _stdsocket.SOCK_STREAM
                and (local is None or s.getsockname()[:2] == tuple(local)[:2])
                and (peer is None or s.getpeername()[:2] == tuple(peer)[:2])
            ):
                found = s
                break
        except OSError:
            pass
        s.close()
    try:
        yield found
    finally:
        if found is not None:
            found.close()


def holds_socket(local=None, peer=None):
    """Whether this process still has a descriptor for a TCP socket with these addresses."""
    with process_socket(local, peer) as s:
        return s is not None


_connect_watchers = []
_audit_installed = []


def _audit(event, args):
    # Called by the interpreter for every audited operation; socket.connect is raised by both
    # connect() and connect_ex(), before the system call, with (socket, address).
    if event == "socket.connect" and _connect_watchers:
        for watcher in list(_connect_watchers):
            watcher(args[1])


@pytest.fixture
def on_connect():
    """``on_connect(fn)`` has ``fn(address)`` called each time this process is about to open a
    TCP connection (any connect() system call), before the call is made. An exception ``fn``
    raises is raised by that connect() call instead, as if the system call had failed so."""
    if not _audit_installed:
        sys.addaudithook(_audit)  # an audit hook stays for the life of the process
        _audit_installed.append(_audit)

    def add(fn):
        _connect_watchers.append(fn)

    yield add
    _connect_watchers.clear()


def pids_in(pidfile):
    if not pidfile.exists():
        return []
    return [int(p) for line in pidfile.read_text().split("\n") for p in line.split() if p != "0"]


@pytest.fixture
def pidfile(tmp_path):
    """A file the pid servers write their pids to; whatever of them is left is killed after
    the test."""
    path = tmp_path / "pids"
    yield path
    for pid in pids_in(path):
        if process_alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
