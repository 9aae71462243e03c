"""Which addresses are public: the one rule for anything the product connects to on a
customer's say-so (webhook URLs) or has a node pull from (workload images). The site agent,
which imports nothing of ours, holds a copy (agent/switchyard_agent.py), tested to agree."""

import ipaddress

__all__ = ["is_public_address"]

# Cloud metadata services that are not inside the private ranges in every cloud.
_METADATA = {ipaddress.ip_address("169.254.169.254"), ipaddress.ip_address("fd00:ec2::254")}
# IETF protocol assignments: Python counts only part of it as not global.
_IETF = ipaddress.ip_network("192.0.0.0/24")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")  # the well-known prefix: IPv4 in the low 32 bits
_NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")  # local-use: a network's own


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one carries (mapped, 6to4, NAT64), if any: a translator or
    relay would take a connection to it there."""
    if ip.ipv4_mapped:
        return ip.ipv4_mapped
    if ip.sixtofour:
        return ip.sixtofour
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def is_public_address(address: str | ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """A global unicast address, and no IPv4 address inside an IPv6 one that is not: not a
    loopback, private, link-local, reserved or shared range, not a metadata service, and not
    one of those reached through its IPv4-mapped, 6to4 or NAT64 form."""
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address):
        if ip in _NAT64_LOCAL:
            return False
        inner = _embedded_ipv4(ip)
        if inner is not None:
            return is_public_address(inner)
    if ip in _METADATA or ip.is_multicast or not ip.is_global:
        return False
    if isinstance(ip, ipaddress.IPv6Address):
        # Python counts as global the IPv6 space the IETF reserves (::/8 but the forms above,
        # e.g. the deprecated IPv4-compatible ::7f00:1, which a host with a sit tunnel sends to
        # the IPv4 address inside) and deprecated site-local fec0::/10: no internet route
        # leads to either, only a network's own.
        return not (ip.is_reserved or ip.is_site_local)
    return ip not in _IETF
