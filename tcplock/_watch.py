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
"""

import os
import signal
import sys

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36


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
    if code < 0:  # killed by a signal: end the same way
        return _die_by(-code)
    return code


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
