"""``python -m ume_edge.serve`` hardened (issue 21): TLS closes the ports it cannot cover, a network address without
TLS is warned about, a bad --host, --threads, --log-file or repository is one line, and oversized requests are
refused without leaving the server bloated."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ume_edge.client import grpc_inputs
from ume_edge.runtime import Pipeline
from ume_edge.serve import ServeProcess
from ume_edge.serving.server_config import Endpoints, free_ports
from ume_edge.serving.watchdog import descendants

grpcclient = pytest.importorskip("tritonclient.grpc")
InferenceServerException = pytest.importorskip("tritonclient.utils").InferenceServerException


def _serve_cli(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "ume_edge.serve", *args], capture_output=True, text=True,
                          timeout=timeout)


def _one_error_line(result) -> str:
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, result.stderr
    assert "ume-edge serving" not in result.stdout
    return errors[0]


def _free_port_args() -> list[str]:
    grpc_port, http_port, metrics_port = free_ports(3)
    return ["--grpc-port", str(grpc_port), "--http-port", str(http_port), "--metrics-port", str(metrics_port)]


def _openssl(*args):
    subprocess.run(["openssl", *args], check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A certificate authority, a server certificate for 127.0.0.1 and a client certificate, both signed by it."""
    folder = tmp_path_factory.mktemp("pki")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=ume-edge test CA",
             "-keyout", str(folder / "ca.key"), "-out", str(folder / "ca.pem"))
    extensions = {"server": "subjectAltName=IP:127.0.0.1,DNS:localhost", "client": "basicConstraints=CA:FALSE"}
    for name, extension in extensions.items():
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout",
                 str(folder / f"{name}.key"), "-out", str(folder / f"{name}.csr"))
        (folder / f"{name}.ext").write_text(extension + "\n")
        _openssl("x509", "-req", "-in", str(folder / f"{name}.csr"), "-CA", str(folder / "ca.pem"), "-CAkey",
                 str(folder / "ca.key"), "-CAcreateserial", "-days", "1", "-extfile", str(folder / f"{name}.ext"),
                 "-out", str(folder / f"{name}.pem"))
    return folder


def _tls_args(pki, mutual: bool) -> list[str]:
    args = ["--grpc-server-cert", str(pki / "server.pem"), "--grpc-server-key", str(pki / "server.key")]
    return args + (["--grpc-root-cert", str(pki / "ca.pem")] if mutual else [])


@pytest.mark.parametrize("threads", ["0", "1000000", "two"])
def test_threads_outside_the_cores_are_refused_at_parse_time(tmp_path, threads):
    result = _serve_cli("--engines", str(tmp_path / "never-read"), "--threads", threads, timeout=30)
    line = _one_error_line(result)
    assert "--threads" in line and f"from 1 to {os.cpu_count()}" in line


@pytest.mark.parametrize("host, says", [
    ("no.such.host.invalid", "--host no.such.host.invalid cannot be resolved"),
    ("192.0.2.1", "--host 192.0.2.1 is not an address of this machine"),  # TEST-NET-1: never an address here
])
def test_a_host_that_is_not_this_machine_is_one_line(int8_engines, host, says):
    line = _one_error_line(_serve_cli("--engines", str(int8_engines), "--host", host, *_free_port_args()))
    assert says in line and "in use" not in line


def _unwritable_log_paths(tmp_path) -> list[tuple[Path, str]]:
    readonly = tmp_path / "readonly"
    readonly.mkdir()
    readonly.chmod(0o500)
    cases = [(tmp_path, "is a directory"), (tmp_path / "missing" / "serve.log", "does not exist")]
    if os.geteuid() != 0:  # root writes into a read-only folder anyway
        cases.append((readonly / "serve.log", "is not writable"))
    return cases


def test_an_unwritable_log_file_is_one_line_before_anything_starts(int8_engines, tmp_path):
    for path, says in _unwritable_log_paths(tmp_path):
        line = _one_error_line(_serve_cli("--engines", str(int8_engines), "--log-file", str(path),
                                          *_free_port_args()))
        assert f"--log-file {path}" in line and says in line


@pytest.mark.parametrize("make_config, says", [
    (lambda path: path.write_bytes(b"name: \"ume\"\n\xff\xfe platform: \"onnxruntime_onnx\"\n"),
     "not a Triton model configuration"),
    (lambda path: path.mkdir(), "cannot be read"),
])
def test_a_repository_with_an_unreadable_config_is_one_line(tmp_path, make_config, says):
    model = tmp_path / "repository" / "ume"
    model.mkdir(parents=True)
    make_config(model / "config.pbtxt")
    line = _one_error_line(_serve_cli("--repository", str(tmp_path / "repository"), *_free_port_args()))
    assert str(model / "config.pbtxt") in line and says in line


