"""The accuracy gate: score each modality's INT8 candidate per presence pattern against the fp32 PyTorch model, try
the other calibration methods when it costs more than ``--max-drop``, then keep the few layers that cost the accuracy
in float (the per-layer fallback), and fall back as a whole only when that is not enough either. An encoder with
attention run by ONNX Runtime also has a dynamically quantized candidate; of the schemes within ``--max-drop`` the
faster on this machine is kept (``int8_schemes``)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ume_edge.backends.base import Backend
from ume_edge.backends.onnxruntime import OnnxRuntimeEngine
from ume_edge.build.int8_schemes import DYNAMIC, STATIC, faster, time_schemes
from ume_edge.build.options import BuildOptions
from ume_edge.build.progress import note
from ume_edge.build.quantize import (
    CALIB_METHODS,
    MIN_TENSORRT_GEMM_DIM,
    QuantizedFiles,
    Quantizer,
    tensorrt_quantizes_any,
)
from ume_edge.constants import PARTIAL_LOGITS
from ume_edge.data import pattern_key, presence_patterns
from ume_edge.errors import BuildError
from ume_edge.fusion import FusionParams, fuse
from ume_edge.scoring import percent_equal

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
    quantized: QuantizedFiles | None = None
    float_layers: list[dict] = field(default_factory=list)
    int8_scheme: dict = field(default_factory=dict)


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
        from ume_edge.scoring import predictions_by_pattern
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


def _candidate(name: str, files: QuantizedFiles, backend: Backend[Any]) -> Candidate:
    """An INT8 candidate (static Q/DQ); a TensorRT-target file that breaks TensorRT's rules fails only a backend
    that enforces them."""
    from ume_edge.build.qdq_rules import check_tensorrt_qdq, violations_error

    problems = check_tensorrt_qdq(files.tensorrt_s8s8)
    if problems and backend.enforces_tensorrt_rules:
        raise violations_error(f"modality {name!r}", problems)
    return Candidate("int8", files.cpu_u8s8, files.tensorrt_s8s8, files.method, backend.int8_format,
                     files.calibration_cache, problems, quantized=files, int8_scheme={"scheme": STATIC})


def _dynamic_candidate(static: Candidate, backend: Backend[Any]) -> Candidate | None:
    """The dynamically quantized CPU file of an encoder with attention, where the backend runs the CPU file."""
    assert static.quantized is not None  # ``_candidate`` made it
    dynamic_file = static.quantized.cpu_dynamic
    if dynamic_file is None or backend.target_onnx(static) != static.file:
        return None
    return Candidate("int8", dynamic_file, static.tensorrt_file, None, backend.int8_format, None,
                     static.tensorrt_problems, int8_scheme={"scheme": DYNAMIC})


def _quantize(name: str, samples: np.ndarray, method: str, fp32: Path, work: Path, backend: Backend[Any],
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


def fallback(name: str, fp32: Path, backend: Backend[Any], work: Path) -> Candidate:
    """The backend's float precision: fp32 for ONNX Runtime on a CPU (no fast fp16 kernels), fp16 for TensorRT."""
    if backend.fallback_precision == "fp16":
        from ume_edge.build.quantize import to_fp16

        (work / "fp16").mkdir(exist_ok=True)
        fp16 = to_fp16(fp32, work / "fp16" / f"{name}.onnx")
        return Candidate("fp16", fp16, fp16)
    return Candidate("fp32", fp32, fp32)


def _score(name: str, candidate: Candidate, baseline: dict[str, Path], evaluator: Evaluator,
           backend: Backend[Any]) -> Candidate:
    """Score one modality's candidate with every other modality at fp32, on the patterns that hold it. The file scored
    is the one the backend's engine is made from (for TensorRT, its S8S8 Q/DQ ONNX, run by ONNX Runtime: the same
    quantisation, before any plan exists; the build's verification stage scores the built plans themselves)."""
    files = {**baseline, name: backend.target_onnx(candidate)}
    patterns = [p for p in presence_patterns(evaluator.names) if name in p]
    candidate.drops = {key: row["drop"] for key, row in evaluator.table(files, patterns).items()}
    candidate.max_drop = max(candidate.drops.values())
    return candidate


def _drop(candidate: Candidate) -> float:
    """The worst drop of a candidate ``_score`` has scored."""
    assert candidate.max_drop is not None
    return candidate.max_drop


