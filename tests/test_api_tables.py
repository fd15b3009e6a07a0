"""What the real TensorRT and cuda-python APIs are, as ume-edge relies on it (read from the committed tables in
tests/api_tables/, made from the real binding wheels), and whether the fakes in tests/trt_fakes.py match them."""

from __future__ import annotations

import enum
import re
import types
from pathlib import Path

import numpy as np
import pytest
from api_conformance import (  # tests/api_conformance.py; pytest puts tests/ on sys.path
    check_object,
    known_names,
    load_cuda,
    load_tensorrt,
)
from fake_trtexec import H100, PlanHeader, serialize_plan  # tests/fake_trtexec.py
from trt_fakes import CUDA_TEST_ONLY, TENSORRT_TEST_ONLY, FakeCuda, FakeTensorRT  # tests/trt_fakes.py

TENSORRT_VERSIONS = ("10.3", "10.16", "11.4")
TENSORRT_10 = ("10.3", "10.16")
CUDA_VERSIONS = ("12.9", "13")
PACKAGE = Path(__file__).resolve().parent.parent / "ume_edge"


def trt_enum(version: str, name: str) -> dict[str, int]:
    return load_tensorrt(version)["enums"][name]


def members(version: str, class_name: str) -> dict[str, dict]:
    return load_tensorrt(version)["classes"][class_name]["members"]


def parameter_names(member: dict) -> list[list[str]]:
    return [[p["name"] for p in overload["parameters"]] for overload in member["overloads"]]


# ---------------------------------------------------------------- the tables themselves

@pytest.mark.parametrize("version", TENSORRT_VERSIONS)
def test_each_tensorrt_table_is_the_version_its_name_says_and_names_its_wheel(version):
    table = load_tensorrt(version)
    assert table["version"].startswith(f"{version}.")
    assert [w["file"].split("-")[:2] for w in table["wheels"]] == [["tensorrt_cu12_bindings", table["version"]]]


@pytest.mark.parametrize("version", CUDA_VERSIONS)
def test_each_cuda_table_is_the_version_its_name_says_and_names_its_wheels(version):
    table = load_cuda(version)
    assert table["version"].startswith(f"{version}.") and table["module"] == "cuda.bindings.runtime"
    assert f"cuda_bindings-{table['version']}-" in " ".join(w["file"] for w in table["wheels"])


def test_load_tensorrt_takes_a_full_version_string():
    assert load_tensorrt("10.16.1.11") is load_tensorrt("10.16")
    assert load_cuda("13.5.0") is load_cuda("13")


# ---------------------------------------------------------------- TensorRT facts

@pytest.mark.parametrize("version, bit", [("10.3", 1), ("10.16", 1), ("11.4", 0)])
def test_strongly_typed_is_bit_1_in_tensorrt_10_and_bit_0_in_11(version, bit):
    assert trt_enum(version, "NetworkDefinitionCreationFlag")["STRONGLY_TYPED"] == bit


def test_tensorrt_11_dropped_explicit_batch_which_10_kept_as_bit_0():
    flags = [trt_enum(v, "NetworkDefinitionCreationFlag") for v in TENSORRT_VERSIONS]
    assert [f.get("EXPLICIT_BATCH") for f in flags] == [0, 0, None]


def test_tensorrt_11_has_no_weak_typing_precision_flags():
    precision_flags = {"FP16", "INT8", "BF16", "FP8", "INT4", "FP4"}
    assert precision_flags & set(trt_enum("11.4", "BuilderFlag")) == set()
    assert {"FP16", "INT8", "BF16", "FP8", "INT4"} <= set(trt_enum("10.3", "BuilderFlag"))
    assert precision_flags <= set(trt_enum("10.16", "BuilderFlag"))
    assert {flag: trt_enum("10.16", "BuilderFlag")[flag] for flag in ("FP16", "INT8")} == {"FP16": 0, "INT8": 1}


def test_tensorrt_11_also_dropped_the_precision_constraint_flags_trtexec_10_sets_for_dla():
    for flag in ("OBEY_PRECISION_CONSTRAINTS", "PREFER_PRECISION_CONSTRAINTS"):
        assert [flag in trt_enum(v, "BuilderFlag") for v in TENSORRT_VERSIONS] == [True, True, False]


@pytest.mark.parametrize("version, expected", [("10.3", 13), ("10.16", 13), ("11.4", 12)])
def test_builder_flag_version_compatible_is_renumbered_in_tensorrt_11(version, expected):
    assert trt_enum(version, "BuilderFlag")["VERSION_COMPATIBLE"] == expected
    assert trt_enum(version, "BuilderFlag")["GPU_FALLBACK"] == 3


