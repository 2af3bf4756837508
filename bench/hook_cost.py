#!/usr/bin/env python3
"""What running a command hook costs tcplock's own process (stdlib and tcplock only).

Two figures, for the checkout given (``--tree``, default this one), side by side when run for
two checkouts:

  watch   the one thing tcplock does per command for its reaper (``hooks.reaper.watch``: one
          write of the group's id to a pipe), timed over ``--calls`` calls made 200 at a time
          with a pause between (so the reaper keeps up, as it does at real hook rates). The
          pid written names no process, so the reaper reads it and drops it. A checkout with
          no reaper prints nothing for it.
  run     ``hooks.run_command("true", env)`` ``--runs`` times, one after the other: the wall
          time of a run and tcplock's own CPU (user + system, children not counted) per run.
          On a loaded machine both are noisy to a few hundred µs; a few µs cannot show here,
          which is the point of the first figure.
  calls   with ``--strace``: the system calls of tcplock's own thread per run (``strace -c``
          attached to it, not following the commands' processes), by name; the difference
          between two checkouts is what they do differently per command.

    python3 bench/hook_cost.py --strace --tree /path/to/other/checkout
"""

from __future__ import annotations

import argparse
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def measure(calls: int, runs: int, trace: bool) -> None:
    import tcplock
    from tcplock import hooks

    print(f"tcplock from {os.path.dirname(tcplock.__file__)}")
    env = dict(os.environ)
    hooks.run_command("true", env)  # the first command starts the reaper, where there is one
    reaper = getattr(hooks, "reaper", None)
    if reaper is not None:
        time.sleep(0.5)
        wall = used = 0.0
        for _ in range(calls // 200):
            c0, t0 = cpu(), time.perf_counter()
            for _ in range(200):
                reaper.watch(4_000_000)  # above any pid_max: no such process
            wall += time.perf_counter() - t0
            used += cpu() - c0
            time.sleep(0.02)
        n = calls // 200 * 200
        print(f"  watch  {wall / n * 1e6:6.2f} µs wall, {used / n * 1e6:6.2f} µs CPU per command")
    c0, t0 = cpu(), time.perf_counter()
    for _ in range(runs):
        hooks.run_command("true", env)
    wall, used = time.perf_counter() - t0, cpu() - c0
    print(f"  run    {wall / runs * 1e3:6.2f} ms wall, {used / runs * 1e6:6.0f} µs CPU per run")
    if trace:
        with tempfile.NamedTemporaryFile("r", suffix=".strace") as out:
            st = subprocess.Popen(["strace", "-c", "-o", out.name, "-p", str(os.getpid())])
            time.sleep(1.0)  # attached
            for _ in range(runs):
                hooks.run_command("true", env)
            st.send_signal(signal.SIGINT)
            st.wait(30)
            counts = {}
            for line in out.read().splitlines():
                parts = line.split()
                if len(parts) >= 5 and parts[3].isdigit() and parts[-1] != "total":
                    counts[parts[-1]] = int(parts[3])
        total = sum(counts.values())
        print(f"  calls  {total / runs:6.2f} system calls per run:")
        for name, count in sorted(counts.items(), key=lambda kv: -kv[1]):
            print(f"         {name:<16} {count / runs:6.2f}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tree", default=HERE, help="the checkout whose tcplock runs")
    ap.add_argument("--calls", type=int, default=20000)
    ap.add_argument("--runs", type=int, default=500)
    ap.add_argument("--strace", action="store_true", help="also count system calls per run")
    ap.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.measure:
        measure(a.calls, a.runs, a.strace)
        return 0
    env = dict(os.environ, PYTHONPATH=os.path.abspath(a.tree))
    args = ["--calls", str(a.calls), "--runs", str(a.runs), "--measure"]
    args += ["--strace"] if a.strace else []
    return subprocess.call([sys.executable, os.path.abspath(__file__), *args], env=env)


if __name__ == "__main__":
    sys.exit(main())
