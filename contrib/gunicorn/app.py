"""A WSGI application whose every request talks to a fragile backend service through tcplock.

Each request opens a TCP connection to tcplock (not to the service), sends one line naming the
request, half-closes, and returns whatever the service answered. tcplock lets one connection
at a time through to the service, whichever gunicorn worker it comes from, because all the
workers connect to the one tcplock that gunicorn.conf.py starts.

Served by gunicorn's gevent worker, which monkey-patches the standard library, so a request
waiting for its turn in tcplock's queue blocks only its own greenlet.

Settings (environment): APP_LOCK_PORT, the port tcplock listens on (127.0.0.1, default 9000);
APP_REQUEST_TIMEOUT, how long a request may wait for its turn and its answer (default 60 s).
"""

import os
import socket

LOCK_ADDRESS = ("127.0.0.1", int(os.environ.get("APP_LOCK_PORT", "9000")))
REQUEST_TIMEOUT = float(os.environ.get("APP_REQUEST_TIMEOUT", "60"))


def ask_backend(line: bytes) -> bytes:
    """One exchange with the service, through tcplock: send a line, read the answer to EOF."""
    with socket.create_connection(LOCK_ADDRESS, timeout=REQUEST_TIMEOUT) as s:
        s.sendall(line + b"\n")
        s.shutdown(socket.SHUT_WR)
        chunks = []
        while True:
            data = s.recv(65536)
            if not data:
                return b"".join(chunks)
            chunks.append(data)


def app(environ, start_response):
    request = "{} {}".format(environ["REQUEST_METHOD"], environ.get("PATH_INFO", "/"))
    try:
        answer = ask_backend(request.encode("utf-8", "replace"))
    except OSError as e:  # tcplock down, backend refused, timed out...
        start_response("502 Bad Gateway", [("Content-Type", "text/plain")])
        return [f"backend unavailable: {e}\n".encode()]
    start_response("200 OK", [("Content-Type", "text/plain"), ("X-Worker-Pid", str(os.getpid()))])
    return [answer]
