#!/usr/bin/env python3
"""What one connection costs tcplock, counted rather than timed (stdlib only).

The pool figure of bench/run.py is limited by tcplock's CPU per connection. Timing it on a
shared machine is noisy; this counts it instead. One nginx answers ``ok\\n`` on four ports (the
pool figure's backends), tcplock runs in front of them (``--backend`` each, ``--slots 1``), and a
client makes a fixed number of short HTTP connections through it, ``--concurrency`` at a time
(default 40, as the pool figure's wrk). After a warm-up, one of:

  cpu       tcplock's user + system CPU time (from /proc/PID/stat) per connection, in µs
  callgrind tcplock runs under valgrind's callgrind, instrumented only for the measured
            connections: instructions per connection (user space; repeatable to a fraction of
            a percent, which timing is not here). The profile is kept (--out) for
            callgrind_annotate.
  strace    ``strace -c -f`` attached for the measured connections: system calls per
            connection, by name
  calls     tcplock runs under cProfile (warm-up included): Python function calls per
            connection, and the functions with the most own time (the profile is kept, --out)
  perf      ``perf record -g`` attached for the measured connections, with tcplock run as
            ``python -X perf`` (Python 3.12 or later: run this script with that Python), so
            that the samples name Python functions: the share of samples in each function,
            itself and below (the data is kept, --out, for ``perf report``)

    python3 bench/cost.py --mode callgrind --conns 2000
    python3 bench/cost.py --mode cpu --conns 20000 --tree /path/to/other/checkout

Everything listens on 127.0.0.1; every child is in its own process group and is killed at exit.
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
_spec = importlib.util.spec_from_file_location("bench_run", os.path.join(HERE, "run.py"))
R = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(R)

REQUEST = b"GET / HTTP/1.1\r\nHost: cost\r\nConnection: close\r\n\r\n"


def drive(port: int, n: int, concurrency: int) -> int:
    """Make ``n`` connections through ``port``, ``concurrency`` at a time; the failures."""
    left = [n]
    failed = [0]
    lock = threading.Lock()

    def worker() -> None:
        while True:
            with lock:
                if left[0] <= 0:
                    return
                left[0] -= 1
            try:
                with socket.create_connection((R.HOST, port), timeout=30) as s:
                    s.sendall(REQUEST)
                    reply = b""
                    while True:
                        chunk = s.recv(4096)
                        if not chunk:
                            break
                        reply += chunk
                if not reply.startswith(b"HTTP/1.1 200"):
                    raise OSError(f"bad reply {reply[:40]!r}")
            except OSError:
                with lock:
                    failed[0] += 1

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return failed[0]


def drive_wrk(port: int, seconds: float, concurrency: int) -> tuple[int, int]:
    """As the pool figure drives it: ``wrk -t1 -c<concurrency>``, a new connection per
    request, for ``seconds``; the requests made, and the failed ones (errors, non-2xx)."""
    out = subprocess.run(
        ["wrk", "-t1", f"-c{concurrency}", f"-d{seconds:g}s", "-H", "Connection: close",
         f"http://{R.HOST}:{port}/"],
        capture_output=True, text=True, timeout=seconds + 60,
    ).stdout  # fmt: skip
    m = re.search(r"(\d+) requests in", out)
    if not m:
        raise RuntimeError(f"wrk printed no count: {out!r}")
    errors = sum(int(x) for x in re.findall(r"(?:connect|read|write|timeout) (\d+)", out))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return int(m.group(1)), errors + (int(non2xx.group(1)) if non2xx else 0)


def cpu_ticks(pid: int) -> tuple[int, int]:
    """User and system CPU time of ``pid`` so far, in clock ticks."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]), int(fields[12])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument(
        "--mode", choices=("cpu", "callgrind", "strace", "calls", "perf"), default="cpu"
    )
    ap.add_argument("--conns", type=int, default=None, help="measured connections")
    ap.add_argument("--warmup", type=int, default=300)
    ap.add_argument(
        "--wrk",
        type=float,
        metavar="SECONDS",
        help="drive the measured part with wrk for SECONDS, as the pool figure does (clients "
        "wait for slots as there), instead of --conns connections from Python threads",
    )
    ap.add_argument("--concurrency", type=int, default=40)
    ap.add_argument("--backends", type=int, default=R.POOL_BACKENDS)
    ap.add_argument("--tree", default=R.REPO, help="the checkout whose tcplock runs")
    ap.add_argument(
        "--haproxy",
        action="store_true",
        help="measure haproxy (four server lines maxconn 1, nbthread 1) instead (cpu, strace)",
    )
    ap.add_argument("--out", default=None, help="callgrind: where to keep the profile")
    ap.add_argument("extra", nargs="*", help="more tcplock options (after --)")
    a = ap.parse_args()
    defaults = {"cpu": 20000, "callgrind": 2000, "strace": 3000, "calls": 5000, "perf": 20000}
    n = a.conns or defaults[a.mode]
    work = tempfile.mkdtemp(prefix="tcplock-cost-")
    P = R.Procs(work)
    try:
        ports, nginx = R.start_nginx_ports(P, "cost", None, a.backends, 1)
        for p in ports:
            R.wait_port(p, nginx, "nginx", P.log_of(nginx))
        port = R.free_port()
        argv = [sys.executable, "-m", "tcplock", "--listen", f"{R.HOST}:{port}", "--slots", "1"]
        for p in ports:
            argv += ["--backend", f"{R.HOST}:{p}"]
        argv += a.extra
        out = a.out or os.path.join(work, f"{a.mode}.out")
        if a.mode == "calls":
            argv[1:1] = ["-m", "cProfile", "-o", out]
        if a.mode == "perf":
            if sys.version_info < (3, 12):
                ap.error("--mode perf: run this script with Python 3.12 or later (-X perf)")
            argv[1:1] = ["-X", "perf"]
        if a.mode == "callgrind":
            argv = ["valgrind", "--tool=callgrind", "--instr-atstart=no",
                    f"--callgrind-out-file={out}", *argv]  # fmt: skip
        if a.haproxy:
            if a.mode not in ("cpu", "strace"):
                ap.error("--haproxy: only with --mode cpu or strace")
            port, tl = R.start_haproxy(P, "cost", ports, True, None, 1)
            R.wait_port(port, tl, "haproxy", P.log_of(tl))
        else:
            tl = P.start("tcplock", argv, None, cwd=a.tree, env=R.tcplock_env(a.tree))
            R.wait_port(port, tl, "tcplock", P.log_of(tl), timeout=120)
        if drive(port, a.warmup, a.concurrency):
            raise RuntimeError("warm-up connections failed")

        def measured(n: int) -> tuple[int, int]:
            if a.wrk:
                return drive_wrk(port, a.wrk, a.concurrency)
            return n, drive(port, n, a.concurrency)

        if a.mode == "cpu":
            c0, t0 = cpu_ticks(tl.pid), time.monotonic()
            n, failed = measured(n)
            c1, t1 = cpu_ticks(tl.pid), time.monotonic()
            hz = os.sysconf("SC_CLK_TCK")
            user, system = ((c1[i] - c0[i]) / hz / n * 1e6 for i in (0, 1))
            rate = n / (t1 - t0)
            print(f"cpu: {user + system:.1f} µs per connection (user {user:.1f}, system "
                  f"{system:.1f}; {n} connections, {rate:.0f}/s, {failed} failed)")  # fmt: skip
        elif a.mode == "callgrind":
            subprocess.run(["callgrind_control", "-z", str(tl.pid)], capture_output=True)
            subprocess.run(["callgrind_control", "-i", "on", str(tl.pid)], capture_output=True)
            n, failed = measured(n)
            subprocess.run(["callgrind_control", "-i", "off", str(tl.pid)], capture_output=True)
            subprocess.run(["callgrind_control", "-d", str(tl.pid)], capture_output=True)
            total = 0
            for f in glob.glob(out + "*"):
                with open(f) as fh:
                    for line in fh:
                        m = re.match(r"(?:summary|totals):\s*(\d+)", line)
                        if m:
                            total = max(total, int(m.group(1)))
            print(f"callgrind: {total / n:,.0f} instructions per connection ({n} connections, "
                  f"{failed} failed); profile {out}*")  # fmt: skip
        elif a.mode == "calls":
            n, failed = measured(n)
            P.stop(tl)  # SIGTERM: tcplock stops, and cProfile writes its profile
            import pstats

            st = pstats.Stats(out)
            calls = st.total_calls / (n + a.warmup)
            print(f"calls: {calls:.0f} Python function calls per connection "
                  f"({n} + {a.warmup} connections, {failed} failed); profile {out}")  # fmt: skip
            st.sort_stats("tottime").print_stats(30)
        elif a.mode == "perf":
            rec = subprocess.Popen(
                ["perf", "record", "-q", "-g", "-F", "4999", "-o", out, "-p", str(tl.pid)],
                start_new_session=True,
            )
            time.sleep(1.0)
            n, failed = measured(n)
            os.kill(rec.pid, signal.SIGINT)
            rec.wait(60)
            report = subprocess.run(
                ["perf", "report", "-i", out, "--children", "--stdio", "-g", "none",
                 "--percent-limit", "1", "--sort", "symbol"],
                capture_output=True, text=True, timeout=300,
            )  # fmt: skip
            print(f"perf: samples of tcplock ({n} connections, {failed} failed); data {out}")
            for line in report.stdout.splitlines():
                if line.strip() and not line.startswith("#"):
                    print(line)
        else:
            trace = os.path.join(work, "strace.txt")
            st = subprocess.Popen(
                ["strace", "-c", "-f", "-o", trace, "-p", str(tl.pid)], start_new_session=True
            )
            time.sleep(1.0)
            n, failed = measured(n)
            os.kill(st.pid, signal.SIGINT)
            st.wait(30)
            with open(trace) as fh:
                lines = fh.read().splitlines()
            print(f"strace: system calls per connection ({n} connections, {failed} failed)")
            for line in lines:
                parts = line.split()
                if len(parts) >= 5 and parts[3].isdigit():
                    print(f"  {parts[-1]:<16} {int(parts[3]) / n:6.2f}")
                elif parts and parts[-1] == "total":
                    print(f"  {'total':<16} {int(parts[2]) / n:6.2f}")
        return 1 if failed else 0
    finally:
        P.cleanup()


if __name__ == "__main__":
    sys.exit(main())
