"""The TensorRT backend. Most of it is checked here without TensorRT: configs, builder settings, trtexec lines,
plan compatibility, and the build/run glue against small fakes of the documented TensorRT and cuda-python API.
The tests marked ``tensorrt`` and ``gpu`` build and run real plans, and skip on machines without both."""

import importlib.util
import subprocess
import sys
import types
import warnings

import numpy as np
import pytest

from ume_edge.backends import tensorrt as tensorrt_backend
from ume_edge.backends.tensorrt import (BuildConfig, TensorRTEngine, build_engine, builder_settings,
                                        check_plan_compatible, profile_shapes, trtexec_command)
from ume_edge.errors import BackendUnavailable, BuildError, EngineMismatch, InputError
from trt_fakes import FakeCuda, FakeTensorRT, WEIGHTS, needs_tensorrt_and_gpu  # tests/trt_fakes.py; pytest puts tests/ on sys.path

GIB = 1 << 30
TENSORRT_INSTALLED = importlib.util.find_spec("tensorrt") is not None


# ---------------------------------------------------------------- availability


def test_importing_the_backend_imports_neither_tensorrt_nor_cuda():
    code = "import sys, ume_edge.backends.tensorrt; print(sorted({'tensorrt', 'cuda'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


@pytest.mark.skipif(TENSORRT_INSTALLED, reason="TensorRT is installed here")
def test_without_tensorrt_the_backend_says_how_to_get_it():
    reason = tensorrt_backend.unavailable_reason()
    assert not tensorrt_backend.is_available()
    assert tensorrt_backend.get_version() is None
    assert "\n" not in reason
    assert "pip install 'ume-edge[tensorrt]'" in reason and "--export-only" in reason
    with pytest.raises(BackendUnavailable, match="--export-only"):
        tensorrt_backend.require()


def test_without_a_gpu_the_reason_names_the_cuda_error(monkeypatch):
    fake = FakeCuda(device_count=0)
    monkeypatch.setattr(tensorrt_backend, "_tensorrt", lambda: types.SimpleNamespace(__version__="10.16.1.11"))
    monkeypatch.setattr(tensorrt_backend, "_cudart", lambda: fake)
    assert tensorrt_backend.unavailable_reason() == (
        "no CUDA GPU is visible (cudaErrorNoDevice): run on a machine with an NVIDIA GPU and driver, "
        "or build with --export-only to write TensorRT-ready ONNX and build the plan on the target")
    with pytest.raises(BackendUnavailable, match="cudaErrorNoDevice"):
        tensorrt_backend.require()


def test_with_tensorrt_and_a_gpu_the_backend_is_available(monkeypatch):
    monkeypatch.setattr(tensorrt_backend, "_tensorrt", lambda: types.SimpleNamespace(__version__="10.16.1.11"))
    monkeypatch.setattr(tensorrt_backend, "_cudart", lambda: FakeCuda())
    assert tensorrt_backend.is_available()
    assert tensorrt_backend.get_version() == "10.16.1.11"
    tensorrt_backend.require()


def test_device_info_reads_cuda_device_properties(monkeypatch):
    monkeypatch.setattr(tensorrt_backend, "_tensorrt", lambda: types.SimpleNamespace(__version__="10.3.0.30"))
    monkeypatch.setattr(tensorrt_backend, "_cudart", lambda: FakeCuda(gpu_name=b"Orin\0\0\0", capability=(8, 7)))
    assert tensorrt_backend.device_info(dla_core=1) == {
        "kind": "gpu", "gpu_name": "Orin", "compute_capability": "8.7", "tensorrt": "10.3.0.30", "dla_core": 1}


# ---------------------------------------------------------------- build configuration


@pytest.mark.parametrize(("max_batch", "opt_batch"), [(1, 1), (2, 1), (3, 1), (8, 4), (64, 32), (100, 32)])
def test_default_opt_batch_is_half_the_max_rounded_down_to_a_power_of_two(max_batch, opt_batch):
    assert BuildConfig(max_batch=max_batch).opt_batch == opt_batch


