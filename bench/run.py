#!/usr/bin/env python3
"""tcplock benchmark suite: tcplock against haproxy and a direct connection (stdlib only).

One command (see bench/README.md):   bash bench/run            full run, ~8 minutes
                                      bash bench/run --smoke    every figure once, tiny, ~25 s

It installs what is missing (Debian's haproxy, nginx-light, wrk, iperf3 with apt-get, as root;
tcplock from this checkout with pip), starts every server on 127.0.0.1 only, and measures:

  hand-off  wrk -t1 -c20 -H 'Connection: close' against nginx's short reply: every request is a
            new connection, so through a 1-slot peer every request is a hand-off of the slot.
            req/s, higher is better.  Peers: direct, haproxy-mc1 (server maxconn 1),
            tcplock (--slots 1), tcplock-quiet (--slots 1 --log-level warning), and
            tcplock-cft0 (--slots 1 --client-finish-timeout 0: the slot passes on as the
            backend closes without asking the kernel whether it closed for good; nginx does,
            so this differs from tcplock only by the cost of that question), and tcplock-hook
            (--slots 1 --hooks FILE, FILE defining a no-op Python on_activate(conn): the cost
            of a Python hook per hand-off; target >= 0.8x tcplock).
  pool      the same requests with -c40 through a pool of four backends of one slot each: one
            nginx listening on four ports, each its own backend.  Every request is a hand-off
            of one of the four slots.  req/s, higher is better.  Peers: tcplock (--slots 1 and
            four --backend), haproxy-pool (four "server ... maxconn 1", balance leastconn,
            nbthread 1), haproxy-pool-mt (the same with haproxy's default threads), and direct
            (nginx's first port, no limit: the ceiling of nginx and wrk here, for reference).
            Target: tcplock >= 1.0x the faster haproxy.  Each run notes the CPU used by nginx,
            the peer and wrk, in % of one CPU, and the share of the machine's CPUs left idle.
  bulk      one iperf3 TCP stream.  Gbit/s, higher is better.  Peers: direct, haproxy (default
            config: no maxconn), tcplock and tcplock-quiet with --slots 2 (iperf3 opens a control
            and a data connection).
  latency   1-byte ping-pong on one established connection through the peer, median round trip
            in microseconds, lower is better.  Same peers as hand-off.  "latency" pins every
            process (backend, peer, client) to CPU 0; "latency-unpinned" pins nothing: on a small
            VM a cross-CPU wake-up costs tens of microseconds, so unpinned round trips are bimodal
            and noisy, while pinned ones are stable (but every process shares one CPU).
  queue     tcplock --slots 1 in front of a backend that holds the first client; then 5,000 and
            10,000 clients connect and wait in the queue.  Figure: growth of tcplock's VmRSS
            per waiting client, KiB.  Then the slot is released and every client must be served,
            in connect order (each sends its sequence number; the backend records what it sees);
            "queue-drain" is the rate at which the queue emptied, clients/s.

Rounds are interleaved: every round measures every (figure, peer) once, in an order rotated by
the round number, so slow drifts of a shared machine hit every peer alike.  The table gives the
median over rounds, min-max, spread ((max-min)/median) and the ratios of medians to haproxy and
to direct from the same run, then the issue's targets.  --figures and --peers limit a run.

--compare REV measures another revision side by side in the same run: REV is checked out into a
temporary git worktree (removed at exit) and tcplock runs from there (python -m tcplock, that
tree first on PYTHONPATH, cwd there) as tcplock@SHORTREV in every figure (queue included; pool
only when REV's tcplock has --backend) and tcplock-hook@SHORTREV in hand-off (skipped with a
note if it does not start at REV).  The summary gives, per figure, the ratio of medians this
checkout / REV and the median of the ratios paired round by round; tcplock's hand-off, bulk
and queue memory must be within 5%.

Every child runs in its own process group and is killed on exit, error or signal; every client
command has a timeout and the whole run has --max-seconds.

Internal helper modes (run by the harness itself):
  run.py --_echo PORT               threaded echo server
  run.py --_pingpong PORT N WARMUP  ping-pong client, prints JSON
  run.py --_qbackend PORT FILE      queue backend: records each client's number, in order
"""

from __future__ import annotations

import argparse
import atexit
import errno
import json
import os
import platform
import re
import resource
import selectors
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HOST = "127.0.0.1"  # every server and every client: loopback only, never anything else
THIS = os.path.abspath(__file__)
REPO = os.path.dirname(os.path.dirname(THIS))  # the checkout whose tcplock is measured
TOOLS = {
    "haproxy": "haproxy",
    "nginx": "nginx-light",
    "wrk": "wrk",
    "iperf3": "iperf3",
    "taskset": "util-linux",
}
SBIN = ("/usr/local/sbin", "/usr/sbin", "/sbin")

# The targets: (figure, peer it is compared to, minimum ratio) and the queue ceiling.
TARGETS = [("hand-off", "haproxy-mc1", 1.0), ("bulk", "haproxy", 1.3), ("bulk", "direct", 0.65)]
QUEUE_TARGET_KIB = 8.0
HOOK_TARGET = 0.8  # tcplock-hook (a no-op Python on_activate) over tcplock, hand-off
POOL_TARGET = 1.0  # pool: tcplock over the faster of haproxy-pool and haproxy-pool-mt
POOL_BACKENDS = 4  # pool: backends of one slot each
COMPARE_TOLERANCE = 0.05  # --compare: this checkout may be this much worse than REV, no more


def say(msg: str = "") -> None:
    print(msg, flush=True)


# --------------------------------------------------------------------------------------------
# helper modes: each runs as a process of its own, so it shares no GIL with the harness
# --------------------------------------------------------------------------------------------


def echo_server(port: int) -> None:
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((HOST, port))
    srv.listen(128)

    def handle(conn: socket.socket) -> None:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with conn:
            while True:
                try:
                    data = conn.recv(65536)
                except OSError:
                    return
                if not data:
                    return
                conn.sendall(data)

    while True:
        conn, _ = srv.accept()
        threading.Thread(target=handle, args=(conn,), daemon=True).start()


def pingpong_client(port: int, n: int, warmup: int) -> None:
    s = socket.create_connection((HOST, port), timeout=10)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    b = b"x"
    pc = time.perf_counter_ns
    rtts = []
    for i in range(warmup + n):
        t0 = pc()
        s.sendall(b)
        got = s.recv(1)
        t1 = pc()
        if got != b:
            raise SystemExit(f"bad echo at iteration {i}: {got!r}")
        if i >= warmup:
            rtts.append(t1 - t0)
    s.close()
    rtts.sort()

    def q(p: float) -> float:
        return rtts[min(len(rtts) - 1, int(p * len(rtts)))] / 1000.0

    print(
        json.dumps(
            {
                "n": n,
                "median_us": statistics.median(rtts) / 1000.0,
                "p10_us": q(0.10),
                "p90_us": q(0.90),
                "p99_us": q(0.99),
            }
        )
    )


def queue_backend(port: int, path: str) -> None:
    """One connection at a time (tcplock --slots 1 never opens two). Reads one line: 'hold'
    is the slot holder, kept until it sends EOF; a number is recorded, answered 'ok N', closed.
    A connection with no line at all (a readiness probe) is just closed."""
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((HOST, port))
    srv.listen(128)
    with open(path, "a", buffering=1) as out:
        while True:
            c, _ = srv.accept()
            c.settimeout(300)
            try:
                f = c.makefile("rb")
                line = f.readline().strip()
                if line == b"hold":
                    out.write("hold\n")
                    while f.read1(4096):
                        pass
                elif line:
                    out.write(line.decode() + "\n")
                    c.sendall(b"ok " + line + b"\n")
                f.close()
            except OSError:
                pass
            finally:
                c.close()


