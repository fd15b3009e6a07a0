"""One configuration of Triton's server for both runtimes: where it listens, TLS, what stays closed, how it starts.

``ServerConfig.flags()`` is the one list of settings, named as tritonserver's options; ``tritonserver_args()`` renders
it as the standalone server's command line (``--runtime python-backend``) and ``pytriton_arguments()`` as PyTriton's
``TritonConfig`` and ``TritonSecurityConfig`` (``--runtime pytriton``), so both runtimes start tritonserver alike.

Closed on both (docs/serving.md#safe-on-a-robot says why): the model-repository API (load, unload, and loading
uploaded model files, which would run their code), shared memory (a client would have the server map memory of this
machine), trace and logging (they change what the server writes, and where). Open: health, metadata, model
configuration and inference, which clients need, and statistics, read-only counts that the metrics endpoint publishes
too and that perf_analyzer reads. A closed API answers only requests carrying ``ADMIN_HEADER`` with this server's
random key; PyTriton sends it on its own calls (it loads its models through the model-repository API).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import secrets
import socket
from pathlib import Path
from typing import Any

from ume_edge.constants import (
    DEFAULT_GRPC_PORT,
    DEFAULT_HOST,
    DEFAULT_HTTP_PORT,
    DEFAULT_MAX_QUEUE_DELAY_US,
    DEFAULT_METRICS_PORT,
)
from ume_edge.errors import BackendUnavailable

ADMIN_APIS = ("model-repository", "shared-memory", "trace", "logging")
# PyTriton's header for closed APIs (pytriton.triton.TRITON_ACCESS_HEADER): one name, so both runtimes get one flag.
ADMIN_HEADER = "triton-access-token"
RESTRICTION_FLAGS = ("http-restricted-api", "grpc-restricted-protocol")
# A refused 400 MB request left tritonserver 0.5 GB larger, request after request: its gRPC front keeps request
# objects, and the buffers they grew, for reuse. Without the pool it returns to about 0.3 GB (measured here).
NO_GRPC_REQUEST_POOL = 0
EXIT_TIMEOUT_S = 5


class TritonServerError(BackendUnavailable):
    """A server did not start, or did not become ready; the message says why (with the end of its log)."""


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` distinct TCP ports free on ``host`` right now."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) for _ in range(count)]
        for sock in sockets:
            sock.bind((host, 0))
        return [sock.getsockname()[1] for sock in sockets]


@dataclasses.dataclass(frozen=True)
class Endpoints:
    """Where a server listens: one address for gRPC, HTTP and metrics (default loopback), and the three ports.
    ``grpc_only``: HTTP and metrics stay closed (they have no TLS, so a TLS server serves gRPC alone)."""

    host: str = DEFAULT_HOST
    grpc_port: int = DEFAULT_GRPC_PORT
    http_port: int = DEFAULT_HTTP_PORT
    metrics_port: int = DEFAULT_METRICS_PORT
    grpc_only: bool = False

    @property
    def connect_host(self) -> str:
        """The address a client on this machine connects to (a wildcard bind is reached on loopback)."""
        return {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(self.host, self.host)

    def _hostport(self, port: int) -> str:
        host = self.connect_host
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    @property
    def grpc_url(self) -> str:
        return self._hostport(self.grpc_port)

    @property
    def http_url(self) -> str:
        return f"http://{self._hostport(self.http_port)}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self._hostport(self.metrics_port)}/metrics"

    def ports(self) -> dict[str, int]:
        """The ports that serve, by kind."""
        if self.grpc_only:
            return {"gRPC": self.grpc_port}
        return {"gRPC": self.grpc_port, "HTTP": self.http_port, "metrics": self.metrics_port}

    def check_free(self) -> None:
        """One line naming what stops a server listening here (an unknown host, an address of another machine,
        a port something already holds), before anything starts."""
        family, address = self._resolve()
        for kind, port in self.ports().items():
            with socket.socket(family, socket.SOCK_STREAM) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers do: TIME_WAIT is no holder
                try:
                    probe.bind((address, port))
                except OSError as error:
                    raise TritonServerError(self._bind_refusal(kind, port, error)) from None

    def _resolve(self) -> tuple[int, str]:
        try:
            family, *_, sockaddr = socket.getaddrinfo(self.host, None, type=socket.SOCK_STREAM)[0]
        except (socket.gaierror, UnicodeError) as error:
            raise TritonServerError(f"--host {self.host} cannot be resolved ({error}); give an address of this "
                                    "machine, such as 127.0.0.1 or 0.0.0.0") from None
        return family, str(sockaddr[0])

    def _bind_refusal(self, kind: str, port: int, error: OSError) -> str:
        if error.errno == errno.EADDRNOTAVAIL:
            return (f"--host {self.host} is not an address of this machine; give one of its own addresses, "
                    "127.0.0.1 or 0.0.0.0")
        option = f"--{kind.lower()}-port"
        if error.errno == errno.EADDRINUSE:
            return (f"port {port} ({kind}) on {self.host} is in use ({error.strerror}): another server holds it; "
                    f"stop it, or choose another {option}")
        return f"cannot listen on port {port} ({kind}) on {self.host} ({error.strerror}); choose another {option}"


@dataclasses.dataclass(frozen=True)
class GrpcTls:
    """Triton's gRPC TLS: the server's certificate and key, and a root certificate to require client certificates."""

    server_cert: Path
    server_key: Path
    root_cert: Path | None = None

    def flags(self) -> dict[str, str | bool]:
        mode = "grpc-use-ssl-mutual" if self.root_cert else "grpc-use-ssl"
        flags: dict[str, str | bool] = {mode: True, "grpc-server-cert": str(self.server_cert),
                                        "grpc-server-key": str(self.server_key)}
        return flags | ({"grpc-root-cert": str(self.root_cert)} if self.root_cert else {})


def _server_id() -> str:
    return f"ume-edge-{os.getpid()}-{secrets.token_hex(4)}"


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    """How tritonserver serves, whichever runtime starts it. With ``tls`` it serves gRPC alone: Triton's HTTP and
    metrics endpoints have no TLS, so they stay closed. ``max_queue_delay_us``: each model's dynamic batching delay."""

    endpoints: Endpoints = Endpoints()
    tls: GrpcTls | None = None
    max_queue_delay_us: int = DEFAULT_MAX_QUEUE_DELAY_US
    log_verbose: int = 0
    exit_timeout_s: int = EXIT_TIMEOUT_S
    server_id: str = dataclasses.field(default_factory=_server_id)
    admin_key: str = dataclasses.field(default_factory=lambda: secrets.token_urlsafe(16), repr=False)

    def __post_init__(self) -> None:
        if self.tls is not None and not self.endpoints.grpc_only:
            object.__setattr__(self, "endpoints", dataclasses.replace(self.endpoints, grpc_only=True))

    def flags(self) -> dict[str, str | int | bool]:
        """The settings, named as tritonserver's options (without the leading ``--``)."""
        e, restricted = self.endpoints, f"{','.join(ADMIN_APIS)}:{ADMIN_HEADER}={self.admin_key}"
        flags: dict[str, str | int | bool] = {
            "id": self.server_id,
            "grpc-address": e.host, "http-address": e.host, "metrics-address": e.host,
            "grpc-port": e.grpc_port, "http-port": e.http_port, "metrics-port": e.metrics_port,
            "allow-grpc": True, "allow-http": not e.grpc_only, "allow-metrics": not e.grpc_only,
            "allow-gpu-metrics": False,
            "http-restricted-api": restricted, "grpc-restricted-protocol": restricted,
            "grpc-infer-allocation-pool-size": NO_GRPC_REQUEST_POOL,
            "exit-on-error": True, "strict-readiness": True, "exit-timeout-secs": self.exit_timeout_s,
            "log-verbose": self.log_verbose,
        }
        return flags | (self.tls.flags() if self.tls else {})

    def tritonserver_args(self) -> list[str]:
        """The flags as tritonserver's command-line options."""
        return [f"--{name}={str(value).lower() if isinstance(value, bool) else value}"
                for name, value in self.flags().items()]

    def pytriton_arguments(self, log_file: Path | None) -> dict[str, Any]:
        """The flags as the ``config`` and ``security_config`` arguments of ``pytriton.triton.Triton``; PyTriton
        writes the closed APIs from ``security_config``, whose key it sends on its own calls."""
        if self.tls is not None:
            raise ValueError("PyTriton drives its tritonserver over HTTP, which has no TLS; serve TLS with the "
                             "python-backend runtime")
        from pytriton.triton import TritonConfig, TritonSecurityConfig

        fields = {name.replace("-", "_"): value for name, value in self.flags().items()
                  if name not in RESTRICTION_FLAGS}
        return {"config": TritonConfig(**fields, log_file=log_file),
                "security_config": TritonSecurityConfig(access_token=self.admin_key,
                                                        restricted_endpoints=list(ADMIN_APIS))}
