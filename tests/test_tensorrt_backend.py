"""The TensorRT backend without TensorRT: availability, the build configuration and the builder settings per TensorRT
release, which releases have DLA, plan compatibility, and the build and run glue against the fakes of trt_fakes.py
(held to tables of the real TensorRT 10.3 / 10.16 / 11.4 and cuda-python APIs). The tests marked ``tensorrt`` and
``gpu`` build and run real plans, and skip on machines without both."""

import logging
import subprocess
import sys
import warnings

import numpy as np
import onnx
import pytest
from api_conformance import load_tensorrt  # tests/api_conformance.py; pytest puts tests/ on sys.path
from fake_trtexec import ORIN, timing_cache_bytes
from onnx import TensorProto, helper, numpy_helper
from trt_fakes import FakeCuda, install, needs_tensorrt_and_gpu

from ume_edge import backends
from ume_edge.backends.tensorrt import api
from ume_edge.backends.tensorrt.compat import check_plan_compatible, dla_problem
from ume_edge.backends.tensorrt.config import BuildConfig, build_engine, builder_settings, default_opt_batch
from ume_edge.backends.tensorrt.engine import DeviceTensor, TensorRTEngine
from ume_edge.backends.tensorrt.options import TensorRTOptions
from ume_edge.build import BuildOptions, build
from ume_edge.errors import BackendUnavailable, BuildError, EngineMismatch, InputError, UmeEdgeError

GIB = 1 << 30
WEIGHTS = np.array([[1.0, -2.0], [0.5, 0.0], [3.0, 1.0]], np.float32)
RELEASES = {"10.3": "10.3.0", "10.16": "10.16.1.11", "11.4": "11.4.0.106"}


def backend():
    return backends.get("tensorrt")


# ---------------------------------------------------------------- availability


def test_importing_the_backend_imports_neither_tensorrt_nor_cuda():
    code = "import sys, ume_edge.backends.tensorrt; print(sorted({'tensorrt', 'cuda'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_without_tensorrt_the_backend_says_how_to_get_it(monkeypatch):
    def missing():
        raise ImportError("No module named 'tensorrt'")

    monkeypatch.setattr(api, "tensorrt", missing)
    reason = backend().unavailable_reason()
    assert not backend().is_available() and backend().version() is None
    assert "\n" not in reason
    assert "pip install 'ume-edge[tensorrt]'" in reason and "--export-only" in reason
    with pytest.raises(BackendUnavailable, match="--export-only"):
        api.require()


def test_without_a_gpu_the_reason_names_the_cuda_error(monkeypatch):
    install(monkeypatch)
    monkeypatch.setattr(api, "cudart", lambda: FakeCuda(device_count=0))
    assert backend().unavailable_reason() == (
        "no CUDA GPU is visible (cudaErrorNoDevice): run on a machine with an NVIDIA GPU and driver, "
        "or build with --export-only to write TensorRT-ready ONNX and build the plans on the target")


@pytest.mark.parametrize("version", RELEASES)
def test_with_tensorrt_and_a_gpu_the_backend_is_available_and_describes_the_device(monkeypatch, version):
    install(monkeypatch, version, device=ORIN)
    assert backend().is_available() and backend().version() == RELEASES[version]
    assert backend().device() == {"kind": "gpu", "gpu_name": "Orin", "compute_capability": "8.7",
                                  "tensorrt": RELEASES[version]}


# ---------------------------------------------------------------- build configuration


@pytest.mark.parametrize(("max_batch", "opt_batch"), [(1, 1), (2, 1), (3, 1), (8, 4), (64, 32), (100, 32)])
def test_default_opt_batch_is_half_the_max_rounded_down_to_a_power_of_two(max_batch, opt_batch):
    assert default_opt_batch(max_batch) == BuildConfig(max_batch=max_batch).opt_batch == opt_batch


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


# ---------------------------------------------------------------- builder settings per release