def test_profile_shapes_span_batch_one_to_max():
    config = BuildConfig(max_batch=64)
    assert profile_shapes((1, 40, 48), config) == ((1, 1, 40, 48), (32, 1, 40, 48), (64, 1, 40, 48))


def test_dla_profile_is_fixed_at_max_batch():
    config = BuildConfig(precision="fp16", max_batch=16, dla_core=0)
    assert profile_shapes((1, 28, 28), config) == ((16, 1, 28, 28),) * 3


@pytest.mark.parametrize(("config", "problem"), [
    (BuildConfig(max_batch=0), "max_batch is 0; it must be at least 1"),
    (BuildConfig(max_batch=8, opt_batch=16), "opt_batch 16 is outside 1..max_batch (8)"),
    (BuildConfig(precision="bf16"), "precision 'bf16' is not one of fp32, fp16, int8"),
    (BuildConfig(workspace_mb=0), "workspace_mb is 0; it must be at least 1"),
    (BuildConfig(precision="fp32", dla_core=0), "DLA runs only fp16 and int8, not fp32"),
    (BuildConfig(precision="int8", dla_core=0, hardware_compatible=True),
     "hardware compatibility (Ampere+) is for discrete GPUs; JetPack and DLA do not support it"),
    (BuildConfig(precision="fp16", dla_core=0, max_batch=8192), "max_batch 8192 exceeds the DLA limit of 4096"),
    (BuildConfig(precision="fp16", dla_core=-1), "dla_core is -1; DLA cores are numbered from 0"),
])
def test_validate_refuses_impossible_configs(config, problem):
    with pytest.raises(BuildError) as raised:
        config.validate()
    assert str(raised.value) == f"impossible TensorRT build config: {problem}"


def test_validate_lists_every_problem_at_once():
    with pytest.raises(BuildError, match="fp32; hardware compatibility"):
        BuildConfig(precision="fp32", dla_core=0, hardware_compatible=True).validate()


# ---------------------------------------------------------------- builder settings


def test_tensorrt_10_fp32_defaults():
    assert builder_settings(BuildConfig(), 10) == {
        "tensorrt_major": 10,
        "network_flags": ["STRONGLY_TYPED"],
        "builder_flags": [],
        "memory_pool_limits": {"WORKSPACE": GIB},
        "profile_batch": {"min": 1, "opt": 32, "max": 64},
        "timing_cache": None,
        "default_device_type": "GPU",
        "DLA_core": None,
        "hardware_compatibility_level": "NONE",
    }


def test_tensorrt_10_int8_on_dla_with_gpu_fallback(tmp_path):
    config = BuildConfig(precision="int8", max_batch=8, workspace_mb=256, dla_core=1,
                         timing_cache=tmp_path / "orin.cache")
    assert builder_settings(config, 10) == {
        "tensorrt_major": 10,
        "network_flags": ["STRONGLY_TYPED"],
        "builder_flags": ["GPU_FALLBACK"],
        "memory_pool_limits": {"WORKSPACE": 256 << 20},
        "profile_batch": {"min": 8, "opt": 8, "max": 8},
        "timing_cache": str(tmp_path / "orin.cache"),
        "default_device_type": "DLA",
        "DLA_core": 1,
        "hardware_compatibility_level": "NONE",
    }


@pytest.mark.parametrize(("precision", "flags"), [("fp32", []), ("fp16", ["FP16"]), ("int8", ["INT8"])])
def test_tensorrt_10_weak_typing_uses_precision_flags(precision, flags):
    settings = builder_settings(BuildConfig(precision=precision, strongly_typed=False), 10)
    assert settings["network_flags"] == []
    assert settings["builder_flags"] == flags


