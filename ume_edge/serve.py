"""``python -m ume_edge.serve``: serve an engine directory (or a Triton model repository) over Triton's gRPC/HTTP API.

    python -m ume_edge.serve [--engines DIR | --repository DIR] [--host 127.0.0.1] [--grpc-port 8001] ...

Models: ``ume`` (one optional input per modality, and an optional ``present`` mask; outputs ``logits``, ``probs``,
``label``) and one ``ume_<modality>`` per encoder, with dynamic batching. Two runtimes, both on the ``tritonserver``
that the nvidia-pytriton wheel ships: ``python-backend`` (default: Python-backend models inside Triton, per-request
errors, presence metrics) and ``pytriton`` (PyTriton callables in this process; see ``ume_edge.serving.pytriton``).

The server listens on loopback unless ``--host`` says otherwise. With TLS (``--grpc-server-cert``) it serves gRPC
alone: Triton's HTTP and metrics endpoints have no TLS, so they stay closed. Its children never outlive it: a watchdog
process stops them and removes the temporary files if this process dies, even by SIGKILL, and what an earlier killed
server left in the temporary folder is removed at the next start.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import signal
import socket
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

from ume_edge.cli_common import DefaultsFormatter, show_progress
from ume_edge.constants import (
    DEFAULT_GRPC_PORT,
    DEFAULT_HOST,
    DEFAULT_HTTP_PORT,
    DEFAULT_MAX_QUEUE_DELAY_US,
    DEFAULT_METRICS_PORT,
)
from ume_edge.errors import UmeEdgeError
from ume_edge.runtime import Pipeline
from ume_edge.serving.server_config import Endpoints, GrpcTls, ServerConfig
from ume_edge.serving.tritonserver import ServerProcess, remove_stale_temp
from ume_edge.serving.watchdog import Watchdog

RUNTIMES = ("python-backend", "pytriton")
READY_LINE = "  stop with Ctrl-C (SIGINT) or SIGTERM"  # the banner's last line: serving has started


@dataclass
class ServeOptions:
    """What to serve, and how: ``server`` is the one configuration both runtimes give tritonserver."""

    engines: Path | None = None
    repository: Path | None = None
    server: ServerConfig = field(default_factory=ServerConfig)
    threads: int | None = None
    runtime: str = RUNTIMES[0]
    tensorstore: bool = False
    log_file: Path | None = None
    verbose: bool = False


def listening_addresses(ports: list[int]) -> dict[int, list[str]]:
    """The addresses this machine listens on for each of ``ports`` (from /proc/net/tcp and tcp6)."""
    found: dict[int, list[str]] = {port: [] for port in ports}
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            address, port = local.split(":")
            if state == "0A" and int(port, 16) in found:
                found[int(port, 16)].append(_address(address, width))
    return found


def _address(hexed: str, width: int) -> str:
    """The kernel's hex of an address (32-bit words in host order) as text; IPv4 mapped into IPv6 as IPv4."""
    raw = b"".join(bytes.fromhex(hexed[i:i + 8])[::-1] for i in range(0, width, 8))
    if width == 8:
        return str(ipaddress.IPv4Address(raw))
    address = ipaddress.IPv6Address(raw)
    return str(address.ipv4_mapped) if address.ipv4_mapped else f"[{address}]"


def banner(options: ServeOptions, models: list[str], log: Path | None) -> str:
    e = options.server.endpoints
    bound = listening_addresses(list(e.ports().values()))
    lines = [f"ume-edge serving {options.repository or options.engines} ({options.runtime})"]
    for kind, port in e.ports().items():
        addresses = bound[port] or [e.host]
        where = ", ".join(f"{address}:{port}" for address in addresses)
        scheme = {"HTTP": "http://", "metrics": "http://"}.get(kind, "")
        suffix = "/metrics" if kind == "metrics" else (" (TLS)" if kind == "gRPC" and options.server.tls else "")
        wildcard = " (every interface)" if set(addresses) & {"0.0.0.0", "[::]"} else ""
        lines.append(f"  {kind:<8} {scheme}{where}{suffix}{wildcard}")
    if e.grpc_only:
        lines.append("  HTTP and metrics closed: they have no TLS")
    lines += [f"  models   {', '.join(models)}", f"  log      {log if log else 'above (--verbose)'}", READY_LINE]
    return "\n".join(lines)


