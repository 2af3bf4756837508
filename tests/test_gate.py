"""The FIFO gate on its own: hand-off order, cancellation, kills, pause and resume."""

import gevent
import pytest

from tcplock.gate import Gate, Ticket


def spawn_waiter(gate, name, log, timeout=None):
    def run():
        t = Ticket()
        got = gate.acquire(t, timeout)
        log.append((name, got, t.cancelled))
        return t

    return gevent.spawn(run)


def test_newcomer_takes_free_slot_when_nobody_waits():
    gate = Gate(2)
    assert gate.acquire(Ticket()) and gate.acquire(Ticket())
    assert gate.held == 2 and gate.would_wait()


def test_client_arriving_at_release_queues_behind_waiters():
    gate = Gate(1)
    assert gate.acquire(Ticket())
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
    assert gate.acquire(Ticket())
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
    assert gate.acquire(Ticket())
    log = []
    tickets = {}

    def waiter(name):
        t = tickets[name] = Ticket()
        log.append((name, gate.acquire(t), t.cancelled))

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
    assert gate.acquire(Ticket())
    t = Ticket()
    assert gate.acquire(t, timeout=0.05) is False
    assert t.cancelled is None and gate.waiting == 0
    gate.release()
    assert gate.held == 0


def test_killed_waiter_that_was_granted_passes_slot_on():
    gate = Gate(1)
    assert gate.acquire(Ticket())
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
    assert gate.acquire(Ticket())
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
    assert gate.acquire(Ticket())
    log = []
    ws = [spawn_waiter(gate, n, log) for n in range(5)]
    gevent.sleep(0)
    gate.cancel_all("shutdown")
    gevent.joinall(ws, timeout=2)
    assert all(not ok and why == "shutdown" for _, ok, why in log) and len(log) == 5
    assert gate.waiting == 0


def test_many_cancelled_tickets_do_not_accumulate():
    gate = Gate(1)
    assert gate.acquire(Ticket())
    tickets = [Ticket() for _ in range(500)]
    ws = [gevent.spawn(gate.acquire, t) for t in tickets]
    gevent.sleep(0)
    for t in tickets[:-1]:
        t.cancel("left-queue")
    gevent.joinall(ws[:-1], timeout=2)
    assert gate.waiting == 1
    assert len(gate._queue) <= 64
    gate.release()
    assert ws[-1].get(timeout=2) is True


def test_ticket_cancelled_before_its_owner_runs_is_not_granted():
    gate = Gate(1)
    assert gate.acquire(Ticket())
    log = []
    tickets = {}

    def waiter(name):
        t = tickets[name] = Ticket()
        log.append((name, gate.acquire(t), t.cancelled))

    gs = [gevent.spawn(waiter, n) for n in ("a", "b")]
    gevent.sleep(0)
    tickets["a"].cancel("left-queue")
    gate.release()  # before "a" has run to leave the queue: the slot must go to "b"
    gevent.joinall(gs, timeout=2)
    assert sorted(log) == [("a", False, "left-queue"), ("b", True, None)]
    gate.release()
    assert gate.held == 0
