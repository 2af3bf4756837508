"""The PROXY protocol: ``accept_proxy`` on the listen port, ``send_proxy``/``send_proxy_v2``
toward the backend.

Headers are written out here byte by byte from HAProxy's doc/proxy-protocol.txt (not made by
tcplock's own code) and sent on real loopback sockets; the address a header names is then what
the log, ``allow``, hooks and ``/status`` see. The backends record every byte they receive, so a
header that leaks through, or a client byte lost after one, shows.
"""

from __future__ import annotations

import fcntl
import ipaddress
import json
import re
import socket as _stdsocket
import struct
import termios
import time

import gevent
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from conftest import LOOPBACK, connect, http, recv_all, recv_exactly, run_cli, wait_until
from tcplock import TCPLock
from tcplock.proxyproto import HeaderError, HeaderReader, make_v1, make_v2

pytestmark = pytest.mark.timeout(30)

# The v2 signature, as the spec gives it.
SIG = b"\x0d\x0a\x0d\x0a\x00\x0d\x0a\x51\x55\x49\x54\x0a"


def v2(command, family, block):
    """A v2 header: version 2 with ``command`` (0 LOCAL, 1 PROXY), family/protocol byte."""
    return SIG + bytes([0x20 | command, family]) + struct.pack("!H", len(block)) + block


def v2_tcp4(src, sport, dst, dport, tlvs=b""):
    block = _stdsocket.inet_aton(src) + _stdsocket.inet_aton(dst) + struct.pack("!HH", sport, dport)
    return v2(1, 0x11, block + tlvs)


def v2_tcp6(src, sport, dst, dport):
    pton = lambda a: _stdsocket.inet_pton(_stdsocket.AF_INET6, a)  # noqa: E731
    return v2(1, 0x21, pton(src) + pton(dst) + struct.pack("!HH", sport, dport))


def proxied(make_backend, make_lock, behaviour="echo", **kw):
    backend = make_backend(behaviour)
    lock = make_lock(backend, accept_proxy=True, **kw)
    return backend, lock


def closed(sock):
    """tcplock closed the connection: an orderly close, or a reset if the bytes the client
    sent arrived before the close and were left unread."""
    try:
        assert recv_all(sock) == b""
    except ConnectionResetError:
        pass


def real(sock):
    """The client's own address as tcplock's log writes it."""
    return "{}:{}".format(*sock.getsockname())


# -- accepting -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "header, client",
    [
        (b"PROXY TCP4 192.0.2.7 198.51.100.1 4242 9000\r\n", "192.0.2.7:4242"),
        (b"PROXY TCP4 0.0.0.0 255.255.255.255 0 65535\r\n", "0.0.0.0:0"),
        (b"PROXY TCP6 2001:db8::7 2001:db8::1 4242 9000\r\n", "[2001:db8::7]:4242"),
        (b"PROXY TCP6 ::ffff:192.0.2.7 ::ffff:127.0.0.1 4242 9000\r\n", "[::ffff:192.0.2.7]:4242"),
        (v2_tcp4("192.0.2.7", 4242, "198.51.100.1", 9000), "192.0.2.7:4242"),
        (v2_tcp6("2001:db8::7", 4242, "2001:db8::1", 9000), "[2001:db8::7]:4242"),
        # TLVs (here an ALPN and a NOOP) are skipped, never passed on.
        (
            v2_tcp4("192.0.2.7", 4242, "198.51.100.1", 9000, b"\x01\x00\x02h2\x04\x00\x03xyz"),
            "192.0.2.7:4242",
        ),
    ],
    ids=["v1-tcp4", "v1-tcp4-extremes", "v1-tcp6", "v1-tcp6-mapped", "v2-tcp4", "v2-tcp6", "tlv"],
)
def test_the_header_gives_the_client_address_and_the_bytes_after_it_reach_the_backend(
    make_backend, make_lock, conn_log, header, client
):
    backend, lock = proxied(make_backend, make_lock)
    c = connect(lock.server_port)
    payload = b"GET / HTTP/1.0\r\n\r\n" + bytes(range(256))
    c.sendall(header + payload)  # one segment: the header and the client's first bytes
    assert recv_exactly(c, len(payload)) == payload
    c.shutdown(_stdsocket.SHUT_WR)
    assert recv_all(c) == b""
    conn = backend.next_conn()
    assert bytes(conn.received) == payload
    end = conn_log.next_end()
    assert (end["client"], end["end"], end["up"]) == (client, "closed", str(len(payload)))
    c.close()