# --------------------------------------------------------------------------------------------
# processes
# --------------------------------------------------------------------------------------------


class Procs:
    """Every child we start, each in its own process group; cleanup() kills them all."""

    def __init__(self, workdir: str):
        self.workdir = workdir
        self.items: list[tuple[str, subprocess.Popen, str]] = []

    def start(
        self,
        name: str,
        argv: list[str],
        cpus: str | None = None,
        cwd: str | None = None,
        env: dict | None = None,
    ) -> subprocess.Popen:
        log = os.path.join(self.workdir, f"{name}.log")
        if cpus is not None:
            argv = ["taskset", "-c", cpus, *argv]
        with open(log, "wb") as fh:
            p = subprocess.Popen(
                argv,
                stdout=fh,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=cwd,
                env=env,
                start_new_session=True,
            )
        self.items.append((name, p, log))
        return p

    def log_of(self, p: subprocess.Popen) -> str:
        return next(log for _, q, log in self.items if q is p)

    def check_alive(self) -> None:
        for name, p, log in self.items:
            if p.poll() is not None:
                how = (
                    f"was killed by signal {-p.returncode}"
                    if p.returncode < 0
                    else f"exited with status {p.returncode}"
                )
                raise RuntimeError(
                    f"{name} (pid {p.pid}) {how}; last lines of its log:\n{tail(log)}"
                )

    @staticmethod
    def _kill(p: subprocess.Popen, sig: int) -> None:
        try:
            os.killpg(p.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def stop(self, p: subprocess.Popen) -> None:
        if p.poll() is None:
            self._kill(p, signal.SIGTERM)
            try:
                p.wait(3)
            except subprocess.TimeoutExpired:
                self._kill(p, signal.SIGKILL)
                p.wait(3)
        self._kill(p, signal.SIGKILL)  # anything the child left in its group
        self.items = [it for it in self.items if it[1] is not p]

    def cleanup(self) -> None:
        for _, p, _ in reversed(self.items):
            if p.poll() is None:
                self._kill(p, signal.SIGTERM)
        deadline = time.monotonic() + 3
        for _, p, _ in reversed(self.items):
            try:
                p.wait(max(0.05, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            self._kill(p, signal.SIGKILL)
            try:
                p.wait(2)
            except subprocess.TimeoutExpired:
                pass
        self.items.clear()


def tail(path: str, n: int = 15) -> str:
    try:
        with open(path, "rb") as f:
            return b"\n".join(f.read().splitlines()[-n:]).decode(errors="replace")
    except OSError:
        return "(no log)"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen, name: str, log: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited at start ({proc.returncode}):\n{tail(log)}")
        try:
            socket.create_connection((HOST, port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{name} did not listen on {HOST}:{port} within {timeout}s:\n{tail(log)}")


def run(argv: list[str], timeout: float, cpus: str | None = None) -> str:
    if cpus is not None:
        argv = ["taskset", "-c", cpus, *argv]
    r = subprocess.run(
        argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
    )
    if r.returncode != 0:
        msg = (r.stderr.strip() or r.stdout.strip())[-800:]
        raise RuntimeError(f"{argv[0]} exited with {r.returncode}: {msg}")
    return r.stdout


# --------------------------------------------------------------------------------------------
# installing what is missing
# --------------------------------------------------------------------------------------------


def ensure_tools() -> None:
    os.environ["PATH"] = os.pathsep.join(
        [os.environ.get("PATH", "")] + [d for d in SBIN if d not in os.environ.get("PATH", "")]
    )
    missing = [t for t in TOOLS if not shutil.which(t)]
    if missing:
        pkgs = sorted({TOOLS[t] for t in missing})
        say(f"[install] missing: {' '.join(missing)} -> apt-get install -y {' '.join(pkgs)}")
        apt_install(pkgs)
        still = [t for t in TOOLS if not shutil.which(t)]
        if still:
            raise RuntimeError(f"still missing after apt-get install: {' '.join(still)}")


def apt_install(pkgs: list[str]) -> None:
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise RuntimeError(
            f"cannot install {' '.join(pkgs)}: needs root and apt-get "
            f"(install them by hand: apt-get install -y {' '.join(pkgs)})"
        )
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    # Packages must not start their system services (nginx would listen on port 80 of every
    # interface): a policy-rc.d that denies everything, for the install only, unless one exists.
    policy = "/usr/sbin/policy-rc.d"
    made_policy = False
    if not os.path.exists(policy):
        with open(policy, "w") as f:
            f.write("#!/bin/sh\nexit 101\n")
        os.chmod(policy, 0o755)
        made_policy = True
    try:

        def install(names: list[str]) -> bool:
            r = subprocess.run(
                ["apt-get", "install", "-y", "--no-install-recommends", *names],
                env=env,
                stdin=subprocess.DEVNULL,
                timeout=600,
            )
            return r.returncode == 0

        def update() -> None:
            subprocess.run(
                ["apt-get", "update"], env=env, stdin=subprocess.DEVNULL, timeout=300, check=True
            )

        lists = "/var/lib/apt/lists"
        if not any(
            n.endswith("Packages") or "Packages." in n
            for n in (os.listdir(lists) if os.path.isdir(lists) else [])
        ):
            update()  # no package lists at all: update first
        elif install(pkgs):
            return
        else:
            update()  # lists may be stale: update once, then try again
        if install(pkgs):
            return
        if "nginx-light" in pkgs:  # newer Debian releases have no nginx-light flavour
            if install([p if p != "nginx-light" else "nginx" for p in pkgs]):
                return
        raise RuntimeError(f"apt-get install {' '.join(pkgs)} failed")
    finally:
        if made_policy:
            os.unlink(policy)


def tcplock_env(tree: str = REPO) -> dict:
    """Run tcplock from `tree` (cwd and PYTHONPATH), whatever else is installed."""
    env = dict(os.environ)
    env["PYTHONPATH"] = tree + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def ensure_tcplock(tree: str = REPO) -> str:
    """Where tcplock is imported from when run from `tree`; for this checkout, installs it (and
    its dependencies) with pip when it cannot be imported.  Another tree must import as it is."""
    probe = [
        sys.executable,
        "-c",
        "import gevent, tcplock.cli; print(tcplock.__version__, tcplock.__file__)",
    ]
    r = subprocess.run(
        probe, capture_output=True, text=True, cwd=tree, env=tcplock_env(tree), timeout=60
    )
    if r.returncode != 0 and tree != REPO:
        raise RuntimeError(f"tcplock from {tree} is not importable:\n{r.stderr[-800:]}")
    if r.returncode != 0:
        say(
            f"[install] tcplock or its dependencies not importable -> "
            f"{sys.executable} -m pip install -e {REPO}"
        )
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", "-e", REPO],
            stdin=subprocess.DEVNULL,
            timeout=600,
            check=True,
        )
        r = subprocess.run(
            probe, capture_output=True, text=True, cwd=REPO, env=tcplock_env(), timeout=60
        )
        if r.returncode != 0:
            raise RuntimeError(f"tcplock still not importable:\n{r.stderr[-800:]}")
    where = r.stdout.strip()
    imported = os.path.realpath(where.split()[-1])
    if not imported.startswith(os.path.join(os.path.realpath(tree), "")):
        raise RuntimeError(f"tcplock run from {tree} imports another copy: {where}")
    return where


def raise_nofile(need: int) -> int:
    """Raise this process's open-file limit to at least `need`; children (tcplock) inherit it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= need:
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, max(hard, need)))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def machine_info(tcplock_where: str) -> list[str]:
    def out(argv: list[str]) -> str:
        try:
            r = subprocess.run(argv, capture_output=True, text=True, timeout=20, cwd=REPO)
            return (r.stdout + r.stderr).strip().splitlines()[0]
        except (OSError, IndexError, subprocess.TimeoutExpired):
            return "?"

    model = "?"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gevent = out([sys.executable, "-c", "import gevent; print(gevent.__version__)"])
    commit = out(["git", "-C", REPO, "rev-parse", "--short", "HEAD"])
    dirty = out(["git", "-C", REPO, "status", "--porcelain", "--", "tcplock"])
    return [
        f"cpus: {os.cpu_count()} ({model}); kernel {platform.release()}; "
        f"{platform.python_implementation()} {platform.python_version()}; gevent {gevent}",
        f"tcplock {tcplock_where} (commit {commit}"
        f"{', tcplock/ has uncommitted changes' if dirty not in ('', '?') else ''})",
        out(["haproxy", "-v"]),
        out(["nginx", "-v"]),
        out(["wrk", "-v"]),
        out(["iperf3", "-v"]),
    ]


# --------------------------------------------------------------------------------------------
# backends and peers
# --------------------------------------------------------------------------------------------


def start_nginx(P: Procs, tag: str, cpus: str | None) -> tuple[int, subprocess.Popen]:
    ports, p = start_nginx_ports(P, tag, cpus, 1, 1)
    return ports[0], p


def start_nginx_ports(
    P: Procs, tag: str, cpus: str | None, nports: int, workers: int
) -> tuple[list[int], subprocess.Popen]:
    """One nginx answering `ok\\n` on `nports` ports of its own (a `server` block each), with
    `workers` worker processes; with more than one, each port is `reuseport`, so the kernel
    spreads its connections over the workers instead of waking them all."""
    ports = [free_port() for _ in range(nports)]
    reuse = " reuseport" if workers > 1 else ""
    servers = "".join(
        f"""    server {{
        listen {HOST}:{port} backlog=4096{reuse};
        location / {{ return 200 "ok\\n"; }}
    }}
"""
        for port in ports
    )
    prefix = os.path.join(P.workdir, f"nginx-{tag}")
    t = os.path.join(prefix, "tmp")
    os.makedirs(t, exist_ok=True)
    conf = os.path.join(prefix, "nginx.conf")
    user = "user root;\n" if os.geteuid() == 0 else ""
    with open(conf, "w") as f:
        f.write(f"""{user}worker_processes {workers};
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {t}/body;
    proxy_temp_path {t}/proxy;
    fastcgi_temp_path {t}/fastcgi;
    uwsgi_temp_path {t}/uwsgi;
    scgi_temp_path {t}/scgi;
{servers}}}
""")
    p = P.start(
        f"nginx-{tag}",
        [
            "nginx",
            "-e",
            os.path.join(prefix, "early_error.log"),
            "-p",
            prefix + "/",
            "-c",
            conf,
            "-g",
            "daemon off;",
        ],
        cpus,
    )
    return ports, p


def start_iperf3(P: Procs, tag: str, cpus: str | None) -> tuple[int, subprocess.Popen]:
    port = free_port()
    return port, P.start(f"iperf3-{tag}", ["iperf3", "-s", "-B", HOST, "-p", str(port)], cpus)


def start_echo(P: Procs, tag: str, cpus: str | None) -> tuple[int, subprocess.Popen]:
    port = free_port()
    return port, P.start(f"echo-{tag}", [sys.executable, THIS, "--_echo", str(port)], cpus)


def start_haproxy(
    P: Procs,
    tag: str,
    backends: list[int],
    maxconn1: bool,
    cpus: str | None,
    nbthread: int | None = 1,
) -> tuple[int, subprocess.Popen]:
    """haproxy in front of `backends` (one `server` line each; `balance leastconn` when there
    are several); `nbthread None` leaves haproxy its default threads (one per usable CPU)."""
    port = free_port()
    threads = f"\n    nbthread {nbthread}" if nbthread is not None else ""
    balance = "\n    balance leastconn" if len(backends) > 1 else ""
    servers = "".join(
        f"\n    server s{i} {HOST}:{b}{' maxconn 1' if maxconn1 else ''}"
        for i, b in enumerate(backends, 1)
    )
    d = os.path.join(P.workdir, f"haproxy-{tag}")
    os.makedirs(d, exist_ok=True)
    cfg = os.path.join(d, "haproxy.cfg")
    with open(cfg, "w") as f:
        f.write(f"""global
    maxconn 4096{threads}

defaults
    mode tcp
    timeout connect 5s
    timeout client  60s
    timeout server  60s
    timeout queue   60s

frontend fe
    bind {HOST}:{port}
    default_backend be

backend be{balance}{servers}
""")
    r = subprocess.run(
        ["haproxy", "-c", "-q", "-f", cfg], capture_output=True, text=True, timeout=20
    )
    if r.returncode != 0:
        raise RuntimeError(f"haproxy config check failed:\n{r.stdout}{r.stderr}")
    return port, P.start(f"haproxy-{tag}", ["haproxy", "-f", cfg, "-db"], cpus)


def start_tcplock(
    P: Procs,
    tag: str,
    backend: int | list[int],
    slots: int,
    extra: list[str],
    cpus: str | None,
    tree: str = REPO,
) -> tuple[int, subprocess.Popen]:
    """tcplock run from `tree`: `--proxy-host/--proxy-port` for one backend port, one
    `--backend HOST:PORT` each for a list of them (a pool)."""
    port = free_port()
    if isinstance(backend, list):
        to = [x for b in backend for x in ("--backend", f"{HOST}:{b}")]
    else:
        to = ["--proxy-host", HOST, "--proxy-port", str(backend)]
    argv = [
        sys.executable,
        "-m",
        "tcplock",
        "--listen",
        f"{HOST}:{port}",
        *to,
        "--slots",
        str(slots),
    ]
    return port, P.start(tag, argv + extra, cpus, cwd=tree, env=tcplock_env(tree))


# --------------------------------------------------------------------------------------------
# measurements: each returns (value, note)
# --------------------------------------------------------------------------------------------

WRK_RPS = re.compile(r"Requests/sec:\s*([0-9.]+)")
WRK_REQS = re.compile(r"(\d+) requests in")


def measure_handoff(port: int, a, cpus, conns: int | None = None) -> tuple[float, str]:
    out = run(
        [
            "wrk",
            "-t1",
            f"-c{conns or a.wrk_conns}",
            f"-d{a.duration}s",
            "--timeout",
            "10s",
            "-H",
            "Connection: close",
            f"http://{HOST}:{port}/",
        ],
        a.duration + 30,
        cpus,
    )
    m, n = WRK_RPS.search(out), WRK_REQS.search(out)
    if not m or not n:
        raise RuntimeError(f"cannot parse wrk output:\n{out}")
    if int(n.group(1)) == 0:
        raise RuntimeError(f"wrk completed no request:\n{out}")
    notes = [
        e.group(0).strip()
        for pat in (r"Socket errors:[^\n]*", r"Non-2xx[^\n]*")
        if (e := re.search(pat, out))
    ]
    return float(m.group(1)), "; ".join(notes)


def group_cpu_ticks(pgids: set[int]) -> dict[int, int]:
    """CPU time (user + system, clock ticks) used so far by every live process of each group."""
    got = dict.fromkeys(pgids, 0)
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # gone meanwhile
        pgid = int(fields[2])
        if pgid in got:
            got[pgid] += int(fields[11]) + int(fields[12])
    return got


def idle_ticks() -> tuple[int, int]:
    """(idle, total) clock ticks of the whole machine so far, from /proc/stat."""
    with open("/proc/stat") as f:
        t = [int(x) for x in f.readline().split()[1:]]
    return t[3] + t[4], sum(t[:8])  # idle + iowait; user .. steal


def measure_pool(port: int, a, cpus) -> tuple[float, str]:
    """hand-off's wrk with --pool-conns; notes the CPU that nginx (all its workers), the peer
    and wrk used meanwhile, in % of one CPU (one near 100 limits the run), and how much of the
    machine's CPUs was idle (near 0: the machine is full, other work included)."""
    groups = a.cpu_groups.get(port, [])  # (name, process group) of nginx and of the peer
    pgids = {g for _, g in groups}
    t0, c0, i0 = time.monotonic(), group_cpu_ticks(pgids), idle_ticks()
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)  # wrk is the only child reaped meanwhile
    val, note = measure_handoff(port, a, cpus, a.pool_conns)
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t1, c1, i1 = time.monotonic(), group_cpu_ticks(pgids), idle_ticks()
    hz, wall = os.sysconf("SC_CLK_TCK"), t1 - t0
    cpu = [f"{name} {(c1[g] - c0[g]) / hz / wall * 100:.0f}" for name, g in groups]
    wrk = (r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime) / wall * 100
    cpu.append(f"wrk {wrk:.0f}")
    idle = (i1[0] - i0[0]) / max(1, i1[1] - i0[1]) * 100
    return val, "; ".join(x for x in (f"cpu% {' '.join(cpu)}, idle {idle:.0f}", note) if x)


def measure_bulk(port: int, a, cpus) -> tuple[float, str]:
    omit = 0 if a.duration < 3 else 1
    out = run(
        ["iperf3", "-c", HOST, "-p", str(port), "-t", str(a.duration), "-O", str(omit), "-J"],
        a.duration + omit + 30,
        cpus,
    )
    try:
        j = json.loads(out)
        if "error" in j:
            raise RuntimeError(f"iperf3: {j['error']}")
        bps = j["end"]["sum_received"]["bits_per_second"]
    except (ValueError, KeyError) as e:
        raise RuntimeError(f"cannot parse iperf3 output ({e}):\n{out[-800:]}") from None
    if not bps:
        raise RuntimeError("iperf3 moved no data")
    retr = j["end"].get("sum_sent", {}).get("retransmits")
    return bps / 1e9, (f"retransmits={retr}" if retr else "")


def measure_latency(port: int, a, cpus) -> tuple[float, str]:
    out = run(
        [sys.executable, THIS, "--_pingpong", str(port), str(a.pingpong_n), str(a.pingpong_warmup)],
        120,
        cpus,
    )
    j = json.loads(out)
    return j["median_us"], f"p10={j['p10_us']:.1f} p90={j['p90_us']:.1f} p99={j['p99_us']:.1f}"


def proc_rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for ln in f:
            if ln.startswith("VmRSS:"):
                return int(ln.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def proc_nfds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def proc_nofile(pid: int) -> int:
    with open(f"/proc/{pid}/limits") as f:
        for ln in f:
            if ln.startswith("Max open files"):
                v = ln.split()[3]
                return 1 << 30 if v == "unlimited" else int(v)
    return 0


def stable_rss(pid: int, limit: float = 5.0) -> int:
    """VmRSS once it has stopped moving (the accepted clients' greenlets have all run)."""
    deadline = time.monotonic() + limit
    last = proc_rss_kib(pid)
    while time.monotonic() < deadline:
        time.sleep(0.25)
        now = proc_rss_kib(pid)
        if now == last:
            return now
        last = now
    return last


def measure_queue(P: Procs, a, rnd: int, name: str = "tcplock", tree: str = REPO) -> dict:
    """One fresh tcplock --slots 1 (run from `tree`): a holder takes the slot, sizes[-1] clients
    queue behind it (RSS read at each size), then the holder leaves and every client must be
    served in order."""
    sizes = a.queue_sizes
    total = sizes[-1]
    tag = f"{name}-r{rnd}"
    order_file = os.path.join(P.workdir, f"queue-order-{tag}.txt")
    bport = free_port()
    backend = P.start(
        f"queue-backend-{tag}", [sys.executable, THIS, "--_qbackend", str(bport), order_file]
    )
    procs = [backend]
    sel = selectors.DefaultSelector()
    socks: dict[int, socket.socket] = {}
    holder = None
    try:
        wait_port(bport, backend, "queue backend", P.log_of(backend))
        lport, tl = start_tcplock(P, f"{name}-queue-r{rnd}", bport, 1, [], None, tree)
        procs.append(tl)
        wait_port(lport, tl, "tcplock (queue)", P.log_of(tl))
        pid = tl.pid
        if proc_nofile(pid) < total + 64:
            raise RuntimeError(
                f"tcplock's open-file limit is {proc_nofile(pid)}, "
                f"{total + 64} needed (run as root, or raise ulimit -n)"
            )
        holder = socket.create_connection((HOST, lport), timeout=10)
        holder.sendall(b"hold\n")
        deadline = time.monotonic() + 10
        while True:
            with open(order_file, "a+") as f:
                f.seek(0)
                if "hold" in f.read():
                    break
            if time.monotonic() > deadline:
                raise RuntimeError("the slot holder never reached the queue backend")
            time.sleep(0.02)
        rss0 = stable_rss(pid)
        fd0 = proc_nfds(pid)
        res = {"rss0_kib": rss0, "connect_s": 0.0}
        seq = 0
        for size in sizes:
            t_connect = time.monotonic()
            while seq < size:
                first, seq = seq + 1, min(size, seq + a.queue_batch)
                waiting: dict[socket.socket, int] = {}
                # connect() calls in sequence order: on loopback the kernel completes the
                # handshakes in that order, and (with the batch under the listen backlog) they
                # reach tcplock's accept queue in that order too.
                for i in range(first, seq + 1):
                    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                    s.setblocking(False)
                    rc = s.connect_ex((HOST, lport))
                    if rc not in (0, errno.EINPROGRESS):
                        s.close()
                        raise RuntimeError(f"client {i}: connect failed: {os.strerror(rc)}")
                    socks[i] = s
                    waiting[s] = i
                    sel.register(s, selectors.EVENT_WRITE, i)
                deadline = time.monotonic() + 30
                while waiting:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"{len(waiting)} queue clients never connected")
                    for key, _ in sel.select(1.0):
                        s, i = key.fileobj, key.data
                        err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                        if err:
                            raise RuntimeError(f"client {i}: connect failed: {os.strerror(err)}")
                        s.send(b"%d\n" % i)
                        sel.modify(s, selectors.EVENT_READ, i)
                        del waiting[s]
                # wait until tcplock has accepted the whole batch before starting the next
                deadline = time.monotonic() + 30
                while proc_nfds(pid) < fd0 + seq:
                    P.check_alive()
                    if time.monotonic() > deadline:
                        raise RuntimeError(
                            f"tcplock accepted only {proc_nfds(pid) - fd0} "
                            f"of {seq} queue clients in 30 s"
                        )
                    time.sleep(0.002)
            res["connect_s"] += time.monotonic() - t_connect
            res[size] = stable_rss(pid)
        # release the slot: every client must now be served, in order
        t0 = time.monotonic()
        holder.close()
        holder = None
        replies: dict[int, bytes] = {}
        bad = 0
        deadline = t0 + a.queue_drain_timeout
        while len(replies) + bad < total:
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"queue drain: only {len(replies)} of {total} clients served "
                    f"within {a.queue_drain_timeout:.0f} s"
                )
            events = sel.select(1.0)
            if not events:
                P.check_alive()
            for key, _ in events:
                s, i = key.fileobj, key.data
                try:
                    data = s.recv(256)
                except BlockingIOError:
                    continue
                except OSError:
                    data, bad = None, bad + 1
                if data:
                    replies[i] = replies.get(i, b"") + data
                    continue
                sel.unregister(s)
                s.close()
                del socks[i]
                if data is not None:
                    replies.setdefault(i, b"")
        drain_s = time.monotonic() - t0
        with open(order_file) as f:
            order = [int(ln) for ln in f.read().split() if ln.isdigit()]
        wrong = [i for i in range(1, total + 1) if replies.get(i) != b"ok %d\n" % i]
        res["drain_rate"] = total / drain_s if drain_s > 0 else 0.0
        res["served"] = total - len(wrong)
        res["fifo"] = order == list(range(1, total + 1))
        if wrong or bad:
            res["problem"] = (
                f"{len(wrong)} of {total} clients got no proper reply "
                f"(first: {wrong[:5]}), {bad} resets"
            )
        elif not res["fifo"]:
            firsts = next(k for k, (x, y) in enumerate(zip(order, range(1, total + 1))) if x != y)
            res["problem"] = (
                f"served out of order: position {firsts + 1} got client "
                f"{order[firsts]} (backend saw {len(order)} clients)"
            )
        return res
    finally:
        if holder is not None:
            holder.close()
        for s in socks.values():
            s.close()
        sel.close()
        for p in reversed(procs):
            P.stop(p)


