"""One ``ume`` everywhere: ``serve --engines DIR`` (the pipeline entry) and ``serve --repository`` on
``triton_repo``'s default output (the BLS entry, with no ume-edge import in its models) answer one battery of good and
bad requests identically over real gRPC, both take ``present``, and both count by presence pattern."""

import subprocess
import sys

import numpy as np
import pytest

from ume_edge.client import ClientOptions, grpc_inputs, run_client
from ume_edge.serve import ServeProcess
from ume_edge.serving.repository import write_repository
from ume_edge.serving.server_config import Endpoints, free_ports

pytestmark = [pytest.mark.slow, pytest.mark.triton]

grpcclient = pytest.importorskip("tritonclient.grpc")

ROUTES = ("engines", "repository")


QUEUE_DELAY_US = 2000


@pytest.fixture(scope="module")
def servers(int8_engines, tmp_path_factory):
    pytest.importorskip("pytriton")  # ships the tritonserver binary
    repository = tmp_path_factory.mktemp("repo") / "models"
    # triton_repo's default output (the BLS entry), with the queue delay the engines route gets from serve's flag:
    # serve --repository serves the delay written in the repository's configs
    write_repository(int8_engines, repository, max_queue_delay_us=QUEUE_DELAY_US)
    sources = {"engines": (int8_engines, []), "repository": (None, ["--repository", str(repository)])}
    started = {}
    try:
        for route, (engines, extra) in sources.items():
            process = ServeProcess(engines, Endpoints("127.0.0.1", *free_ports(3)), max_queue_delay_us=QUEUE_DELAY_US,
                                   extra_args=extra)
            process.start(timeout_s=180)
            started[route] = process
        yield started
    finally:
        for process in started.values():
            process.stop()


def _battery(inputs: dict[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
    image, audio = inputs["image"][:4], inputs["audio"][:4]
    nan_image = image.copy()
    nan_image[2, 0, 1, 1] = np.nan
    mask = np.array([[True, True], [True, False], [False, True], [True, True]])
    names = ["audio", "image"]
    assert mask.shape[1] == len(names)
    masked = {"audio": np.where(mask[:, 0].reshape(-1, 1, 1, 1), audio, np.nan).astype(np.float32), "image": image}
    return {
        "both": {"audio": audio, "image": image},
        "image only": {"image": image},
        "audio only": {"audio": audio[:1]},
        "mask over patterns, NaN in absent rows": {**masked, "present": mask},
        "NaN": {"image": nan_image},
        "NaN in a present row": {"audio": audio, "image": nan_image, "present": np.ones((4, 2), bool)},
        "no modality": {},
        "unknown input": {"image": image, "video": image},
        "mask without every modality": {"image": image, "present": mask},
        "a row with no modality": {"audio": audio, "image": image, "present": mask & False},
        "rows disagree": {"audio": audio[:3], "image": image},
        "batch above the maximum": {"image": np.zeros((65, 1, 28, 28), np.float32)},
        "wrong dtype": {"image": image.astype(np.float64)},
        "wrong shape": {"image": image[:, :, :20]},
    }


def _answer(url: str, arrays: dict[str, np.ndarray]):
    with grpcclient.InferenceServerClient(url) as client:
        try:
            result = client.infer("ume", grpc_inputs(arrays))
        except Exception as error:  # the refusal text is what is compared
            return str(error)
        return {name: result.as_numpy(name) for name in ("logits", "probs", "label")}


def test_both_routes_answer_one_battery_identically(servers, avdigits_test):
    refused = 0
    for case, arrays in _battery(avdigits_test[0]).items():
        engines, repository = (_answer(servers[route].grpc_url, arrays) for route in ROUTES)
        assert type(engines) is type(repository), f"{case}: {engines!r} vs {repository!r}"
        if isinstance(engines, str):
            refused += 1
            assert engines == repository, case
            continue
        for name in ("logits", "probs"):
            np.testing.assert_allclose(engines[name], repository[name], atol=1e-5, err_msg=case)
        np.testing.assert_array_equal(engines["label"], repository["label"], err_msg=case)
    assert refused == 10  # the battery's bad requests, each refused on both routes


@pytest.mark.parametrize("route", ROUTES)
def test_16_clients_with_the_mask_share_batches_and_are_counted_by_pattern(servers, route):
    server = servers[route]
    summary = run_client(ClientOptions(url=server.grpc_url, requests=800, concurrency=16, send_mask=True,
                                       drop={"audio": 0.3, "image": 0.3}, metrics_url=server.metrics_url, seed=5))
    assert summary["errors"] == 0
    sent = {pattern: row["count"] for pattern, row in summary["per_pattern"].items()}
    counted = {pattern: row["requests"] for pattern, row in summary["server"]["per_pattern"].items()}
    assert counted == sent and len(sent) == 3
    assert summary["server"]["rows_per_batch"] >= 4


@pytest.mark.parametrize("route", ROUTES)
def test_both_routes_pass_verify_against_the_build(servers, int8_engines, route):
    """``python -m ume_edge.verify DIR --url``: every pattern, with and without the mask, as the build recorded."""
    result = subprocess.run([sys.executable, "-m", "ume_edge.verify", str(int8_engines), "--url",
                             servers[route].grpc_url], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().splitlines()[-1].startswith("holds:")
    assert result.stdout.count("| ok |") == 6  # 3 patterns x (inputs, mask)
