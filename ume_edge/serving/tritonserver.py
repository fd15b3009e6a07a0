"""Launch the ``tritonserver`` that the nvidia-pytriton wheel ships, standalone or under PyTriton, as a child process.

The wheel carries a real Triton Inference Server with only the Python backend. Using it outside PyTriton needs
three things PyTriton normally arranges (docs/development.md, facts the code relies on):

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
import filecmp
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from importlib.util import find_spec
from pathlib import Path
from typing import IO

from ume_edge.errors import BackendUnavailable
from ume_edge.serving.server_config import Endpoints, ServerConfig, TritonServerError
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

    def __init__(self, endpoints: Endpoints | None = None, *, keep_log: bool = False, log_path: Path | None = None,
                 echo: bool = False):
        self.endpoints = endpoints or Endpoints()
        self.keep_log = keep_log or log_path is not None  # otherwise the log is deleted after a clean stop
        self.log_path, self.echo = log_path, echo  # echo: the server's output also goes to this process's stderr
        self.process: subprocess.Popen | None = None
        self._log_file: IO[bytes] | None = None

    @property
    def child(self) -> subprocess.Popen:
        """The child process, once ``start()`` has started it."""
        if self.process is None:
            raise RuntimeError(f"{self.name} has not been started; start() it first")
        return self.process

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
            log_file: IO[bytes] = tempfile.NamedTemporaryFile(prefix=f"{self.name}-", suffix=".log", delete=False)
            self.log_path = Path(log_file.name)
        else:
            log_file = open(self.log_path, "wb")
        self._log_file = log_file
        process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE if self.echo else log_file,
                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        self.process = process
        if self.echo:
            threading.Thread(target=_copy_lines, args=(process.stdout, log_file), daemon=True).start()
        try:
            self._wait_ready(process, timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self, process: subprocess.Popen, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise TritonServerError(f"{self.name} exited with code {process.returncode} while starting "
                                        f"(log {self.log_path}):\n{self.log_tail()}")
            if self.is_ready():
                return
            time.sleep(0.2)
        raise TritonServerError(f"{self.name} was not ready after {timeout_s:.0f} s (log {self.log_path}):\n"
                                f"{self.log_tail()}")

    def is_ready(self) -> bool:
        lines = self.log().splitlines()
        running = self.process is not None and self.process.poll() is None
        return running and all(any(text in line for line in lines) for text in self.ready_lines())

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
            if self.process.returncode == 0 and not self.keep_log and self.log_path is not None:
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


class TritonServer(ServerProcess):
    """The wheel's tritonserver, standalone, serving one model repository as ``config`` says (given only
    ``Endpoints``, the rest of the configuration is the default).

    >>> with TritonServer("triton_models", Endpoints(grpc_port=8001)) as server:
    ...     server.grpc_url   # '127.0.0.1:8001'
    """

    name = "tritonserver"

    def __init__(self, model_repository: str | os.PathLike, config: ServerConfig | Endpoints | None = None, *,
                 extra_args: list[str] | None = None, cache_dir: str | os.PathLike | None = None,
                 keep_log: bool = False, log_path: Path | None = None, echo: bool = False):
        # A new ServerConfig per server: each gets an id and an admin key of its own.
        self.config = config if isinstance(config, ServerConfig) else ServerConfig(config or Endpoints())
        super().__init__(self.config.endpoints, keep_log=keep_log, log_path=log_path, echo=echo)
        self.model_repository = Path(model_repository).resolve()
        self.extra_args = list(extra_args or [])
        self.cache_dir = cache_dir
        self._distribution: TritonDistribution | None = None

    def start(self, timeout_s: float = 120.0) -> TritonServer:
        if not self.model_repository.is_dir():
            raise FileNotFoundError(f"model repository {self.model_repository} does not exist; "
                                    "write one with: python -m ume_edge.triton_repo --engines DIR --out DIR")
        self._distribution = find_distribution()
        super().start(timeout_s)
        return self

    def command(self) -> list[str]:
        distribution = self._distribution or find_distribution()
        return [str(distribution.binary), f"--model-repository={self.model_repository}",
                f"--backend-directory={prepare_backend_directory(self.cache_dir, distribution)}",
                *self.config.tritonserver_args(), *self.extra_args]

    def ready_lines(self) -> list[str]:
        """Triton starts its endpoints only once every model has loaded (``--exit-on-error``: or it exits)."""
        services = {"gRPC": "GRPCInferenceService", "HTTP": "HTTPService", "metrics": "Metrics Service"}
        return [f'Started {services[kind]} at {self.endpoints.host}:{port}"'
                for kind, port in self.endpoints.ports().items()]

    def environment(self) -> dict[str, str]:
        return triton_environment(distribution=self._distribution or find_distribution())

    def stop(self, signum: int = signal.SIGINT, timeout_s: float | None = None) -> int | None:
        return super().stop(signum, timeout_s if timeout_s is not None else self.config.exit_timeout_s + 25)