# --------------------------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------------------------

# figure -> (backend starter, measure, unit, higher is better, cpus for servers and client)
FIGURES = {
    "hand-off": (start_nginx, measure_handoff, "req/s", True, None),
    "bulk": (start_iperf3, measure_bulk, "Gbit/s", True, None),
    "latency": (start_echo, measure_latency, "RTT us", False, "0"),
    "latency-unpinned": (start_echo, measure_latency, "RTT us", False, None),
    "pool": (None, measure_pool, "req/s", True, None),  # backends: setup_pool_peers
}
QUEUE_FIGURES = ("queue", "queue-drain")


# every peer, by the name --peers knows it ("haproxy" is haproxy-mc1 where the figure uses
# maxconn 1, and both haproxy-pool and haproxy-pool-mt in pool); the ones in COMPARED also run
# from the --compare tree, as NAME@REV
PEER_NAMES = ("direct", "haproxy", "tcplock", "tcplock-quiet", "tcplock-cft0", "tcplock-hook")
COMPARED = ("tcplock", "tcplock-hook")
NOOP_HOOKS = "def on_activate(conn):\n    pass\n"  # tcplock-hook's --hooks file


def peer_base(name: str) -> str:
    """The --peers name of a peer: tcplock-hook@abc1234 -> tcplock-hook, haproxy-mc1 and
    haproxy-pool-mt -> haproxy."""
    base = name.split("@", 1)[0]
    return "haproxy" if base.startswith("haproxy-") else base


