"""The PROXY protocol, versions 1 and 2: reading a header from a socket, and making one.

What it owns: the wire format (HAProxy's ``doc/proxy-protocol.txt``), strictly. A header is
input from the network that ends up in logs, in ``--allow`` decisions and in hook
environments, so anything that is not exactly the protocol is refused: a v1 line of printable
ASCII with one space between fields and its CRLF within 107 bytes, canonical addresses (IPv4
as four decimal numbers without leading zeroes; IPv6 as hexadecimal groups with at most one
``::``, possibly ending in dotted IPv4 as ``inet_ntop`` writes mapped addresses, and no zone),
ports 0-65535 without leading zeroes; a v2 block with its signature, version 2, a known
command, family and protocol, and an address block as long as its family needs.

The rule it keeps: :class:`HeaderReader` never takes a byte from the socket that is not part
of the header. A v1 line is peeked at (``MSG_PEEK``) and only its bytes up to the CRLF are
received; a v2 header is received by exact counts (16 bytes, then its announced length). What
the client sent after the header stays in the kernel's buffer for the backend.

Nothing here blocks or imports gevent: :meth:`HeaderReader.read` reads what a non-blocking
socket has and says whether the header is complete; the caller (the server) calls it again
when the socket turns readable.
"""

from __future__ import annotations

import ipaddress
import re
import socket
import struct
from typing import NamedTuple, Optional, Tuple

__all__ = [
    "Header",
    "HeaderError",
    "HeaderReader",
    "V1_MAX",
    "V2_SIGNATURE",
    "parse_v1",
    "parse_v2",
    "make_v1",
    "make_v2",
]

#: The longest v1 line, CRLF included ("PROXY UNKNOWN" with two full IPv6 addresses).
V1_MAX = 107
#: The 12 bytes every v2 header starts with.
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
_V2_FIXED = 16
_V2 = struct.Struct("!12sBBH")
_V1_PREFIX = b"PROXY "

Address = Tuple[str, int]


class HeaderError(ValueError):
    """The bytes are not a valid PROXY header; the message says why, in one line."""


class Header(NamedTuple):
    """A complete header. ``source`` and ``destination`` are ``(host, port)`` for a proxied
    TCP connection; both None when the header says to use the connection's own addresses
    (v1 ``UNKNOWN``, v2 ``LOCAL``, or a family other than TCP over IPv4/IPv6)."""

    version: int
    source: Optional[Address]
    destination: Optional[Address]
    #: Bytes the header took on the wire.
    length: int


# -- version 1 -----------------------------------------------------------------------------------

_DEC = rb"(?:0|[1-9][0-9]{0,4})"
_V4 = rb"(?:(?:0|[1-9][0-9]{0,2})\.){3}(?:0|[1-9][0-9]{0,2})"
_V6 = rb"[0-9A-Fa-f:.]{2,45}"  # hexadecimal groups; "::ffff:" may end in dotted IPv4
_V1_TCP4 = re.compile(rb"PROXY TCP4 (%s) (%s) (%s) (%s)\r\n" % (_V4, _V4, _DEC, _DEC))
_V1_TCP6 = re.compile(rb"PROXY TCP6 (%s) (%s) (%s) (%s)\r\n" % (_V6, _V6, _DEC, _DEC))
# UNKNOWN: the rest of the line, if any, is ignored (but must still be printable ASCII).
_V1_UNKNOWN = re.compile(rb"PROXY UNKNOWN(?: [\x20-\x7e]*)?\r\n")
_PRINTABLE = re.compile(rb"[\x20-\x7e]*")


def _port(text: bytes) -> int:
    port = int(text)
    if port > 65535:
        raise HeaderError(f"port {port} is out of range (0-65535)")
    return port


def _v4(text: bytes) -> str:
    try:
        return str(ipaddress.IPv4Address(text.decode("ascii")))
    except ValueError:
        raise HeaderError(f"invalid IPv4 address {text.decode('ascii')!r}") from None


def _v6(text: bytes) -> str:
    try:
        return _show_v6(ipaddress.IPv6Address(text.decode("ascii")).packed)
    except ValueError:
        raise HeaderError(f"invalid IPv6 address {text.decode('ascii')!r}") from None


def _show_v6(packed: bytes) -> str:
    # As the kernel's getpeername() gives a client's address (an IPv4-mapped one as
    # ::ffff:192.0.2.1), so that a proxied client reads as a direct one would.
    return socket.inet_ntop(socket.AF_INET6, packed)


