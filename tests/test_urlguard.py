"""The URL guard refuses every way of naming a non-public address. Only IP literals and
``localhost`` (from /etc/hosts) are used, so these tests send no traffic and need no DNS."""

from __future__ import annotations

import socket

import pytest

from config.errors import InvalidURL
from config.urlguard import check_url

REFUSED = [
    # schemes and credentials
    ("ftp://8.8.8.8/file", "scheme"),
    ("file:///etc/passwd", "scheme"),
    ("gopher://8.8.8.8/", "scheme"),
    ("8.8.8.8/hook", "scheme"),
    ("http://user:pass@8.8.8.8/hook", "credentials"),
    ("http://user@8.8.8.8/hook", "credentials"),
    ("http:///no-host", "no host"),
    ("http://8.8.8.8:99999/", "invalid port"),
    # loopback in all its spellings
    ("http://127.0.0.1/", "loopback"),
    ("http://localhost:8080/hook", "loopback"),
    ("http://127.1/", "loopback"),
    ("http://2130706433/", "loopback"),
    ("http://0x7f000001/", "loopback"),
    ("http://017700000001/", "loopback"),
    ("http://0177.0.0.1/", "loopback"),
    ("http://[::1]/", "loopback"),
    ("http://[::ffff:127.0.0.1]/", "loopback"),
    ("http://[::ffff:7f00:1]/", "loopback"),
    # private, link-local (cloud metadata), shared, multicast, unspecified, reserved
    ("http://10.0.0.5/", "private"),
    ("http://172.16.0.1/", "private"),
    ("http://172.31.255.254/", "private"),
    ("http://192.168.1.1/", "private"),
    ("http://[fc00::1]/", "private"),
    ("http://[fd12:3456::1]/", "private"),
    ("http://169.254.169.254/latest/meta-data/", "link-local"),
    ("http://[fe80::1]/", "link-local"),
    ("http://[::ffff:169.254.169.254]/", "link-local"),
    ("http://100.64.0.1/", "non-global"),
    ("http://224.0.0.1/", "multicast"),
    ("http://[ff02::1]/", "multicast"),
    ("http://0.0.0.0/", "unspecified"),
    ("http://[::]/", "unspecified"),
    ("http://240.0.0.1/", "private"),
    # IPv6 forms that carry a loopback IPv4 address (6to4, Teredo)
    ("http://[2002:7f00:1::]/", "loopback"),
    ("http://[2001:0:4136:e378:8000:63bf:80ff:fffe]/", "loopback"),
]


@pytest.mark.parametrize("url, why", REFUSED)
def test_dangerous_urls_are_refused(url: str, why: str) -> None:
    with pytest.raises(InvalidURL, match=why) as err:
        check_url(url, allow_private=False)
    assert err.value.code == "invalid_url"


@pytest.mark.parametrize(
    "url, ip",
    [
        ("https://8.8.8.8/hooks/segq?token=x", "8.8.8.8"),
        ("http://1.1.1.1:8080/", "1.1.1.1"),
        ("HTTPS://93.184.215.14/", "93.184.215.14"),
        ("https://[2606:4700:4700::1111]/hook", "2606:4700:4700::1111"),
    ],
)
def test_public_addresses_are_accepted_and_returned(url: str, ip: str) -> None:
    assert check_url(url, allow_private=False) == ip


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:9000/hook", "http://localhost/", "http://10.0.0.5/", "http://[::1]/"]
)
def test_allow_private_lets_internal_addresses_through(url: str) -> None:
    assert check_url(url, allow_private=True)


def test_allow_private_still_refuses_other_schemes_and_credentials() -> None:
    with pytest.raises(InvalidURL, match="scheme"):
        check_url("file:///etc/passwd", allow_private=True)
    with pytest.raises(InvalidURL, match="credentials"):
        check_url("http://a:b@127.0.0.1/", allow_private=True)


def test_every_resolved_address_is_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    """A name with one public and one private address (a rebinding setup) is refused:
    no DNS server is available here, so the resolver's answer is staged."""

    def resolve(host, port, *args, **kwargs):
        assert host == "rebind.example"
        return [
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.215.14", port)),
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port)),
        ]

    monkeypatch.setattr(socket, "getaddrinfo", resolve)
    with pytest.raises(InvalidURL, match="127.0.0.1"):
        check_url("https://rebind.example/hook", allow_private=False)


def test_unresolvable_host_is_refused_and_marked_as_such(monkeypatch: pytest.MonkeyPatch) -> None:
    def resolve(host, port, *args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", resolve)
    with pytest.raises(InvalidURL) as err:
        check_url("http://no-such-host.invalid/", allow_private=False)
    assert err.value.details["reason"] == "unresolvable"
