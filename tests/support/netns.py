"""A network namespace for an IdP whose network can be cut, made with pyroute2 (root).

`IsolatedIdPNetwork` creates a named network namespace with no default route
and joins it to this one with a veth pair holding the two addresses of a
/30 of 10.231.0.0/16 that this host does not use (`host_address` on this
side, `address` inside): a server listening inside can only ever talk to
this host, and a test can make its packets vanish (`cut()`) and come
back (`restore()`) without touching any other interface or route.

Network namespace membership is per thread (setns(2) changes the calling
thread only), so `inside(fn)` runs `fn` in a short-lived thread that joined the
namespace; sockets keep the namespace they were created in, so `bind()` makes
a socket there and hands it back to any thread of this process.

    with IsolatedIdPNetwork() as network, TestIdP(tls=True, listen=network.bind) as idp:
        network.cut()      # connects to idp.url time out
        network.restore()  # and work again

What a cut looks like, measured on Linux 6.18: connect() to the namespace
gets no answer at all, for as long as one waits (30 s tried). The other way
to cut, setting the namespace side of the veth down, is not a silent cut: the
host's neighbour entry fails after ARP's three probes (`mcast_solicit` x
`retrans_time_ms`) and connect() fails with EHOSTUNREACH after about 3 s.
"""

from __future__ import annotations

import ipaddress
import os
import random
import socket
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

T = TypeVar("T")

SUPERNET = ipaddress.IPv4Network("10.231.0.0/16")
"""Where the /30 of each namespace comes from (private, RFC 1918)."""

NETNS_RUN_DIR = Path("/var/run/netns")
"""Where named namespaces are bind-mounted, as `ip netns` does."""


class IsolatedIdPNetwork:
    """A named network namespace with no default route, reached through a veth pair."""

    def __init__(self, prefix: str = "na-idp") -> None:
        token = uuid.uuid4().hex[:8]
        self.name = f"{prefix}-{token}"
        # Interface names are at most 15 bytes (IFNAMSIZ - 1).
        self.host_ifname = f"naih{token}"
        self.ns_ifname = f"nain{token}"
        self.host_address = ""
        """This side of the veth: where clients' packets come from."""
        self.address = ""
        """The namespace side of the veth: where a server inside listens."""
        self.prefixlen = 30
        self.severed = False
        """Whether packets to the namespace vanish now (`cut()`)."""
        self._created = False

    # -- life cycle

    def __enter__(self) -> IsolatedIdPNetwork:
        try:
            self._create()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _create(self) -> None:
        from pyroute2 import IPRoute, netns

        netns.create(self.name)
        self._created = True
        subnet = self._free_subnet()
        host, inside = list(subnet.hosts())
        self.host_address, self.address = str(host), str(inside)
        with IPRoute() as ipr:
            ipr.link("add", ifname=self.host_ifname, kind="veth", peer={"ifname": self.ns_ifname})
            (peer,) = ipr.link_lookup(ifname=self.ns_ifname)
            ipr.link("set", index=peer, net_ns_fd=self.name)
            (index,) = ipr.link_lookup(ifname=self.host_ifname)
            ipr.addr("add", index=index, address=self.host_address, prefixlen=self.prefixlen)
            ipr.link("set", index=index, state="up")
        self.inside(self._configure_inside)

    def _configure_inside(self) -> None:
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            (lo,) = ipr.link_lookup(ifname="lo")
            ipr.link("set", index=lo, state="up")
            (index,) = ipr.link_lookup(ifname=self.ns_ifname)
            ipr.addr("add", index=index, address=self.address, prefixlen=self.prefixlen)
            ipr.link("set", index=index, state="up")
            # A new namespace has no routes but those of its addresses; make sure.
            defaults = [r for r in ipr.get_routes(family=socket.AF_INET) if r["dst_len"] == 0]
            assert not defaults, f"namespace {self.name} has a default route"

    def _free_subnet(self) -> ipaddress.IPv4Network:
        """A /30 of SUPERNET that no address or route of this host overlaps."""
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            taken = [
                ipaddress.IPv4Network(
                    f"{r.get_attr('RTA_DST') or '0.0.0.0'}/{r['dst_len']}", strict=False
                )
                for table in (254, 255)  # main and local
                for r in ipr.get_routes(family=socket.AF_INET, table=table)
                if r["dst_len"] > 0  # the default route overlaps everything
            ]
        candidates = list(SUPERNET.subnets(new_prefix=self.prefixlen))
        random.shuffle(candidates)
        for subnet in candidates:
            if not any(subnet.overlaps(net) for net in taken):
                return subnet
        raise RuntimeError(f"no free /{self.prefixlen} left in {SUPERNET}")

    def close(self) -> None:
        """Remove the veth pair and the namespace (safe to call on a half-made one)."""
        from pyroute2 import IPRoute, netns

        # Sockets still open inside keep the namespace (and its veth end) alive
        # after its name is gone: delete the pair from this side, explicitly.
        with IPRoute() as ipr:
            for index in ipr.link_lookup(ifname=self.host_ifname):
                ipr.link("del", index=index)
        if self._created:
            netns.remove(self.name)
            self._created = False

    # -- faults

    def cut(self) -> None:
        """Make packets to the namespace vanish: connects time out, nothing is refused.

        A blackhole route for this host's address inside the namespace: SYNs
        still arrive, but the namespace cannot route a SYN-ACK (nor an RST,
        nor data) back (blackhole routes fail the lookup, `fib_props` in
        net/ipv4/fib_semantics.c), so the client hears nothing. The veth
        stays up and ARP keeps working (ARP replies are not routed), so the
        host never learns the peer is gone and never answers EHOSTUNREACH.
        """
        self.inside(lambda: self._blackhole("add"))
        self.severed = True

    def restore(self) -> None:
        """Undo `cut()`."""
        self.inside(lambda: self._blackhole("del"))
        self.severed = False

    def _blackhole(self, command: str) -> None:
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            ipr.route(command, dst=f"{self.host_address}/32", type="blackhole")

    # -- running things inside

    def bind(self, port: int = 0) -> socket.socket:
        """A TCP socket bound to `address:port` inside the namespace, not yet
        listening, with SO_REUSEADDR (so a server can come back on its port)."""

        def make() -> socket.socket:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind((self.address, port))
            except BaseException:
                sock.close()
                raise
            return sock

        return self.inside(make)

    def inside(self, fn: Callable[[], T]) -> T:
        """`fn()` run in a thread that joined the namespace; its result or its exception.

        setns(2) with CLONE_NEWNET moves only the calling thread, and that
        thread ends with `fn`: no other thread of this process ever changes
        namespace. Sockets made there stay in the namespace wherever used.
        """
        from pyroute2 import netns

        outcome: dict[str, Any] = {}

        def run() -> None:
            try:
                fd = os.open(NETNS_RUN_DIR / self.name, os.O_RDONLY)
                try:
                    netns.setns(fd, flags=0)
                finally:
                    os.close(fd)
                outcome["result"] = fn()
            except BaseException as err:  # handed to the caller
                outcome["error"] = err

        thread = threading.Thread(target=run, name=f"netns-{self.name}")
        thread.start()
        thread.join()
        if "error" in outcome:
            raise outcome["error"]
        return outcome["result"]  # type: ignore[no-any-return]
