"""The TensorRT route end to end, with only TensorRT's builder and runtime and CUDA faked (trt_fakes.py; a fake plan
computes with ONNX Runtime on the ONNX it was built from, so a directory must answer as its ``tensorrt/*.onnx`` do):
``build(BuildOptions(backend="tensorrt"))`` on a GPU and on a Jetson's DLA, ``Pipeline.load`` of what it wrote, Triton
repositories of TensorRT directories, and the Jetson route: export-only here, the directory's script with trtexec on
the target, ``python -m ume_edge.build --adopt``, ``Pipeline.load``. Each test of an issue-9 defect names it."""

import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest
from fake_trtexec import H100, ORIN, install_trtexec, parse_plan, path_with, serialize_plan, trtexec_calls
from onnx import numpy_helper
from trt_fakes import batches_run, install

from ume_edge import engine_dir, triton_repo
from ume_edge.backends.base import HostExecutor
from ume_edge.backends.onnxruntime import OnnxRuntimeEngine
from ume_edge.backends.tensorrt.options import TensorRTOptions
from ume_edge.build import BuildOptions, build
from ume_edge.build.adopt import adopt
from ume_edge.build.cli import main as build_main
from ume_edge.data import presence_patterns
from ume_edge.errors import BuildError, EngineMismatch
from ume_edge.runtime import Pipeline
from ume_edge.serving.repository import write_repository

MAX_BATCH = 8
ATOL = 1e-5
pytestmark = [pytest.mark.slow,  # full builds
              pytest.mark.filterwarnings("ignore:the float32 number:UserWarning")]  # the fp16 conversion's rounding

model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2")
text_format = pytest.importorskip("google.protobuf.text_format")


def build_with_fakes(out, version="10.16", release=None, device=H100, precision="int8", **tensorrt):
    with pytest.MonkeyPatch.context() as patch:
        install(patch, version, release, device)
        return build(BuildOptions(backend="tensorrt", max_batch=MAX_BATCH, out=out, precision=precision,
                                  backend_options=TensorRTOptions(**tensorrt)))


@pytest.fixture(scope="module")
def gpu_int8(tmp_path_factory):
    folder = tmp_path_factory.mktemp("h100")
    return build_with_fakes(folder / "int8-tensorrt", precision="int8", timing_cache=folder / "timing.cache")


@pytest.fixture(scope="module")
def version_compatible(tmp_path_factory):
    return build_with_fakes(tmp_path_factory.mktemp("h100") / "fp32-vc", precision="fp32", version_compatible=True)


@pytest.fixture(scope="module")
def dla(tmp_path_factory):
    return build_with_fakes(tmp_path_factory.mktemp("orin") / "fp16-dla1", "10.3", device=ORIN, precision="fp16",
                            dla_core=1)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """What `python -m ume_edge.build --backend tensorrt --export-only` writes on a machine without TensorRT."""
    return build(BuildOptions(backend="tensorrt", export_only=True, precision="int8", max_batch=MAX_BATCH,
                              out=tmp_path_factory.mktemp("export") / "int8-tensorrt-export"))


@pytest.fixture(scope="module")
def exported_for_dla(tmp_path_factory):
    folder = tmp_path_factory.mktemp("export")
    return build(BuildOptions(backend="tensorrt", export_only=True, precision="int8", max_batch=MAX_BATCH,
                              backend_options=TensorRTOptions(dla_core=1, timing_cache=folder / "orin.cache"),
                              out=folder / "int8-dla1-export"))


@pytest.fixture(scope="module")
def samples(avdigits_test):
    return {name: x[:MAX_BATCH] for name, x in avdigits_test[0].items()}


def onnx_reference(directory) -> HostExecutor:
    """The directory's TensorRT-target ONNX files (the plans' sources) run by ONNX Runtime."""
    manifest = engine_dir.load(directory)
    engines = {m.name: OnnxRuntimeEngine(directory / m.onnx.path, threads=1) for m in manifest.modalities}
    return HostExecutor(engines, OnnxRuntimeEngine(directory / manifest.fusion.onnx.path, threads=1),
                        manifest.fusion.modality_order, manifest.model.num_classes)


def requests(samples) -> list[tuple[dict, dict | None]]:
    """Every presence pattern at batch 1, 3 and MAX_BATCH, and per-row masks that leave each modality out of some
    rows."""
    names = list(samples)
    cases = [({n: (samples[n][:batch] if n in pattern else None) for n in names}, None)
             for pattern in presence_patterns(names) for batch in (1, 3, MAX_BATCH)]
    rows = np.arange(MAX_BATCH)
    cases.append((dict(samples), {names[0]: rows % 3 != 0, names[1]: rows % 3 != 1}))
    cases.append((dict(samples), {names[0]: rows == 5}))
    return cases


