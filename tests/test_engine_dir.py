"""The engine-directory contract: a damaged or tampered directory is refused with an ``EngineMismatch`` that names
the problem, before anything runs, and no file outside the directory is ever opened."""

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from ume_edge import engine_dir
from ume_edge.errors import EngineMismatch
from ume_edge.fusion import FusionParams, fusion_graph
from ume_edge.runtime import Pipeline

ROOT = Path(__file__).resolve().parents[1]


def _doc_tool():
    spec = importlib.util.spec_from_file_location("engine_format_doc", ROOT / "tools" / "engine_format_doc.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_format_document_is_generated_from_the_records():
    tool = _doc_tool()
    text = tool.DOC.read_text()
    assert tool.generated_doc(text) == text, "docs/ENGINE_FORMAT.md is stale: run python tools/engine_format_doc.py"
    for record in ("Manifest", "ModelRecord", "ModalityRecord", "FusionRecord", "FileRecord"):
        assert f"### `{record}`" in text


def test_a_directory_round_trips_through_the_records(int8_engines):
    manifest = engine_dir.load(int8_engines)
    again = engine_dir.parse_manifest(json.loads(json.dumps(manifest.to_json())))
    assert again == manifest


# ---------------------------------------------------------------------------------------------------------------
# tampering: each case edits a copy of a real build and must end in EngineMismatch naming the problem


def _rehash(directory: Path, data: dict) -> None:
    """Rewrite every file record's hash, as someone covering their tracks would."""
    for entry in [*data["modalities"], data["fusion"]]:
        for key in ("engine", "onnx", "calibration"):
            record = entry.get(key)
            if record and (directory / record["path"]).is_file():
                record["sha256"] = engine_dir.file_sha256(directory / record["path"])


def _edit(change, rehash=False):
    def tamper(directory: Path):
        data = json.loads((directory / "manifest.json").read_text())
        change(data, directory)
        if rehash:
            _rehash(directory, data)
        (directory / "manifest.json").write_text(json.dumps(data))
    return tamper


def _write(text: bytes):
    return lambda directory: (directory / "manifest.json").write_bytes(text)


def _swap_engines(data, directory):
    audio, image = directory / "audio.onnx", directory / "image.onnx"
    audio_bytes = audio.read_bytes()
    audio.write_bytes(image.read_bytes())
    image.write_bytes(audio_bytes)


def _replace_fusion_with_mma(data, directory):
    params = FusionParams("mma", data["fusion"]["modality_order"], data["model"]["num_classes"],
                          np.ones((2, data["model"]["num_classes"]), np.float32))
    onnx.save(fusion_graph(params), str(directory / "fusion.onnx"))


def _garbage_engine(data, directory):
    (directory / "image.onnx").write_bytes(b"not an onnx file at all")


def _ten_more_classes(data, directory):
    data["model"]["num_classes"] = 20
    data["model"]["class_names"] = [str(i) for i in range(20)]


def _link_out(data, directory):
    (directory / "audio.onnx").unlink()
    (directory / "audio.onnx").symlink_to(directory.parent / "outside.onnx")


def _modality(name):
    return lambda data: next(m for m in data["modalities"] if m["name"] == name)


AUDIO = _modality("audio")

TAMPERING = {
    "invalid JSON": (_write(b"{not json"), "cannot be read as JSON"),
    "empty file": (_write(b""), "cannot be read as JSON"),
    "not an object": (_write(b"[1, 2]"), "not a JSON object"),
    "not UTF-8": (_write(b"\xff\xfe\x00"), "cannot be read as JSON"),
    "older schema": (_edit(lambda d, _: d.update(schema_version=1)), "schema version 1"),
    "no format": (_edit(lambda d, _: d.pop("format")), "format None"),
    "missing model": (_edit(lambda d, _: d.pop("model")), "model: missing"),
    "missing shape": (_edit(lambda d, _: AUDIO(d).pop("shape")), r"modalities\[0\].shape: missing"),
    "unknown backend": (_edit(lambda d, _: d.update(backend="openvino")), "backend: 'openvino'"),
    "max_batch a word": (_edit(lambda d, _: d.update(max_batch="abc")), "max_batch: expected int"),
    "max_batch zero": (_edit(lambda d, _: d.update(max_batch=0)), "max_batch: 0 is below 1"),
    "max_batch a bool": (_edit(lambda d, _: d.update(max_batch=True)), "max_batch: expected int"),
    "bogus dtype": (_edit(lambda d, _: AUDIO(d).update(dtype="bogus")), r"dtype: 'bogus'"),
    "bogus precision": (_edit(lambda d, _: d.update(precision="int4")), "precision: 'int4'"),
    "negative shape": (_edit(lambda d, _: AUDIO(d).update(shape=[1, -40, 48])), "must be positive"),
    "shape of words": (_edit(lambda d, _: AUDIO(d).update(shape=["1"])), r"shape\[0\]: expected int"),
    "class names short": (_edit(lambda d, _: d["model"].update(class_names=["a"])), "1 class names"),
    "class names not text": (_edit(lambda d, _: d["model"].update(class_names=list(range(10)))),
                             r"class_names\[0\]: expected str"),
    "unknown fusion": (_edit(lambda d, _: d["fusion"].update(mode="sum")), "fusion.mode: 'sum'"),
    "fusion order": (_edit(lambda d, _: d["fusion"].update(modality_order=["audio", "video"])), "modality_order"),
    "constants for UME": (_edit(lambda d, _: d["fusion"].update(constants=[[0.0]])), "fusion.constants"),
    "no modalities": (_edit(lambda d, _: d.update(modalities=[])), "at least one"),
    "duplicate modality": (_edit(lambda d, _: d["modalities"].append(dict(d["modalities"][0]))), "unique"),
    "hash a number": (_edit(lambda d, _: AUDIO(d)["engine"].update(sha256=7)), "sha256: expected str"),
    "no engine": (_edit(lambda d, _: AUDIO(d).update(engine=None)), "no engine file, yet export_only is false"),
    "absolute path": (_edit(lambda d, _: AUDIO(d)["engine"].update(path="/etc/hostname")), "leads out"),
    "dot-dot path": (_edit(lambda d, _: AUDIO(d)["engine"].update(path="../outside.onnx")), "leads out"),
    "link out": (_edit(_link_out), "link that leads out"),
    "missing file": (lambda d: (d / "image.onnx").unlink(), "image.onnx is missing"),
    "a folder as a file": (_edit(lambda d, directory: (directory / "sub").mkdir() or AUDIO(d)["engine"].update(
        path="sub")), "sub is missing"),
    "changed file": (lambda d: (d / "image.onnx").open("ab").write(b"\0"), "does not match the SHA-256"),
    "swapped engines, hashes rewritten": (_edit(_swap_engines, rehash=True), "does not belong to this directory"),
    "fusion replaced, hashes rewritten": (_edit(_replace_fusion_with_mma, rehash=True),
                                          "does not compute the UME fusion"),
    "garbage engine, hashes rewritten": (_edit(_garbage_engine, rehash=True), "not a readable ONNX file"),
    "num_classes changed": (_edit(_ten_more_classes), "does not belong to this directory"),
    "shape changed": (_edit(lambda d, _: AUDIO(d).update(shape=[1, 40, 40])), "does not belong to this directory"),
    "dtype changed": (_edit(lambda d, _: AUDIO(d).update(dtype="int64")), "does not belong to this directory"),
    "export only with engines": (_edit(lambda d, _: d.update(export_only=True)), "export-only"),
    "runtime missing from versions": (_edit(lambda d, _: d["versions"].pop("onnxruntime")), "ONNX Runtime None"),
    "device without arch": (_edit(lambda d, _: d["device"].pop("arch")), "rebuild on this machine"),
}


class OpenedFiles:
    """Every path this process opens while ``watching`` (Python's audit hook ``open`` event)."""

    def __init__(self):
        self.watching, self.paths = False, []
        sys.addaudithook(self._hook)

    def _hook(self, event, args):
        if self.watching and event == "open" and isinstance(args[0], (str, bytes, Path)):
            self.paths.append(Path(args[0] if not isinstance(args[0], bytes) else args[0].decode()).resolve())


@pytest.fixture(scope="module")
def opened():
    return OpenedFiles()


@pytest.mark.parametrize("case", list(TAMPERING))
def test_tampering_is_refused_naming_the_problem_and_nothing_outside_is_opened(case, int8_engines, tmp_path,
                                                                                opened):
    tamper, message = TAMPERING[case]
    directory = tmp_path / "engines"
    shutil.copytree(int8_engines, directory)
    outside = tmp_path / "outside.onnx"
    shutil.copyfile(int8_engines / "audio.onnx", outside)  # same bytes: only a path check can refuse it
    tamper(directory)
    opened.watching, opened.paths = True, []
    try:
        with pytest.raises(EngineMismatch, match=message):
            Pipeline.load(directory)
    finally:
        opened.watching = False
    assert (directory / "manifest.json").resolve() in opened.paths  # the hook does see what is opened
    assert outside.resolve() not in opened.paths
    assert Path("/etc/hostname").resolve() not in opened.paths


def test_every_file_record_must_stay_inside(tmp_path):
    for bad in ("", "/abs", "a/../../b", "..", "a\\b"):
        with pytest.raises(EngineMismatch, match="leads out"):
            engine_dir.inside(tmp_path, bad, "here")
    assert engine_dir.inside(tmp_path, "tensorrt/a.onnx", "here") == tmp_path / "tensorrt" / "a.onnx"