@pytest.mark.parametrize(
    "header",
    [
        b"PROXY UNKNOWN\r\n",
        b"PROXY UNKNOWN ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff ::1 65535 65535\r\n",
        v2(0, 0x00, b""),  # LOCAL, as a health check sends it
        v2(0, 0x11, bytes(12)),  # LOCAL with an address block: skipped, not used
        v2(1, 0x00, b""),  # PROXY over an unspecified family
        v2(1, 0x31, b"/src".ljust(108, b"\0") + b"/dst".ljust(108, b"\0")),  # AF_UNIX
        v2(1, 0x12, bytes(12)),  # UDP over IPv4: not a TCP client
    ],
    ids=["v1-unknown", "v1-unknown-long", "v2-local", "v2-local-addr", "v2-unspec", "unix", "udp"],
)
def test_unknown_and_local_use_the_real_peer(make_backend, make_lock, conn_log, header):
    backend, lock = proxied(make_backend, make_lock)
    c = connect(lock.server_port)
    me = real(c)
    c.sendall(header + b"ping")
    assert recv_exactly(c, 4) == b"ping"
    c.close()
    assert bytes(backend.next_conn().received) == b"ping"
    end = conn_log.next_end()
    assert end["client"] == me and end["end"] == "closed"


@pytest.mark.parametrize("pieces", [3, 7, 1000], ids=["3-pieces", "7-pieces", "byte-by-byte"])
@pytest.mark.parametrize("version", [1, 2])
def test_a_header_split_over_several_sends(make_backend, make_lock, conn_log, version, pieces):
    backend, lock = proxied(make_backend, make_lock)
    if version == 1:
        header = b"PROXY TCP6 2001:db8:0:0:1:2:3:4 2001:db8::1 65535 1\r\n"
        client = "[2001:db8::1:2:3:4]:65535"
    else:
        header = v2_tcp4("203.0.113.9", 5555, "198.51.100.1", 9000, b"\x04\x00\x05abcde")
        client = "203.0.113.9:5555"
    c = connect(lock.server_port)
    c.setsockopt(_stdsocket.IPPROTO_TCP, _stdsocket.TCP_NODELAY, 1)
    size = max(1, -(-(len(header) - 1) // pieces))
    for i in range(0, len(header) - 1, size):
        c.sendall(header[i : min(i + size, len(header) - 1)])
        gevent.sleep(0.002)  # a separate segment, read separately
    wait_until(lambda: len(lock.connections) == 1)
    gevent.sleep(0.02)
    # Nothing reaches the queue or the backend before the header is complete...
    assert lock.connections[0].state == "header" and lock.queued == 0
    assert backend.count == 0
    c.sendall(header[-1:] + b"after")
    assert recv_exactly(c, 5) == b"after"  # ... and the client goes on once it is
    c.close()
    assert bytes(backend.next_conn().received) == b"after"
    assert conn_log.next_end()["client"] == client


def test_a_header_not_complete_in_time_is_closed_and_the_backend_never_reached(
    make_backend, make_lock, conn_log
):
    backend, lock = proxied(make_backend, make_lock, proxy_header_timeout=0.3)
    silent = connect(lock.server_port)
    partial = connect(lock.server_port)
    partial.sendall(b"PROXY TCP4 192.0.2.7 198.51.100.1 4")
    with gevent.Timeout(3):
        assert recv_all(silent) == b""
    ends = [conn_log.next_end(), conn_log.next_end()]
    assert [e["end"] for e in ends] == ["bad-proxy-header"] * 2
    assert {e["client"] for e in ends} == {real(silent), real(partial)}
    assert float(ends[0]["queued"]) >= 0.25
    assert any("no complete header within 0.3s" in line for line in conn_log.lines)
    assert recv_all(partial) == b""  # what it sent was all header: an orderly close
    assert backend.count == 0
    assert lock.status()["ended"] == {"bad-proxy-header": 2}


def test_while_one_client_has_not_sent_its_header_others_go_ahead(make_backend, make_lock):
    """Reading a header comes before the queue: a slow proxy connection holds no place."""
    backend, lock = proxied(make_backend, make_lock)
    slow = connect(lock.server_port)
    slow.sendall(b"PROXY TCP4 192.0.2.1 ")
    fast = connect(lock.server_port)
    fast.sendall(b"PROXY TCP4 192.0.2.2 198.51.100.1 1 2\r\nfast")
    assert recv_exactly(fast, 4) == b"fast"
    assert lock.queued == 0 and lock.status()["active"][0]["client"] == "192.0.2.2:1"
    fast.close()
    slow.sendall(b"198.51.100.1 1 2\r\nslow")
    assert recv_exactly(slow, 4) == b"slow"
    slow.close()


BAD = {
    "http": b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    "octet-v4": b"PROXY TCP4 999.1.1.1 198.51.100.1 1 2\r\n",
    "port-70000": b"PROXY TCP4 192.0.2.7 198.51.100.1 70000 2\r\n",
    "port-leading-zero": b"PROXY TCP4 192.0.2.7 198.51.100.1 080 2\r\n",
    "octet-leading-zero": b"PROXY TCP4 192.0.2.07 198.51.100.1 1 2\r\n",
    "v6-in-tcp4": b"PROXY TCP4 ::1 ::1 1 2\r\n",
    "v4-in-tcp6": b"PROXY TCP6 192.0.2.7 198.51.100.1 1 2\r\n",
    "v6-zone": b"PROXY TCP6 fe80::1%eth0 fe80::2 1 2\r\n",
    "v6-two-double-colons": b"PROXY TCP6 2001::db8::1 ::1 1 2\r\n",
    "newline-inside": b"PROXY TCP4 192.0.2.7\n198.51.100.1 1 2\r\n",
    "lone-lf": b"PROXY TCP4 192.0.2.7 198.51.100.1 1 2\n",
    "cr-inside": b"PROXY TCP4 192.0.2.7\r198.51.100.1 1 2\r\n",
    "two-spaces": b"PROXY TCP4  192.0.2.7 198.51.100.1 1 2\r\n",
    "missing-port": b"PROXY TCP4 192.0.2.7 198.51.100.1 1\r\n",
    "extra-field": b"PROXY TCP4 192.0.2.7 198.51.100.1 1 2 3\r\n",
    "lower-case": b"proxy TCP4 192.0.2.7 198.51.100.1 1 2\r\n",
    "udp4": b"PROXY UDP4 192.0.2.7 198.51.100.1 1 2\r\n",
    "nul": b"PROXY TCP4 192.0.2.7\x00198.51.100.1 1 2\r\n",
    "oversize": b"PROXY UNKNOWN " + b"x" * 100 + b"\r\n",
    "no-crlf": b"PROXY " + b"1" * 120,
    "v2-version-1": SIG + b"\x11\x11\x00\x0c" + bytes(12),
    "v2-command-2": SIG + b"\x22\x11\x00\x0c" + bytes(12),
    "v2-family-4": SIG + b"\x21\x41\x00\x0c" + bytes(12),
    "v2-protocol-3": SIG + b"\x21\x13\x00\x0c" + bytes(12),
    "v2-short-block": SIG + b"\x21\x21\x00\x0c" + bytes(12),  # IPv6 needs 36
    "v2-bad-signature": SIG[:-1] + b"\x0b\x21\x11\x00\x0c" + bytes(12),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_a_bad_header_is_closed_at_once_and_never_reaches_the_backend(
    make_backend, make_lock, conn_log, name
):
    backend, lock = proxied(make_backend, make_lock, proxy_header_timeout=20)
    c = connect(lock.server_port)
    c.sendall(BAD[name] + b"client bytes")
    closed(c)
    end = conn_log.next_end(timeout=1)  # not the 20 s of the header timeout
    assert (end["client"], end["end"]) == (real(c), "bad-proxy-header")
    assert any("bad PROXY header" in line for line in conn_log.lines)
    assert not any("\n" in line or "\r" in line for line in conn_log.lines)
    assert backend.count == 0
    c.close()


def test_a_header_from_outside_the_trusted_networks_is_never_read(
    make_backend, make_lock, conn_log
):
    backend, lock = proxied(make_backend, make_lock, trusted_proxy=["10.0.0.0/8"])
    c = connect(lock.server_port)
    c.sendall(b"PROXY TCP4 10.1.2.3 10.0.0.1 4242 9000\r\nhello")
    closed(c)
    end = conn_log.next_end()
    assert (end["client"], end["end"]) == (real(c), "untrusted-proxy")
    assert backend.count == 0
    # Trusting loopback again lets the same proxy in.
    lock.trusted_proxy = ["10.0.0.0/8", "127.0.0.1/32"]
    c = connect(lock.server_port)
    c.sendall(b"PROXY TCP4 10.1.2.3 10.0.0.1 4242 9000\r\nhello")
    assert recv_exactly(c, 5) == b"hello"
    c.close()
    assert conn_log.next_end()["client"] == "10.1.2.3:4242"


def test_loopback_is_trusted_by_default_and_nothing_else(make_backend, make_lock):
    _, lock = proxied(make_backend, make_lock)
    assert lock.trusted_proxy is None
    c = connect(lock.server_port)
    c.sendall(b"PROXY TCP4 10.1.2.3 10.0.0.1 4242 9000\r\nhi")
    assert recv_exactly(c, 2) == b"hi"
    c.close()
    _, lock = proxied(make_backend, make_lock, trusted_proxy=["::1/128"])
    c = connect(lock.server_port)
    c.sendall(b"PROXY TCP4 10.1.2.3 10.0.0.1 4242 9000\r\nhi")
    closed(c)


def test_allow_applies_to_the_address_in_the_header(make_backend, make_lock, conn_log):
    """127.0.0.1, the proxy, is outside ``allow``: only the header's address counts."""
    backend, lock = proxied(make_backend, make_lock, allow=["192.0.2.0/24"])
    inside = connect(lock.server_port)
    inside.sendall(b"PROXY TCP4 192.0.2.9 198.51.100.1 1111 9000\r\nin")
    assert recv_exactly(inside, 2) == b"in"
    inside.close()
    assert conn_log.next_end()["client"] == "192.0.2.9:1111"
    outside = connect(lock.server_port)
    outside.sendall(b"PROXY TCP4 198.51.100.77 198.51.100.1 2222 9000\r\n")
    assert recv_all(outside) == b""
    end = conn_log.next_end()
    assert (end["client"], end["end"]) == ("198.51.100.77:2222", "not-allowed")
    assert backend.count == 1


def test_hooks_and_status_see_the_address_in_the_header(make_backend, make_lock):
    seen = []
    backend, lock = proxied(
        make_backend, make_lock, behaviour="hold", on_activate=lambda c: seen.append(c.hook_env())
    )
    c = connect(lock.server_port)
    c.sendall(b"PROXY TCP6 2001:db8::42 2001:db8::1 31337 9000\r\nx")
    conn = backend.next_conn()
    wait_until(lambda: conn.received == b"x")
    (env,) = seen
    assert env["TCPLOCK_CLIENT"] == "[2001:db8::42]:31337"
    assert (env["TCPLOCK_CLIENT_HOST"], env["TCPLOCK_CLIENT_PORT"]) == ("2001:db8::42", "31337")
    (entry,) = lock.status()["active"]
    assert entry["client"] == "[2001:db8::42]:31337"
    (active,) = lock.active
    assert active.peer[:2] == (LOOPBACK, c.getsockname()[1])  # where it came from: the proxy
    c.close()


def test_stopping_ends_a_connection_still_sending_its_header(make_backend, make_lock, conn_log):
    backend, lock = proxied(make_backend, make_lock, proxy_header_timeout=60)
    c = connect(lock.server_port)
    c.sendall(b"PROXY ")
    wait_until(lambda: lock.connections)
    with gevent.Timeout(2):
        lock.stop(timeout=30)  # nothing to drain: it returns at once
    assert conn_log.next_end()["end"] == "shutdown"
    assert backend.count == 0


def test_connections_still_sending_their_header_count_against_max_queue(
    make_backend, make_lock, conn_log
):
    """A trusted peer that opens connections and sends nothing cannot hold more descriptors
    than max_queue (the budget it comes from) and the free slots: past that, a connection is
    closed at once as queue-full, not after the header timeout."""
    backend, lock = proxied(make_backend, make_lock, max_queue=2, proxy_header_timeout=30)
    active = connect(lock.server_port)
    active.sendall(b"PROXY TCP4 192.0.2.1 198.51.100.1 1 2\r\nping")
    assert recv_exactly(active, 4) == b"ping"  # the one slot is held
    silent = [connect(lock.server_port) for _ in range(5)]
    ends = [conn_log.next_end(timeout=2) for _ in range(3)]  # at once, not in 30 s
    assert [e["end"] for e in ends] == ["queue-full"] * 3
    assert [c.state for c in lock.connections].count("header") == 2
    for s in silent:
        s.close()
    assert [conn_log.next_end()["end"] for _ in range(2)] == ["bad-proxy-header"] * 2
    # Room again: a proxied client is admitted and waits for the slot.
    waiting = connect(lock.server_port)
    waiting.sendall(b"PROXY TCP4 192.0.2.2 198.51.100.1 1 2\r\n")
    wait_until(lambda: lock.queued == 1)
    active.close()
    waiting.sendall(b"pong")
    assert recv_exactly(waiting, 4) == b"pong"
    waiting.close()


def test_with_max_queue_0_a_proxied_client_takes_a_free_slot(make_backend, make_lock):
    backend, lock = proxied(make_backend, make_lock, max_queue=0, slots=2, proxy_header_timeout=30)
    first, second = connect(lock.server_port), connect(lock.server_port)
    for n, c in enumerate((first, second), 1):
        c.sendall(b"PROXY TCP4 192.0.2.%d 198.51.100.1 1 2\r\nhi" % n)
    for c in (first, second):
        assert recv_exactly(c, 2) == b"hi"
    third = connect(lock.server_port)  # no slot free, no waiting: turned away
    closed(third)
    first.close()
    second.close()
    third.close()


# -- sending ------------------------------------------------------------------------------------


def test_send_proxy_v1_precedes_the_client_bytes_with_the_spec_line(make_backend, make_lock):
    backend = make_backend("hold")
    lock = make_lock(backend, send_proxy=True)
    c = connect(lock.server_port)
    c.sendall(b"request")
    conn = backend.next_conn()
    cport = c.getsockname()[1]
    line = f"PROXY TCP4 127.0.0.1 127.0.0.1 {cport} {lock.server_port}\r\n".encode()
    wait_until(lambda: len(conn.received) >= len(line) + 7)
    assert bytes(conn.received) == line + b"request"
    assert lock.active[0].bytes_up == 7  # the client's bytes; the header is tcplock's
    c.close()


def test_send_proxy_v2_precedes_the_client_bytes_with_the_spec_block(make_backend, make_lock):
    backend = make_backend("hold")
    lock = make_lock(backend, send_proxy_v2=True)
    c = connect(lock.server_port)
    c.sendall(b"request")
    conn = backend.next_conn()
    cport = c.getsockname()[1]
    block = bytes([127, 0, 0, 1, 127, 0, 0, 1]) + cport.to_bytes(2, "big")
    block += lock.server_port.to_bytes(2, "big")
    header = SIG + b"\x21\x11\x00\x0c" + block
    wait_until(lambda: len(conn.received) >= len(header) + 7)
    assert bytes(conn.received) == header + b"request"
    c.close()


@pytest.mark.parametrize("option", ["send_proxy", "send_proxy_v2"])
def test_a_proxied_client_is_passed_on_with_its_header_addresses(make_backend, make_lock, option):
    """tcplock between two PROXY hops: the backend learns the client and the address it
    connected to, as the first proxy gave them; and a bulk upload (the splice path) follows
    the header intact."""
    backend = make_backend("hold")
    lock = make_lock(backend, accept_proxy=True, **{option: True})
    c = connect(lock.server_port)
    payload = bytes(range(256)) * 16384  # 4 MiB
    c.sendall(b"PROXY TCP6 2001:db8::42 2001:db8::1 31337 443\r\n")
    sender = gevent.spawn(c.sendall, payload)
    conn = backend.next_conn()
    if option == "send_proxy":
        header = b"PROXY TCP6 2001:db8::42 2001:db8::1 31337 443\r\n"
    else:
        pton = lambda a: _stdsocket.inet_pton(_stdsocket.AF_INET6, a)  # noqa: E731
        block = pton("2001:db8::42") + pton("2001:db8::1") + struct.pack("!HH", 31337, 443)
        header = SIG + b"\x21\x21\x00\x24" + block
    wait_until(lambda: len(conn.received) >= len(header) + len(payload), timeout=20)
    sender.get(timeout=5)
    assert bytes(conn.received[: len(header)]) == header
    assert conn.received[len(header) :] == payload
    assert lock.active[0].bytes_up == len(payload)
    c.close()


def test_send_proxy_lines_match_the_spec_examples():
    # doc/proxy-protocol.txt, section 2.1, and its maximum-length TCP4 line.
    assert make_v1(("192.168.0.1", 56324), ("192.168.0.11", 443)) == (
        b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n"
    )
    longest = make_v1(("255.255.255.255", 65535), ("255.255.255.255", 65535))
    assert longest == b"PROXY TCP4 255.255.255.255 255.255.255.255 65535 65535\r\n"
    assert len(longest) == 56
    six = make_v1(("ffff:" * 7 + "ffff", 65535), ("ffff:" * 7 + "ffff", 65535))
    assert len(six) == 104
    # Mixed families (an IPv4 client of a dual-stack listener) are sent as one family.
    assert (
        make_v1(("::ffff:192.0.2.1", 1), ("192.0.2.2", 2))
        == b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2\r\n"
    )
    # An IPv4 address among IPv6 ones is written IPv4-mapped, as inet_ntop (and HAProxy) write
    # it, on every Python.
    assert make_v1(("192.0.2.1", 1), ("::1", 2)) == b"PROXY TCP6 ::ffff:192.0.2.1 ::1 1 2\r\n"
    # v2: 16 bytes, then 12 (IPv4) or 36 (IPv6) bytes of addresses and ports.
    assert make_v2(("192.168.0.1", 56324), ("192.168.0.11", 443)) == (
        SIG + b"\x21\x11\x00\x0c" + bytes([192, 168, 0, 1, 192, 168, 0, 11]) + b"\xdc\x04\x01\xbb"
    )
    assert len(make_v2(("::1", 1), ("::2", 2))) == 16 + 36


# -- the reader, on any input --------------------------------------------------------------------


@pytest.fixture(scope="module")
def listener():
    s = _stdsocket.socket()
    s.bind((LOOPBACK, 0))
    s.listen(16)
    yield s
    s.close()


def _pair(listener):
    writer = _stdsocket.create_connection(listener.getsockname())
    writer.setsockopt(_stdsocket.IPPROTO_TCP, _stdsocket.TCP_NODELAY, 1)
    reader, _ = listener.accept()
    reader.setblocking(False)
    return writer, reader


def _unread(sock) -> int:
    buf = bytearray(4)
    fcntl.ioctl(sock.fileno(), termios.FIONREAD, buf)
    return int.from_bytes(buf, "little")


def feed(listener, pieces):
    """Send ``pieces`` one by one on a loopback connection, reading after each (once the
    bytes have arrived). Returns (outcome, bytes left unread in the socket): the Header, None
    (incomplete) or the HeaderError."""
    writer, reader = _pair(listener)
    try:
        outcome, sent, consumed = None, 0, 0
        hr = HeaderReader()
        for piece in pieces:
            if not piece:
                continue
            writer.sendall(piece)
            sent += len(piece)
            if outcome is not None:
                continue  # the rest is the client's: sent, for the check of what is left
            deadline = time.monotonic() + 5
            while _unread(reader) + consumed < sent:  # until it has all arrived
                assert time.monotonic() < deadline
            before = _unread(reader)
            try:
                outcome = hr.read(reader)
            except HeaderError as e:
                return e, None
            consumed += before - _unread(reader)
        left = b""
        deadline = time.monotonic() + 5
        while consumed + len(left) < sent:
            assert time.monotonic() < deadline
            try:
                left += reader.recv(65536)
            except BlockingIOError:
                pass
        return outcome, left
    finally:
        writer.close()
        reader.close()


def shown(ip) -> str:
    """An address as the kernel writes a peer's (inet_ntop)."""
    family = _stdsocket.AF_INET if ip.version == 4 else _stdsocket.AF_INET6
    return _stdsocket.inet_ntop(family, ip.packed)


def split(data: bytes, cuts):
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)])]


