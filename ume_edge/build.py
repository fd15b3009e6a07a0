"""``python -m ume_edge.build``: a trained UME-MMA model -> per-modality engines, the fusion kernel, a manifest.

Stages: load the model, export one ONNX per modality, calibrate and quantise (INT8), compile for the backend,
verify accuracy per presence pattern against the fp32 PyTorch model (falling back per modality when INT8 costs
too much), then write the engine directory atomically: a failed or interrupted build leaves nothing at ``--out``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ume_edge import __version__
from ume_edge.backends import get_backend, open_engine
from ume_edge.compile import compile_onnxruntime, compile_tensorrt, tensorrt_config
from ume_edge.engine_dir import check_replaceable, discard, make_staging, publish
from ume_edge.data import load, load_npz, pattern_key, presence_patterns
from ume_edge.errors import BackendUnavailable, BuildError, UmeEdgeError
from ume_edge.fusion import FusionParams, fuse
from ume_edge.metrics import percent_equal
from ume_edge.quantize import CALIB_METHODS
from ume_edge.runtime import file_sha256

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CALIB = PROJECT_ROOT / "calibrate" / "avdigits.npz"
ENGINES_DIR = PROJECT_ROOT / "engines"
PRECISIONS = ("fp32", "fp16", "int8")
SCHEMA_VERSION = 1
STAGES = 6


@dataclass
class BuildOptions:
    model: str | None = None
    precision: str = "int8"
    backend: str = "auto"
    calib_data: str | None = None
    eval_data: str | None = None
    calib_method: str = "entropy"
    max_batch: int = 64
    max_drop: float = 1.0
    out: Path | None = None
    export_only: bool = False
    threads: int | None = None
    workspace_mb: int = 1024
    timing_cache: Path | None = None
    dla_core: int | None = None
    hardware_compatible: bool = False
    version_compatible: bool = False


@dataclass
class Candidate:
    """One way to run one modality: a file, its precision, and how it scored in the accuracy gate."""

    precision: str
    file: Path
    method: str | None = None
    quant_format: str | None = None
    tensorrt_file: Path | None = None
    calibration_cache: Path | None = None
    max_drop: float | None = None
    drops: dict = field(default_factory=dict)


def _stage(number: int, text: str) -> None:
    print(f"[{number}/{STAGES}] {text}", file=sys.stderr, flush=True)


def _note(text: str) -> None:
    print(f"      {text}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- inputs

def resolve_backend(requested: str, export_only: bool) -> str:
    from ume_edge.backends import tensorrt

    if requested == "auto":
        return "tensorrt" if tensorrt.is_available() else "onnxruntime"
    if requested == "tensorrt" and not export_only:
        reason = tensorrt.unavailable_reason()
        if reason:
            raise BackendUnavailable(reason)
    get_backend(requested)
    return requested


def _load_model(spec: str | None):
    from ume_edge.model import UMEModel, load_reference

    return load_reference() if spec is None else UMEModel.load(spec)


def _read_data(spec: str | Path, role: str) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """``NAME:SPLIT`` of a shipped data set, or an ``.npz`` with one array per modality (and ``labels``)."""
    text = str(spec)
    if ":" in text and not text.endswith(".npz"):
        name, split = text.split(":", 1)
        return load(name, split)
    try:
        return load_npz(text)
    except FileNotFoundError as error:
        raise BuildError(f"{role} data: {error}; see calibrate/README.md for the format") from error


def _check_data(model, inputs: dict[str, np.ndarray], role: str, path) -> dict[str, np.ndarray]:
    checked = {}
    for m in model.modalities:
        if m.name not in inputs:
            raise BuildError(f"modality {m.name!r}: no array named {m.name!r} in the {role} data {path} "
                             f"(it has {', '.join(inputs) or 'nothing'})")
        x = inputs[m.name]
        if tuple(x.shape[1:]) != m.input_shape:
            raise BuildError(f"modality {m.name!r}: {role} data {path} has shape {list(x.shape)}, expected "
                             f"[N, {', '.join(map(str, m.input_shape))}]")
        if x.dtype != np.dtype(m.dtype):
            if m.dtype == "float32" and np.issubdtype(x.dtype, np.floating):
                x = x.astype(np.float32)
            else:
                raise BuildError(f"modality {m.name!r}: {role} data {path} has dtype {x.dtype}, expected {m.dtype}")
        checked[m.name] = np.ascontiguousarray(x)
    return checked


def _default_eval(model, options: BuildOptions) -> str:
    if options.eval_data:
        return options.eval_data
    if model.name == "avdigits":
        return "avdigits:val"
    return _calib_spec(options)


def _calib_spec(options: BuildOptions) -> str:
    return options.calib_data or str(DEFAULT_CALIB)


def default_out(model_name: str, precision: str, backend: str) -> Path:
    return ENGINES_DIR / f"{model_name}-{precision}-{backend}"


# ---------------------------------------------------------------- stages

def _export(model, work: Path, calib: dict[str, np.ndarray]) -> dict[str, dict]:
    from ume_edge.export import export_modality

    exported = {}
    for m in model.modalities:
        path = work / "fp32" / f"{m.name}.onnx"
        path.parent.mkdir(exist_ok=True)
        diff = export_modality(model, m.name, path, calib[m.name][:64])
        exported[m.name] = {"fp32": path, "max_abs_diff": diff}
        _note(f"{m.name}: {path.name}, max |onnx - torch| = {diff:.2e} on {min(64, len(calib[m.name]))} samples")
    return exported


def _quantize(name: str, fp32: Path, samples: np.ndarray, method: str, work: Path) -> Candidate:
    from ume_edge.qdq_rules import assert_tensorrt_qdq
    from ume_edge.quantize import quantize_modality

    qdir = work / "int8"
    qdir.mkdir(exist_ok=True)
    try:
        files = quantize_modality(fp32, name, samples, method, qdir)
    except Exception as error:
        raise BuildError(f"modality {name!r}: INT8 calibration ({method}) failed: {error}") from error
    assert_tensorrt_qdq(files.tensorrt_s8s8, f"modality {name!r}")
    return Candidate("int8", files.cpu_u8s8, method, "U8S8", files.tensorrt_s8s8, files.calibration_cache)


def _fallback(name: str, fp32: Path, backend: str, work: Path) -> Candidate:
    """ONNX Runtime on the CPU has no fast fp16 kernels, so its fallback is fp32; TensorRT's is fp16."""
    if backend == "tensorrt":
        from ume_edge.quantize import to_fp16

        (work / "fp16").mkdir(exist_ok=True)
        fp16 = to_fp16(fp32, work / "fp16" / f"{name}.onnx")
        return Candidate("fp16", fp16, tensorrt_file=fp16)
    return Candidate("fp32", fp32, tensorrt_file=fp32)


