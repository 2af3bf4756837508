"""The FIFO gate on its own: hand-off order, cancellation, kills, pause and resume; through
greenlets that wait on it (``acquire`` below, as TCPLock.slot() does) and through its callback
API directly (``enqueue`` with a ``wake`` callback, ``discard``, ``release``), by examples and
against a model."""

import tracemalloc

import gevent
import pytest
from gevent.event import Event
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from tcplock.gate import Gate, Ticket


def acquire(gate, ticket, timeout=None):
    """Wait in this greenlet for a slot, with the gate's callback API: True when held; False
    when the wait ended without one (``ticket.cancelled`` says why, or None on timeout). A
    greenlet killed while waiting leaves the queue, and passes on a slot granted meanwhile."""
    event = Event()
    ticket.wake = event.set
    if gate.enqueue(ticket):
        return True
    if ticket.dead:
        return False
    try:
        event.wait(timeout)
    except BaseException:
        if ticket.granted:
            gate.release()
        else:
            gate.discard(ticket)
        raise
    if ticket.granted:
        return True
    gate.discard(ticket)
    return False


def spawn_waiter(gate, name, log, timeout=None):
    def run():
        t = Ticket()
        got = acquire(gate, t, timeout)
        log.append((name, got, t.cancelled))
        return t

    return gevent.spawn(run)


def test_newcomer_takes_free_slot_when_nobody_waits():
    gate = Gate(2)
    assert acquire(gate, Ticket()) and acquire(gate, Ticket())
    assert gate.held == 2 and gate.would_wait()


def test_client_arriving_at_release_queues_behind_waiters():
    gate = Gate(1)
    assert acquire(gate, Ticket())
    log = []
    waiters = [spawn_waiter(gate, n, log) for n in ("b", "c")]
    gevent.sleep(0)  # both are queued now
    assert gate.waiting == 2
    gate.release()
    # Before the woken waiter has run at all, a newcomer arrives: it must not take the slot.
    assert gate.would_wait()
    newcomer = spawn_waiter(gate, "newcomer", log)
    gevent.sleep(0)
    assert log == [("b", True, None)]
    gate.release()
    gevent.sleep(0)
    gate.release()
    gevent.joinall(waiters + [newcomer], timeout=2)
    assert [name for name, _, _ in log] == ["b", "c", "newcomer"]


def test_fifo_order_holds_for_many_waiters():
    gate = Gate(1)
    assert acquire(gate, Ticket())
    log = []
    waiters = [spawn_waiter(gate, i, log) for i in range(50)]
    gevent.sleep(0)
    for _ in range(50):
        gate.release()
        gevent.sleep(0)
    gevent.joinall(waiters, timeout=2)
    assert [name for name, _, _ in log] == list(range(50))


def test_cancelled_ticket_leaves_queue_and_is_skipped():
    gate = Gate(1)
    assert acquire(gate, Ticket())
    log = []
    tickets = {}

    def waiter(name):
        t = tickets[name] = Ticket()
        log.append((name, acquire(gate, t), t.cancelled))

    gs = [gevent.spawn(waiter, n) for n in ("a", "b", "c")]
    gevent.sleep(0)
    tickets["b"].cancel("left-queue")
    gevent.sleep(0)
    assert gate.waiting == 2
    assert ("b", False, "left-queue") in log
    gate.release()
    gevent.sleep(0)
    gate.release()
    gevent.joinall(gs, timeout=2)
    assert [n for n, ok, _ in log if ok] == ["a", "c"]


def test_queue_timeout_returns_false_and_frees_place():
    gate = Gate(1)
    assert acquire(gate, Ticket())
    t = Ticket()
    assert acquire(gate, t, timeout=0.05) is False
    assert t.cancelled is None and gate.waiting == 0
    gate.release()
    assert gate.held == 0


def test_killed_waiter_that_was_granted_passes_slot_on():
    gate = Gate(1)
    assert acquire(gate, Ticket())
    log = []
    first = spawn_waiter(gate, "first", log)
    second = spawn_waiter(gate, "second", log)
    gevent.sleep(0)
    first.kill(block=False)  # the kill is delivered first...
    gate.release()  # ...after the slot was granted to "first", which has not run yet
    gevent.sleep(0)
    second.join(timeout=2)
    assert log == [("second", True, None)]
    gate.release()
    assert gate.held == 0


def test_release_beyond_slots_is_an_error():
    gate = Gate(1)
    with pytest.raises(ValueError):
        gate.release()


def test_pause_holds_queue_and_newcomers_resume_in_order():
    gate = Gate(2)
    gate.pause()
    log = []
    ws = [spawn_waiter(gate, n, log) for n in range(3)]
    gevent.sleep(0)
    assert gate.waiting == 3 and log == []
    gate.resume()
    gevent.sleep(0)
    assert [n for n, _, _ in log] == [0, 1]
    gate.release()
    gevent.joinall(ws, timeout=2)
    assert [n for n, _, _ in log] == [0, 1, 2]


