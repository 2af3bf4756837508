"""A backend: the service behind the lock, how to reach it, and when to restart it.

What it owns: the backend's address and the one routine that connects to it (:class:`Connect`,
driven by the event loop, for clients and readiness checks alike), its operational and admin
states with the cause of each change (set only through :meth:`Backend.note`, against
:data:`TRANSITIONS`), its own settings, its restart policy and its counters, and, for a backend
that tcplock runs
itself (``backend_cmd``), when its process is started, restarted and checked (the process
group itself is :class:`~tcplock.supervise.BackendProcess`'s). The rule it keeps: once a
restart is due, no new client reaches the backend; the restart runs while the last connection
using it still holds its slot (or with none held), and nobody is let in until the backend is
ready again. A restart is a :class:`Restart` moved on, one short step at a time, by
:meth:`Backend.reconcile`, which compares what the backend is with what it should be; the
first start of a supervised backend, and its start after a crash, take the same path. A check
of a backend and a client never have it at once.

A single backend is a pool of one: the lock asks its backends whether they are open to the
queue, never a fixed address.
"""

from __future__ import annotations

import _socket
import errno
import inspect
import logging
import os
import sys
import time
from typing import Callable, Optional, Tuple

import gevent
from gevent import GreenletExit, socket
from gevent.event import AsyncResult

from .hooks import CommandHook, HookFailed, call_hook, describe_status
from .peer import PeerCheck
from .proxyproto import make_v1, make_v2
from .settings import PER_BACKEND, format_size
from .steps import Step
from .supervise import BackendProcess, probe

__all__ = [
    "Backend", "Connect", "format_address", "UP", "DOWN", "RESTARTING", "STARTING", "STANDBY",
    "ENABLED", "DRAINING", "LEAVING", "TRANSITIONS",
]  # fmt: skip

log = logging.getLogger("tcplock.server")

# A backend's operational state: what it is.
UP = "up"  # ready, and taking clients
STANDBY = "standby"  # ready, kept out of service to take the place of one that restarts
DOWN = "down"  # connecting to it failed, or a start or restart of it was abandoned
RESTARTING = "restarting"  # a restart is due or running
STARTING = "starting"  # a supervised backend's first start
# Its admin state: what the operator (or a reload) wants of it.
ENABLED = "enabled"
DRAINING = "draining"  # finishes its clients, takes no new ones, until enabled
LEAVING = "leaving"  # left out of the pool by a reload: finishes its clients, then goes

#: Every change of operational state a backend may make (from, to); each is recorded with
#: its cause (:attr:`Backend.cause`), any other is a bug (RuntimeError).
TRANSITIONS = frozenset(
    {
        (UP, STARTING),  # a supervised backend's command starts (with tcplock, or joining)
        (STARTING, UP), (STARTING, STANDBY), (STARTING, DOWN),
        (UP, RESTARTING), (UP, DOWN), (UP, STANDBY),
        (STANDBY, UP), (STANDBY, RESTARTING), (STANDBY, DOWN),
        (RESTARTING, UP), (RESTARTING, STANDBY), (RESTARTING, DOWN),
        (DOWN, UP), (DOWN, STANDBY), (DOWN, RESTARTING),
    }
)  # fmt: skip
#: The cause a restart is recorded with, by its reason.
_RESTART_CAUSE = {"count": "restart-every", "ttl": "ttl", "rss": "rss", "crash": "crashed"}

_IN_PROGRESS = frozenset({errno.EINPROGRESS, errno.EAGAIN, errno.EWOULDBLOCK})
# Where the platform has it, a backend socket is made non-blocking by socket() itself.
_NONBLOCK = getattr(_socket, "SOCK_NONBLOCK", 0)

_RESTART_WHY = {
    "count": "after the set number of uses",
    "ttl": "after a connection timed out",
    "rss": "over its memory limit",
    "crash": "its command ended",
}
#: How often a ready command is tried while waiting for a backend to be ready.
READY_INTERVAL = 0.5
#: A supervised backend that was ready this long before its command ended starts again after
#: the first pause; one that ends sooner waits twice as long as the time before, up to 30 s.
STABLE_AFTER = 30.0


def format_address(addr) -> str:
    """``host:port``, with IPv6 hosts in brackets."""
    host, port = addr[0], addr[1]
    if ":" in host:
        return f"[{host}]:{port}"
    return f"{host}:{port}"


