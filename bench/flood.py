#!/usr/bin/env python3
"""What a backend flooding its output costs the other clients: hand-off with and without a flood.

    python3 bench/flood.py                      5 interleaved rounds of 5 s per mode, ~1 minute
    python3 bench/flood.py --rounds 2 --duration 2     a quick look
    python3 bench/flood.py --tree /tmp/other    tcplock from another checkout (the same figure
                                                for an older revision)

tcplock (``--slots 1``) runs a pool of two backends itself (``--backend-cmd``), both served by
one nginx answering ``ok\\n`` on two ports (the command only has to stay up: tcplock finds a
backend ready when its port answers). In the *flood* mode the first backend's command is
``exec yes ...``: it writes a line of output without pause for as long as it runs, and tcplock
reads (and logs) it; in the *quiet* mode it is ``exec sleep ...``. Each measurement is
``wrk -t1 -c10 -H 'Connection: close' --latency`` against tcplock: every request is a new
connection, so a hand-off of one of the two slots. Rounds are interleaved (the order of the two
modes alternates from round to round), so that a shared machine's drift hits both alike.

Per mode, the medians over rounds of: wrk's p50 latency (ms), requests per second, tcplock's CPU
(user + system, % of one CPU, from /proc/PID/stat over the measurement) and the growth of its log
(KiB/s). Then the ratio flood / quiet of the median p50s and the median of the ratios paired
round by round; the target is at most 2.0. It reuses bench/run.py's process handling (every
child in its own process group, killed on exit), nginx and tool checks; loopback only.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run as R  # noqa: E402  (bench/run.py: processes, nginx, tcplock's environment)

TARGET = 2.0  # flood p50 over quiet p50, at most
COMMAND = (
    'if [ "$TCPLOCK_BACKEND_INDEX" = 1 ] && [ -n "$BENCH_FLOOD" ]; then '
    'exec yes "a line of output from a backend that writes without pause"; fi; '
    "exec sleep 100000"
)
LATENCY = re.compile(r"^\s*50%\s+([0-9.]+)(us|ms|s)\s*$", re.M)
UNIT = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def cpu_ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def one(P: R.Procs, a, ports: list[int], flood: bool, rnd: int) -> dict:
    tag = f"tcplock-{'flood' if flood else 'quiet'}-{rnd}"
    env = R.tcplock_env(a.tree)
    env.pop("BENCH_FLOOD", None)
    if flood:
        env["BENCH_FLOOD"] = "1"
    port = R.free_port()
    argv = [sys.executable, "-m", "tcplock", "--listen", f"{R.HOST}:{port}", "--slots", "1"]
    argv += [x for p in ports for x in ("--backend", f"{R.HOST}:{p}")]
    argv += ["--backend-cmd", COMMAND]
    p = P.start(tag, argv, cwd=a.tree, env=env)
    log = P.log_of(p)
    try:
        R.wait_port(port, p, tag, log)
        # Both backends up: a short warm-up through the pool.
        url = f"http://{R.HOST}:{port}/"
        R.run(["wrk", "-t1", "-c2", "-d1s", "-H", "Connection: close", url], 30)
        ticks0, size0, t0 = cpu_ticks(p.pid), os.path.getsize(log), time.monotonic()
        out = R.run(
            [
                "wrk",
                "-t1",
                f"-c{a.conns}",
                f"-d{a.duration}s",
                "--timeout",
                "10s",
                "--latency",
                "-H",
                "Connection: close",
                url,
            ],
            a.duration + 30,
        )
        took = time.monotonic() - t0
        ticks, size = cpu_ticks(p.pid) - ticks0, os.path.getsize(log) - size0
        P.check_alive()
    finally:
        P.stop(p)
    os.remove(log)  # a flood's log can be hundreds of MB: kept only when something failed
    m, rps = LATENCY.search(out), R.WRK_RPS.search(out)
    if not m or not rps:
        raise RuntimeError(f"cannot parse wrk output:\n{out}")
    return {
        "p50_ms": float(m.group(1)) * UNIT[m.group(2)],
        "rps": float(rps.group(1)),
        "cpu_pct": 100.0 * ticks / os.sysconf("SC_CLK_TCK") / took,
        "log_kib_s": size / 1024 / took,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--duration", type=int, default=5, help="seconds of wrk per measurement")
    ap.add_argument("--conns", type=int, default=10, help="wrk connections")
    ap.add_argument("--tree", default=R.REPO, help="the checkout tcplock runs from")
    ap.add_argument("--json", help="write every measurement and the medians to this file")
    a = ap.parse_args()
    a.tree = os.path.abspath(a.tree)
    R.ensure_tools()
    where = R.ensure_tcplock(a.tree)
    workdir = tempfile.mkdtemp(prefix="tcplock-flood-")
    P = R.Procs(workdir)
    atexit.register(shutil.rmtree, workdir, True)  # (atexit runs the cleanup below first)
    atexit.register(P.cleanup)
    R.say(f"tcplock {where}; {os.cpu_count()} CPUs; load {os.getloadavg()[0]:.1f}")
    ports, nginx = R.start_nginx_ports(P, "flood", None, 2, 1)
    for port in ports:
        R.wait_port(port, nginx, "nginx", P.log_of(nginx))
    results: dict[str, list[dict]] = {"quiet": [], "flood": []}
    for rnd in range(a.rounds):
        order = ("quiet", "flood") if rnd % 2 == 0 else ("flood", "quiet")
        for mode in order:
            r = one(P, a, ports, mode == "flood", rnd)
            results[mode].append(r)
            R.say(
                f"round {rnd + 1} {mode:5}  p50 {r['p50_ms']:7.2f} ms  {r['rps']:8.0f} req/s  "
                f"tcplock {r['cpu_pct']:5.1f}% CPU  log {r['log_kib_s']:9.1f} KiB/s"
            )
    med = {
        mode: {k: statistics.median(r[k] for r in rs) for k in rs[0]}
        for mode, rs in results.items()
    }
    R.say()
    R.say(f"mode    p50 ms   req/s  tcplock CPU %  log KiB/s   (medians of {a.rounds} rounds)")
    for mode in ("quiet", "flood"):
        m = med[mode]
        R.say(
            f"{mode:5} {m['p50_ms']:8.2f} {m['rps']:7.0f} {m['cpu_pct']:14.1f} "
            f"{m['log_kib_s']:10.1f}"
        )
    ratio = med["flood"]["p50_ms"] / med["quiet"]["p50_ms"]
    paired = statistics.median(
        f["p50_ms"] / q["p50_ms"] for f, q in zip(results["flood"], results["quiet"])
    )
    ok = paired <= TARGET
    R.say(
        f"flood / quiet p50: {ratio:.2f} (medians), {paired:.2f} (paired by round); "
        f"target <= {TARGET}: {'met' if ok else 'NOT met'}"
    )
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"tree": a.tree, "results": results, "medians": med,
                       "ratio": ratio, "paired_ratio": paired}, f, indent=1)  # fmt: skip
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
