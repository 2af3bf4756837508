"""The ``tcplock`` command's log: one line per connection, at thousands of connections a second.

What it owns: the text and JSON line formats, and the output they go to. The rules it keeps: a
connection's line is made from the connection (its text line from ``conn.describe()``, its JSON
line from ``conn.fields()``, the one projection that ``/status`` and the hook environment are
made from too); lines are written in batches, at most 0.02 s after they happen, and a warning or
an error at once, after the lines before it; nothing here stops the proxy when the log cannot be
written. Needs gevent's hub for the batches; loads nothing of tcplock's command.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any, Callable

__all__ = [
    "TextFormatter",
    "JSONFormatter",
    "BatchedStream",
    "LineHandler",
    "connection_writer",
    "setup_logging",
]


class TextFormatter(logging.Formatter):
    """``time LEVEL message``; the date and time part is formatted once per second, not once
    per line (there is a line for every connection)."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(message)s")
        self._second = None
        self._stamp = ""  # the second's part, with the comma: "2026-01-31 12:00:00,"

    def formatTime(self, record: logging.LogRecord, datefmt=None) -> str:
        return self.stamp(record.created, record.msecs)

    def stamp(self, created: float, msecs: float) -> str:
        second = int(created)
        if second != self._second:
            self._second = second
            self._stamp = time.strftime("%Y-%m-%d %H:%M:%S,", self.converter(created))
        return self._stamp + _MILLIS[int(msecs)]

    def connection_line(self, conn, created: float) -> str:
        """A connection's INFO line, as :meth:`format` makes it from its record."""
        # As stamp(created, _msecs(created)), inline: this runs for every connection.
        second = int(created)
        if second != self._second:
            self._second = second
            self._stamp = time.strftime("%Y-%m-%d %H:%M:%S,", self.converter(created))
        millis = _MILLIS[int((created - second) * 1000)]
        return self._stamp + millis + " INFO " + conn.describe()

    def format(self, record: logging.LogRecord) -> str:
        # What logging.Formatter.format does for this fixed layout, without its generic steps.
        record.message = record.getMessage()
        line = f"{self.formatTime(record)} {record.levelname} {record.message}"
        if record.exc_info or record.exc_text or record.stack_info:
            record.asctime = self.formatTime(record)
            return super().format(record)
        return line


class BatchedStream:
    """The log's output: lines are gathered and written together, at most ``delay`` seconds
    after the first of them, or at once when ``limit`` characters are waiting or on
    :meth:`flush`: one write() per batch, never one per line. Written from the event loop (a
    timer); needs gevent's hub.

    A line may also be given as the function that makes it (:meth:`defer`): it is made when
    the batch is written, with the others, in one loop, off the hand-off's path. (BENCHMARKS.md
    has what each of these saved.)
    """

    #: What a deferred line counts for against ``limit``, before it is made.
    deferred_size = 128

    def __init__(self, stream, delay: float = 0.02, limit: int = 1 << 16) -> None:
        self.stream = stream
        self.delay = delay
        self.limit = limit
        self._parts: list = []  # text, or (make, a, b): the text is make(a, b)
        self._size = 0
        self._timer = None

    def write(self, text: str) -> None:
        self._parts.append(text)
        self._added(len(text))

    def defer(self, make: Callable[[Any, Any], str], a, b) -> None:
        """Add the line ``make(a, b)`` (its newline is added), to be made when the batch is
        written."""
        self._parts.append((make, a, b))
        # (As _added(deferred_size), inline: a line per connection comes this way.)
        self._size += self.deferred_size
        if self._size >= self.limit:
            self.flush()
        elif self._timer is None:
            self._added(0)

    def _added(self, size: int) -> None:
        self._size += size
        if self._size >= self.limit:
            self.flush()
        elif self._timer is None:
            import gevent

            # A new timer per batch: a libev timer started again once it has fired would
            # fire at once.
            self._timer = gevent.get_hub().loop.timer(self.delay, ref=False)
            self._timer.start(self.flush)

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.stop()
            self._timer.close()
            self._timer = None
        if not self._parts:
            return
        parts, self._parts = self._parts, []
        self._size = 0
        for i, part in enumerate(parts):
            if part.__class__ is tuple:
                try:
                    parts[i] = part[0](part[1], part[2]) + "\n"
                except Exception as e:  # a line that cannot be made must not cost the others
                    parts[i] = f"(a log line could not be made: {e!r})\n"
        text = "".join(parts)
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):
            pass  # nowhere to log to: the proxy goes on

    def close(self) -> None:
        self.flush()