class Backend:
    """One backend service, as ``(host, port)``, and a unit of the lock's gate (its slots).

    ``lock`` is what the backend needs of the lock that uses it: its settings (``slots``,
    ``restart``, ``hook_timeout``, ``ready_timeout``, ``restart_retry_delay``,
    ``check_interval``, ``connect_timeout``), ``draining``, and ``_sync_gate()`` to open or
    close the backend to the queue as its state changes.
    """

    def __init__(
        self, address: Tuple[str, int], lock, index: int = 1, settings: Optional[dict] = None
    ) -> None:
        self._addrinfo: Optional[list] = None
        self.address = address
        #: Its place in the order given, from 1.
        self.index = index
        self.lock = lock
        #: Its own settings, ``{attr: value}``, as its ``--backend`` value gives them (checked
        #: by the settings table); the others are the lock's (:meth:`apply_settings`).
        self.settings: dict = dict(settings or {})
        #: How many clients it takes at once (its own ``slots``, or the lock's), how many hold
        #: one of its slots now (kept by the gate), whether it takes new clients now (kept by
        #: the lock), and when a slot of it was last taken or given back (the gate prefers the
        #: one idle longest).
        self.slots = lock.slots
        self.apply_settings()
        self.held = 0
        self.open = True
        self.last_used = 0.0
        #: False once connecting to it failed, until a check finds it answering again.
        self.up = True
        #: Whether it has been ready since tcplock started: a supervised backend once its
        #: first start is done, another once a check found it answering (the first runs at
        #: start). Until then /healthz does not count it as up, whatever ``up`` says.
        self.been_ready = False
        #: Set by the operator: it finishes its clients and takes no new ones.
        self.draining = False
        #: Taken out of the pool (TCPLock.set_backends): it finishes its clients and takes no
        #: new ones, then leaves the pool.
        self.leaving = False
        #: Why a restart is due or running (``"count"``, ``"ttl"``), None otherwise.
        self.restart_reason: Optional[str] = None
        #: The restart under way (:class:`Restart`), or None (stop() cuts one no connection
        #: holds).
        self.restart_step: Optional[Restart] = None
        #: The operational state (:data:`TRANSITIONS`) and the admin state, and what made the
        #: last change of either (``restart-every``, ``crashed``, ``drain request``, ...).
        self.operational = UP
        self.admin = ENABLED
        self.cause: Optional[str] = None
        #: Clients let through since the last restart.
        self.since_restart = 0
        self.activations = 0
        #: Restarts done, and restart attempts that failed.
        self.restarts = 0
        self.restart_failures = 0
        #: How the latest connection that used it ended.
        self.last_end: Optional[str] = None
        self.peer_check = PeerCheck()
        self._checks = None  # the timer of the down-backend check
        self._check = None  # a check under way: a Connect, or a Step running the ready command
        #: The process group running it, if tcplock runs it (``backend_cmd``).
        self.process: Optional[BackendProcess] = (
            BackendProcess(self) if lock.backend_cmd is not None else None
        )
        #: The pause before a supervised backend whose command ended is started again.
        self.crash_delay = lock.restart_retry_delay
        # A backend tcplock does not run takes no client until its first check has answered
        # (up or down), so that it never sees the check's connection and a client's at once.
        self._first_check_due = self.process is None
        self.open = not self._first_check_due

    def apply_settings(self) -> None:
        """Take each per-backend setting from its own settings, or else from the lock's."""
        for setting in PER_BACKEND.values():
            attr = setting.attr
            setattr(self, attr, self.settings.get(attr, getattr(self.lock, attr)))

    @property
    def address(self) -> Tuple[str, int]:
        """Where it listens, as (host, port)."""
        return self._address

    @address.setter
    def address(self, address) -> None:
        self._address = (address[0], int(address[1]))
        #: ``host:port`` (``[v6]:port``), as logs, status and metrics name it.
        self.label = format_address(self._address)
        self._addrinfo = None

    @property
    def state(self) -> str:
        """Its admin state if that is not ``enabled`` (``leaving``, ``draining``), else its
        operational state (``starting``, ``restarting``, ``down``, ``standby``, ``up``)."""
        return self.operational if self.admin is ENABLED else self.admin

    @property
    def standby(self) -> bool:
        """Whether it is a ready standby, kept out of service (``--spares``)."""
        return self.operational is STANDBY

    def _operational_now(self, standby: bool) -> str:
        reason = self.restart_reason
        if reason == "start":
            return STARTING
        if reason is not None:
            return RESTARTING
        if not self.up:
            return DOWN
        return STANDBY if standby else UP

    def note(self, cause: str, standby: Optional[bool] = None) -> None:
        """Record a change of its facts (``up``, ``restart_reason``, ``draining``,
        ``leaving``) as a change of state, made by ``cause``: the one place its operational and
        admin states are set. ``standby``: whether, ready, it is to stand by (the lock decides,
        :meth:`TCPLock._standby_wanted`); by default a standby stays one."""
        if standby is None:
            standby = self.operational is STANDBY
        new = self._operational_now(standby)
        admin = LEAVING if self.leaving else DRAINING if self.draining else ENABLED
        if new != self.operational:
            if (self.operational, new) not in TRANSITIONS:
                raise RuntimeError(
                    f"backend {self.label}: no transition from {self.operational} to {new}"
                )
            log.debug("backend %s: %s -> %s (%s)", self.label, self.operational, new, cause)
            self.operational = new
            self.cause = cause
        if admin != self.admin:
            self.admin = admin
            self.cause = cause

    @property
    def ready(self) -> bool:
        """Up, or a standby: ready for clients, and taking them if it is not a standby."""
        return self.up and self.restart_reason is None

    def status(self) -> dict:
        process = self.process
        return {
            "address": self.label,
            "slots": self.slots,
            "active": self.held,
            "state": self.state,
            "operational": self.operational,
            "admin": self.admin,
            "cause": self.cause,
            "standby": self.operational == STANDBY,
            "activations": self.activations,
            "restarts": self.restarts,
            "restart_failures": self.restart_failures,
            "last_end": self.last_end,
            "pid": process.pid if process is not None else None,
            "rss_bytes": process.rss() if process is not None else None,
        }

    def env(self) -> dict:
        """What a command run for this backend finds in its environment."""
        return {
            "TCPLOCK_BACKEND": self.label,
            "TCPLOCK_BACKEND_HOST": str(self.address[0]),
            "TCPLOCK_BACKEND_PORT": str(self.address[1]),
            "TCPLOCK_BACKEND_INDEX": str(self.index),
        }

    def close(self) -> None:
        self._stop_checks()
        self.peer_check.close()

    # -- up and down -------------------------------------------------------------------------

    def mark_down(self, error) -> None:
        """Connecting (or a check) failed: take no clients while another backend is up, and
        check it every ``check_interval`` until it answers."""
        if not self.up:
            return
        self.up = False
        self.note("connect failed")
        log.warning(
            "backend %s is down (%s); checking it every %gs",
            self.label,
            getattr(error, "strerror", None) or error,
            self.lock.check_interval,
        )
        interval = self.lock.check_interval
        self._checks = self.lock.loop.timer(interval, interval)
        self._checks.start(self._check_now)

    def mark_up(self) -> None:
        was_ready, self.been_ready = self.been_ready, True
        # Known to answer: a first check still due has nothing left to wait for.
        first, self._first_check_due = self._first_check_due, False
        if self.up:
            if first:
                self.lock._sync_gate()
            return
        self.up = True
        self.note("answers again", standby=self.lock._standby_wanted(self))
        self._stop_checks()
        log.warning(
            "backend %s is up%s%s",
            self.label,
            " again" if was_ready else "",
            " (standby)" if self.standby else "",
        )
        self.lock._sync_gate()

    def check_first(self) -> None:
        """When tcplock starts (or it joins the pool): a backend tcplock does not run is
        checked at once, as one that is down is; if the check fails, it is down, and checked
        every ``check_interval`` until it answers."""
        if self.process is None and not self.been_ready and self._check is None:
            self._check_now()

    @property
    def checking(self) -> bool:
        """Whether a check of it runs now, or (a backend tcplock does not run) its first is
        still due: no client is let in to it meanwhile."""
        return self._check is not None or self._first_check_due

    def _check_now(self) -> None:
        # A check and a client never have the backend at once: no check starts while a client
        # holds it (that client's own connection tells: one that connects marks it up), and
        # none is let in while a check runs (TCPLock._update_open).
        if self._check is not None or self.held:
            return
        lock = self.lock
        if lock.ready_cmd is not None:
            limit = lock.ready_timeout or lock.check_interval
            args = (lock.ready_cmd, self._command_env(), limit)
            check = self._check = Step(probe, args, self._probed)
        else:
            # One round of its addresses: a backend that refuses is down at once (a first
            # check holds clients back until it answers), and is tried again at the next
            # interval.
            limit = min(lock.check_interval, lock.connect_timeout)
            check = self._check = Connect(self, time.monotonic() + limit, self._checked, _one_round)
        check.start()
        if self._check is not None:  # (a refusal on loopback has answered already)
            lock._sync_gate()

    def _checked(self, sock, error) -> None:
        self._check = None
        if sock is not None:
            self.close_check(sock)
            self.mark_up()
        else:
            self.mark_down(error)  # nothing more if it is down already
        self._check_done()

    def _probed(self, result, error) -> None:
        if isinstance(error, GreenletExit):
            return  # cut by _stop_checks: it has nothing to tell
        self._check = None
        if result is not None and result[0]:
            self.mark_up()
        else:
            self.mark_down(f"not ready: {result[1]}" if result is not None else error)
        self._check_done()

    def _check_done(self) -> None:
        # The check is over, its connection closed: clients may reach the backend again.
        self._first_check_due = False
        self.lock._sync_gate()

    def close_check(self, sock) -> None:
        """Close a check's connection. A backend sent PROXY headers is sent one first,
        naming the check connection's own two ends (the protocol's advice for health checks),
        so that it sees a well-formed connection rather than a broken one."""
        lock = self.lock
        if lock.send_proxy or lock.send_proxy_v2:
            make = make_v2 if lock.send_proxy_v2 else make_v1
            try:
                sock.send(make(sock.getsockname(), sock.getpeername()))
            except (OSError, ValueError):
                pass  # a check only asks whether it accepts: it did
        sock.close()

    def _stop_checks(self) -> None:
        if self._checks is not None:
            self._checks.stop()
            self._checks.close()
            self._checks = None
        if self._check is not None:
            self._check.cancel()
            self._check = None

    # -- use and restart policy ------------------------------------------------------------------

    def used(self) -> None:
        """A client is let through: count it, and call for a restart once it is the K-th (or,
        with standbys, the first after that when the restart leaves the pool no shorter: see
        :meth:`TCPLock._standby_coming`)."""
        self.activations += 1
        self.since_restart += 1
        every = self.lock.restart_every
        if every and self.since_restart >= every and not self.lock._standby_coming(self):
            self.request_restart("count")

    def request_restart(self, reason: str) -> None:
        """Call for a restart: no new client reaches this backend until it is done."""
        if self.lock.restart is None and self.process is None:
            return
        if self.restart_reason is not None:
            if reason in ("ttl", "crash") and self.restart_step is None:
                self.restart_reason = reason  # the more telling reason, for the command
                if self.operational == RESTARTING:
                    self.cause = _RESTART_CAUSE[reason]
            return
        self.restart_reason = reason
        self.note(_RESTART_CAUSE.get(reason, reason))
        self.lock._sync_gate()
        self.reconcile()  # with no slot held, it starts now

    def after_use(self) -> None:
        """A connection that held this backend ends: a supervised backend whose command has
        just ended, or lost a process it had when it became ready (LibreOffice under
        unoserver), is to be started again (its connection may close before tcplock hears of
        the end), and one over its memory limit restarted, before its next client."""
        process = self.process
        if process is None or self.restart_reason is not None:
            return
        if process.main_ended():
            self._lost_a_process()
            return
        limit = self.lock.restart_above_rss
        if limit is None:
            return
        rss = process.rss()
        if rss is not None and rss > limit:
            log.warning(
                "backend %s uses %s (process group %d), more than its limit of %s: restarting "
                "it before its next client",
                self.label,
                format_size(rss),
                process.pgid,
                format_size(limit),
            )
            self.request_restart("rss")

    def check_process(self) -> None:
        """Once a second (the lock's sweep): a supervised backend that is up and that no
        client holds, whose group lost a process it had when it became ready, is started
        again before its next client."""
        process = self.process
        if (
            process is None
            or self.held
            or not self.up
            or self.restart_reason is not None
            or not process.main_ended()
        ):
            return
        self._lost_a_process()

    def _lost_a_process(self) -> None:
        log.warning(
            "backend %s: a process of its group has ended; starting it again before its next "
            "client",
            self.label,
        )
        self.up = False
        self.note("crashed")
        self.request_restart("crash")  # the command's own exit, if it comes, is logged too

    # -- a backend tcplock runs ----------------------------------------------------------------

    def start_process(self) -> None:
        """Start a supervised backend's command (when tcplock starts, or it joins the pool):
        as a restart with nothing to stop, so that no client reaches it before it is ready.
        Another backend is checked instead (:meth:`check_first`)."""
        if self.process is None:
            return self.check_first()
        if self.restart_reason is not None:
            return
        self.restart_reason = "start"
        self.note("start")
        self.lock._sync_gate()
        self.reconcile()

    def _process_exited(self, status: int) -> None:
        """The command ended by itself (tcplock did not stop it): the backend is down, and is
        started again once its connections have ended, after a pause that grows while it
        keeps ending."""
        lock = self.lock
        log.warning("backend %s: its command %s", self.label, describe_status(status))
        # What it left in its group has lost its watcher: killed now, it cannot outlive a
        # tcplock that dies before the restart (the pause before it lasts up to 30 s).
        self.process.kill_rest()
        if lock._stopping:
            return  # stop() stops what is left of the group
        self.up = False
        self.note("crashed")
        self._stop_checks()
        if self.restart_step is not None:
            return  # a start under way: its wait for ready sees the end, and it tries again
        if self.leaving:  # leaving the pool: not started again; it goes once its clients end
            lock._sync_gate()
            return
        self.request_restart("crash")
        # A client given this backend as it died waits again, at the head of the queue,
        # rather than for connect_timeout; the restart runs once no client holds it.
        for conn in lock.active:
            if conn.backend is self:
                conn.back_to_queue()

    # -- restarts: one reconcile step drives them ----------------------------------------------

    def last_holder(self) -> bool:
        """Whether every other slot of this backend is free, and no restart runs yet: then the
        caller, holding the last slot, is to run it."""
        return self.held == 1 and self.restart_step is None

    def restart_now(self, conn, then: Callable[[], object]) -> Restart:
        """The due restart, to :meth:`~Restart.start` while ``conn`` holds the last slot in
        use; it retries until it succeeds or tcplock stops. Then ``then()`` (the holder's own
        next step), and the queue moves again."""
        restart = self.restart_step = Restart(self, conn, then)
        return restart

    def reconcile(self) -> None:
        """Compare what this backend is with what it should be, and take the next step: the
        one place a restart (or a supervised backend's start) moves on, run again whenever a
        step of it ends or something about the backend changes.

        A backend whose restart is due (``restart_reason``) should be running and ready. Its
        last holder starts the restart as it ends (:meth:`restart_now`, its slot held
        meanwhile); with no slot held (its clients went to another backend, or it is idle) it
        starts here. A restart under way takes its steps in order, each a short
        :class:`~tcplock.steps.Step`: a pause (before a crashed backend is started again,
        and before each new attempt), the stop of what runs (the process group, or the restart
        hook), the start of the command, the wait until it is ready. Before each step it is
        abandoned if tcplock stops, or, after a failed attempt, if the backend is leaving the
        pool (it may be gone for good)."""
        restart = self.restart_step
        if restart is None:
            if self.restart_reason is None or self.held or self.lock._stopping:
                return
            restart = self.restart_step = Restart(self, None, None)
        if restart.step is not None or restart.over:
            return  # the step under way reconciles again as it ends
        why = self._not_to_go_on(restart)
        if why is not None:
            log.warning("%s abandoned (backend %s): %s", restart.what, self.label, why)
            return self._restart_over(restart, False)
        restart.take_next_step()

    def _not_to_go_on(self, restart: Restart) -> Optional[str]:
        """Why ``restart`` is to be abandoned rather than take its next step, or None: the
        one rule, asked before each step and after a failed attempt."""
        if self.lock.draining:
            return "tcplock is stopping"
        if restart.failed and self.leaving:  # no client is coming for it: let it leave
            return "it is leaving the pool"
        return None

    def _restart_over(self, restart: Restart, ok: bool) -> None:
        """The restart is over: done (``ok``) or abandoned. The backend opens again (or stands
        by), ``then()`` runs, and the queue moves."""
        restart.over = True
        if ok:
            self.since_restart = 0
            if self.process is not None:
                self.process.found_ready()
                self._stop_checks()
                self.up = True
                self.been_ready = True
        reason = self.restart_reason
        self.restart_reason = None
        self.restart_step = None
        if ok:
            self.note(
                "started" if reason == "start" else "restarted",
                standby=self.lock._standby_wanted(self),
            )
            if self.standby:
                log.info("backend %s is ready as a standby", self.label)
        else:
            self.note("abandoned")
        if restart.then is not None:
            restart.then()
        self.lock._sync_gate()

    def _stop_for_restart(self, conn, reason: str) -> None:
        """A restart's first step: stop the supervised process group, or run the restart hook
        (which restarts the service its own way)."""
        process = self.process
        if process is not None:
            process.stop(self.lock.stop_timeout)
            return
        hook = self.lock.restart
        timeout = self.lock.hook_timeout
        if hook is None:
            return  # taken away while due: nothing to run
        if isinstance(hook, CommandHook):
            extra = {"TCPLOCK_RESTART_REASON": reason, "TCPLOCK_RESTARTS": str(self.restarts)}
            extra.update(self.env())
            call_hook("restart", lambda c: hook(c, extra), conn, timeout)
        else:
            # In a greenlet of its own, waited for: a gevent.Timeout the hook leaves running
            # dies with it, and cannot cut the readiness wait or the retry that follow here.
            # The failure is returned, not raised: gevent prints a traceback for a greenlet
            # that dies raising, and a failed hook is one log line.
            call = (lambda r: hook(r, self)) if _takes_backend(hook) else hook

            def run():
                try:
                    call_hook("restart", call, reason, timeout)
                except HookFailed as e:
                    return e
                return None

            runner = gevent.spawn(run)
            try:
                failed = runner.get()
            except BaseException:
                runner.kill()  # (stopped: the hook goes with it)
                raise
            if failed is not None:
                raise failed

    def wait_ready(self, timeout: Optional[float]) -> None:
        """Block this greenlet until the backend is ready (within ``timeout``; None or 0: do
        not wait): its ``ready_cmd`` exits with status 0, or without one, it accepts a
        connection. Raises HookFailed if it is not, or if its supervised command ends first."""
        if not timeout:
            return
        if self.lock.ready_cmd is not None:
            return self._wait_ready_cmd(timeout)
        result = AsyncResult()
        attempt = Connect(self, time.monotonic() + timeout, lambda s, e: result.set((s, e)))
        attempt.start()
        try:
            if self.process is not None:
                gevent.wait([result, self.process.exited], count=1)
                if not result.ready():
                    raise HookFailed(self._ended_early())
            sock, error = result.get()
        finally:
            attempt.cancel()
        if sock is None:
            reason = getattr(error, "strerror", None) or error
            raise HookFailed(
                f"backend not accepting connections {timeout:g}s after the restart ({reason})"
            )
        self.close_check(sock)

    def _wait_ready_cmd(self, timeout: float) -> None:
        command = self.lock.ready_cmd
        env = self._command_env()
        deadline = time.monotonic() + timeout
        process = self.process
        while True:
            if process is not None and process.exited.is_set():
                raise HookFailed(self._ended_early())
            ready, why = probe(command, env, max(deadline - time.monotonic(), 0.001))
            if ready:
                return
            left = deadline - time.monotonic()
            if left <= 0:
                raise HookFailed(f"backend {self.label} not ready after {timeout:g}s ({why})")
            if process is not None:
                process.exited.wait(min(READY_INTERVAL, left))
            else:
                gevent.sleep(min(READY_INTERVAL, left))

    def _ended_early(self) -> str:
        status = self.process.status
        how = describe_status(status) if status is not None else "is not running"
        return f"backend {self.label}: its command {how} before it was ready"

    def _command_env(self) -> dict:
        env = dict(os.environ)
        env.update(self.env())
        return env

    # -- addresses ---------------------------------------------------------------------------

    def addresses(self) -> Optional[list]:
        """The addresses to try, if known without a lookup (a numeric host, or a name resolved
        before); None if the name has to be looked up (:meth:`resolve`)."""
        addrs = self._addrinfo
        if addrs is None:
            try:
                addrs = self._addrinfo = _socket.getaddrinfo(
                    self.address[0],
                    self.address[1],
                    0,
                    _socket.SOCK_STREAM,
                    _socket.IPPROTO_TCP,
                    _socket.AI_NUMERICHOST,
                )
            except OSError:
                return None
        return addrs

    def resolve(self) -> list:
        """Look the name up (blocks this greenlet); kept until every address fails."""
        addrs = socket.getaddrinfo(
            self.address[0], self.address[1], 0, socket.SOCK_STREAM, socket.IPPROTO_TCP
        )
        self._addrinfo = addrs
        return addrs

    def answered(self, addrs: list, index: int) -> None:
        """Address ``index`` of ``addrs`` accepted: try it first next time (a name whose first
        address refuses, such as localhost's ::1 for a server on 127.0.0.1 only)."""
        if index and self._addrinfo is addrs:
            self._addrinfo = [addrs[index], *addrs[:index], *addrs[index + 1 :]]

    def forget(self) -> None:
        """Every address failed: look the name up again next time."""
        self._addrinfo = None

    def connect_now(self):
        """``(sock, sockaddr)``: a socket connected to this backend within this call, where one
        can be had so, or None. That is when its first address is known without a lookup and
        is on loopback, where the handshake completes inside ``connect()``. Otherwise (and on a
        refusal, or a listen queue that is full) the caller uses a :class:`Connect`, which
        tries again from the start: the backend has seen no connection of this attempt."""
        addrs = self._addrinfo
        if not addrs:
            return None
        family, type_, proto, _name, sockaddr = addrs[0]
        if not self.peer_check.local(sockaddr):
            return None
        try:
            s = _socket.socket(family, type_ | _NONBLOCK, proto)
        except OSError:
            return None
        try:
            if not _NONBLOCK:
                s.setblocking(False)
            err = s.connect_ex(sockaddr)
            if not err or (err in _IN_PROGRESS and _connected(s)):
                _tune(s, True)
                return s, sockaddr
        except OSError:
            pass
        except BaseException:
            s.close()
            raise
        s.close()
        return None


