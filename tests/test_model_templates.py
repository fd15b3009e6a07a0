"""The Python-backend templates run in-process, as Triton's Python stub runs them, against a fake
``triton_python_backend_utils`` (tests/fake_pb_utils.py) whose surface is held to the real python_backend's
(tests/api_tables/python-backend-r24.10.json, from tools/python_backend_table.py).

Each model comes from a repository ``python -m ume_edge.triton_repo`` writes; it is imported as the stub imports it
(its version folder and model folder on ``sys.path``, ``import 1.model``, ``ume_contract`` beside it) and initialised
with ``model_config`` as Triton hands it: the JSON of ``config.pbtxt`` parsed with Triton's own protobuf schema,
printed as Triton core prints it (proto field names, every field, 64-bit integers as numbers). BLS calls of the entry
model go to ONNX Runtime sessions of the repository's encoder and fusion models, with the input checks Triton makes.
"""

import asyncio
import importlib
import inspect
import json
import sys
from collections import Counter

import numpy as np
import onnxruntime as ort
import pytest
from api_conformance import TABLES, check_object
from fake_pb_utils import TEST_ONLY, Metric, make_pb_utils

from ume_edge import triton_repo
from ume_edge.data import presence_patterns
from ume_edge.runtime import Pipeline
from ume_edge.serving import contract

text_format = pytest.importorskip("google.protobuf.text_format")
json_format = pytest.importorskip("google.protobuf.json_format")
model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2")

TABLE = json.loads((TABLES / "python-backend-r24.10.json").read_text())
STUB_MODULES = ("1", "1.model", contract.CONTRACT_FILE.removesuffix(".py"))
OUTPUTS = [contract.LOGITS, contract.PROBS, contract.LABEL]
ATOL = 1e-5


def _with_unexported(table: dict) -> dict:
    """The table with the classes a model reaches only through calls (``MetricFamily.Metric`` -> ``Metric``)."""
    return {**table, "classes": {**table["classes"], **table["unexported_classes"]}}


# ---------------------------------------------------------------------------------------------------------------
# the fake against the real API


def test_fake_module_matches_python_backend():
    assert check_object(make_pb_utils(), TABLE, test_only=TEST_ONLY) == []


@pytest.mark.parametrize("name", ["TritonError", "Tensor", "InferenceRequest", "InferenceResponse",
                                  "PreferredMemory", "MetricFamily"])
def test_fake_class_matches_python_backend(name):
    assert check_object(getattr(make_pb_utils(), name), TABLE, name) == []


def test_fake_metric_matches_python_backend():
    assert check_object(Metric, _with_unexported(TABLE), "Metric") == []


def test_a_misspelled_parameter_or_a_wrong_code_is_caught():
    pb_utils = make_pb_utils()

    class Misspelled(pb_utils.InferenceRequest):
        def exec(self, decouple=False):
            return None

    class WrongCode(pb_utils.TritonError):
        INVALID_ARG = 2

    assert check_object(Misspelled, TABLE, "InferenceRequest") == [
        "Misspelled.exec(decouple): python_backend r24.10 takes (decoupled)"]
    assert check_object(WrongCode, TABLE, "TritonError") == ["WrongCode.INVALID_ARG is 2; the real value is 3"]


def test_the_table_is_that_of_the_shipped_stub():
    """Every bound name is in the wheel's stub binary; ``ResponseIterator.cancel`` (added after r24.12) is not.
    pybind11 names unnamed parameters ``arg0``...: ``Tensor`` and ``Metric.increment`` take no keywords."""
    stub = TABLE["sources"]["stub_binary"]
    assert stub["names_not_in_binary"] == [] and stub["names_HEAD_adds"]["ResponseIterator.cancel"] is False
    tensor = TABLE["classes"]["Tensor"]["members"]["__init__"]["overloads"][0]["parameters"]
    assert [p["name"] for p in tensor] == ["arg0", "arg1"]
    pb_utils = make_pb_utils()
    with pytest.raises(TypeError):
        pb_utils.Tensor(name="x", array=np.zeros(1))  # noqa  (the real binding refuses keywords too)
    with pytest.raises(TypeError):
        pb_utils.InferenceResponse([], error="not a TritonError")


