"""The client's address: X-Forwarded-For only through the proxies TRUSTED_PROXIES names."""

from ipaddress import ip_network

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.test import RequestFactory

from config.client_ip import client_ip
from config.env import env_trusted_proxies

NETS = (ip_network("10.0.0.0/8"), ip_network("127.0.0.1/32"))


def _request(remote: str, forwarded: str | None = None):
    extra = {"REMOTE_ADDR": remote}
    if forwarded is not None:
        extra["HTTP_X_FORWARDED_FOR"] = forwarded
    return RequestFactory().get("/", **extra)


@pytest.mark.parametrize(
    ("trusted", "remote", "forwarded", "expected"),
    [
        # No proxies trusted: the header is whatever the client wrote, and ignored.
        (0, "203.0.113.7", "198.51.100.1", "203.0.113.7"),
        # One proxy: what it appended, not what the client wrote before it.
        (1, "127.0.0.1", "203.0.113.7", "203.0.113.7"),
        (1, "127.0.0.1", "1.1.1.1, 203.0.113.7", "203.0.113.7"),
        (2, "10.0.0.2", "1.1.1.1, 203.0.113.7, 10.0.0.1", "203.0.113.7"),
        # Fewer hops than proxies: the header was not written by them.
        (2, "127.0.0.1", "203.0.113.7", "127.0.0.1"),
        (1, "127.0.0.1", None, "127.0.0.1"),
        (1, "127.0.0.1", "not-an-address", "127.0.0.1"),
        (1, "127.0.0.1", "203.0.113.7:51234", "203.0.113.7"),
        (1, "127.0.0.1", "[2001:db8::7]:443", "2001:db8::7"),
        # Networks: the right-most address that is not a proxy.
        (NETS, "127.0.0.1", "1.1.1.1, 203.0.113.7, 10.1.2.3", "203.0.113.7"),
        (NETS, "127.0.0.1", "2001:db8::7", "2001:db8::7"),
        # A peer outside the networks is the client, whatever it claims.
        (NETS, "198.51.100.9", "203.0.113.7", "198.51.100.9"),
        # Every hop a proxy: the left-most one is the nearest thing to a client.
        (NETS, "127.0.0.1", "10.0.0.5, 10.0.0.6", "10.0.0.5"),
        (NETS, "127.0.0.1", "garbage, 10.0.0.6", "10.0.0.6"),
    ],
)
def test_it_reads_the_client_only_through_trusted_proxies(
    settings, trusted, remote, forwarded, expected
):
    settings.TRUSTED_PROXIES = trusted
    assert client_ip(_request(remote, forwarded)) == expected


def test_the_setting_takes_a_count_or_networks(monkeypatch):
    monkeypatch.setenv("TRUSTED_PROXIES", "")
    assert env_trusted_proxies("TRUSTED_PROXIES") == 0
    monkeypatch.setenv("TRUSTED_PROXIES", "2")
    assert env_trusted_proxies("TRUSTED_PROXIES") == 2
    monkeypatch.setenv("TRUSTED_PROXIES", "10.0.0.0/8, 127.0.0.1,::1")
    assert [str(n) for n in env_trusted_proxies("TRUSTED_PROXIES")] == [
        "10.0.0.0/8",
        "127.0.0.1/32",
        "::1/128",
    ]
    monkeypatch.setenv("TRUSTED_PROXIES", "10.0.0.0/8, nginx")
    with pytest.raises(ImproperlyConfigured, match="TRUSTED_PROXIES .*'nginx'"):
        env_trusted_proxies("TRUSTED_PROXIES")