def assert_answers_like_its_onnx(pipeline: Pipeline, directory, samples) -> None:
    reference = onnx_reference(directory)
    for inputs, present in requests(samples):
        result = pipeline.infer(inputs, present=present)
        logits, probs = reference.infer({n: x for n, x in inputs.items() if x is not None}, result.present)
        np.testing.assert_allclose(result.logits, logits, atol=ATOL)
        np.testing.assert_allclose(result.probs, probs, atol=ATOL)


# ---------------------------------------------------------------- building on a GPU


def test_a_gpu_build_writes_plans_that_answer_like_their_onnx(gpu_int8, samples, monkeypatch):
    manifest = engine_dir.load(gpu_int8)
    assert manifest.backend == "tensorrt" and not manifest.export_only and manifest.made_on_target == []
    assert [m.engine.path for m in manifest.modalities] == ["audio.plan", "image.plan"]
    assert manifest.fusion.engine.path == "fusion.plan" and manifest.fusion.onnx.path == "tensorrt/fusion.onnx"
    assert manifest.device == {"kind": "gpu", "gpu_name": H100.gpu_name, "compute_capability": "9.0",
                               "tensorrt": "10.16.1.11", "dla_core": None, "hardware_compatible": False,
                               "version_compatible": False}
    assert manifest.accuracy["engines_run_by"] == "tensorrt"
    trt, cuda = install(monkeypatch)
    with Pipeline.load(gpu_int8) as pipeline:
        assert_answers_like_its_onnx(pipeline, gpu_int8, samples)
    assert set(cuda.alive().values()) == {0}


def test_tensorrt_int8_files_are_labelled_and_quantised_s8s8(gpu_int8, exported):
    """Issue 9, defect 8: the manifest called TensorRT's INT8 files U8S8."""
    for directory in (gpu_int8, exported):
        for modality in engine_dir.load(directory).modalities:
            assert (modality.precision, modality.quant_format) == ("int8", "S8S8")
            graph = onnx.load(directory / modality.onnx.path).graph
            zero_points = {node.input[2] for node in graph.node if node.op_type == "QuantizeLinear"}
            dtypes = {numpy_helper.to_array(i).dtype for i in graph.initializer if i.name in zero_points}
            assert dtypes == {np.dtype(np.int8)}


def test_a_version_compatible_directory_loads_on_a_newer_tensorrt(version_compatible, gpu_int8, samples,
                                                                   monkeypatch):
    """Issue 9, defect 2: such plans embed the lean runtime and load only with host code allowed; other plans are
    loaded with it refused."""
    assert engine_dir.load(version_compatible).device["version_compatible"] is True
    trt, _ = install(monkeypatch, "10.16", "10.16.2.0")
    with Pipeline.load(version_compatible) as pipeline:
        assert_answers_like_its_onnx(pipeline, version_compatible, samples)
    assert {(d["host_code_allowed"], d["loaded"]) for d in trt.deserialized} == {(True, True)}
    trt, _ = install(monkeypatch)
    Pipeline.load(gpu_int8).close()
    assert {(d["host_code_allowed"], d["loaded"]) for d in trt.deserialized} == {(False, True)}


# ---------------------------------------------------------------- building for a Jetson's DLA


def test_a_dla_directory_answers_any_batch_up_to_max_batch_on_its_core(dla, samples, monkeypatch):
    """Issue 9, defects 3 and 6: DLA plans have a fixed batch, so smaller batches (and the present rows of per-row
    masks) are padded; the encoders run on the DLA core the directory was built for."""
    manifest = engine_dir.load(dla)
    assert manifest.device["dla_core"] == 1 and manifest.device["tensorrt"] == "10.3.0"
    trt, _ = install(monkeypatch, "10.3", device=ORIN)
    with Pipeline.load(dla) as pipeline:
        assert_answers_like_its_onnx(pipeline, dla, samples)
    encoder_runs = [run for run in trt.runs if run["inputs"] in (["audio"], ["image"])]
    assert encoder_runs and {(run["batch"], run["dla_core"]) for run in encoder_runs} == {(MAX_BATCH, 1)}
    assert {run["dla_core"] for run in trt.runs if run["inputs"] == ["partial_logits", "present"]} == {None}
    assert sorted(set(batches_run(trt, "partial_logits"))) == [1, 3, MAX_BATCH]


