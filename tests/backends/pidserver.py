"""A backend for tcplock's --backend-cmd tests: a TCP server that tells who it is.

Each client gets one line, ``PID GRANDCHILD INDEX LABEL`` (its process id, the process id of
the child it forked with --fork or 0, and TCPLOCK_BACKEND_INDEX and TCPLOCK_BACKEND from its
environment); the connection is closed once the client has closed its side. Clients are served
one at a time.

--port P        listen on 127.0.0.1:P
--hold-mb N     keep N MiB of memory (resident) more for each client that sends something
                (a readiness check that only connects costs nothing), until it exits;
                such a client is answered once it has sent its first bytes
--fork          fork a child that sleeps until killed (in the same process group)
--pidfile PATH  append "PID GRANDCHILD" to PATH once listening
--ignore-term   ignore SIGTERM
--start-delay S wait S seconds before listening (a server slow to start)
"""

import argparse
import os
import signal
import socket
import sys
import time


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--hold-mb", type=int, default=0)
    p.add_argument("--fork", action="store_true")
    p.add_argument("--pidfile")
    p.add_argument("--ignore-term", action="store_true")
    p.add_argument("--start-delay", type=float, default=0.0)
    args = p.parse_args()
    time.sleep(args.start_delay)
    if args.ignore_term:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    grandchild = 0
    if args.fork:
        grandchild = os.fork()
        if grandchild == 0:
            while True:
                time.sleep(3600)
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", args.port))
    listener.listen(16)
    if args.pidfile:
        with open(args.pidfile, "a") as f:
            f.write(f"{os.getpid()} {grandchild}\n")
    print(f"pidserver {os.getpid()} listening on {args.port}", flush=True)
    print("pidserver says hello on stderr", file=sys.stderr, flush=True)
    held = []
    env = os.environ
    answer = " ".join(
        [str(os.getpid()), str(grandchild), env.get("TCPLOCK_BACKEND_INDEX", "-"),
         env.get("TCPLOCK_BACKEND", "-")]
    )  # fmt: skip
    while True:
        conn, _ = listener.accept()
        try:
            if args.hold_mb:
                if not conn.recv(1):
                    conn.close()
                    continue
                held.append(b"x" * (args.hold_mb << 20))  # written, so resident
            conn.sendall(answer.encode() + b"\n")
            while conn.recv(4096):
                pass
        except OSError:
            pass
        conn.close()


if __name__ == "__main__":
    sys.exit(main())
