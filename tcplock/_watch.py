"""The processes that make tcplock's commands die with it, however it dies.

Two modes, each run as ``python -I -S _watch.py ...`` in a session of its own; this file imports
nothing but the standard library.

``_watch.py TCPLOCK_PID COMMAND`` (by :mod:`tcplock.supervise`): the first process of a
supervised backend's group, described below.

``_watch.py --reap TCPLOCK_PID`` (by :mod:`tcplock.hooks`): the *reaper*, one per tcplock
process, for the short-lived commands (hooks, readiness commands), which each lead a process
group of their own. tcplock writes the group's id to the reaper's standard input, a pipe, as
each is started (one line, ``PGID\n``). The reaper holds a pidfd of each group's leader and
forgets the group when the leader ends (a command that ended is tcplock's to have waited for,
and what it left running on purpose is left alone). When tcplock is gone (the pipe's end of
file: tcplock's end of it is held by tcplock alone; or tcplock's pidfd), it kills with SIGKILL
every group whose leader still runs, and exits. tcplock stopping normally ends the same way:
its end of the pipe closes with it. It ignores SIGTERM and SIGINT: only tcplock's end ends it.
A group is taken only while its leader still leads it: a pid read from the pipe that already
names no process, a zombie, or one leading no group of its own, is not a live command of
tcplock's (it ended before it was read).

The watcher of a supervised backend:

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

import errno
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
    if sys.argv[1] == "--reap":
        return reap(int(sys.argv[2]))
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


def reap(parent: int) -> int:
    """The reaper (see the module's docstring): reads group ids from standard input until
    tcplock is gone, then kills the groups whose leader still runs."""
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, signal.SIG_IGN)
    tcplock = _Parent(parent)
    groups = {}  # pgid -> _Group, for the groups whose leader still runs
    by_fd = {}  # a leader's pidfd -> its pgid
    poller = select.poll()
    poller.register(0, select.POLLIN)
    if tcplock.fd is not None:
        poller.register(tcplock.fd, select.POLLIN)
    pending = [b""]

    def read() -> bool:
        """Take in what tcplock wrote; False at the end of file."""
        data = os.read(0, 4096)
        *lines, pending[0] = (pending[0] + data).split(b"\n")
        for line in lines:
            group = _Group.of(int(line))
            if group is not None:
                _forget(groups.pop(group.pgid, None), poller, by_fd)
                groups[group.pgid] = group
                if group.fd is not None:
                    by_fd[group.fd] = group.pgid
                    poller.register(group.fd, select.POLLIN)
        return bool(data)

    gone = False
    while not gone:
        # Without pidfds (Linux < 5.3), ends are found by looking at /proc every tick.
        polling = tcplock.fd is None or any(g.fd is None for g in groups.values())
        for fd, _events in poller.poll(KEEPER_TICK * 1000 if polling else None):
            if fd == 0:
                gone = gone or not read()
            elif fd == tcplock.fd:
                gone = True
            elif fd in by_fd:
                _forget(groups.pop(by_fd[fd]), poller, by_fd)
        if polling:
            for group in [g for g in groups.values() if g.fd is None and not g.leads()]:
                del groups[group.pgid]
            gone = gone or (tcplock.fd is None and tcplock.gone_within(0))
    # What tcplock wrote just before it died may not have been read yet.
    os.set_blocking(0, False)
    try:
        while read():
            pass
    except BlockingIOError:  # a copy of tcplock's end lives on elsewhere: what is there is read
        pass
    for group in groups.values():
        if group.leads():
            try:
                os.killpg(group.pgid, signal.SIGKILL)
            except OSError:
                pass
    return 0


class _Group:
    """A command's process group, known by its leader (a pidfd of it where there are pidfds,
    else its start time)."""

    def __init__(self, pgid: int, fd, started) -> None:
        self.pgid = pgid
        self.fd = fd
        self.started = started

    @classmethod
    def of(cls, pgid: int):
        """The group ``pgid`` if its leader is alive and leads it, else None."""
        try:
            fd = os.pidfd_open(pgid)
        except AttributeError:  # Python < 3.9
            fd = None
        except OSError as e:
            if e.errno == errno.ESRCH:  # ended, and reaped, already
                return None
            fd = None  # Linux < 5.3
        stat = _stat(pgid)
        group = cls(pgid, fd, stat[3] if stat is not None else None)
        # Read after the pidfd was opened: if its process still runs now, the stat was its.
        if stat is None or stat[0] == "Z" or stat[1] != pgid or not group.leads():
            if fd is not None:
                os.close(fd)
            return None
        return group

    def leads(self) -> bool:
        """Whether the leader still runs (so the group is still the command's)."""
        if self.fd is not None:
            return not select.select([self.fd], [], [], 0)[0]
        stat = _stat(self.pgid)
        return stat is not None and stat[0] != "Z" and stat[3] == self.started


def _forget(group, poller, by_fd) -> None:
    if group is not None and group.fd is not None:
        poller.unregister(group.fd)
        del by_fd[group.fd]
        os.close(group.fd)


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
