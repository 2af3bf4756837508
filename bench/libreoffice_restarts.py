#!/usr/bin/env python3
"""LibreOffice throughput while tcplock restarts its backends: the example's farm of two
unoservers run by tcplock itself (--backend-cmd), never restarting, restarting every
--every conversions, and restarting as often with one standby (--spares 1, a third unoserver).

    python3 bench/libreoffice_restarts.py
    python3 bench/libreoffice_restarts.py --rounds 5 --docs 36 --doc-kb 160 --every 12

The three farms are measured side by side, interleaved: every round measures every farm once,
in an order rotated by the round number. For its turn a farm is started fresh, with the
settings of examples/libreoffice/run-stack.sh (ready command: a bash connect, then unoping;
--stop-timeout 1s, --slots 1), waited for until every backend is ready, sent a warm-up batch
(two small documents) and then the measured batch (--docs documents, all at once, as
bench/libreoffice.py sends them: info(), then convert(); every PDF checked), and stopped, its
process groups gone, before the next farm starts: at most one farm's LibreOffices run at a
time.

The figure is documents converted per minute. Meanwhile /status is read every 0.25 s: a
reading in which clients were queued while a backend was out for its restart (restarting or
starting, its last client done) and fewer backends took clients than the farm has in service
(two: no standby stood in) counts as clients waiting on a restart, for the time since the
reading before. Once the
batch is done and every backend ready again, /status gives the restarts done since the
warm-up. Each line gives the round, the farm, the figure, the restarts, the most backends seen
restarting (or starting) at once, and that wait; the summary gives per farm the median,
min-max, the ratio of its median to that of the farm that never restarts, and the median
(min-max) of the ratios paired round by round (target for the farm with a standby: >= 0.85).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))


def _load(name: str, path: str):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


lo = _load("bench_libreoffice", os.path.join(HERE, "libreoffice.py"))
say = lo.say
TARGET = 0.85
REF = "never"
STANDBY = "restarts+standby"
IN_SERVICE = 2  # backends taking clients in every farm
POLL = 0.25  # seconds between two readings of /status during a batch


def farms(every: int) -> dict:
    """name -> (backends, extra tcplock arguments)."""
    restart = ["--restart-every", str(2 * every)]  # two connections per conversion
    return {
        REF: (IN_SERVICE, []),
        "restarts": (IN_SERVICE, restart),
        STANDBY: (IN_SERVICE + 1, [*restart, "--spares", "1"]),
    }


def free_ports(suite, count: int) -> int:
    """A port P with P .. P+count-1 and their UNO ports free."""
    import socket

    while True:
        base = lo.free_base(suite)
        wanted = [base + i for i in range(count)]
        wanted += [p + lo.UNO_PORT_OFFSET for p in wanted]
        ok = True
        for p in wanted:
            with socket.socket() as s:
                try:
                    s.bind((lo.HOST, p))
                except OSError:
                    ok = False
                    break
        if ok:
            return base


def status(status_port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{status_port}/status", timeout=5) as r:
        return json.load(r)


def wait_farm(status_port: int, backends: int, P, timeout: float = 180) -> dict:
    """Wait until every backend is ready (in service or a standby); its /status then."""
    deadline = time.monotonic() + timeout
    while True:
        P.check_alive()
        try:
            st = status(status_port)
            states = [b["state"] for b in st["backends"]]
            if len(states) == backends and all(s in ("up", "standby") for s in states):
                return st
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"the farm was not ready within {timeout:g}s")
        time.sleep(0.5)


WORKING = ("granted", "hook", "connecting", "relaying")  # a client's work on its backend


def waiting_on_restart(st: dict) -> bool:
    """Whether this /status shows clients waiting on a restart: clients queued while a backend
    is out for its restart (or first start: restarting or starting, its last client done) and
    fewer than IN_SERVICE take clients (no standby took its place). (A client granted a slot of
    a backend as its restart is called for goes back to the queue: it is among the queued.)"""
    active = st["active"]
    busy = {c["backend"] for c in active if c["state"] in WORKING}
    out = [
        b
        for b in st["backends"]
        if b["state"] in ("restarting", "starting") and b["address"] not in busy
    ]
    serving = sum(1 for b in st["backends"] if b["state"] == "up")
    return st["queued"] > 0 and bool(out) and serving < IN_SERVICE


class Watch:
    """Reads /status every POLL seconds in a thread, adding up the time clients waited on a
    restart (see waiting_on_restart) and the most backends seen restarting (or starting) at
    once, until stopped."""

    def __init__(self, status_port: int):
        self.status_port = status_port
        self.waited = 0.0
        self.readings = 0
        self.most_restarting = 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Watch:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join(10)

    def _run(self) -> None:
        last = time.monotonic()
        while not self._done.wait(POLL):
            try:
                st = status(self.status_port)
            except (OSError, ValueError):
                continue  # no reading: the next one covers the time since the last
            now = time.monotonic()
            self.readings += 1
            restarting = [b for b in st["backends"] if b["state"] in ("restarting", "starting")]
            self.most_restarting = max(self.most_restarting, len(restarting))
            if waiting_on_restart(st):
                self.waited += now - last
            last = now


def groups_gone(pgids: list[int], timeout: float) -> None:
    """Wait until the backends' process groups are gone; SIGKILL what outlives timeout."""
    deadline = time.monotonic() + timeout
    for pgid in pgids:
        while True:
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                break
            except PermissionError:
                break
            if time.monotonic() > deadline:
                say(f"  process group {pgid} outlived tcplock's stop: killing it")
                try:
                    os.killpg(pgid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                break
            time.sleep(0.1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    ap.add_argument("--docs", type=int, default=36, help="documents per batch (default 36)")
    ap.add_argument("--doc-kb", type=int, default=160, help="size of each, KB (default 160)")
    ap.add_argument("--every", type=int, default=12, help="restart every N conversions (12)")
    ap.add_argument(
        "--venv", default=os.environ.get("UNO_VENV") or os.path.join(lo.EXAMPLE, ".venv")
    )
    ap.add_argument("--batch-timeout", type=float, default=600, help="seconds per batch")
    ap.add_argument("--max-seconds", type=float, default=3600, help="bound on the whole run")
    a = ap.parse_args()
    if a.rounds < 1 or a.docs < 1 or a.doc_kb < 1 or a.every < 1:
        ap.error("--rounds, --docs, --doc-kb and --every are whole numbers from 1 up")

    suite = lo.load_suite()
    workdir = tempfile.mkdtemp(prefix="tcplock-bench-lor-")
    P = suite.Procs(workdir)
    began = time.monotonic()
    pgids: list[int] = []  # the backends of the farm running now

    lo.end_on_signals(a.max_seconds)
    plan = farms(a.every)
    names = list(plan)
    results: dict = {name: [] for name in names}
    restarts: dict = {name: [] for name in names}
    waits: dict = {name: [] for name in names}
    try:
        lo.ensure_uno(a.venv)
        where = suite.ensure_tcplock()
        docs = os.path.join(workdir, "docs")
        mean = lo.write_docs(docs, a.docs, a.doc_kb)
        warm = os.path.join(workdir, "warm")
        lo.write_docs(warm, 2, 8)
        say(f"tcplock {where}; {os.cpu_count()} CPUs (shared: timings are noisy)")
        say(f"{a.docs} documents of {mean / 1024:.0f} KB text per batch; restarts every {a.every}")
        say(f"load before: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f}")
        for rnd in range(a.rounds):
            order = names[rnd % len(names) :] + names[: rnd % len(names)]
            for name in order:
                count, extra = plan[name]
                base = free_ports(suite, count)
                ports = [base + i for i in range(count)]
                status_port = suite.free_port()
                env_cmd = (
                    f"UNO_VENV={a.venv} UNO_STATE_DIR={workdir}/state-{name} "
                    f"UNO_PORT_OFFSET={lo.UNO_PORT_OFFSET} exec {lo.EXAMPLE}/unoserver-backend"
                )
                ready = (  # as run-stack.sh's: a connect from bash first, then unoping
                    "bash -c 'exec 3<>/dev/tcp/$TCPLOCK_BACKEND_HOST/$TCPLOCK_BACKEND_PORT' "
                    f"2>/dev/null && timeout 10 {a.venv}/bin/unoping "
                    "--host $TCPLOCK_BACKEND_HOST --port $TCPLOCK_BACKEND_PORT"
                )
                args = [
                    "--log-level", "warning", "--backend-cmd", env_cmd, "--ready-cmd", ready,
                    "--ready-timeout", "60s", "--stop-timeout", "1s", "--status",
                    f"127.0.0.1:{status_port}", *extra,
                ]  # fmt: skip
                port, proc = suite.start_tcplock(P, f"tcplock-{name}", ports, 1, args, None)
                suite.wait_port(port, proc, name, P.log_of(proc))
                first = wait_farm(status_port, count, P)
                pgids[:] = [b["pid"] for b in first["backends"] if b["pid"]]
                lo.run_batch(a.venv, port, warm, a.batch_timeout)
                before = wait_farm(status_port, count, P)["restarts"]
                with Watch(status_port) as watch:
                    got = lo.run_batch(a.venv, port, docs, a.batch_timeout)
                if got["failed"]:
                    raise RuntimeError(f"{name}: conversions failed: {got['failed']}")
                # The restart a batch's last clients called for is done after them: wait for
                # it, so that every round counts the restarts its clients called for.
                after = wait_farm(status_port, count, P)
                pgids[:] = [b["pid"] for b in after["backends"] if b["pid"]]
                P.stop(proc)
                groups_gone(pgids, 15)
                pgids.clear()
                rate = 60.0 * got["docs"] / got["seconds"]
                results[name].append(rate)
                restarts[name].append(after["restarts"] - before)
                waits[name].append(watch.waited)
                say(
                    f"round {rnd + 1}/{a.rounds} {name:16s} {got['seconds']:7.2f}s for "
                    f"{got['docs']} documents = {rate:6.1f} documents/min; "
                    f"{restarts[name][-1]} restarts, at most {watch.most_restarting} at once; "
                    f"clients waited on a restart {watch.waited:.1f}s "
                    f"({watch.readings} readings of /status)"
                )
    except KeyboardInterrupt as e:
        say(f"interrupted ({e})")
        return 130
    except Exception as e:  # noqa: BLE001 - one line for the operator, exit 1
        say(f"RESULT: FAILED -- {type(e).__name__}: {e}")
        return 1
    finally:
        signal.alarm(0)
        P.cleanup()
        groups_gone(pgids, 5)
        shutil.rmtree(workdir, ignore_errors=True)

    say("")
    say(
        f"documents/min, higher is better; {a.rounds} interleaved round(s), "
        f"{time.monotonic() - began:.0f}s in all; load after: "
        f"{os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f}"
    )
    say(f"{'farm':16s} {'median':>7s} {'min':>6s} {'max':>6s}  {'/never':>6s}  paired (min-max)")
    ref = statistics.median(results[REF])
    for name in names:
        v = results[name]
        pairs = [x / y for x, y in zip(v, results[REF])]
        say(
            f"{name:16s} {statistics.median(v):7.1f} {min(v):6.1f} {max(v):6.1f}  "
            f"{statistics.median(v) / ref:5.2f}x  {statistics.median(pairs):.2f}x "
            f"({min(pairs):.2f}-{max(pairs):.2f})"
        )
    say("by round: documents/min; restarts; seconds clients waited on a restart")
    for name in names:
        say(
            f"{name:16s} {' '.join(f'{x:.1f}' for x in results[name])}; "
            f"{' '.join(str(n) for n in restarts[name])}; "
            f"{' '.join(f'{w:.1f}' for w in waits[name])}"
        )
    ratio = statistics.median(results[STANDBY]) / ref
    pairs = [x / y for x, y in zip(results[STANDBY], results[REF])]
    say(
        f"\n{STANDBY} / {REF}: {ratio:.2f}x of the medians, paired by round "
        f"{statistics.median(pairs):.2f}x; target >= {TARGET}x: "
        f"{'met' if ratio >= TARGET else 'MISSED'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