#: The steps of a restart, in order (see :meth:`Backend.reconcile`).
PAUSE = "pause"  # before a crashed backend is started again, and before each new attempt
STOP = "stop"  # stop the process group, or run the restart hook
START = "start"  # start the command again
READY = "ready"  # wait until it is ready
DONE = "done"


class Restart:
    """A restart (or a supervised backend's start) under way, moved on one step at a time by
    :meth:`Backend.reconcile`. ``holder`` is the connection that holds the backend's last slot
    for it (None: none does), ``then`` what to call once it is over. :meth:`kill` (``cancel``)
    cuts it: the step under way is killed, and the restart is abandoned."""

    __slots__ = (
        "backend", "holder", "then", "step", "next", "attempt", "pause", "delay", "started",
        "failed", "over",
    )  # fmt: skip

    def __init__(self, backend: Backend, holder, then: Optional[Callable[[], object]]) -> None:
        self.backend = backend
        self.holder = holder
        self.then = then
        #: The step running now, and the one to take when it has ended.
        self.step: Optional[Step] = None
        self.next = PAUSE if backend.restart_reason == "crash" else STOP
        self.attempt = 0
        #: The pause to take (PAUSE), and the one before the attempt after a failed one.
        self.pause = 0.0
        self.delay = backend.lock.restart_retry_delay
        self.started = 0.0
        #: Whether an attempt has failed, and whether it is over (done or abandoned).
        self.failed = False
        self.over = False

    def start(self) -> Restart:
        self.backend.reconcile()
        return self

    def kill(self) -> None:
        if self.over:
            return
        if self.step is not None:
            self.step.kill()  # its end abandons the restart
        else:
            log.warning(
                "%s abandoned (backend %s): tcplock is stopping", self.what, self.backend.label
            )
            self.backend._restart_over(self, False)

    cancel = kill

    def take_next_step(self) -> None:
        """Start the step that comes next (called by :meth:`Backend.reconcile` only)."""
        backend = self.backend
        lock = backend.lock
        process = backend.process
        reason = backend.restart_reason
        step = self.next
        if step == PAUSE:
            if not self.failed:  # a crashed backend, before its first attempt
                ready_at = process.ready_at
                if ready_at is not None and time.monotonic() - ready_at >= STABLE_AFTER:
                    backend.crash_delay = lock.restart_retry_delay
                self.pause = backend.crash_delay
                backend.crash_delay = min(self.pause * 2, 30.0)
                log.warning("backend %s: starting it again in %gs", backend.label, self.pause)
            self.next = STOP
            fn, args = gevent.sleep, (self.pause,)
        elif step == STOP:
            self.attempt += 1
            again = f", attempt {self.attempt}" if self.attempt > 1 else ""
            if reason == "start":
                log.info("starting backend %s%s", backend.label, again)
            else:
                log.warning(
                    "restarting backend%s (%s)%s",
                    " " + backend.label if len(lock.backends) > 1 or process else "",
                    _RESTART_WHY.get(reason, reason),
                    again,
                )
            self.started = time.monotonic()
            self.next = START if process is not None else READY
            fn, args = backend._stop_for_restart, (self.holder, reason)
        elif step == START:
            self.next = READY
            fn, args = process.start, ()
        else:
            self.next = DONE
            fn, args = backend.wait_ready, (lock.ready_timeout,)
        step = self.step = Step(fn, args, self._step_done)
        step.start()

    def _step_done(self, _result, error) -> None:
        self.step = None
        backend = self.backend
        if self.over:
            return
        if error is None:
            if self.next != DONE:
                return backend.reconcile()
            took = time.monotonic() - self.started
            if backend.restart_reason == "start":
                log.info("backend %s ready in %.2fs", backend.label, took)
            else:
                backend.restarts += 1
                log.warning(
                    "backend%s restarted in %.2fs (restart #%d)",
                    " " + backend.label if backend.process is not None else "",
                    took,
                    backend.restarts,
                )
            return backend._restart_over(self, True)
        if isinstance(error, GreenletExit):
            log.warning("%s abandoned (backend %s): tcplock is stopping", self.what, backend.label)
            return backend._restart_over(self, False)
        if not isinstance(error, HookFailed):
            log.error("restart of %s ended by an error", backend.label, exc_info=error)
            return backend._restart_over(self, False)
        backend.restart_failures += 1
        self.failed = True
        why = backend._not_to_go_on(self)
        if why is not None:
            log.error(
                "%s failed (backend %s): %s; not retried: %s", self.what, backend.label, error, why
            )
            return backend._restart_over(self, False)
        log.error("%s failed: %s; retrying in %gs", self.what, error, self.delay)
        self.pause, self.delay = self.delay, min(self.delay * 2, 30.0)
        self.next = PAUSE
        backend.reconcile()

    @property
    def what(self) -> str:
        """``start`` (a supervised backend's first) or ``restart``, as the log names it."""
        return "start" if self.backend.restart_reason == "start" else "restart"