@pytest.mark.parametrize("version", TENSORRT_VERSIONS)
def test_the_enums_the_builder_uses_keep_their_values(version):
    assert trt_enum(version, "MemoryPoolType")["WORKSPACE"] == 0
    assert trt_enum(version, "DeviceType") == {"GPU": 0, "DLA": 1}
    levels = trt_enum(version, "HardwareCompatibilityLevel")
    assert (levels["NONE"], levels["AMPERE_PLUS"]) == (0, 1)
    assert trt_enum(version, "TensorIOMode") == {"NONE": 0, "INPUT": 1, "OUTPUT": 2}
    assert trt_enum(version, "Logger.Severity")["WARNING"] == members(version, "Logger")["WARNING"]["value"] == 2


def test_same_compute_capability_hardware_compatibility_is_newer_than_jetpack_6():
    assert ["SAME_COMPUTE_CAPABILITY" in trt_enum(v, "HardwareCompatibilityLevel") for v in TENSORRT_VERSIONS] \
        == [False, True, True]


@pytest.mark.parametrize("version", TENSORRT_VERSIONS)
@pytest.mark.parametrize("attribute", ["engine_host_code_allowed", "DLA_core"])
def test_runtime_has_writable_engine_host_code_allowed_and_dla_core(version, attribute):
    member = members(version, "Runtime")[attribute]
    assert member["kind"] == "property" and member["writable"] is True


@pytest.mark.parametrize("version", TENSORRT_VERSIONS)
def test_builder_config_timing_cache_and_device_settings(version):
    config = members(version, "IBuilderConfig")
    assert parameter_names(config["set_timing_cache"]) == [["cache", "ignore_mismatch"]]
    assert parameter_names(config["create_timing_cache"]) == [["serialized_timing_cache"]]
    assert parameter_names(config["get_timing_cache"]) == [[]]
    assert parameter_names(config["set_memory_pool_limit"]) == [["pool", "pool_size"]]
    for setting in ("default_device_type", "DLA_core", "hardware_compatibility_level", "flags"):
        assert config[setting]["kind"] == "property" and config[setting]["writable"], setting


def test_tensorrt_11_dropped_the_int8_calibration_api():
    for version, present in (("10.3", True), ("10.16", True), ("11.4", False)):
        builder, config = members(version, "Builder"), members(version, "IBuilderConfig")
        for name in ("platform_has_fast_int8", "platform_has_fast_fp16"):
            assert (name in builder) is present, (version, name)
        assert ("int8_calibrator" in config) is present, version


@pytest.mark.parametrize("version", TENSORRT_VERSIONS)
def test_execute_async_v3_takes_the_stream_handle(version):
    assert parameter_names(members(version, "IExecutionContext")["execute_async_v3"]) == [["stream_handle"]]


@pytest.mark.parametrize("version", TENSORRT_VERSIONS)
def test_the_build_and_run_calls_the_backend_makes(version):
    assert parameter_names(members(version, "Logger")["__init__"]) == [["min_severity"]]
    assert parameter_names(members(version, "Builder")["__init__"]) == [["logger"]]
    assert parameter_names(members(version, "Runtime")["__init__"]) == [["logger"]]
    assert parameter_names(members(version, "OnnxParser")["__init__"]) == [["network", "logger"]]
    assert parameter_names(members(version, "Builder")["create_network"]) == [["flags"]]
    assert parameter_names(members(version, "IOptimizationProfile")["set_shape"]) == [["input", "min", "opt", "max"]]
    assert ["serialized_engine"] in parameter_names(members(version, "Runtime")["deserialize_cuda_engine"])
    engine = members(version, "ICudaEngine")
    assert engine["num_io_tensors"] == {"kind": "property", "type": "int", "writable": False}
    assert parameter_names(engine["get_tensor_profile_shape"]) == [["name", "profile_index"]]
    context = members(version, "IExecutionContext")
    assert parameter_names(context["set_tensor_address"]) == [["name", "memory"]]
    set_input_shape = parameter_names(context["set_input_shape"])  # one overload each for tuple, list and Dims
    assert {tuple(names) for names in set_input_shape} == {("name", "shape")}
    assert members(version, "OnnxParser")["num_errors"]["writable"] is False


