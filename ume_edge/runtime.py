"""``Pipeline``: loads an engine directory, runs only the present modalities, fuses. Never imports torch.

    pipeline = Pipeline.load("engines/avdigits-int8-onnxruntime")
    result = pipeline.infer({"image": images, "audio": None})           # audio absent for the whole batch
    result = pipeline.infer(inputs, present={"audio": audio_ok})         # per-row masks; absent rows skip the engine
    result.logits, result.probs, result.labels
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ume_edge import backends, engine_dir
from ume_edge.backends.base import OpenOptions
from ume_edge.errors import EngineMismatch, InputError, UmeEdgeError


@dataclass(frozen=True)
class ModalitySpec:
    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    value_range: tuple[int, int] | None = None  # valid integer ids [low, high), when the build could tell


class PipelineClosed(UmeEdgeError):
    """``infer`` on a Pipeline that was closed (or is closing)."""


def check_values(spec: ModalitySpec, x: np.ndarray) -> None:
    """Refuse what the engines would answer wrongly: NaN or Inf, and integer ids outside the modality's range (an
    ONNX Gather wraps negative ids around and fails on ids past the table)."""
    if spec.dtype.kind == "f" and not np.isfinite(x).all():
        bad = int(np.count_nonzero(~np.isfinite(x)))
        raise InputError(f"modality {spec.name!r}: {bad} NaN or Inf value(s); clean the sensor data first", "nan")
    if spec.dtype.kind not in "iu":
        return
    low, high = spec.value_range or (0, None)
    outside = (x < low) if high is None else (x < low) | (x >= high)
    if outside.any():
        rows = np.flatnonzero(outside.reshape(len(x), -1).any(axis=1))
        valid = f"[{low}, {high})" if high is not None else f"{low} or more"
        raise InputError(f"modality {spec.name!r}: value {x[outside][0]} (rows {rows[:8].tolist()}) is outside the "
                         f"valid ids {valid}; send ids the model was trained with", "range")


class CheckedEncoder:
    """One modality's engine that refuses the values ``check_values`` refuses, as an ``InputError``."""

    def __init__(self, engine, spec: ModalitySpec):
        self.engine, self.spec = engine, spec
        self.input_names, self.output_names = engine.input_names, engine.output_names

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        check_values(self.spec, feeds[self.spec.name])
        return self.engine.infer(feeds)

    def close(self) -> None:
        self.engine.close()


@dataclass
class Prediction:
    logits: np.ndarray
    probs: np.ndarray
    present: np.ndarray  # bool [B, M], modalities in Pipeline.modality_names order

    @property
    def labels(self) -> np.ndarray:
        return self.logits.argmax(axis=1)