def test_tensorrt_11_is_strongly_typed_with_compatibility_options():
    config = BuildConfig(precision="fp16", max_batch=128, hardware_compatible=True, version_compatible=True)
    assert builder_settings(config, 11) == {
        "tensorrt_major": 11,
        "network_flags": ["STRONGLY_TYPED"],
        "builder_flags": ["VERSION_COMPATIBLE"],
        "memory_pool_limits": {"WORKSPACE": GIB},
        "profile_batch": {"min": 1, "opt": 64, "max": 128},
        "timing_cache": None,
        "default_device_type": "GPU",
        "DLA_core": None,
        "hardware_compatibility_level": "AMPERE_PLUS",
    }


def test_tensorrt_11_dla_has_no_precision_flags():
    settings = builder_settings(BuildConfig(precision="fp16", max_batch=4, dla_core=0), 11)
    assert settings["builder_flags"] == ["GPU_FALLBACK"]
    assert settings["network_flags"] == ["STRONGLY_TYPED"]


def test_tensorrt_11_refuses_weak_typing():
    with pytest.raises(BuildError, match="TensorRT 11 removed the FP16/INT8 builder flags"):
        builder_settings(BuildConfig(precision="fp16", strongly_typed=False), 11)


def test_tensorrt_9_is_too_old():
    with pytest.raises(BuildError, match="TensorRT 9.x is too old"):
        builder_settings(BuildConfig(), 9)


def test_builder_settings_validates_the_config():
    with pytest.raises(BuildError, match="max_batch is 0"):
        builder_settings(BuildConfig(max_batch=0), 10)


# ---------------------------------------------------------------- trtexec


def test_trtexec_tensorrt_10_strongly_typed():
    command = trtexec_command("enc/audio.onnx", "enc/audio.plan", {"audio": (1, 40, 48)},
                              BuildConfig(precision="int8", max_batch=64, timing_cache="cache/h100.cache"))
    assert command == ("trtexec --onnx=enc/audio.onnx --saveEngine=enc/audio.plan "
                       "--minShapes=audio:1x1x40x48 --optShapes=audio:32x1x40x48 --maxShapes=audio:64x1x40x48 "
                       "--memPoolSize=workspace:1024M --timingCacheFile=cache/h100.cache --stronglyTyped")


def test_trtexec_tensorrt_10_weak_fp16_on_dla():
    command = trtexec_command("image.onnx", "image.plan", {"image": (1, 28, 28)},
                              BuildConfig(precision="fp16", max_batch=16, dla_core=0, strongly_typed=False))
    flags = command.split()
    assert flags[3:6] == ["--minShapes=image:16x1x28x28", "--optShapes=image:16x1x28x28",
                          "--maxShapes=image:16x1x28x28"]
    assert flags[6:] == ["--memPoolSize=workspace:1024M", "--useDLACore=0", "--fp16", "--allowGPUFallback"]
    assert "--stronglyTyped" not in flags


def test_trtexec_tensorrt_11_has_no_precision_or_typing_flags():
    config = BuildConfig(precision="int8", max_batch=8, workspace_mb=512, hardware_compatible=True,
                         version_compatible=True)
    flags = trtexec_command("a.onnx", "a.plan", {"x": (3,)}, config, trt_major=11).split()
    assert flags[-3:] == ["--memPoolSize=workspace:512M", "--hardwareCompatibilityLevel=ampere+",
                          "--versionCompatible"]
    assert not {"--fp16", "--int8", "--stronglyTyped"} & set(flags)


def test_trtexec_quotes_paths_for_the_shell():
    command = trtexec_command("my models/a.onnx", "a.plan", {"x": (3,)}, BuildConfig(max_batch=2))
    assert command.startswith("trtexec '--onnx=my models/a.onnx' --saveEngine=a.plan ")


# ---------------------------------------------------------------- plan compatibility