def test_tls_with_the_pytriton_runtime_is_refused_in_one_line(int8_engines, pki):
    line = _one_error_line(_serve_cli("--engines", str(int8_engines), "--runtime", "pytriton",
                                      *_tls_args(pki, mutual=True), *_free_port_args()))
    assert "--runtime python-backend" in line and "HTTP" in line


def test_help_says_tls_closes_http_and_metrics():
    text = " ".join(_serve_cli("--help", timeout=30).stdout.split())
    assert "close HTTP and metrics, which have no TLS" in text
    assert "without TLS anyone on the network can send requests" in text


def _bad_repository(tmp_path) -> Path:
    """A repository that stops serve right after its start-up checks, so that what it says before is seen fast."""
    model = tmp_path / "repository" / "ume"
    model.mkdir(parents=True, exist_ok=True)
    (model / "config.pbtxt").write_bytes(b"\xff")
    return tmp_path / "repository"


@pytest.mark.parametrize("host, tls, warned", [
    ("0.0.0.0", False, True),
    ("127.0.0.1", False, False),
    ("0.0.0.0", True, False),
])
def test_a_network_address_without_tls_is_warned_about(tmp_path, pki, host, tls, warned):
    result = _serve_cli("--repository", str(_bad_repository(tmp_path)), "--host", host,
                        *(_tls_args(pki, mutual=False) if tls else []), *_free_port_args())
    _one_error_line(result)
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    if warned:
        assert len(warnings) == 1 and "anyone who can reach this machine" in warnings[0]
        assert "--grpc-server-cert" in warnings[0]
    else:
        assert warnings == []


def _refuses_connections(port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(5)
        return probe.connect_ex(("127.0.0.1", port)) != 0


@pytest.mark.slow
@pytest.mark.triton
def test_mutual_tls_serves_grpc_alone_and_only_to_clients_with_a_certificate(int8_engines, pki, avdigits_test):
    pytest.importorskip("pytriton")
    endpoints = Endpoints("127.0.0.1", *free_ports(3))
    image = avdigits_test[0]["image"][:2]
    with ServeProcess(int8_engines, endpoints, extra_args=_tls_args(pki, mutual=True)) as server:
        banner = server.log()
        assert _refuses_connections(endpoints.http_port), "HTTP inference answers without TLS"
        assert _refuses_connections(endpoints.metrics_port), "metrics answer without TLS"
        with grpcclient.InferenceServerClient(endpoints.grpc_url, ssl=True,
                                              root_certificates=str(pki / "ca.pem")) as no_certificate:
            with pytest.raises(InferenceServerException):
                no_certificate.infer("ume", grpc_inputs({"image": image}), client_timeout=5)
        with grpcclient.InferenceServerClient(endpoints.grpc_url, ssl=True, root_certificates=str(pki / "ca.pem"),
                                              private_key=str(pki / "client.key"),
                                              certificate_chain=str(pki / "client.pem")) as with_certificate:
            labels = with_certificate.infer("ume", grpc_inputs({"image": image})).as_numpy("label")
    assert "HTTP and metrics closed: they have no TLS" in banner
    assert f"{endpoints.http_port}" not in banner and "warning:" not in banner
    with Pipeline.load(int8_engines) as pipeline:
        np.testing.assert_array_equal(labels.reshape(-1), pipeline.infer({"image": image}).labels)


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for {pid}")


def _tritonserver_pid(server: ServeProcess) -> int:
    for pid in descendants(server.process.pid):
        if "tritonserver" in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")[0]:
            return pid
    raise AssertionError("no tritonserver under serve")


@pytest.mark.slow
@pytest.mark.triton
def test_oversized_requests_are_refused_and_do_not_leave_the_server_bloated(int8_engines, avdigits_test):
    pytest.importorskip("pytriton")
    oversized = np.zeros((16_000, 1, 40, 48), np.float32)  # 123 MB, 250 times the largest batch the model takes
    image = avdigits_test[0]["image"][:2]
    with ServeProcess(int8_engines, Endpoints("127.0.0.1", *free_ports(3))) as server, \
            grpcclient.InferenceServerClient(server.grpc_url) as client:
        tritonserver = _tritonserver_pid(server)
        before = _rss_mb(tritonserver)
        for _ in range(4):
            with pytest.raises(InferenceServerException, match="batch-size must be <= 64"):
                client.infer("ume", grpc_inputs({"audio": oversized}))
        grown = _rss_mb(tritonserver) - before
        labels = client.infer("ume", grpc_inputs({"image": image})).as_numpy("label")
    assert grown < 2 * oversized.nbytes / 2**20, f"tritonserver kept {grown:.0f} MB after four refused requests"
    with Pipeline.load(int8_engines) as pipeline:
        np.testing.assert_array_equal(labels.reshape(-1), pipeline.infer({"image": image}).labels)