# ---------------------------------------------------------------------------------------------------------------
# loading models as the stub does


def triton_config(model_dir) -> dict:
    """``model_config`` as Triton hands it to ``initialize``."""
    message = text_format.Parse((model_dir / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    config = json_format.MessageToDict(message, preserving_proto_field_name=True,
                                       always_print_fields_with_no_presence=True)
    return _int64_as_numbers(message.DESCRIPTOR, config)


def _int64_as_numbers(descriptor, data: dict) -> dict:
    """Protobuf's JSON writes 64-bit integers as strings; Triton core turns every one back into a number."""
    for field in descriptor.fields:
        if field.name not in data:
            continue
        value = data[field.name]
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            value_field = field.message_type.fields_by_name["value"]
            if value_field.message_type is not None:
                for item in value.values():
                    _int64_as_numbers(value_field.message_type, item)
        elif field.message_type is not None:
            for item in value if isinstance(value, list) else [value]:
                _int64_as_numbers(field.message_type, item)
        elif field.cpp_type in (field.CPPTYPE_INT64, field.CPPTYPE_UINT64):
            data[field.name] = [int(v) for v in value] if isinstance(value, list) else int(value)
    return data


@pytest.fixture
def load_model(monkeypatch):
    """``load(model_dir, pb_utils)``: the initialised ``TritonPythonModel`` of ``model_dir``; finalised afterwards."""
    loaded = []

    def load(model_dir, pb_utils):
        monkeypatch.setitem(sys.modules, "triton_python_backend_utils", pb_utils)
        saved_path = list(sys.path)
        sys.path[:0] = [str(model_dir / "1"), str(model_dir)]
        try:
            module = importlib.import_module("1.model")
        finally:
            sys.path[:] = saved_path
            for name in STUB_MODULES:
                sys.modules.pop(name, None)
        model = module.TritonPythonModel()
        model.initialize({"model_config": json.dumps(triton_config(model_dir)), "model_instance_kind": "CPU",
                          "model_instance_name": f"{model_dir.name}_0_0", "model_instance_device_id": "0",
                          "model_repository": str(model_dir), "model_version": "1", "model_name": model_dir.name})
        loaded.append(model)
        return model

    yield load
    for model in loaded:
        if hasattr(model, "finalize"):  # optional, as for Triton
            model.finalize()


def execute(model, requests):
    answer = model.execute(requests)
    return asyncio.run(answer) if inspect.iscoroutine(answer) else answer


def request(pb_utils, arrays: dict, model_name="ume", outputs=OUTPUTS):
    return pb_utils.InferenceRequest(model_name=model_name, requested_output_names=outputs,
                                     inputs=[pb_utils.Tensor(name, array) for name, array in arrays.items()])


def answer(response, config: dict, pb_utils) -> dict:
    """The outputs of a good response, checked against what ``config`` declares."""
    assert not response.has_error(), response.error().message()
    outputs = {tensor.name(): tensor.as_numpy() for tensor in response.output_tensors()}
    declared = {tensor["name"]: tensor for tensor in config["output"]}
    assert set(outputs) == set(declared)
    for name, array in outputs.items():
        assert array.dtype == pb_utils.triton_string_to_numpy(declared[name]["data_type"]), name
        assert list(array.shape[1:]) == declared[name]["dims"], name
    return outputs


def refusal(response) -> tuple[str, int]:
    assert response.has_error() and response.output_tensors() == []
    return response.error().message(), response.error().code()


def served(model_dir, onnx_file="1/model.onnx", fixed_batch=None):
    """A model of the repository as Triton serves it to BLS: its inputs checked against its config (names, dtype,
    dims, batch; exactly ``fixed_batch`` rows when given, as a DLA plan runs), then run with ONNX Runtime."""
    config = triton_config(model_dir)
    session = ort.InferenceSession(str(model_dir / onnx_file), providers=["CPUExecutionProvider"])
    declared = {tensor["name"]: tensor for tensor in config["input"]}
    output_names = [tensor["name"] for tensor in config["output"]]
    numpy_type = make_pb_utils().triton_string_to_numpy

    def run(inputs):
        if set(inputs) != set(declared):
            raise ValueError(f"{model_dir.name}: expected inputs {sorted(declared)}, got {sorted(inputs)}")
        for name, array in inputs.items():
            if array.dtype != numpy_type(declared[name]["data_type"]) or list(array.shape[1:]) != \
                    declared[name]["dims"]:
                raise ValueError(f"{model_dir.name}: input {name} is {array.dtype} {list(array.shape)}")
            if not 0 < len(array) <= config["max_batch_size"] or fixed_batch not in (None, len(array)):
                raise ValueError(f"{model_dir.name}: batch {len(array)}")
        return dict(zip(output_names, session.run(output_names, inputs), strict=True))

    return run


# ---------------------------------------------------------------------------------------------------------------
# the BLS entry (ume_bls.py)


@pytest.fixture(scope="module")
def default_repository(int8_engines, tmp_path_factory):
    out = tmp_path_factory.mktemp("triton_models")
    assert triton_repo.main(["--engines", str(int8_engines), "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def pipeline(int8_engines):
    with Pipeline.load(int8_engines) as loaded:
        yield loaded


@pytest.fixture(scope="module")
def samples(avdigits_test):
    return {name: array[:6] for name, array in avdigits_test[0].items()}


@pytest.fixture(scope="module")
def bls_models(default_repository):
    names = [path.name for path in default_repository.iterdir() if path.name != "ume" and path.is_dir()]
    return {name: served(default_repository / name) for name in names}


@pytest.fixture
def bls(default_repository, bls_models, load_model):
    pb_utils = make_pb_utils(bls_models)
    return load_model(default_repository / "ume", pb_utils), pb_utils, triton_config(default_repository / "ume")


def _assert_equal(outputs: dict, expected) -> None:
    np.testing.assert_allclose(outputs[contract.LOGITS], expected.logits, atol=ATOL)
    np.testing.assert_allclose(outputs[contract.PROBS], expected.probs, atol=ATOL)
    np.testing.assert_array_equal(outputs[contract.LABEL].reshape(-1), expected.labels)


def _called(pb_utils) -> Counter:
    return Counter(call.model_name for call in pb_utils.bls_calls)


def test_bls_config_is_read_as_triton_hands_it(bls):
    model, _, config = bls
    assert config["input"][0]["dims"] == [1, 40, 48] and config["max_batch_size"] == 64  # numbers, not strings
    assert model.modalities == ["audio", "image"] and model.fixed_batch == {}


def test_bls_every_pattern_equals_the_pipeline(bls, pipeline, samples):
    """One ``execute`` call with a request per presence pattern (1 and 6 rows); an absent modality's encoder is
    never called and every call asks for CPU memory."""
    model, pb_utils, config = bls
    cases = [{name: samples[name][:rows] for name in pattern}
             for pattern in presence_patterns(pipeline.modality_names) for rows in (1, 6)]
    responses = execute(model, [request(pb_utils, arrays) for arrays in cases])
    for arrays, response in zip(cases, responses, strict=True):
        expected = pipeline.infer({name: arrays.get(name) for name in pipeline.modality_names})
        _assert_equal(answer(response, config, pb_utils), expected)
    rows = {name: sum(len(arrays[name]) for arrays in cases if name in arrays) for name in pipeline.modality_names}
    assert {call.model_name: len(next(iter(call.inputs.values()))) for call in pb_utils.bls_calls} == {
        "ume_audio": rows["audio"], "ume_image": rows["image"], "fusion": sum(map(len, map(_first, cases)))}
    assert all(call.preferred_memory._type == pb_utils.TRITONSERVER_MEMORY_CPU for call in pb_utils.bls_calls)


def _first(arrays: dict) -> np.ndarray:
    return next(iter(arrays.values()))


def test_bls_present_mask_equals_the_pipeline(bls, pipeline, samples):
    """Every modality sent with ``present``: rows marked absent may hold anything (NaN here) and are not computed."""
    model, pb_utils, config = bls
    mask = np.array([[True, True], [True, False], [False, True], [False, True], [True, True], [True, False]])
    arrays = {name: samples[name].copy() for name in pipeline.modality_names}
    for index, name in enumerate(pipeline.modality_names):
        arrays[name][~mask[:, index]] = np.nan
    (response,) = execute(model, [request(pb_utils, {**arrays, contract.PRESENT: mask})])
    present = {name: mask[:, index] for index, name in enumerate(pipeline.modality_names)}
    clean = {name: np.nan_to_num(array) for name, array in arrays.items()}
    _assert_equal(answer(response, config, pb_utils), pipeline.infer(clean, present=present))
    encoder_rows = {call.model_name: len(call.inputs[call.model_name.removeprefix("ume_")])
                    for call in pb_utils.bls_calls if call.model_name != "fusion"}
    assert encoder_rows == {"ume_audio": 4, "ume_image": 4}


def test_bls_an_absent_modality_is_never_called(bls, samples):
    model, pb_utils, config = bls
    mask = np.array([[False, True]] * 3)
    responses = execute(model, [request(pb_utils, {"image": samples["image"][:2]}),
                                request(pb_utils, {"audio": samples["audio"][:3], "image": samples["image"][:3],
                                                   contract.PRESENT: mask})])
    for response in responses:
        answer(response, config, pb_utils)
    assert _called(pb_utils) == {"ume_image": 1, "fusion": 1}


def test_bls_refusals_are_error_responses_with_the_contracts_text(bls, pipeline, samples):
    model, pb_utils, _ = bls
    nan = samples["image"][:2].copy()
    nan[1, 0, 3, 3] = np.nan
    bad = {
        "nan": {"image": nan},
        "shape": {"image": samples["image"][:2, :, :20]},
        "dtype": {"image": samples["image"][:2].astype(np.float64)},
        "batch_size": {"image": np.zeros((65, 1, 28, 28), np.float32)},
        "mask": {"image": samples["image"][:2], contract.PRESENT: np.ones((2, 2), bool)},
        "no_modality": {**{name: samples[name][:2] for name in pipeline.modality_names},
                        contract.PRESENT: np.array([[True, False], [False, False]])},
    }
    good = {"audio": samples["audio"][:2]}
    responses = execute(model, [request(pb_utils, arrays) for arrays in [*bad.values(), good]])
    for (reason, arrays), response in zip(bad.items(), responses, strict=False):
        with pytest.raises(contract.Refused) as refused:
            contract.check_request(arrays, pipeline.modalities, pipeline.max_batch)
        assert refused.value.reason == reason
        assert refusal(response) == (f"ume: {refused.value}", pb_utils.TritonError.INVALID_ARG)
    assert not responses[-1].has_error()
    assert _called(pb_utils) == {"ume_audio": 1, "fusion": 1}  # the refused requests reach no model


def test_bls_counts_requests_rows_and_refusals(bls, samples):
    model, pb_utils, config = bls
    nan = np.full((1, 1, 28, 28), np.nan, np.float32)
    execute(model, [request(pb_utils, {"image": samples["image"][:3]}),
                    request(pb_utils, {"audio": samples["audio"][:2], "image": samples["image"][:2]}),
                    request(pb_utils, {"image": nan})])
    execute(model, [request(pb_utils, {"image": samples["image"][:1]})])
    model.metrics.flush()
    values = {(name, labels): value for (name, labels), value in pb_utils.metric_values.items() if value}
    assert {key: value for key, value in values.items() if key[0] != contract.DURATION} == {
        (contract.REQUESTS, (("pattern", "image"),)): 2, (contract.ROWS, (("pattern", "image"),)): 4,
        (contract.REQUESTS, (("pattern", "audio+image"),)): 1, (contract.ROWS, (("pattern", "audio+image"),)): 2,
        (contract.REJECTED, (("reason", "nan"),)): 1,
        (contract.BATCHES, ()): 2, (contract.BATCH_ROWS, ()): 6,
    }
    assert {key for key in values if key[0] == contract.DURATION} == {
        (contract.DURATION, (("pattern", "image"),)), (contract.DURATION, (("pattern", "audio+image"),))}


def test_bls_a_failing_encoder_fails_only_its_culprit(default_repository, bls_models, load_model, samples):
    """The encoder refuses a row (a value no real sensor sends): the batch fails, each request runs alone, and only
    the culprit gets the error (reason ``failed``: Triton's default code)."""
    def picky_image(inputs):
        if (inputs["image"] == 7).any():
            raise RuntimeError("image encoder failed")
        return bls_models["ume_image"](inputs)

    pb_utils = make_pb_utils({**bls_models, "ume_image": picky_image})
    model = load_model(default_repository / "ume", pb_utils)
    culprit = np.full((1, 1, 28, 28), 7, np.float32)
    good, bad = execute(model, [request(pb_utils, {"image": samples["image"][:2]}),
                                request(pb_utils, {"image": culprit})])
    assert not good.has_error()
    message, code = refusal(bad)
    assert message.startswith("ume: inference failed: model 'ume_image' answered: RuntimeError: image encoder "
                              "failed") and code == pb_utils.TritonError.INTERNAL


# ---------------------------------------------------------------------------------------------------------------
# the DLA padding path of the BLS entry


@pytest.fixture(scope="module")
def dla_repository(tmp_path_factory):
    """A TensorRT export for DLA core 0 with --max-batch 8 and its repository, both by the real writers: the
    encoders' plans run batch 8 only, so the entry's ``encoder_fixed_batch`` says 8 for each."""
    from ume_edge.backends.tensorrt.options import TensorRTOptions
    from ume_edge.build import BuildOptions, build

    engines = tmp_path_factory.mktemp("dla") / "engines"
    build(BuildOptions(precision="int8", backend="tensorrt", export_only=True, max_batch=8, out=engines,
                       backend_options=TensorRTOptions(dla_core=0)))
    out = tmp_path_factory.mktemp("dla_models")
    assert triton_repo.main(["--engines", str(engines), "--out", str(out)]) == 0
    return out


@pytest.mark.slow  # the TensorRT export takes about 9 s
def test_bls_pads_a_fixed_batch_encoder_and_keeps_the_real_rows(dla_repository, load_model, samples):
    unpadded = {name: served(dla_repository / name, "source.onnx") for name in ("ume_audio", "ume_image", "fusion")}
    padded = {**unpadded, **{name: served(dla_repository / name, "source.onnx", fixed_batch=8)
                             for name in ("ume_audio", "ume_image")}}
    pb_utils = make_pb_utils(padded)
    model = load_model(dla_repository / "ume", pb_utils)
    config = triton_config(dla_repository / "ume")
    assert model.fixed_batch == {"audio": 8, "image": 8}
    arrays = {"image": samples["image"][:3]}
    (response,) = execute(model, [request(pb_utils, arrays)])
    outputs = answer(response, config, pb_utils)

    (image_call,) = [call for call in pb_utils.bls_calls if call.model_name == "ume_image"]
    assert image_call.inputs["image"].shape == (8, 1, 28, 28)
    np.testing.assert_array_equal(image_call.inputs["image"][:3], arrays["image"])
    assert not image_call.inputs["image"][3:].any()
    partial = unpadded["ume_image"](arrays)["partial_logits"]
    fused = unpadded["fusion"]({"partial_logits": np.stack([np.zeros_like(partial), partial], axis=1),
                                "present": np.tile(np.float32([0, 1]), (3, 1))})
    np.testing.assert_allclose(outputs[contract.LOGITS], fused[contract.LOGITS], atol=ATOL)
    np.testing.assert_allclose(outputs[contract.PROBS], fused[contract.PROBS], atol=ATOL)


# ---------------------------------------------------------------------------------------------------------------
# the pipeline entry (ume_pipeline.py) and the Python ONNX model (onnx_model.py)


@pytest.fixture(scope="module")
def python_repository(int8_engines, tmp_path_factory):
    out = tmp_path_factory.mktemp("python_models")
    assert triton_repo.main(["--engines", str(int8_engines), "--out", str(out), "--encoder-backend", "python",
                             "--threads", "1"]) == 0
    return out


def test_pipeline_entry_answers_and_refuses(int8_engines, tmp_path, load_model, pipeline, samples):
    assert triton_repo.main(["--engines", str(int8_engines), "--out", str(tmp_path), "--encoder-backend", "python",
                             "--entry", "pipeline", "--threads", "1"]) == 0
    pb_utils = make_pb_utils()
    model = load_model(tmp_path / "ume", pb_utils)
    nan = np.full((1, 1, 28, 28), np.nan, np.float32)
    good, bad = execute(model, [request(pb_utils, {"audio": samples["audio"][:4], "image": samples["image"][:4]}),
                                request(pb_utils, {"image": nan})])
    _assert_equal(answer(good, triton_config(tmp_path / "ume"), pb_utils),
                  pipeline.infer({"audio": samples["audio"][:4], "image": samples["image"][:4]}))
    with pytest.raises(contract.Refused) as refused:
        contract.check_request({"image": nan}, pipeline.modalities, pipeline.max_batch)
    assert refusal(bad) == (f"ume: {refused.value}", pb_utils.TritonError.INVALID_ARG)
    model.metrics.flush()
    assert pb_utils.metric_values[contract.REJECTED, (("reason", "nan"),)] == 1


def test_onnx_model_encoder_answers_and_refuses(python_repository, load_model, samples):
    pb_utils = make_pb_utils()
    model = load_model(python_repository / "ume_image", pb_utils)
    config = triton_config(python_repository / "ume_image")
    nan = samples["image"][:2].copy()
    nan[0, 0, 0, 0] = np.inf
    first, second, bad = execute(model, [request(pb_utils, {"image": samples["image"][:2]}, "ume_image"),
                                         request(pb_utils, {"image": samples["image"][2:5]}, "ume_image"),
                                         request(pb_utils, {"image": nan}, "ume_image")])
    session = ort.InferenceSession(str(python_repository / "ume_image" / "1" / "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    (expected,) = session.run(["partial_logits"], {"image": samples["image"][:5]})
    np.testing.assert_allclose(answer(first, config, pb_utils)["partial_logits"], expected[:2], atol=ATOL)
    np.testing.assert_allclose(answer(second, config, pb_utils)["partial_logits"], expected[2:5], atol=ATOL)
    spec = contract.ModalitySpec("image", (1, 28, 28), np.dtype(np.float32))
    with pytest.raises(contract.Refused) as refused:
        contract.check_values(spec, nan)
    assert refusal(bad) == (f"ume_image: {refused.value}", pb_utils.TritonError.INVALID_ARG)


def test_onnx_model_fusion_refuses_a_bad_present_row(python_repository, load_model):
    pb_utils = make_pb_utils()
    model = load_model(python_repository / "fusion", pb_utils)
    partial = np.zeros((2, 2, 10), np.float32)
    good, bad = execute(model, [
        request(pb_utils, {"partial_logits": partial, "present": np.float32([[1, 0], [1, 1]])}, "fusion",
                [contract.LOGITS, contract.PROBS]),
        request(pb_utils, {"partial_logits": partial, "present": np.float32([[1, 0], [0.5, 1]])}, "fusion",
                [contract.LOGITS, contract.PROBS])])
    answer(good, triton_config(python_repository / "fusion"), pb_utils)
    message, code = refusal(bad)
    assert message == ("fusion: input 'present': rows [1] hold values other than 0 and 1; mark each modality 1 "
                       "(present) or 0 (absent)") and code == pb_utils.TritonError.INVALID_ARG