def test_release_while_paused_returns_slot_to_pool():
    gate = Gate(1)
    assert acquire(gate, Ticket())
    log = []
    w = spawn_waiter(gate, "w", log)
    gevent.sleep(0)
    gate.pause()
    gate.release()
    gevent.sleep(0)
    assert log == [] and gate.held == 0
    gate.resume()
    w.join(timeout=2)
    assert log == [("w", True, None)] and gate.held == 1


def test_cancel_all_empties_queue():
    gate = Gate(1)
    assert acquire(gate, Ticket())
    log = []
    ws = [spawn_waiter(gate, n, log) for n in range(5)]
    gevent.sleep(0)
    gate.cancel_all("shutdown")
    gevent.joinall(ws, timeout=2)
    assert all(not ok and why == "shutdown" for _, ok, why in log) and len(log) == 5
    assert gate.waiting == 0


def test_ticket_cancelled_before_its_owner_runs_is_not_granted():
    gate = Gate(1)
    assert acquire(gate, Ticket())
    log = []
    tickets = {}

    def waiter(name):
        t = tickets[name] = Ticket()
        log.append((name, acquire(gate, t), t.cancelled))

    gs = [gevent.spawn(waiter, n) for n in ("a", "b")]
    gevent.sleep(0)
    tickets["a"].cancel("left-queue")
    gate.release()  # before "a" has run to leave the queue: the slot must go to "b"
    gevent.joinall(gs, timeout=2)
    assert sorted(log) == [("a", False, "left-queue"), ("b", True, None)]
    gate.release()
    assert gate.held == 0


# -- the callback API: tickets with a wake callback, no greenlet -----------------------------


class Clients:
    """Tickets queued through ``Gate.enqueue``, as the server queues its clients: each ticket's
    ``wake`` records what happened to it and, by default, discards a cancelled ticket at once
    (the API's contract)."""

    def __init__(self, gate, discard_at_once=True):
        self.gate = gate
        self.discard_at_once = discard_at_once
        self.tickets = {}
        self.granted = []  # names, in the order their slots were granted
        self.cancelled = []  # (name, reason)

    def add(self, name):
        t = self.tickets[name] = Ticket(lambda: self.woken(name))
        if self.gate.enqueue(t):
            self.granted.append(name)
            return True
        return False

    def woken(self, name):
        t = self.tickets[name]
        if t.granted:
            self.granted.append(name)
        else:
            self.cancelled.append((name, t.cancelled))
            if self.discard_at_once:
                self.gate.discard(t)

    def queued(self):
        return [n for n, t in self.tickets.items() if t in list(self.gate.tickets())]


def test_enqueue_takes_free_slots_then_grants_in_arrival_order():
    gate = Gate(2)
    q = Clients(gate)
    assert q.add("a") and q.add("b")
    assert gate.would_wait()  # both slots are taken
    assert not q.add("c") and not q.add("d") and not q.add("e")
    assert gate.held == 2 and gate.waiting == 3 and q.queued() == ["c", "d", "e"]
    assert q.granted == ["a", "b"]
    gate.release()
    assert q.granted == ["a", "b", "c"]  # granted within release(), by its wake callback
    assert gate.held == 2 and gate.waiting == 2
    gate.release()
    gate.release()
    assert q.granted == ["a", "b", "c", "d", "e"] and gate.waiting == 0 and gate.held == 2
    gate.release()
    gate.release()
    assert gate.held == 0 and not gate.would_wait()


def test_a_newcomer_never_overtakes_a_waiter():
    gate = Gate(1)
    q = Clients(gate)
    assert q.add("a")
    assert not q.add("b")
    gate.release()  # the slot goes to b at once: there is no moment at which it is free
    assert q.granted == ["a", "b"] and gate.would_wait()
    assert not q.add("newcomer")
    # Even a newcomer queued from within a wake callback, as the slot is handed on.
    late = Clients(gate)

    def wake_and_arrive():
        q.woken("c")
        late.add("arrives during the hand-off")

    q.tickets["c"] = Ticket(wake_and_arrive)
    assert not gate.enqueue(q.tickets["c"])
    gate.release()  # to the newcomer, queued first
    assert q.granted == ["a", "b", "newcomer"] and late.granted == []
    gate.release()  # to c, whose wake brings in one more: it queues behind
    assert q.granted[-1] == "c" and late.granted == [] and gate.waiting == 1
    gate.release()
    assert late.granted == ["arrives during the hand-off"]


