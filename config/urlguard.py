"""The one place that decides whether segq may send a request to a user-supplied URL.

A job's ``callback_url`` is chosen by whoever submits the job, so without a guard a
webhook is a way to make the worker call its own network: the cloud metadata service
(169.254.169.254), Redis on loopback, admin consoles on 10.x. ``check_url`` refuses those.

Every address a host name resolves to is checked, not only the first, and the vetted
address is returned so the caller connects to exactly that address (sending the name in
the ``Host`` header and TLS SNI). Resolving again at connect time would let a DNS server
answer "public" to the check and "127.0.0.1" to the connection (DNS rebinding).

Numeric forms such as ``http://2130706433/``, ``http://0x7f000001/`` or ``http://127.1/``
need no special parsing: ``getaddrinfo`` turns them into ``127.0.0.1`` like a browser would,
and the address it returns is what is checked.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Optional, Union
from urllib.parse import urlsplit

from config.errors import InvalidURL

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]

ALLOWED_SCHEMES = ("http", "https")


def check_url(url: str, *, allow_private: bool) -> str:
    """Return the IP address segq should connect to for ``url``, or raise ``InvalidURL``.

    Refused: schemes other than http(s), credentials in the URL, hosts that do not
    resolve, and, unless ``allow_private``, hosts with any address that is not public
    (loopback, private, link-local, multicast, unspecified, reserved, shared).
    """
    parts = urlsplit(url)
    if parts.scheme.lower() not in ALLOWED_SCHEMES:
        raise InvalidURL(f"URL scheme must be http or https, got {parts.scheme or 'none'!r}", url=url)
    if parts.username is not None or parts.password is not None:
        raise InvalidURL("URL must not carry credentials (user:password@)", url=_redact(url))
    host = parts.hostname
    if not host:
        raise InvalidURL(f"URL {url!r} has no host", url=url)
    try:
        port = parts.port or (443 if parts.scheme.lower() == "https" else 80)
    except ValueError:
        raise InvalidURL(f"URL {url!r} has an invalid port", url=url) from None

    addresses = _resolve(host, port)
    if not allow_private:
        for address in addresses:
            why = _why_not_public(address)
            if why:
                raise InvalidURL(
                    f"URL host {host!r} resolves to {address} ({why}); segq only calls "
                    "public addresses",
                    url=url,
                    address=str(address),
                )
    return str(addresses[0])


def _resolve(host: str, port: int) -> list[IPAddress]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as err:
        raise InvalidURL(f"cannot resolve host {host!r}: {err}", host=host, reason="unresolvable") from None
    # The scope id ("fe80::1%eth0") is not part of the address ipaddress parses.
    return [ipaddress.ip_address(info[4][0].split("%", 1)[0]) for info in infos]


def _why_not_public(address: IPAddress) -> Optional[str]:
    """The kind of non-public address this is, or None for a public one. IPv6 forms that
    carry an IPv4 address (mapped, 6to4, Teredo) are judged by the address they carry."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded = address.ipv4_mapped or address.sixtofour or (address.teredo or (None, None))[1]
        if embedded is not None:
            why = _why_not_public(embedded)
            if why:
                return why
    checks = (
        ("unspecified", address.is_unspecified),
        ("loopback", address.is_loopback),
        ("link-local", address.is_link_local),
        ("multicast", address.is_multicast),
        ("private", address.is_private),
        ("reserved", address.is_reserved),
        # Anything else IANA does not list as globally reachable (e.g. 100.64.0.0/10).
        ("non-global", not address.is_global),
    )
    return next((name for name, hit in checks if hit), None)


def _redact(url: str) -> str:
    parts = urlsplit(url)
    return parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()