def test_a_dla_build_on_tensorrt_without_dla_is_refused_before_any_work(monkeypatch, tmp_path):
    """Issue 9, defect 5."""
    install(monkeypatch, "10.16", device=ORIN)
    with pytest.raises(BuildError, match="TensorRT 10.16.1.11 has no DLA support"):
        build(BuildOptions(backend="tensorrt", precision="fp16", backend_options=TensorRTOptions(dla_core=0),
                           out=tmp_path / "out"))
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- Triton repositories (issue 9, defect 1)


def parsed_configs(repository) -> dict:
    """Every model's config.pbtxt parsed with Triton's own protobuf schema."""
    return {path.parent.name: text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())
            for path in sorted(repository.glob("*/config.pbtxt"))}


def tensors(config_tensors) -> list[tuple[str, list[int], str]]:
    return [(t.name, list(t.dims), model_config_pb2.DataType.Name(t.data_type)) for t in config_tensors]


def assert_config_fits_its_plan(config, plan_path, trt) -> None:
    """The config's inputs, outputs and max batch are the plan's, as TensorRT reads the plan."""
    engine = trt.Runtime(trt.Logger()).deserialize_cuda_engine(plan_path.read_bytes())
    assert engine is not None, plan_path
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    triton_type = {"FLOAT": "TYPE_FP32", "INT64": "TYPE_INT64"}

    def described(mode):
        return [(n, list(engine.get_tensor_shape(n))[1:], triton_type[engine.get_tensor_dtype(n).name])
                for n in names if engine.get_tensor_mode(n).name == mode]

    assert tensors(config.input) == described("INPUT") and tensors(config.output) == described("OUTPUT")
    assert config.max_batch_size == engine.get_tensor_profile_shape(names[0], 0)[2][0]


def test_a_tensorrt_directory_gives_a_repository_of_tensorrt_plans(gpu_int8, tmp_path, monkeypatch, capsys):
    repository = tmp_path / "triton_models"
    assert triton_repo.main(["--engines", str(gpu_int8), "--out", str(repository)]) == 0
    configs = parsed_configs(repository)
    assert set(configs) == {"ume", "fusion", "ume_audio", "ume_image"}
    assert configs["ume"].backend == "python" and all(t.optional for t in configs["ume"].input)
    trt, _ = install(monkeypatch)
    manifest = engine_dir.load(gpu_int8)
    plans = {"fusion": manifest.fusion.engine.path, **{f"ume_{m.name}": m.engine.path for m in manifest.modalities}}
    for name, plan in plans.items():
        assert (configs[name].platform, configs[name].backend) == ("tensorrt_plan", "")
        assert sorted(p.name for p in (repository / name / "1").iterdir()) == ["model.plan"]
        assert (repository / name / "1" / "model.plan").read_bytes() == (gpu_int8 / plan).read_bytes()
        assert_config_fits_its_plan(configs[name], repository / name / "1" / "model.plan", trt)
    assert "tritonserver --model-repository" in capsys.readouterr().err