def serve(options: ServeOptions, stop: threading.Event | None = None) -> int:
    """Run until ``stop`` is set (SIGINT/SIGTERM in ``main``) or the server dies; 0 on a clean stop."""
    from ume_edge.serving import python_backend, pytriton

    stop = stop or threading.Event()
    remove_stale_temp()
    options.server.endpoints.check_free()
    warning = network_warning(options)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    watchdog = Watchdog()
    try:
        run = {"python-backend": python_backend.serve, "pytriton": pytriton.serve}[options.runtime]
        code = run(options, stop, watchdog,
                   lambda models, log: print(banner(options, models, log), flush=True))
    finally:
        watchdog.release()
    if code == 0:
        print("ume-edge serve: stopped", flush=True)
    return code


# ---------------------------------------------------------------------------------------------------------------
# as a child process (tests, benchmarks) and the command line


class ServeProcess(ServerProcess):
    """``python -m ume_edge.serve`` as a child process, ready once it prints its banner (for tests and benchmarks).

    >>> with ServeProcess("engines/reference-int8-onnxruntime", Endpoints(grpc_port=8001)) as server:
    ...     server.grpc_url
    """

    name = "ume-edge-serve"

    def __init__(self, engines: str | os.PathLike | None, endpoints: Endpoints | None = None, *,
                 runtime: str = RUNTIMES[0], max_queue_delay_us: int = DEFAULT_MAX_QUEUE_DELAY_US,
                 extra_args: list[str] | None = None, env: dict[str, str] | None = None, keep_log: bool = False):
        super().__init__(endpoints, keep_log=keep_log)
        self.engines, self.runtime = engines, runtime
        self.max_queue_delay_us = max_queue_delay_us
        self.extra_args = list(extra_args or [])
        self.env = env

    def command(self) -> list[str]:
        e = self.endpoints
        source = ["--engines", str(self.engines)] if self.engines is not None else []
        return [sys.executable, "-m", "ume_edge.serve", *source, "--runtime", self.runtime, "--host", e.host,
                "--grpc-port", str(e.grpc_port), "--http-port", str(e.http_port), "--metrics-port",
                str(e.metrics_port), "--max-queue-delay-us", str(self.max_queue_delay_us), *self.extra_args]

    def environment(self) -> dict[str, str]:
        return {**os.environ, **(self.env or {})}

    def ready_lines(self) -> list[str]:
        return [READY_LINE]

    def stop(self, signum: int = signal.SIGTERM, timeout_s: float = 60.0) -> int | None:
        return super().stop(signum, timeout_s)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m ume_edge.serve", formatter_class=DefaultsFormatter,
        description="Serve an engine directory over Triton's gRPC/HTTP API: model 'ume' (one optional input per "
                    "modality and an optional 'present' mask; outputs logits, probs, label) and one "
                    "'ume_<modality>' model per encoder, with dynamic batching. Or serve a Triton model repository "
                    "written by python -m ume_edge.triton_repo.")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--engines", type=Path, help="engine directory (default: the reference INT8 build, built "
                                                     "first if missing)")
    source.add_argument("--repository", type=Path, help="a Triton model repository written by "
                                                        "python -m ume_edge.triton_repo (python-backend runtime; "
                                                        "default: serve --engines)")
    parser.add_argument("--host", default=DEFAULT_HOST,
                        help="address to listen on; 0.0.0.0 for sensors on the network (use --grpc-server-cert then: "
                             "without TLS anyone on the network can send requests)")
    parser.add_argument("--grpc-port", type=int, default=DEFAULT_GRPC_PORT, help="gRPC port")
    parser.add_argument("--http-port", type=int, default=DEFAULT_HTTP_PORT, help="HTTP port")
    parser.add_argument("--metrics-port", type=int, default=DEFAULT_METRICS_PORT, help="Prometheus metrics port")
    parser.add_argument("--grpc-server-cert", type=Path,
                        help="PEM certificate: serve gRPC over TLS, and close HTTP and metrics, which have no TLS "
                             "(python-backend runtime; default: no TLS)")
    parser.add_argument("--grpc-server-key", type=Path, help="PEM key of --grpc-server-cert (default: none)")
    parser.add_argument("--grpc-root-cert", type=Path, help="PEM root certificate: require client certificates "
                                                            "signed by it (mutual TLS; default: not required)")
    parser.add_argument("--max-queue-delay-us", type=int, default=DEFAULT_MAX_QUEUE_DELAY_US,
                        help="how long the dynamic batcher may hold a request to grow a batch, in microseconds "
                             "(requests queued meanwhile are batched anyway)")
    parser.add_argument("--runtime", choices=RUNTIMES, default=RUNTIMES[0],
                        help="python-backend: Python-backend models inside Triton, per-request errors and presence "
                             "metrics; pytriton: PyTriton callables in this process")
    parser.add_argument("--threads", type=thread_count, help=f"ONNX Runtime threads, 1 to {os.cpu_count()} "
                                                               "(default: all cores)")
    parser.add_argument("--tensorstore", action="store_true",
                        help="pytriton runtime: pass tensors through PyTriton's shared-memory store (faster for "
                             "large tensors, slower for sensor-sized ones)")
    parser.add_argument("--log-file", type=Path, help="keep the server's log here (default: a temporary file, "
                                                      "removed when serving stops)")
    parser.add_argument("--verbose", action="store_true", help="show the server's own output (on a CPU-only machine "
                                                                 "it reports missing CUDA, NVML and DCGM: harmless)")
    return parser.parse_args(argv)


