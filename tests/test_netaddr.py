"""config.netaddr: which addresses count as public (webhook URLs, workload registries)."""

import pytest

from config.netaddr import is_public_address


@pytest.mark.parametrize(
    "address",
    ["93.184.216.34", "2606:4700:4700::1111", "64:ff9b::5db8:d822", "2002:5db8:d822::1"],
)
def test_public_addresses_and_their_translated_forms_are_public(address):
    assert is_public_address(address)


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1", "10.0.0.5", "172.16.0.9", "192.168.1.1", "100.64.0.1", "169.254.169.254",
        "0.0.0.0", "192.0.0.8", "224.0.0.1", "::1", "fe80::1", "fd00:ec2::254",
        "::ffff:127.0.0.1", "64:ff9b::7f00:1", "2002:7f00:1::", "2002:a00:5::1",
        "64:ff9b:1::a00:1",
    ],
)  # fmt: skip
def test_anything_on_the_machine_or_a_private_network_is_not(address):
    assert not is_public_address(address)


@pytest.mark.parametrize(
    "address",
    ["::7f00:1", "::a9fe:a9fe", "::808:808", "fec0::1", "4000::1", "100:1::1", "fe00::1"],
)
def test_reserved_and_site_local_ipv6_is_not_though_python_calls_it_global(address):
    """IPv4-compatible ::a.b.c.d (::/96, deprecated), the rest of the IETF's reserved IPv6
    space and site-local fec0::/10 have no internet route: only a network's own reaches them."""
    assert not is_public_address(address)