def parse_v1(line: bytes) -> Header:
    """A whole v1 line, CRLF included; HeaderError if it is not exactly one."""
    if len(line) > V1_MAX:
        raise HeaderError(f"v1 line longer than {V1_MAX} bytes")
    if not line.startswith(_V1_PREFIX):
        raise HeaderError("not a PROXY header")
    if not line.endswith(b"\r\n") or not _PRINTABLE.fullmatch(line, 0, len(line) - 2):
        raise HeaderError("v1 line with a control character or without its CRLF")
    if _V1_UNKNOWN.fullmatch(line):
        return Header(1, None, None, len(line))
    for pattern, address in ((_V1_TCP4, _v4), (_V1_TCP6, _v6)):
        m = pattern.fullmatch(line)
        if m:
            src, dst = address(m.group(1)), address(m.group(2))
            return Header(1, (src, _port(m.group(3))), (dst, _port(m.group(4))), len(line))
    words = line[6:-2].split(b" ", 1)
    if words[0] not in (b"TCP4", b"TCP6"):
        raise HeaderError(
            f"v1 protocol {words[0][:8].decode('ascii')!r} is not TCP4, TCP6 or UNKNOWN"
        )
    raise HeaderError(f"malformed v1 {words[0].decode('ascii')} line")


# -- version 2 -----------------------------------------------------------------------------------

_LOCAL, _PROXY = 0x0, 0x1
_UNSPEC, _INET, _INET6, _UNIX = 0x0, 0x1, 0x2, 0x3
_STREAM, _DGRAM = 0x1, 0x2
#: Address block sizes by family.
_ADDRESS_LENGTH = {_UNSPEC: 0, _INET: 12, _INET6: 36, _UNIX: 216}


def _v2_fixed(head: bytes) -> Tuple[int, int, int]:
    """The 16-byte fixed part: (command, family byte, length of the rest)."""
    signature, version_command, family, length = _V2.unpack(head)
    if signature != V2_SIGNATURE:
        raise HeaderError("not a PROXY header")
    if version_command >> 4 != 2:
        raise HeaderError(f"v2 header of version {version_command >> 4}")
    command = version_command & 0xF
    if command not in (_LOCAL, _PROXY):
        raise HeaderError(f"v2 command {command} is neither LOCAL nor PROXY")
    if family >> 4 not in _ADDRESS_LENGTH or family & 0xF > _DGRAM:
        raise HeaderError(f"v2 address family and protocol 0x{family:02x} unknown")
    if command == _PROXY and length < _ADDRESS_LENGTH[family >> 4]:
        raise HeaderError(f"v2 address block of {length} bytes is too short for its family")
    return command, family, length


def _v2_addresses(command: int, family: int, block: bytes):
    """(source, destination) from the start of the address block; (None, None) for the
    connection's own addresses."""
    if command == _LOCAL or family & 0xF != _STREAM:
        return None, None
    if family >> 4 == _INET:
        src, dst, sport, dport = struct.unpack_from("!4s4sHH", block)
        return (
            (str(ipaddress.IPv4Address(src)), sport),
            (str(ipaddress.IPv4Address(dst)), dport),
        )
    if family >> 4 == _INET6:
        src, dst, sport, dport = struct.unpack_from("!16s16sHH", block)
        return (_show_v6(src), sport), (_show_v6(dst), dport)
    return None, None  # AF_UNSPEC or AF_UNIX: nothing tcplock could use


def parse_v2(header: bytes) -> Header:
    """A whole v2 header (its length as announced); HeaderError if it is not one. TLVs after
    the addresses are skipped."""
    if len(header) < _V2_FIXED:
        raise HeaderError("v2 header shorter than 16 bytes")
    command, family, length = _v2_fixed(header[:_V2_FIXED])
    if len(header) != _V2_FIXED + length:
        raise HeaderError(
            f"v2 header announces {length} bytes after the first 16, not {len(header) - 16}"
        )
    source, destination = _v2_addresses(command, family, header[_V2_FIXED:])
    return Header(2, source, destination, len(header))


# -- reading one from a socket -------------------------------------------------------------------


