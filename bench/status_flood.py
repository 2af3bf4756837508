"""What status traffic costs the relaying: the hand-off p50 through one slot while the status
port is idle, under a `/healthz` flood and under a `/metrics` flood.

    python3 bench/status_flood.py                 # 5 interleaved rounds of 3 s per case
    python3 bench/status_flood.py --rounds 7 --duration 4 --flood-conns 20

One nginx answering `ok\\n` is the backend; tcplock runs from this checkout with `--slots 1`,
`--status` and `--log-level warning`. A client makes one short HTTP/1.0 connection after the
other through tcplock (each one a hand-off of the slot) and times each, connect to close;
meanwhile `wrk` (`--flood-conns` connections, a new one per request, as probes make them)
asks the status port for `/healthz` or `/metrics` as fast as it is answered, or nothing. The
cases are interleaved round by round; the table gives, per case, the median over rounds of
the hand-off p50 and p90, and of the flood's rate (answers per second, and how many of them
were not 200: the 429s of the status port's budget). Needs nginx and wrk (`apt-get install
nginx-light wrk`)."""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
_spec = importlib.util.spec_from_file_location("bench_run", os.path.join(HERE, "run.py"))
R = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(R)

CASES = ("idle", "healthz", "metrics")


def handoffs(port: int, seconds: float) -> list[float]:
    """Seconds each hand-off took, connect to the backend's answer and close."""
    took = []
    request = b"GET / HTTP/1.0\r\n\r\n"
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        start = time.perf_counter()
        with socket.create_connection((R.HOST, port), timeout=10) as s:
            s.sendall(request)
            while s.recv(4096):
                pass
        took.append(time.perf_counter() - start)
    return took


def quantile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--duration", type=float, default=3.0, help="seconds per case and round")
    p.add_argument("--flood-conns", type=int, default=16, help="wrk's connections")
    p.add_argument("--tree", default=R.REPO, help="the checkout whose tcplock is measured")
    p.add_argument("extra", nargs="*", help="more tcplock options (after --)")
    a = p.parse_args()
    for tool in ("nginx", "wrk"):
        if not any(
            os.access(os.path.join(d, tool), os.X_OK)
            for d in os.environ.get("PATH", "").split(os.pathsep) + list(R.SBIN)
        ):
            print(
                f"status_flood: {tool} is needed (apt-get install nginx-light wrk)", file=sys.stderr
            )
            return 2
    os.environ["PATH"] += os.pathsep + os.pathsep.join(R.SBIN)
    work = tempfile.mkdtemp(prefix="tcplock-status-flood-")
    P = R.Procs(work)
    try:
        backend, nginx = R.start_nginx(P, "backend", None)
        R.wait_port(backend, nginx, "nginx", P.log_of(nginx))
        status = R.free_port()
        port, lock = R.start_tcplock(
            P,
            "tcplock",
            backend,
            1,
            ["--status", f"{R.HOST}:{status}", "--log-level", "warning", *a.extra],
            None,
            tree=a.tree,
        )
        R.wait_port(port, lock, "tcplock", P.log_of(lock))
        R.wait_port(status, lock, "tcplock --status", P.log_of(lock))
        handoffs(port, 0.5)  # warm-up
        got = {case: [] for case in CASES}
        for rnd in range(1, a.rounds + 1):
            for case in CASES:
                flood = None
                if case != "idle":
                    flood = subprocess.Popen(
                        [
                            "wrk",
                            "-t1",
                            f"-c{a.flood_conns}",
                            f"-d{math.ceil(a.duration + 1.5)}s",
                            "--timeout",
                            "5s",
                            "-H",
                            "Connection: close",
                            f"http://{R.HOST}:{status}/{case}",
                        ],
                        stdout=subprocess.PIPE,
                        stderr=subprocess.STDOUT,
                        text=True,
                        start_new_session=True,
                    )
                    time.sleep(0.5)
                took = handoffs(port, a.duration)
                rate = bad = 0.0
                if flood is not None:
                    out = flood.communicate(timeout=a.duration + 30)[0]
                    m = re.search(r"Requests/sec:\s*([0-9.]+)", out)
                    n = re.search(r"Non-2xx or 3xx responses:\s*(\d+)", out)
                    total = re.search(r"(\d+) requests in ([0-9.]+)s", out)
                    rate = float(m.group(1)) if m else 0.0
                    if n and total:
                        bad = int(n.group(1)) / float(total.group(2))
                P.check_alive()
                row = (quantile(took, 0.5) * 1e3, quantile(took, 0.9) * 1e3, rate, bad)
                got[case].append(row)
                print(
                    f"round {rnd} {case:8} hand-off p50 {row[0]:.3f} ms  p90 {row[1]:.3f} ms"
                    f"  ({len(took)} hand-offs)  flood {rate:.0f}/s ({bad:.0f}/s not 200)",
                    flush=True,
                )
        print()
        print(
            "| case | hand-off p50 (ms) | p90 (ms) | status answers/s | of them not 200/s |"
            " p50 / idle |"
        )
        print("| --- | --- | --- | --- | --- | --- |")
        idle = statistics.median(r[0] for r in got["idle"])
        for case in CASES:
            med = [statistics.median(r[i] for r in got[case]) for i in range(4)]
            print(
                f"| {case} | {med[0]:.3f} | {med[1]:.3f} | {med[2]:.0f} | {med[3]:.0f} |"
                f" {med[0] / idle:.2f}x |"
            )
        print(
            f"\nmedians over {a.rounds} rounds of {a.duration:g} s per case, interleaved; "
            f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end"
        )
        shutil.rmtree(work)  # kept, with the logs, when a run fails
        return 0
    finally:
        P.cleanup()


if __name__ == "__main__":
    sys.exit(main())
