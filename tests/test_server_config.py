"""One server configuration for both runtimes: ``python -m ume_edge.serve`` started with each, and its tritonserver's
admin APIs asked over real HTTP and gRPC; the flags read back from the running tritonserver's command line."""

import signal
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from ume_edge.serve import RUNTIMES, ServeProcess
from ume_edge.serving.server_config import (
    ADMIN_APIS,
    ADMIN_HEADER,
    RESTRICTION_FLAGS,
    Endpoints,
    GrpcTls,
    ServerConfig,
    free_ports,
)
from ume_edge.serving.watchdog import descendants

# Each closed API on HTTP: a request that would act (or read) if it were open.
ADMIN_HTTP_REQUESTS = {
    "model-repository": ("POST", "/v2/repository/models/ume/unload"),
    "shared-memory": ("GET", "/v2/systemsharedmemory/status"),
    "trace": ("GET", "/v2/trace/setting"),
    "logging": ("GET", "/v2/logging"),
}
ADMIN_GRPC_CALLS = {
    "model-repository": lambda client: client.unload_model("ume"),
    "shared-memory": lambda client: client.get_system_shared_memory_status(),
    "trace": lambda client: client.get_trace_settings(),
    "logging": lambda client: client.get_log_settings(),
}


def test_admin_apis_are_named_as_pytriton_names_them():
    triton = pytest.importorskip("pytriton.triton")
    assert ADMIN_HEADER == triton.TRITON_ACCESS_HEADER
    assert set(ADMIN_APIS) <= triton.VALID_TRITON_ENDPOINTS
    assert set(ADMIN_HTTP_REQUESTS) == set(ADMIN_GRPC_CALLS) == set(ADMIN_APIS)


def test_each_configuration_has_a_key_and_an_id_of_its_own():
    first, second = ServerConfig(), ServerConfig()
    assert first.admin_key != second.admin_key and first.server_id != second.server_id
    assert first.admin_key not in repr(first)


def test_tls_serves_grpc_alone_and_is_not_rendered_for_pytriton(tmp_path: Path):
    tls = GrpcTls(tmp_path / "cert.pem", tmp_path / "key.pem", tmp_path / "root.pem")
    config = ServerConfig(Endpoints("0.0.0.0", 1, 2, 3), tls=tls)
    assert config.endpoints.grpc_only and list(config.endpoints.ports()) == ["gRPC"]
    args = config.tritonserver_args()
    assert {"--allow-http=false", "--allow-metrics=false", "--grpc-use-ssl-mutual=true",
            f"--grpc-root-cert={tmp_path / 'root.pem'}"} <= set(args)
    with pytest.raises(ValueError, match="python-backend"):
        config.pytriton_arguments(log_file=None)


def test_pytriton_gets_every_flag_and_the_closed_apis_with_their_key():
    pytest.importorskip("pytriton")
    config = ServerConfig(Endpoints("127.0.0.1", 1, 2, 3), max_queue_delay_us=500)
    arguments = config.pytriton_arguments(log_file=None)
    for name, value in config.flags().items():
        if name not in RESTRICTION_FLAGS:
            assert getattr(arguments["config"], name.replace("-", "_")) == value, name
    security = arguments["security_config"]
    assert security.access_token == config.admin_key and security.restricted_endpoints == list(ADMIN_APIS)


def _tritonserver_flags(serve_pid: int) -> dict[str, str]:
    """The options of the tritonserver below ``serve_pid``, from its command line (``--a=b`` or ``--a b``)."""
    for pid in descendants(serve_pid):
        argv = Path(f"/proc/{pid}/cmdline").read_text().rstrip("\0").split("\0")
        if argv[0].endswith("/tritonserver"):
            flags: dict[str, str] = {}
            options = iter(argv[1:])
            for option in options:
                name, has_value, value = option.removeprefix("--").partition("=")
                flags[name] = (value if has_value else next(options)).lower()
            return flags
    raise AssertionError(f"no tritonserver below {serve_pid}")


@pytest.fixture(scope="module", params=RUNTIMES)
def server(int8_engines, request):
    pytest.importorskip("pytriton")  # ships the tritonserver binary
    process = ServeProcess(int8_engines, Endpoints("127.0.0.1", *free_ports(3)), runtime=request.param)
    process.start(timeout_s=180)
    yield process
    assert process.stop(signal.SIGTERM) == 0, process.log_tail()


@pytest.mark.triton
def test_both_runtimes_start_tritonserver_with_the_one_configuration(server):
    flags = _tritonserver_flags(server.process.pid)
    expected = ServerConfig(server.endpoints).flags()
    assert set(expected) <= set(flags), f"{server.runtime}: missing {set(expected) - set(flags)}"
    for name in ("strict-readiness", "exit-on-error", "grpc-infer-allocation-pool-size", "allow-gpu-metrics",
                 "exit-timeout-secs", "grpc-address", "http-address", "metrics-address"):
        assert flags[name] == str(expected[name]).lower(), name
    for name in RESTRICTION_FLAGS:
        apis, _, header = flags[name].partition(":")
        assert apis.split(",") == list(ADMIN_APIS) and header.startswith(f"{ADMIN_HEADER}="), flags[name]


@pytest.mark.triton
def test_admin_apis_are_refused_over_http(server):
    for api, (method, path) in ADMIN_HTTP_REQUESTS.items():
        request = urllib.request.Request(server.http_url + path, method=method,
                                         data=b"{}" if method == "POST" else None)
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=10)
        assert refused.value.code == 403, api
        assert f"expecting header '{ADMIN_HEADER}'" in refused.value.read().decode(), api
    _assert_still_serving(server)


@pytest.mark.triton
def test_admin_apis_are_refused_over_grpc(server):
    grpcclient = pytest.importorskip("tritonclient.grpc")
    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        for api, call in ADMIN_GRPC_CALLS.items():
            with pytest.raises(grpcclient.InferenceServerException) as refused:
                call(client)
            assert "This protocol is restricted" in str(refused.value), api
        assert client.get_inference_statistics("ume").model_stats[0].name == "ume"  # statistics stay open
    _assert_still_serving(server)


def _assert_still_serving(server):
    """The refused unload did not happen: ``ume`` is still loaded and ready."""
    with urllib.request.urlopen(f"{server.http_url}/v2/models/ume/ready", timeout=10) as response:
        assert response.status == 200
