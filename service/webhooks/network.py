"""Where webhooks may connect: the address policy, and connections pinned to checked addresses.

A URL's host is resolved once; every address it resolves to is judged (the
resolver's answer, never the spelling: 127.1, 2130706433 and 0x7f.1 are all
127.0.0.1), and the connection goes to those checked addresses only, so a DNS
answer that changes between the check and the connect cannot move it. The
request still names the URL's host: in its Host header and, for https, in SNI
and the certificate check.

Failures are described by their class (`connect_failed`, `timeout`,
`tls_error`, ...), never with bytes the remote sent.
"""

from __future__ import annotations

import errno
import functools
import http.client
import ipaddress
import os
import re
import socket
import ssl
import threading
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
# (family, sockaddr) pairs, as socket.getaddrinfo answers them.
Addresses = list[tuple[int, tuple]]
Resolver = Callable[[str, int], Addresses]

_CGNAT = ipaddress.ip_network("100.64.0.0/10")
_UNIQUE_LOCAL = ipaddress.ip_network("fc00::/7")
_SITE_LOCAL = ipaddress.ip_network("fec0::/10")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
SETTING = "RETORT_WEBHOOK_ALLOW_NETWORKS"


class Refused(Exception):
    """The URL may not be reached: its scheme or userinfo, or an address it resolves to."""

    def __init__(self, message: str, address: str | None = None, reason: str | None = None):
        super().__init__(message)
        self.message, self.address, self.reason = message, address, reason


class Unresolved(Exception):
    """The host did not resolve (the message is the local resolver's, never the remote's)."""


@functools.lru_cache(maxsize=8)
def parse_networks(spec: str) -> tuple[IPNetwork, ...]:
    """Parse the comma-separated CIDRs of RETORT_WEBHOOK_ALLOW_NETWORKS (once per value)."""
    networks = []
    for item in (part.strip() for part in spec.split(",")):
        if not item:
            continue
        try:
            networks.append(ipaddress.ip_network(item))
        except ValueError as exc:
            raise ValueError(
                f"{SETTING}: {item!r} is not a network ({exc}); write CIDRs such as "
                "10.0.0.0/8 or fd00::/8, separated by commas"
            ) from None
    return tuple(networks)


def _reason(ip: IPAddress) -> str | None:
    """Why a webhook may not reach this address by default; None for a public one."""
    if isinstance(ip, ipaddress.IPv6Address):
        nat64 = ip in _NAT64 and ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        embedded = ip.ipv4_mapped or ip.sixtofour or nat64
        if embedded:
            inner = _reason(embedded)
            kind = "IPv4-mapped" if ip.ipv4_mapped else "embedded"
            return inner and f"{inner} ({kind} {embedded})"
    checks = (
        (ip.is_unspecified, "unspecified"),
        (ip.is_loopback, "loopback"),
        (ip.is_link_local, "link-local"),
        (ip.is_multicast, "multicast"),
        (ip in _UNIQUE_LOCAL, "unique-local"),
        (ip in _SITE_LOCAL, "site-local"),
        (ip in _CGNAT, "shared address space (CGNAT)"),
        (ip.is_reserved, "reserved"),
        (ip.is_private, "private"),
        (not ip.is_global, "not public"),
    )
    return next((why for hit, why in checks if hit), None)


def refusal(address: str, allow: tuple[IPNetwork, ...]) -> str | None:
    """Why `address` is refused under the allow list, or None when a webhook may reach it."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    mapped = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else None
    if any(ip in net or (mapped is not None and mapped in net) for net in allow):
        return None
    return _reason(ip)


def getaddrinfo(host: str, port: int) -> Addresses:
    """The system resolver: every TCP address of host."""
    try:
        found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError) as exc:
        raise Unresolved(getattr(exc, "strerror", None) or "not a valid host name") from None
    return [(family, sockaddr) for family, _, _, _, sockaddr in found]


def target(url: str) -> tuple[str, int]:
    """(host, port) of an http(s) URL without userinfo; Refused otherwise."""
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        raise Refused("the URL's port is not a number from 0 to 65535") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise Refused("only http:// and https:// URLs with a host are allowed")
    if parts.username is not None or parts.password is not None:
        raise Refused("the URL carries credentials")
    # An IPv6 zone is written %25 in a URL: [fe80::1%25eth0].
    host = parts.hostname.replace("%25", "%", 1) if ":" in parts.hostname else parts.hostname
    return host, port or (443 if parts.scheme == "https" else 80)


def checked(url: str, allow: tuple[IPNetwork, ...], resolver: Resolver | None = None) -> Addresses:
    """Resolve the URL's host once and judge every address; all must pass, else Refused."""
    host, port = target(url)
    found = (resolver or getaddrinfo)(host, port)
    if not found:
        raise Unresolved("no address")
    for _, sockaddr in found:
        why = refusal(sockaddr[0], allow)
        if why:
            raise Refused(f"address {sockaddr[0]} is {why}", sockaddr[0], why)
    return found


