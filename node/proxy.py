"""PROXY protocol v1 and v2 on an accepted connection, before TLS and before DICOM.

A load balancer in TCP mode (HAProxy ``send-proxy-v2``) opens the connection to the
node itself; the header it sends first carries the modality's real address. With
``node.proxy_protocol`` set, a connection from a trusted network must begin with a
header (the specification forbids guessing: a connection without one is closed),
and a connection from any other address is refused. The header is parsed by the
``proxy-protocol`` package; this module only reads exactly the header's bytes off a
blocking socket, so that the A-ASSOCIATE-RQ (or the TLS ClientHello) after it stays
in the socket for pynetdicom.

LOCAL (v2) and UNKNOWN (v1 ``PROXY UNKNOWN``, v2 PROXY with AF_UNSPEC) are the
balancer speaking for itself, a health check: as the specification says, the
connection then goes on with its real endpoints, the balancer's address.
"""

from __future__ import annotations

import enum
import ipaddress
import socket
from dataclasses import dataclass

from proxyprotocol import (
    ProxyProtocolChecksumError,
    ProxyProtocolIncompleteError,
    ProxyProtocolSyntaxError,
)
from proxyprotocol.detect import ProxyProtocolDetect
from proxyprotocol.result import ProxyResult, ProxyResultType, is_ipv4, is_ipv6

from node.schema import IPNetwork

# PROXY protocol v1: "a 108-byte buffer is always enough to store all the line and a
# trailing zero", so a line is at most 107 bytes with its CRLF.
V1_MAX_LINE = 107
# Enough for the addresses of v2 and the TLVs HAProxy sends (unique id, SSL, netns).
V2_MAX_BODY = 2048
# How long a trusted peer may take to send its header. A balancer sends it with the
# connection; a peer that sends nothing is not a balancer.
HEADER_TIMEOUT = 5.0
_PARSER = ProxyProtocolDetect()


class Kind(enum.Enum):
    PROXIED = "proxied"  # the header names the original client
    LOCAL = "local"  # the balancer's own connection (health check): real endpoints


@dataclass(frozen=True)
class Header:
    kind: Kind
    address: tuple[str, int]  # the client's (PROXIED) or the socket's peer (LOCAL)


class HeaderError(Exception):
    """No usable PROXY header: the connection must be closed.

    ``silent``: the peer closed without sending a byte (a TCP connect check), which
    is not worth a warning.
    """

    def __init__(self, why: str, silent: bool = False) -> None:
        super().__init__(why)
        self.silent = silent


def trusted(address: str, networks: tuple[IPNetwork, ...]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # a dual-stack listener sees IPv4 peers as ::ffff:a.b.c.d
    return any(ip in n for n in networks)


def read_header(sock: socket.socket, peer: tuple[str, int], timeout: float) -> Header:
    """Read one PROXY header (v1 or v2) and nothing after it.

    Raises :class:`HeaderError` with the reason when the first bytes are not a
    valid header, the peer closes or is silent for ``timeout`` seconds.
    """
    previous = sock.gettimeout()
    sock.settimeout(timeout)
    try:
        result = _read_result(sock)
    except TimeoutError:
        raise HeaderError(f"no PROXY header within {timeout:g} s") from None
    except (ProxyProtocolSyntaxError, ProxyProtocolChecksumError, ValueError) as exc:
        raise HeaderError(f"malformed PROXY header ({type(exc).__name__}: {exc})") from None
    except OSError as exc:
        raise HeaderError(f"connection failed before its PROXY header: {exc}") from None
    finally:
        sock.settimeout(previous)
    return _header(result, peer)


def _read_result(sock: socket.socket) -> ProxyResult:
    first = sock.recv(8)
    if not first:
        raise HeaderError("closed without sending anything", silent=True)
    data = bytearray(first + _exactly(sock, 8 - len(first)))
    if not _PARSER.is_valid(bytes(data)):
        raise HeaderError(f"no PROXY header; the connection began with {data.hex(' ')}")
    while True:
        try:
            return _PARSER.unpack(bytes(data))
        except ProxyProtocolIncompleteError as exc:
            want = exc.want_read
        if want.want_bytes is not None:
            if len(data) + want.want_bytes > 16 + V2_MAX_BODY:
                raise HeaderError(f"PROXY v2 header declares {want.want_bytes} more bytes")
            data += _exactly(sock, want.want_bytes)
        else:
            data += _line(sock, V1_MAX_LINE - len(data))


def _exactly(sock: socket.socket, count: int) -> bytes:
    out = bytearray()
    while len(out) < count:
        chunk = sock.recv(count - len(out))
        if not chunk:
            raise HeaderError("connection closed inside its PROXY header")
        out += chunk
    return bytes(out)


def _line(sock: socket.socket, limit: int) -> bytes:
    """Up to and including ``\\n``, byte by byte: what follows the header is not ours."""
    out = bytearray()
    while len(out) < limit:
        byte = sock.recv(1)
        if not byte:
            raise HeaderError("connection closed inside its PROXY header")
        out += byte
        if byte == b"\n":
            return bytes(out)
    raise HeaderError(f"PROXY v1 line longer than {V1_MAX_LINE} bytes")


def _header(result: ProxyResult, peer: tuple[str, int]) -> Header:
    if result.type in (ProxyResultType.LOCAL, ProxyResultType.UNKNOWN) or not result.proxied:
        return Header(Kind.LOCAL, (peer[0], peer[1]))
    if not (is_ipv4(result) or is_ipv6(result)):
        raise HeaderError(f"PROXY header for an unsupported family ({result.type.name})")
    source_ip, port = result.source[0], int(result.source[1])
    host = str(source_ip)
    ip = ipaddress.ip_address(host)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        host = str(ip.ipv4_mapped)  # so that IPv4 networks in allow and rules match
    return Header(Kind.PROXIED, (host, port))