def test_tensorrt_10_is_strongly_typed_without_precision_flags():
    assert builder_settings(BuildConfig(precision="int8"), "10.16.1.11") == {
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


@pytest.mark.parametrize(("precision", "flags"), [("int8", ["INT8", "FP16"]), ("fp16", ["FP16"])])
def test_tensorrt_10_on_dla_is_weakly_typed_with_the_precisions_dla_runs(precision, flags, tmp_path):
    config = BuildConfig(precision=precision, max_batch=8, workspace_mb=256, dla_core=1,
                         timing_cache=tmp_path / "orin.cache")
    assert builder_settings(config, "10.3.0") == {
        "tensorrt_major": 10,
        "network_flags": [],
        "builder_flags": [*flags, "GPU_FALLBACK"],
        "memory_pool_limits": {"WORKSPACE": 256 << 20},
        "profile_batch": {"min": 8, "opt": 8, "max": 8},
        "timing_cache": str(tmp_path / "orin.cache"),
        "default_device_type": "DLA",
        "DLA_core": 1,
        "hardware_compatibility_level": "NONE",
    }


def test_tensorrt_11_has_no_typing_or_precision_settings():
    config = BuildConfig(precision="fp16", max_batch=128, hardware_compatible=True, version_compatible=True)
    settings = builder_settings(config, "11.4.0.106")
    assert (settings["network_flags"], settings["builder_flags"]) == ([], ["VERSION_COMPATIBLE"])
    assert settings["hardware_compatibility_level"] == "AMPERE_PLUS"
    dla = builder_settings(BuildConfig(precision="int8", max_batch=4, dla_core=0), "11.4.1")
    assert (dla["network_flags"], dla["builder_flags"]) == ([], ["GPU_FALLBACK"])


CONFIGS = [BuildConfig(precision=p, dla_core=core, version_compatible=vc, hardware_compatible=hc)
           for p in ("fp32", "fp16", "int8") for core in (None, 0) for vc in (False, True) for hc in (False, True)
           if core is None or (p != "fp32" and not hc)]


@pytest.mark.parametrize("version", RELEASES)
def test_every_setting_names_a_member_of_that_releases_enums(version):
    enums = load_tensorrt(version)["enums"]
    release = {"10.3": "10.3.0", "10.16": "10.16.1.11", "11.4": "11.4.1"}[version]  # 11.4.1: the 11.4 with DLA
    for config in CONFIGS:
        if config.dla_core is not None and dla_problem(release):
            continue
        settings = builder_settings(config, release)
        assert set(settings["network_flags"]) <= set(enums["NetworkDefinitionCreationFlag"]), config
        assert set(settings["builder_flags"]) <= set(enums["BuilderFlag"]), config
        assert set(settings["memory_pool_limits"]) <= set(enums["MemoryPoolType"])
        assert settings["default_device_type"] in enums["DeviceType"]
        assert settings["hardware_compatibility_level"] in enums["HardwareCompatibilityLevel"]


@pytest.mark.parametrize("version", ["9.0.0", "12.0.0"])
def test_other_tensorrt_majors_are_refused(version):
    with pytest.raises(BuildError, match=f"TensorRT {version} is not supported; ume-edge builds with TensorRT 10 or"):
        builder_settings(BuildConfig(), version)


def test_builder_settings_validates_the_config():
    with pytest.raises(BuildError, match="max_batch is 0"):
        builder_settings(BuildConfig(max_batch=0), "10.16.1.11")


# ---------------------------------------------------------------- which TensorRT has DLA (issue 9, defect 5)


@pytest.mark.parametrize("release", ["10.0.1", "10.3.0", "10.7.0", "11.4.1", "11.5.0"])
def test_dla_is_there_up_to_10_7_and_from_11_4_1(release):
    assert dla_problem(release) is None
    check_plan_compatible({**ORIN_10_3, "tensorrt": release, "dla_core": 0}, {**ORIN_10_3, "tensorrt": release})


@pytest.mark.parametrize("release", ["10.8.0", "10.16.1.11", "11.0.0", "11.3.0", "11.4.0.106"])
def test_dla_is_refused_on_tensorrt_without_it_at_build_and_at_load(release):
    assert "DLA" in dla_problem(release) and "11.4.1" in dla_problem(release)
    with pytest.raises(BuildError, match="DLA"):
        builder_settings(BuildConfig(precision="fp16", dla_core=0), release)
    with pytest.raises(EngineMismatch, match="DLA"):
        check_plan_compatible({**ORIN_10_3, "tensorrt": release, "dla_core": 0}, {**ORIN_10_3, "tensorrt": release})


def test_tensorrt_11_4_0_has_dla_only_on_windows_on_arm():
    assert dla_problem("11.4.0.106") == ("TensorRT 11.4.0 has DLA only on Windows on ARM; use TensorRT 11.4.1+ on "
                                         "JetPack 7.2.2+")


def test_a_dla_build_on_tensorrt_without_dla_is_refused_before_any_work(monkeypatch, tmp_path):
    trt, _ = install(monkeypatch, "10.16", device=ORIN)
    with pytest.raises(BuildError, match="TensorRT 10.16.1.11 has no DLA support"):
        build(BuildOptions(backend="tensorrt", precision="fp16", backend_options=TensorRTOptions(dla_core=0),
                           out=tmp_path / "out"))
    with pytest.raises(BuildError, match="TensorRT 10.16.1.11 has no DLA support"):
        build_engine(tmp_path / "x.onnx", tmp_path / "x.plan", {"x": (3,)}, BuildConfig(precision="fp16", dla_core=0))
    assert trt.builds == [] and not (tmp_path / "x.plan").exists()
    backend().check_build_options(TensorRTOptions(dla_core=0), "fp16", max_batch=64, export_only=True)


# ---------------------------------------------------------------- plan compatibility

H100 = {"kind": "gpu", "gpu_name": "NVIDIA H100", "compute_capability": "9.0", "tensorrt": "10.16.1.11"}
L4 = {"kind": "gpu", "gpu_name": "NVIDIA L4", "compute_capability": "8.9", "tensorrt": "10.16.1.11"}
ORIN_10_3 = {"kind": "gpu", "gpu_name": "Orin", "compute_capability": "8.7", "tensorrt": "10.3.0"}


def test_identical_machines_are_compatible():
    check_plan_compatible(H100, dict(H100))


def test_a_different_tensorrt_version_is_refused():
    with pytest.raises(EngineMismatch) as raised:
        check_plan_compatible(H100, {**H100, "tensorrt": "10.3.0.30"})
    assert str(raised.value) == (
        "the TensorRT plan does not fit this machine: it was built with TensorRT 10.16.1.11 and this machine has "
        "TensorRT 10.3.0.30; rebuild on the target: python -m ume_edge.build --backend tensorrt ...")


def test_a_different_compute_capability_is_refused_and_both_problems_are_named():
    with pytest.raises(EngineMismatch, match="built for compute capability 9.0 .NVIDIA H100. and this GPU .NVIDIA L4. "
                                             "has compute capability 8.9"):
        check_plan_compatible(H100, L4)
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
    with pytest.raises(EngineMismatch, match="needs compute capability 8.0 or newer"):
        check_plan_compatible(recorded, {**L4, "gpu_name": "Tesla T4", "compute_capability": "7.5"})


# ---------------------------------------------------------------- build_engine against the fakes


def linear_onnx(path, name="x", features=3):
    """``y = x @ WEIGHTS`` for ``x [batch, 3]``."""
    weight = numpy_helper.from_array(WEIGHTS[:features], "weight")
    graph = helper.make_graph([helper.make_node("MatMul", [name, "weight"], ["y"])], "linear",
                              [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", features])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 2])], [weight])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


@pytest.fixture
def onnx_file(tmp_path):
    return linear_onnx(tmp_path / "x.onnx")


@pytest.mark.parametrize("version", RELEASES)
def test_build_engine_applies_the_settings_of_its_release(monkeypatch, tmp_path, onnx_file, version):
    trt, cuda = install(monkeypatch, version)
    cache = tmp_path / "caches" / "h100.cache"
    config = BuildConfig(precision="int8", max_batch=8, workspace_mb=64, timing_cache=cache, version_compatible=True)
    device = build_engine(onnx_file, tmp_path / "x.plan", {"x": (3,)}, config)

    (built,) = trt.builds
    strongly_typed_bit = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    assert built["network_flags"] == (strongly_typed_bit if version != "11.4" else 0)
    assert built["builder_flags"] == ["VERSION_COMPATIBLE"]
    assert built["pools"] == {"WORKSPACE": 64 << 20}
    assert (built["default_device_type"], built["hardware_compatibility_level"]) == ("GPU", "NONE")
    assert built["profile"] == {"x": ((1, 3), (4, 3), (8, 3))}
    assert built["timing_cache"] == b"" and cache.read_bytes() == timing_cache_bytes(RELEASES[version], cuda.device, 1)
    assert device == {"kind": "gpu", "gpu_name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0",
                      "tensorrt": RELEASES[version], "dla_core": None, "hardware_compatible": False,
                      "version_compatible": True}


@pytest.mark.parametrize(("version", "release", "flags"), [("10.3", "10.3.0", ["INT8", "GPU_FALLBACK"]),
                                                            ("11.4", "11.4.1.0", ["GPU_FALLBACK"])])
def test_build_engine_for_dla_on_a_jetson(monkeypatch, tmp_path, onnx_file, version, release, flags):
    trt, _ = install(monkeypatch, version, release, device=ORIN)
    device = build_engine(onnx_file, tmp_path / "x.plan", {"x": (3,)},
                          BuildConfig(precision="int8", max_batch=4, dla_core=1))
    (built,) = trt.builds
    assert sorted(built["builder_flags"]) == sorted(flags + (["FP16"] if version == "10.3" else []))
    assert (built["default_device_type"], built["DLA_core"]) == ("DLA", 1)
    assert built["profile"] == {"x": ((4, 3), (4, 3), (4, 3))}
    assert device["dla_core"] == 1 and device["gpu_name"] == "Orin"


def test_build_engine_refuses_a_dla_core_the_device_lacks(monkeypatch, tmp_path, onnx_file):
    install(monkeypatch, "10.3", device=ORIN)
    with pytest.raises(BuildError, match="--dla-core 2: this device has 2 DLA core"):
        build_engine(onnx_file, tmp_path / "x.plan", {"x": (3,)}, BuildConfig(precision="fp16", dla_core=2))


def test_a_matching_timing_cache_is_reused(monkeypatch, tmp_path, onnx_file):
    trt, cuda = install(monkeypatch)
    cache = tmp_path / "h100.cache"
    cache.write_bytes(timing_cache_bytes(trt.__version__, cuda.device, 5))
    build_engine(onnx_file, tmp_path / "x.plan", {"x": (3,)}, BuildConfig(max_batch=4, timing_cache=cache))
    assert trt.builds[0]["timing_cache"] == timing_cache_bytes(trt.__version__, cuda.device, 5)


def test_a_timing_cache_from_another_release_is_replaced_with_a_warning(monkeypatch, tmp_path, onnx_file, caplog):
    trt, cuda = install(monkeypatch, "10.16")
    cache = tmp_path / "timing.cache"
    cache.write_bytes(timing_cache_bytes("10.3.0", ORIN, 9))
    with caplog.at_level(logging.WARNING, logger="ume_edge.backends.tensorrt"):
        build_engine(onnx_file, tmp_path / "x.plan", {"x": (3,)}, BuildConfig(max_batch=4, timing_cache=cache))
    assert [r.getMessage() for r in caplog.records] == [
        f"timing cache {cache} was made on another device or TensorRT; starting a fresh one"]
    assert trt.builds[0]["timing_cache"] == b""
    assert cache.read_bytes() == timing_cache_bytes("10.16.1.11", cuda.device, 1)
    assert (tmp_path / "x.plan").is_file()


def test_parse_errors_name_the_file_and_the_parser_messages(monkeypatch, tmp_path, onnx_file):
    trt, _ = install(monkeypatch)
    trt.parse_errors = ["In node 3 (importConv): UNSUPPORTED_NODE"]
    with pytest.raises(BuildError) as raised:
        build_engine(onnx_file, tmp_path / "x.plan", {"x": (3,)}, BuildConfig())
    assert str(raised.value) == f"TensorRT could not parse {onnx_file}: In node 3 (importConv): UNSUPPORTED_NODE"
    assert not (tmp_path / "x.plan").exists()


def test_a_build_tensorrt_refuses_says_so(monkeypatch, tmp_path, onnx_file):
    install(monkeypatch)
    with pytest.raises(BuildError, match="TensorRT could not build a plan from .*x.onnx"):
        build_engine(onnx_file, tmp_path / "x.plan", {"x": (4,)}, BuildConfig())  # not the ONNX's input shape


# ---------------------------------------------------------------- TensorRTEngine against the fakes


def build_plan(tmp_path, config=None, name="x") -> str:
    config = config or BuildConfig(max_batch=8)
    plan = tmp_path / f"{name}.plan"
    build_engine(linear_onnx(tmp_path / f"{name}.onnx", name), plan, {name: (3,)}, config)
    return plan


@pytest.fixture
def fakes(monkeypatch):
    return install(monkeypatch)


@pytest.fixture
def engine(fakes, tmp_path):
    with TensorRTEngine(build_plan(tmp_path), cuda_graph_batch_sizes=(4,)) as opened:
        yield opened


def random_rows(count, seed=0):
    return np.random.default_rng(seed).standard_normal((count, 3)).astype(np.float32)


def test_engine_reports_its_tensors_and_profile(engine):
    assert engine.input_names == ["x"] and engine.output_names == ["y"]
    assert engine.max_shapes == {"x": (8, 3), "y": (8, 2)}
    assert engine.dtypes == {"x": np.float32, "y": np.float32} and engine.fixed_batch is None


def test_infer_copies_in_runs_and_copies_out(fakes, engine):
    x = random_rows(3)
    np.testing.assert_allclose(engine.infer({"x": x})["y"], x @ WEIGHTS, rtol=1e-6)
    assert fakes[1].graph_launches == 0


def test_a_captured_batch_size_replays_its_cuda_graph(fakes, engine):
    for seed in range(3):
        x = random_rows(4, seed)
        np.testing.assert_allclose(engine.infer({"x": x})["y"], x @ WEIGHTS, rtol=1e-6)
    assert fakes[1].graph_launches == 3


def test_infer_device_keeps_tensors_on_the_device(fakes, engine):
    _, cuda = fakes
    x = random_rows(2)
    source = api.call(cuda.cudaMalloc(x.nbytes))
    cuda.view(source, x.shape, np.float32)[:] = x
    output = engine.infer_device({"x": source}, batch_size=2)["y"]
    assert output.shape == (2, 2) and output.dtype == np.float32
    np.testing.assert_allclose(cuda.view(output.pointer, output.shape, output.dtype), x @ WEIGHTS, rtol=1e-6)
    api.call(cuda.cudaFree(source))


def test_enqueue_waits_for_nothing_and_download_waits(fakes, engine):
    _, cuda = fakes
    x = random_rows(2)
    y = engine.enqueue({"x": x})["y"]
    assert y.shape == (2, 2) and np.isnan(cuda.view(y.pointer, y.shape, y.dtype)).all()  # queued, not run
    np.testing.assert_allclose(engine.download({"y": y})["y"], x @ WEIGHTS, rtol=1e-6)
    own = engine.input_tensor("x", 2)
    cuda.view(own.pointer, own.shape, own.dtype)[:] = x + 1
    copies = len(cuda.copies)
    np.testing.assert_allclose(engine.download(engine.enqueue({"x": own}))["y"], (x + 1) @ WEIGHTS, rtol=1e-6)
    assert cuda.copies[copies]["kind"] == "cudaMemcpyDeviceToHost"  # the input already in place was not copied
    with pytest.raises(InputError, match="is float64"):
        engine.enqueue({"x": DeviceTensor(own.pointer, own.shape, np.dtype(np.float64))})


def test_infer_refuses_missing_inputs_and_shapes_outside_the_profile(engine):
    with pytest.raises(InputError, match="input 'x' is missing; x.plan takes"):
        engine.infer({"audio": np.zeros((1, 3), np.float32)})
    with pytest.raises(InputError, match=r"has shape \[9, 3\]; x.plan takes \[batch, 3\] with batch 1..8"):
        engine.infer({"x": np.zeros((9, 3), np.float32)})
    with pytest.raises(InputError, match=r"has shape \[2, 4\]"):
        engine.infer({"x": np.zeros((2, 4), np.float32)})


def test_close_frees_everything_once(fakes, engine):
    engine.infer({"x": random_rows(4)})
    engine.close()
    engine.close()
    assert set(fakes[1].alive().values()) == {0}


def test_an_unloadable_plan_says_to_rebuild(fakes, tmp_path):
    empty = tmp_path / "empty.plan"
    empty.write_bytes(b"")
    with pytest.raises(EngineMismatch, match="could not load .*empty.plan.*python -m ume_edge.build --backend"):
        TensorRTEngine(empty)
    assert set(fakes[1].alive().values()) == {0}


# ---------------------------------------------------------------- issue 9: version compatibility, DLA core, padding


def test_a_version_compatible_plan_loads_only_with_host_code_allowed(fakes, tmp_path):
    trt, _ = fakes
    plan = build_plan(tmp_path, BuildConfig(max_batch=8, version_compatible=True))
    with pytest.raises(EngineMismatch, match="could not load"):
        TensorRTEngine(plan)
    with TensorRTEngine(plan, version_compatible=True) as engine:
        x = random_rows(2)
        np.testing.assert_allclose(engine.infer({"x": x})["y"], x @ WEIGHTS, rtol=1e-6)
    assert [(d["host_code_allowed"], d["loaded"]) for d in trt.deserialized] == [(False, False), (True, True)]


def test_a_plain_plan_is_loaded_with_host_code_refused(fakes, tmp_path):
    trt, _ = fakes
    TensorRTEngine(build_plan(tmp_path)).close()
    assert [d["host_code_allowed"] for d in trt.deserialized] == [False]


@pytest.fixture
def orin(monkeypatch):
    return install(monkeypatch, "10.3", device=ORIN)


@pytest.mark.parametrize(("dla_core", "runs_on"), [(1, 1), (0, 0), (None, 0)])
def test_a_dla_plan_runs_on_the_core_it_is_opened_for(orin, tmp_path, dla_core, runs_on):
    trt, _ = orin
    plan = build_plan(tmp_path, BuildConfig(precision="fp16", max_batch=4, dla_core=1))
    with TensorRTEngine(plan, dla_core=dla_core) as engine:
        engine.infer({"x": random_rows(4)})
    assert trt.deserialized[-1]["DLA_core"] == (-1 if dla_core is None else dla_core)
    assert [run["dla_core"] for run in trt.runs] == [runs_on]


@pytest.mark.parametrize("rows", [1, 3, 7, 8])
def test_a_dla_plan_answers_any_batch_up_to_its_fixed_one(orin, tmp_path, rows):
    trt, _ = orin
    with TensorRTEngine(build_plan(tmp_path, BuildConfig(precision="int8", max_batch=8, dla_core=0)),
                        dla_core=0) as engine:
        assert engine.fixed_batch == 8
        x = random_rows(rows)
        np.testing.assert_allclose(engine.infer({"x": x})["y"], x @ WEIGHTS, rtol=1e-6)
        with pytest.raises(InputError, match="runs batch 8 only"):
            engine.infer({"x": random_rows(9)})
    assert [run["batch"] for run in trt.runs] == [8]


# ---------------------------------------------------------------- issue 9, defect 9: failed captures and constructors


@pytest.mark.parametrize("failure", ["TensorRT refuses to enqueue", "the capture is invalidated"])
def test_a_failed_cuda_graph_capture_is_ended_and_the_batch_runs_without_a_graph(fakes, tmp_path, caplog, failure):
    trt, cuda = fakes
    trt.while_capturing = "refuse" if failure == "TensorRT refuses to enqueue" else "enqueue"
    cuda.invalidate_captures = failure == "the capture is invalidated"
    with caplog.at_level(logging.WARNING, logger="ume_edge.backends.tensorrt"):
        engine = TensorRTEngine(build_plan(tmp_path), cuda_graph_batch_sizes=(4,))
    assert "x.plan: CUDA-graph capture at batch 4 failed" in caplog.text
    assert cuda.alive()["capturing_streams"] == cuda.alive()["graphs"] == cuda.alive()["graph_executables"] == 0
    x = random_rows(4)
    np.testing.assert_allclose(engine.infer({"x": x})["y"], x @ WEIGHTS, rtol=1e-6)
    assert cuda.graph_launches == 0
    engine.close()
    assert set(cuda.alive().values()) == {0}


def test_an_error_during_a_capture_ends_it_and_frees_everything(fakes, tmp_path):
    trt, cuda = fakes
    trt.while_capturing = "raise"
    with pytest.raises(RuntimeError, match="while the stream was capturing"):
        TensorRTEngine(build_plan(tmp_path), cuda_graph_batch_sizes=(4,))
    assert set(cuda.alive().values()) == {0}


def test_a_constructor_that_fails_half_way_frees_its_stream_and_buffers(fakes, tmp_path):
    _, cuda = fakes
    plan = build_plan(tmp_path)
    cuda.allocations_left = 1  # the input buffer, then the output buffer fails
    with pytest.raises(UmeEdgeError, match="cudaErrorMemoryAllocation"):
        TensorRTEngine(plan)
    assert set(cuda.alive().values()) == {0}


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
    check_plan_compatible(device, api.device_info())
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