def choose(name: str, fp32: Path, calib: np.ndarray, options: BuildOptions, backend: Backend[Any], work: Path,
           evaluator: Evaluator, baseline: dict[str, Path], quantizer: Quantizer) -> tuple[Candidate, list[dict]]:
    """INT8 with the requested calibration method, then the others (a method that passes keeps every layer in INT8:
    the fastest engine); then the best of them with the fewest layers in float; the fallback if none keeps within
    --max-drop."""
    if options.precision == "fp32":
        return Candidate("fp32", fp32, fp32), []
    if options.precision == "fp16":
        return fallback(name, fp32, backend, work), []
    if backend.enforces_tensorrt_rules and not tensorrt_quantizes_any(fp32):
        chosen = fallback(name, fp32, backend, work)
        note(f"{name}: no layer TensorRT would run in INT8 (each GEMM has fewer than {MIN_TENSORRT_GEMM_DIM} input or "
             f"output channels); {chosen.precision}")
        return chosen, []
    methods = [options.calib_method] + [m for m in CALIB_METHODS if m != options.calib_method]
    tried: list[dict] = []
    candidates = []
    dynamic: Candidate | None = None
    for method in methods:
        candidate = _score(name, _quantize(name, calib, method, fp32, work, backend, quantizer), baseline, evaluator,
                           backend)
        passed = _judged(name, candidate, method, options.max_drop, tried)
        if method == methods[0] and (dynamic := _dynamic_candidate(candidate, backend)) is not None:
            _score(name, dynamic, baseline, evaluator, backend)
            if not _judged(name, dynamic, DYNAMIC, options.max_drop, tried):
                dynamic = None
                candidate.int8_scheme["why"] = "dynamic quantization was over --max-drop"
        if passed:
            return _faster_scheme(name, candidate, dynamic, evaluator, calib, options.max_batch), tried
        candidates.append(candidate)
    if dynamic is not None:
        dynamic.int8_scheme["why"] = "the only scheme within --max-drop (no calibration method kept static Q/DQ)"
        return dynamic, tried
    best = min(candidates, key=_drop)
    search = LayerSearch(name, best, fp32, options.max_drop, backend, evaluator, baseline, quantizer)
    kept = search.run()
    if kept is not None:
        return kept, tried
    chosen = fallback(name, fp32, backend, work)
    note(f"{name}: neither a calibration method nor up to {MAX_FLOAT_GROUPS} layers in float kept INT8 within "
         f"{options.max_drop} points; falling back to {chosen.precision}")
    return chosen, tried


def _judged(name: str, candidate: Candidate, label: str, max_drop: float, tried: list[dict]) -> bool:
    """Whether a scored candidate keeps within ``max_drop``; the trial goes into ``tried`` and the build's log."""
    passed = _drop(candidate) <= max_drop
    tried.append({"method": candidate.method, "scheme": candidate.int8_scheme["scheme"],
                  "max_drop": candidate.max_drop, "drops": candidate.drops, "passed": passed})
    note(f"{name}: int8 {label:<10} worst drop {candidate.max_drop:+.2f} points -> "
         f"{'kept' if passed else 'over --max-drop ' + str(max_drop)}")
    return passed


def _faster_scheme(name: str, static: Candidate, dynamic: Candidate | None, evaluator: Evaluator, calib: np.ndarray,
                   max_batch: int) -> Candidate:
    """Of two schemes within --max-drop, the faster on this machine; static alone when there is no other."""
    if dynamic is None:
        return static
    timings = time_schemes({STATIC: static.file, DYNAMIC: dynamic.file}, evaluator.open_onnx, name, calib,
                           max_batch)
    scheme, why = faster(timings)
    chosen = dynamic if scheme == DYNAMIC else static
    chosen.int8_scheme.update(why=why, timings=timings)
    note(f"{name}: int8 scheme {scheme}: {why}")
    return chosen


# ---------------------------------------------------------------------------------------------------------------
# the per-layer fallback

MAX_SENSITIVITY_GROUPS = 16  # the sensitivity pass re-quantizes a modality at most this many times
MAX_FLOAT_GROUPS = 4  # a modality that needs more layers than this in float falls back as a whole


@dataclass(frozen=True)
class LayerGroup:
    """A weighted node and the nodes after it up to the next weighted node (its activation, pooling, residual add):
    what "a layer in float" leaves unquantized. Over ``MAX_SENSITIVITY_GROUPS`` of them, neighbours are merged."""

    weighted: tuple[str, ...]
    ops: tuple[str, ...]
    nodes: tuple[str, ...]

    @property
    def label(self) -> str:
        return ", ".join(self.weighted)


def layer_groups(prepared: Path, target: Path) -> list[LayerGroup]:
    """The groups of ``prepared`` (the fp32 model both INT8 files come from) whose weighted node is quantized in
    ``target`` (its weight comes out of a DequantizeLinear there)."""
    import onnx

    from ume_edge.build.quantize import WEIGHTED_OPS

    quantized_target = onnx.load(str(target), load_external_data=False).graph
    dequantized = {o for n in quantized_target.node if n.op_type == "DequantizeLinear" for o in n.output}
    quantized = {n.name for n in quantized_target.node if n.op_type in WEIGHTED_OPS and len(n.input) > 1
                 and n.input[1] in dequantized}
    groups: list[list] = []
    for node in onnx.load(str(prepared), load_external_data=False).graph.node:
        if node.op_type in WEIGHTED_OPS:
            groups.append([])
        if groups:
            groups[-1].append(node)
    chosen = [LayerGroup((g[0].name,), (g[0].op_type,), tuple(n.name for n in g)) for g in groups
              if g[0].name in quantized]
    return _merged(chosen, MAX_SENSITIVITY_GROUPS)


