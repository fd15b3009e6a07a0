"""Run the ``tritonserver`` that the nvidia-pytriton wheel ships, standalone or under PyTriton.

The wheel carries a real Triton Inference Server with only the Python backend. Using it outside PyTriton needs
three things PyTriton normally arranges (see shared FACTS):

* a backend directory ``python/`` holding the wheel's ``libtriton_python.so`` and ``triton_python_backend_utils.py``
  *and* the Python-backend stub built for the running interpreter;
* ``LD_LIBRARY_PATH`` with this interpreter's libpython directory first (otherwise the stub picks up the system
  ``libpython3.X.so`` and models fail with ``'_thread.RLock' object has no attribute '_recursion_count'``), then the
  wheel's ``nvidia_pytriton.libs/`` (``libcudart``);
* ``PATH`` with this environment's ``bin/`` first, so the stub's embedded Python finds the installed packages.

Nothing here imports pytriton itself; the wheel is located with ``importlib.util.find_spec``.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import errno
import filecmp
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from importlib.util import find_spec
from pathlib import Path

from ume_edge.constants import DEFAULT_GRPC_PORT, DEFAULT_HOST, DEFAULT_HTTP_PORT, DEFAULT_METRICS_PORT
from ume_edge.errors import BackendUnavailable
from ume_edge.serving.watchdog import start_time

DEFAULT_CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ume-edge" / "triton-backends"
_INSTALL_HINT = "install it with: pip install 'ume-edge[serve]'  (nvidia-pytriton ships the tritonserver binary)"


@dataclasses.dataclass(frozen=True)
class TritonDistribution:
    """Where the pieces of the wheel's Triton live."""

    root: Path  # .../site-packages/pytriton/tritonserver
    libs_dir: Path  # .../site-packages/nvidia_pytriton.libs

    @property
    def binary(self) -> Path:
        return self.root / "bin" / "tritonserver"

    @property
    def python_backend(self) -> Path:
        return self.root / "backends" / "python"

    def stub(self, python_version: str | None = None) -> Path:
        version = python_version or f"{sys.version_info.major}.{sys.version_info.minor}"
        return self.root / "python_backend_stubs" / version / "triton_python_backend_stub"


def find_distribution() -> TritonDistribution:
    """Locate the tritonserver inside the installed nvidia-pytriton wheel, or say how to get it."""
    spec = find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise BackendUnavailable(f"nvidia-pytriton is not installed; {_INSTALL_HINT}")
    package_dir = Path(next(iter(spec.submodule_search_locations)))
    distribution = TritonDistribution(root=package_dir / "tritonserver",
                                      libs_dir=package_dir.parent / "nvidia_pytriton.libs")
    missing = [p for p in (distribution.binary, distribution.python_backend, distribution.stub()) if not p.exists()]
    if missing:
        raise BackendUnavailable(
            f"the nvidia-pytriton wheel at {package_dir} lacks {', '.join(map(str, missing))} "
            f"(no stub for Python {sys.version_info.major}.{sys.version_info.minor}?); reinstall it, or use a Python "
            "it has a stub for"
        )
    return distribution


def prepare_backend_directory(cache_dir: str | os.PathLike | None = None,
                              distribution: TritonDistribution | None = None) -> Path:
    """A ``--backend-directory`` whose ``python/`` holds the wheel's backend plus this interpreter's stub.

    Files are copied once into the cache and refreshed when the wheel's copies differ.
    """
    distribution = distribution or find_distribution()
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    backends_dir = Path(cache_dir or DEFAULT_CACHE_DIR) / f"py{version}"
    python_dir = backends_dir / "python"
    python_dir.mkdir(parents=True, exist_ok=True)
    sources = [p for p in distribution.python_backend.iterdir() if p.is_file()] + [distribution.stub(version)]
    for source in sources:
        _copy_if_changed(source, python_dir / source.name)
    return backends_dir


def _copy_if_changed(source: Path, target: Path) -> None:
    if target.exists() and filecmp.cmp(source, target, shallow=False):
        return
    partial = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    shutil.copy2(source, partial)
    os.replace(partial, target)  # atomic, so concurrent starts never see half a stub


def libpython_dir() -> str:
    """The directory holding this interpreter's ``libpython3.X.so`` (pyenv's, not the system one)."""
    return sysconfig.get_config_var("LIBDIR") or str(Path(sys.base_prefix) / "lib")


def _prepend_paths(existing: str | None, *first: str) -> str:
    parts = [p for p in first if p]
    parts += [p for p in (existing or "").split(os.pathsep) if p and p not in parts]
    return os.pathsep.join(parts)


def triton_environment(base: dict | None = None, distribution: TritonDistribution | None = None) -> dict[str, str]:
    """Environment for a tritonserver process whose Python-backend stub must run this interpreter's packages."""
    env = dict(os.environ if base is None else base)
    libs = [libpython_dir()]
    if distribution is not None:
        libs.append(str(distribution.libs_dir))
    env["LD_LIBRARY_PATH"] = _prepend_paths(env.get("LD_LIBRARY_PATH"), *libs)
    env["PATH"] = _prepend_paths(env.get("PATH"), str(Path(sys.executable).parent))
    return env