def test_a_cancelled_ticket_leaves_the_queue_and_is_never_granted():
    gate = Gate(1)
    q = Clients(gate)
    for name in "abc":
        q.add(name)
    q.tickets["b"].cancel("left-queue")
    assert q.cancelled == [("b", "left-queue")]  # the wake callback ran, and discarded it
    assert gate.waiting == 1 and q.queued() == ["c"]
    gate.discard(q.tickets["b"])  # a second discard does nothing
    assert gate.waiting == 1
    gate.release()
    assert q.granted == ["a", "c"]
    q.tickets["b"].cancel("again")  # ignored: it has left
    q.tickets["c"].cancel("too late")  # ignored once granted
    assert q.cancelled == [("b", "left-queue")] and q.tickets["c"].cancelled is None
    gate.discard(q.tickets["c"])  # no-op for a granted ticket: the slot stays held
    assert gate.held == 1
    gate.release()
    assert gate.held == 0


def test_a_cancelled_ticket_not_yet_discarded_is_skipped_at_release():
    gate = Gate(1)
    q = Clients(gate, discard_at_once=False)  # its owner has not run yet to leave the queue
    for name in "abcd":
        q.add(name)
    q.tickets["b"].cancel("left-queue")
    q.tickets["c"].cancel("queue-timeout")
    gate.release()
    assert q.granted == ["a", "d"]  # b and c are passed over, never granted
    assert not q.tickets["b"].granted and not q.tickets["c"].granted
    gate.discard(q.tickets["b"])  # their owners leave afterwards: nothing changes
    gate.discard(q.tickets["c"])
    assert gate.waiting == 0 and gate.held == 1
    # When the only waiter was cancelled, the slot goes back to the pool.
    q.add("e")
    q.tickets["e"].cancel("left-queue")
    gate.release()
    assert gate.held == 0 and q.granted == ["a", "d"]
    gate.discard(q.tickets["e"])
    assert q.add("f") and gate.held == 1


def test_a_ticket_cancelled_before_it_is_queued_is_not_queued():
    gate = Gate(1)
    q = Clients(gate)
    q.add("a")
    t = Ticket(lambda: None)
    t.cancel("left-queue")
    assert gate.enqueue(t) is False
    assert gate.waiting == 0 and list(gate.tickets()) == []
    gate.release()
    assert not t.granted and gate.held == 0


def test_pause_and_resume_keep_the_order_and_grant_up_to_the_free_slots():
    gate = Gate(3)
    q = Clients(gate)
    assert q.add("a")
    gate.pause()
    assert gate.paused and gate.would_wait()
    for name in "bcdef":
        assert not q.add(name)  # two slots are free, but paused: everyone queues
    gate.release()  # a finishes while paused: its slot is not handed on
    assert q.granted == ["a"] and gate.held == 0 and gate.waiting == 5
    gate.resume()
    assert not gate.paused
    assert q.granted == ["a", "b", "c", "d"]  # three free slots, to the three at the head
    assert gate.held == 3 and q.queued() == ["e", "f"]
    assert not q.add("g")  # a newcomer queues behind them
    gate.release()
    assert q.granted[-1] == "e"
    gate.pause()
    gate.release()
    gate.resume()  # resumed with one slot free
    assert q.granted[-1] == "f" and q.queued() == ["g"]
    gate.resume()  # resuming again changes nothing
    assert q.queued() == ["g"] and gate.held == 3


def test_cancel_all_cancels_every_waiter_and_leaves_the_holders():
    gate = Gate(2)
    q = Clients(gate)
    for name in "abcde":
        q.add(name)
    gate.cancel_all("shutdown")
    assert q.cancelled == [("c", "shutdown"), ("d", "shutdown"), ("e", "shutdown")]
    assert gate.waiting == 0 and list(gate.tickets()) == [] and gate.held == 2
    gate.release()
    gate.release()
    assert q.granted == ["a", "b"] and gate.held == 0


def test_release_with_nobody_waiting_frees_the_slot_and_one_too_many_raises():
    gate = Gate(2)
    q = Clients(gate)
    assert q.add("a") and q.add("b")
    gate.release()
    assert gate.held == 1 and not gate.would_wait()
    assert q.add("c")  # the freed slot is taken at once
    gate.release()
    gate.release()
    assert gate.held == 0
    # A release with no slot held would make a slot out of nothing: an error, not an overlap.
    with pytest.raises(ValueError):
        gate.release()
    assert gate.held == 0
    assert q.add("d") and q.add("e") and not q.add("f")  # still two slots, not three