class Evaluator:
    """Scores candidate engines per presence pattern against the fp32 PyTorch model.

    Fusion is linear in the partial logits, so each engine runs once over the evaluation data and every pattern
    is then a fusion of cached partial logits.
    """

    def __init__(self, model, inputs: dict[str, np.ndarray], labels: np.ndarray | None, threads: int | None):
        from ume_edge.train import torch_predictor
        from ume_edge.metrics import predictions_by_pattern

        self.inputs, self.labels, self.threads = inputs, labels, threads
        self.params = FusionParams.from_model(model)
        self.names = model.modality_names
        self.reference = predictions_by_pattern(torch_predictor(model), inputs)
        self.metric = "accuracy" if labels is not None else "agreement with fp32 PyTorch"
        self.partials: dict[tuple[str, Path], np.ndarray] = {}

    def score(self, predicted: np.ndarray, key: str) -> float:
        truth = self.labels if self.labels is not None else self.reference[key]
        return percent_equal(predicted, truth)

    def partial(self, name: str, file: Path) -> np.ndarray:
        if (name, file) not in self.partials:
            engine = open_engine(file, self.threads)
            x = self.inputs[name]
            self.partials[name, file] = np.concatenate(
                [engine.infer({name: x[i:i + 256]})["partial_logits"] for i in range(0, len(x), 256)])
        return self.partials[name, file]

    def pattern_predictions(self, files: dict[str, Path], pattern) -> np.ndarray:
        count = len(next(iter(self.inputs.values())))
        partial = np.zeros((count, len(self.names), self.params.num_classes), np.float32)
        present = np.zeros((count, len(self.names)), bool)
        for i, name in enumerate(self.names):
            if name in pattern:
                partial[:, i], present[:, i] = self.partial(name, files[name]), True
        return fuse(self.params, partial, present).argmax(1)

    def table(self, files: dict[str, Path], patterns=None) -> dict[str, dict]:
        rows = {}
        for pattern in patterns or presence_patterns(self.names):
            key = pattern_key(pattern)
            reference = self.score(self.reference[key], key)
            engines = self.score(self.pattern_predictions(files, pattern), key)
            rows[key] = {"fp32_torch": reference, "engines": engines, "drop": round(reference - engines, 2)}
        return rows