def thread_count(text: str) -> int:
    """``--threads``: a whole number from 1 to this machine's core count."""
    cores = os.cpu_count() or 1
    if not text.strip().isdigit() or not 1 <= int(text) <= cores:
        raise argparse.ArgumentTypeError(f"expected a whole number from 1 to {cores} (the cores here), not {text!r}")
    return int(text)


def _tls(args: argparse.Namespace) -> GrpcTls | None:
    if args.grpc_server_cert is None and args.grpc_server_key is None:
        if args.grpc_root_cert is not None:
            raise UmeEdgeError("--grpc-root-cert needs --grpc-server-cert and --grpc-server-key")
        return None
    if args.grpc_server_cert is None or args.grpc_server_key is None:
        raise UmeEdgeError("TLS needs both --grpc-server-cert and --grpc-server-key")
    for path in filter(None, (args.grpc_server_cert, args.grpc_server_key, args.grpc_root_cert)):
        if not path.is_file():
            raise UmeEdgeError(f"{path}: no such file")
    if args.runtime == "pytriton":
        raise UmeEdgeError("TLS needs --runtime python-backend: PyTriton drives its tritonserver over HTTP, which "
                           "has no TLS and would stay open beside gRPC")
    return GrpcTls(args.grpc_server_cert, args.grpc_server_key, args.grpc_root_cert)


def check_log_file(path: Path) -> None:
    """One line, before anything starts, if ``--log-file`` cannot be written."""
    if path.is_dir():
        raise UmeEdgeError(f"--log-file {path} is a directory; give a file path")
    if not path.parent.is_dir():
        raise UmeEdgeError(f"--log-file {path}: the folder {path.parent} does not exist; create it first")
    if not os.access(path if path.exists() else path.parent, os.W_OK):
        raise UmeEdgeError(f"--log-file {path} is not writable here; give a path in a folder you can write")


def network_warning(options: ServeOptions) -> str | None:
    """A warning when the server is reachable from other machines without TLS."""
    host = options.server.endpoints.host
    if options.server.tls is not None or _is_loopback(host):
        return None
    return (f"warning: listening on {host} without TLS: anyone who can reach this machine can send "
            "requests. Add --grpc-server-cert FILE --grpc-server-key FILE (and --grpc-root-cert FILE to accept only "
            "clients with a certificate), or keep the default --host 127.0.0.1")


def _is_loopback(host: str) -> bool:
    try:
        addresses = {str(info[4][0]) for info in socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)}
    except (socket.gaierror, UnicodeError):
        return True  # not an address at all: check_free refuses it in one line
    return all(ipaddress.ip_address(address.split("%")[0]).is_loopback for address in addresses)


def _options(args: argparse.Namespace) -> ServeOptions:
    tls = _tls(args)
    if args.log_file is not None:
        check_log_file(args.log_file)
    server = ServerConfig(Endpoints(args.host, args.grpc_port, args.http_port, args.metrics_port), tls=tls,
                          max_queue_delay_us=args.max_queue_delay_us, log_verbose=1 if args.verbose else 0)
    options = ServeOptions(repository=args.repository, server=server, runtime=args.runtime, threads=args.threads,
                           tensorstore=args.tensorstore, log_file=args.log_file, verbose=args.verbose)
    if args.repository is not None:
        if args.runtime != "python-backend":
            raise UmeEdgeError("--repository is served by the python-backend runtime; drop --runtime pytriton")
        return options
    if args.engines is None:
        from ume_edge.build import ensure_default_engines

        args.engines = ensure_default_engines()
    Pipeline.load(args.engines, threads=1).close()  # a bad or unfit directory is one line here, not a failure in Triton
    options.engines = args.engines
    return options


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    show_progress(args.verbose)
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    try:
        return serve(_options(args), stop)
    except UmeEdgeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
