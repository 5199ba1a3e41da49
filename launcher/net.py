"""Ports and network interfaces for a rendezvous (standard library only: tools, tests and benchmarks use it without
importing torch or DeepSpeed).

``socket_ifnames`` answers which interface gloo and NCCL should use across nodes: the one holding the address this
host uses to reach MASTER_ADDR (the kernel's routing answer), unless the user named one.
"""
from __future__ import annotations

import fcntl
import ipaddress
import socket
import struct
from typing import Callable, Mapping

IFNAME_VARS = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")
# any non-local address: its route is the default route (a UDP connect sends nothing, so it needs no network)
DEFAULT_ROUTE_PROBE = "192.0.2.1"  # TEST-NET-1 (RFC 5737)
_SIOCGIFADDR = 0x8915


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` right now (the kernel's choice), for a rendezvous that starts next."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def route_source(host: str) -> str | None:
    """The local address the kernel would send from to reach ``host`` (a name or an address), or None when it has
    no route or the name does not resolve. Nothing is sent."""
    try:
        family, _, _, _, addr = socket.getaddrinfo(host, 9, type=socket.SOCK_DGRAM)[0]
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.connect(addr)
            return s.getsockname()[0]
    except OSError:
        return None


def interface_addresses() -> dict[str, list[str]]:
    """Each network interface of this host and its addresses (IPv4 from the kernel, IPv6 from /proc)."""
    found: dict[str, list[str]] = {}
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            try:
                raw = fcntl.ioctl(s.fileno(), _SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
                found.setdefault(name, []).append(socket.inet_ntoa(raw[20:24]))
            except OSError:  # no IPv4 address on this interface
                found.setdefault(name, [])
    try:
        for line in open("/proc/net/if_inet6").read().splitlines():  # "<32 hex digits> idx plen scope flags name"
            hexaddr, *_, name = line.split()
            found.setdefault(name, []).append(str(ipaddress.IPv6Address(bytes.fromhex(hexaddr))))
    except OSError:
        pass
    return found


def _is_loopback(address: str) -> bool:
    return ipaddress.ip_address(address.split("%")[0]).is_loopback


def interface_for(master_addr: str, source_of: Callable[[str], str | None],
                  interfaces: Mapping[str, list[str]]) -> str | None:
    """The interface to reach ``master_addr`` from, given the routing answer ``source_of`` and this host's
    ``interfaces``: the one holding the source address. On the master's own node its name may resolve to loopback
    (Debian's /etc/hosts maps the hostname to 127.0.1.1), where the others cannot reach it: the default route's
    interface is taken there. None when neither gives a non-loopback interface."""
    source = source_of(master_addr)
    if source is None or _is_loopback(source):
        source = source_of(DEFAULT_ROUTE_PROBE)
    if source is None or _is_loopback(source):
        return None
    return next((name for name, addrs in interfaces.items() if source in addrs), None)


def socket_ifnames(env: Mapping[str, str], master_addr: str, source_of: Callable[[str], str | None] = route_source,
                   interfaces: Callable[[], Mapping[str, list[str]]] = interface_addresses) -> dict[str, str]:
    """The GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME values to set for a multi-node job: the interface that reaches
    ``master_addr`` for each variable the user has not set; empty when both are set or no interface is found.

    Without them gloo picks the address of this host's name, which Debian and Ubuntu map to 127.0.1.1, and the
    other nodes cannot connect to it."""
    missing = [v for v in IFNAME_VARS if not env.get(v)]
    if not missing:
        return {}
    name = interface_for(master_addr, source_of, interfaces())
    return {v: name for v in missing} if name else {}
