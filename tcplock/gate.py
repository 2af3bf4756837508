"""The FIFO gate: slots across one or more places, a queue of waiters, and the hand-off.

The rule this module keeps: a freed slot goes to the head of the queue. A newcomer takes a free
slot only when nobody is waiting and the gate is not paused. A released slot is handed straight
to the head of the queue (the ticket is marked granted before its owner even hears of it), so
there is no moment in which a newcomer could slip in ahead of it.

Slots belong to *units* (the lock's backends; a gate made with ``Gate(slots)`` has one unit of
its own). A unit has ``slots``, ``held`` (kept by the gate), ``open`` (whether it takes new
holders now: its owner sets it, then calls :meth:`Gate.refill`) and ``last_used``. The head of
the queue goes to the open unit with a free slot that has fewest holders, then the one used
least recently, then the first in order.

The gate knows nothing of sockets or greenlets: a waiter is a :class:`Ticket` with a ``wake``
callback, which something outside (a departure watch, a queue timeout, shutdown) may cancel.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Callable, Iterator, List, Optional, Sequence

__all__ = ["Gate", "Ticket", "Unit"]


class Ticket:
    """One place in the queue.

    ``granted`` becomes true when the gate hands this ticket a slot (of ``unit``); from then on
    whoever holds the ticket owns the slot and must :meth:`Gate.release` it once. ``cancelled``
    holds the reason given to :meth:`cancel` (a short word such as ``"left-queue"``) when the
    wait was abandoned.

    ``wake`` is called (with no arguments, possibly from an event-loop callback) when the ticket
    is granted or cancelled. It must not block.
    """

    __slots__ = ("wake", "cancelled", "dead", "unit")

    def __init__(self, wake: Optional[Callable[[], object]] = None) -> None:
        self.wake = wake
        self.cancelled: Optional[str] = None
        #: Set once the ticket has left the queue (granted, or discarded); the gate skips dead
        #: tickets.
        self.dead = False
        #: The unit whose slot it was granted, once it is (None while it waits).
        self.unit = None

    @property
    def granted(self) -> bool:
        """Whether the gate has handed it a slot (of :attr:`unit`)."""
        return self.unit is not None

    def cancel(self, reason: str) -> None:
        """Abandon the wait (safe to call from an event-loop callback). Ignored once granted."""
        if not self.granted and self.cancelled is None:
            self.cancelled = reason
            if self.wake is not None:
                self.wake()


class Unit:
    """A place with slots, for a gate of its own (``Gate(slots)``); a backend is another."""

    __slots__ = ("slots", "held", "open", "last_used")

    def __init__(self, slots: int) -> None:
        self.slots = slots
        self.held = 0
        self.open = True
        self.last_used = 0.0


class Gate:
    """At most ``slots`` holders at once per unit, admitted in strict arrival order."""

    def __init__(self, slots: int = 1, units: Optional[Sequence] = None) -> None:
        if units is None:
            if slots < 1:
                raise ValueError("slots must be at least 1")
            units = [Unit(slots)]
        elif not units:
            raise ValueError("a gate needs at least one unit")
        self._units: List = list(units)
        self._queue: deque[Ticket] = deque()
        self._waiting = 0
        self._paused = False

    # -- introspection -------------------------------------------------------------------------

    @property
    def slots(self) -> int:
        """Slots of all units. Set, it gives every unit that many: more slots are handed to the
        queue at once; with fewer, holders keep theirs and no one new is let in until they are
        within the number."""
        return sum(u.slots for u in self._units)

    @slots.setter
    def slots(self, slots: int) -> None:
        if slots < 1:
            raise ValueError("slots must be at least 1")
        for u in self._units:
            u.slots = slots
        self._fill()

    def resized(self) -> None:
        """The units' slots have changed: more slots are handed to the queue at once; with
        fewer, holders keep theirs and no one new is let in until they are within the number."""
        self._fill()

    @property
    def units(self) -> List:
        """The units, in order. Set (a pool that changed), a new unit's free slots go to the
        queue at once; a unit left out must hold no slot (ValueError otherwise)."""
        return list(self._units)

    @units.setter
    def units(self, units: Sequence) -> None:
        units = list(units)
        if not units:
            raise ValueError("a gate needs at least one unit")
        if any(u.held for u in self._units if u not in units):
            raise ValueError("a unit left out still holds slots")
        self._units = units
        self._fill()

    @property
    def waiting(self) -> int:
        """How many tickets are queued and not yet discarded or skipped."""
        return self._waiting

    @property
    def held(self) -> int:
        """How many slots are held right now."""
        return sum(u.held for u in self._units)

    @property
    def paused(self) -> bool:
        return self._paused

    def would_wait(self) -> bool:
        """Whether a newcomer would have to queue right now."""
        return self._paused or self._waiting > 0 or self._pick() is None

    def tickets(self) -> Iterator[Ticket]:
        """The live tickets in queue order."""
        return (t for t in self._queue if not t.dead)

    # -- choosing a unit ------------------------------------------------------------------

    def _pick(self):
        units = self._units
        if len(units) == 1:
            u = units[0]
            return u if u.open and u.held < u.slots else None
        best = None
        for u in units:
            held = u.held
            if u.open and held < u.slots:
                # (held, last_used) is less than best's, without making the two tuples.
                if (
                    best is None
                    or held < best.held
                    or (held == best.held and u.last_used < best.last_used)
                ):
                    best = u
        return best

    # -- acquiring and releasing ---------------------------------------------------------------

    def enqueue(self, ticket: Ticket) -> bool:
        """Take a free slot at once (True: ``ticket.unit`` says whose), or queue the ticket
        (False) without waiting: the gate calls ``ticket.wake()`` when it is granted. Whoever
        cancels a queued ticket must then :meth:`discard` it."""
        if ticket.cancelled is not None:
            ticket.dead = True
            return False
        if not self._paused and not self._waiting:
            u = self._pick()
            if u is not None:
                u.held += 1
                u.last_used = time.monotonic()
                ticket.unit = u
                return True
        self._queue.append(ticket)
        self._waiting += 1
        return False

    def requeue(self, ticket: Ticket, ahead: Optional[Callable[[Ticket], bool]] = None) -> None:
        """Put a granted ticket back at the head of the queue, its slot still held: the caller
        then releases that slot (to whoever is at the head: this ticket, if a unit is open).
        ``ahead(t)`` says whether a ticket at the head (one sent back before) came before this
        one: those stay ahead of it, so that tickets sent back one after another keep their
        order."""
        ticket.unit = None
        ticket.dead = False
        q = self._queue
        place = 0
        if ahead is not None:
            while place < len(q) and (q[place].dead or ahead(q[place])):
                place += 1
        if place:
            q.insert(place, ticket)
        else:
            q.appendleft(ticket)
        self._waiting += 1

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

    def release(self, unit=None) -> None:
        """Give a slot of ``unit`` back (the gate's only unit if None): to the head of the
        queue if anyone waits, else to the pool. Releasing more slots than are held is a bug
        in the caller: ValueError."""
        if unit is None:
            unit = self._units[0]
        if unit.held <= 0:
            raise ValueError("Gate released too many times")
        unit.held -= 1
        unit.last_used = time.monotonic()
        self._fill()

    # -- steering ------------------------------------------------------------------------------

    def pause(self) -> None:
        """Stop handing out slots; waiters keep their places and newcomers queue behind them."""
        self._paused = True

    def resume(self) -> None:
        """Hand every free slot to the head of the queue, in order."""
        self._paused = False
        self._fill()

    def refill(self) -> None:
        """A unit opened or gained slots: hand what is free to the head of the queue."""
        self._fill()

    def _fill(self) -> None:
        while not self._paused and self._waiting:
            u = self._pick()
            if u is None:
                break
            t = self._next_ticket()
            if t is None:  # pragma: no cover - _waiting counts live tickets
                break
            u.held += 1
            u.last_used = time.monotonic()
            t.unit = u
            t.dead = True  # out of the queue
            self._waiting -= 1
            t.wake()

    def cancel_all(self, reason: str) -> None:
        """Cancel every queued ticket (for shutdown)."""
        for t in list(self.tickets()):
            t.cancel(reason)
