"""The build: a trained UME-MMA model -> per-modality engines, the fusion kernel, a manifest.

Stages: load the model, export one ONNX per modality, calibrate and quantise (INT8) with an accuracy gate per
modality, compile for the backend, verify every presence pattern against the fp32 PyTorch model, record golden inputs
and answers for ``python -m ume_edge.verify`` (``verification_record``), then publish the engine directory
(``engine_dir.staged``): a failed or interrupted build leaves ``--out`` as it was. What was asked is checked first
(``options``); a failure the disk caused is explained by ``failures``, the result by ``summary``.
"""

from __future__ import annotations

import hashlib
import math
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from ume_edge import __version__, backends, engine_dir
from ume_edge.backends.base import Backend, BackendOptions, CompiledFiles, CompileJob, OpenOptions
from ume_edge.build import gate, inputs
from ume_edge.build.failures import write_failure
from ume_edge.build.options import BuildOptions, check_options, resolve_backend
from ume_edge.build.progress import note, stage
from ume_edge.build.quantize import Quantizer
from ume_edge.build.verification_record import write_record
from ume_edge.constants import DEFAULT_PRECISION, default_engines_dir
from ume_edge.errors import BuildError, EngineMismatch
from ume_edge.fusion import FusionParams, fusion_graph

STAGES = 6
REFERENCE_SOURCE = "reference"


def model_sha256(model) -> str:
    digest = hashlib.sha256()
    for key, tensor in sorted(model.state_dict().items()):
        digest.update(key.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def default_out(model_label: str, precision: str, backend_name: str, export_only: bool = False) -> Path:
    """``./engines/<label>-<precision>-<backend>[-export]``; the label is ``reference`` for the shipped model, else
    the model's name and the start of its hash, so that no other model's build replaces another's."""
    return default_engines_dir() / f"{model_label}-{precision}-{backend_name}{'-export' if export_only else ''}"


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


def _verify(evaluator: gate.Evaluator, backend: Backend[Any], compiled: CompiledFiles, names: list[str],
            options: BuildOptions) -> tuple[dict, str]:
    """Score every pattern with what was built: the engines, or (export only) the ONNX they will be built from."""
    built = {name: path for name in names if (path := compiled.engines[name]) is not None}
    if len(built) == len(names):
        files = built
        open_options = OpenOptions(threads=options.threads)
        table = evaluator.table(files, open_engine=lambda path: backend.open_engine(path, open_options,
                                                                                    compiled.device))
        return table, backend.name
    files = {name: compiled.onnx[name] for name in names}
    return evaluator.table(files), f"onnxruntime, on the {backend.name}-target ONNX (no engine was built; rebuild " \
                                   "or adopt on the target to verify the engines)"


def _run_stages(model, options: BuildOptions, backend: Backend[Any], backend_options: BackendOptions,
                calib: inputs.DataSet, evaluation: inputs.DataSet, staging: Path, sha256: str) -> engine_dir.Manifest:
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
    shapes = {m.name: m.input_shape for m in model.modalities}
    compiled = backend.compile(CompileJob(staging, chosen, fusion_onnx, shapes, len(model.modalities),
                                          model.num_classes, options.max_batch, options.export_only, backend_options))
    stage(5, STAGES, "verifying every presence pattern against fp32 PyTorch")
    accuracy, run_by = _verify(evaluator, backend, compiled, model.modality_names, options)
    return _manifest(model, options, backend, chosen, tried, exported, compiled, staging, sha256, {
        "data": evaluation.spec, "metric": evaluator.metric, "samples": evaluation.rows, "engines_run_by": run_by,
        "max_drop_allowed": options.max_drop, "patterns": accuracy,
    }, _calibration_info(calib, options))


def _calibration_info(calib: inputs.DataSet, options: BuildOptions) -> dict:
    path = calib.source_file
    return {"method": options.calib_method, "data": calib.spec, "samples": calib.rows,
            "data_sha256": engine_dir.file_sha256(path) if path is not None else None}


def _record(staging: Path, path: Path | None) -> engine_dir.FileRecord | None:
    return None if path is None else engine_dir.record_file(staging, path)


def _manifest(model, options: BuildOptions, backend: Backend[Any], chosen, tried, exported, compiled: CompiledFiles,
              staging: Path, sha256: str,
              accuracy: dict, calibration: dict) -> engine_dir.Manifest:
    modalities = [engine_dir.ModalityRecord(
        name=m.name, shape=list(m.input_shape), dtype=m.dtype, precision=chosen[m.name].precision,
        engine=_record(staging, compiled.engines[m.name]), onnx=_record(staging, compiled.onnx.get(m.name)),
        calibration=_record(staging, compiled.calibration.get(m.name)),
        calibration_method=chosen[m.name].method, quant_format=chosen[m.name].quant_format,
        export_max_abs_diff=exported[m.name]["max_abs_diff"], float_layers=chosen[m.name].float_layers,
        gate=tried[m.name], int8_scheme=chosen[m.name].int8_scheme,
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
        scripts={name: engine_dir.record_file(staging, path) for name, path in compiled.scripts.items()},
        made_on_target=compiled.made_on_target, calibration=calibration, accuracy=accuracy,
        tensorrt_rules={name: c.tensorrt_problems for name, c in chosen.items()},
        built_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    )


# ---------------------------------------------------------------------------------------------------------------
# orchestration


def build(options: BuildOptions) -> Path:
    """Run every stage and return the engine directory. Raises ``UmeEdgeError`` with an actionable message."""
    check_options(options)
    backend, backend_options = resolve_backend(options)
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
    with engine_dir.staged(out, lambda error, staging: write_failure(error, staging, out,
                                                                     "or choose another --out")) as staging:
        manifest = _run_stages(model, options, backend, backend_options, calib, evaluation, staging, sha256)
        stage(6, STAGES, f"recording the golden inputs and answers (python -m ume_edge.verify), writing {out}")
        engine_dir.save(staging, manifest)
        shutil.rmtree(staging / "work")
        manifest.verification = write_record(model, evaluation.inputs, evaluation.spec, staging, manifest,
                                             options.threads)
        engine_dir.save(staging, manifest)
    return out


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
