"""``python -m ume_edge.triton_repo``: the generated model repository, and the real tritonserver serving it."""

import json
import threading

import numpy as np
import pytest

from ume_edge import engine_dir, triton_repo
from ume_edge.client import grpc_inputs
from ume_edge.data import presence_patterns
from ume_edge.runtime import Pipeline
from ume_edge.serving import repository
from ume_edge.serving.server_config import Endpoints, free_ports
from ume_edge.serving.tritonserver import TritonServer

grpcclient = pytest.importorskip("tritonclient.grpc")
text_format = pytest.importorskip("google.protobuf.text_format")
from tritonclient.grpc import model_config_pb2  # noqa: E402

ATOL = 1e-5


def _configs(repository):
    """Every model's config.pbtxt parsed with Triton's own protobuf schema."""
    return {path.parent.name: text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())
            for path in sorted(repository.glob("*/config.pbtxt"))}


def _manifest(engines):
    return engine_dir.load(engines)


@pytest.fixture(scope="module")
def pipeline(int8_engines):
    return Pipeline.load(int8_engines)


def _assert_common_config(configs, manifest, instances=1):
    names = manifest.modality_names
    assert set(configs) == {"ume", "fusion", *[f"ume_{name}" for name in names]}
    for name, config in configs.items():
        assert config.name == name
        assert config.max_batch_size == manifest.max_batch
        assert config.HasField("dynamic_batching"), name
        assert [group.count for group in config.instance_group] == [instances], name
    entry = configs["ume"]
    assert entry.backend == "python"
    assert [tensor.name for tensor in entry.input] == [*names, "present"]  # the BLS entry takes the mask too
    assert all(tensor.optional for tensor in entry.input)
    assert [list(tensor.dims) for tensor in entry.input] == [m.shape for m in manifest.modalities] + [[len(names)]]
    assert {tensor.name for tensor in entry.output} == {"logits", "probs", "label"}
    parameters = {key: value.string_value for key, value in entry.parameters.items()}
    assert json.loads(parameters["encoder_models"]) == {name: f"ume_{name}" for name in names}
    assert parameters["fusion_model"] == "fusion"


def test_onnxruntime_repository_layout(int8_engines, tmp_path):
    """``--encoder-backend onnxruntime`` (the default for ONNX engine directories): ``onnxruntime_onnx`` models with the
    engine files copied as ``1/model.onnx``. The tritonserver in the nvidia-pytriton wheel has only the python
    backend, so this layout cannot be served here; an NGC Triton container serves it as written."""
    written = repository.write_repository(int8_engines, tmp_path, max_queue_delay_us=250, instances=2)
    assert {path.name for path in written} == set(_configs(tmp_path))
    manifest = _manifest(int8_engines)
    configs = _configs(tmp_path)
    _assert_common_config(configs, manifest, instances=2)
    for modality in manifest.modalities:
        config = configs[f"ume_{modality.name}"]
        assert config.platform == "onnxruntime_onnx"
        assert config.dynamic_batching.max_queue_delay_microseconds == 250
        assert [tensor.name for tensor in config.input] == [modality.name]
        assert not config.input[0].optional
        copied = tmp_path / config.name / "1" / "model.onnx"
        assert copied.read_bytes() == (int8_engines / modality.engine.path).read_bytes()
    assert configs["fusion"].platform == "onnxruntime_onnx"
    modalities, classes = len(manifest.modalities), manifest.model.num_classes
    assert [list(t.dims) for t in configs["fusion"].input] == [[modalities, classes], [modalities]]
    assert (tmp_path / "ume" / "1" / "model.py").read_text() == (repository.template_dir() / "ume_bls.py").read_text()


def test_rewriting_keeps_other_files_and_reports_problems(int8_engines, tmp_path, capsys):
    (tmp_path / "README.md").write_text("keep me")
    assert triton_repo.main(["--engines", str(int8_engines), "--out", str(tmp_path)]) == 0
    python = ["--engines", str(int8_engines), "--out", str(tmp_path), "--encoder-backend", "python"]
    assert triton_repo.main(python) == 0
    assert (tmp_path / "README.md").read_text() == "keep me"
    assert _configs(tmp_path)["ume_image"].backend == "python"
    assert triton_repo.main(["--engines", str(tmp_path / "nowhere"), "--out", str(tmp_path)]) == 2
    assert "python -m ume_edge.build" in capsys.readouterr().err
    (tmp_path / "ume_audio" / "config.pbtxt").write_text('name: "ume_audio"\n')  # a model someone else wrote
    assert triton_repo.main(["--engines", str(int8_engines), "--out", str(tmp_path)]) == 2
    assert "was not written by ume-edge" in capsys.readouterr().err
    assert (tmp_path / "ume_audio" / "config.pbtxt").read_text() == 'name: "ume_audio"\n'


def test_python_repository_layout(int8_engines, tmp_path):
    repository.write_repository(int8_engines, tmp_path, encoder_backend="python")
    configs = _configs(tmp_path)
    _assert_common_config(configs, _manifest(int8_engines))
    for name, config in configs.items():
        assert config.backend == "python" and config.platform == ""
        assert (tmp_path / name / "1" / "model.py").is_file()
        if name != "ume":
            assert (tmp_path / name / "1" / "model.onnx").is_file()


