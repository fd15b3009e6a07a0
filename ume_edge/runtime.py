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
from ume_edge.errors import EngineMismatch, UmeEdgeError, refusals_as_input_errors
from ume_edge.serving import contract


class PipelineClosed(UmeEdgeError):
    """``infer`` on a Pipeline that was closed (or is closing)."""


class CheckedEncoder:
    """One modality's engine that refuses the values ``contract.check_values`` refuses, as an ``InputError``."""

    def __init__(self, engine, spec: contract.ModalitySpec):
        self.engine, self.spec = engine, spec
        self.input_names, self.output_names = engine.input_names, engine.output_names

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with refusals_as_input_errors():
            contract.check_values(self.spec, feeds[self.spec.name])
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

    def __init__(self, path: Path, manifest: engine_dir.Manifest, executor,
                 options: OpenOptions | None = None):
        self.path, self.manifest, self.executor = path, manifest, executor
        self.options = options or OpenOptions()
        self.modalities = [contract.ModalitySpec(m.name, tuple(m.shape), np.dtype(m.dtype),
                                        None if m.value_range is None else (m.value_range[0], m.value_range[1]))
                           for m in (manifest.modality(n) for n in manifest.fusion.modality_order)]
        self.modality_names = [m.name for m in self.modalities]
        self.max_batch = manifest.max_batch
        self.num_classes = manifest.model.num_classes
        self.class_names = manifest.model.class_names
        self._state = threading.Condition()  # guards executor, _closing and _running
        self._closing, self._running = False, 0

    @classmethod
    def load(cls, path: str | Path, threads: int | None = None, options: OpenOptions | None = None) -> Pipeline:
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
        engine_path = self.path / engine_dir.schema.engine_file(manifest.modality(name)).path
        engine = backends.get(manifest.backend).open_engine(engine_path, self.options, manifest.device)
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
        given, mask = self._validate(inputs, present)
        try:
            logits, probs = self.executor.infer(given, mask)
            return Prediction(logits, probs, mask)
        except UmeEdgeError:
            raise
        except Exception as error:  # a runtime's own exception types; the caller needs ours and the cause
            raise UmeEdgeError(f"the {self.manifest.backend} engines of {self.path} failed on a batch of {len(mask)} "
                               f"({', '.join(given)} present): {type(error).__name__}: {error}") from error

    def _validate(self, inputs, present) -> tuple[dict[str, np.ndarray], np.ndarray]:
        with refusals_as_input_errors():
            given, batch = contract.check_inputs(inputs, self.modalities, self.max_batch)
            return given, contract.presence_mask(given, {} if present is None else present, self.modality_names,
                                                 batch)
