"""Issue 21, requests: what a caller sends is refused (with one line naming the problem) or answered correctly, and
one bad request never costs the requests batched with it their answers. Engines come from the real build of a small
model with int64 tokens (an embedding table of 32 rows) beside a float vector."""

import json
import logging
import shutil
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from ume_edge import engine_dir
from ume_edge.backends.base import OptionError
from ume_edge.backends.onnxruntime import OnnxRuntimeEngine
from ume_edge.constants import PROJECT_ROOT
from ume_edge.errors import InputError
from ume_edge.runtime import Pipeline, PipelineClosed
from ume_edge.serving.batching import FAILED, Rejected, answer_encoder_requests, answer_requests

VOCABULARY, SEQUENCE = 32, 6
MODEL = f'''
import torch
from torch import nn

from ume_edge.model import Modality, TokenEncoder, UMEModel


def build():
    torch.manual_seed(0)
    return UMEModel([Modality("tokens", TokenEncoder({VOCABULARY}, 8, 8), ({SEQUENCE},), "int64", 8),
                     Modality("vector", nn.Sequential(nn.Linear(4, 8), nn.ReLU()), (4,), "float32", 8)],
                    3, name="tokens")
'''


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    """``python -m ume_edge.build`` of the model above, fp32, as a user runs it."""
    folder = tmp_path_factory.mktemp("token_model")
    (folder / "model.py").write_text(MODEL)
    rng = np.random.default_rng(0)
    np.savez(folder / "calib.npz", tokens=rng.integers(0, VOCABULARY, (64, SEQUENCE)),
             vector=rng.normal(size=(64, 4)).astype(np.float32))
    result = subprocess.run([sys.executable, "-m", "ume_edge.build", "--model", f"{folder / 'model.py'}:build",
                             "--calib-data", str(folder / "calib.npz"), "--precision", "fp32", "--max-batch", "16",
                             "--out", str(folder / "engines")], capture_output=True, text=True, cwd=PROJECT_ROOT,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    return folder / "engines"


@pytest.fixture(scope="module")
def old_engines(engines, tmp_path_factory):
    """The same engines with a manifest as 0.2.0 wrote it: no ``value_range``."""
    old = tmp_path_factory.mktemp("old") / "engines"
    shutil.copytree(engines, old)
    data = json.loads((old / "manifest.json").read_text())
    for modality in data["modalities"]:
        del modality["value_range"]
    (old / "manifest.json").write_text(json.dumps(data))
    return old


@pytest.fixture(scope="module")
def pipeline(engines):
    with Pipeline.load(engines, threads=1) as opened:
        yield opened


def _tokens(rows, value=None, rng=None):
    tokens = (rng or np.random.default_rng(1)).integers(1, VOCABULARY, (rows, SEQUENCE))
    if value is not None:
        tokens[-1, 2] = value
    return tokens


# ---------------------------------------------------------------------------------------------------------------
# 1. token ids outside [0, vocabulary)


def test_the_build_records_the_embedding_rows_as_the_valid_ids_and_old_manifests_still_load(engines, old_engines):
    manifest = engine_dir.load(engines)
    assert manifest.modality("tokens").value_range == [0, VOCABULARY]
    assert manifest.modality("vector").value_range is None
    assert engine_dir.load(old_engines).modality("tokens").value_range is None


def test_a_range_on_a_float_input_is_refused_as_a_damaged_manifest(engines):
    data = json.loads((engines / "manifest.json").read_text())
    data["modalities"][1]["value_range"] = [0, 4]
    with pytest.raises(engine_dir.EngineMismatch, match=r"modalities\[vector\]\.value_range"):
        engine_dir.parse_manifest(data)


@pytest.mark.parametrize("value", [-1, -VOCABULARY, VOCABULARY, 10**9])
def test_the_pipeline_refuses_ids_outside_the_vocabulary(pipeline, value):
    with pytest.raises(InputError) as raised:
        pipeline.infer({"tokens": _tokens(3, value)})
    assert raised.value.reason == "range"
    message = str(raised.value)
    assert "'tokens'" in message and str(value) in message and f"[0, {VOCABULARY})" in message, message
    assert "rows [2]" in message


def test_an_old_manifest_still_refuses_negative_ids(old_engines):
    with Pipeline.load(old_engines, threads=1) as old:
        with pytest.raises(InputError, match=r"value -1 .* outside the valid ids 0 or more"):
            old.infer({"tokens": _tokens(2, -1)})
        assert old.infer({"tokens": _tokens(2, VOCABULARY - 1)}).logits.shape == (2, 3)


def test_a_served_encoder_refuses_ids_outside_the_vocabulary(pipeline):
    encoder = pipeline.open_encoder("tokens")
    try:
        good = [_tokens(2, rng=np.random.default_rng(seed)) for seed in range(3)]
        answers = answer_encoder_requests(encoder, "tokens", "partial_logits", [good[0], _tokens(1, -1), *good[1:]])
    finally:
        encoder.close()
    assert isinstance(answers[1], Rejected) and answers[1].reason == "range" and "-1" in answers[1].message
    for tokens, answer in zip(good, [answers[0], *answers[2:]], strict=True):
        alone = pipeline.infer({"tokens": tokens})
        assert answer["partial_logits"].shape == (len(tokens), 3)
        np.testing.assert_allclose(answer["partial_logits"], alone.logits, atol=1e-5)  # UME: one modality's logits


# ---------------------------------------------------------------------------------------------------------------
# 2. one request the engines fail on fails only itself


def _good_requests(count):
    rng = np.random.default_rng(7)
    return [{"tokens": _tokens(1 + i % 2, rng=rng), "vector": rng.normal(size=(1 + i % 2, 4)).astype(np.float32)}
            for i in range(count)]


def test_a_request_the_engines_fail_on_fails_alone_and_is_logged_once(old_engines, caplog):
    """With a 0.2.0 manifest nothing bounds the ids, so ONNX Runtime itself fails on an id past the table."""
    good = _good_requests(6)
    culprit = {"tokens": _tokens(1, VOCABULARY + 8)}
    with Pipeline.load(old_engines, threads=1) as old, caplog.at_level(logging.WARNING, "ume_edge.serving.batching"):
        answers = answer_requests(old, [*good[:3], culprit, *good[3:]])
        expected = [old.infer(request) for request in good]
    assert isinstance(answers[3], Rejected) and answers[3].reason == FAILED, answers[3]
    for answer, reference in zip([*answers[:3], *answers[4:]], expected, strict=True):
        np.testing.assert_allclose(answer["logits"], reference.logits, atol=1e-5)
        np.testing.assert_array_equal(answer["label"].ravel(), reference.labels)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "answering each alone" in warnings[0].getMessage()


def test_an_id_past_the_vocabulary_is_refused_alone_in_its_batch(pipeline):
    good = _good_requests(6)
    answers = answer_requests(pipeline, [*good[:3], {"tokens": _tokens(1, VOCABULARY)}, *good[3:]])
    assert isinstance(answers[3], Rejected) and answers[3].reason == "range"
    assert all(isinstance(answer, dict) for index, answer in enumerate(answers) if index != 3)


# ---------------------------------------------------------------------------------------------------------------
# 4. threads


@pytest.mark.parametrize("threads", [10**6, 0, -1, True, 1.5])
def test_threads_outside_one_to_the_cores_are_refused_in_one_line(engines, threads):
    with pytest.raises(OptionError) as raised:
        Pipeline.load(engines, threads=threads)
    assert "threads" in str(raised.value) and "\n" not in str(raised.value)
    with pytest.raises(OptionError):
        OnnxRuntimeEngine(engines / "vector.onnx", threads=threads)


# ---------------------------------------------------------------------------------------------------------------
# 5. close while inferring


def test_close_during_infer_waits_for_it_and_later_infers_say_the_pipeline_is_closed(engines):
    opened = Pipeline.load(engines, threads=1)
    inputs = {"tokens": _tokens(16), "vector": np.ones((16, 4), np.float32)}
    expected = opened.infer(inputs).logits
    outcomes, started = [], threading.Barrier(5)

    def keep_inferring():
        started.wait(timeout=30)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                outcomes.append(opened.infer(inputs).logits)
            except Exception as error:  # recorded and checked below
                outcomes.append(error)
                return

    workers = [threading.Thread(target=keep_inferring) for _ in range(4)]
    for worker in workers:
        worker.start()
    started.wait(timeout=30)
    time.sleep(0.05)
    opened.close()
    for worker in workers:
        worker.join(timeout=60)
    assert not any(worker.is_alive() for worker in workers)
    errors = [outcome for outcome in outcomes if isinstance(outcome, Exception)]
    assert len(errors) == 4, "every worker ends on the closed pipeline"
    assert all(isinstance(error, PipelineClosed) and "is closed" in str(error) for error in errors), errors
    for logits in outcomes:
        if not isinstance(logits, Exception):
            np.testing.assert_allclose(logits, expected, atol=1e-6)
    with pytest.raises(PipelineClosed, match="the pipeline of .* is closed"):
        opened.infer(inputs)
    opened.close()


# ---------------------------------------------------------------------------------------------------------------
# the served models (real tritonserver, real gRPC): the BLS entry with Python-backend encoders and fusion, and the
# pipeline entry


def _serve(engines, folder, **options):
    from ume_edge.serving import repository
    from ume_edge.serving.server_config import Endpoints, free_ports
    from ume_edge.serving.tritonserver import TritonServer

    repository.write_repository(engines, folder, encoder_backend="python", max_queue_delay_us=20000, threads=1,
                                **options)
    return TritonServer(folder, Endpoints("127.0.0.1", *free_ports(3)))


@pytest.fixture(scope="module")
def bls_server(engines, tmp_path_factory):
    pytest.importorskip("pytriton")  # ships the tritonserver binary
    with _serve(engines, tmp_path_factory.mktemp("bls_repository")) as server:
        yield server


@pytest.fixture(scope="module")
def pipeline_server(engines, tmp_path_factory):
    pytest.importorskip("pytriton")
    with _serve(engines, tmp_path_factory.mktemp("pipeline_repository"), entry="pipeline") as server:
        yield server


def _infer_together(url, model, jobs):
    """Send every job at once (so the dynamic batcher groups them); (result, error) per job."""
    from tritonclient import grpc as grpcclient

    from ume_edge.client import grpc_inputs

    answers, done = [None] * len(jobs), threading.Semaphore(0)
    with grpcclient.InferenceServerClient(url) as connection:
        for index, arrays in enumerate(jobs):
            def callback(result, error, index=index):
                answers[index] = (result, error)
                done.release()
            connection.async_infer(model, grpc_inputs(arrays), callback)
        for _ in jobs:
            assert done.acquire(timeout=60)
    return answers


def _assert_only_the_culprit_fails(answers, culprit, pipeline, jobs, *expected_in_error):
    error = str(answers[culprit][1])
    assert all(text in error for text in expected_in_error), error
    for index, (result, failure) in enumerate(answers):
        if index != culprit:
            assert failure is None, failure
            np.testing.assert_allclose(result.as_numpy("logits"), pipeline.infer(jobs[index]).logits, atol=1e-5)


@pytest.mark.triton
@pytest.mark.parametrize("entry", ["bls", "pipeline"])
@pytest.mark.parametrize("value", [-1, VOCABULARY])
def test_a_served_entry_refuses_an_id_outside_the_vocabulary_and_answers_the_rest(request, pipeline, entry, value):
    server = request.getfixturevalue(f"{entry}_server")
    jobs = _good_requests(6)
    jobs.insert(3, {"tokens": _tokens(1, value), "vector": np.zeros((1, 4), np.float32)})
    answers = _infer_together(server.grpc_url, "ume", jobs)
    _assert_only_the_culprit_fails(answers, 3, pipeline, jobs, "'tokens'", f"value {value}", f"[0, {VOCABULARY})")


@pytest.mark.triton
@pytest.mark.parametrize("value", [-1, VOCABULARY])
def test_the_served_token_encoder_refuses_an_id_outside_the_vocabulary(bls_server, pipeline, value):
    good = [_tokens(2, rng=np.random.default_rng(seed)) for seed in range(4)]
    jobs = [{"tokens": tokens} for tokens in [*good[:2], _tokens(1, value), *good[2:]]]
    answers = _infer_together(bls_server.grpc_url, "ume_tokens", jobs)
    assert f"value {value}" in str(answers[2][1]) and f"[0, {VOCABULARY})" in str(answers[2][1]), answers[2][1]
    for index in (0, 1, 3, 4):
        result, error = answers[index]
        assert error is None, error
        np.testing.assert_allclose(result.as_numpy("partial_logits"), pipeline.infer(jobs[index]).logits, atol=1e-5)


@pytest.mark.triton
@pytest.mark.parametrize("present", [[[0, 0]], [[0.5, 0.5]], [[-3, 1]], [[1, 1], [0, 0]]])
def test_the_served_fusion_refuses_presence_rows_that_are_not_zeros_and_ones_with_a_one(bls_server, present):
    partial = np.ones((len(present), 2, 3), np.float32)
    good = {"partial_logits": partial[:1], "present": np.array([[1, 0]], np.float32)}
    answers = _infer_together(bls_server.grpc_url, "fusion",
                              [good, {"partial_logits": partial, "present": np.array(present, np.float32)}, good])
    bad_row = len(present) - 1
    assert "'present'" in str(answers[1][1]) and f"rows [{bad_row}]" in str(answers[1][1]), answers[1][1]
    for result, error in (answers[0], answers[2]):
        assert error is None, error
        np.testing.assert_allclose(result.as_numpy("logits"), [[1, 1, 1]])


@pytest.mark.triton
def test_a_served_model_with_more_threads_than_cores_does_not_load(engines, tmp_path):
    pytest.importorskip("pytriton")
    server = _serve(engines, tmp_path / "repository")
    config = tmp_path / "repository" / "ume_vector" / "config.pbtxt"
    config.write_text(config.read_text().replace('string_value: "1"', 'string_value: "1000000"'))
    with pytest.raises(Exception) as raised:
        server.start(timeout_s=120)
    assert "intra_op_threads='1000000'" in str(raised.value), raised.value
    server.log_path.unlink(missing_ok=True)
