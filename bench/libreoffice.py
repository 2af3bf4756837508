#!/usr/bin/env python3
"""LibreOffice throughput: a pool of two unoservers behind tcplock, against one unoserver
behind tcplock and against HAProxy in front of the same two (see bench/README.md).

    bash bench/run libreoffice            # the same as: python3 bench/libreoffice.py
    python3 bench/libreoffice.py --rounds 5 --docs 24 --doc-kb 160

It installs what is missing (examples/libreoffice/install.sh: Debian's LibreOffice without GUI,
python3-uno, a venv with unoserver from PyPI; haproxy with apt-get), starts two unoservers with
the example's own backend command (examples/libreoffice/unoserver-backend, each with its
LibreOffice, its own ports and profile), and then, in every round, sends the same batch of
documents (--docs files of about --doc-kb KB of text each, all at once, one client thread each,
as unoconvert does it: info(), then convert() with the document in the request and the PDF in
the answer) through each peer in turn:

  tcplock-2   tcplock --slots 1 --backend A --backend B: the farm
  tcplock-1   tcplock --slots 1 --backend A: one unoserver
  haproxy-2   haproxy, nbthread 1, balance leastconn, server A maxconn 1, server B maxconn 1

The figure is documents converted per minute (every PDF is checked: it must be a whole PDF).
Rounds are interleaved, the order of peers rotated every round; the summary gives the median,
min-max and the ratios tcplock-2 / tcplock-1 (target >= 1.6) and tcplock-2 / haproxy-2 (target
>= 1.0), of the medians and paired round by round. Every child runs in its own process group
and is killed at exit, error or signal; --max-seconds bounds the whole run.

Internal helper mode (run with the unoserver venv's Python):
  libreoffice.py --_client PORT DOCDIR   convert every DOCDIR/*.txt at once, print JSON
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

THIS = os.path.abspath(__file__)
HERE = os.path.dirname(THIS)
REPO = os.path.dirname(HERE)
EXAMPLE = os.path.join(REPO, "examples", "libreoffice")
HOST = "127.0.0.1"
PEERS = ("tcplock-2", "tcplock-1", "haproxy-2")
TARGETS = [("tcplock-2", "tcplock-1", 1.6), ("tcplock-2", "haproxy-2", 1.0)]
UNO_PORT_OFFSET = 1000


def load_suite():
    """bench/run.py, for its process handling, installs and tcplock start (it runs nothing on
    import)."""
    spec = importlib.util.spec_from_file_location("bench_run", os.path.join(HERE, "run.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def say(msg: str = "") -> None:
    print(msg, flush=True)


# --------------------------------------------------------------------------------------------
# the client: one thread per document, all at once
# --------------------------------------------------------------------------------------------


def client(port: int, docdir: str) -> None:
    from unoserver.client import UnoClient

    docs = sorted(os.path.join(docdir, n) for n in os.listdir(docdir) if n.endswith(".txt"))
    results: dict = {}
    start = threading.Event()

    def one(path: str) -> None:
        with open(path, "rb") as f:
            data = f.read()
        start.wait()
        t0 = time.monotonic()
        try:
            pdf = UnoClient(HOST, str(port), host_location="remote").convert(
                indata=data, convert_to="pdf"
            )
            ok = pdf.startswith(b"%PDF-") and b"%%EOF" in pdf[-64:]
            results[path] = (ok, time.monotonic() - t0, "" if ok else "not a whole PDF")
        except Exception as e:  # noqa: BLE001 - reported, counted as a failure
            results[path] = (False, time.monotonic() - t0, f"{type(e).__name__}: {e}"[:300])

    threads = [threading.Thread(target=one, args=(p,), daemon=True) for p in docs]
    for t in threads:
        t.start()
    t0 = time.monotonic()
    start.set()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - t0
    failed = {os.path.basename(p): why for p, (ok, _, why) in results.items() if not ok}
    print(json.dumps({"seconds": elapsed, "docs": len(docs), "failed": failed}))


# --------------------------------------------------------------------------------------------
# the harness
# --------------------------------------------------------------------------------------------


def write_docs(docdir: str, n: int, kb: int) -> int:
    """n text documents of about kb KB each (different text in each); their mean size."""
    os.makedirs(docdir, exist_ok=True)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda".split()
    sizes = []
    for i in range(n):
        rng = random.Random(i)
        lines, size = [], 0
        while size < kb * 1024:
            line = f"Document {i} line {len(lines)}: " + " ".join(
                rng.choice(words) for _ in range(12)
            )
            lines.append(line)
            size += len(line) + 1
        with open(os.path.join(docdir, f"doc{i:02d}.txt"), "w") as f:
            f.write("\n".join(lines) + "\n")
        sizes.append(size)
    return int(statistics.mean(sizes))


def ensure_uno(venv: str) -> None:
    env = dict(os.environ, UNO_VENV=venv, PYTHON=sys.executable)
    say(f"[install] examples/libreoffice/install.sh (UNO_VENV={venv})")
    r = subprocess.run(
        [os.path.join(EXAMPLE, "install.sh")],
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    if r.returncode != 0:
        raise RuntimeError(f"install.sh failed:\n{r.stdout[-1500:]}{r.stderr[-1500:]}")


def free_base(suite) -> int:
    """A port P with P, P+1, and their UNO ports free (outside the ephemeral range)."""
    import socket

    rng = random.Random()
    for _ in range(500):
        base = rng.randrange(20000, 28000)
        ports = [base, base + 1, base + UNO_PORT_OFFSET, base + 1 + UNO_PORT_OFFSET]
        ok = True
        for p in ports:
            with socket.socket() as s:
                try:
                    s.bind((HOST, p))
                except OSError:
                    ok = False
                    break
        if ok:
            return base
    raise RuntimeError("no free ports")


def start_unoservers(P, venv: str, ports: list[int], state: str) -> None:
    """The two unoservers, each run by the example's backend command as tcplock would run it."""
    for i, port in enumerate(ports):
        env = dict(
            os.environ,
            UNO_VENV=venv,
            UNO_STATE_DIR=state,
            UNO_PORT_OFFSET=str(UNO_PORT_OFFSET),
            TCPLOCK_BACKEND=f"{HOST}:{port}",
            TCPLOCK_BACKEND_HOST=HOST,
            TCPLOCK_BACKEND_PORT=str(port),
            TCPLOCK_BACKEND_INDEX=str(i),
        )
        P.start(f"unoserver-{port}", [os.path.join(EXAMPLE, "unoserver-backend")], env=env)
    for port in ports:
        deadline = time.monotonic() + 120
        while True:
            P.check_alive()
            r = subprocess.run(
                [os.path.join(venv, "bin", "unoping"), "--host", HOST, "--port", str(port)],
                capture_output=True,
                stdin=subprocess.DEVNULL,
                timeout=30,
            )
            if r.returncode == 0:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"the unoserver on {port} did not answer within 120s")
            time.sleep(0.3)