H100 = {"kind": "gpu", "gpu_name": "NVIDIA H100", "compute_capability": "9.0", "tensorrt": "10.16.1.11"}
L4 = {"kind": "gpu", "gpu_name": "NVIDIA L4", "compute_capability": "8.9", "tensorrt": "10.16.1.11"}


def test_identical_machines_are_compatible():
    check_plan_compatible(H100, dict(H100))


def test_a_different_tensorrt_version_is_refused():
    with pytest.raises(EngineMismatch) as raised:
        check_plan_compatible(H100, {**H100, "tensorrt": "10.3.0.30"})
    assert str(raised.value) == (
        "the TensorRT plan does not fit this machine: it was built with TensorRT 10.16.1.11 and this machine has "
        "TensorRT 10.3.0.30; rebuild on the target: python -m ume_edge.build --backend tensorrt ...")


def test_a_different_compute_capability_is_refused():
    with pytest.raises(EngineMismatch) as raised:
        check_plan_compatible(H100, L4)
    message = str(raised.value)
    assert ("it was built for compute capability 9.0 (NVIDIA H100) and this GPU (NVIDIA L4) has compute "
            "capability 8.9") in message
    assert "python -m ume_edge.build --backend tensorrt" in message


def test_both_mismatches_are_reported_together():
    with pytest.raises(EngineMismatch, match="TensorRT 10.3.0.30; it was built for compute capability 9.0"):
        check_plan_compatible(H100, {**L4, "tensorrt": "10.3.0.30"})


def test_version_compatible_plans_run_on_newer_tensorrt_only():
    recorded = {**H100, "tensorrt": "10.3.0.30", "version_compatible": True}
    check_plan_compatible(recorded, H100)
    check_plan_compatible(recorded, {**H100, "tensorrt": "11.4.1.2"})
    with pytest.raises(EngineMismatch, match=r"needs the same or a newer TensorRT"):
        check_plan_compatible({**H100, "version_compatible": True}, {**H100, "tensorrt": "10.3.0.30"})


def test_hardware_compatible_plans_run_on_ampere_and_newer_only():
    recorded = {**H100, "hardware_compatible": True}
    check_plan_compatible(recorded, L4)
    check_plan_compatible(recorded, {**L4, "compute_capability": "12.0"})
    with pytest.raises(EngineMismatch, match="needs compute capability 8.0 or newer"):
        check_plan_compatible(recorded, {**L4, "gpu_name": "Tesla T4", "compute_capability": "7.5"})


@pytest.fixture
def fakes(monkeypatch):
    cuda = FakeCuda()
    trt = FakeTensorRT(cuda)
    monkeypatch.setattr(tensorrt_backend, "_cudart", lambda: cuda)
    monkeypatch.setattr(tensorrt_backend, "_tensorrt", lambda: trt)
    return trt, cuda


# ---------------------------------------------------------------- build and run glue, against the fakes


def test_build_engine_applies_exactly_the_builder_settings(fakes, tmp_path):
    trt, _ = fakes
    cache = tmp_path / "caches" / "h100.cache"
    config = BuildConfig(precision="int8", max_batch=8, workspace_mb=64, timing_cache=cache,
                         version_compatible=True)
    device = build_engine(tmp_path / "x.onnx", tmp_path / "x.plan", {"x": (3,)}, config)

    built = trt.built["config"]
    assert trt.built["network_flag_bits"] == 1 << 1
    assert built.flags == ["VERSION_COMPATIBLE"]
    assert built.pools == {"WORKSPACE": 64 << 20}
    assert built.default_device_type.name == "GPU" and built.hardware_compatibility_level.name == "NONE"
    assert trt.built["profile"] == ("x", ((1, 3), (4, 3), (8, 3)))
    assert built.timing_cache.loaded == b""
    assert (tmp_path / "x.plan").read_bytes() == b"serialized plan"
    assert cache.read_bytes() == b"timings"
    assert device == {"kind": "gpu", "gpu_name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0",
                      "tensorrt": "10.16.1.11", "dla_core": None, "hardware_compatible": False,
                      "version_compatible": True}