def test_tensorrt_10_16_added_calls_that_jetpack_6_lacks():
    assert parameter_names(members("10.3", "ICudaEngine")["create_execution_context"]) == [["strategy"]]
    assert parameter_names(members("10.16", "ICudaEngine")["create_execution_context"]) \
        == [["strategy"], ["runtime_config"]]
    assert "build_serialized_network_to_stream" not in members("10.3", "Builder")
    assert "tiling_optimization_level" not in members("10.3", "IBuilderConfig")


def test_tensorrt_11_makes_tensor_dtype_read_only():
    assert [members(v, "ITensor")["dtype"]["writable"] for v in TENSORRT_VERSIONS] == [True, True, False]


# ---------------------------------------------------------------- cuda-python facts

@pytest.mark.parametrize("version", CUDA_VERSIONS)
def test_cuda_enums_and_constants_the_backend_uses(version):
    table = load_cuda(version)
    assert table["enums"]["cudaError_t"]["cudaSuccess"] == 0
    assert table["enums"]["cudaMemcpyKind"] == {"cudaMemcpyHostToHost": 0, "cudaMemcpyHostToDevice": 1,
                                                "cudaMemcpyDeviceToHost": 2, "cudaMemcpyDeviceToDevice": 3,
                                                "cudaMemcpyDefault": 4}
    assert table["enums"]["cudaStreamCaptureMode"]["cudaStreamCaptureModeGlobal"] == 0
    assert table["enums"]["cudaStreamCaptureStatus"]["cudaStreamCaptureStatusActive"] == 1
    assert table["enums"]["cudaGraphInstantiateFlags"]["cudaGraphInstantiateFlagUpload"] == 2
    assert table["attributes"]["cudaEventDisableTiming"]["value"] == 2
    assert table["attributes"]["cudaStreamNonBlocking"]["value"] == 1
    assert {"name", "major", "minor"} <= set(table["classes"]["cudaDeviceProp"]["members"])


@pytest.mark.parametrize("version", CUDA_VERSIONS)
def test_cuda_calls_return_the_error_then_their_values(version):
    functions = load_cuda(version)["functions"]
    counts = {name: functions[name]["return_count"] for name in (
        "cudaGetDeviceCount", "cudaMalloc", "cudaStreamCreate", "cudaEventCreateWithFlags", "cudaStreamEndCapture",
        "cudaGraphInstantiate", "cudaFree", "cudaMemcpyAsync", "cudaGraphLaunch", "cudaStreamSynchronize")}
    assert counts == {"cudaGetDeviceCount": 2, "cudaMalloc": 2, "cudaStreamCreate": 2, "cudaEventCreateWithFlags": 2,
                      "cudaStreamEndCapture": 2, "cudaGraphInstantiate": 2, "cudaFree": 1, "cudaMemcpyAsync": 1,
                      "cudaGraphLaunch": 1, "cudaStreamSynchronize": 1}
    assert functions["cudaMalloc"]["returns"][0]["type"] == "cudaError_t"
    assert parameter_names(functions["cudaMemcpy2DAsync"]) == [["dst", "dpitch", "src", "spitch", "width", "height",
                                                                "kind", "stream"]]


@pytest.mark.parametrize("version", CUDA_VERSIONS)
def test_every_cuda_name_ume_edge_mentions_exists(version):
    mentioned = set(re.findall(r"\bcuda[A-Z]\w*", "".join(p.read_text() for p in PACKAGE.rglob("*.py"))))
    assert mentioned, "found no cuda-python names in ume_edge"
    assert mentioned - known_names(load_cuda(version)) == set()


# ---------------------------------------------------------------- the fakes against the tables

def fake_tensorrt_objects(version: str) -> dict[str, object]:
    """The fake module of TensorRT ``version`` and every kind of object it hands out, by the real class name."""
    trt = FakeTensorRT(FakeCuda(), version)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    config = builder.create_builder_config()
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    plan = serialize_plan(PlanHeader(trt.__version__, H100.gpu_name, "9.0", True, [], {"x": [[1, 3], [4, 3], [8, 3]]}),
                          LINEAR_ONNX.SerializeToString())
    engine = trt.Runtime(logger).deserialize_cuda_engine(plan)
    return {"tensorrt": trt, "Logger": logger, "Builder": builder, "IBuilderConfig": config,
            "INetworkDefinition": network, "IOptimizationProfile": builder.create_optimization_profile(),
            "ITimingCache": config.create_timing_cache(b""), "OnnxParser": parser, "Runtime": trt.Runtime(logger),
            "ICudaEngine": engine, "IExecutionContext": engine.create_execution_context()}


