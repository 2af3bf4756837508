"""The first process of a supervised backend: runs its command and dies with tcplock.

Run by :mod:`tcplock.supervise` as ``python -I -S _watch.py TCPLOCK_PID COMMAND``, as the leader
of a new session and process group; it imports nothing but the standard library.

It runs ``/bin/sh -c COMMAND`` as its child, in its own process group, waits for it, and exits
as it did (with its status, or killed by the same signal), so that tcplock sees the command's
end as this process's end. Meanwhile:

- It asks the kernel for SIGTERM when tcplock dies (``PR_SET_PDEATHSIG``; the setting is not
  passed on to children, so the command's own processes could not be given it). If its parent
  is no longer tcplock when a SIGTERM comes, tcplock is gone (killed with SIGKILL, say), and
  it kills its whole process group with SIGKILL, itself included.
- Otherwise a SIGTERM is tcplock stopping the group: the command has it too, and this process
  waits for the command to end. One that comes before the command runs (tcplock stopping
  just after the start) means it is not run; one that comes while it is being run is
  passed on to it, which may have been too young to get it.
- It adopts what the command leaves behind (``PR_SET_CHILD_SUBREAPER``), and reaps it.

The group is never left without a process that reacts to tcplock's death. If other processes
of the group are still there when the command ends (a helper that ignores SIGTERM, or that is
slower to end), a *keeper* is forked before this process exits: it stays in the group, ignores
SIGTERM, and watches tcplock (a pidfd, or its start time in /proc); it kills the whole group
with SIGKILL as soon as tcplock is gone, and exits once it is the group's last live process.
tcplock itself ends the keeper with the rest of the group (its SIGKILL after the stop
timeout, or at once after a crash).
"""

import os
import select
import signal
import sys
import time

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
#: How often a keeper looks whether tcplock, and the rest of the group, are still there.
KEEPER_TICK = 0.05


def _prctl(option: int, value: int) -> bool:
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(option, value, 0, 0, 0) == 0
    except Exception:
        return False


def main() -> int:
    parent = int(sys.argv[1])
    command = sys.argv[2]

    stopped = []

    def on_term(_signum, _frame):
        if os.getppid() != parent:  # tcplock is gone: so is everything it started
            os.killpg(0, signal.SIGKILL)
        stopped.append(True)

    signal.signal(signal.SIGTERM, on_term)
    tcplock = _Parent(parent)
    if not _prctl(PR_SET_PDEATHSIG, signal.SIGTERM):
        print(
            "tcplock: no parent-death signal here: this backend may outlive a killed tcplock",
            file=sys.stderr,
            flush=True,
        )
    if os.getppid() != parent:  # tcplock died before the kernel was asked
        os.killpg(0, signal.SIGKILL)
    _prctl(PR_SET_CHILD_SUBREAPER, 1)
    # Python ignores SIGPIPE and SIGXFSZ; the command gets every signal at its default.
    defaults = {signal.SIGPIPE, signal.SIGXFSZ, signal.SIGTERM, signal.SIGINT}
    if stopped:  # stopped while starting: the command is not run at all
        return _die_by(signal.SIGTERM)
    try:
        child = os.posix_spawn("/bin/sh", ["sh", "-c", command], os.environ, setsigdef=defaults)
    except OSError as e:
        print(f"tcplock: cannot run /bin/sh: {e}", file=sys.stderr, flush=True)
        return 127
    if stopped:  # the stop came as it was being started: it may have missed it, so pass it on
        os.killpg(0, signal.SIGTERM)
    while True:
        try:
            pid, status = os.waitpid(-1, 0)
        except ChildProcessError:  # pragma: no cover - the command is our child until reaped
            return 0
        if pid == child:
            break
    code = os.waitstatus_to_exitcode(status)
    _leave_a_keeper(tcplock)
    if code < 0:  # killed by a signal: end the same way
        return _die_by(-code)
    return code


class _Parent:
    """tcplock, as a process this one can tell the end of, even once it is not its parent."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        try:
            self.fd = os.pidfd_open(pid)
        except (AttributeError, OSError):  # Python < 3.9 or Linux < 5.3: its start time
            self.fd = None
        # Read after the pidfd was opened: if tcplock is still the parent now, both are its.
        stat = _stat(pid)
        self.started = stat[3] if stat is not None and os.getppid() == pid else None

    def gone_within(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds; True once tcplock has ended."""
        if self.fd is not None:
            return bool(select.select([self.fd], [], [], timeout)[0])
        time.sleep(timeout)
        stat = _stat(self.pid)
        return stat is None or stat[0] == "Z" or stat[3] != self.started


def _stat(pid: int):
    """(state, process group, parent, start time) of a process, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
        fields = data[data.rindex(b")") + 2 :].split()
        return fields[0].decode(), int(fields[2]), int(fields[1]), int(fields[19])
    except (OSError, ValueError, IndexError):
        return None


def _others_in_group(pgid: int, me: int) -> list:
    """The live processes of the process group ``pgid`` but ``me`` (zombies left out)."""
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit() and int(name) != me:
            stat = _stat(int(name))
            if stat is not None and stat[1] == pgid and stat[0] != "Z":
                found.append(int(name))
    return found


def _still_in_group(pids: list, pgid: int) -> list:
    alive = []
    for pid in pids:
        stat = _stat(pid)
        if stat is not None and stat[1] == pgid and stat[0] != "Z":
            alive.append(pid)
    return alive


def _leave_a_keeper(tcplock: _Parent) -> None:
    """The command has ended: if the group has other processes, fork a keeper that stays
    with them (see the module's docstring)."""
    pgid = os.getpgid(0)
    if not _others_in_group(pgid, os.getpid()):
        return
    # No SIGTERM while forking: the keeper must not run this process's handler (its parent
    # is not tcplock, which the handler takes for tcplock's death).
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        pid = os.fork()
    except OSError as e:
        print(f"tcplock: cannot fork a keeper for the group: {e}", file=sys.stderr, flush=True)
        pid = -1
    if pid != 0:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
        return
    try:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
        me = os.getpid()
        members = _others_in_group(pgid, me)
        while members:
            if tcplock.gone_within(KEEPER_TICK):
                os.killpg(pgid, signal.SIGKILL)
            members = _still_in_group(members, pgid) or _others_in_group(pgid, me)
    finally:
        os._exit(0)


def _die_by(signum: int) -> int:
    """End as killed by ``signum`` (without a core dump of this process)."""
    import resource

    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    try:
        signal.signal(signum, signal.SIG_DFL)
    except (OSError, ValueError):  # SIGKILL: always at its default
        pass
    os.kill(os.getpid(), signum)
    return 128 + signum  # pragma: no cover - a signal that does not kill (SIGSTOP, say)


if __name__ == "__main__":
    sys.exit(main())
