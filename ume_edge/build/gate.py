"""The accuracy gate: score each modality's INT8 candidate per presence pattern against the fp32 PyTorch model, try
the other calibration methods when it costs more than ``--max-drop``, and fall back when none keeps within it."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ume_edge.backends.onnxruntime import OnnxRuntimeEngine
from ume_edge.build.progress import note
from ume_edge.build.quantize import CALIB_METHODS, QuantizedFiles, Quantizer
from ume_edge.constants import PARTIAL_LOGITS
from ume_edge.data import pattern_key, presence_patterns
from ume_edge.errors import BuildError
from ume_edge.fusion import FusionParams, fuse
from ume_edge.metrics import percent_equal

LOGGER = logging.getLogger(__name__)
EVAL_BATCH = 256


@dataclass
class Candidate:
    """One way to run one modality: a file for ONNX Runtime on a CPU, the file TensorRT would build from, its
    precision, and how it scored in the accuracy gate."""

    precision: str
    file: Path
    tensorrt_file: Path
    method: str | None = None
    quant_format: str | None = None
    calibration_cache: Path | None = None
    tensorrt_problems: list[str] = field(default_factory=list)
    max_drop: float | None = None
    drops: dict = field(default_factory=dict)


def _onnxruntime_opener(threads: int | None) -> Callable[[Path], OnnxRuntimeEngine]:
    return lambda path: OnnxRuntimeEngine(path, threads)


class Evaluator:
    """Scores engine files per presence pattern against the fp32 PyTorch model.

    Fusion is linear in the partial logits, so each engine runs once over the evaluation data and every pattern is
    then a fusion of cached partial logits. Each engine is closed as soon as its partial logits are computed. Engines
    get at most ``max_batch`` rows a call: a TensorRT plan refuses a batch above its profile.
    """

    def __init__(self, model, inputs: dict[str, np.ndarray], labels: np.ndarray | None, threads: int | None,
                 max_batch: int = EVAL_BATCH):
        from ume_edge.metrics import predictions_by_pattern
        from ume_edge.train import torch_predictor

        self.inputs, self.labels = inputs, labels
        self.batch = min(EVAL_BATCH, max_batch)
        self.open_onnx = _onnxruntime_opener(threads)
        self.params = FusionParams.from_model(model)
        self.names = model.modality_names
        self.reference = predictions_by_pattern(torch_predictor(model), inputs)
        self.metric = "accuracy" if labels is not None else "agreement with fp32 PyTorch"
        self.partials: dict[tuple[str, Path], np.ndarray] = {}

    def score(self, predicted: np.ndarray, key: str) -> float:
        truth = self.labels if self.labels is not None else self.reference[key]
        return percent_equal(predicted, truth)

    def partial(self, name: str, file: Path, open_engine: Callable | None = None) -> np.ndarray:
        if (name, file) not in self.partials:
            engine = (open_engine or self.open_onnx)(file)
            try:
                x = self.inputs[name]
                self.partials[name, file] = np.concatenate(
                    [engine.infer({name: x[i:i + self.batch]})[PARTIAL_LOGITS] for i in range(0, len(x), self.batch)])
            finally:
                engine.close()
        return self.partials[name, file]

    def pattern_predictions(self, files: dict[str, Path], pattern, open_engine=None) -> np.ndarray:
        count = len(next(iter(self.inputs.values())))
        partial = np.zeros((count, len(self.names), self.params.num_classes), np.float32)
        present = np.zeros((count, len(self.names)), bool)
        for i, name in enumerate(self.names):
            if name in pattern:
                partial[:, i], present[:, i] = self.partial(name, files[name], open_engine), True
        return fuse(self.params, partial, present).argmax(1)

    def table(self, files: dict[str, Path], patterns=None, open_engine=None) -> dict[str, dict]:
        """Per pattern: the fp32 PyTorch score, the engines' score, and the drop (points)."""
        rows = {}
        for pattern in patterns or presence_patterns(self.names):
            key = pattern_key(pattern)
            reference = self.score(self.reference[key], key)
            engines = self.score(self.pattern_predictions(files, pattern, open_engine), key)
            rows[key] = {"fp32_torch": reference, "engines": engines, "drop": round(reference - engines, 2)}
        return rows