def tcplock_takes(tree: str, option: str) -> bool:
    """Whether tcplock run from `tree` lists `option` in its --help."""
    try:
        r = subprocess.run(
            [sys.executable, "-m", "tcplock", "--help"],
            capture_output=True,
            text=True,
            cwd=tree,
            env=tcplock_env(tree),
            timeout=60,
            stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return re.search(rf"(^|[\s,\[]){re.escape(option)}\b", r.stdout) is not None


def setup_pool_peers(P: Procs, a, rev, wanted, waits: list, skipped: list) -> list:
    """pool: one nginx on POOL_BACKENDS ports (each its own backend), and in front of all of
    them haproxy (nbthread 1 and its default threads) and tcplock; direct is nginx's first
    port.  Fills `waits` (as setup_peers) and a.cpu_groups; returns the peers."""
    fig = "pool"
    cpus = FIGURES[fig][4]
    ports, bp = start_nginx_ports(P, fig, cpus, POOL_BACKENDS, a.pool_nginx_workers)
    for bport in ports:
        wait_port(bport, bp, f"{fig} backend :{bport}", P.log_of(bp))
    waits.append((fig, "backend", ports[0], bp, False))
    peers = [("direct", ports[0])] if wanted("direct") else []
    procs = {}
    for name, nbthread in (("haproxy-pool", 1), ("haproxy-pool-mt", None)):
        if wanted(name):
            hp, hproc = start_haproxy(P, name, ports, True, cpus, nbthread)
            peers.append((name, hp))
            procs[hp] = hproc
            waits.append((fig, name, hp, hproc, False))
    runs = [("tcplock", REPO)]
    if rev is not None:
        label, tree = rev
        if tcplock_takes(tree, "--backend"):
            runs.append((f"tcplock@{label}", tree))
        elif wanted("tcplock"):
            skipped.append(f"{fig}/tcplock@{label} skipped: tcplock there has no --backend")
            say(f"[setup] {skipped[-1]}")
    for name, tree in runs:
        if wanted(name):
            tp, tproc = start_tcplock(P, f"{name}-{fig}", ports, 1, [], cpus, tree)
            peers.append((name, tp))
            procs[tp] = tproc
            waits.append((fig, name, tp, tproc, False))
    a.cpu_groups = {
        port: [("nginx", bp.pid)] + ([(peer_base(n), procs[port].pid)] if port in procs else [])
        for n, port in peers
    }
    return peers


def tcplock_variants(fig: str, hook_file: str) -> list[tuple[str, list[str]]]:
    variants = [("tcplock", []), ("tcplock-quiet", ["--log-level", "warning"])]
    if fig == "hand-off":
        variants.append(("tcplock-cft0", ["--client-finish-timeout", "0"]))
        variants.append(("tcplock-hook", ["--hooks", hook_file]))
    return variants


def setup_peers(
    P: Procs, figures: list[str], a, rev: tuple[str, str] | None
) -> tuple[dict[str, list[tuple[str, int]]], list[str]]:
    """Start every backend and every peer (all at once, then wait for all of them).  `rev` is
    (label, tree) of the --compare revision.  Returns the peers of each figure, and notes on
    the peers skipped: a hook peer at the compared revision that does not start there, and
    tcplock at the compared revision in pool when it has no --backend."""
    peers_of: dict[str, list[tuple[str, int]]] = {}
    waits = []  # (figure, peer, port, process, skipped rather than fatal when it does not start)

    def wanted(name: str) -> bool:
        return a.peers is None or peer_base(name) in a.peers

    skipped: list[str] = []
    for fig in figures:
        if fig == "pool":
            peers_of[fig] = setup_pool_peers(P, a, rev, wanted, waits, skipped)
            continue
        start_backend, _, _, _, cpus = FIGURES[fig]
        bport, bp = start_backend(P, fig, cpus)
        waits.append((fig, "backend", bport, bp, False))
        wait_port(bport, bp, f"{fig} backend", P.log_of(bp))  # peers probe it when they start
        bulk = fig == "bulk"
        peers = [("direct", bport)] if wanted("direct") else []
        hname = "haproxy" if bulk else "haproxy-mc1"
        if wanted(hname):
            hp, hproc = start_haproxy(P, fig, [bport], not bulk, cpus)
            peers.append((hname, hp))
            waits.append((fig, hname, hp, hproc, False))
        variants = tcplock_variants(fig, a.hook_file)
        runs = [(name, extra, REPO, False) for name, extra in variants]
        if rev is not None:
            label, tree = rev
            runs += [
                (f"{name}@{label}", extra, tree, name == "tcplock-hook")
                for name, extra in variants
                if name in COMPARED
            ]
        for name, extra, tree, optional in runs:
            if not wanted(name):
                continue
            tp, tproc = start_tcplock(
                P, f"{name}-{fig}", bport, 2 if bulk else 1, extra, cpus, tree
            )
            peers.append((name, tp))
            waits.append((fig, name, tp, tproc, optional))
        peers_of[fig] = peers
    for fig, name, port, proc, optional in waits:
        try:
            wait_port(port, proc, f"{fig} {name}", P.log_of(proc))
        except RuntimeError as e:
            if not optional:
                raise
            last = [ln for ln in str(e).splitlines()[1:] if ln.strip()]
            P.stop(proc)
            peers_of[fig] = [(n, p) for n, p in peers_of[fig] if n != name]
            skipped.append(
                f"{fig}/{name} skipped: it does not start at that revision "
                f"({last[-1].strip() if last else str(e).splitlines()[0]})"
            )
            say(f"[setup] {skipped[-1]}")
    for fig in figures:
        say(f"[setup] {fig}: " + ", ".join(f"{n}@{p}" for n, p in peers_of[fig]))
    return peers_of, skipped


def add_worktree(rev: str) -> tuple[str, str, str, object]:
    """Check `rev` out into a temporary detached git worktree of this checkout.  Returns its
    label (the short commit), the tree, a one-line description and the function that removes it
    (registered with atexit too; it runs once)."""

    def git(*args: str) -> str:
        r = subprocess.run(
            ["git", "-C", REPO, *args],
            capture_output=True,
            text=True,
            timeout=120,
            stdin=subprocess.DEVNULL,
        )
        if r.returncode != 0:
            msg = (r.stderr.strip() or r.stdout.strip())[-800:]
            raise RuntimeError(f"git {' '.join(args)}: {msg}")
        return r.stdout.strip()

    sha = git("rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}")
    label = git("rev-parse", "--short", sha)
    about = git("log", "-1", "--format=%h %ad %s", "--date=short", sha)
    holder = tempfile.mkdtemp(prefix="tcplock-bench-rev.")
    tree = os.path.join(holder, "tree")
    done = []

    def remove() -> None:
        if done:
            return
        done.append(True)
        for args in (["worktree", "remove", "--force", tree], ["worktree", "prune"]):
            try:
                subprocess.run(
                    ["git", "-C", REPO, *args],
                    capture_output=True,
                    timeout=60,
                    stdin=subprocess.DEVNULL,
                )
            except (OSError, subprocess.SubprocessError):
                pass
            if args[1] == "remove":
                shutil.rmtree(holder, ignore_errors=True)

    atexit.register(remove)
    say(f"[compare] git worktree add --detach {tree} {sha[:12]}  ({rev}: {about})")
    git("worktree", "add", "--detach", tree, sha)
    return label, tree, about, remove


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--smoke",
        action="store_true",
        help="every figure once with tiny durations and counts (~25 s); exits 0 when "
        "every peer produced a number; asserts no performance target",
    )
    ap.add_argument("--rounds", type=int, help="default 5 (smoke: 1)")
    ap.add_argument(
        "--duration", type=int, help="seconds per wrk / iperf3 run, default 4 (smoke: 1)"
    )
    ap.add_argument(
        "--figures",
        default="hand-off,bulk,latency,latency-unpinned,pool,queue",
        help="comma-separated subset of: %(default)s",
    )
    ap.add_argument(
        "--peers",
        help="comma-separated subset of: " + ",".join(PEER_NAMES) + " (default: all; "
        "haproxy is haproxy-mc1 where the figure uses maxconn 1, and haproxy-pool and "
        "haproxy-pool-mt in pool; with --compare, tcplock and "
        "tcplock-hook also run at REV; queue runs when tcplock is among them)",
    )
    ap.add_argument(
        "--compare",
        metavar="REV",
        help="also run tcplock from git revision REV (checked out into a temporary worktree, "
        "removed at exit) as peers NAME@REV: tcplock@REV in every figure (pool: only when it "
        "has --backend), tcplock-hook@REV in "
        "hand-off (skipped with a note if it does not start there); same rounds, and the "
        "summary gives the ratio of medians, this checkout over REV",
    )
    ap.add_argument("--wrk-conns", type=int, default=20, help="hand-off's wrk -c, default 20")
    ap.add_argument("--pool-conns", type=int, default=40, help="pool's wrk -c, default 40")
    ap.add_argument(
        "--pool-nginx-workers",
        type=int,
        default=min(POOL_BACKENDS, os.cpu_count() or 1),
        help="worker_processes of pool's nginx (its four ports share them), default one per "
        "CPU, at most four: %(default)s",
    )
    ap.add_argument("--pingpong-n", type=int, help="round trips, default 10000 (smoke: 300)")
    ap.add_argument("--pingpong-warmup", type=int, help="default 500 (smoke: 50)")
    ap.add_argument(
        "--queue-sizes",
        help="waiting clients at which tcplock's RSS is read, "
        "ascending; default 5000,10000 (smoke: 100,200)",
    )
    ap.add_argument(
        "--queue-batch",
        type=int,
        default=250,
        help="clients connected before waiting for tcplock to accept them",
    )
    ap.add_argument("--queue-drain-timeout", type=float, help="default 120 s (smoke: 30)")
    ap.add_argument("--settle", type=float, help="pause between runs, default 0.5 s (smoke: 0.1)")
    ap.add_argument(
        "--max-seconds",
        type=float,
        help="bound on the measuring part (installs have timeouts of their own), "
        "default 900 s (smoke: 180)",
    )
    ap.add_argument(
        "--check-targets",
        action="store_true",
        help="exit 3 when a target is missed (off by default: machines differ)",
    )
    ap.add_argument("--json", metavar="FILE", help="also write the raw numbers here")
    ap.add_argument("--keep-tmp", action="store_true", help="keep configs and logs")
    a = ap.parse_args()
    defaults = dict(
        rounds=5,
        duration=4,
        pingpong_n=10000,
        pingpong_warmup=500,
        queue_sizes="5000,10000",
        queue_drain_timeout=120,
        settle=0.5,
        max_seconds=900,
    )
    if a.smoke:
        defaults.update(
            rounds=1,
            duration=1,
            pingpong_n=300,
            pingpong_warmup=50,
            queue_sizes="100,200",
            queue_drain_timeout=30,
            settle=0.1,
            max_seconds=180,
        )
    for k, v in defaults.items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    try:
        a.queue_sizes = sorted({int(x) for x in a.queue_sizes.split(",") if x.strip()})
    except ValueError:
        ap.error("--queue-sizes takes numbers, e.g. 5000,10000")
    figures = [f.strip() for f in a.figures.split(",") if f.strip()]
    for f in figures:
        if f not in FIGURES and f != "queue":
            ap.error(f"unknown figure {f!r}")
    peer_figs = [f for f in figures if f in FIGURES]
    a.peers = None if a.peers is None else {p.strip() for p in a.peers.split(",") if p.strip()}
    for p in a.peers or ():
        if p not in PEER_NAMES and p != "haproxy-mc1":
            ap.error(f"unknown peer {p!r} (--peers takes {','.join(PEER_NAMES)})")
    if a.peers is not None and "haproxy-mc1" in a.peers:
        a.peers.add("haproxy")
    do_queue = (
        "queue" in figures and bool(a.queue_sizes) and (a.peers is None or "tcplock" in a.peers)
    )

    # signals and the overall time bound end the run through the same cleanup path
    def on_signal(signum, _frame):
        raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)

    def on_alarm(_signum, _frame):
        raise TimeoutError(f"the run took longer than --max-seconds {a.max_seconds:.0f}")

    signal.signal(signal.SIGALRM, on_alarm)

    t_start = time.monotonic()
    workdir = tempfile.mkdtemp(prefix="tcplock-bench.")
    P = Procs(workdir)
    atexit.register(P.cleanup)
    a.hook_file = os.path.join(workdir, "noop_hooks.py")
    a.cpu_groups = {}  # pool: peer port -> [(name, process group)] whose CPU each run notes
    with open(a.hook_file, "w") as f:
        f.write(NOOP_HOOKS)
    results: dict[tuple[str, str], list[float]] = {}
    by_round: dict[tuple[str, str], dict[int, float]] = {}  # for ratios paired round by round
    notes: dict[tuple[str, str], list[str]] = {}
    peers_of: dict[str, list[tuple[str, int]]] = {}
    queue_peers: list[tuple[str, str]] = []  # (peer, tree it runs from)
    skipped: list[str] = []
    failures: list[str] = []
    rev: tuple[str, str] | None = None  # (label, tree) of --compare
    remove_worktree = None
    rc = 0

    def record(fig: str, name: str, rnd: int, val: float) -> None:
        results.setdefault((fig, name), []).append(val)
        by_round.setdefault((fig, name), {})[rnd] = val

    try:
        ensure_tools()  # apt-get and pip have timeouts of their own
        where = ensure_tcplock()
        if a.compare:
            label, tree, about, remove_worktree = add_worktree(a.compare)
            rev = (label, tree)
            rev_where = ensure_tcplock(tree)
        signal.alarm(int(a.max_seconds))  # the measuring part, bounded as a whole
        if do_queue:
            got = raise_nofile(a.queue_sizes[-1] + 1024)
            if got < a.queue_sizes[-1] + 1024:
                raise RuntimeError(
                    f"open-file limit {got} is too low for "
                    f"{a.queue_sizes[-1]} queued clients; run as root"
                )
        say("# " + "\n# ".join(machine_info(where)))
        if rev is not None:
            say(f"# compared: tcplock@{rev[0]} = {a.compare} ({about}), tcplock {rev_where}")
        say(f"# command: {' '.join(sys.argv)}")
        peers_of, skipped = setup_peers(P, peer_figs, a, rev)
        if do_queue:
            queue_peers = [("tcplock", REPO)]
            if rev is not None:
                queue_peers.append((f"tcplock@{rev[0]}", rev[1]))
        jobs: list[tuple[str, str, int]] = [(f, n, p) for f in peer_figs for n, p in peers_of[f]]
        jobs += [("queue", name, 0) for name, _ in queue_peers]
        if not jobs:
            raise RuntimeError("nothing to measure: check --figures and --peers")
        tree_of = dict(queue_peers)
        width = max(13, *(len(n) for _, n, _ in jobs))
        for r in range(a.rounds):
            k = r % len(jobs)
            for fig, name, port in jobs[k:] + jobs[:k]:
                P.check_alive()
                tag = f"[r{r + 1}] {fig:16s} {name:{width}s}"
                try:
                    if fig == "queue":
                        q = measure_queue(P, a, r + 1, name, tree_of[name])
                        for size in a.queue_sizes:
                            kib = (q[size] - q["rss0_kib"]) / size
                            record(f"queue {size}", name, r + 1, kib)
                            say(
                                f"{tag} {kib:11.2f} KiB/client at {size} waiting "
                                f"(VmRSS {q['rss0_kib']} -> {q[size]} KiB)"
                            )
                        record("queue-drain", name, r + 1, q["drain_rate"])
                        note = (
                            f"fifo={'ok' if q['fifo'] else 'BROKEN'} "
                            f"served={q['served']}/{a.queue_sizes[-1]} "
                            f"connect={q['connect_s']:.1f}s"
                        )
                        notes.setdefault(("queue-drain", name), []).append(f"r{r + 1}: {note}")
                        say(f"{tag} {q['drain_rate']:11.1f} clients/s drained  {note}")
                        if "problem" in q:
                            raise RuntimeError(f"queue: {q['problem']}")
                    else:
                        _, measure, unit, _, cpus = FIGURES[fig]
                        val, note = measure(port, a, cpus)
                        record(fig, name, r + 1, val)
                        if note:
                            notes.setdefault((fig, name), []).append(f"r{r + 1}: {note}")
                        say(f"{tag} {val:11.2f} {unit}  {note}")
                except (
                    RuntimeError,
                    subprocess.TimeoutExpired,
                    ValueError,
                    KeyError,
                    OSError,
                ) as e:
                    what = "timed out" if isinstance(e, subprocess.TimeoutExpired) else "FAILED"
                    say(f"{tag} {what}: {e}")
                    failures.append(f"r{r + 1} {fig}/{name}: {what}: {str(e).splitlines()[0]}")
                    P.check_alive()  # a peer that died is fatal, not a one-off failure
                time.sleep(a.settle)
    except KeyboardInterrupt as e:
        say(f"\nINTERRUPTED ({e or 'SIGINT'}): stopping every child")
        failures.append(f"interrupted: {e or 'SIGINT'}")
        rc = 130
    except (RuntimeError, TimeoutError, OSError, subprocess.SubprocessError) as e:
        say(f"\nERROR: {e}")
        failures.append(f"error: {str(e).splitlines()[0]}")
    finally:
        signal.alarm(0)
        P.cleanup()
        if remove_worktree is not None:
            remove_worktree()
        if a.keep_tmp:
            say(f"configs and logs kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    elapsed = time.monotonic() - t_start
    rows = table_rows(peer_figs, peers_of, results, a.queue_sizes, [n for n, _ in queue_peers])
    print_table(rows, notes, skipped, a, elapsed)
    missed = print_targets(rows, by_round, rev[0] if rev else None)
    if rev is not None:
        missed += print_compare(rows, by_round, rev[0], a.compare, skipped)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(
                {
                    "results": {f"{k[0]}|{k[1]}": v for k, v in results.items()},
                    "by_round": {f"{k[0]}|{k[1]}": v for k, v in by_round.items()},
                    "notes": {f"{k[0]}|{k[1]}": v for k, v in notes.items()},
                    "skipped": skipped,
                    "compare": a.compare and {"rev": a.compare, "label": rev and rev[0]},
                    "failures": failures,
                    "elapsed_s": elapsed,
                },
                f,
                indent=1,
            )
    empty = [f"{fig}/{peer}" for fig, peer, *_ in rows if not results.get((fig, peer))]
    if empty and not failures:
        failures.append("no numbers for " + ", ".join(empty))
    if failures:
        say("\nRESULT: FAILED -- " + "; ".join(failures))
        if empty:
            say("no numbers for: " + ", ".join(empty))
        return rc or 1
    say(
        f"\nRESULT: ok, every peer produced numbers ({elapsed:.0f} s)"
        + (" [smoke: targets not checked]" if a.smoke else "")
    )
    if missed and a.check_targets and not a.smoke:
        return 3
    return 0


def table_rows(peer_figs, peers_of, results, queue_sizes, queue_names) -> list[tuple]:
    """(figure, peer, unit, higher_is_better, values) for every row of the table, in order."""
    rows = []
    for fig in peer_figs:
        for name, _ in peers_of.get(fig, []):
            rows.append((fig, name, FIGURES[fig][2], FIGURES[fig][3], results.get((fig, name))))
    for fig, unit, hib in [(f"queue {n}", "KiB/cl", False) for n in queue_sizes] + [
        ("queue-drain", "cl/s", True)
    ]:
        for name in queue_names:
            rows.append((fig, name, unit, hib, results.get((fig, name))))
    return rows


def median_of(rows, fig: str, peer: str) -> float | None:
    for f, p, _, _, vals in rows:
        if f == fig and p == peer and vals:
            return statistics.median(vals)
    return None


def best_haproxy(rows, fig: str) -> tuple[str | None, float | None]:
    """The haproxy peer of `fig` with the best median (pool has two), and that median."""
    best: tuple[str | None, float | None] = (None, None)
    for f, p, _, hib, vals in rows:
        if f != fig or not p.startswith("haproxy") or not vals:
            continue
        med = statistics.median(vals)
        if best[1] is None or (med > best[1] if hib else med < best[1]):
            best = (p, med)
    return best


def paired(by_round, fig: str, peer: str, ref: str) -> tuple[float, int] | None:
    """Median over rounds of peer/ref, each round's pair from the same round, and how many."""
    mine, theirs = by_round.get((fig, peer), {}), by_round.get((fig, ref), {})
    ratios = [mine[r] / theirs[r] for r in mine if theirs.get(r)]
    return (statistics.median(ratios), len(ratios)) if ratios else None


def print_table(rows, notes, skipped, a, elapsed) -> None:
    w = max([13] + [len(name) for _, name, *_ in rows])
    say()
    say(
        f"# rounds={a.rounds} duration={a.duration}s wrk=-t1 -c{a.wrk_conns} "
        f"(pool -c{a.pool_conns}, nginx workers {a.pool_nginx_workers}) "
        f"pingpong_n={a.pingpong_n} queue={','.join(map(str, a.queue_sizes))} "
        f"elapsed={elapsed:.0f}s"
    )
    say(
        "# median over rounds; spread=(max-min)/median; /haproxy and /direct = this row's "
        "median over theirs, same run (pool: over the faster haproxy)"
    )
    say("# higher is better for req/s, Gbit/s, cl/s; lower is better for RTT us and KiB/cl")
    hdr = (
        f"{'figure':16s} {'peer':{w}s} {'unit':7s} {'n':>2s} {'median':>10s} "
        f"{'min':>10s} {'max':>10s} {'spread':>7s} {'/haproxy':>9s} {'/direct':>8s}"
    )
    say(hdr)
    say("-" * len(hdr))
    for fig, name, unit, _, vals in rows:
        if not vals:
            say(f"{fig:16s} {name:{w}s} {unit:7s} {0:2d} {'-':>10s}")
            continue
        med, lo, hi = statistics.median(vals), min(vals), max(vals)
        spread = (hi - lo) / med * 100 if med else 0.0
        ref_h = best_haproxy(rows, fig)[1]
        ref_d = median_of(rows, fig, "direct")
        rh = f"{med / ref_h:9.3f}" if ref_h else f"{'-':>9s}"
        rd = f"{med / ref_d:8.3f}" if ref_d else f"{'-':>8s}"
        say(
            f"{fig:16s} {name:{w}s} {unit:7s} {len(vals):2d} {med:10.2f} {lo:10.2f} {hi:10.2f} "
            f"{spread:6.1f}% {rh} {rd}"
        )
    if any(notes.values()) or skipped:
        say("\nnotes:")
        for (fig, n), v in notes.items():
            if v:
                say(f"  {fig}/{n}: " + " | ".join(v))
        for note in skipped:
            say(f"  {note}")


def print_targets(rows, by_round, label: str | None) -> int:
    """The issue's targets, for tcplock as shipped (INFO logging) and with --log-level warning."""
    say(
        "\ntargets (tcplock = as shipped; tcplock-quiet = --log-level warning; tcplock-cft0 = "
        "--client-finish-timeout 0; tcplock-hook = a no-op Python on_activate hook):"
    )
    missed = 0
    for peer in ("tcplock", "tcplock-quiet", "tcplock-cft0"):
        for fig, ref, want in TARGETS:
            mine, theirs = median_of(rows, fig, peer), median_of(rows, fig, ref)
            if mine is None or theirs is None:
                continue
            got = mine / theirs
            ok = got >= want
            if not ok and peer == "tcplock":
                missed += 1
            verdict = "met" if ok else f"MISSED by {(1 - got / want) * 100:.0f}%"
            say(f"  {fig:11s} {peer:13s} / {ref:11s} >= {want:4.2f}x : {got:6.3f}x  {verdict}")
    for sfx in [""] + ([f"@{label}"] if label else []):
        hook, plain = f"tcplock-hook{sfx}", f"tcplock{sfx}"
        mine, theirs = median_of(rows, "hand-off", hook), median_of(rows, "hand-off", plain)
        if mine is None or theirs is None:
            continue
        got = mine / theirs
        ok = got >= HOOK_TARGET
        missed += 0 if ok or sfx else 1
        pr = paired(by_round, "hand-off", hook, plain)
        say(
            f"  hand-off    {hook} / {plain}: {got:.3f} (target >= {HOOK_TARGET}) "
            f"{'met' if ok else f'MISSED by {(1 - got / HOOK_TARGET) * 100:.0f}%'}"
            + (f"; paired median {pr[0]:.3f} over {pr[1]} round(s)" if pr else "")
        )
    ref, theirs = best_haproxy(rows, "pool")
    for sfx in [""] + ([f"@{label}"] if label else []):
        mine = median_of(rows, "pool", f"tcplock{sfx}")
        if mine is None or theirs is None:
            continue
        got = mine / theirs
        ok = got >= POOL_TARGET
        missed += 0 if ok or sfx else 1
        pr = paired(by_round, "pool", f"tcplock{sfx}", ref)
        say(
            f"  pool        tcplock{sfx} / best haproxy >= {POOL_TARGET:.1f}x : {got:.3f}x  "
            f"{'met' if ok else f'MISSED by {(1 - got / POOL_TARGET) * 100:.0f}%'}"
            f"  ({ref} {theirs:.0f} req/s"
            + (f"; paired median {pr[0]:.3f} over {pr[1]} round(s)" if pr else "")
            + ")"
        )
    for fig, peer, _, _, vals in rows:
        if fig.startswith("queue ") and vals:
            got = statistics.median(vals)
            ok = got <= QUEUE_TARGET_KIB
            missed += 0 if ok or peer != "tcplock" else 1
            verdict = "met" if ok else f"MISSED by {(got / QUEUE_TARGET_KIB - 1) * 100:.0f}%"
            say(
                f"  {fig:11s} {peer:13s} KiB per waiting client <= {QUEUE_TARGET_KIB:.0f} : "
                f"{got:6.2f}  {verdict}"
            )
    for fig in ("latency", "latency-unpinned"):
        d = median_of(rows, fig, "direct")
        if d is None:
            continue
        added = [
            f"{p} +{m - d:.1f} us"
            for p in ("haproxy-mc1", "tcplock", "tcplock-quiet")
            if (m := median_of(rows, fig, p)) is not None
        ]
        say(
            f"  {fig}: added round-trip latency over direct ({d:.1f} us), no target: "
            + ", ".join(added)
        )
    return missed


def print_compare(rows, by_round, label: str, rev: str, skipped) -> int:
    """This checkout against the --compare revision: ratio of medians (and the median of the
    ratios paired round by round) for each figure; hand-off, bulk and queue memory of tcplock
    must be within COMPARE_TOLERANCE, no worse."""
    say(
        f"\ncompare: this checkout / {rev} (tcplock@{label}), ratio of medians, same run; "
        f"hand-off, bulk and queue memory within {COMPARE_TOLERANCE * 100:.0f}%:"
    )
    missed = 0
    for fig, peer, unit, hib, _ in rows:
        if not peer.endswith(f"@{label}"):
            continue
        base = peer.rsplit("@", 1)[0]
        mine, theirs = median_of(rows, fig, base), median_of(rows, fig, peer)
        if mine is None or theirs is None:
            say(f"  {fig:16s} {base:13s} no numbers")
            continue
        got = mine / theirs
        pr = paired(by_round, fig, base, peer)
        line = f"  {fig:16s} {base:13s} {mine:10.2f} / {theirs:10.2f} {unit:7s} = {got:6.3f}" + (
            f"  (paired {pr[0]:.3f}, {pr[1]} round(s))" if pr else ""
        )
        worse = (1 - got) if hib else (got - 1)
        if base == "tcplock" and (fig in ("hand-off", "bulk") or fig.startswith("queue ")):
            if worse > COMPARE_TOLERANCE:
                missed += 1
                line += f"  WORSE by {worse * 100:.1f}%"
            elif -worse > COMPARE_TOLERANCE:
                line += f"  better by {-worse * 100:.1f}%"
            else:
                line += f"  within {COMPARE_TOLERANCE * 100:.0f}%"
        say(line)
    for note in skipped:
        say(f"  {note}")
    return missed


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "--_echo":
        echo_server(int(sys.argv[2]))
    elif len(sys.argv) >= 5 and sys.argv[1] == "--_pingpong":
        pingpong_client(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
    elif len(sys.argv) >= 4 and sys.argv[1] == "--_qbackend":
        queue_backend(int(sys.argv[2]), sys.argv[3])
    else:
        sys.exit(main())
