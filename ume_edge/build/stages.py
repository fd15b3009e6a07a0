"""The build: a trained UME-MMA model -> per-modality engines, the fusion kernel, a manifest.

Stages: load the model, export one ONNX per modality, calibrate and quantise (INT8) with an accuracy gate per
modality, compile for the backend, verify every presence pattern against the fp32 PyTorch model, then publish the
engine directory (``engine_dir.publish``): a failed or interrupted build leaves ``--out`` as it was.
"""

from __future__ import annotations

import errno
import hashlib
import math
import os
import re
import shutil
import signal
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from ume_edge import __version__, backends, engine_dir
from ume_edge.backends.base import CompiledFiles, CompileJob, OpenOptions
from ume_edge.build import gate, inputs
from ume_edge.build.progress import note, stage
from ume_edge.build.quantize import Quantizer
from ume_edge.constants import (DEFAULT_CALIB_METHOD, DEFAULT_MAX_BATCH, DEFAULT_MAX_DROP, DEFAULT_PRECISION,
                                ENGINES_DIR, PRECISIONS)
from ume_edge.errors import BackendUnavailable, BuildError, EngineMismatch, UmeEdgeError
from ume_edge.fusion import FusionParams, fusion_graph

STAGES = 6
REFERENCE_SOURCE = "reference"
SHORT_WRITE = "short write"  # numpy's tofile and save say only "N requested and M written"
WRITE_ERRORS = {  # errno: what it means, what the user can do
    errno.ENOSPC: ("no space left on device", "free space there"),
    errno.EDQUOT: ("disk quota exceeded", "free space within your quota"),
    errno.EFBIG: ("file too large (the file system's or `ulimit -f`'s limit)", "raise the limit"),
    errno.EROFS: ("read-only file system", "make it writable"),
    errno.EACCES: ("permission denied", "make it writable for you"),
    errno.EPERM: ("operation not permitted", "make it writable for you"),
    SHORT_WRITE: ("a write was cut short (the disk is full or a file-size limit was reached)",
                  "free space or raise the limit"),
}
SHORT_WRITE_TEXT = re.compile(r"\d+ requested and \d+ written")
WORKER_ERRNO = re.compile(r"\[Errno (\d+)\][^'\n]*(?:'([^'\n]*)')?")  # an OSError the quantizer process sent as text


@dataclass
class BuildOptions:
    model: str | None = None
    trusted_encoders: tuple[str, ...] = ()
    precision: str = DEFAULT_PRECISION
    backend: str = "auto"
    calib_data: str | None = None
    eval_data: str | None = None
    calib_method: str = DEFAULT_CALIB_METHOD
    max_batch: int = DEFAULT_MAX_BATCH
    max_drop: float = DEFAULT_MAX_DROP
    out: Path | None = None
    export_only: bool = False
    threads: int | None = None
    allow_chance_accuracy: bool = False
    workspace_mb: int = 1024
    timing_cache: Path | None = None
    dla_core: int | None = None
    hardware_compatible: bool = False
    version_compatible: bool = False


# ---------------------------------------------------------------------------------------------------------------
# options and where the output goes


def _check_options(options: BuildOptions) -> None:
    problems = []
    if options.precision not in PRECISIONS:
        problems.append(f"--precision must be one of {', '.join(PRECISIONS)}, not {options.precision!r}")
    if options.max_batch < 1:
        problems.append(f"--max-batch must be at least 1, not {options.max_batch}")
    if not (options.max_drop >= 0 and math.isfinite(options.max_drop)):
        problems.append(f"--max-drop is points of accuracy INT8 may cost (0 or more), not {options.max_drop}")
    if options.threads is not None and options.threads < 1:
        problems.append(f"--threads must be at least 1, not {options.threads}")
    if problems:
        raise BuildError("; ".join(problems))


def resolve_backend(options: BuildOptions):
    backend = backends.resolve(options.backend)
    if options.precision not in backend.precisions:
        raise BuildError(f"{options.precision} is not a precision of {backend.name} (it builds "
                         f"{', '.join(backend.precisions)}); choose another --precision or --backend")
    if options.export_only and not backend.can_export_only:
        raise BuildError(f"--export-only writes files to build engines on another machine; {backend.name} engines "
                         "are built here. Use --export-only with --backend tensorrt, or drop it")
    if not options.export_only and (reason := backend.unavailable_reason()):
        raise BackendUnavailable(reason)
    backend.check_build_options(options)
    return backend