def _gate(name: str, candidate: Candidate, baseline: dict[str, Path], evaluator: Evaluator, backend: str) -> Candidate:
    """Score one modality's candidate with every other modality at fp32, on the patterns that hold it. For TensorRT
    the candidate is its TensorRT-target ONNX (S8S8 Q/DQ) run by ONNX Runtime: the same quantisation, before any
    plan exists; stage 5 scores the built plans themselves."""
    files = {**baseline, name: candidate.tensorrt_file if backend == "tensorrt" else candidate.file}
    patterns = [p for p in presence_patterns(evaluator.names) if name in p]
    rows = evaluator.table(files, patterns)
    candidate.drops = {key: row["drop"] for key, row in rows.items()}
    candidate.max_drop = max(candidate.drops.values())
    return candidate


def _choose(name: str, fp32: Path, calib: np.ndarray, options: BuildOptions, backend: str, work: Path,
            evaluator: Evaluator, baseline: dict[str, Path]) -> tuple[Candidate, list[dict]]:
    """INT8 with the requested calibration method, then the others; fp16/fp32 if none keeps within --max-drop."""
    if options.precision == "fp32":
        return Candidate("fp32", fp32, tensorrt_file=fp32), []
    if options.precision == "fp16":
        return _fallback(name, fp32, "tensorrt", work), []
    methods = [options.calib_method] + [m for m in CALIB_METHODS if m != options.calib_method]
    tried = []
    for method in methods:
        candidate = _gate(name, _quantize(name, fp32, calib, method, work), baseline, evaluator, backend)
        passed = candidate.max_drop <= options.max_drop
        tried.append({"method": method, "max_drop": candidate.max_drop, "drops": candidate.drops, "passed": passed})
        _note(f"{name}: int8 {method:<10} worst drop {candidate.max_drop:+.2f} points -> "
              f"{'kept' if passed else 'over --max-drop ' + str(options.max_drop)}")
        if passed:
            return candidate, tried
    fallback = _fallback(name, fp32, backend, work)
    _note(f"{name}: no calibration method kept INT8 within {options.max_drop} points; falling back to "
          f"{fallback.precision}")
    return fallback, tried


# ---------------------------------------------------------------- writing