def test_build_engine_sets_dla_and_reuses_the_timing_cache(fakes, tmp_path):
    trt, _ = fakes
    cache = tmp_path / "orin.cache"
    cache.write_bytes(b"earlier timings")
    build_engine(tmp_path / "x.onnx", tmp_path / "x.plan", {"x": (3,)},
                 BuildConfig(precision="fp16", max_batch=4, dla_core=1, timing_cache=cache))
    built = trt.built["config"]
    assert built.default_device_type.name == "DLA" and built.DLA_core == 1
    assert built.flags == ["GPU_FALLBACK"]
    assert built.timing_cache.loaded == b"earlier timings"
    assert trt.built["profile"] == ("x", ((4, 3), (4, 3), (4, 3)))


def test_parse_errors_name_the_file_and_the_parser_messages(fakes, tmp_path, monkeypatch):
    _, cuda = fakes
    broken = FakeTensorRT(cuda, parse_errors=["In node 3 (importConv): UNSUPPORTED_NODE"])
    monkeypatch.setattr(tensorrt_backend, "_tensorrt", lambda: broken)
    with pytest.raises(BuildError) as raised:
        build_engine(tmp_path / "audio.onnx", tmp_path / "audio.plan", {"x": (3,)}, BuildConfig())
    assert str(raised.value) == (f"TensorRT could not parse {tmp_path / 'audio.onnx'}: "
                                 "In node 3 (importConv): UNSUPPORTED_NODE")
    assert not (tmp_path / "audio.plan").exists()


@pytest.fixture
def fake_engine(fakes, tmp_path):
    plan = tmp_path / "x.plan"
    plan.write_bytes(b"serialized plan")
    engine = TensorRTEngine(plan, cuda_graph_batch_sizes=(4,))
    yield engine
    engine.close()


def test_engine_reports_its_tensors_and_profile(fake_engine):
    assert fake_engine.input_names == ["x"] and fake_engine.output_names == ["y"]
    assert fake_engine.max_shapes == {"x": (8, 3), "y": (8, 2)}


def test_infer_copies_in_runs_and_copies_out(fakes, fake_engine):
    x = np.arange(9, dtype=np.float32).reshape(3, 3)
    np.testing.assert_allclose(fake_engine.infer({"x": x})["y"], x @ WEIGHTS)
    assert fakes[1].graph_launches == 0


def test_a_captured_batch_size_replays_its_cuda_graph(fakes, fake_engine):
    x = np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32)
    np.testing.assert_allclose(fake_engine.infer({"x": x})["y"], x @ WEIGHTS, rtol=1e-6)
    assert fakes[1].graph_launches == 1


def test_infer_device_keeps_tensors_on_the_device(fakes, fake_engine):
    _, cuda = fakes
    x = np.ones((2, 3), np.float32)
    (source,) = cuda.cudaMalloc(x.nbytes)[1:]
    cuda.view(source, x.shape, np.float32)[:] = x
    output = fake_engine.infer_device({"x": source}, batch_size=2)["y"]
    assert output.shape == (2, 2) and output.dtype == np.float32
    np.testing.assert_allclose(cuda.view(output.pointer, output.shape, output.dtype), x @ WEIGHTS)


def test_infer_refuses_missing_inputs_and_shapes_outside_the_profile(fake_engine):
    with pytest.raises(InputError, match="input 'x' is missing; x.plan takes"):
        fake_engine.infer({"audio": np.zeros((1, 3), np.float32)})
    with pytest.raises(InputError, match=r"has shape \[9, 3\]; x.plan takes \[batch, 3\] with batch 1..8"):
        fake_engine.infer({"x": np.zeros((9, 3), np.float32)})
    with pytest.raises(InputError, match=r"has shape \[2, 4\]"):
        fake_engine.infer({"x": np.zeros((2, 4), np.float32)})


