"""Who may associate: our called AE title, an allow-list of calling AE titles and one of peer
networks. A refusal is an A-ASSOCIATE-RJ with the matching PS3.8 result/source/reason, a log
line naming the reason, and an ScpEvent row (the SCP writes those).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

# (result, source, reason) of A-ASSOCIATE-RJ, PS3.8 Table 9-21.
RJ_NO_REASON = (0x01, 0x01, 0x01)  # permanent, service-user, no reason given
RJ_CALLING_AET = (0x01, 0x01, 0x03)  # permanent, service-user, calling AE title not recognised
RJ_CALLED_AET = (0x01, 0x01, 0x07)  # permanent, service-user, called AE title not recognised
RJ_CONGESTION = (0x02, 0x03, 0x01)  # transient, service-provider (presentation), temporary congestion
RJ_LIMIT = (0x02, 0x03, 0x02)  # transient, service-provider (presentation), local limit exceeded
RJ_BAD_REQUEST = (0x01, 0x02, 0x01)  # permanent, service-provider (ACSE), no reason given


@dataclass(frozen=True)
class Refusal:
    rsd: tuple[int, int, int]
    reason: str


def check_context_ids(ids: list[int]) -> Refusal | None:
    """PS3.8 9.3.2.2: presentation context IDs are odd integers 1-255, and 7.1.1.13: each one
    identifies one proposed context, so they are distinct; an A-ASSOCIATE-RQ has at least one.
    A request that breaks this cannot be answered context by context (the A-ASSOCIATE-AC names
    each result by its ID), so the whole request is refused."""
    if not ids:
        return Refusal(RJ_BAD_REQUEST, "A-ASSOCIATE-RQ proposes no presentation context")
    even = sorted({i for i in ids if i % 2 == 0})
    if even:
        shown = ", ".join(map(str, even[:8])) + (" ..." if len(even) > 8 else "")
        return Refusal(RJ_BAD_REQUEST, f"presentation context IDs must be odd (PS3.8 9.3.2.2); got {shown}")
    if len(set(ids)) != len(ids):
        return Refusal(RJ_BAD_REQUEST, f"presentation context IDs must be unique; {len(ids)} contexts "
                                       f"use {len(set(ids))} IDs")
    return None


class AccessPolicy:
    """Decides whether an association request is allowed (pure: no I/O, easy to test)."""

    def __init__(self, called_aet: str, allowed_aets: list[str], allowed_networks: list[str]) -> None:
        if not called_aet.strip():
            raise ValueError("called_aet must be a non-empty AE title")
        self.called_aet = called_aet.strip()
        self.allowed_aets = frozenset(a.strip() for a in allowed_aets if a.strip())
        try:
            self.networks = tuple(ipaddress.ip_network(n, strict=False) for n in allowed_networks)
        except ValueError as exc:
            raise ValueError(f"allowed_networks: {exc}") from exc

    def peer_allowed(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address.split("%")[0])
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip in net for net in self.networks if net.version == ip.version)

    def check(self, called_aet: str, calling_aet: str, address: str) -> Refusal | None:
        if not self.peer_allowed(address):
            return Refusal(RJ_NO_REASON, f"peer address {address} is not in allowed_networks")
        if called_aet.strip() != self.called_aet:
            return Refusal(RJ_CALLED_AET, f"called AE title {called_aet.strip()!r} is not ours ({self.called_aet!r})")
        if self.allowed_aets and calling_aet.strip() not in self.allowed_aets:
            return Refusal(RJ_CALLING_AET, f"calling AE title {calling_aet.strip()!r} is not in allowed_aets")
        return None
