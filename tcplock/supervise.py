"""Supervised backends: the process group that runs one backend, when tcplock runs it itself.

What it owns: starting a backend's command (``backend_cmd``) in a session and process group of
its own, passing its output on to the log line by line, noticing when it ends, stopping the
whole group (SIGTERM, then SIGKILL after ``stop_timeout``), and measuring its memory; and
running a readiness command (``ready_cmd``) once. When to start, stop or restart is the
:class:`~tcplock.backend.Backend`'s: a start is a restart with nothing to stop, and runs on the
backend's restart path.

The rule it keeps: no process outlives tcplock. The group is stopped on every restart and when
tcplock stops, and tcplock returns from its stop only once the group is gone. The first process
of the group is a small watcher (``_watch.py``) that runs the command as its child and kills the
whole group when tcplock dies, even by SIGKILL (the kernel's parent-death signal reaches it;
it would not reach the command's own children). A process that leaves the group (``setsid``)
is out of reach.

Nothing here blocks the event loop: processes are waited for by gevent's child watcher, and
their output is read by a greenlet. The library does not monkey-patch anything for it.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from typing import Dict, Mapping, Optional, Tuple

from gevent import Timeout, sleep, subprocess
from gevent.event import Event

from .hooks import HookFailed, describe_status, kill_group, spawn_command
from .steps import Step

__all__ = ["BackendProcess", "probe", "group_members"]

log = logging.getLogger("tcplock.server")
#: The log of what the backends' commands print, one record per line.
output_log = logging.getLogger("tcplock.backend")

_WATCH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_watch.py")
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
#: The longest line of output logged as one; a longer one is logged in pieces.
MAX_LINE = 1 << 16
#: The output of a backend's command logged each second, at most (see _pass_on); what comes
#: beyond is read at a bounded pace and dropped, and the dropped lines are counted.
OUTPUT_LINES_PER_SECOND = 200
OUTPUT_BYTES_PER_SECOND = 256 << 10
#: The most of a command's output read at once, before the loop runs again.
OUTPUT_CHUNK = 64 << 10
#: Once a second's budget is spent, one chunk is read (and dropped) this often, at most.
OUTPUT_DRAIN_INTERVAL = 0.01
#: How often the whole process table is read for the members of a group (between two reads,
#: the members found last are read again, which costs a few file reads instead of hundreds).
RESCAN_INTERVAL = 5.0
_PF_EXITING = 0x4
#: How often a stopping group is looked at.
_POLL = 0.05


def _stat(pid: int) -> Optional[Tuple[str, int, int, int, int, int]]:
    """(state, process group, resident pages, parent, start time, flags) of a process, or None
    if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    fields = data[data.rindex(b")") + 2 :].split()
    try:
        return (
            fields[0].decode(),
            int(fields[2]),
            int(fields[21]),
            int(fields[1]),
            int(fields[19]),
            int(fields[6]),
        )
    except (IndexError, ValueError):  # pragma: no cover - a kernel with another layout
        return None


def group_members(pgid: int) -> Dict[int, tuple]:
    """Every live process of the process group ``pgid`` (zombies left out), with what
    :func:`_stat` says of it; read from /proc (empty where there is none)."""
    members = {}
    try:
        names = os.listdir("/proc")
    except OSError:
        return members
    for name in names:
        if not name.isdigit():
            continue
        stat = _stat(int(name))
        if stat is not None and stat[1] == pgid and stat[0] != "Z":
            members[int(name)] = stat
    return members