def linear_onnx():
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.ones((3, 2), np.float32), "weight")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "weight"], ["y"])], "linear",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 2])], [weight])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


LINEAR_ONNX = linear_onnx()
TENSORRT_CLASSES = ["tensorrt", "Logger", "Builder", "IBuilderConfig", "INetworkDefinition", "IOptimizationProfile",
                    "ITimingCache", "OnnxParser", "Runtime", "ICudaEngine", "IExecutionContext"]


@pytest.mark.parametrize("version", TENSORRT_VERSIONS)
@pytest.mark.parametrize("class_name", TENSORRT_CLASSES)
def test_fake_tensorrt_conforms_to_each_tensorrt_it_claims_to_be(version, class_name):
    fake = fake_tensorrt_objects(version)[class_name]
    test_only = TENSORRT_TEST_ONLY if class_name == "tensorrt" else ()
    assert check_object(fake, load_tensorrt(version), None if class_name == "tensorrt" else class_name,
                        test_only) == []


@pytest.mark.parametrize("version", TENSORRT_VERSIONS)
def test_the_fake_claims_the_release_of_its_table(version):
    assert FakeTensorRT(FakeCuda(), version).__version__ == load_tensorrt(version)["version"]


def test_the_fake_tensorrt_11_has_no_precision_flags_and_ignores_strong_typing():
    trt = FakeTensorRT(FakeCuda(), "11.4")
    assert not hasattr(trt.BuilderFlag, "FP16") and not hasattr(trt.BuilderFlag, "INT8")
    assert trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED == 0 and trt.BuilderFlag.VERSION_COMPATIBLE == 12
    assert trt.Builder(trt.Logger()).create_network(0)._strongly_typed


@pytest.mark.parametrize("version", TENSORRT_10)
def test_the_fake_tensorrt_10_refuses_precision_flags_on_a_strongly_typed_network(version, tmp_path):
    import onnx

    trt = FakeTensorRT(FakeCuda(), version)
    logger = trt.Logger(trt.Logger.INTERNAL_ERROR)
    builder = trt.Builder(logger)
    onnx.save(LINEAR_ONNX, tmp_path / "x.onnx")
    plans = []
    for network_flags, precision in ((1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED), True), (0, True),
                                     (1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED), False)):
        network = builder.create_network(network_flags)
        assert trt.OnnxParser(network, logger).parse_from_file(str(tmp_path / "x.onnx"))
        config = builder.create_builder_config()
        if precision:
            config.set_flag(trt.BuilderFlag.FP16)
        profile = builder.create_optimization_profile()
        profile.set_shape("x", (1, 3), (2, 3), (4, 3))
        config.add_optimization_profile(profile)
        plans.append(builder.build_serialized_network(network, config))
    assert [plan is not None for plan in plans] == [False, True, True]


@pytest.mark.parametrize("version", CUDA_VERSIONS)
def test_fake_cuda_conforms_to_cuda_python(version):
    assert check_object(FakeCuda(version), load_cuda(version), test_only=CUDA_TEST_ONLY) == []


@pytest.mark.parametrize("version", CUDA_VERSIONS)
def test_fake_cuda_enums_are_the_real_ones(version):
    cuda, table = FakeCuda(version), load_cuda(version)
    for name in ("cudaError_t", "cudaMemcpyKind", "cudaStreamCaptureMode", "cudaStreamCaptureStatus"):
        assert {m.name: m.value for m in getattr(cuda, name).__members__.values()} == table["enums"][name]
    assert cuda.cudaStreamCaptureMode.cudaStreamCaptureModeGlobal == 0


@pytest.mark.parametrize("version", CUDA_VERSIONS)
def test_fake_cuda_device_properties_conform(version):
    _, properties = FakeCuda(version).cudaGetDeviceProperties(0)
    assert check_object(properties, load_cuda(version), "cudaDeviceProp") == []


class ResultLengths:
    """A FakeCuda whose cuda* calls record how many values they returned."""

    def __init__(self, fake: FakeCuda):
        self.fake, self.lengths = fake, {}

    def __getattr__(self, name):
        attribute = getattr(self.fake, name)
        if not name.startswith("cuda") or isinstance(attribute, type) or not callable(attribute):
            return attribute

        def call(*args):
            result = attribute(*args)
            self.lengths[name] = len(result)
            return result

        return call