class HeaderReader:
    """Reads one header from a non-blocking socket, over as many calls as it takes, and
    never a byte past it.

    :meth:`read` returns the :class:`Header` once complete, None while more is to come, and
    raises :class:`HeaderError` for anything else (including the peer closing or resetting
    before the header was complete).
    """

    __slots__ = ("buf", "need", "skip", "fixed")

    def __init__(self) -> None:
        self.buf = bytearray()
        #: v2: how many bytes the header has in all, once the fixed part is in (else 0).
        self.need = 0
        #: v2: how many bytes of TLVs are left to receive and drop.
        self.skip = 0
        self.fixed: Optional[Tuple[int, int, int]] = None

    def read(self, sock) -> Optional[Header]:
        buf = self.buf
        if not buf:
            first = self._recv(sock, V1_MAX, socket.MSG_PEEK)
            if first is None:
                return None
            if first[:1] == b"P":
                return self._v1(sock, first)
            if first[:1] == b"\r":
                return self._v2(sock)
            raise HeaderError("not a PROXY header")
        if buf[:1] == b"P":
            peeked = self._recv(sock, V1_MAX - len(buf), socket.MSG_PEEK)
            return None if peeked is None else self._v1(sock, peeked)
        return self._v2(sock)

    @staticmethod
    def _recv(sock, n: int, flags: int = 0) -> Optional[bytes]:
        try:
            data = sock.recv(n, flags)
        except BlockingIOError:
            return None
        except InterruptedError:
            return None
        except OSError as e:
            raise HeaderError(
                f"connection failed before the header was complete: {e.strerror or e}"
            ) from None
        if not data:
            raise HeaderError("connection closed before the header was complete")
        return data

    def _take(self, sock, n: int) -> bool:
        """Receive ``n`` bytes known to be waiting (they were peeked) into the buffer."""
        while n:
            data = self._recv(sock, n)
            if data is None:
                return False
            self.buf += data
            n -= len(data)
        return True

    def _v1(self, sock, peeked: bytes) -> Optional[Header]:
        start = len(self.buf)
        seen = bytes(self.buf) + peeked
        if seen[:6] != _V1_PREFIX[: min(len(seen), 6)]:
            raise HeaderError("not a PROXY header")
        end = seen.find(b"\r\n", max(start - 1, 0))
        text = seen[:end] if end >= 0 else seen[:-1] if seen.endswith(b"\r") else seen
        if not _PRINTABLE.fullmatch(text):
            raise HeaderError("v1 line with a control character or without its CRLF")
        if end < 0:
            if len(seen) >= V1_MAX:
                raise HeaderError(f"no CRLF within the first {V1_MAX} bytes of a v1 line")
            self._take(sock, len(peeked))  # all of it belongs to the line
            return None
        line = seen[: end + 2]
        if not self._take(sock, len(line) - start):
            return None
        return parse_v1(line)

    def _v2(self, sock) -> Optional[Header]:
        buf = self.buf
        while len(buf) < _V2_FIXED:
            data = self._recv(sock, _V2_FIXED - len(buf))
            if data is None:
                return None
            buf += data
            if not V2_SIGNATURE.startswith(bytes(buf[:12])):
                raise HeaderError("not a PROXY header")
        if self.fixed is None:
            self.fixed = command, family, length = _v2_fixed(bytes(buf))
            keep = min(length, _ADDRESS_LENGTH[family >> 4]) if command == _PROXY else 0
            self.need = _V2_FIXED + keep
            self.skip = length - keep
        while len(buf) < self.need:
            data = self._recv(sock, self.need - len(buf))
            if data is None:
                return None
            buf += data
        while self.skip:  # TLVs: received and dropped, never kept
            data = self._recv(sock, min(self.skip, 4096))
            if data is None:
                return None
            self.skip -= len(data)
        command, family, length = self.fixed
        source, destination = _v2_addresses(command, family, bytes(buf[_V2_FIXED:]))
        return Header(2, source, destination, _V2_FIXED + length)


# -- making one ----------------------------------------------------------------------------------


def _pair(source: Address, destination: Address):
    """Both addresses as ipaddress objects of one family: IPv4 if both are IPv4 (or
    IPv4-mapped IPv6), else IPv6, an IPv4 address written as IPv4-mapped."""
    src = ipaddress.ip_address(source[0].split("%", 1)[0])
    dst = ipaddress.ip_address(destination[0].split("%", 1)[0])
    if src.version == 6 and src.ipv4_mapped is not None:
        src = src.ipv4_mapped
    if dst.version == 6 and dst.ipv4_mapped is not None:
        dst = dst.ipv4_mapped
    if src.version != dst.version:
        src, dst = (
            ipaddress.IPv6Address(f"::ffff:{a}") if a.version == 4 else a for a in (src, dst)
        )
    return src, dst


def make_v1(source: Address, destination: Address) -> bytes:
    """The v1 line for a TCP connection from ``source`` to ``destination``."""
    src, dst = _pair(source, destination)
    if src.version == 4:
        proto, src_text, dst_text = "TCP4", str(src), str(dst)
    else:
        # As inet_ntop writes them (an IPv4-mapped address ends in dotted IPv4), on every
        # Python: ipaddress writes mapped ones so only from 3.13.
        proto = "TCP6"
        src_text, dst_text = (socket.inet_ntop(socket.AF_INET6, a.packed) for a in (src, dst))
    ports = f"{int(source[1])} {int(destination[1])}"
    return f"PROXY {proto} {src_text} {dst_text} {ports}\r\n".encode("ascii")


def make_v2(source: Address, destination: Address) -> bytes:
    """The v2 header (command PROXY, TCP) for a connection from ``source`` to
    ``destination``, without TLVs."""
    src, dst = _pair(source, destination)
    family = (_INET if src.version == 4 else _INET6) << 4 | _STREAM
    block = src.packed + dst.packed + struct.pack("!HH", int(source[1]), int(destination[1]))
    return _V2.pack(V2_SIGNATURE, 0x20 | _PROXY, family, len(block)) + block