def test_pipeline_entry_layout(int8_engines, tmp_path):
    """``--entry pipeline``: ``ume`` runs the whole Pipeline in Triton's Python stub on a copy of the engine directory
    (``serve --runtime python-backend`` serves it; its tests check the answers)."""
    repository.write_repository(int8_engines, tmp_path, encoder_backend="python", entry="pipeline", threads=1)
    configs = _configs(tmp_path)
    manifest = _manifest(int8_engines)
    assert set(configs) == {"ume", *[f"ume_{name}" for name in manifest.modality_names]}
    entry = configs["ume"]
    assert entry.backend == "python" and all(tensor.optional for tensor in entry.input)
    assert entry.HasField("dynamic_batching") and entry.instance_group[0].count == 1
    template = repository.template_dir() / "ume_pipeline.py"
    assert (tmp_path / "ume" / "1" / "model.py").read_text() == template.read_text()
    assert engine_dir.load(tmp_path / "ume" / "1" / "engines") == manifest
    assert configs["ume_image"].parameters["intra_op_threads"].string_value == "1"


# ---------------------------------------------------------------------------------------------------------------
# the wheel's tritonserver serving the --encoder-backend python repository


@pytest.fixture(scope="module")
def standalone(int8_engines, tmp_path_factory):
    pytest.importorskip("pytriton")  # ships the tritonserver binary
    folder = tmp_path_factory.mktemp("triton_models")
    repository.write_repository(int8_engines, folder, encoder_backend="python", max_queue_delay_us=2000)
    with TritonServer(folder, Endpoints("127.0.0.1", *free_ports(3))) as server:
        yield server


@pytest.fixture(scope="module")
def client(standalone):
    with grpcclient.InferenceServerClient(standalone.grpc_url) as connection:
        yield connection


@pytest.fixture(scope="module")
def samples(avdigits_test):
    return {name: array[:16] for name, array in avdigits_test[0].items()}


def _reference(pipeline, arrays):
    return pipeline.infer({spec.name: arrays.get(spec.name) for spec in pipeline.modalities})


def _assert_same(result, reference):
    np.testing.assert_allclose(result.as_numpy("logits"), reference.logits, atol=ATOL)
    np.testing.assert_allclose(result.as_numpy("probs"), reference.probs, atol=ATOL)
    np.testing.assert_array_equal(result.as_numpy("label").reshape(-1), reference.labels)


@pytest.mark.triton
@pytest.mark.parametrize("batch", [1, 5])
def test_standalone_every_pattern_equals_the_pipeline(client, pipeline, samples, batch):
    for pattern in presence_patterns([spec.name for spec in pipeline.modalities]):
        arrays = {name: samples[name][:batch] for name in pattern}
        _assert_same(client.infer("ume", grpc_inputs(arrays)), _reference(pipeline, arrays))


@pytest.mark.triton
def test_standalone_concurrent_mixed_patterns_with_a_bad_one(standalone, pipeline, samples):
    patterns = presence_patterns([spec.name for spec in pipeline.modalities])
    jobs = [{name: samples[name][i:i + 1 + i % 3] for name in patterns[i % len(patterns)]} for i in range(12)]
    bad = samples["image"][:2].copy()
    bad[1, 0, 4, 4] = np.nan
    jobs.insert(5, {"image": bad})
    answers = [None] * len(jobs)
    done = threading.Semaphore(0)
    with grpcclient.InferenceServerClient(standalone.grpc_url) as connection:
        for index, arrays in enumerate(jobs):
            def callback(result, error, index=index):
                answers[index] = (result, error)
                done.release()
            connection.async_infer("ume", grpc_inputs(arrays), callback)
        for _ in jobs:
            assert done.acquire(timeout=60)
    assert "nan" in str(answers[5][1]).lower() and "image" in str(answers[5][1])
    for index, (arrays, (result, error)) in enumerate(zip(jobs, answers, strict=True)):
        if index != 5:
            assert error is None, error
            _assert_same(result, _reference(pipeline, arrays))


@pytest.mark.triton
def test_standalone_bad_requests_name_the_problem(client, pipeline, samples):
    image = samples["image"][:2]
    bad = {
        "0 inputs": {},
        "shape": {"image": image[:, :, :20]},
        "data-type": {"image": image.astype(np.float64)},
        "video": {"image": image, "video": image},
        "batch": {"image": np.zeros((pipeline.max_batch + 1, *image.shape[1:]), np.float32)},
    }
    valid = {"audio": samples["audio"][:2]}
    for expected, arrays in bad.items():
        with pytest.raises(Exception) as raised:
            client.infer("ume", grpc_inputs(arrays))
        assert expected in str(raised.value), raised.value
        _assert_same(client.infer("ume", grpc_inputs(valid)), _reference(pipeline, valid))


@pytest.mark.triton
def test_start_fails_with_the_server_log_for_a_broken_repository(tmp_path):
    pytest.importorskip("pytriton")  # ships the tritonserver binary
    broken = tmp_path / "repo" / "ume_broken"
    (broken / "1").mkdir(parents=True)
    (broken / "config.pbtxt").write_text('backend: "python"\nmax_batch_size: 1\n')
    (broken / "1" / "model.py").write_text("raise RuntimeError('this model cannot load')\n")
    server = TritonServer(tmp_path / "repo", Endpoints("127.0.0.1", *free_ports(3)))
    with pytest.raises(Exception) as raised:
        server.start(timeout_s=60)
    assert "this model cannot load" in str(raised.value)
    assert server.process.poll() is not None
    server.log_path.unlink(missing_ok=True)


def test_cli_defaults_to_the_reference_build(tmp_path, int8_engines):
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "ume_edge.triton_repo", "--out", str(tmp_path / "repo")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (tmp_path / "repo").iterdir()) == ["fusion", "ume", "ume_audio", "ume_image"]
    assert "python -m ume_edge.serve --repository" in result.stderr
