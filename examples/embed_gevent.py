"""tcplock embedded in an existing gevent program.

A small gevent web application (a WSGI status page and a JSON API, served by
``gevent.pywsgi``) that also runs a TCPLock in the same process and event loop, and shows what
the lock is doing: how many clients wait (``lock.queued``) and which hold a slot
(``lock.active``).

    python examples/embed_gevent.py --backend 127.0.0.1:2003 --listen 9000 --http 8080

Then point clients at 127.0.0.1:9000 instead of the backend, and open http://127.0.0.1:8080/
(or fetch /status.json). Every option can also come from the environment (EMBED_BACKEND,
EMBED_LISTEN, EMBED_HTTP, EMBED_SLOTS, EMBED_DRAIN). Port 0 picks a free port; the line printed
at start-up gives the ports really bound. SIGTERM or SIGINT stops the program: the lock drains
its active connections (up to --drain seconds) and the program exits with status 0.
"""

# A gevent program patches the standard library first, before anything else is imported.
# tcplock does not do this for you: importing it never monkey-patches.
from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import html  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402

import gevent  # noqa: E402
from gevent.event import Event  # noqa: E402
from gevent.pywsgi import WSGIServer  # noqa: E402

from tcplock import TCPLock  # noqa: E402


def parse_address(text, default_host="127.0.0.1"):
    """``PORT`` or ``HOST:PORT`` (a bare port means loopback)."""
    host, sep, port = text.rpartition(":")
    return (host.strip("[]") if sep else default_host), int(port)


def status(lock):
    """What the application shows of the lock."""
    return {
        "listen": f"{lock.address[0]}:{lock.server_port}",
        "backend": "{}:{}".format(*lock.backend),
        "backend_state": lock.backends[0].state,  # "up" or "restarting"
        "slots": lock.slots,
        "queued": lock.queued,
        # conn.fields() is a connection as plain data (what /status shows of it): "client" is
        # "host:port", or "in-process" for a greenlet of this program holding a slot with
        # lock.slot().
        "active": [conn.fields() for conn in lock.active],
        "activations": lock.activations,
        "served": lock.served,
        "last_end": lock.last_end,
    }


PAGE = """<!doctype html>
<title>tcplock status</title>
<h1>tcplock on {listen}</h1>
<p>backend {backend}: {backend_state}</p>
<p>queued: <b id="queued">{queued}</b>, active: <b id="active">{n_active}</b>,
served: {served}, last end: {last_end}</p>
<table border=1><tr><th>id<th>client<th>active for<th>up<th>down</tr>
{rows}
</table>
"""


def make_app(lock):
    def app(environ, start_response):
        path = environ.get("PATH_INFO", "/")
        if path == "/status.json":
            body = json.dumps(status(lock)).encode()
            start_response("200 OK", [("Content-Type", "application/json")])
            return [body]
        if path == "/":
            s = status(lock)
            rows = "\n".join(
                "<tr><td>{id}<td>{client}<td>{active_seconds}s<td>{bytes_up}<td>{bytes_down}</tr>".format(
                    **{k: html.escape(str(v)) for k, v in c.items()}
                )
                for c in s["active"]
            )
            body = PAGE.format(
                listen=html.escape(s["listen"]),
                backend=html.escape(s["backend"]),
                backend_state=html.escape(s["backend_state"]),
                queued=s["queued"],
                n_active=len(s["active"]),
                served=s["served"],
                last_end=html.escape(str(s["last_end"])),
                rows=rows,
            ).encode()
            start_response("200 OK", [("Content-Type", "text/html; charset=utf-8")])
            return [body]
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"not found\n"]

    return app


def main(argv=None):
    env = os.environ.get
    p = argparse.ArgumentParser(description="a gevent web app with an embedded tcplock")
    p.add_argument("--backend", default=env("EMBED_BACKEND"), help="HOST:PORT of the service")
    p.add_argument("--listen", default=env("EMBED_LISTEN", "9000"), help="[HOST:]PORT for clients")
    p.add_argument("--http", default=env("EMBED_HTTP", "8080"), help="[HOST:]PORT of the page")
    p.add_argument("--slots", type=int, default=int(env("EMBED_SLOTS", "1")))
    p.add_argument("--drain", type=float, default=float(env("EMBED_DRAIN", "10")))
    args = p.parse_args(argv)
    if not args.backend:
        p.error("--backend (or EMBED_BACKEND) is required")

    lock = TCPLock(
        parse_address(args.listen),
        parse_address(args.backend, "localhost"),
        slots=args.slots,
        drain_timeout=args.drain,
    )
    lock.start()
    web = WSGIServer(parse_address(args.http), make_app(lock), log=None)
    web.start()
    print(
        f"tcplock on {lock.address[0]}:{lock.server_port}, "
        f"status page on http://{web.address[0]}:{web.server_port}/",
        file=sys.stderr,
        flush=True,
    )

    stop = Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        gevent.signal_handler(sig, stop.set)
    stop.wait()
    print(f"stopping: {len(lock.active)} active, {lock.queued} queued", file=sys.stderr)
    lock.stop()  # stops accepting, closes waiting clients, drains active ones
    web.stop(timeout=1)
    print("stopped", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
