"""``Pipeline``: loads an engine directory, runs only the present modalities, fuses. Never imports torch.

    pipeline = Pipeline.load("engines/avdigits-int8-onnxruntime")
    result = pipeline.infer({"image": images, "audio": None})           # audio absent for the whole batch
    result = pipeline.infer(inputs, present={"audio": audio_ok})         # per-row masks; absent rows skip the engine
    result.logits, result.probs, result.labels
"""

from __future__ import annotations

import json
import platform
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ume_edge.backends import get_backend, open_engine
from ume_edge.errors import BackendUnavailable, EngineMismatch, InputError

SCHEMA_VERSION = 1


@dataclass(frozen=True)
class ModalitySpec:
    name: str
    shape: tuple[int, ...]
    dtype: np.dtype


@dataclass
class Prediction:
    logits: np.ndarray
    probs: np.ndarray
    present: np.ndarray  # bool [B, M], modalities in Pipeline.modality_names order

    @property
    def labels(self) -> np.ndarray:
        return self.logits.argmax(axis=1)


def file_sha256(path: str | Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(directory: str | Path) -> dict:
    directory = Path(directory)
    path = directory / "manifest.json"
    if not path.is_file():
        raise EngineMismatch(f"{directory} has no manifest.json: it is not an engine directory. Build one with "
                             f"`python -m ume_edge.build --out {directory}`")
    manifest = json.loads(path.read_text())
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise EngineMismatch(f"{path}: schema version {manifest.get('schema_version')}, this ume-edge reads "
                             f"{SCHEMA_VERSION}; rebuild it with this version of `python -m ume_edge.build`")
    return manifest


def verify_files(directory: Path, manifest: dict) -> None:
    """Every engine file is there and matches the hash the build recorded."""
    entries = [(m["name"], m["file"], m["sha256"]) for m in manifest["modalities"]]
    entries.append(("fusion", manifest["fusion"]["file"], manifest["fusion"]["sha256"]))
    for name, file, expected in entries:
        path = directory / file
        if not path.is_file():
            raise EngineMismatch(f"{path} is missing ({name}); rebuild the directory with `python -m ume_edge.build`")
        if file_sha256(path) != expected:
            raise EngineMismatch(f"{path} ({name}) does not match the hash in its manifest: the file was changed "
                                 "or corrupted after the build. Rebuild with `python -m ume_edge.build`")


def check_compatible(manifest: dict) -> None:
    """Refuse a directory built for another backend, runtime version or device."""
    backend = manifest["backend"]
    module = get_backend(backend)
    if manifest.get("export_only"):
        raise EngineMismatch(f"this directory was written with --export-only for {backend}: it holds ONNX files, not "
                             "engines. Build on the target with `python -m ume_edge.build --backend " + backend + "`")
    if backend == "tensorrt":
        module.require()
        module.check_plan_compatible(manifest["device"], module.device_info())
        return
    built, here = manifest["versions"]["onnxruntime"], module.get_version()
    if here is None:
        raise BackendUnavailable("onnxruntime is not installed: pip install onnxruntime")
    if built.split(".")[:2] != here.split(".")[:2]:
        raise EngineMismatch(f"engines built with ONNX Runtime {built}, this machine has {here}: rebuild here with "
                             f"`python -m ume_edge.build` or install onnxruntime=={built}")
    if manifest["device"]["arch"] != platform.machine():
        raise EngineMismatch(f"engines built on {manifest['device']['arch']}, this machine is {platform.machine()}: "
                             "rebuild on this machine with `python -m ume_edge.build`")


class Pipeline:
    """Per-modality engines and the fusion kernel of one engine directory."""

    def __init__(self, path: Path, manifest: dict, engines: dict, fusion, threads: int | None):
        self.path, self.manifest, self.engines, self.fusion, self.threads = path, manifest, engines, fusion, threads
        self.device_pipeline = None
        self.modalities = [ModalitySpec(m["name"], tuple(m["shape"]), np.dtype(m["dtype"]))
                           for m in manifest["modalities"]]
        self.modality_names = [m.name for m in self.modalities]
        self.max_batch = int(manifest["max_batch"])
        self.num_classes = int(manifest["model"]["num_classes"])
        self.class_names = manifest["model"]["class_names"]

    @classmethod
    def load(cls, path: str | Path, threads: int | None = None) -> "Pipeline":
        path = Path(path)
        manifest = read_manifest(path)
        check_compatible(manifest)
        verify_files(path, manifest)
        engines = {m["name"]: open_engine(path / m["file"], threads) for m in manifest["modalities"]}
        pipeline = cls(path, manifest, engines, open_engine(path / manifest["fusion"]["file"], threads), threads)
        if manifest["backend"] == "tensorrt":  # partial logits stay on the GPU between encoders and fusion
            pipeline.device_pipeline = get_backend("tensorrt").DevicePipeline(
                engines, pipeline.fusion, pipeline.modality_names, pipeline.num_classes)
        return pipeline

    def infer(self, inputs: dict[str, np.ndarray | None], present: dict[str, np.ndarray] | None = None) -> Prediction:
        given, batch = self._validate(inputs)
        mask = self._presence(given, present or {}, batch)
        if self.device_pipeline is not None:
            return Prediction(*self.device_pipeline.run(given, mask), mask)
        partial = np.zeros((batch, len(self.modalities), self.num_classes), np.float32)
        for i, (spec, any_row, every_row) in enumerate(zip(self.modalities, mask.any(0), mask.all(0))):
            if not any_row:
                continue
            rows = slice(None) if every_row else mask[:, i]
            partial[rows, i] = self.engines[spec.name].infer({spec.name: given[spec.name][rows]})["partial_logits"]
        fused = self.fusion.infer({"partial_logits": partial, "present": mask.astype(np.float32)})
        return Prediction(fused["logits"], fused["probs"], mask)

    def _validate(self, inputs) -> tuple[dict[str, np.ndarray], int]:
        if not isinstance(inputs, dict):
            raise InputError(f"inputs must be a dict of modality name -> array, got {type(inputs).__name__}")
        unknown = sorted(set(inputs) - set(self.modality_names))
        if unknown:
            raise InputError(f"unknown modality {', '.join(map(repr, unknown))}; this model takes "
                             f"{', '.join(self.modality_names)}")
        given = {spec.name: self._check_array(spec, inputs[spec.name]) for spec in self.modalities
                 if inputs.get(spec.name) is not None}
        if not given:
            raise InputError(f"no modality present: give at least one of {', '.join(self.modality_names)}")
        batches = {name: len(x) for name, x in given.items()}
        if len(set(batches.values())) != 1:
            raise InputError(f"batch sizes differ between modalities: {batches}")
        return given, next(iter(batches.values()))

    def _check_array(self, spec: ModalitySpec, x) -> np.ndarray:
        if not isinstance(x, np.ndarray):
            raise InputError(f"modality {spec.name!r}: expected a numpy array, got {type(x).__name__}")
        if x.dtype != spec.dtype:
            raise InputError(f"modality {spec.name!r}: expected dtype {spec.dtype}, got {x.dtype}")
        if x.ndim != len(spec.shape) + 1 or tuple(x.shape[1:]) != spec.shape:
            raise InputError(f"modality {spec.name!r}: expected shape [batch, {', '.join(map(str, spec.shape))}], "
                             f"got {list(x.shape)}")
        if len(x) == 0:
            raise InputError(f"modality {spec.name!r}: empty batch (0 rows)")
        if len(x) > self.max_batch:
            raise InputError(f"modality {spec.name!r}: batch of {len(x)} is above the built maximum "
                             f"{self.max_batch}; split it, or rebuild with --max-batch {len(x)}")
        if spec.dtype.kind == "f" and not np.isfinite(x).all():
            bad = int(np.count_nonzero(~np.isfinite(x)))
            raise InputError(f"modality {spec.name!r}: {bad} NaN or Inf value(s); clean the sensor data first")
        return np.ascontiguousarray(x)

    def _presence(self, given: dict[str, np.ndarray], present: dict, batch: int) -> np.ndarray:
        if not present:  # whole-batch presence: every row holds the given modalities, and there is at least one
            mask = np.empty((batch, len(self.modalities)), bool)
            mask[:] = [name in given for name in self.modality_names]
            return mask
        unknown = sorted(set(present) - set(self.modality_names))
        if unknown:
            raise InputError(f"present names unknown modality {', '.join(map(repr, unknown))}")
        mask = np.zeros((batch, len(self.modalities)), bool)
        for i, spec in enumerate(self.modalities):
            if spec.name not in given:
                if spec.name in present and np.any(present[spec.name]):
                    raise InputError(f"present[{spec.name!r}] marks rows present but no {spec.name!r} input was given")
                continue
            if spec.name not in present:
                mask[:, i] = True
                continue
            rows = np.asarray(present[spec.name])
            if rows.shape != (batch,) or rows.dtype != bool:
                raise InputError(f"present[{spec.name!r}] must be a bool array of shape ({batch},), got "
                                 f"{rows.dtype} {list(rows.shape)}")
            mask[:, i] = rows
        empty = np.flatnonzero(~mask.any(axis=1))
        if len(empty):
            raise InputError(f"rows {empty[:10].tolist()} have no modality present; drop them or give at least one "
                             "modality")
        return mask
