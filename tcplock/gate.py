"""The FIFO gate: N slots, a queue of waiters, and the hand-off between them.

The rule this module keeps: a freed slot goes to the head of the queue. A newcomer takes a free
slot only when nobody is waiting and the gate is not paused. A released slot is handed straight
to the head of the queue (the ticket is marked granted before its owner even hears of it), so
there is no moment in which a newcomer could slip in ahead of it.

The gate knows nothing of sockets or greenlets: a waiter is a :class:`Ticket` with a ``wake``
callback, which something outside (a departure watch, a queue timeout, shutdown) may cancel.
"""

from __future__ import annotations

from collections import deque
from typing import Callable, Iterator, Optional

__all__ = ["Gate", "Ticket"]


class Ticket:
    """One place in the queue.

    ``granted`` becomes true when the gate hands this ticket a slot; from then on whoever holds
    the ticket owns the slot and must :meth:`Gate.release` it once. ``cancelled`` holds the reason
    given to :meth:`cancel` (a short word such as ``"left-queue"``) when the wait was abandoned.

    ``wake`` is called (with no arguments, possibly from an event-loop callback) when the ticket
    is granted or cancelled. It must not block.
    """

    __slots__ = ("wake", "granted", "cancelled", "dead")

    def __init__(self, wake: Optional[Callable[[], object]] = None) -> None:
        self.wake = wake
        self.granted = False
        self.cancelled: Optional[str] = None
        #: Set once the ticket has left the queue (granted, or discarded); the gate skips dead
        #: tickets.
        self.dead = False

    def cancel(self, reason: str) -> None:
        """Abandon the wait (safe to call from an event-loop callback). Ignored once granted."""
        if not self.granted and self.cancelled is None:
            self.cancelled = reason
            if self.wake is not None:
                self.wake()


class Gate:
    """At most ``slots`` holders at once, admitted in strict arrival order."""

    def __init__(self, slots: int = 1) -> None:
        if slots < 1:
            raise ValueError("slots must be at least 1")
        self._slots = slots
        self._free = slots
        self._queue: deque[Ticket] = deque()
        self._waiting = 0
        self._paused = False

    # -- introspection -------------------------------------------------------------------------

    @property
    def slots(self) -> int:
        """Number of slots. It may be changed while the gate is in use: more slots are handed to
        the queue at once; with fewer, holders keep theirs and the excess is taken back as
        they release them."""
        return self._slots

    @slots.setter
    def slots(self, slots: int) -> None:
        if slots < 1:
            raise ValueError("slots must be at least 1")
        self._free += slots - self._slots
        self._slots = slots
        self._fill()

    @property
    def waiting(self) -> int:
        """How many tickets are queued (cancelled ones excluded)."""
        return self._waiting

    @property
    def held(self) -> int:
        """How many slots are held right now."""
        return self._slots - self._free

    @property
    def paused(self) -> bool:
        return self._paused

    def would_wait(self) -> bool:
        """Whether a newcomer would have to queue right now."""
        return self._paused or self._waiting > 0 or self._free <= 0

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
        if not self._paused and not self._waiting and self._free > 0:
            self._free -= 1
            ticket.granted = True
            return True
        self._queue.append(ticket)
        self._waiting += 1
        return False

    def discard(self, ticket: Ticket) -> None:
        """Take a cancelled (or abandoned) ticket out of the queue; no-op once granted."""
        if not ticket.granted and not ticket.dead:
            ticket.dead = True
            self._waiting -= 1
            self._compact()

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
                # Cancelled but its owner has not discarded it yet: it must not get a slot it
                # would never release.
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
        """Give a held slot back: to the head of the queue if anyone waits, else to the pool.
        Releasing more slots than are held is a bug in the caller: ValueError."""
        if self._free >= self._slots:
            raise ValueError("Gate released too many times")
        if not self._paused and self._free >= 0:
            t = self._next_ticket()
            if t is not None:
                self._grant(t)
                return
        self._free += 1

    # -- steering ------------------------------------------------------------------------------

    def pause(self) -> None:
        """Stop handing out slots; waiters keep their places and newcomers queue behind them."""
        self._paused = True

    def resume(self) -> None:
        """Hand every free slot to the head of the queue, in order."""
        self._paused = False
        self._fill()

    def _fill(self) -> None:
        while not self._paused and self._waiting and self._free > 0:
            t = self._next_ticket()
            if t is None:  # pragma: no cover - _waiting counts live tickets
                break
            self._free -= 1
            self._grant(t)

    def cancel_all(self, reason: str) -> None:
        """Cancel every queued ticket (for shutdown)."""
        for t in list(self.tickets()):
            t.cancel(reason)
