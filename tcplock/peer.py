"""Whether the far end of a connection on this host has been closed, or only half-closed.

A backend that sends its FIN may still be reading what the client sends (it half-closed), or
may have closed the connection for good. Nothing on the wire tells the two apart. When the
backend is on the same host the kernel can: a socket that no process holds any more has no
inode. Linux's sock_diag netlink interface (what ``ss`` uses) looks that socket up by its four
addresses, in one request and one reply, without touching the connection.
"""

from __future__ import annotations

import _socket
import errno
import ipaddress
import struct
import sys
from typing import Optional

__all__ = ["PeerCheck", "SUPPORTED", "is_loopback"]

SUPPORTED = sys.platform.startswith("linux") and hasattr(_socket, "AF_NETLINK")

_NETLINK_SOCK_DIAG = 4
_SOCK_DIAG_BY_FAMILY = 20
_NLM_F_REQUEST = 1
_NLMSG_ERROR = 2
_NLMSG_HEADER = struct.Struct("=IHHII")  # length, type, flags, sequence, port id
_REQUEST = struct.Struct("=BBBBI")  # family, protocol, extensions, pad, states
_PORTS = struct.Struct(">HH")
_TAIL = struct.Struct("=III")  # interface, cookie (two words; all ones: none)
_NO_COOKIE = 0xFFFFFFFF
_ALL_STATES = 0xFFFFFFFF
# In the reply: the inet_diag_msg's inode, after family/state/timer/retrans (4 bytes), the
# socket id (48), then expires, receive queue, send queue and uid (16).
_INODE_AT = _NLMSG_HEADER.size + 4 + 48 + 16
_INODE = struct.Struct("=I")
#: A request's length: every question is the same size (its addresses padded to 16 bytes).
_QUESTION_LENGTH = _NLMSG_HEADER.size + _REQUEST.size + _PORTS.size + 32 + _TAIL.size


def is_loopback(sockaddr) -> bool:
    try:
        return ipaddress.ip_address(sockaddr[0].split("%", 1)[0]).is_loopback
    except ValueError:
        return False


class PeerCheck:
    """Asks the kernel about the other end of loopback TCP connections."""

    def __init__(self) -> None:
        self._sock = None
        self._seq = 0
        self._loopback: dict = {}  # peer host -> whether it is on loopback
        # (family, peer host, local host) -> the request's parts around the ports
        self._parts: dict = {}
        #: Set once the kernel has refused the interface (a sandbox, say): no more asking.
        self.unavailable = not SUPPORTED

    def closed(self, sock, peer=None) -> Optional[bool]:
        """True if no process holds the far end of ``sock`` any more, so nothing can read what
        is sent to it; False if one does; None if it cannot be told (the far end is not on
        loopback, or the kernel will not say). ``peer``: as for :meth:`question`."""
        question = self.question(sock, peer)
        return None if question is None else self.ask(question)

    def local(self, peer) -> bool:
        """Whether the address ``peer`` is on loopback (remembered for the next time)."""
        local = self._loopback.get(peer[0])
        if local is None:
            if len(self._loopback) >= 64:
                self._loopback.clear()
            local = self._loopback[peer[0]] = is_loopback(peer)
        return local

    def question(self, sock, peer=None) -> Optional[bytes]:
        """The request about ``sock``'s far end, made ahead of time, for :meth:`ask`; None if
        there is nothing to ask (not on loopback, or the kernel will not say). ``peer``: the
        address ``sock`` is connected to, if the caller knows it (saves asking the kernel)."""
        if self.unavailable:
            return None
        try:
            if peer is None:
                peer = sock.getpeername()
            if not self.local(peer):
                return None
            local = sock.getsockname()
            key = (sock.family, peer[0], local[0])
            parts = self._parts.get(key)
            if parts is None:
                if len(self._parts) >= 64:
                    self._parts.clear()
                family = sock.family
                # The far end's view of the connection: its address is our peer, ours its
                # peer.
                parts = self._parts[key] = (
                    _REQUEST.pack(family, _socket.IPPROTO_TCP, 0, 0, _ALL_STATES),
                    _socket.inet_pton(family, peer[0]).ljust(16, b"\0")
                    + _socket.inet_pton(family, local[0]).ljust(16, b"\0")
                    + _TAIL.pack(0, _NO_COOKIE, _NO_COOKIE),
                )
            return parts[0] + _PORTS.pack(peer[1], local[1]) + parts[1]
        except (OSError, ValueError):
            return None

    def ask(self, question: bytes) -> Optional[bool]:
        """Send a :meth:`question`: True if the far end is closed for good, False if a process
        still holds it, None if it cannot be told."""
        if self.unavailable:
            return None
        try:
            if self._sock is None:
                self._sock = _socket.socket(
                    _socket.AF_NETLINK, _socket.SOCK_DGRAM, _NETLINK_SOCK_DIAG
                )
            self._seq = seq = (self._seq + 1) & 0xFFFFFFFF
            self._sock.send(
                _NLMSG_HEADER.pack(_QUESTION_LENGTH, _SOCK_DIAG_BY_FAMILY, _NLM_F_REQUEST,
                                   seq, 0) + question
            )  # fmt: skip
            # The kernel answers within the request: the reply is already there.
            reply = self._sock.recv(4096, _socket.MSG_DONTWAIT)
        except BlockingIOError:
            return None
        except OSError as e:
            if e.errno in (errno.EPERM, errno.EACCES, errno.EPROTONOSUPPORT, errno.EAFNOSUPPORT):
                self.unavailable = True
            self.close()
            return None
        if len(reply) < _NLMSG_HEADER.size:
            return None
        _length, kind, _flags, got, _port = _NLMSG_HEADER.unpack_from(reply)
        if got != seq:
            self.close()  # out of step: start afresh next time
            return None
        if kind != _SOCK_DIAG_BY_FAMILY or len(reply) < _INODE_AT + _INODE.size:
            return None  # not found (NLMSG_ERROR): nothing to go by
        return _INODE.unpack_from(reply, _INODE_AT)[0] == 0

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
