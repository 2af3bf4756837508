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
from gevent import Greenlet, GreenletExit

__all__ = ["Step"]

# Caught and handed to ``done``: what a step's own code may raise. Anything else (SystemExit,
# KeyboardInterrupt) goes on to gevent's hub after ``done`` has been scheduled.
_HANDED_BACK = (Exception, GreenletExit, gevent.Timeout)


class Step:
    """``fn(*args)`` in a greenlet of its own; then ``done(result, error)`` (``error`` is None,
    the exception it raised, or GreenletExit if it was killed). ``done`` runs as the step's
    last act, in its greenlet, and must not block: it only arms what comes next."""

    __slots__ = ("greenlet", "done")

    def __init__(self, fn: Callable[..., Any], args: tuple, done: Callable[[Any, Any], object]):
        self.done: Optional[Callable[[Any, Any], object]] = done
        self.greenlet = Greenlet.spawn(self._run, fn, args)

    def _run(self, fn, args) -> None:
        try:
            result, error = fn(*args), None
        except _HANDED_BACK as e:
            result, error = None, e
        self.greenlet = None
        done, self.done = self.done, None
        if done is not None:
            done(result, error)

    def kill(self) -> None:
        """Raise GreenletExit in the step (at its next blocking point); ``done`` follows, from
        the event loop if the step never got to run. A command it runs is killed with its
        process group."""
        g = self.greenlet
        if g is not None:
            g.rawlink(self._killed)
            g.kill(block=False)

    def _killed(self, _greenlet) -> None:
        self.greenlet = None
        done, self.done = self.done, None
        if done is not None:  # it never ran: nothing reported yet
            done(None, GreenletExit())

    cancel = kill
