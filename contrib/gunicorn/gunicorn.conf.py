"""gunicorn settings that run ONE tcplock for all the workers.

    APP_BACKEND=127.0.0.1:2003 APP_LOCK_PORT=9000 \
        gunicorn -c gunicorn.conf.py app:app

The master starts tcplock as a child process once it is listening itself and before it forks
any worker (``when_ready``), waits until tcplock says it is ready, and stops it when gunicorn
exits (``on_exit``), after the workers have finished. Every worker connects to that one tcplock,
so the service sees one client at a time however many workers and greenlets there are.

Why not a TCPLock object: the master has no gevent loop, a TCPLock created there before the
fork would be copied into every worker, and a TCPLock created in each worker (``post_fork``, or
at import of the app) is one lock per worker: with 4 workers, 4 clients reach the service at
once. See README.md beside this file.

Environment:
  APP_BACKEND     HOST:PORT of the service to protect (required)
  APP_LOCK_PORT   port tcplock listens on, on 127.0.0.1 (default 9000); app.py reads it too
  APP_TCPLOCK_START_TIMEOUT  seconds to wait for tcplock to be ready (default 30)
  TCPLOCK_*       any other tcplock setting (TCPLOCK_TIMEOUT=2m, TCPLOCK_RESTART_CMD=...),
                  passed on to tcplock as its own environment
"""

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

bind = os.environ.get("APP_BIND", "127.0.0.1:8000")
worker_class = "gevent"
workers = int(os.environ.get("APP_WORKERS", "4"))

LOCK_PORT = int(os.environ.get("APP_LOCK_PORT", "9000"))
START_TIMEOUT = float(os.environ.get("APP_TCPLOCK_START_TIMEOUT", "30"))
# tcplock drains for TCPLOCK_DRAIN_TIMEOUT (default 10s) on SIGTERM; wait a little longer.
STOP_TIMEOUT = 30.0


def _backend():
    text = os.environ.get("APP_BACKEND", "").strip()
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise RuntimeError(f"APP_BACKEND must be HOST:PORT of the service, not {text!r}")
    return host, port


def _die_with_parent():
    """In the child, before exec: get SIGTERM if the master dies without running on_exit
    (SIGKILL, a crash), so that no orphan tcplock keeps the port. Linux only."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def when_ready(server):
    """In the master, once, after it has bound its own socket and before any worker exists."""
    host, port = _backend()
    # tcplock tells when it listens by sending READY=1 to $NOTIFY_SOCKET, as under systemd.
    # The socket stays open (and unread) until tcplock has exited, so its STOPPING=1 lands.
    tmpdir = tempfile.mkdtemp(prefix="tcplock-gunicorn-")
    notify_path = os.path.join(tmpdir, "notify")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(notify_path)
    env = dict(os.environ, NOTIFY_SOCKET=notify_path, PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "tcplock", "--listen", f"127.0.0.1:{LOCK_PORT}"]
    cmd += ["--proxy-host", host, "--proxy-port", port]
    proc = subprocess.Popen(
        cmd,
        env=env,
        stdin=subprocess.DEVNULL,  # its log goes to gunicorn's stderr
        start_new_session=True,  # a Ctrl-C for gunicorn must not stop tcplock before the workers
        preexec_fn=_die_with_parent,
    )
    server.tcplock = (proc, notify, tmpdir)  # on the Arbiter: survives a reload (SIGHUP)
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        if proc.poll() is not None:
            _cleanup(server)
            raise RuntimeError(f"tcplock exited with status {proc.returncode} at start-up")
        left = deadline - time.monotonic()
        if left <= 0:
            _stop_tcplock(server)
            raise RuntimeError(f"tcplock did not become ready in {START_TIMEOUT:g}s")
        notify.settimeout(min(left, 0.2))
        try:
            message = notify.recv(4096).decode(errors="replace")
        except socket.timeout:
            continue
        if "READY=1" in message.split("\n"):
            break
    server.log.info(
        "tcplock (pid %s) on 127.0.0.1:%d guards %s:%s for all workers",
        proc.pid,
        LOCK_PORT,
        host,
        port,
    )


def on_exit(server):
    """In the master, last: the workers have finished, so nothing is relayed any more."""
    _stop_tcplock(server)


def _stop_tcplock(server):
    state = getattr(server, "tcplock", None)
    if state is None:
        return
    proc = state[0]
    # If tcplock died earlier, the master has already reaped it (it waits for any child);
    # poll() then reports it as finished, and no signal goes to a recycled pid.
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        server.log.info("tcplock (pid %s) stopped", proc.pid)
    _cleanup(server)


def _cleanup(server):
    state = getattr(server, "tcplock", None)
    if state is None:
        return
    _proc, notify, tmpdir = state
    notify.close()
    shutil.rmtree(tmpdir, ignore_errors=True)
    server.tcplock = None