def _merged(groups: list[LayerGroup], most: int) -> list[LayerGroup]:
    size = -(-len(groups) // most)
    return [LayerGroup(sum((g.weighted for g in part), ()), sum((g.ops for g in part), ()),
                       sum((g.nodes for g in part), ()))
            for part in (groups[i:i + size] for i in range(0, len(groups), size))]


class LayerSearch:
    """Which layers to keep in float. A sensitivity pass re-quantizes the modality once per layer group with only that
    group quantized (ranges from the calibration cache, no new calibration) and measures how far its partial logits
    move from fp32 on the evaluation data; then the most sensitive groups go to float one at a time until the gate
    passes; then any group the gate passes without goes back to INT8. Bounded: ``MAX_SENSITIVITY_GROUPS``
    re-quantizations for the pass, then at most ``MAX_FLOAT_GROUPS`` steps and the pruning of those.

    Quantizing one group at a time, rather than floating one at a time, also finds a tensor that two groups share:
    in the CPU file a weighted node quantizes its output and the next one its input, and either alone clips an
    outlier channel."""

    def __init__(self, name: str, best: Candidate, fp32: Path, max_drop: float, backend: Backend[Any],
                 evaluator: Evaluator, baseline: dict[str, Path], quantizer: Quantizer):
        self.name, self.best, self.fp32, self.max_drop = name, best, fp32, max_drop
        self.backend, self.evaluator, self.baseline, self.quantizer = backend, evaluator, baseline, quantizer
        assert best.quantized is not None  # an INT8 candidate (``_candidate``) carries its quantized files
        self.groups = layer_groups(best.quantized.prepared, backend.target_onnx(best))
        self.variants: dict[frozenset[int], Candidate] = {frozenset(): best}

    def run(self) -> Candidate | None:
        if not self.groups:
            return None
        note(f"{self.name}: per-layer fallback: sensitivity of {len(self.groups)} layer group(s), each quantized "
             f"alone ({self.best.method} ranges)")
        ranked = sorted(range(len(self.groups)), key=self._error_alone, reverse=True)
        chosen: list[int] = []
        for index in ranked[:min(MAX_FLOAT_GROUPS, len(ranked) - 1)]:  # all of them in float is no INT8 engine
            chosen.append(index)
            candidate = self._variant(chosen)
            note(f"{self.name}: {len(chosen)} layer group(s) in float (+ {self.groups[index].label}): worst drop "
                 f"{candidate.max_drop:+.2f} points")
            if _drop(candidate) <= self.max_drop:
                return self._fewest(chosen)
        return None

    def _variant(self, indices) -> Candidate:
        key = frozenset(indices)
        if key not in self.variants:
            nodes = [node for i in sorted(key) for node in self.groups[i].nodes]
            tag = "float-" + "-".join(map(str, sorted(key)))
            files = self.best.quantized
            assert files is not None  # checked in __init__
            candidate = _candidate(self.name, self.quantizer.requantize(files, nodes, tag), self.backend)
            self.variants[key] = _score(self.name, candidate, self.baseline, self.evaluator, self.backend)
        return self.variants[key]

    def _error_alone(self, index: int) -> float:
        """Mean squared distance of the partial logits from fp32 with this group the only one quantized."""
        alone = self._variant(set(range(len(self.groups))) - {index})
        reference = self.evaluator.partial(self.name, self.fp32)
        return float(np.mean((self.evaluator.partial(self.name, self.backend.target_onnx(alone)) - reference) ** 2))

    def _fewest(self, chosen: list[int]) -> Candidate:
        """Drop groups the gate passes without; record for each remaining one the worst drop with it quantized."""
        while True:
            costs = {i: _drop(self._variant(set(chosen) - {i})) for i in chosen}
            unneeded = [i for i in chosen if costs[i] <= self.max_drop]
            if not unneeded:
                break
            chosen.remove(min(unneeded, key=costs.__getitem__))
        kept = self._variant(chosen)
        kept.float_layers = [{"layer": self.groups[i].label, "op": "/".join(self.groups[i].ops),
                              "nodes": list(self.groups[i].nodes), "drop_if_quantized": costs[i]} for i in chosen]
        note(f"{self.name}: kept in float: {'; '.join(self.groups[i].label for i in chosen)} -> worst drop "
             f"{kept.max_drop:+.2f} points")
        return kept
