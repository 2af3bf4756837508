#!/usr/bin/env python3
"""LibreOffice throughput while tcplock restarts its backends: the example's farm of two
unoservers run by tcplock itself (--backend-cmd), never restarting, restarting every
--every conversions, and restarting as often with one standby (--spares 1, a third unoserver).

    python3 bench/libreoffice_restarts.py
    python3 bench/libreoffice_restarts.py --rounds 3 --docs 36 --doc-kb 160 --every 12

Each farm is started on its own, one after the other (the machine holds at most three
LibreOffices at a time), with the settings of examples/libreoffice/run-stack.sh (ready command
unoping, --stop-timeout 1s, --slots 1), and each round sends the same batch of documents, all
at once, as bench/libreoffice.py does (info(), then convert(); every PDF checked). The figure
is documents converted per minute; the summary gives the median of each farm and its ratio to
the farm that never restarts (target for the farm with a standby: >= 0.85).
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


def farms(every: int) -> dict:
    """name -> (backends, extra tcplock arguments)."""
    restart = ["--restart-every", str(2 * every)]  # two connections per conversion
    return {
        "never": (2, []),
        "restarts": (2, restart),
        "restarts+standby": (3, [*restart, "--spares", "1"]),
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


def wait_farm(status_port: int, backends: int, P, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while True:
        P.check_alive()
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{status_port}/status", timeout=5) as r:
                states = [b["state"] for b in json.load(r)["backends"]]
            if len(states) == backends and all(s in ("up", "standby") for s in states):
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"the farm was not ready within {timeout:g}s")
        time.sleep(0.5)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=2, help="rounds per farm (default 2)")
    ap.add_argument("--docs", type=int, default=36, help="documents per batch (default 36)")
    ap.add_argument("--doc-kb", type=int, default=160, help="size of each, KB (default 160)")
    ap.add_argument("--every", type=int, default=12, help="restart every N conversions (12)")
    ap.add_argument(
        "--venv", default=os.environ.get("UNO_VENV") or os.path.join(lo.EXAMPLE, ".venv")
    )
    ap.add_argument("--batch-timeout", type=float, default=600, help="seconds per batch")
    ap.add_argument("--max-seconds", type=float, default=1800, help="bound on the whole run")
    a = ap.parse_args()
    if a.rounds < 1 or a.docs < 1 or a.doc_kb < 1 or a.every < 1:
        ap.error("--rounds, --docs, --doc-kb and --every are whole numbers from 1 up")

    suite = lo.load_suite()
    workdir = tempfile.mkdtemp(prefix="tcplock-bench-lor-")
    P = suite.Procs(workdir)
    began = time.monotonic()

    lo.end_on_signals(a.max_seconds)
    plan = farms(a.every)
    results: dict = {name: [] for name in plan}
    try:
        lo.ensure_uno(a.venv)
        where = suite.ensure_tcplock()
        mean = lo.write_docs(os.path.join(workdir, "docs"), a.docs, a.doc_kb)
        warm = os.path.join(workdir, "warm")
        lo.write_docs(warm, 2, 8)
        say(f"tcplock {where}; {os.cpu_count()} CPUs (shared: timings are noisy)")
        say(f"{a.docs} documents of {mean / 1024:.0f} KB text per batch; restarts every {a.every}")
        for name, (count, extra) in plan.items():
            base = free_ports(suite, count)
            ports = [base + i for i in range(count)]
            status_port = suite.free_port()
            env_cmd = (
                f"UNO_VENV={a.venv} UNO_STATE_DIR={workdir}/state-{name} "
                f"UNO_PORT_OFFSET={lo.UNO_PORT_OFFSET} exec {lo.EXAMPLE}/unoserver-backend"
            )
            ready = (
                f"timeout 10 {a.venv}/bin/unoping --host $TCPLOCK_BACKEND_HOST "
                "--port $TCPLOCK_BACKEND_PORT"
            )
            args = [
                "--log-level", "warning", "--backend-cmd", env_cmd, "--ready-cmd", ready,
                "--ready-timeout", "60s", "--stop-timeout", "1s", "--status",
                f"127.0.0.1:{status_port}", *extra,
            ]  # fmt: skip
            port, proc = suite.start_tcplock(P, f"tcplock-{name}", ports, 1, args, None)
            suite.wait_port(port, proc, name, P.log_of(proc))
            wait_farm(status_port, count, P)
            lo.run_batch(a.venv, port, warm, a.batch_timeout)
            for rnd in range(a.rounds):
                got = lo.run_batch(a.venv, port, os.path.join(workdir, "docs"), a.batch_timeout)
                if got["failed"]:
                    raise RuntimeError(f"{name}: conversions failed: {got['failed']}")
                rate = 60.0 * got["docs"] / got["seconds"]
                results[name].append(rate)
                say(
                    f"{name:17s} round {rnd + 1}/{a.rounds} {got['seconds']:7.2f}s for "
                    f"{got['docs']} documents = {rate:6.1f} documents/min"
                )
            P.stop(proc)
    except KeyboardInterrupt as e:
        say(f"interrupted ({e})")
        return 130
    except Exception as e:  # noqa: BLE001 - one line for the operator, exit 1
        say(f"RESULT: FAILED -- {type(e).__name__}: {e}")
        return 1
    finally:
        signal.alarm(0)
        P.cleanup()
        shutil.rmtree(workdir, ignore_errors=True)

    say("")
    say(f"documents/min, higher is better; {time.monotonic() - began:.0f}s in all")
    ref = statistics.median(results["never"])
    for name, v in results.items():
        ratio = statistics.median(v) / ref
        target = f"; target >= {TARGET}x: {'met' if ratio >= TARGET else 'MISSED'}"
        say(
            f"{name:17s} median {statistics.median(v):6.1f} ({' '.join(f'{x:.1f}' for x in v)})"
            f" = {ratio:.2f}x of never restarting" + (target if name == "restarts+standby" else "")
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