class Connect:
    """Connecting to a backend, driven by the event loop: each of its addresses in turn, and
    over again with a growing pause, until one accepts or ``deadline`` (a monotonic time)
    passes. Then ``on_done(sock, error)``, once: a connected non-blocking socket and None, or
    None and the last error. On loopback the backend accepts within the connect call, and
    ``on_done`` is called before :meth:`start` returns. A name to look up is a step.
    """

    __slots__ = (
        "backend", "deadline", "on_done", "loop", "addrs", "index", "sock", "watch", "timer",
        "step", "delay", "error", "sockaddr", "give_up", "gave_up", "local",
    )  # fmt: skip

    def __init__(self, backend: Backend, deadline: float, on_done, give_up=None) -> None:
        self.backend = backend
        #: Asked after each round of addresses has failed, with the error: True ends the
        #: attempt at once (another backend can take the client), with ``gave_up`` set.
        self.give_up = give_up
        self.gave_up = False
        self.deadline = deadline
        self.on_done = on_done
        self.loop = backend.lock.loop
        self.addrs = None
        self.index = 0
        self.sock = None
        self.watch = None
        self.timer = None
        self.step = None
        self.delay = 0.01
        self.error: Optional[BaseException] = None
        #: The address that accepted, once one has, and whether it is on loopback.
        self.sockaddr = None
        self.local = False

    def start(self) -> None:
        addrs = self.backend.addresses()
        if addrs is None:
            step = self.step = Step(self.backend.resolve, (), self._resolved)
            step.start()
            return
        self.addrs, self.index = addrs, 0
        self._try()

    def _resolved(self, addrs, error) -> None:
        self.step = None
        if self.on_done is None:
            return
        if error is not None:
            self.error = error
            return self._failed_round()
        self.addrs, self.index = addrs, 0
        self._try()

    def _try(self) -> None:
        addrs = self.addrs
        while self.index < len(addrs):
            family, type_, proto, _name, sockaddr = addrs[self.index]
            try:
                s = _socket.socket(family, type_ | _NONBLOCK, proto)
            except OSError as e:
                self.error = e  # out of descriptors, say: try again shortly
                return self._later()
            try:
                if not _NONBLOCK:
                    s.setblocking(False)
                err = s.connect_ex(sockaddr)
                if err in _IN_PROGRESS:
                    if not _connected(s):
                        self.sock = s
                        self.watch = self.loop.io(s.fileno(), 2)
                        self.watch.start(self._writable)
                        self.timer = self.loop.timer(max(self.deadline - time.monotonic(), 0.001))
                        self.timer.start(self._timed_out)
                        return
                    err = 0
            except BaseException:
                s.close()
                raise
            if not err:
                return self._connected(s)
            s.close()
            self.error = OSError(err, os.strerror(err))
            self.index += 1
        self.backend.forget()
        self._failed_round()

    def _failed_round(self) -> None:
        if self.give_up is not None and self.give_up(self.error):
            self.gave_up = True
            return self._finish(None)
        self._later()

    def _writable(self) -> None:
        s = self.sock
        self._stop_waiting()
        try:
            err = s.getsockopt(_socket.SOL_SOCKET, _socket.SO_ERROR)
        except OSError as e:
            err = e.errno or errno.EBADF
        if not err:
            return self._connected(s)
        s.close()
        self.error = OSError(err, os.strerror(err))
        self.index += 1
        self._try()

    def _timed_out(self) -> None:
        s = self.sock
        self._stop_waiting()
        s.close()
        self.backend.forget()
        self.error = OSError(errno.ETIMEDOUT, "timed out")
        if self.give_up is not None and self.give_up(self.error):
            self.gave_up = True
        self._finish(None)

    def _later(self) -> None:
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            return self._finish(None)
        self.timer = self.loop.timer(max(min(self.delay, remaining), 0.001))
        self.timer.start(self._again)
        self.delay = min(self.delay * 2, 0.5)

    def _again(self) -> None:
        self.timer.close()
        self.timer = None
        self.start()

    def _connected(self, s) -> None:
        if self.index:
            self.backend.answered(self.addrs, self.index)
        sockaddr = self.sockaddr = self.addrs[self.index][4]
        try:
            self.local = self.backend.peer_check.local(sockaddr)
            _tune(s, self.local)
        except OSError as e:
            s.close()
            self.error = e
            self.index += 1
            return self._try()
        self._finish(s)

    def _finish(self, sock) -> None:
        on_done, self.on_done = self.on_done, None
        if on_done is not None:
            on_done(sock, None if sock is not None else self.error)
        elif sock is not None:
            sock.close()

    def _stop_waiting(self) -> None:
        self.sock = None
        for w in (self.watch, self.timer):
            if w is not None:
                w.stop()
                w.close()
        self.watch = self.timer = None

    def cancel(self) -> None:
        """Give up: nothing more is called, and a socket under way is closed."""
        self.on_done = None
        s = self.sock
        self._stop_waiting()
        if s is not None:
            s.close()
        if self.step is not None:
            self.step.kill()
            self.step = None