@pytest.mark.parametrize(("major", "version", "release"), [(10, "10.16", "10.16.1.11"), (11, "11.4", "11.4.0.106")])
def test_an_export_only_directory_gives_a_repository_whose_scripts_build_its_plans(exported, tmp_path, monkeypatch,
                                                                                 major, version, release):
    repository = tmp_path / "triton_models"
    write_repository(exported, repository)
    configs = parsed_configs(repository)
    manifest = engine_dir.load(exported)
    sources = {"fusion": manifest.fusion.onnx.path, **{f"ume_{m.name}": m.onnx.path for m in manifest.modalities}}
    for name, source in sources.items():
        assert configs[name].platform == "tensorrt_plan"
        assert (repository / name / "source.onnx").read_bytes() == (exported / source).read_bytes()
        assert not (repository / name / "1" / "model.plan").exists()
    assert {"build_plans_trt10.sh", "build_plans_trt11.sh"} <= {p.name for p in repository.iterdir()}

    install_trtexec(tmp_path / "bin", release, H100)
    result = subprocess.run(["sh", str(repository / f"build_plans_trt{major}.sh")], capture_output=True, text=True,
                            env={"PATH": path_with(tmp_path / "bin")}, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert len(trtexec_calls(tmp_path / "bin")) == 1 + len(sources)
    trt, _ = install(monkeypatch, version)
    for name in sources:
        assert_config_fits_its_plan(configs[name], repository / name / "1" / "model.plan", trt)


# ---------------------------------------------------------------- the Jetson route (issue 9, defect 7)


def test_an_export_only_directory_is_refused_by_the_runtime_with_what_to_do(exported):
    with pytest.raises(EngineMismatch, match="export-only.*build_plans_.*--adopt"):
        Pipeline.load(exported)


def test_adopting_before_the_script_ran_says_to_run_it(exported_for_dla, tmp_path, monkeypatch):
    directory = shutil.copytree(exported_for_dla, tmp_path / "engines")
    install(monkeypatch, "10.3", device=ORIN)
    with pytest.raises(BuildError, match="lacks fusion.plan, audio.plan, image.plan, timing.cache: run "
                                         "build_plans_trt10.sh or build_plans_trt11.sh there first"):
        adopt(directory)


@pytest.mark.parametrize(("major", "version", "release"), [(10, "10.3", "10.3.0"), (11, "11.4", "11.4.1.0")])
def test_the_jetson_route_ends_in_a_directory_that_answers_like_its_onnx(exported_for_dla, samples, tmp_path,
                                                                        monkeypatch, capsys, major, version, release):
    directory = shutil.copytree(exported_for_dla, tmp_path / "engines")
    install_trtexec(tmp_path / "bin", release, ORIN)
    script = subprocess.run(["sh", str(directory / f"build_plans_trt{major}.sh")], capture_output=True, text=True,
                            env={"PATH": path_with(tmp_path / "bin")}, timeout=120)
    assert script.returncode == 0, script.stdout + script.stderr
    assert script.stdout.strip().splitlines()[-1] == f"done. Then: python -m ume_edge.build --adopt {directory}"

    trt, cuda = install(monkeypatch, version, release, ORIN)
    build_main(["--adopt", str(directory)])
    assert "Export only" not in capsys.readouterr().out
    manifest = engine_dir.load(directory)
    assert not manifest.export_only and manifest.made_on_target == []
    assert [m.engine.path for m in manifest.modalities] == ["audio.plan", "image.plan"]
    assert manifest.device == {"kind": "gpu", "gpu_name": "Orin", "compute_capability": "8.7", "tensorrt": release,
                               "dla_core": 1, "hardware_compatible": False, "version_compatible": False}
    assert manifest.versions["tensorrt"] == release
    check = manifest.verification.checks[-1]
    assert check["where"] == "build --adopt" and check["holds"] and not check["accepted"]
    with Pipeline.load(directory) as pipeline:
        assert_answers_like_its_onnx(pipeline, directory, samples)
    assert {run["dla_core"] for run in trt.runs if run["inputs"] == ["audio"]} == {1}
    assert set(cuda.alive().values()) == {0}


def test_adopt_refuses_plans_that_answer_otherwise_unless_the_numbers_are_accepted(exported_for_dla, tmp_path,
                                                                                     monkeypatch):
    """A plan built another way (here: a stand-in plan whose head computes 5% larger logits) passes every shape check;
    only the verification record tells."""
    directory = shutil.copytree(exported_for_dla, tmp_path / "engines")
    install_trtexec(tmp_path / "bin", "10.3.0", ORIN)
    subprocess.run(["sh", str(directory / "build_plans_trt10.sh")], check=True, capture_output=True,
                   env={"PATH": path_with(tmp_path / "bin")}, timeout=120)
    header, onnx_bytes = parse_plan((directory / "image.plan").read_bytes())
    model = onnx.load_from_string(onnx_bytes)
    head = next(init for init in model.graph.initializer if init.name == "head.weight")
    head.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(head) * np.float32(1.05), head.name))
    (directory / "image.plan").write_bytes(serialize_plan(header, model.SerializeToString()))
    install(monkeypatch, "10.3", "10.3.0", ORIN)

    with pytest.raises(BuildError, match="do not answer what the build recorded: FAILED: the image engine differs"):
        adopt(directory)
    assert engine_dir.load(directory).export_only  # nothing was published

    build_main(["--adopt", str(directory), "--accept-verification"])
    check = engine_dir.load(directory).verification.checks[-1]
    assert not check["holds"] and check["accepted"]
    assert {row["pattern"] for row in check["rows"] if not row["holds"]} == {"image", "audio+image"}


def test_accept_verification_without_adopt_is_a_usage_error():
    result = subprocess.run([sys.executable, "-m", "ume_edge.build", "--accept-verification"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2 and "give it with --adopt DIR" in result.stderr.splitlines()[-1]


# ---------------------------------------------------------------- without TensorRT


def test_cli_without_tensorrt_is_one_line_with_what_to_do():
    result = subprocess.run([sys.executable, "-m", "ume_edge.build", "--backend", "tensorrt"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "Traceback" not in result.stderr
    assert "pip install 'ume-edge[tensorrt]'" in result.stderr and "--export-only" in result.stderr