def _group_exists(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover - a member that changed its user
        return True
    return True


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


class BackendProcess:
    """The running command of one supervised backend, as a process group led by the watcher.

    ``backend`` is what it needs of its backend: ``label``, ``env()``, ``lock`` (for
    ``backend_cmd``) and ``_process_exited(status)``, called when the command ends by itself.
    """

    def __init__(self, backend) -> None:
        self.backend = backend
        self.proc = None  # the watcher, as a gevent Popen
        #: The process group's id (the watcher's pid) while it runs; None before the first start
        #: and once it has been stopped.
        self.pgid: Optional[int] = None
        #: Set when the process started last has ended (at once, while none was started).
        self.exited = Event()
        self.exited.set()
        #: The returncode it ended with, once it has (negative: the signal that killed it).
        self.status: Optional[int] = None
        self.started_at: Optional[float] = None
        #: When it was found ready (set by the backend), None until then.
        self.ready_at: Optional[float] = None
        self._stopping = False
        self._stop_done: Optional[Event] = None
        self._known: Dict[int, None] = {}
        self._scanned_at = 0.0
        #: The command's own process (the watcher's first child), once found.
        #: The processes of the group when the backend became ready (see main_ended).
        self.ready_members: Tuple[int, ...] = ()

    @property
    def pid(self) -> Optional[int]:
        """The process id of the group's leader (the watcher; also the group's id), while the
        command runs."""
        return self.pgid if not self.exited.is_set() else None

    @property
    def running(self) -> bool:
        return not self.exited.is_set()

    def start(self) -> None:
        """Start the command (a stopped one: call :meth:`stop` first); HookFailed if it
        cannot be started."""
        backend = self.backend
        command = backend.lock.backend_cmd
        env = dict(os.environ)
        env.update(backend.env())
        try:
            proc = subprocess.Popen(
                [sys.executable, "-I", "-S", _WATCH, str(os.getpid()), command],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        except OSError as e:
            raise HookFailed(f"backend {backend.label}: could not start its command: {e}") from e
        self.proc = proc
        self.pgid = proc.pid
        self.status = None
        self.started_at = time.monotonic()
        self.ready_at = None
        self.exited = Event()
        self._stopping = False
        self._known = {}
        self._scanned_at = 0.0
        self.ready_members = ()
        log.info("backend %s: started its command (process group %d)", backend.label, proc.pid)
        Step(_pass_on, (proc.stdout, backend.label), _closed).start()
        Step(proc.wait, (), self._ended).start()

    def _ended(self, status, error) -> None:
        # The watcher ended (it ends as the command did). Called in its waiting step: must not
        # block.
        if error is not None:  # pragma: no cover - wait() is not interrupted but at exit
            return
        self.status = status
        self.exited.set()
        if not self._stopping:
            self.backend._process_exited(status)

    def stop(self, timeout: float) -> None:
        """Stop the whole group: SIGTERM, then SIGKILL to what is left after ``timeout``
        seconds; return once no process of it is left. A stop under way is waited for."""
        if self.pgid is None:
            return
        if self._stop_done is not None:
            self._stop_done.wait()
            return
        done = self._stop_done = Event()
        pgid = self.pgid
        label = self.backend.label
        was_running = not self.exited.is_set()
        try:
            self._stopping = True
            _signal_group(pgid, signal.SIGTERM)
            if not self._gone_within(pgid, timeout):
                log.warning(
                    "backend %s: still running %gs after SIGTERM; killing its process group",
                    label,
                    timeout,
                )
                _signal_group(pgid, signal.SIGKILL)
                if not self._gone_within(pgid, 10.0):  # pragma: no cover - SIGKILL is quicker
                    log.error("backend %s: process group %d outlived SIGKILL", label, pgid)
            self.pgid = None
            if was_running and self.status is not None:
                log.info("backend %s: stopped (%s)", label, describe_status(self.status))
        finally:
            self._stop_done = None
            done.set()

    def _gone_within(self, pgid: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        looks = 0
        while True:
            if self.exited.is_set():
                if not _group_exists(pgid):
                    return True
                looks += 1
                if looks % 10 == 0 and not group_members(pgid):
                    return True  # nothing left but zombies, for someone else to reap
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            sleep(min(_POLL, left))

    def kill_rest(self) -> None:
        """SIGKILL what is left of a group whose command has ended (not waited for)."""
        if self.pgid is not None and self.exited.is_set():
            _signal_group(self.pgid, signal.SIGKILL)

    def found_ready(self) -> None:
        """The backend is ready: note when, and which processes of the group do its work
        then (the command's own and, say, the LibreOffice a unoserver started), for
        :meth:`main_ended`."""
        self.ready_at = time.monotonic()
        pgid = self.pgid
        if pgid is None:
            return
        self.ready_members = tuple(self._scan(pgid))

    def main_ended(self) -> bool:
        """Whether a process that was in the group when it became ready has ended (or is
        ending), although tcplock may not have heard yet: its connections close first, and a
        process the command started (LibreOffice under unoserver) may die while the command
        itself goes on answering, with errors. Cheap: one file read per such process."""
        if self.exited.is_set():
            return True
        pgid = self.pgid
        for pid in self.ready_members:
            stat = _stat(pid)
            # (Its sockets are closed while it exits, before it is a zombie: PF_EXITING says.)
            if stat is None or stat[0] in ("Z", "X") or stat[5] & _PF_EXITING or stat[1] != pgid:
                return True
        return False

    def _scan(self, pgid: int) -> Dict[int, tuple]:
        members = group_members(pgid)
        members.pop(pgid, None)
        self._known = dict.fromkeys(members)
        self._scanned_at = time.monotonic()
        return members

    def rss(self) -> Optional[int]:
        """The resident memory of the command's processes (the group, not counting the
        watcher), in bytes; None while it does not run."""
        pgid = self.pgid
        if pgid is None or self.exited.is_set():
            return None
        now = time.monotonic()
        total = 0
        if now - self._scanned_at >= RESCAN_INTERVAL:
            return sum(stat[2] for stat in self._scan(pgid).values()) * _PAGE
        for pid in list(self._known):
            stat = _stat(pid)
            if stat is None or stat[1] != pgid or stat[0] == "Z":
                del self._known[pid]
            else:
                total += stat[2] * _PAGE
        return total


def _pass_on(stream, label: str) -> None:
    """Log what a backend's command prints, line by line, until its last process closes its
    output, within a budget per second: at most :data:`OUTPUT_LINES_PER_SECOND` lines and
    :data:`OUTPUT_BYTES_PER_SECOND` bytes logged.

    Output is read in chunks of at most :data:`OUTPUT_CHUNK` bytes, and this yields after each
    chunk and each line it logs, so that a command that writes without pause (a read always
    finds data waiting, and never blocks) does not hold the loop. Once a second's budget is
    spent, what comes is dropped until the second is over, and read at most one chunk per
    :data:`OUTPUT_DRAIN_INTERVAL`: a flood costs a few reads a second-tenth, its writer waits
    on the full pipe in between, and the group's other processes still get their writes
    through. The number of dropped lines is logged (at WARNING) when the next second starts."""
    read = stream.read1
    pending = b""  # the start of a line whose end has not been read yet
    skipping = False  # a dropped line's end is still to come (it is counted when it comes)
    dropped = 0
    window_end = 0.0
    lines_left = bytes_left = 0
    while True:
        now = time.monotonic()
        if now >= window_end:
            if dropped:
                _note_dropped(label, dropped)
                dropped = 0
            window_end = now + 1.0
            lines_left, bytes_left = OUTPUT_LINES_PER_SECOND, OUTPUT_BYTES_PER_SECOND
        if not dropped:
            data = read(OUTPUT_CHUNK)
        else:  # a count to log when the second is over, even if nothing more comes
            data = None
            with Timeout(max(window_end - now, 0.001), False):
                data = read(OUTPUT_CHUNK)
            if data is None:
                continue
        if not data:
            if pending:
                if lines_left > 0 and len(pending) <= bytes_left:
                    _log_line(label, pending)
                else:
                    dropped += 1
            if dropped + skipping:
                _note_dropped(label, dropped + skipping)
            return
        if lines_left <= 0:  # over budget: dropped whole, and read again a while later
            dropped += data.count(b"\n")
            skipping = not data.endswith(b"\n")  # (each newline ended one dropped line)
            pending = b""
            sleep(max(min(OUTPUT_DRAIN_INTERVAL, window_end - time.monotonic()), 0.001))
            continue
        if skipping:
            end = data.find(b"\n")
            if end < 0:
                sleep(0)
                continue
            dropped += 1
            data = data[end + 1 :]
            skipping = False
        buf = pending + data if pending else data
        pos = 0
        while pos < len(buf):
            end = buf.find(b"\n", pos)
            if end < 0:
                if len(buf) - pos < MAX_LINE:
                    break  # the rest of the line is still to come
                end = pos + MAX_LINE - 1  # a longer line is logged in pieces
            if lines_left <= 0 or end + 1 - pos > bytes_left:
                # The budget is spent: the rest of the chunk is dropped, its lines counted.
                lines_left = 0
                dropped += buf.count(b"\n", pos)
                skipping = not buf.endswith(b"\n")
                pos = len(buf)
                break
            _log_line(label, buf[pos : end + 1])
            lines_left -= 1
            bytes_left -= end + 1 - pos
            pos = end + 1
            sleep(0)
        pending = buf[pos:]
        sleep(0)


def _log_line(label: str, line: bytes) -> None:
    text = line.decode("utf-8", "replace").rstrip("\r\n")
    output_log.info("backend %s: %s", label, text, extra={"backend": label})


def _note_dropped(label: str, count: int) -> None:
    output_log.warning(
        "backend %s: %d line%s of its output dropped (more than %d lines or %d bytes a second)",
        label,
        count,
        "" if count == 1 else "s",
        OUTPUT_LINES_PER_SECOND,
        OUTPUT_BYTES_PER_SECOND,
        extra={"backend": label},
    )


def _closed(result, error) -> None:
    if error is not None and not isinstance(error, (OSError, ValueError)):
        log.error("reading a backend's output failed", exc_info=error)


def probe(command: str, env: Mapping[str, str], limit: Optional[float]) -> Tuple[bool, str]:
    """Run ``command`` through the shell once (a readiness check): (True, "") if it exits
    with status 0 within ``limit`` seconds, else (False, why), with the last line it printed.
    It runs as a hook does (:func:`~tcplock.hooks.spawn_command`); if it runs too long or the
    wait is interrupted, its whole group is killed."""
    try:
        proc = spawn_command(command, env, subprocess.PIPE)
    except OSError as e:
        return False, f"could not start: {e}"
    try:
        output, _ = proc.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        return False, f"still running after {limit:g}s"
    except BaseException:
        kill_group(proc)
        raise
    if proc.returncode == 0:
        return True, ""
    lines = [x for x in output.decode("utf-8", "replace").splitlines() if x.strip()]
    last = lines[-1].strip()[:200] if lines else ""
    return False, describe_status(proc.returncode) + (f": {last}" if last else "")
