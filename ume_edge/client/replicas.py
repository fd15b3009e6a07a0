"""Several servers behind one ``--url``: the replicas, round-robin with a back-off, and which errors move a request to
another replica.

``--url`` is a comma-separated list of ``HOST:PORT`` (each one replica, used as written), or one ``HOST:PORT`` whose
name resolves to several addresses (what a headless Kubernetes Service gives): each address is then a replica. A name
with IPv4 addresses uses those alone, otherwise its IPv6 ones, so a dual-stack Service, which gives every pod both an
A and an AAAA record, counts each pod once. A name that resolves to one address is used by its name, as one server.
The name is resolved once, when the replay starts.

The client keeps one ``tritonclient.grpc.InferenceServerClient`` per replica and spreads requests round-robin itself,
rather than giving gRPC one channel with its ``round_robin`` policy and a retry policy in the service config: a
response does not say which backend answered it, so gRPC's own balancing would hide the requests answered per
replica, the failed tries and the retries that the summary counts.

A try that fails with UNAVAILABLE (gRPC's status for a connection refused or reset, and for a server shutting down)
is sent again to a replica the request has not tried yet, within what is left of the request's ``--timeout-s``; any
other error (an input the model refuses, a deadline) is the request's answer. Retrying is safe because inference is
idempotent: the entry model is a pure function of the request (no sequence batching, no state kept between requests,
no side effects), so running a request twice gives the same answer. A request whose try was cut off may have run on
the failed replica too, but that answer was lost with the connection; a request has one try in flight at a time, so
it is answered and counted once. A replica that fails a try is skipped by the round-robin for a back-off (doubling
from ``BACKOFF_S`` to ``MAX_BACKOFF_S`` while it keeps failing) and then tried again: it may have come back.
"""

from __future__ import annotations

import ipaddress
import socket
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

RETRYABLE_STATUSES = frozenset({"StatusCode.UNAVAILABLE"})  # InferenceServerException.status() of a gRPC error
BACKOFF_S = 0.5
MAX_BACKOFF_S = 8.0

T = TypeVar("T")


def parse_url(url: str) -> list[str]:
    """``"a:8001, b:8001"`` -> ``["a:8001", "b:8001"]``, each ``HOST:PORT`` checked (IPv6 as ``[ADDRESS]:PORT``)."""
    addresses = [part.strip() for part in url.split(",")]
    for address in addresses:
        _host_port(address)
    return addresses


def _host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--url expects HOST:PORT, or several separated by commas (e.g. localhost:8001 or "
                         f"10.0.0.5:8001,10.0.0.6:8001), got {address!r}")
    return host, int(port)


def resolve_replicas(url: str) -> list[str]:
    """The replicas' addresses: the list as given, or the addresses one name resolves to (see the module)."""
    addresses = parse_url(url)
    if len(addresses) > 1:
        return addresses
    host, port = _host_port(addresses[0])
    try:
        records = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as error:
        raise ValueError(f"--url {url}: cannot resolve {host!r} ({error.strerror})") from None
    ipv4 = [str(record[4][0]) for record in records if record[0] == socket.AF_INET]
    found = list(dict.fromkeys(ipv4 or [str(record[4][0]) for record in records if record[0] == socket.AF_INET6]))
    if len(found) <= 1:
        return addresses
    return [f"[{ip}]:{port}" if ipaddress.ip_address(ip).version == 6 else f"{ip}:{port}" for ip in found]


def is_retryable(error: BaseException) -> bool:
    """Whether a ``tritonclient`` error means the replica, not the request, failed."""
    from tritonclient.utils import InferenceServerException

    return isinstance(error, InferenceServerException) and error.status() in RETRYABLE_STATUSES


class Replicas:
    """One client per address; ``pick`` gives the next replica round-robin, skipping those in back-off."""

    def __init__(self, addresses: list[str], make_client: Callable[[str], Any] | None = None,
                 clock: Callable[[], float] = time.monotonic):
        if make_client is None:
            import tritonclient.grpc as grpcclient

            make_client = grpcclient.InferenceServerClient
        self.addresses = list(addresses)
        self.clients = {address: make_client(address) for address in self.addresses}
        self._clock = clock
        self._next = 0
        self._failures_in_a_row = dict.fromkeys(self.addresses, 0)
        self._skip_until = dict.fromkeys(self.addresses, 0.0)
        self._lock = threading.Lock()

    def pick(self, tried: list[str]) -> str | None:
        """The next replica not in ``tried``: the first out of back-off in round-robin order, else the one whose
        back-off ends first; None when every replica has been tried."""
        with self._lock:
            count = len(self.addresses)
            order = [self.addresses[(self._next + step) % count] for step in range(count)]
            candidates = [address for address in order if address not in tried]
            if not candidates:
                return None
            now = self._clock()
            ready = [address for address in candidates if self._skip_until[address] <= now]
            chosen = ready[0] if ready else min(candidates, key=self._skip_until.__getitem__)
            self._next = (self.addresses.index(chosen) + 1) % count
            return chosen

    def failed(self, address: str) -> None:
        with self._lock:
            self._failures_in_a_row[address] += 1
            backoff_s = min(MAX_BACKOFF_S, BACKOFF_S * 2 ** (self._failures_in_a_row[address] - 1))
            self._skip_until[address] = self._clock() + backoff_s

    def answered(self, address: str) -> None:
        with self._lock:
            self._failures_in_a_row[address] = 0
            self._skip_until[address] = 0.0

    def call_any(self, call: Callable[[Any], T]) -> T:
        """``call(client)`` on each replica in turn until one is not unavailable (metadata calls)."""
        for address in self.addresses[:-1]:
            try:
                return call(self.clients[address])
            except Exception as error:
                if not is_retryable(error):
                    raise
        return call(self.clients[self.addresses[-1]])

    def close(self) -> None:
        for client in self.clients.values():
            client.close()