def test_close_frees_everything_once(fakes, fake_engine):
    _, cuda = fakes
    fake_engine.close()
    fake_engine.close()
    assert cuda.memory == {} and cuda.streams_alive == 0


def test_an_unloadable_plan_says_to_rebuild(fakes, tmp_path):
    empty = tmp_path / "empty.plan"
    empty.write_bytes(b"")
    with pytest.raises(EngineMismatch, match="could not load .*empty.plan.*python -m ume_edge.build --backend"):
        TensorRTEngine(empty)


# ---------------------------------------------------------------- real TensorRT on a real GPU


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory):
    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(4 * 6 * 6, 10)).eval()
    path = tmp_path_factory.mktemp("trt") / "image.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(model, (torch.randn(1, 1, 8, 8),), str(path), input_names=["image"],
                          output_names=["partial_logits"], dynamic_axes={"image": {0: "batch"},
                                                                         "partial_logits": {0: "batch"}},
                          dynamo=False, opset_version=17)
    return path


def onnxruntime_reference(onnx_path, x):
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    return session.run(None, {"image": x})[0]


@needs_tensorrt_and_gpu
def test_real_fp32_plan_matches_onnxruntime(tiny_onnx, tmp_path):
    plan = tmp_path / "image.plan"
    device = build_engine(tiny_onnx, plan, {"image": (1, 8, 8)}, BuildConfig(max_batch=8,
                                                                          timing_cache=tmp_path / "t.cache"))
    check_plan_compatible(device, tensorrt_backend.device_info())
    x = np.random.default_rng(1).standard_normal((5, 1, 8, 8)).astype(np.float32)
    with TensorRTEngine(plan) as engine:
        got = engine.infer({"image": x})["partial_logits"]
    np.testing.assert_allclose(got, onnxruntime_reference(tiny_onnx, x), rtol=1e-2, atol=1e-2)  # TF32 kernels


@needs_tensorrt_and_gpu
def test_real_cuda_graph_replay_equals_plain_execution(tiny_onnx, tmp_path):
    plan = tmp_path / "image.plan"
    build_engine(tiny_onnx, plan, {"image": (1, 8, 8)}, BuildConfig(max_batch=8))
    x = np.random.default_rng(2).standard_normal((4, 1, 8, 8)).astype(np.float32)
    with TensorRTEngine(plan) as plain, TensorRTEngine(plan, cuda_graph_batch_sizes=(4,)) as graphed:
        expected = plain.infer({"image": x})["partial_logits"]
        for _ in range(3):
            np.testing.assert_allclose(graphed.infer({"image": x})["partial_logits"], expected, rtol=1e-6, atol=1e-6)


@needs_tensorrt_and_gpu
def test_real_infer_device_equals_infer(tiny_onnx, tmp_path):
    plan = tmp_path / "image.plan"
    build_engine(tiny_onnx, plan, {"image": (1, 8, 8)}, BuildConfig(max_batch=8))
    x = np.random.default_rng(3).standard_normal((3, 1, 8, 8)).astype(np.float32)
    cudart = tensorrt_backend._cudart()
    with TensorRTEngine(plan) as engine:
        expected = engine.infer({"image": x})["partial_logits"]
        source = tensorrt_backend._cuda(cudart.cudaMalloc(x.nbytes))
        tensorrt_backend._cuda(cudart.cudaMemcpy(source, x.ctypes.data, x.nbytes,
                                                 cudart.cudaMemcpyKind.cudaMemcpyHostToDevice))
        output = engine.infer_device({"image": source}, batch_size=3)["partial_logits"]
        got = np.empty(output.shape, output.dtype)
        tensorrt_backend._cuda(cudart.cudaMemcpy(got.ctypes.data, output.pointer, got.nbytes,
                                                 cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost))
        tensorrt_backend._cuda(cudart.cudaFree(source))
    np.testing.assert_array_equal(got, expected)