def checked_within(
    url: str, allow: tuple[IPNetwork, ...], timeout: float, resolver: Resolver | None = None
) -> Addresses | None:
    """checked() with a deadline on the lookup; None when the host did not resolve in time."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["found"] = checked(url, allow, resolver)
        except (Refused, Unresolved) as exc:
            outcome["error"] = exc

    lookup = threading.Thread(target=run, name="webhook-resolve", daemon=True)
    lookup.start()
    lookup.join(timeout)
    if isinstance(outcome.get("error"), Refused):
        raise outcome["error"]
    return outcome.get("found")


class ConnectFailed(OSError):
    """No checked address accepted the connection (errno kept, no remote bytes)."""


def _pinned(addresses: Addresses) -> Callable[..., socket.socket]:
    """A stand-in for socket.create_connection that ignores the host and dials `addresses`."""

    def connect(_address, timeout=None, source_address=None) -> socket.socket:
        failure: OSError | None = None
        for family, sockaddr in addresses:
            sock = socket.socket(family, socket.SOCK_STREAM)
            try:
                sock.settimeout(timeout)
                sock.connect(sockaddr)
                return sock
            except TimeoutError:
                sock.close()
                raise
            except OSError as exc:
                sock.close()
                failure = exc
        code = getattr(failure, "errno", None) or errno.EHOSTUNREACH
        raise ConnectFailed(code, "connect_failed")

    return connect


def _handlers(addresses: Addresses, context: ssl.SSLContext) -> tuple[Any, Any]:
    """urllib's http and https handlers, with connections that dial `addresses` only."""

    def pinned(connection: type) -> Callable[..., http.client.HTTPConnection]:
        def make(host: str, **kwargs) -> http.client.HTTPConnection:
            conn = connection(host, **kwargs)  # the URL's host: Host header, SNI, certificate
            conn._create_connection = _pinned(addresses)  # the only dial http.client makes
            return conn

        return make

    class Http(urllib.request.HTTPHandler):
        def http_open(self, req):
            return self.do_open(pinned(http.client.HTTPConnection), req)

    class Https(urllib.request.HTTPSHandler):
        def https_open(self, req):
            return self.do_open(pinned(http.client.HTTPSConnection), req, context=self._context)

    return Http(), Https(context=context)


def send(
    request: urllib.request.Request,
    allow: tuple[IPNetwork, ...],
    timeout: float,
    resolver: Resolver | None = None,
    context: ssl.SSLContext | None = None,
) -> int:
    """Check the request's URL, send it to the checked addresses only; return the status.

    No proxy, no redirect, no other scheme: with no redirect handler a 3xx is
    an HTTPError like any other status that is not 2xx (an answer, not an
    instruction). The answer's body is never read.
    """
    addresses = checked(request.full_url, allow, resolver)
    director = urllib.request.OpenerDirector()
    for handler in (
        *_handlers(addresses, context or _default_context()),
        urllib.request.HTTPDefaultErrorHandler(),
        urllib.request.HTTPErrorProcessor(),
    ):
        director.add_handler(handler)
    try:
        with director.open(request, timeout=timeout) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        exc.close()
        return exc.code


@functools.cache
def _default_context() -> ssl.SSLContext:
    return ssl.create_default_context()  # certificate and host name verified


_OPENSSL_REASON = re.compile(r"^[A-Z0-9_]{3,80}$")


def describe(exc: BaseException) -> str:
    """The class of a failed exchange, in words of our own: never text the remote sent."""
    if isinstance(exc, urllib.error.URLError) and isinstance(exc.reason, BaseException):
        exc = exc.reason  # raised while connecting or sending
    if isinstance(exc, Refused):
        return f"refused: {exc.message}"
    if isinstance(exc, Unresolved):
        return f"dns_failed: {exc}"
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, ssl.SSLError):
        if isinstance(exc, ssl.SSLCertVerificationError):
            # OpenSSL's fixed wording, or Python's naming our own host name.
            why = "".join(c for c in str(exc.verify_message or "") if " " <= c <= "~")[:200]
            return f"tls_error: {why or 'certificate verify failed'}"
        reason = str(getattr(exc, "reason", None))  # OpenSSL's code: WRONG_VERSION_NUMBER...
        return "tls_error" + (f": {reason}" if _OPENSSL_REASON.match(reason) else "")
    if isinstance(exc, ConnectFailed):
        return f"connect_failed: {_strerror(exc.errno)}"
    if isinstance(exc, http.client.RemoteDisconnected | ConnectionResetError | BrokenPipeError):
        return "connection_closed: the receiver closed the connection without an answer"
    if isinstance(exc, http.client.HTTPException):
        return "bad_response: the receiver's answer is not HTTP"
    if isinstance(exc, OSError):
        return f"network_error: {_strerror(exc.errno)}"
    return f"error: {type(exc).__name__}"


def _strerror(code: int | None) -> str:
    return os.strerror(code).lower() if code else "unknown"
