"""Hooks: the operator's code that runs between clients.

What it owns: turning a hook (a Python callable, or a shell command from the CLI) into one call
that either returns or raises :class:`HookFailed`, within a time limit. The rule it keeps: a hook
can fail or hang, but it can never take the lock down with it — its failure is reported to the
caller as one exception, and a command that outlives its limit is killed with its whole process
group. No command outlives tcplock, even one killed outright: each is made known, as it
starts, to tcplock's *reaper* (see :class:`Reaper`), which kills its group if tcplock dies
while it runs.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from typing import Callable, Mapping, Optional

import gevent
from gevent import subprocess

__all__ = [
    "HookFailed",
    "CommandHook",
    "call_hook",
    "run_command",
    "spawn_command",
    "kill_group",
    "describe_status",
]

log = logging.getLogger(__name__)

_WATCH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_watch.py")


class HookFailed(Exception):
    """A hook raised, exited with a non-zero status, or ran past its time limit.

    The fault is the hook's (the operator's configuration), never the client's or tcplock's.
    """


def call_hook(name: str, hook: Callable, arg, timeout: Optional[float]) -> None:
    """Call ``hook(arg)``; turn any exception, or running past ``timeout``, into HookFailed.

    A Python hook is interrupted at its next cooperative blocking point once the time is up; a
    hook that spins on the CPU without yielding cannot be interrupted (nor can anything else in
    a gevent process).
    """
    timer = gevent.Timeout(timeout) if timeout else None
    if timer is not None:
        timer.start()
    try:
        hook(arg)
    except gevent.Timeout as t:
        if t is not timer:  # a timeout of the hook's own that it let expire: its failure
            raise HookFailed(f"{name} hook raised Timeout: {t}") from None
        raise HookFailed(f"{name} hook ran longer than {timeout:g}s and was stopped") from None
    except HookFailed:
        raise
    except Exception as e:
        raise HookFailed(f"{name} hook raised {type(e).__name__}: {e}") from e
    finally:
        if timer is not None:
            timer.close()


def run_command(command: str, env: Mapping[str, str], name: str = "hook") -> None:
    """Run ``command`` through the shell; raise HookFailed unless it exits with status 0.

    The command's output goes to tcplock's standard error (the journal, under systemd), so a
    chatty command costs memory nowhere and stalls only itself if that stream is slow. It runs
    in a session of its own: if the wait is interrupted (the hook's time limit, shutdown), the
    whole group it started is killed; anything it deliberately leaves running after a normal exit
    (a restarted daemon) is left alone.
    """
    # What was logged before the command comes before what it prints (the log may be written
    # in batches; the command writes to the same standard error directly).
    for handler in logging.getLogger().handlers:
        try:
            handler.flush()
        except Exception:  # pragma: no cover - a broken handler must not stop the hook
            pass
    try:
        proc = spawn_command(command, env, 2)
    except OSError as e:
        raise HookFailed(f"{name} hook could not start: {e}") from e
    try:
        status = proc.wait()
    except BaseException:
        kill_group(proc)
        raise
    if status != 0:
        raise HookFailed(f"{name} hook {describe_status(status)}")


def spawn_command(command: str, env: Mapping[str, str], output) -> subprocess.Popen:
    """Start ``command`` through the shell, in a session and process group of its own, its
    standard input empty, its output (both streams) to ``output`` (a descriptor, or
    ``subprocess.PIPE``); the group is made known to the reaper. OSError if it cannot start.
    The caller waits for it, and kills its group (:func:`kill_group`) if the wait is cut."""
    reaper.start()  # before the command: the pipe keeps what is written while it starts
    proc = subprocess.Popen(
        command,
        shell=True,
        env=dict(env),
        stdin=subprocess.DEVNULL,
        stdout=output,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    reaper.watch(proc.pid)
    return proc


class Reaper:
    """The process that kills the groups of tcplock's running commands if tcplock dies
    (``_watch.py --reap``; what it does is told there). One per process, started with the first
    command; it ends when this process does (its pipe's end of file), however it ends.

    Each command costs tcplock one write of a few bytes to a pipe: its group's id. The write
    never blocks: if the pipe is full (a reaper that stopped reading), that command is run
    without the reaper's watch, and an error is logged. A reaper that has died is started again
    by the next command.
    """

    def __init__(self) -> None:
        self._fd = None  # our end of the pipe (non-blocking; no child inherits it)
        self._proc = None
        self._stalled = False

    def start(self) -> None:
        """Start the reaper unless one runs. (One that has died is replaced here once the
        loop has heard of its end; until then, at the next write, which finds its pipe
        closed.)"""
        if self._fd is not None and self._proc.returncode is not None:
            self._close()
        if self._fd is None:
            self._start()

    def watch(self, pgid: int) -> None:
        """Have the reaper kill the group ``pgid`` (whose leader has just been started) if
        tcplock dies while its leader runs."""
        line = b"%d\n" % pgid
        for _attempt in (1, 2):
            if self._fd is None and not self._start():
                return
            try:
                os.write(self._fd, line)
                self._stalled = False
                return
            except BlockingIOError:
                if not self._stalled:  # once until it reads again
                    self._stalled = True
                    log.error("the reaper is not reading: commands may outlive a killed tcplock")
                return
            except OSError:  # it has died: start another
                self._close()
        log.error("no reaper: process group %d may outlive tcplock", pgid)

    def _start(self) -> bool:
        try:
            read_end, write_end = os.pipe()
        except OSError as e:
            log.error("cannot start the reaper (commands may outlive a killed tcplock): %s", e)
            return False
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-I", "-S", _WATCH, "--reap", str(os.getpid())],
                stdin=read_end,
                stdout=subprocess.DEVNULL,
                start_new_session=True,
            )
        except OSError as e:
            os.close(write_end)
            log.error("cannot start the reaper (commands may outlive a killed tcplock): %s", e)
            return False
        finally:
            os.close(read_end)
        os.set_blocking(write_end, False)
        self._fd = write_end
        return True

    def _close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


#: This process's reaper.
reaper = Reaper()


def kill_group(proc) -> None:
    """SIGKILL to the process group ``proc`` leads, and wait for ``proc``."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except OSError:
        pass
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL does not take this long
        log.error("hook process %d did not die after SIGKILL", proc.pid)


class CommandHook:
    """A shell command used as a hook: called with the connection, given its context in the
    environment (see :meth:`tcplock.connection.Connection.hook_env`)."""

    def __init__(self, command: str, name: str) -> None:
        self.command = command
        self.name = name

    def __call__(self, conn, extra: Optional[Mapping[str, str]] = None) -> None:
        env = dict(os.environ)
        if conn is not None:  # (a restart run with no connection holding the backend)
            env.update(conn.hook_env())
        env["TCPLOCK_EVENT"] = self.name
        env.update(extra or {})
        run_command(self.command, env, self.name)

    def __repr__(self) -> str:
        return f"CommandHook({self.command!r}, name={self.name!r})"


def describe_status(status: int) -> str:
    """A process's end as a returncode tells it: ``exited with status 3`` or ``was killed by
    SIGKILL``."""
    if status >= 0:
        return f"exited with status {status}"
    try:
        name = signal.Signals(-status).name
    except ValueError:
        name = f"signal {-status}"
    return f"was killed by {name}"
