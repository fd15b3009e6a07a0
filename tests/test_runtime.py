import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from ume_edge.backends.onnxruntime import OnnxRuntimeEngine
from ume_edge.errors import BackendUnavailable, EngineMismatch, InputError, UmeEdgeError
from ume_edge.fusion import softmax
from ume_edge.runtime import Pipeline


@pytest.fixture(scope="module")
def pipeline(int8_engines):
    return Pipeline.load(int8_engines)


@pytest.fixture
def batch(avdigits_test):
    return {n: x[:8].copy() for n, x in avdigits_test[0].items()}


def test_serving_path_does_not_import_torch(int8_engines):
    code = ("import sys; from ume_edge.runtime import Pipeline; import numpy as np\n"
            f"p = Pipeline.load({str(int8_engines)!r})\n"
            "p.infer({'image': np.zeros((1, 1, 28, 28), np.float32)})\n"
            "assert 'torch' not in sys.modules, 'torch was imported'")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_every_pattern_answers_and_probs_are_a_softmax(pipeline, batch):
    for present in ({"audio", "image"}, {"audio"}, {"image"}):
        result = pipeline.infer({n: (x if n in present else None) for n, x in batch.items()})
        assert result.logits.shape == result.probs.shape == (8, 10)
        np.testing.assert_allclose(result.probs, softmax(result.logits), atol=1e-5)
        assert result.labels.shape == (8,)


def test_per_row_masks_equal_separate_calls_and_skip_absent_rows(pipeline, batch, monkeypatch):
    audio_ok = np.array([True, False, True, True, False, True, True, True])
    calls = []
    original = OnnxRuntimeEngine.infer

    def spy(engine, feeds):
        calls.extend((name, len(x)) for name, x in feeds.items())
        return original(engine, feeds)

    monkeypatch.setattr(OnnxRuntimeEngine, "infer", spy)
    mixed = pipeline.infer(batch, present={"audio": audio_ok})
    monkeypatch.undo()
    assert ("audio", int(audio_ok.sum())) in calls  # rows without audio never reached the audio engine
    assert ("audio", len(audio_ok)) not in calls
    both = pipeline.infer({n: x[audio_ok] for n, x in batch.items()})
    image_only = pipeline.infer({"image": batch["image"][~audio_ok], "audio": None})
    np.testing.assert_allclose(mixed.logits[audio_ok], both.logits, atol=1e-5)
    np.testing.assert_allclose(mixed.logits[~audio_ok], image_only.logits, atol=1e-5)


def _bad_inputs(batch):
    nan = batch["image"].copy()
    nan[0, 0, 0, 0] = np.nan
    inf = batch["audio"].copy()
    inf[1, 0, 3, 3] = np.inf
    return [
        ({"image": batch["image"][:, :, :27]}, None, "modality 'image': expected shape"),
        ({"image": batch["image"].astype(np.float64)}, None, "modality 'image': expected dtype float32"),
        ({"image": nan}, None, "modality 'image': 1 NaN or Inf"),
        ({"audio": inf}, None, "modality 'audio': 1 NaN or Inf"),
        ({"lidar": batch["image"]}, None, "unknown modality 'lidar'"),
        ({"image": None, "audio": None}, None, "no modality present"),
        ({}, None, "no modality present"),
        ({"image": batch["image"][:0]}, None, "empty batch"),
        ({"image": np.zeros((65, 1, 28, 28), np.float32)}, None, "above the built maximum 64"),
        ({"image": batch["image"], "audio": batch["audio"][:4]}, None, "batch sizes differ"),
        (batch, {"image": np.zeros(8, bool), "audio": np.arange(8) < 4}, r"rows \[4, 5, 6, 7\] have no modality"),
        (batch, {"image": np.ones(3, bool)}, r"present\['image'\] must be a bool numpy array of shape \(8,\)"),
        (batch, {"image": [True] * 8}, r"present\['image'\] must be a bool numpy array"),
        (batch, np.ones((8, 2), bool), "present must be a dict"),
        ({"image": batch["image"].tolist()}, None, "expected a plain numpy array, got list"),
        ({"image": np.ma.masked_array(nan, mask=np.isnan(nan))}, None, "expected a plain numpy array, got "
                                                                        "MaskedArray"),
        ({0: batch["image"]}, None, "unknown modality 0"),
        ({("image",): batch["image"]}, None, r"unknown modality \('image',\)"),
    ]


def test_bad_input_is_refused_clearly_and_the_pipeline_keeps_working(pipeline, batch):
    expected = pipeline.infer(batch).logits
    for inputs, present, message in _bad_inputs(batch):
        with pytest.raises(InputError, match=message):
            pipeline.infer(inputs, present=present)
        np.testing.assert_array_equal(pipeline.infer(batch).logits, expected)


@pytest.fixture
def copy_of(int8_engines, tmp_path):
    target = tmp_path / "engines"
    shutil.copytree(int8_engines, target)
    return target


def _edit_manifest(directory, change):
    manifest = json.loads((directory / "manifest.json").read_text())
    change(manifest)
    (directory / "manifest.json").write_text(json.dumps(manifest))


def test_refuses_a_directory_without_manifest(tmp_path):
    with pytest.raises(EngineMismatch, match="no manifest.json.*python -m ume_edge.build"):
        Pipeline.load(tmp_path)


def test_refuses_files_that_do_not_match_their_hash(copy_of):
    with open(copy_of / "image.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(EngineMismatch, match="image.onnx .*does not match the SHA-256"):
        Pipeline.load(copy_of)
    (copy_of / "audio.onnx").unlink()
    with pytest.raises(EngineMismatch, match="audio.onnx is missing"):
        Pipeline.load(copy_of)


def test_refuses_another_runtime_version(copy_of):
    _edit_manifest(copy_of, lambda m: m["versions"].update(onnxruntime="0.9.0"))
    with pytest.raises(EngineMismatch, match="ONNX Runtime 0.9.0.*rebuild"):
        Pipeline.load(copy_of)


def test_refuses_another_device(copy_of):
    _edit_manifest(copy_of, lambda m: m["device"].update(arch="aarch64" if m["device"]["arch"] != "aarch64"
                                                         else "x86_64"))
    with pytest.raises(EngineMismatch, match="rebuild on this machine"):
        Pipeline.load(copy_of)


def test_refuses_another_backend(copy_of):
    _edit_manifest(copy_of, lambda m: m.update(backend="tensorrt"))
    with pytest.raises(BackendUnavailable, match="export-only"):
        Pipeline.load(copy_of)


def test_refuses_an_export_only_directory(copy_of):
    _edit_manifest(copy_of, lambda m: m.update(export_only=True))
    with pytest.raises(EngineMismatch, match="export-only"):
        Pipeline.load(copy_of)


def test_an_engine_failure_is_an_ume_edge_error_naming_the_modality(pipeline, batch, monkeypatch):
    original = OnnxRuntimeEngine.infer

    def failing(engine, feeds):
        if "audio" in feeds:
            raise RuntimeError("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : out of memory")
        return original(engine, feeds)

    monkeypatch.setattr(OnnxRuntimeEngine, "infer", failing)
    with pytest.raises(UmeEdgeError, match="modality 'audio': its engine failed on 8 row.*out of memory"):
        pipeline.infer(batch)
    assert pipeline.infer({"image": batch["image"]}).logits.shape == (8, 10)


def test_a_closed_pipeline_says_so_and_with_closes(int8_engines, batch):
    with Pipeline.load(int8_engines) as pipeline:
        pipeline.infer(batch)
    with pytest.raises(UmeEdgeError, match="closed"):
        pipeline.infer(batch)
    pipeline.close()