class LineHandler(logging.StreamHandler):
    """A StreamHandler without its lock, that flushes at once only what matters.

    The CLI logs from one thread, the event loop's, and a line is written without yielding, so
    lines cannot interleave, and no lock is needed (under gevent's monkey-patching the
    handler's lock would be a Python-level RLock, taken twice per line). Over a
    :class:`BatchedStream`, a warning or an error is written out at once
    (with the lines before it); an info line waits for its batch.
    """

    def createLock(self) -> None:
        self.lock = None

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.stream.write(self.format(record) + self.terminator)
            if record.levelno >= logging.WARNING or not isinstance(self.stream, BatchedStream):
                self.flush()
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)

    def handle(self, record: logging.LogRecord):
        rv = self.filter(record)
        if isinstance(rv, logging.LogRecord):  # Python 3.12+: a filter may return a record
            record = rv
        if rv:
            self.emit(record)
        return rv

    def flush(self) -> None:
        stream = self.stream
        if stream is not None and hasattr(stream, "flush"):
            stream.flush()


class JSONFormatter(logging.Formatter):
    """One JSON object per line, with ``time`` and ``level``. A connection's line carries
    ``conn.fields()`` as they are (``id``, ``client``, ``backend``, ``activation``,
    ``queued_seconds``, ``active_seconds``, ``bytes_up``, ``bytes_down``, ``end``); other
    lines carry ``message``, and a line that a supervised backend printed, its ``backend``."""

    def format(self, record: logging.LogRecord) -> str:
        data = {"time": self._time(record), "level": record.levelname}
        conn = getattr(record, "connection", None)
        if conn is not None:
            data.update(conn.fields())
        else:
            data["message"] = record.getMessage()
            backend = getattr(record, "backend", None)
            if backend is not None:
                data["backend"] = backend
        if record.exc_info:
            data["exception"] = self.formatException(record.exc_info)
        return json.dumps(data)

    def connection_line(self, conn, created: float) -> str:
        """A connection's INFO line, as :meth:`format` makes it from its record."""
        record = logging.makeLogRecord({"created": created, "msecs": _msecs(created)})
        data = {"time": self._time(record), "level": "INFO"}
        data.update(conn.fields())
        return json.dumps(data)

    def _time(self, record: logging.LogRecord) -> str:
        return (
            self.formatTime(record, "%Y-%m-%dT%H:%M:%S")
            + f".{int(record.msecs):03d}"
            + time.strftime("%z", self.converter(record.created))
        )


#: "000" to "999": the milliseconds of a time stamp, without formatting an int each time.
_MILLIS = tuple(f"{ms:03d}" for ms in range(1000))


def _msecs(created: float) -> float:
    # As logging.LogRecord computes it.
    return int((created - int(created)) * 1000) + 0.0


def connection_writer(handler: logging.StreamHandler):
    """A :attr:`TCPLock.connection_log` that writes each connection's line straight to the
    handler's stream, the line the handler would write for its record (over a
    :class:`BatchedStream`, made when the batch is written), without a log record: the logging
    machinery is kept for the lines that are not per connection."""
    line = handler.formatter.connection_line
    stream = handler.stream
    if isinstance(stream, BatchedStream):
        add = stream.defer
        now = time.time

        def defer(conn) -> None:
            add(line, conn, now())

        return defer

    def write(conn) -> None:
        try:
            stream.write(line(conn, time.time()) + "\n")
            stream.flush()
        except (OSError, ValueError):
            pass  # as the handler would: a log that cannot be written does not stop the proxy

    return write


def setup_logging(level: str, fmt: str = "text", batched: bool = False) -> logging.Handler:
    """Send every log record to standard error, as ``fmt`` (text or json) lines at ``level``
    and above, over a :class:`BatchedStream` if ``batched``; returns the one handler."""
    # tcplock's log lines need none of the caller's file and line, thread, or process: skip
    # computing them for every record (under gevent, naming the "thread" of each greenlet is
    # costly). _srcfile = None is the logging module's own switch for the caller lookup.
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    logging._srcfile = None
    handler = LineHandler(BatchedStream(sys.stderr) if batched else sys.stderr)
    if fmt == "json":
        handler.setFormatter(JSONFormatter())
    else:
        handler.setFormatter(TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper()))
    return handler