def test_tickets_that_leave_are_not_kept():
    # Clients that leave the queue while one keeps waiting at its head (or in the middle of it)
    # must not make the gate hold on to them: memory stays flat over many departures.
    gate = Gate(1)
    q = Clients(gate)
    q.add("holder")
    q.add("head")  # waits throughout

    def churn(n):
        for _ in range(n):
            t = Ticket(lambda: None)
            gate.enqueue(t)
            t.cancel("left-queue")
            gate.discard(t)

    churn(1000)  # warm up
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        churn(20000)
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert grown < 64 * 1024, grown
    assert gate.waiting == 1 and q.queued() == ["head"]
    gate.release()
    assert q.granted == ["holder", "head"]


class GateModel(RuleBasedStateMachine):
    """Random enqueue / cancel / discard / release / pause / resume sequences against a model:
    a list of waiting names in arrival order, a count of held slots, a paused flag."""

    def __init__(self):
        super().__init__()
        self.slots = None
        self.gate = None

    @precondition(lambda self: self.gate is None)
    @rule(slots=st.integers(1, 3))
    def make(self, slots):
        self.slots = slots
        self.gate = Gate(slots)
        self.names = 0
        self.tickets = {}
        self.woken = []  # (name, granted), as the wake callbacks report them
        self.granted = []  # names in grant order, including immediate grants
        self.waiting = []  # the model: names queued and not cancelled, in arrival order
        self.undiscarded = []  # cancelled, wake called, not discarded yet
        self.held = 0
        self.paused = False

    def _wake(self, name):
        t = self.tickets[name]
        self.woken.append((name, t.granted))
        if t.granted:
            self.granted.append(name)

    def _grant_expected(self):
        # What the model hands out: free slots to the head of the queue, unless paused.
        expected = []
        while not self.paused and self.waiting and self.held < self.slots:
            expected.append(self.waiting.pop(0))
            self.held += 1
        return expected

    @precondition(lambda self: self.gate is not None)
    @rule()
    def enqueue(self):
        self.names += 1
        name = self.names
        t = self.tickets[name] = Ticket(lambda: self._wake(name))
        immediate = not self.paused and not self.waiting and self.held < self.slots
        assert self.gate.enqueue(t) is immediate
        if immediate:
            self.granted.append(name)
            self.held += 1
        else:
            self.waiting.append(name)

    @precondition(lambda self: self.gate is not None and self.waiting)
    @rule(data=st.data(), discard=st.booleans())
    def cancel(self, data, discard):
        name = data.draw(st.sampled_from(self.waiting))
        woken = len(self.woken)
        self.tickets[name].cancel("left-queue")
        assert self.woken[woken:] == [(name, False)]
        self.waiting.remove(name)
        if discard:
            self.gate.discard(self.tickets[name])
        else:
            self.undiscarded.append(name)

    @precondition(lambda self: self.gate is not None and self.undiscarded)
    @rule()
    def discard(self):
        self.gate.discard(self.tickets[self.undiscarded.pop(0)])

    @precondition(lambda self: self.gate is not None and self.held)
    @rule()
    def release(self):
        self.held -= 1
        before = len(self.granted)
        self.gate.release()
        assert self.granted[before:] == self._grant_expected()

    @precondition(lambda self: self.gate is not None and not self.held)
    @rule()
    def release_too_many(self):
        with pytest.raises(ValueError):
            self.gate.release()

    @precondition(lambda self: self.gate is not None)
    @rule()
    def pause(self):
        self.gate.pause()
        self.paused = True

    @precondition(lambda self: self.gate is not None)
    @rule()
    def resume(self):
        self.paused = False
        before = len(self.granted)
        self.gate.resume()
        assert self.granted[before:] == self._grant_expected()

    @precondition(lambda self: self.gate is not None)
    @rule()
    def cancel_all(self):
        cancelled = list(self.waiting)
        woken = len(self.woken)
        self.gate.cancel_all("shutdown")
        assert self.woken[woken:] == [(n, False) for n in cancelled]
        self.waiting.clear()
        for name in cancelled:
            self.gate.discard(self.tickets[name])

    @invariant()
    def agrees_with_the_model(self):
        if self.gate is None:
            return
        gate = self.gate
        assert gate.held == self.held <= self.slots
        assert gate.paused == self.paused
        assert gate.would_wait() == (self.paused or bool(self.waiting) or self.held == self.slots)
        # Tickets cancelled but not yet discarded may still count as waiting until they are.
        assert len(self.waiting) <= gate.waiting <= len(self.waiting) + len(self.undiscarded)
        live = [t for t in gate.tickets() if t.cancelled is None]
        assert live == [self.tickets[n] for n in self.waiting]
        # Grants go in arrival order, each at most once, never to a cancelled ticket.
        assert self.granted == sorted(set(self.granted))
        assert all(self.tickets[n].cancelled is None for n in self.granted)


GateModel.TestCase.settings = settings(max_examples=100, stateful_step_count=30, deadline=None)
test_the_callback_api_agrees_with_a_model = GateModel.TestCase