def apply_pytriton_libpython_fix() -> None:
    """Make PyTriton's tritonserver child load this interpreter's libpython.

    PyTriton starts tritonserver with a copy of ``os.environ`` (appending its own libs folder), and the Python
    backend stub is a grandchild that inherits it; the current process never reloads libpython, so setting the
    variables here, before ``Triton.run()``, is enough - no re-exec is needed.
    """
    fixed = triton_environment()
    os.environ["LD_LIBRARY_PATH"] = fixed["LD_LIBRARY_PATH"]
    os.environ["PATH"] = fixed["PATH"]


TEMP_PREFIX = "ume-edge-serve-"
# Admin APIs nobody serving sensors needs; closed unless the request carries this header (with a random value).
RESTRICTED_ADMIN_APIS = "model-repository,shared-memory,trace,logging"
ADMIN_HEADER = "ume-edge-admin"


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` distinct TCP ports free on ``host`` right now."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) for _ in range(count)]
        for sock in sockets:
            sock.bind((host, 0))
        return [sock.getsockname()[1] for sock in sockets]


class TritonServerError(BackendUnavailable):
    """A server did not start, or did not become ready; the message says why (with the end of its log)."""


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
        return family, sockaddr[0]

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

    def args(self) -> list[str]:
        mode = "--grpc-use-ssl-mutual=true" if self.root_cert else "--grpc-use-ssl=true"
        args = [mode, f"--grpc-server-cert={self.server_cert}", f"--grpc-server-key={self.server_key}"]
        return args + ([f"--grpc-root-cert={self.root_cert}"] if self.root_cert else [])


def make_temp_folder(kind: str) -> Path:
    """A fresh folder for this process's generated files, named so that ``remove_stale_temp`` can find it."""
    return Path(tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{kind}-{os.getpid()}-"))


def remove_stale_temp() -> list[Path]:
    """Remove what servers that were killed left in the temporary folder; returns what was removed."""
    removed = []
    for folder in Path(tempfile.gettempdir()).glob(f"{TEMP_PREFIX}*-*-*"):
        pid = folder.name[len(TEMP_PREFIX):].split("-")[1]
        if folder.is_dir() and pid.isdigit() and start_time(int(pid)) is None:
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


class ServerProcess(abc.ABC):
    """A child process serving Triton's endpoints: start, wait until ready, log, stop.

    Readiness is read in this very child's own log (with the child still running), so an older server still
    holding a port is never mistaken for it, and a server whose HTTP port is closed (TLS) is still seen ready.
    Subclasses give ``command()``, ``ready_lines()`` and, optionally, ``environment()``.
    """

    name = "server"

    def __init__(self, endpoints: Endpoints = Endpoints(), *, keep_log: bool = False, log_path: Path | None = None,
                 echo: bool = False):
        self.endpoints = endpoints
        self.keep_log = keep_log or log_path is not None  # otherwise the log is deleted after a clean stop
        self.log_path, self.echo = log_path, echo  # echo: the server's output also goes to this process's stderr
        self.server_id = f"ume-edge-{os.getpid()}-{secrets.token_hex(4)}"
        self.process: subprocess.Popen | None = None
        self._log_file = None

    grpc_url = property(lambda self: self.endpoints.grpc_url)
    http_url = property(lambda self: self.endpoints.http_url)
    metrics_url = property(lambda self: self.endpoints.metrics_url)

    @abc.abstractmethod
    def command(self) -> list[str]:
        """The command line that starts the server."""

    @abc.abstractmethod
    def ready_lines(self) -> list[str]:
        """Lines the server prints once it is ready: each of these texts on a line of its log."""

    def environment(self) -> dict[str, str]:
        return dict(os.environ)

    def start(self, timeout_s: float = 120.0):
        """Start the process and return once it is ready; raise with the end of its log if it is not."""
        if self.process is not None and self.process.poll() is None:
            raise RuntimeError(f"{self.name} already running (pid {self.process.pid}); stop() it first")
        self.endpoints.check_free()
        command, env = self.command(), self.environment()
        if self.log_path is None:
            self._log_file = tempfile.NamedTemporaryFile(prefix=f"{self.name}-", suffix=".log", delete=False)
            self.log_path = Path(self._log_file.name)
        else:
            self._log_file = open(self.log_path, "wb")
        self.process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE if self.echo else self._log_file,
                                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        if self.echo:
            threading.Thread(target=_copy_lines, args=(self.process.stdout, self._log_file), daemon=True).start()
        try:
            self.wait_ready(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise TritonServerError(f"{self.name} exited with code {self.process.returncode} while starting "
                                        f"(log {self.log_path}):\n{self.log_tail()}")
            if self.is_ready():
                return
            time.sleep(0.2)
        raise TritonServerError(f"{self.name} was not ready after {timeout_s:.0f} s (log {self.log_path}):\n"
                                f"{self.log_tail()}")

    def is_ready(self) -> bool:
        lines = self.log().splitlines()
        return self.process.poll() is None and all(any(text in line for line in lines) for text in self.ready_lines())

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path and self.log_path.exists() else ""

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def stop(self, signum: int = signal.SIGINT, timeout_s: float = 30.0) -> int | None:
        """Send ``signum`` (graceful), SIGKILL the process group if it hangs; returns the exit code."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signum)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        if self._log_file is not None:
            if not self.echo:  # with echo, the copying thread closes it at the end of the output
                self._log_file.close()
            if self.process.returncode == 0 and not self.keep_log:
                self.log_path.unlink(missing_ok=True)
        return self.process.returncode

    def __enter__(self):
        return self.start() if self.process is None else self

    def __exit__(self, *_exc) -> None:
        self.stop()


def _copy_lines(output, log_file) -> None:
    """Copy a child's output into its log file and onto this process's stderr, line by line, until it ends."""
    with output, log_file:
        for line in output:
            log_file.write(line)
            log_file.flush()
            sys.stderr.write(line.decode(errors="replace"))
            sys.stderr.flush()


# A refused 400 MB request left tritonserver 0.5 GB larger, request after request: its gRPC front keeps request
# objects, and the buffers they grew, for reuse. Without the pool it returns to about 0.3 GB (measured here).
NO_GRPC_REQUEST_POOL = 0


class TritonServer(ServerProcess):
    """The wheel's tritonserver, standalone, serving one model repository. With ``tls`` it serves gRPC alone:
    Triton's HTTP and metrics endpoints have no TLS, so they stay closed.

    >>> with TritonServer("triton_models", Endpoints(grpc_port=8001, http_port=8000, metrics_port=8002)) as server:
    ...     server.grpc_url   # '127.0.0.1:8001'
    """

    name = "tritonserver"

    def __init__(self, model_repository: str | os.PathLike, endpoints: Endpoints = Endpoints(), *,
                 tls: GrpcTls | None = None, log_verbose: int = 0, exit_timeout_s: int = 5,
                 extra_args: list[str] | None = None, cache_dir: str | os.PathLike | None = None,
                 keep_log: bool = False, log_path: Path | None = None, echo: bool = False):
        if tls is not None:
            endpoints = dataclasses.replace(endpoints, grpc_only=True)
        super().__init__(endpoints, keep_log=keep_log, log_path=log_path, echo=echo)
        self.model_repository = Path(model_repository).resolve()
        self.tls, self.log_verbose, self.exit_timeout_s = tls, log_verbose, exit_timeout_s
        self.extra_args = list(extra_args or [])
        self.cache_dir = cache_dir
        self.admin_key = secrets.token_urlsafe(16)
        self._distribution: TritonDistribution | None = None

    def start(self, timeout_s: float = 120.0) -> "TritonServer":
        if not self.model_repository.is_dir():
            raise FileNotFoundError(f"model repository {self.model_repository} does not exist; "
                                    "write one with: python -m ume_edge.triton_repo --engines DIR --out DIR")
        self._distribution = find_distribution()
        return super().start(timeout_s)

    def command(self) -> list[str]:
        distribution = self._distribution or find_distribution()
        e, restricted = self.endpoints, f"{RESTRICTED_ADMIN_APIS}:{ADMIN_HEADER}={self.admin_key}"
        http = str(not e.grpc_only).lower()
        return [
            str(distribution.binary), f"--id={self.server_id}",
            f"--model-repository={self.model_repository}",
            f"--backend-directory={prepare_backend_directory(self.cache_dir, distribution)}",
            f"--grpc-address={e.host}", f"--http-address={e.host}", f"--metrics-address={e.host}",
            f"--grpc-port={e.grpc_port}", f"--http-port={e.http_port}", f"--metrics-port={e.metrics_port}",
            "--allow-grpc=true", f"--allow-http={http}", f"--allow-metrics={http}", "--allow-gpu-metrics=false",
            f"--http-restricted-api={restricted}", f"--grpc-restricted-protocol={restricted}",
            f"--grpc-infer-allocation-pool-size={NO_GRPC_REQUEST_POOL}",
            "--exit-on-error=true", "--strict-readiness=true", f"--exit-timeout-secs={self.exit_timeout_s}",
            f"--log-verbose={self.log_verbose}",
            *(self.tls.args() if self.tls else []),
            *self.extra_args,
        ]

    def ready_lines(self) -> list[str]:
        """Triton starts its endpoints only once every model has loaded (``--exit-on-error``: or it exits)."""
        services = {"gRPC": "GRPCInferenceService", "HTTP": "HTTPService", "metrics": "Metrics Service"}
        return [f'Started {services[kind]} at {self.endpoints.host}:{port}"'
                for kind, port in self.endpoints.ports().items()]

    def environment(self) -> dict[str, str]:
        return triton_environment(distribution=self._distribution or find_distribution())

    def stop(self, signum: int = signal.SIGINT, timeout_s: float | None = None) -> int | None:
        return super().stop(signum, timeout_s if timeout_s is not None else self.exit_timeout_s + 25)