def _candidate(name: str, files: QuantizedFiles, backend) -> Candidate:
    """An INT8 candidate; a TensorRT-target file that breaks TensorRT's rules fails only a backend that enforces them."""
    from ume_edge.build.qdq_rules import check_tensorrt_qdq

    problems = check_tensorrt_qdq(files.tensorrt_s8s8)
    if problems and backend.enforces_tensorrt_rules:
        listing = "\n".join(f"  - {p}" for p in problems)
        raise BuildError(f"modality {name!r} breaks {len(problems)} TensorRT Q/DQ rule(s):\n{listing}")
    return Candidate("int8", files.cpu_u8s8, files.tensorrt_s8s8, files.method, backend.int8_format,
                     files.calibration_cache, problems)


def _quantize(name: str, samples: np.ndarray, method: str, fp32: Path, work: Path, backend,
              quantizer: Quantizer) -> Candidate:
    folder = work / "int8"
    folder.mkdir(exist_ok=True)
    try:
        files = quantizer.calibrate(fp32, name, samples, method, folder)
    except BuildError:
        raise
    except Exception as error:  # ORT's quantizer raises many types; the user needs the modality and the cause
        raise BuildError(f"modality {name!r}: INT8 calibration ({method}) failed: {error}") from error
    return _candidate(name, files, backend)


def fallback(name: str, fp32: Path, backend, work: Path) -> Candidate:
    """The backend's float precision: fp32 for ONNX Runtime on a CPU (no fast fp16 kernels), fp16 for TensorRT."""
    if backend.fallback_precision == "fp16":
        from ume_edge.build.quantize import to_fp16

        (work / "fp16").mkdir(exist_ok=True)
        fp16 = to_fp16(fp32, work / "fp16" / f"{name}.onnx")
        return Candidate("fp16", fp16, fp16)
    return Candidate("fp32", fp32, fp32)


def _score(name: str, candidate: Candidate, baseline: dict[str, Path], evaluator: Evaluator, backend) -> Candidate:
    """Score one modality's candidate with every other modality at fp32, on the patterns that hold it. The file scored
    is the one the backend's engine is made from (for TensorRT, its S8S8 Q/DQ ONNX, run by ONNX Runtime: the same
    quantisation, before any plan exists; the build's verification stage scores the built plans themselves)."""
    files = {**baseline, name: backend.target_onnx(candidate)}
    patterns = [p for p in presence_patterns(evaluator.names) if name in p]
    candidate.drops = {key: row["drop"] for key, row in evaluator.table(files, patterns).items()}
    candidate.max_drop = max(candidate.drops.values())
    return candidate


def choose(name: str, fp32: Path, calib: np.ndarray, options, backend, work: Path, evaluator: Evaluator,
           baseline: dict[str, Path], quantizer: Quantizer) -> tuple[Candidate, list[dict]]:
    """INT8 with the requested calibration method, then the others; the fallback if none keeps within --max-drop."""
    if options.precision == "fp32":
        return Candidate("fp32", fp32, fp32), []
    if options.precision == "fp16":
        return fallback(name, fp32, backend, work), []
    methods = [options.calib_method] + [m for m in CALIB_METHODS if m != options.calib_method]
    tried = []
    for method in methods:
        candidate = _score(name, _quantize(name, calib, method, fp32, work, backend, quantizer), baseline, evaluator,
                           backend)
        passed = candidate.max_drop <= options.max_drop
        tried.append({"method": method, "max_drop": candidate.max_drop, "drops": candidate.drops, "passed": passed})
        note(f"{name}: int8 {method:<10} worst drop {candidate.max_drop:+.2f} points -> "
             f"{'kept' if passed else 'over --max-drop ' + str(options.max_drop)}")
        if passed:
            return candidate, tried
    chosen = fallback(name, fp32, backend, work)
    note(f"{name}: no calibration method kept INT8 within {options.max_drop} points; falling back to "
         f"{chosen.precision}")
    return chosen, tried