def _sha256_of_state(model) -> str:
    import hashlib

    digest = hashlib.sha256()
    for key, tensor in sorted(model.state_dict().items()):
        digest.update(key.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _versions(backend: str) -> dict:
    import onnx

    versions = {"ume_edge": __version__, "onnx": onnx.__version__, "numpy": np.__version__,
                "onnxruntime": get_backend("onnxruntime").get_version()}
    if backend == "tensorrt":
        versions["tensorrt"] = get_backend("tensorrt").get_version()
    return versions


def _device(backend: str, built_device: dict | None, export_only: bool) -> dict:
    here = get_backend("onnxruntime").device_info()
    if backend == "onnxruntime":
        return here
    if export_only:
        return {"kind": "gpu", "built": False, "exported_on": here}
    return built_device


def _manifest(model, options, backend, chosen, tried, exported, files, device, accuracy, calib_info,
              eval_info) -> dict:
    modalities = []
    for m in model.modalities:
        c = chosen[m.name]
        modalities.append({
            "name": m.name, "input_name": m.name, "shape": list(m.input_shape), "dtype": m.dtype,
            "output_name": "partial_logits", "file": files[m.name]["file"], "sha256": files[m.name]["sha256"],
            "precision": c.precision, "calibration_method": c.method, "quant_format": c.quant_format,
            "export_max_abs_diff": exported[m.name]["max_abs_diff"], "gate": tried[m.name],
            **{k: v for k, v in files[m.name].items() if k in ("tensorrt_onnx", "trtexec")},
        })
    params = FusionParams.from_model(model)
    return {
        "schema_version": SCHEMA_VERSION,
        "model": {"name": model.name, "sha256": _sha256_of_state(model), "fusion": model.fusion,
                  "num_classes": model.num_classes, "class_names": model.class_names},
        "backend": backend, "precision": options.precision, "max_batch": options.max_batch,
        "export_only": options.export_only,
        "modalities": modalities,
        "fusion": {**params.to_manifest(), **files["fusion"]},
        "versions": _versions(backend), "device": device,
        **({"tensorrt": _tensorrt_settings(options)} if backend == "tensorrt" else {}),
        "calibration": calib_info,
        "accuracy": {"data": eval_info, "max_drop_allowed": options.max_drop, "patterns": accuracy},
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _tensorrt_settings(options: BuildOptions) -> dict:
    return {"workspace_mb": options.workspace_mb, "dla_core": options.dla_core,
            "timing_cache": str(options.timing_cache) if options.timing_cache else None,
            "hardware_compatible": options.hardware_compatible, "version_compatible": options.version_compatible}


# ---------------------------------------------------------------- orchestration

def build(options: BuildOptions) -> Path:
    """Run every stage and return the engine directory. Raises ``UmeEdgeError`` with an actionable message."""
    if options.precision not in PRECISIONS:
        raise BuildError(f"--precision must be one of {', '.join(PRECISIONS)}, not {options.precision!r}")
    if options.max_batch < 1:
        raise BuildError(f"--max-batch must be at least 1, not {options.max_batch}")
    if options.precision == "fp16" and options.backend == "onnxruntime":
        raise BuildError("fp16 is a TensorRT precision: ONNX Runtime on the CPU has no fast fp16 kernels. "
                         "Use --precision int8 or fp32, or --backend tensorrt (with --export-only off a GPU)")
    backend = resolve_backend(options.backend, options.export_only)
    if options.precision == "fp16" and backend == "onnxruntime":
        raise BuildError("fp16 needs TensorRT, which is not available here; use --precision int8 or fp32, or "
                         "--backend tensorrt --export-only")
    if backend == "tensorrt":
        tensorrt_config(options, options.precision)  # refuse an impossible configuration before any work
    started = time.perf_counter()
    _stage(1, f"loading the model ({options.model or 'the shipped AV-Digits reference'})")
    model = _load_model(options.model)
    calib_spec, eval_spec = _calib_spec(options), _default_eval(model, options)
    calib_raw, _ = _read_data(calib_spec, "calibration")
    calib = _check_data(model, calib_raw, "calibration", calib_spec)
    eval_raw, eval_labels = _read_data(eval_spec, "evaluation")
    eval_inputs = _check_data(model, eval_raw, "evaluation", eval_spec)
    out = Path(options.out) if options.out else default_out(model.name, options.precision, backend)
    _note(f"{model.name}: {', '.join(model.modality_names)} ({model.fusion}), backend {backend}, -> {out}")
    check_replaceable(out)
    staging = make_staging(out)
    try:
        manifest = _run_stages(model, options, backend, calib, calib_spec, eval_inputs, eval_labels, eval_spec,
                               staging)
        _stage(6, f"writing {out}")
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        shutil.rmtree(staging / "work")
        publish(staging, out)
    except BaseException:
        discard(staging)
        raise
    print(format_summary(manifest, out, time.perf_counter() - started))
    return out


def _run_stages(model, options, backend, calib, calib_spec, eval_inputs, eval_labels, eval_spec, staging) -> dict:
    work = staging / "work"
    work.mkdir()
    _stage(2, "exporting one ONNX per modality (encoder + its slice of the head)")
    exported = _export(model, work, calib)
    baseline = {name: e["fp32"] for name, e in exported.items()}
    evaluator = Evaluator(model, eval_inputs, eval_labels, options.threads)
    _stage(3, f"calibrating and quantising ({options.precision}), gating each modality at {options.max_drop} points"
           if options.precision == "int8" else f"preparing {options.precision} engines")
    chosen, tried = {}, {}
    for name in model.modality_names:
        chosen[name], tried[name] = _choose(name, baseline[name], calib[name], options, backend, work, evaluator,
                                            baseline)
    _stage(4, f"compiling for {backend}" + (" (export only: no plans are built)" if options.export_only else ""))
    params = FusionParams.from_model(model)
    if backend == "tensorrt":
        shapes = {m.name: m.input_shape for m in model.modalities}
        files, built_device = compile_tensorrt(staging, chosen, params, shapes, options)
    else:
        files, built_device = compile_onnxruntime(staging, chosen, params)
    _stage(5, "verifying every presence pattern against fp32 PyTorch")
    accuracy = evaluator.table({n: staging / files[n]["file"] for n in model.modality_names})
    calib_info = {"method": options.calib_method, "data": str(calib_spec), "samples": len(next(iter(calib.values()))),
                  "data_sha256": file_sha256(calib_spec) if Path(calib_spec).is_file() else None}
    eval_info = {"data": str(eval_spec), "metric": evaluator.metric, "samples": len(next(iter(eval_inputs.values()))),
                 "engines_run_by": _evaluated_with(backend, options.export_only)}
    device = _device(backend, built_device, options.export_only)
    return _manifest(model, options, backend, chosen, tried, exported, files, device, accuracy, calib_info,
                     eval_info)


def _evaluated_with(backend: str, export_only: bool) -> str:
    if backend == "tensorrt" and export_only:
        return "onnxruntime, on the TensorRT-target ONNX (no plan was built; rebuild on the target to verify it)"
    return backend


def format_summary(manifest: dict, out: Path, seconds: float) -> str:
    lines = [f"\nBuilt {out} in {seconds:.1f} s ({manifest['backend']}, requested {manifest['precision']}, "
             f"max batch {manifest['max_batch']})", "",
             "| modality | precision | calibration | file | size |", "|---|---|---|---|---|"]
    for m in manifest["modalities"]:
        size = (out / m["file"]).stat().st_size / 1024
        lines.append(f"| {m['name']} | {m['precision']} | {m['calibration_method'] or '-'} | {m['file']} | "
                     f"{size:.0f} KiB |")
    data = manifest["accuracy"]["data"]
    lines += ["", f"{data['metric'].capitalize()} on {data['data']} ({data['samples']} samples), per presence pattern:",
              "", "| pattern | fp32 PyTorch | engines | drop |", "|---|---|---|---|"]
    for key, row in manifest["accuracy"]["patterns"].items():
        lines.append(f"| {key} | {row['fp32_torch']:.2f} | {row['engines']:.2f} | {row['drop']:+.2f} |")
    if manifest["export_only"]:
        lines += ["", f"Export only: no plan was built. On the target, run `python -m ume_edge.build --backend "
                  f"tensorrt` there, or the trtexec lines in {out / 'manifest.json'} from inside {out}."]
    return "\n".join(lines)


def ensure_default_engines(precision: str = "int8") -> Path:
    """The reference model's engine directory for this machine, built first if it is missing."""
    out = default_out("avdigits", precision, "onnxruntime")
    if not (out / "manifest.json").is_file():
        build(BuildOptions(precision=precision, backend="onnxruntime", out=out))
    return out


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m ume_edge.build",
        description="Turn a trained UME-MMA model into per-modality engines, a fusion kernel and a manifest. "
                    "With no options: the shipped AV-Digits reference model, INT8, ONNX Runtime on this CPU.",
        epilog="example: python -m ume_edge.build --precision int8   (writes engines/avdigits-int8-onnxruntime/)")
    parser.add_argument("--model", help="checkpoint from `python -m ume_edge.train`, or path/to/file.py:factory "
                                         "(default: the shipped reference model)")
    parser.add_argument("--precision", choices=PRECISIONS, default="int8")
    parser.add_argument("--backend", choices=("auto", "onnxruntime", "tensorrt"), default="auto",
                        help="auto: TensorRT when it is importable and a CUDA GPU is present, else ONNX Runtime")
    parser.add_argument("--calib-data", help=f"NPZ with one array per modality (default: {DEFAULT_CALIB.relative_to(PROJECT_ROOT)}); "
                                             "or NAME:SPLIT of a shipped data set")
    parser.add_argument("--eval-data", help="NPZ with one array per modality and `labels` when known "
                                            "(default: avdigits:val for the reference model, else the calibration data)")
    parser.add_argument("--calib-method", choices=CALIB_METHODS, default="entropy",
                        help="tried first; the others are tried if it costs more than --max-drop")
    parser.add_argument("--max-batch", type=int, default=64, help="largest batch the engines accept")
    parser.add_argument("--max-drop", type=float, default=1.0,
                        help="largest accuracy drop (points, any presence pattern) INT8 may cost a modality")
    parser.add_argument("--out", type=Path, help="engine directory (default: engines/<model>-<precision>-<backend>)")
    parser.add_argument("--export-only", action="store_true",
                        help="with --backend tensorrt: write the TensorRT-ready ONNX files and manifest, build no plan")
    parser.add_argument("--threads", type=int, help="ONNX Runtime threads for verification (default: all cores)")
    trt = parser.add_argument_group("TensorRT (with --backend tensorrt)")
    trt.add_argument("--workspace-mb", type=int, default=1024, help="builder workspace limit (MiB); lower on Jetson")
    trt.add_argument("--timing-cache", type=Path, help="persistent timing cache file: rebuilds reuse kernel timings")
    trt.add_argument("--dla-core", type=int, help="build the encoders for this DLA core (Jetson), GPU fallback on")
    trt.add_argument("--hardware-compatible", action="store_true",
                     help="plans that run on any Ampere or newer GPU (slower; not on Jetson)")
    trt.add_argument("--version-compatible", action="store_true",
                     help="plans that later TensorRT versions can run (slower)")
    return parser


def main(argv=None) -> None:
    args = _parser().parse_args(argv)
    options = BuildOptions(args.model, args.precision, args.backend, args.calib_data, args.eval_data,
                           args.calib_method, args.max_batch, args.max_drop, args.out, args.export_only, args.threads,
                           args.workspace_mb, args.timing_cache, args.dla_core, args.hardware_compatible,
                           args.version_compatible)
    try:
        build(options)
    except (UmeEdgeError, FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
