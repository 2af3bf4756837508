"""The FIFO gate: N slots, a queue of waiters, and the hand-off between them.

The rule this module keeps: a freed slot goes to the head of the queue. A newcomer takes a free
slot only when nobody is waiting and the gate is not paused. gevent's semaphore wakes its waiters
in order but lets a greenlet that arrives between a release and the waiter's wake-up take the
slot; here the releasing greenlet hands the slot over directly (the waiter is marked granted before
it even runs), so there is no window for a newcomer to slip through.

The gate knows nothing of sockets: a waiter is a :class:`Ticket`, which something outside (the
server's departure watch, a queue timeout, shutdown) may cancel.
"""

from __future__ import annotations

from collections import deque
from typing import Callable, Iterator, Optional

from gevent.event import Event
from gevent.lock import BoundedSemaphore

__all__ = ["Gate", "Ticket"]


class Ticket:
    """One place in the queue.

    ``granted`` becomes true when the gate hands this ticket a slot; from then on whoever holds
    the ticket owns the slot and must :meth:`Gate.release` it once. ``cancelled`` holds the reason
    given to :meth:`cancel` (a short word such as ``"left-queue"``) when the wait was abandoned.

    ``wake`` is called (with no arguments, possibly from the event loop itself) when the ticket
    is granted or cancelled. A greenlet blocked in :meth:`Gate.acquire` is woken this way; code
    that queues without a greenlet of its own (:meth:`Gate.enqueue`) passes its own callback,
    which must not block.
    """

    __slots__ = ("wake", "granted", "cancelled", "dead")

    def __init__(self, wake: Optional[Callable[[], object]] = None) -> None:
        self.wake = wake
        self.granted = False
        self.cancelled: Optional[str] = None
        #: Set once the ticket has left the queue without a slot; the gate skips dead tickets.
        self.dead = False

    def cancel(self, reason: str) -> None:
        """Abandon the wait (safe to call from a hub callback). Ignored once granted."""
        if not self.granted and self.cancelled is None:
            self.cancelled = reason
            if self.wake is not None:
                self.wake()


class Gate:
    """At most ``slots`` holders at once, admitted in strict arrival order."""

    def __init__(self, slots: int = 1) -> None:
        if slots < 1:
            raise ValueError("slots must be at least 1")
        #: Number of slots; fixed for the gate's life.
        self.slots = slots
        # The semaphore counts slots that are free; a slot handed from a releaser straight to a
        # waiter never passes through it. Being bounded, it turns a double release that would
        # create a slot out of nothing into a ValueError instead of a silent overlap.
        self._sem = BoundedSemaphore(slots)
        self._queue: deque[Ticket] = deque()
        self._waiting = 0
        self._paused = False

    # -- introspection -------------------------------------------------------------------------

    @property
    def waiting(self) -> int:
        """How many tickets are queued (cancelled ones excluded)."""
        return self._waiting

    @property
    def held(self) -> int:
        """How many slots are held right now."""
        return self.slots - self._sem.counter

    @property
    def paused(self) -> bool:
        return self._paused

    def would_wait(self) -> bool:
        """Whether a newcomer would have to queue right now."""
        return self._paused or self._waiting > 0 or self._sem.counter == 0

    def tickets(self) -> Iterator[Ticket]:
        """The live tickets in queue order."""
        return (t for t in self._queue if not t.dead)

    # -- acquiring and releasing ---------------------------------------------------------------

    def enqueue(self, ticket: Ticket) -> bool:
        """Take a free slot at once (True), or queue the ticket (False) without waiting: the
        gate calls ``ticket.wake()`` when it is granted. Whoever cancels a queued ticket must
        then :meth:`discard` it."""
        if ticket.cancelled is not None:
            ticket.dead = True
            return False
        if not self._paused and not self._waiting and self._sem.acquire(blocking=False):
            ticket.granted = True
            return True
        self._queue.append(ticket)
        self._waiting += 1
        return False

    def discard(self, ticket: Ticket) -> None:
        """Take a cancelled (or abandoned) ticket out of the queue; no-op once granted."""
        self._leave(ticket)

    def acquire(self, ticket: Ticket, timeout: Optional[float] = None) -> bool:
        """Wait in line for a slot, blocking this greenlet. True when the slot is held; False
        when the wait ended without one (``ticket.cancelled`` says why, or it is None after
        ``timeout``).

        If the calling greenlet is killed while waiting, the ticket leaves the queue, and a slot
        that was handed to it in the meantime is passed on, so nothing leaks.
        """
        event = Event()
        ticket.wake = event.set
        if self.enqueue(ticket):
            return True
        if ticket.dead:
            return False
        try:
            event.wait(timeout)
        except BaseException:
            if self._leave(ticket):
                self.release()  # granted, but the holder died before it could use the slot
            raise
        return self._leave(ticket)

    def _leave(self, ticket: Ticket) -> bool:
        if ticket.granted:
            return True
        if not ticket.dead:
            ticket.dead = True
            self._waiting -= 1
            self._compact()
        return False

    def _compact(self) -> None:
        # Dead tickets are skipped lazily; drop them from the front so the deque does not grow
        # without bound when many waiters leave, and rebuild it when they dominate.
        q = self._queue
        while q and q[0].dead:
            q.popleft()
        if len(q) > 64 and self._waiting < len(q) // 2:
            self._queue = deque(t for t in q if not t.dead)

    def _next_ticket(self) -> Optional[Ticket]:
        q = self._queue
        while q:
            t = q.popleft()
            if t.dead:
                continue
            if t.cancelled is not None:
                # Cancelled but its owner has not run yet to leave the queue: it must not get
                # a slot it would never release.
                t.dead = True
                self._waiting -= 1
                continue
            return t
        return None

    def _grant(self, ticket: Ticket) -> None:
        ticket.granted = True
        ticket.dead = True  # out of the queue
        self._waiting -= 1
        ticket.wake()

    def release(self) -> None:
        """Give a held slot back: to the head of the queue if anyone waits, else to the pool."""
        if not self._paused:
            t = self._next_ticket()
            if t is not None:
                self._grant(t)
                return
        self._sem.release()

    # -- steering ------------------------------------------------------------------------------

    def pause(self) -> None:
        """Stop handing out slots; waiters keep their places and newcomers queue behind them."""
        self._paused = True

    def resume(self) -> None:
        """Hand every free slot to the head of the queue, in order."""
        self._paused = False
        while self._waiting and self._sem.acquire(blocking=False):
            t = self._next_ticket()
            if t is None:  # pragma: no cover - _waiting counts live tickets
                self._sem.release()
                break
            self._grant(t)

    def cancel_all(self, reason: str) -> None:
        """Cancel every queued ticket (for shutdown)."""
        for t in list(self.tickets()):
            t.cancel(reason)