class Pipeline:
    """Per-modality engines and the fusion kernel of one engine directory. Close it (or use ``with``) to free them."""

    def __init__(self, path: Path, manifest: engine_dir.Manifest, executor, options: OpenOptions = OpenOptions()):
        self.path, self.manifest, self.executor, self.options = path, manifest, executor, options
        self.modalities = [ModalitySpec(m.name, tuple(m.shape), np.dtype(m.dtype),
                                        None if m.value_range is None else tuple(m.value_range))
                           for m in (manifest.modality(n) for n in manifest.fusion.modality_order)]
        self.modality_names = [m.name for m in self.modalities]
        self.max_batch = manifest.max_batch
        self.num_classes = manifest.model.num_classes
        self.class_names = manifest.model.class_names
        self._state = threading.Condition()  # guards executor, _closing and _running
        self._closing, self._running = False, 0

    @classmethod
    def load(cls, path: str | Path, threads: int | None = None, options: OpenOptions | None = None) -> "Pipeline":
        """Open an engine directory after checking it (``engine_dir.load``) and that it fits this machine."""
        path = Path(path)
        options = options or OpenOptions(threads=threads)  # refuses threads this machine cannot have
        manifest = engine_dir.load(path)
        if manifest.export_only:
            raise EngineMismatch(f"{path} was written with --export-only: it holds the files to build engines on the "
                                 "target, not engines. There, run one of its build_plans_*.sh scripts and then "
                                 f"`python -m ume_edge.build --adopt {path}`, or `python -m ume_edge.build --backend "
                                 f"{manifest.backend}`")
        backend = backends.get(manifest.backend)
        backend.check_compatible(manifest, options)
        return cls(path, manifest, backend.open(path, manifest, options), options)

    def open_encoder(self, name: str) -> CheckedEncoder:
        """One modality's engine on its own, ``infer({name: x}) -> {"partial_logits": ...}`` (to serve or time an
        encoder alone), refusing values as ``infer`` does; the caller closes it."""
        manifest = self.manifest
        engine = backends.get(manifest.backend).open_engine(self.path / manifest.modality(name).engine.path,
                                                            self.options, manifest.device)
        return CheckedEncoder(engine, next(spec for spec in self.modalities if spec.name == name))

    def close(self) -> None:
        """Free the engines once the inferences already running have finished; later ones raise
        ``PipelineClosed``. Safe to call twice."""
        with self._state:
            self._closing = True
            self._state.wait_for(lambda: self._running == 0)
            executor, self.executor = self.executor, None
        if executor is not None:
            executor.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def infer(self, inputs: dict[str, np.ndarray | None], present: dict[str, np.ndarray] | None = None) -> Prediction:
        with self._state:
            if self._closing:
                raise PipelineClosed(f"the pipeline of {self.path} is closed; load it again with Pipeline.load")
            self._running += 1
        try:
            return self._infer(inputs, present)
        finally:
            with self._state:
                self._running -= 1
                self._state.notify_all()

    def _infer(self, inputs, present) -> Prediction:
        given, batch = self._validate(inputs)
        mask = self._presence(given, {} if present is None else present, batch)
        try:
            return Prediction(*self.executor.infer(given, mask), mask)
        except UmeEdgeError:
            raise
        except Exception as error:  # a runtime's own exception types; the caller needs ours and the cause
            raise UmeEdgeError(f"the {self.manifest.backend} engines of {self.path} failed on a batch of {batch} "
                               f"({', '.join(given)} present): {type(error).__name__}: {error}") from error

    def _validate(self, inputs) -> tuple[dict[str, np.ndarray], int]:
        if not isinstance(inputs, dict):
            raise InputError(f"inputs must be a dict of modality name -> array, got {type(inputs).__name__}",
                             "unknown_input")
        unknown = sorted(map(repr, set(inputs) - set(self.modality_names)))
        if unknown:
            raise InputError(f"unknown modality {', '.join(unknown)}; this model takes "
                             f"{', '.join(self.modality_names)}", "unknown_input")
        given = {spec.name: self._check_array(spec, inputs[spec.name]) for spec in self.modalities
                 if inputs.get(spec.name) is not None}
        if not given:
            raise InputError(f"no modality present: give at least one of {', '.join(self.modality_names)}",
                             "no_modality")
        batches = {name: len(x) for name, x in given.items()}
        if len(set(batches.values())) != 1:
            raise InputError(f"batch sizes differ between modalities: {batches}", "shape")
        return given, next(iter(batches.values()))

    def _check_array(self, spec: ModalitySpec, x) -> np.ndarray:
        if type(x) is not np.ndarray:  # a masked array, a matrix or a memmap subclass would hide or change values
            raise InputError(f"modality {spec.name!r}: expected a plain numpy array, got {type(x).__name__}; pass "
                             "np.asarray(...) of the values you mean (fill masked values first)", "dtype")
        if x.dtype != spec.dtype:
            raise InputError(f"modality {spec.name!r}: expected dtype {spec.dtype}, got {x.dtype}", "dtype")
        if x.ndim != len(spec.shape) + 1 or tuple(x.shape[1:]) != spec.shape:
            raise InputError(f"modality {spec.name!r}: expected shape [batch, {', '.join(map(str, spec.shape))}], "
                             f"got {list(x.shape)}", "shape")
        if len(x) == 0:
            raise InputError(f"modality {spec.name!r}: empty batch (0 rows)", "shape")
        if len(x) > self.max_batch:
            raise InputError(f"modality {spec.name!r}: batch of {len(x)} is above the built maximum "
                             f"{self.max_batch}; split it, or rebuild with --max-batch {len(x)}", "batch_size")
        check_values(spec, x)
        return np.ascontiguousarray(x)

    def _presence(self, given: dict[str, np.ndarray], present, batch: int) -> np.ndarray:
        if not isinstance(present, dict):
            raise InputError(f"present must be a dict of modality name -> bool array of shape ({batch},), got "
                             f"{type(present).__name__}", "mask")
        if not present:  # whole-batch presence: every row holds the given modalities, and there is at least one
            mask = np.empty((batch, len(self.modalities)), bool)
            mask[:] = [name in given for name in self.modality_names]
            return mask
        unknown = sorted(map(repr, set(present) - set(self.modality_names)))
        if unknown:
            raise InputError(f"present names unknown modality {', '.join(unknown)}", "mask")
        mask = np.zeros((batch, len(self.modalities)), bool)
        for i, spec in enumerate(self.modalities):
            if spec.name not in given:
                if spec.name in present and np.any(present[spec.name]):
                    raise InputError(f"present[{spec.name!r}] marks rows present but no {spec.name!r} input was "
                                     "given", "mask")
                continue
            if spec.name not in present:
                mask[:, i] = True
                continue
            rows = present[spec.name]
            if type(rows) is not np.ndarray or rows.shape != (batch,) or rows.dtype != bool:
                raise InputError(f"present[{spec.name!r}] must be a bool numpy array of shape ({batch},), got "
                                 f"{getattr(rows, 'dtype', type(rows).__name__)} {list(np.shape(rows))}", "mask")
            mask[:, i] = rows
        empty = np.flatnonzero(~mask.any(axis=1))
        if len(empty):
            raise InputError(f"rows {empty[:10].tolist()} have no modality present; drop them or give at least one "
                             "modality", "no_modality")
        return mask