addresses_v4 = st.ip_addresses(v=4).map(str)
addresses_v6 = st.ip_addresses(v=6).filter(lambda a: a.ipv4_mapped is None).map(str)
ports = st.integers(0, 65535)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.one_of(
        st.tuples(addresses_v4, addresses_v4),
        st.tuples(addresses_v6, addresses_v6),
    ),
    ports,
    ports,
    st.sampled_from([make_v1, make_v2]),
    st.binary(max_size=300),
    st.lists(st.integers(0, 400), max_size=6),
)
def test_any_header_made_reads_back_whole_and_leaves_every_byte_after_it(
    listener, addrs, sport, dport, make, after, cuts
):
    header = make((addrs[0], sport), (addrs[1], dport))
    outcome, left = feed(listener, split(header + after, cuts))
    assert outcome is not None and not isinstance(outcome, HeaderError), outcome
    norm = lambda a: shown(ipaddress.ip_address(a))  # noqa: E731
    assert outcome.source == (norm(addrs[0]), sport)
    assert outcome.destination == (norm(addrs[1]), dport)
    assert outcome.length == len(header)
    assert left == after


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.one_of(
        st.binary(max_size=200),
        st.binary(max_size=120).map(lambda b: b"PROXY " + b),
        st.binary(max_size=80).map(lambda b: SIG + b),
        st.tuples(
            st.sampled_from([b"PROXY TCP4 ", b"PROXY TCP6 ", b"PROXY UNKNOWN "]),
            st.text("0123456789abcdef:. \r\n", max_size=60).map(str.encode),
        ).map(b"".join),
    ),
    st.lists(st.integers(0, 300), max_size=5),
)
@example(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\nrest", [])
@example(SIG + b"\x21\x11\x00\x0c" + bytes(12) + b"rest", [3, 14])
def test_any_bytes_give_a_header_an_error_or_a_wait_and_nothing_past_the_header_is_taken(
    listener, data, cuts
):
    outcome, left = feed(listener, split(data, cuts))
    if isinstance(outcome, HeaderError):
        assert "\n" not in str(outcome) and "\r" not in str(outcome)
        return
    if outcome is None:  # incomplete: everything read so far belongs to the header
        return
    assert left == data[outcome.length :]
    assert outcome.length <= (107 if data[:1] == b"P" else 16 + 65535)
    for address in (outcome.source, outcome.destination):
        if address is not None:
            assert shown(ipaddress.ip_address(address[0])) == address[0]
            assert 0 <= address[1] <= 65535


# -- settings and the command --------------------------------------------------------------------


def test_the_library_refuses_bad_proxy_settings():
    with pytest.raises(ValueError, match="send_proxy and send_proxy_v2"):
        TCPLock(("127.0.0.1", 0), ("127.0.0.1", 1), send_proxy=True, send_proxy_v2=True)
    for kw, name in (
        ({"accept_proxy": "yes"}, "accept_proxy"),
        ({"send_proxy": 1}, "send_proxy"),
        ({"trusted_proxy": ["banana"]}, "trusted_proxy"),
        ({"trusted_proxy": "10.0.0.0/8"}, "trusted_proxy"),
        ({"proxy_header_timeout": 0}, "proxy_header_timeout"),
        ({"proxy_header_timeout": None}, "proxy_header_timeout"),
    ):
        with pytest.raises(ValueError, match=f"^{name} "):
            TCPLock(("127.0.0.1", 0), ("127.0.0.1", 1), **kw)


@pytest.mark.parametrize(
    "args, env, names",
    [
        (["--send-proxy", "--send-proxy-v2"], {}, "--send-proxy and --send-proxy-v2"),
        (
            ["--send-proxy"],
            {"TCPLOCK_SEND_PROXY_V2": "true"},
            "--send-proxy and TCPLOCK_SEND_PROXY_V2",
        ),
        (["--trusted-proxy", "banana"], {}, "--trusted-proxy"),
        (["--trusted-proxy", "10.0.0.0/33"], {}, "--trusted-proxy"),
        (["--proxy-header-timeout", "0"], {}, "--proxy-header-timeout"),
        (["--proxy-header-timeout", "off"], {}, "--proxy-header-timeout"),
        (["--accept-proxy=yes"], {}, "--accept-proxy"),
    ],
)
def test_bad_proxy_options_are_one_line_and_exit_2(args, env, names):
    status, _, err = run_cli("-l", "9000", "-p", "1", *args, env=env)
    assert status == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith("tcplock: error:") and names in err


def test_the_command_logs_hooks_and_status_with_the_header_address(cli, make_backend, tmp_path):
    backend = make_backend("hold")
    out = tmp_path / "hook"
    config = tmp_path / "tcplock.conf"
    config.write_text("accept-proxy = true\ntrusted-proxy = [10.0.0.0/8, 127.0.0.1/32]\n")
    p = cli.to(
        backend,
        "-c",
        str(config),
        "--send-proxy-v2",
        "--log-format",
        "json",
        "--status",
        "127.0.0.1:0",
        "--on-activate",
        f'echo "$TCPLOCK_CLIENT $TCPLOCK_CLIENT_HOST $TCPLOCK_CLIENT_PORT" >> {out}',
    )
    port = p.wait_ready()
    backend.take_check()
    line = p.wait_for(r"status on http://\S+:\d+/status")
    status_port = int(line.rsplit(":", 1)[1].split("/")[0])
    assert "10.0.0.0/8, 127.0.0.1/32" in p.wait_for("PROXY headers taken from")
    c = connect(port)
    c.sendall(b"PROXY TCP4 192.0.2.55 198.51.100.1 40000 443\r\nhello")
    conn = backend.next_conn()
    header = v2_tcp4("192.0.2.55", 40000, "198.51.100.1", 443)
    wait_until(lambda: len(conn.received) >= len(header) + 5)
    assert bytes(conn.received) == header + b"hello"
    assert out.read_text() == "192.0.2.55:40000 192.0.2.55 40000\n"
    (entry,) = json.loads(http(status_port)[2])["active"]
    assert entry["client"] == "192.0.2.55:40000"
    c.close()
    conn.release.set()
    record = json.loads(p.wait_for(r'"end": "closed"'))
    assert record["client"] == "192.0.2.55:40000"
    bad = connect(port)
    bad.sendall(b"PROXY TCP4 192.0.2.55 198.51.100.1 40000 70000\r\n")
    record = json.loads(p.wait_for(r'"end": "bad-proxy-header"'))
    assert record["client"] == real(bad)
    assert "port 70000 is out of range" in p.wait_for("bad PROXY header")
    bad.close()


def test_the_readiness_check_after_a_restart_sends_a_header_of_its_own(make_backend, make_lock):
    """A backend that expects PROXY headers gets one from tcplock's checks too: the check
    connection's own ends, then its close."""
    backend = make_backend("echo")
    lock = make_lock(backend, send_proxy=True, restart=lambda reason: None, restart_every=1)
    c = connect(lock.server_port)
    c.sendall(b"x")
    line = f"PROXY TCP4 127.0.0.1 127.0.0.1 {c.getsockname()[1]} {lock.server_port}\r\n"
    assert recv_exactly(c, len(line) + 1) == line.encode() + b"x"  # echoed
    c.close()
    wait_until(lambda: lock.restarts == 1 and len(backend.conns) == 2)
    client, check = backend.conns
    wait_until(lambda: check.closed.is_set())
    port = backend.server_port
    m = re.fullmatch(rb"PROXY TCP4 127\.0\.0\.1 127\.0\.0\.1 (\d+) %d\r\n" % port, check.received)
    assert m and int(m.group(1)) != port
