"""The address of the client behind any trusted proxies: one helper for throttles, sign-in
limits and the audit trail.

settings.TRUSTED_PROXIES (TRUSTED_PROXIES in the environment) says who may speak for the
client in X-Forwarded-For, to which each proxy appends the address it received from:

- 0 (the default): nobody; the client is REMOTE_ADDR and the header is ignored.
- N: the app is reachable only through N proxies; the client is the N-th address from the
  right (what the outermost proxy saw). What a client writes into the header itself is left
  of that and never read.
- networks: REMOTE_ADDR must be one of them, or the header is ignored; the client is the
  right-most address in the header that is not one of them.
"""

from ipaddress import IPv6Address, ip_address, ip_network

from django.conf import settings

__all__ = ["client_ip", "client_bucket"]


def client_ip(request) -> str:
    """The client's address for a Django (or DRF) request, as text."""
    meta = request.META
    peer = meta.get("REMOTE_ADDR") or "unknown"
    peer = _normal(peer) or peer
    trusted = settings.TRUSTED_PROXIES
    if not trusted:
        return peer
    hops = [h.strip() for h in meta.get("HTTP_X_FORWARDED_FOR", "").split(",") if h.strip()]
    if isinstance(trusted, int):
        return _normal(hops[-trusted]) or peer if len(hops) >= trusted else peer
    if not _is_trusted(peer, trusted):
        return peer
    client = peer
    for hop in reversed(hops):
        address = _normal(hop)
        if address is None:
            break  # not an address: nothing left of it can be believed
        client = address
        if not _is_trusted(address, trusted):
            break
    return client


def client_bucket(request) -> str:
    """The client as limits count it: its address, an IPv6 one by its /64, which one
    subscriber holds whole (else each try could come from a new address of it)."""
    address = client_ip(request) if request is not None else "unknown"
    try:
        parsed = ip_address(address)
    except ValueError:
        return address
    if isinstance(parsed, IPv6Address):
        return str(ip_network(f"{parsed}/64", strict=False))
    return address


def _normal(text: str) -> str | None:
    """ "1.2.3.4", "1.2.3.4:5678", "[2001:db8::1]:443" or "2001:db8::1" → the address. An
    IPv4-mapped IPv6 address ("::ffff:1.2.3.4", what a dual-stack socket reports for an IPv4
    peer) is its IPv4 address: one client, one form, and IPv4 proxy networks match it."""
    candidates = [text]
    if text.startswith("[") and "]" in text:
        candidates = [text[1 : text.index("]")]]
    elif text.count(":") == 1:
        candidates.append(text.split(":", 1)[0])
    for candidate in candidates:
        try:
            address = ip_address(candidate)
        except ValueError:
            continue
        return str(getattr(address, "ipv4_mapped", None) or address)
    return None


def _is_trusted(address: str, networks: tuple) -> bool:
    try:
        parsed = ip_address(_normal(address) or address)
    except ValueError:
        return False
    return any(parsed in network for network in networks)
