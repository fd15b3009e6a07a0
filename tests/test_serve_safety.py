"""``python -m ume_edge.serve`` on a robot: loopback by default, TLS when on a network, nothing left behind when it is
killed, one line for a port in use or a bad directory, and ``--repository`` serving what ``triton_repo`` wrote."""

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from ume_edge.client import grpc_inputs
from ume_edge.runtime import Pipeline
from ume_edge.serve import RUNTIMES, ServeProcess, listening_addresses
from ume_edge.serving.server_config import Endpoints, free_ports
from ume_edge.serving.tritonserver import TEMP_PREFIX
from ume_edge.serving.watchdog import descendants, start_time

grpcclient = pytest.importorskip("tritonclient.grpc")
pytest.importorskip("pytriton")  # ships the tritonserver binary
pytestmark = [pytest.mark.triton, pytest.mark.slow]
ATOL = 1e-5


def _serve_cli(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "ume_edge.serve", *args], capture_output=True, text=True,
                          timeout=timeout)


def _one_error_line(result):
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    return errors[0]


def _our_temp_folders(pid: int) -> list[Path]:
    return [p for p in Path(tempfile.gettempdir()).glob(f"{TEMP_PREFIX}*-{pid}-*")]


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_kill_9_leaves_no_process_and_no_temporary_files(int8_engines, runtime):
    server = ServeProcess(int8_engines, Endpoints("127.0.0.1", *free_ports(3)), runtime=runtime, keep_log=True)
    server.start(timeout_s=180)
    pid = server.process.pid
    tree = {child: start_time(child) for child in descendants(pid)}
    assert len(tree) >= 3, "expected tritonserver, its stubs and the watchdog under serve"
    assert _our_temp_folders(pid)
    os.kill(pid, signal.SIGKILL)
    server.process.wait()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(start_time(c) == s for c, s in tree.items()):
        time.sleep(0.1)
    survivors = [c for c, s in tree.items() if start_time(c) == s]
    assert survivors == [], f"still alive 5 s after kill -9: {survivors}"
    assert _our_temp_folders(pid) == []
    startup = server.log()
    for noise in ("CUDA", "NVML", "DCGM"):
        assert noise not in startup, f"{noise} noise in the default output:\n{startup}"
    server.endpoints.check_free()  # the ports are free again
    server.log_path.unlink()


def test_a_port_in_use_is_one_line_naming_it_before_triton_starts(int8_engines):
    grpc_port, http_port, metrics_port = free_ports(3)
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", grpc_port))
        holder.listen()
        started = time.monotonic()
        result = _serve_cli("--engines", str(int8_engines), "--grpc-port", str(grpc_port), "--http-port",
                            str(http_port), "--metrics-port", str(metrics_port))
    line = _one_error_line(result)
    assert f"port {grpc_port} (gRPC) on 127.0.0.1 is in use" in line and "--grpc-port" in line
    assert time.monotonic() - started < 30
    assert "ume-edge serving" not in result.stdout


@pytest.mark.parametrize("problem, make", [
    ("no manifest", lambda path: path.mkdir()),
    ("a file", lambda path: path.write_text("x")),
])
def test_a_bad_engine_directory_is_one_line(tmp_path, problem, make):
    target = tmp_path / "engines"
    make(target)
    line = _one_error_line(_serve_cli("--engines", str(target)))
    assert str(target) in line


def test_default_listens_on_loopback_only(int8_engines):
    endpoints = Endpoints("127.0.0.1", *free_ports(3))
    with ServeProcess(int8_engines, endpoints) as server:
        bound = listening_addresses(list(endpoints.ports().values()))
        banner = server.log()
    for port in endpoints.ports().values():
        assert bound[port] and set(bound[port]) <= {"127.0.0.1"}, bound
    assert f"gRPC     127.0.0.1:{endpoints.grpc_port}" in banner


@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    """A self-signed certificate for 127.0.0.1, made with the openssl command line."""
    folder = tmp_path_factory.mktemp("tls")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost", "-keyout", str(folder / "key.pem"),
                    "-out", str(folder / "cert.pem")], check=True, capture_output=True)
    return folder / "cert.pem", folder / "key.pem"


def test_grpc_over_tls_on_every_interface(int8_engines, certificate, avdigits_test):
    cert, key = certificate
    endpoints = Endpoints("0.0.0.0", *free_ports(3))
    server = ServeProcess(int8_engines, endpoints, extra_args=["--grpc-server-cert", str(cert),
                                                               "--grpc-server-key", str(key)])
    image = avdigits_test[0]["image"][:2]
    with server:
        banner = server.log()
        assert f":{endpoints.grpc_port} (TLS) (every interface)" in banner
        assert "HTTP and metrics closed: they have no TLS" in banner and "warning:" not in banner
        with grpcclient.InferenceServerClient(f"127.0.0.1:{endpoints.grpc_port}", ssl=True,
                                              root_certificates=str(cert)) as secure:
            labels = secure.infer("ume", grpc_inputs({"image": image})).as_numpy("label")
        with grpcclient.InferenceServerClient(f"127.0.0.1:{endpoints.grpc_port}") as plain:
            with pytest.raises(grpcclient.InferenceServerException):
                plain.infer("ume", grpc_inputs({"image": image}), client_timeout=5)
    with Pipeline.load(int8_engines) as pipeline:
        np.testing.assert_array_equal(labels.reshape(-1), pipeline.infer({"image": image}).labels)


def _stale_folder() -> Path:
    """A temporary folder made by a serving process that has since died (made by the real code, in a child)."""
    code = "from ume_edge.serving.tritonserver import make_temp_folder; print(make_temp_folder('models'))"
    return Path(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip())


def test_serve_repository_serves_what_triton_repo_wrote(int8_engines, tmp_path, avdigits_test):
    repository = tmp_path / "triton_models"
    written = subprocess.run([sys.executable, "-m", "ume_edge.triton_repo", "--engines", str(int8_engines),
                              "--out", str(repository)], capture_output=True, text=True, timeout=120)
    assert written.returncode == 0, written.stderr
    hint = written.stderr.strip().splitlines()[-1]
    assert hint.startswith("serve with: python -m ume_edge.serve --repository")
    stale = _stale_folder()
    endpoints = Endpoints("127.0.0.1", *free_ports(3))
    arguments = hint.split("serve with: python -m ume_edge.serve ", 1)[1].split("   (")[0].split()
    server = ServeProcess(None, endpoints, extra_args=arguments)
    inputs = {name: array[:3] for name, array in avdigits_test[0].items()}
    with server, grpcclient.InferenceServerClient(endpoints.grpc_url) as client:
        assert not stale.exists(), "the folder of a killed server was not removed at the next start"
        answers = {pattern: client.infer("ume", grpc_inputs({n: inputs[n] for n in pattern})).as_numpy("logits")
                   for pattern in (("audio",), ("image",), ("audio", "image"))}
    with Pipeline.load(int8_engines) as pipeline:
        for pattern, logits in answers.items():
            np.testing.assert_allclose(logits, pipeline.infer({n: inputs[n] for n in pattern}).logits, atol=ATOL)


def test_serve_repository_refuses_tensorrt_models_in_one_line(tmp_path):
    from ume_edge.build import BuildOptions, build
    from ume_edge.serving.repository import write_repository

    exported = build(BuildOptions(backend="tensorrt", export_only=True, precision="fp32", out=tmp_path / "trt"))
    write_repository(exported, tmp_path / "repo")
    line = _one_error_line(_serve_cli("--repository", str(tmp_path / "repo")))
    assert "TensorRT model" in line and "tritonserver --model-repository=" in line