def _one_round(_error) -> bool:
    """A :class:`Connect`'s ``give_up`` that ends it after its first failed round."""
    return True


def _takes_backend(hook) -> bool:
    """Whether a Python restart hook takes ``(reason, backend)`` rather than ``(reason)``."""
    try:
        signature = inspect.signature(hook)
        signature.bind(None, None)
    except (TypeError, ValueError):
        return False
    return True


def _tune(sock, local: bool) -> None:
    """Set a backend connection's options (OSError if the peer is gone already)."""
    sock.setsockopt(_socket.IPPROTO_TCP, _socket.TCP_NODELAY, 1)
    # Keepalive not on loopback: the kernel answers the probes for a backend that hangs, and
    # closes the connection of one that dies, so they could never tell anything.
    if not local:
        sock.setsockopt(_socket.SOL_SOCKET, _socket.SO_KEEPALIVE, 1)


_TCP_INFO = getattr(_socket, "TCP_INFO", None) if sys.platform.startswith("linux") else None
# The first byte of struct tcp_info (tcpi_state) while the connect has not completed, or has
# failed: TCP_SYN_SENT, TCP_CLOSE. In any other state the connection was made (a peer that
# has closed since leaves it in CLOSE_WAIT), as getpeername() would say.
_NOT_CONNECTED = (b"\x02", b"\x07")


def _connected(sock) -> bool:
    """Whether a non-blocking connect has completed already, as it usually has on loopback
    (the handshake runs within the connect call): then there is nothing to wait for. On Linux
    the connection's state is one byte of TCP_INFO (getpeername would build an address only
    to drop it)."""
    try:
        if _TCP_INFO is not None:
            return sock.getsockopt(_socket.IPPROTO_TCP, _TCP_INFO, 1) not in _NOT_CONNECTED
        sock.getpeername()
    except OSError:
        return False
    return True
