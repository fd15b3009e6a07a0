"""``python -m ume_edge.serve`` answered over gRPC, for both runtimes (generated Python-backend models on the
standalone tritonserver, the default, and PyTriton); both run the real tritonserver from the nvidia-pytriton wheel.

One server per runtime starts for the module (with a 2 ms batching delay so concurrent requests reliably share
batches) and is stopped with SIGTERM at the end, which must exit cleanly.
"""

import signal
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from ume_edge.backends.onnxruntime import OnnxRuntimeEngine
from ume_edge.client import grpc_inputs
from ume_edge.data import presence_patterns
from ume_edge.errors import InputError
from ume_edge.runtime import Pipeline
from ume_edge.serve import RUNTIMES, ServeProcess
from ume_edge.serving import metrics
from ume_edge.serving.batching import Rejected, answer_requests
from ume_edge.serving.metrics import EntryMetrics
from ume_edge.serving.pytriton import all_answers_or_refusal
from ume_edge.serving.server_config import Endpoints, free_ports

pytestmark = pytest.mark.slow  # builds, servers or subprocess runs

grpcclient = pytest.importorskip("tritonclient.grpc")

ATOL = 1e-5
LOAD_CLIENTS, LOAD_REQUESTS_EACH = 16, 250


@pytest.fixture(scope="module")
def pipeline(int8_engines):
    return Pipeline.load(int8_engines)


@pytest.fixture(scope="module", params=RUNTIMES)
def server(int8_engines, request):
    pytest.importorskip("pytriton")  # ships the tritonserver binary
    process = ServeProcess(int8_engines, Endpoints("127.0.0.1", *free_ports(3)), runtime=request.param,
                           max_queue_delay_us=2000, keep_log=True)
    process.start(timeout_s=180)
    yield process
    code = process.stop(signal.SIGTERM)
    assert code == 0, f"serve did not stop cleanly on SIGTERM (exit {code}):\n{process.log_tail()}"
    assert "ume-edge serve: stopped" in process.log()
    process.log_path.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def client(server):
    with grpcclient.InferenceServerClient(server.grpc_url) as connection:
        yield connection


@pytest.fixture(scope="module")
def samples(avdigits_test):
    inputs, _ = avdigits_test
    return {name: array[:64] for name, array in inputs.items()}


def _infer(client, arrays, model="ume"):
    return client.infer(model, grpc_inputs(arrays))


def _reference(pipeline, arrays):
    return pipeline.infer({spec.name: arrays.get(spec.name) for spec in pipeline.modalities})


def _assert_same(result, reference):
    np.testing.assert_allclose(result.as_numpy("logits"), reference.logits, atol=ATOL)
    np.testing.assert_allclose(result.as_numpy("probs"), reference.probs, atol=ATOL)
    np.testing.assert_array_equal(result.as_numpy("label").reshape(-1), reference.labels)


def _metric(server, name, model):
    text = urllib.request.urlopen(server.metrics_url, timeout=5).read().decode()
    prefix = f'{name}{{model="{model}",'
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefix))


def _metric_reaching(server, name, model, target, timeout_s=10.0):
    """Triton counts a request just after answering it: poll until the counter reaches ``target``."""
    deadline = time.monotonic() + timeout_s
    value = _metric(server, name, model)
    while value < target and time.monotonic() < deadline:
        time.sleep(0.05)
        value = _metric(server, name, model)
    return value


