"""Steps: the work in a connection's life that may block, run outside the event loop's path.

What it owns: running one blocking call (a hook, a restart, a name lookup) in a fresh greenlet
and handing its outcome back by a callback that arms what comes next. The rule it keeps:
``done`` is called exactly once, whatever happens to the step — it returns, raises, or is
killed (even before it started) — so whoever waits on a step can never be stranded.

A fresh greenlet per step keeps a step's leftovers (a ``gevent.Timeout`` a Python hook left
running, say) from reaching anything else: they die with it.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import gevent
from gevent import GreenletExit
from greenlet import getcurrent, greenlet

__all__ = ["Step"]

# Caught and handed to ``done``: what a step's own code may raise. Anything else (SystemExit,
# KeyboardInterrupt) goes on to gevent's hub.
_HANDED_BACK = (Exception, GreenletExit, gevent.Timeout)


class Step:
    """``fn(*args)`` in a greenlet of its own, from :meth:`start`; then ``done(result, error)``
    (``error`` is None, the exception it raised, or GreenletExit if it was killed). ``done``
    runs as the step's last act, in its greenlet, and must not block: it only arms what comes
    next.

    Started from the event loop itself, the step runs at once, until it first blocks (a hook
    that does not block is over before :meth:`start` returns); started elsewhere, it runs on
    the loop's next turn. Its greenlet is a plain one, a child of the hub: a step needs none of
    what a gevent Greenlet adds (links, a value kept for joiners), which cost as much again."""

    __slots__ = ("greenlet", "done", "fn", "args")

    def __init__(self, fn: Callable[..., Any], args: tuple, done: Callable[[Any, Any], object]):
        self.done: Optional[Callable[[Any, Any], object]] = done
        self.fn = fn
        self.args = args
        self.greenlet = None

    def start(self) -> Step:
        hub = gevent.get_hub()
        g = self.greenlet = greenlet(self._run, hub)
        if getcurrent() is hub:
            g.switch()
        else:
            hub.loop.run_callback(self._begin)
        return self

    def _begin(self) -> None:
        g = self.greenlet
        if g is not None and not g.dead:
            g.switch()

    def _run(self) -> None:
        fn, args = self.fn, self.args
        self.fn = self.args = None
        try:
            result, error = fn(*args), None
        except _HANDED_BACK as e:
            result, error = None, e
        self.greenlet = None
        done, self.done = self.done, None
        if done is not None:
            done(result, error)
        # Finished, its greenlet hands over to the hub's sink rather than to the hub: what is
        # thrown at it once it is dead (a timeout it left running) goes to its parent, and
        # must land there, not in the hub.
        getcurrent().parent = _sink()

    def kill(self) -> None:
        """Raise GreenletExit in the step (at its next blocking point); ``done`` follows, on
        the loop's next turn if the step never got to run. A command it runs is killed with
        its process group."""
        g = self.greenlet
        if g is None:
            return
        loop = gevent.get_hub().loop
        if not g:  # it has not begun: it never will
            self.greenlet = None
            done, self.done = self.done, None
            if done is not None:
                loop.run_callback(done, None, GreenletExit())
            return
        loop.run_callback(self._throw)

    def _throw(self) -> None:
        g = self.greenlet
        if g:
            g.throw(GreenletExit)

    cancel = kill


_SINKS: dict = {}


def _sink():
    """The greenlet (one per hub) that finished steps return to: it passes control straight
    back to the hub, and drops whatever is thrown at a finished step."""
    hub = gevent.get_hub()
    sink = _SINKS.get(hub)
    if sink is None or sink.dead:
        sink = _SINKS[hub] = greenlet(_drop, hub)  # started by the first step to finish
    return sink


def _drop(*_finished) -> None:
    hub = gevent.get_hub()
    while True:
        try:
            hub.switch()
        except BaseException:  # noqa: B036 - thrown at a finished step: nobody to tell
            pass