def run_every_fake_cuda_call(cuda) -> None:
    cuda.cudaGetDeviceCount()
    cuda.cudaGetDeviceProperties(0)
    cuda.cudaSetDevice(0)
    _, stream = cuda.cudaStreamCreate()
    _, other = cuda.cudaStreamCreate()
    _, pointer = cuda.cudaMalloc(64)
    host = np.zeros(16, np.float32)
    kinds = cuda.cudaMemcpyKind
    cuda.cudaMemcpyAsync(pointer, host.ctypes.data, 64, kinds.cudaMemcpyHostToDevice, stream)
    cuda.cudaMemcpy2DAsync(host.ctypes.data, 16, pointer, 16, 16, 4, kinds.cudaMemcpyDeviceToHost, stream)
    _, event = cuda.cudaEventCreateWithFlags(cuda.cudaEventDisableTiming)
    cuda.cudaEventRecord(event, stream)
    cuda.cudaStreamWaitEvent(other, event, 0)
    cuda.cudaStreamBeginCapture(stream, cuda.cudaStreamCaptureMode.cudaStreamCaptureModeGlobal)
    _, graph = cuda.cudaStreamEndCapture(stream)
    _, executable = cuda.cudaGraphInstantiate(graph, 0)
    cuda.cudaGraphDestroy(graph)
    cuda.cudaGraphLaunch(executable, stream)
    cuda.cudaStreamSynchronize(stream)
    cuda.cudaGraphExecDestroy(executable)
    cuda.cudaEventDestroy(event)
    cuda.cudaFree(pointer)
    cuda.cudaStreamDestroy(other)
    cuda.cudaStreamDestroy(stream)


@pytest.mark.parametrize("version", CUDA_VERSIONS)
def test_fake_cuda_calls_return_as_many_values_as_cuda_python(version):
    fake = FakeCuda(version)
    cuda = ResultLengths(fake)
    run_every_fake_cuda_call(cuda)
    defined = {name for name in dir(FakeCuda) if name.startswith("cuda") and callable(getattr(FakeCuda, name))}
    assert set(cuda.lengths) == defined, "run_every_fake_cuda_call misses some of the fake's calls"
    functions = load_cuda(version)["functions"]
    assert cuda.lengths == {name: functions[name]["return_count"] for name in cuda.lengths}
    assert set(fake.alive().values()) == {0}


def test_failing_fake_cuda_calls_return_as_many_values_too():
    cuda = FakeCuda()
    _, stream = cuda.cudaStreamCreate()
    assert cuda.cudaStreamEndCapture(stream) == (cuda.cudaError_t.cudaErrorIllegalState, None)
    cuda.allocations_left = 0
    assert cuda.cudaMalloc(4) == (cuda.cudaError_t.cudaErrorMemoryAllocation, 0)
    assert FakeCuda(device_count=0).cudaGetDeviceCount() == (cuda.cudaError_t.cudaErrorNoDevice, 0)


# ---------------------------------------------------------------- the checker itself

def test_the_checker_accepts_a_fake_that_matches_the_real_api():
    class Runtime:
        engine_host_code_allowed = False  # a writable property in the real API: a plain attribute will do

        def __init__(self, logger):
            self._logger = logger

        def deserialize_cuda_engine(self, serialized_engine):
            return None

    class Engine:
        def create_execution_context(self):  # the real one's parameter has a default
            return None

    table = load_tensorrt("10.16")
    assert check_object(Runtime, table, "Runtime") == []
    assert check_object(Engine, table, "ICudaEngine") == []


def test_the_checker_reports_each_kind_of_mismatch():
    class Engine:
        num_io_tensors = 2

        def get_tensor_name(self, i):
            return "x"

        def num_layers(self):
            return 1

        def recorded(self):
            return []

        def invented(self):
            return None

    assert check_object(Engine(), load_tensorrt("10.16"), "ICudaEngine", test_only={"recorded"}) == [
        "Engine.num_io_tensors: read-only in the real API, a plain attribute code can assign in the fake",
        "Engine.get_tensor_name(i): tensorrt 10.16.1.11 takes (index)",
        "Engine.num_layers: a property in the real API, a method in the fake",
        "Engine.invented: tensorrt 10.16.1.11 has no ICudaEngine.invented",
    ]


def test_the_checker_compares_enum_members_by_value():
    fake = types.SimpleNamespace(DeviceType=enum.IntEnum("DeviceType", {"GPU": 0, "DLA": 2, "TPU": 3}))
    assert check_object(fake, load_tensorrt("11.4")) == [
        "fake module.DeviceType.DLA is 2; the real value is 1",
        "fake module.DeviceType.TPU: the real enum has no such member (it has ['DLA', 'GPU'])",
    ]