def test_serving_modules_do_not_import_torch():
    code = ("import sys\nimport ume_edge.serve, ume_edge.client, ume_edge.triton_repo, ume_edge.sync\n"
            "import ume_edge.serving.python_backend, ume_edge.serving.pytriton, ume_edge.serving.watchdog\n"
            "import ume_edge.verify, ume_edge.verification, ume_edge.client.streaming\n"
            "assert 'torch' not in sys.modules, 'torch was imported'")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_help_describes_the_options():
    result = subprocess.run([sys.executable, "-m", "ume_edge.serve", "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    for option in ("--engines", "--repository", "--host", "--grpc-port", "--http-port", "--metrics-port",
                   "--max-queue-delay-us", "--grpc-server-cert", "--runtime", "--verbose"):
        assert option in result.stdout
    text = "".join(result.stdout.split())  # argparse wraps lines, inside words too
    assert "(default:127.0.0.1)" in text and "(default:python-backend)" in text


@pytest.mark.triton
def test_model_metadata_follows_the_manifest(client, pipeline):
    metadata = client.get_model_metadata("ume", as_json=True)
    inputs = {tensor["name"]: tensor for tensor in metadata["inputs"]}
    assert list(inputs) == [spec.name for spec in pipeline.modalities] + ["present"]
    assert inputs["present"]["datatype"] == "BOOL" and inputs["present"]["shape"] == ["-1", "2"]
    for spec in pipeline.modalities:
        assert inputs[spec.name]["shape"] == ["-1", *map(str, spec.shape)]
    assert {tensor["name"] for tensor in metadata["outputs"]} == {"logits", "probs", "label"}
    config = client.get_model_config("ume", as_json=True)["config"]
    assert all(tensor.get("optional") for tensor in config["input"])
    assert "dynamic_batching" in config


@pytest.mark.triton
@pytest.mark.parametrize("batch", [1, 7])
def test_every_presence_pattern_equals_the_pipeline(client, pipeline, samples, batch):
    for pattern in presence_patterns([spec.name for spec in pipeline.modalities]):
        arrays = {name: samples[name][:batch] for name in pattern}
        _assert_same(_infer(client, arrays), _reference(pipeline, arrays))


@pytest.mark.triton
def test_encoder_models_answer_partial_logits(client, pipeline, samples):
    for spec in pipeline.modalities:
        x = samples[spec.name][:5]
        result = _infer(client, {spec.name: x}, model=f"ume_{spec.name}")
        expected = pipeline.open_encoder(spec.name).infer({spec.name: x})["partial_logits"]
        np.testing.assert_allclose(result.as_numpy("partial_logits"), expected, atol=ATOL)


def _concurrent(server, jobs):
    """Send every (model, arrays) job at once with async_infer; returns [(result, error)] in job order."""
    answers = [None] * len(jobs)
    done = threading.Semaphore(0)
    with grpcclient.InferenceServerClient(server.grpc_url) as connection:
        for index, (model, arrays) in enumerate(jobs):
            def callback(result, error, index=index):
                answers[index] = (result, error)
                done.release()
            connection.async_infer(model, grpc_inputs(arrays), callback)
        for _ in jobs:
            assert done.acquire(timeout=60), "a request was never answered"
    return answers


@pytest.mark.triton
def test_concurrent_mixed_patterns_equal_the_pipeline(server, pipeline, samples):
    patterns = presence_patterns([spec.name for spec in pipeline.modalities])
    rng = np.random.default_rng(1)
    jobs = []
    for index in range(60):
        pattern = patterns[index % len(patterns)]
        start, size = int(rng.integers(0, 60)), int(rng.integers(1, 4))
        jobs.append(("ume", {name: samples[name][start:start + size] for name in pattern}))
    for (_, arrays), (result, error) in zip(jobs, _concurrent(server, jobs), strict=True):
        assert error is None, error
        _assert_same(result, _reference(pipeline, arrays))


@pytest.mark.triton
def test_concurrent_requests_are_batched(server, pipeline, samples):
    """Triton's dynamic batcher groups queued requests that carry the same inputs (for a model with optional inputs
    it does not put different presence patterns in one batch: see its dynamic_batch_scheduler)."""
    jobs = [("ume", {name: samples[name][i:i + 1] for name in ("audio", "image")}) for i in range(40)]
    executions_before = _metric(server, "nv_inference_exec_count", "ume")
    requests_before = _metric(server, "nv_inference_request_success", "ume")
    assert all(error is None for _, error in _concurrent(server, jobs))
    requests = _metric_reaching(server, "nv_inference_request_success", "ume", requests_before + len(jobs))
    executions = _metric(server, "nv_inference_exec_count", "ume") - executions_before
    assert requests - requests_before == len(jobs)
    assert executions < len(jobs) / 2, f"{executions:.0f} executions for {len(jobs)} requests"


def test_mixed_patterns_are_answered_by_one_pipeline_call(pipeline, samples, monkeypatch):
    """The batch-answering code shared by both runtimes: one Pipeline.infer with per-row masks, an absent
    modality's rows never reach its engine, and a bad request is refused alone."""
    nan = samples["image"][:1].copy()
    nan[0, 0, 0, 0] = np.nan
    requests = [{"audio": samples["audio"][:2]}, {"image": samples["image"][2:3]},
                {"audio": samples["audio"][3:6], "image": samples["image"][3:6]}, {"image": nan}, {},
                {"video": samples["image"][:1]}]
    calls = {"infer": 0, "audio_rows": 0}
    original_infer, original_engine_infer = pipeline.infer, OnnxRuntimeEngine.infer

    def counting_infer(*args, **kwargs):
        calls["infer"] += 1
        return original_infer(*args, **kwargs)

    def counting_engine(engine, feeds):
        calls["audio_rows"] += len(feeds.get("audio", ()))
        return original_engine_infer(engine, feeds)

    monkeypatch.setattr(pipeline, "infer", counting_infer)
    monkeypatch.setattr(OnnxRuntimeEngine, "infer", counting_engine)
    answers = answer_requests(pipeline, requests[:3])
    assert calls == {"infer": 1, "audio_rows": 5}  # rows of the image-only request never reached the audio engine
    answers += answer_requests(pipeline, requests[3:])
    monkeypatch.undo()
    for arrays, answer in zip(requests[:3], answers[:3], strict=True):
        expected = _reference(pipeline, arrays)
        np.testing.assert_allclose(answer["logits"], expected.logits, atol=ATOL)
        np.testing.assert_array_equal(answer["label"].reshape(-1), expected.labels)
    assert [type(a) for a in answers[3:]] == [Rejected] * 3
    assert "NaN" in answers[3].message and "no modality" in answers[4].message and "video" in answers[5].message


def test_pytriton_fails_a_batch_naming_each_refused_request():
    with pytest.raises(InputError, match="request 2 of 3: input 'image' holds NaN; request 3 of 3: no modality"):
        all_answers_or_refusal([{"logits": np.zeros((1, 10))}, Rejected("input 'image' holds NaN", "nan"),
                                Rejected("no modality", "no_modality")])
    answers = [{"logits": np.zeros((1, 10))}]
    assert all_answers_or_refusal(answers) is answers


def _bad_requests(samples, max_batch):
    image = samples["image"][:2]
    nan = image.copy()
    nan[1, 0, 3, 3] = np.nan
    return {
        "no modality": ({}, "0 inputs"),
        "wrong shape": ({"image": image[:, :, :20]}, "shape"),
        "wrong dtype": ({"image": image.astype(np.float64)}, "data-type"),
        "NaN": ({"image": nan}, "NaN"),
        "unknown input": ({"image": image, "video": image}, "video"),
        "batch above max": ({"image": np.zeros((max_batch + 1, 1, 28, 28), np.float32)}, "batch"),
    }


@pytest.mark.triton
def test_each_bad_request_gets_an_error_naming_it_and_the_server_stays_up(client, pipeline, samples):
    valid = {"audio": samples["audio"][:3]}
    for problem, (arrays, expected) in _bad_requests(samples, pipeline.max_batch).items():
        with pytest.raises(Exception) as raised:
            _infer(client, arrays)
        assert expected.lower() in str(raised.value).lower(), f"{problem}: {raised.value}"
        _assert_same(_infer(client, valid), _reference(pipeline, valid))


@pytest.mark.triton
@pytest.mark.parametrize("server", ["python-backend"], indirect=True)  # PyTriton fails the batch (test above)
def test_a_bad_request_fails_alone_in_a_shared_batch(server, pipeline, samples):
    bad = samples["image"][:2].copy()
    bad[0, 0, 0, 0] = np.inf
    good = [{"image": samples["image"][i:i + 1 + i % 2]} for i in range(12)]
    jobs = [("ume", arrays) for arrays in good[:6] + [{"image": bad}] + good[6:]]
    executions_before = _metric(server, "nv_inference_exec_count", "ume")
    answers = _concurrent(server, jobs)
    bad_result, bad_error = answers[6]
    assert bad_result is None and "nan or inf" in str(bad_error).lower()
    for (_, arrays), (result, error) in zip(jobs[:6] + jobs[7:], answers[:6] + answers[7:], strict=True):
        assert error is None, error
        _assert_same(result, _reference(pipeline, arrays))
    _metric_reaching(server, "nv_inference_request_failure", "ume", 1)
    assert _metric(server, "nv_inference_exec_count", "ume") - executions_before < len(jobs) / 2  # shared batches


@pytest.mark.triton
def test_encoder_model_rejects_nan_alone(server, pipeline, samples):
    bad = samples["image"][:1].copy()
    bad[0, 0, 5, 5] = np.nan
    jobs = [("ume_image", {"image": samples["image"][:2]}), ("ume_image", {"image": bad}),
            ("ume_image", {"image": samples["image"][2:3]})]
    answers = _concurrent(server, jobs)
    assert "nan" in str(answers[1][1]).lower()
    if server.runtime == "pytriton":  # no per-request error: the batch it shared fails, naming the request
        assert "request" in str(answers[1][1])
        return
    assert answers[0][1] is None and answers[2][1] is None


@pytest.mark.slow
@pytest.mark.triton
def test_load_16_clients_random_patterns_nothing_lost(server, pipeline, avdigits_test):
    """16 concurrent clients x 250 batch-1 requests with random presence patterns: every answer arrives and equals
    the in-process answer for that sample and pattern."""
    inputs, _ = avdigits_test
    names = [spec.name for spec in pipeline.modalities]
    patterns = presence_patterns(names)
    count = len(next(iter(inputs.values())))
    expected = {pattern: np.concatenate([
        _reference(pipeline, {name: inputs[name][start:start + pipeline.max_batch] for name in pattern}).logits
        for start in range(0, count, pipeline.max_batch)]) for pattern in patterns}

    def one_client(seed):
        rng = np.random.default_rng(seed)
        mismatches = 0
        with grpcclient.InferenceServerClient(server.grpc_url) as connection:
            for _ in range(LOAD_REQUESTS_EACH):
                pattern, sample = patterns[rng.integers(len(patterns))], int(rng.integers(count))
                result = connection.infer("ume", grpc_inputs({n: inputs[n][sample:sample + 1] for n in pattern}))
                if not np.allclose(result.as_numpy("logits")[0], expected[pattern][sample], atol=ATOL):
                    mismatches += 1
        return mismatches

    with ThreadPoolExecutor(LOAD_CLIENTS) as pool:
        mismatches = list(pool.map(one_client, range(LOAD_CLIENTS)))
    assert sum(mismatches) == 0


@pytest.mark.triton
def test_a_present_mask_lets_every_pattern_share_a_batch(server, pipeline, samples):
    names = pipeline.modality_names
    rng = np.random.default_rng(3)
    masks = [rng.random((1 + i % 3, len(names))) < 0.6 for i in range(24)]
    for mask in masks:
        mask[~mask.any(axis=1), rng.integers(len(names))] = True
    jobs = [("ume", {**{name: samples[name][i:i + len(mask)] * mask[:, [j]][:, :, None, None]
                        for j, name in enumerate(names)}, "present": mask}) for i, mask in enumerate(masks)]
    before = _metric(server, "nv_inference_exec_count", "ume")
    for (_, arrays), (result, error), mask in zip(jobs, _concurrent(server, jobs), masks, strict=True):
        assert error is None, error
        for row, present in enumerate(mask):
            expected = _reference(pipeline, {name: arrays[name][row:row + 1] for j, name in enumerate(names)
                                             if present[j]})
            np.testing.assert_allclose(result.as_numpy("logits")[row:row + 1], expected.logits, atol=ATOL)
    assert _metric(server, "nv_inference_exec_count", "ume") - before < len(jobs) / 2  # mixed patterns, shared batches


@pytest.mark.triton
@pytest.mark.parametrize("server", ["python-backend"], indirect=True)  # metrics need the Python backend's API
def test_metrics_count_requests_rows_and_refusals_by_pattern(server, samples):
    nan = samples["image"][:1].copy()
    nan[0, 0, 0, 0] = np.nan
    time.sleep(3 * EntryMetrics.FLUSH_S)  # what earlier tests sent is counted before we start
    before = metrics.parse(urllib.request.urlopen(server.metrics_url, timeout=5).read().decode())
    with grpcclient.InferenceServerClient(server.grpc_url) as connection:
        for arrays in ({"audio": samples["audio"][:3]}, {"audio": samples["audio"][:1]},
                       {"audio": samples["audio"][:2], "image": samples["image"][:2]}):
            connection.infer("ume", grpc_inputs(arrays))
        mixed = np.array([[True, False], [False, True], [True, True]])
        connection.infer("ume", grpc_inputs({"audio": samples["audio"][:3], "image": samples["image"][:3],
                                             "present": mixed}))
        with pytest.raises(Exception, match="NaN"):
            connection.infer("ume", grpc_inputs({"image": nan}))
    time.sleep(3 * EntryMetrics.FLUSH_S)  # the entry model hands its counts to Triton every FLUSH_S
    after = metrics.parse(urllib.request.urlopen(server.metrics_url, timeout=5).read().decode())
    counted = metrics.difference(after, before)
    assert metrics.by_label(counted, metrics.REQUESTS, "pattern") == {"audio": 3, "audio+image": 2, "image": 1}
    assert metrics.by_label(counted, metrics.ROWS, "pattern") == {"audio": 5, "audio+image": 3, "image": 1}
    assert metrics.by_label(counted, metrics.REJECTED, "reason").get("nan") == 1
    assert all(v > 0 for v in metrics.by_label(counted, metrics.DURATION, "pattern").values())
    # the NaN request is refused by the request contract's check, so it never reaches the pipeline
    assert metrics.total(counted, metrics.BATCH_ROWS) == 9
    assert metrics.total(counted, metrics.BATCHES) == 4


@pytest.mark.triton
@pytest.mark.parametrize("runtime", RUNTIMES)
def test_sigint_stops_the_server_cleanly(int8_engines, runtime):
    pytest.importorskip("pytriton")  # ships the tritonserver binary
    endpoints = Endpoints("127.0.0.1", *free_ports(3))
    process = ServeProcess(int8_engines, endpoints, runtime=runtime, keep_log=True)
    process.start(timeout_s=180)
    try:
        banner = process.log()
        assert f"gRPC     127.0.0.1:{endpoints.grpc_port}" in banner
        assert f"http://127.0.0.1:{endpoints.http_port}" in banner
    finally:
        code = process.stop(signal.SIGINT)
    assert code == 0, process.log_tail()
    process.log_path.unlink(missing_ok=True)