def start_haproxy(suite, P, ports: list[int], timeout_s: int):
    port = suite.free_port()
    d = os.path.join(P.workdir, "haproxy-2")
    os.makedirs(d, exist_ok=True)
    cfg = os.path.join(d, "haproxy.cfg")
    servers = "".join(f"\n    server s{i} {HOST}:{p} maxconn 1" for i, p in enumerate(ports, 1))
    with open(cfg, "w") as f:
        f.write(f"""global
    maxconn 4096
    nbthread 1

defaults
    mode tcp
    timeout connect 5s
    timeout client  {timeout_s}s
    timeout server  {timeout_s}s
    timeout queue   {timeout_s}s

frontend fe
    bind {HOST}:{port}
    default_backend be

backend be
    balance leastconn{servers}
""")
    r = subprocess.run(["haproxy", "-c", "-q", "-f", cfg], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"haproxy config check failed:\n{r.stdout}{r.stderr}")
    return port, P.start("haproxy-2", ["haproxy", "-f", cfg, "-db"])


def run_batch(venv: str, port: int, docdir: str, timeout: float) -> dict:
    r = subprocess.run(
        [
            os.path.join(venv, "bin", "python"),
            os.path.abspath(__file__),
            "--_client",
            str(port),
            docdir,
        ],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=timeout,
    )
    if r.returncode != 0:
        raise RuntimeError(f"the client failed ({r.returncode}):\n{r.stderr[-1500:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def end_on_signals(max_seconds: float) -> None:
    """SIGINT, SIGTERM, SIGHUP and ``max_seconds`` running out end the run by an exception, so
    that the run's ``finally`` ends every process it started."""

    def on_signal(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")

    def on_alarm(_signum, _frame):
        raise TimeoutError(f"--max-seconds {max_seconds:g} ran out")

    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, on_signal)
    signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(int(max_seconds))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    ap.add_argument("--docs", type=int, default=24, help="documents per batch (default 24)")
    ap.add_argument("--doc-kb", type=int, default=160, help="size of each, KB (default 160)")
    ap.add_argument("--peers", default=",".join(PEERS), help=f"subset of {','.join(PEERS)}")
    ap.add_argument("--venv", default=os.environ.get("UNO_VENV") or os.path.join(EXAMPLE, ".venv"))
    ap.add_argument("--batch-timeout", type=float, default=600, help="seconds per batch")
    ap.add_argument("--max-seconds", type=float, default=3600, help="bound on the whole run")
    ap.add_argument("--json", help="write every measurement to this file")
    ap.add_argument("--check-targets", action="store_true", help="exit 3 when a target is missed")
    ap.add_argument("--_client", nargs=2, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a._client:
        client(int(a._client[0]), a._client[1])
        return 0
    peers = [p.strip() for p in a.peers.split(",") if p.strip()]
    unknown = set(peers) - set(PEERS)
    if unknown or not peers or a.rounds < 1 or a.docs < 1 or a.doc_kb < 1:
        ap.error(f"bad --peers/--rounds/--docs/--doc-kb (peers: {','.join(PEERS)})")

    suite = load_suite()
    workdir = tempfile.mkdtemp(prefix="tcplock-bench-lo-")
    P = suite.Procs(workdir)
    began = time.monotonic()

    end_on_signals(a.max_seconds)
    results: dict = {p: [] for p in peers}
    try:
        os.environ["PATH"] = os.pathsep.join([os.environ.get("PATH", ""), *suite.SBIN])
        if not shutil.which("haproxy"):
            say("[install] missing: haproxy -> apt-get install -y haproxy")
            suite.apt_install(["haproxy"])
        ensure_uno(a.venv)
        where = suite.ensure_tcplock()
        mean = write_docs(os.path.join(workdir, "docs"), a.docs, a.doc_kb)
        base = free_base(suite)
        ports = [base, base + 1]
        say(f"tcplock {where}")
        lo = subprocess.run(["soffice", "--version"], capture_output=True, text=True, timeout=60)
        say(f"LibreOffice: {lo.stdout.strip()}")
        say(f"{os.cpu_count()} CPUs; {a.docs} documents of {mean / 1024:.0f} KB text per batch")
        say(f"starting two unoservers on {ports} ...")
        start_unoservers(P, a.venv, ports, os.path.join(workdir, "state"))
        addr = {}
        if "tcplock-2" in peers:
            addr["tcplock-2"], p2 = suite.start_tcplock(
                P, "tcplock-2", ports, 1, ["--log-level", "warning"], None
            )
            suite.wait_port(addr["tcplock-2"], p2, "tcplock-2", P.log_of(p2))
        if "tcplock-1" in peers:
            addr["tcplock-1"], p1 = suite.start_tcplock(
                P, "tcplock-1", ports[:1], 1, ["--log-level", "warning"], None
            )
            suite.wait_port(addr["tcplock-1"], p1, "tcplock-1", P.log_of(p1))
        if "haproxy-2" in peers:
            addr["haproxy-2"], ph = start_haproxy(suite, P, ports, int(a.batch_timeout))
            suite.wait_port(addr["haproxy-2"], ph, "haproxy-2", P.log_of(ph))

        # Warm-up: each LibreOffice converts once, so no round pays for a first conversion.
        warm = os.path.join(workdir, "warm")
        write_docs(warm, 2, 8)
        for port in ports:
            run_batch(a.venv, port, warm, a.batch_timeout)

        for rnd in range(a.rounds):
            order = peers[rnd % len(peers) :] + peers[: rnd % len(peers)]
            for name in order:
                P.check_alive()
                got = run_batch(a.venv, addr[name], os.path.join(workdir, "docs"), a.batch_timeout)
                if got["failed"]:
                    raise RuntimeError(f"{name}: conversions failed: {got['failed']}")
                rate = 60.0 * got["docs"] / got["seconds"]
                results[name].append(rate)
                say(
                    f"round {rnd + 1}/{a.rounds} {name:10s} {got['seconds']:7.2f}s "
                    f"for {got['docs']} documents = {rate:6.1f} documents/min"
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
        shutil.rmtree(workdir, ignore_errors=True)

    say("")
    say(f"documents/min, higher is better; {a.rounds} round(s), {time.monotonic() - began:.0f}s")
    say(f"{'peer':10s} {'median':>8s} {'min':>8s} {'max':>8s}  rounds")
    for name in peers:
        v = results[name]
        say(
            f"{name:10s} {statistics.median(v):8.1f} {min(v):8.1f} {max(v):8.1f}  "
            + " ".join(f"{x:.1f}" for x in v)
        )
    missed = 0
    say("")
    for peer, ref, target in TARGETS:
        if peer not in results or ref not in results:
            continue
        ratio = statistics.median(results[peer]) / statistics.median(results[ref])
        pairs = [x / y for x, y in zip(results[peer], results[ref])]
        ok = ratio >= target
        missed += not ok
        say(
            f"{peer} / {ref}: {ratio:.2f}x (of medians; paired by round: median "
            f"{statistics.median(pairs):.2f}x, {min(pairs):.2f}-{max(pairs):.2f}); "
            f"target >= {target}x: {'met' if ok else 'MISSED'}"
        )
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"unit": "documents/min", "docs": a.docs, "results": results}, f, indent=1)
    return 3 if missed and a.check_targets else 0


if __name__ == "__main__":
    sys.exit(main())
