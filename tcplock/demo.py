"""A demo backend: a toy service that, like the ones tcplock protects, should see one client at
a time. It greets each client with how many clients it is serving at that moment, then echoes
each line back in upper case. ``tcplock --demo`` starts one in-process; ``python -m
tcplock.demo [PORT]`` runs one on its own.
"""

from __future__ import annotations

import sys

from gevent.server import StreamServer

__all__ = ["DemoBackend"]


class DemoBackend(StreamServer):
    def __init__(self, listener=("127.0.0.1", 8100)) -> None:
        super().__init__(listener)
        #: Clients connected right now, and the most ever connected at once.
        self.current = 0
        self.most = 0
        self.total = 0

    def handle(self, sock, address) -> None:
        self.current += 1
        self.total += 1
        self.most = max(self.most, self.current)
        try:
            sock.sendall(
                b"demo backend: you are client #%d; clients connected now: %d\r\n"
                % (self.total, self.current)
            )
            reader = sock.makefile("rb")
            for line in reader:
                sock.sendall(b"echo: " + line.upper())
        except OSError:
            pass
        finally:
            self.current -= 1


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    port = int(argv[0]) if argv else 8100
    server = DemoBackend(("127.0.0.1", port))
    print(f"demo backend on 127.0.0.1:{server.server_port or port}", file=sys.stderr)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