def model_sha256(model) -> str:
    digest = hashlib.sha256()
    for key, tensor in sorted(model.state_dict().items()):
        digest.update(key.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def default_out(model_label: str, precision: str, backend_name: str, export_only: bool = False) -> Path:
    """``engines/<label>-<precision>-<backend>[-export]``; the label is ``reference`` for the shipped model, else
    the model's name and the start of its hash, so that no other model's build replaces another's."""
    return ENGINES_DIR / f"{model_label}-{precision}-{backend_name}{'-export' if export_only else ''}"


def _model_label(model, options: BuildOptions, sha256: str) -> str:
    return REFERENCE_SOURCE if options.model is None else f"{model.name}-{sha256[:8]}"


# ---------------------------------------------------------------------------------------------------------------
# the stages


def _export(model, work: Path, calib: dict[str, np.ndarray]) -> dict[str, dict]:
    from ume_edge.build.export import export_modality

    (work / "fp32").mkdir()
    exported = {}
    for m in model.modalities:
        path = work / "fp32" / f"{m.name}.onnx"
        diff = export_modality(model, m.name, path, calib[m.name][:64])
        exported[m.name] = {"fp32": path, "max_abs_diff": diff}
        note(f"{m.name}: {path.name}, max |onnx - torch| = {diff:.2e} on {min(64, len(calib[m.name]))} samples")
    return exported


def _refuse_chance_accuracy(evaluator: gate.Evaluator, data: inputs.DataSet, options: BuildOptions) -> None:
    """Labels that the fp32 model cannot beat chance on measure nothing: every engine would pass the gate."""
    if data.labels is None or options.allow_chance_accuracy:
        return
    key = "+".join(sorted(evaluator.names))
    accuracy = evaluator.score(evaluator.reference[key], key)
    chance = 100.0 / evaluator.params.num_classes
    margin = 200.0 * math.sqrt(chance / 100 * (1 - chance / 100) / data.rows)  # two standard errors
    if accuracy <= chance + margin:
        raise BuildError(f"evaluation data {data.spec}: the fp32 model scores {accuracy:.1f}% with every modality, "
                         f"no better than chance ({chance:.1f}% +- {margin:.1f}) on {data.rows} samples, so the "
                         "accuracy gate would measure nothing. Check that the labels and inputs belong together and "
                         "are preprocessed as in training, or pass --allow-chance-accuracy")


def _verify(evaluator: gate.Evaluator, backend, compiled: CompiledFiles, names: list[str],
            options: BuildOptions) -> tuple[dict, str]:
    """Score every pattern with what was built: the engines, or (export only) the ONNX they will be built from."""
    if all(compiled.engines[name] is not None for name in names):
        files = {name: compiled.engines[name] for name in names}
        open_options = OpenOptions(threads=options.threads)
        table = evaluator.table(files, open_engine=lambda path: backend.open_engine(path, open_options,
                                                                                    compiled.device))
        return table, backend.name
    files = {name: compiled.onnx[name] for name in names}
    return evaluator.table(files), f"onnxruntime, on the {backend.name}-target ONNX (no engine was built; rebuild " \
                                   "or adopt on the target to verify the engines)"


def _run_stages(model, options: BuildOptions, backend, calib: inputs.DataSet, evaluation: inputs.DataSet,
                staging: Path, sha256: str) -> engine_dir.Manifest:
    work = staging / "work"
    work.mkdir()
    stage(2, STAGES, "exporting one ONNX per modality (encoder + its slice of the head)")
    exported = _export(model, work, calib.inputs)
    baseline = {name: e["fp32"] for name, e in exported.items()}
    evaluator = gate.Evaluator(model, evaluation.inputs, evaluation.labels, options.threads, options.max_batch)
    _refuse_chance_accuracy(evaluator, evaluation, options)
    stage(3, STAGES, f"calibrating and quantising, gating each modality at {options.max_drop} points"
          if options.precision == "int8" else f"preparing {options.precision} engines")
    chosen, tried = {}, {}
    with Quantizer() as quantizer:
        for name in model.modality_names:
            chosen[name], tried[name] = gate.choose(name, baseline[name], calib.inputs[name], options, backend, work,
                                                    evaluator, baseline, quantizer)
    stage(4, STAGES, f"compiling for {backend.name}" + (" (export only: no engine is built)"
                                                          if options.export_only else ""))
    params = FusionParams.from_model(model)
    fusion_onnx = work / "fusion.onnx"
    onnx.save(fusion_graph(params), str(fusion_onnx))
    compiled = backend.compile(CompileJob(staging, chosen, fusion_onnx, {m.name: m.input_shape for m in model.modalities},
                                          len(model.modalities), model.num_classes, options))
    stage(5, STAGES, "verifying every presence pattern against fp32 PyTorch")
    accuracy, run_by = _verify(evaluator, backend, compiled, model.modality_names, options)
    return _manifest(model, options, backend, chosen, tried, exported, compiled, staging, sha256, {
        "data": evaluation.spec, "metric": evaluator.metric, "samples": evaluation.rows, "engines_run_by": run_by,
        "max_drop_allowed": options.max_drop, "patterns": accuracy,
    }, _calibration_info(calib, options))


def _calibration_info(calib: inputs.DataSet, options: BuildOptions) -> dict:
    path = Path(calib.spec)
    return {"method": options.calib_method, "data": calib.spec, "samples": calib.rows,
            "data_sha256": engine_dir.file_sha256(path) if path.is_file() else None}


def _record(staging: Path, path: Path | None) -> engine_dir.FileRecord | None:
    return None if path is None else engine_dir.record_file(staging, path)


def _manifest(model, options, backend, chosen, tried, exported, compiled: CompiledFiles, staging: Path, sha256: str,
              accuracy: dict, calibration: dict) -> engine_dir.Manifest:
    modalities = [engine_dir.ModalityRecord(
        name=m.name, shape=list(m.input_shape), dtype=m.dtype, precision=chosen[m.name].precision,
        engine=_record(staging, compiled.engines[m.name]), onnx=_record(staging, compiled.onnx.get(m.name)),
        calibration=_record(staging, compiled.calibration.get(m.name)),
        calibration_method=chosen[m.name].method, quant_format=chosen[m.name].quant_format,
        export_max_abs_diff=exported[m.name]["max_abs_diff"], float_layers=chosen[m.name].float_layers,
        gate=tried[m.name],
        value_range=engine_dir.index_range(exported[m.name]["fp32"], m.name) if m.dtype == "int64" else None,
    ) for m in model.modalities]
    params = FusionParams.from_model(model)
    return engine_dir.Manifest(
        format=engine_dir.FORMAT, schema_version=engine_dir.SCHEMA_VERSION,
        model=engine_dir.ModelRecord(model.name, options.model or REFERENCE_SOURCE, sha256, model.fusion,
                                     model.num_classes, list(model.class_names)),
        backend=backend.name, precision=options.precision, max_batch=options.max_batch,
        export_only=options.export_only, modalities=modalities,
        fusion=engine_dir.FusionRecord(params.mode, params.modality_order, params.constants_as_lists(),
                                       _record(staging, compiled.engines["fusion"]),
                                       _record(staging, compiled.onnx.get("fusion"))),
        versions={"ume_edge": __version__, "onnx": onnx.__version__, "numpy": np.__version__,
                  "onnxruntime": backends.get("onnxruntime").version(), backend.name: backend.version()},
        device=compiled.device, backend_settings=compiled.settings,
        scripts={name: _record(staging, path) for name, path in compiled.scripts.items()},
        made_on_target=compiled.made_on_target, calibration=calibration, accuracy=accuracy,
        tensorrt_rules={name: c.tensorrt_problems for name, c in chosen.items()},
        built_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    )


# ---------------------------------------------------------------------------------------------------------------
# orchestration


def build(options: BuildOptions) -> Path:
    """Run every stage and return the engine directory. Raises ``UmeEdgeError`` with an actionable message."""
    _check_options(options)
    backend = resolve_backend(options)
    stage(1, STAGES, f"loading the model ({options.model or 'the shipped AV-Digits reference'})")
    model = inputs.load_model(options.model, options.trusted_encoders)
    sha256 = model_sha256(model)
    calib = inputs.check_data(model, inputs.read_data(inputs.calibration_spec(options.calib_data), "calibration"),
                              "calibration")
    inputs.check_calibration_size(calib, options.precision)
    eval_spec = inputs.evaluation_spec(model, options.eval_data, options.calib_data)
    evaluation = inputs.check_data(model, inputs.read_data(eval_spec, "evaluation"), "evaluation")
    out = Path(options.out) if options.out else default_out(_model_label(model, options, sha256), options.precision,
                                                            backend.name, options.export_only)
    note(f"{model.name}: {', '.join(model.modality_names)} ({model.fusion}), backend {backend.name}, -> {out}")
    engine_dir.check_replaceable(out)
    staging = engine_dir.make_staging(out)
    try:
        manifest = _run_stages(model, options, backend, calib, evaluation, staging, sha256)
        stage(6, STAGES, f"writing {out}")
        engine_dir.save(staging, manifest)
        shutil.rmtree(staging / "work")
        publish(staging, out)
    except Exception as error:
        failure = write_failure(error, staging, out, "or choose another --out")
        engine_dir.discard(staging)
        if failure is None:
            raise
        raise failure from None
    except BaseException:
        engine_dir.discard(staging)
        raise
    return out


class InterruptedAfterPublish(KeyboardInterrupt):
    """Ctrl-C came while a finished build was being published; it was held back until ``out`` held the new build."""

    def __init__(self, out: Path):
        super().__init__(str(out))
        self.out = out


def publish(staging: Path, out: Path) -> None:
    """``engine_dir.publish`` with Ctrl-C held back until it is done, so that an interrupt never leaves the caller
    unsure whether ``out`` is the old build or the new one: one that came raises ``InterruptedAfterPublish``."""
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        engine_dir.publish(staging, out)
        return
    held = []
    signal.signal(signal.SIGINT, lambda *_: held.append(True))
    try:
        engine_dir.publish(staging, out)
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if held:
        raise InterruptedAfterPublish(out)


def write_failure(error: Exception, staging: Path, out: Path, retry: str) -> BuildError | None:
    """One line for a build that the disk stopped (full, over quota or a size limit, read-only, not permitted), as
    ``error`` or its causes say, or as the space left shows when they do not (a truncated file read back fails with
    a parse error); ``retry`` ends the advice. None when the failure is not about writing."""
    code, filename = _errno_in(error)
    kept = f"{out} is as it was"
    if code in WRITE_ERRORS:
        cause, remedy = WRITE_ERRORS[code]
        return BuildError(f"{cause} while writing {_where(filename, staging, out)}; {remedy} {retry}; {kept}")
    if (space := _space_short(staging)) is not None:
        free, largest = space
        return BuildError(f"{_one_line(error)}; only {free / 2**20:.1f} MiB is free where {out} is written, less than "
                          f"the largest file this build wrote ({largest / 2**20:.1f} MiB), so the disk is likely "
                          f"full: {WRITE_ERRORS[errno.ENOSPC][1]} {retry}; {kept}")
    if isinstance(error, OSError):
        return BuildError(f"{_one_line(error)} while building {out}; {kept}")
    return None


def _errno_in(error: BaseException | None) -> tuple[int | str | None, str | None]:
    """The errno (and file) of the first OSError in ``error``'s chain, also one that the quantizer process sent
    back as text."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno is not None:
            return error.errno, error.filename2 or error.filename
        if match := WORKER_ERRNO.search(str(error)):
            return int(match[1]), match[2]
        if SHORT_WRITE_TEXT.search(str(error)):
            return SHORT_WRITE, None
        error = error.__cause__ or error.__context__
    return None, None


def _where(filename, staging: Path, out: Path) -> str:
    if filename is None:  # the quantizer also writes in the temporary folder, which may be another file system
        temporary = tempfile.gettempdir()
        elsewhere = os.stat(temporary).st_dev != os.stat(staging.parent).st_dev
        return str(out) + (f" or a temporary file in {temporary}" if elsewhere else "")
    path = Path(os.fsdecode(filename))
    return f"{out} ({path.relative_to(staging)})" if path.is_relative_to(staging) else str(path)


def _space_short(staging: Path) -> tuple[int, int] | None:
    """(free bytes, largest file written) when the space left could not hold another file as large, else None."""
    try:
        free = shutil.disk_usage(staging).free
        largest = max((path.stat().st_size for path in staging.rglob("*") if path.is_file()), default=0)
    except OSError:
        return None
    return (free, largest) if free < largest else None


def _one_line(error: Exception) -> str:
    lines = str(error).strip().splitlines()
    text = lines[0] if lines else ""
    return text if isinstance(error, UmeEdgeError) else f"{type(error).__name__}: {text}"


def format_summary(manifest: engine_dir.Manifest, out: Path, seconds: float | None = None) -> str:
    took = f" in {seconds:.1f} s" if seconds is not None else ""
    lines = [f"\nBuilt {out}{took} ({manifest.backend}, requested {manifest.precision}, max batch "
             f"{manifest.max_batch})", "", "| modality | precision | calibration | file | size |", "|---|---|---|---|---|"]
    for m in manifest.modalities:
        record = m.engine or m.onnx
        size = (out / record.path).stat().st_size / 1024
        precision = m.precision + (f" ({len(m.float_layers)} layer group(s) float)" if m.float_layers else "")
        lines.append(f"| {m.name} | {precision} | {m.calibration_method or '-'} | {record.path} | {size:.0f} KiB |")
    lines += _float_layer_lines(manifest)
    data = manifest.accuracy
    few = data["samples"] < inputs.FEW_EVAL_SAMPLES
    lines += ["", f"{data['metric'].capitalize()} on {data['data']} ({data['samples']} samples), per presence pattern"
              f"{'' if data['engines_run_by'] == manifest.backend else ' (' + data['engines_run_by'] + ')'}:", "",
              "| pattern | fp32 PyTorch | engines | drop |", "|---|---|---|---|"]
    for key, row in data["patterns"].items():
        lines.append(f"| {key} | {row['fp32_torch']:.2f} | {row['engines']:.2f} | {row['drop']:+.2f} |")
    if few:
        lines.append(f"\nFew samples: {data['samples']} evaluation samples make each score uncertain by several "
                     "points; give --eval-data with a few hundred or more to trust the drops.")
    problems = {name: found for name, found in manifest.tensorrt_rules.items() if found}
    if problems:
        lines.append(f"\nThe TensorRT-target files break TensorRT's Q/DQ rules ({', '.join(problems)}); a TensorRT "
                     "build of this model would fail. The manifest lists each problem under tensorrt_rules.")
    if manifest.export_only:
        lines += ["", f"Export only: no engine was built. On the target, run {' or '.join(manifest.scripts)} inside "
                  f"{out}, then `python -m ume_edge.build --adopt {out}`; or run `python -m ume_edge.build --backend "
                  f"{manifest.backend}` there."]
    return "\n".join(lines)


def _float_layer_lines(manifest: engine_dir.Manifest) -> list[str]:
    kept = [(m.name, layer) for m in manifest.modalities for layer in m.float_layers]
    if not kept:
        return []
    lines = ["", "Layers kept in float by the per-layer fallback (the rest of each modality is INT8):", "",
             "| modality | layer | op | worst drop if quantized |", "|---|---|---|---|"]
    return lines + [f"| {name} | {layer['layer']} | {layer['op']} | {layer['drop_if_quantized']:+.2f} |"
                    for name, layer in kept]


def ensure_default_engines(precision: str = DEFAULT_PRECISION) -> Path:
    """The shipped reference model's ONNX Runtime build for this machine, built (or rebuilt, when it no longer fits
    this machine's runtime or this ume-edge) first if needed."""
    backend = backends.get("onnxruntime")
    out = default_out(REFERENCE_SOURCE, precision, backend.name)
    try:
        manifest = engine_dir.load(out)
        backend.check_compatible(manifest)
    except EngineMismatch as stale:
        if out.exists():
            note(f"rebuilding {out}: {stale}")
    else:
        if manifest.model.source != REFERENCE_SOURCE:
            raise BuildError(f"{out} holds a build of {manifest.model.source}, not of the shipped reference model; "
                             f"move it, or give the engine directory explicitly")
        if manifest.versions.get("ume_edge") == __version__:
            return out
    return build(BuildOptions(precision=precision, backend=backend.name, out=out))
