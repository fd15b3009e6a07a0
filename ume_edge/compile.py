"""The compile stage: chosen per-modality ONNX files -> what the backend runs, plus the fusion kernel.

ONNX Runtime runs the ONNX files as they are (U8S8 Q/DQ for INT8). TensorRT gets the TensorRT-target ONNX files
(S8S8 Q/DQ, fp16 or fp32) under ``tensorrt/``, the calibration results beside them, the equivalent ``trtexec``
command lines for TensorRT 10 (JetPack 6) and 11, and, unless ``--export-only``, one plan per modality and one for
the fusion, built here.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import onnx

from ume_edge.fusion import FusionParams, fusion_graph
from ume_edge.runtime import file_sha256

TRTEXEC_MAJORS = (10, 11)


def tensorrt_config(options, precision: str, for_fusion: bool = False):
    """The TensorRT build configuration a build's options ask for. The fusion stays on the GPU (DLA lacks Where)."""
    from ume_edge.backends.tensorrt import BuildConfig

    config = BuildConfig(precision="fp32" if for_fusion else precision, max_batch=options.max_batch,
                         workspace_mb=options.workspace_mb, timing_cache=options.timing_cache,
                         dla_core=None if for_fusion else options.dla_core,
                         hardware_compatible=options.hardware_compatible,
                         version_compatible=options.version_compatible)
    config.validate()
    return config


def _entry(staging: Path, path: Path, **extra) -> dict:
    return {"file": str(path.relative_to(staging)), "sha256": file_sha256(path), **extra}


def write_fusion(path: Path, params: FusionParams) -> Path:
    onnx.save(fusion_graph(params), str(path))
    return path


def compile_onnxruntime(staging: Path, chosen: dict, params: FusionParams) -> tuple[dict, None]:
    entries = {"fusion": _entry(staging, write_fusion(staging / "fusion.onnx", params))}
    for name, candidate in chosen.items():
        target = staging / f"{name}.onnx"
        shutil.copyfile(candidate.file, target)
        entries[name] = _entry(staging, target)
    return entries, None


def compile_tensorrt(staging: Path, chosen: dict, params: FusionParams, shapes: dict[str, tuple],
                     options) -> tuple[dict, dict | None]:
    """Write the TensorRT-ready files and, unless export-only, build the plans. Returns entries and the device."""
    folder = staging / "tensorrt"
    folder.mkdir()
    jobs = {"fusion": (write_fusion(folder / "fusion.onnx", params), {"partial_logits": (len(params.modality_order), params.num_classes),
                                                "present": (len(params.modality_order),)},
                       tensorrt_config(options, "fp32", for_fusion=True))}
    for name, candidate in chosen.items():
        shutil.copyfile(candidate.tensorrt_file, folder / f"{name}.onnx")
        if candidate.calibration_cache:
            shutil.copyfile(candidate.calibration_cache, folder / f"{name}.calibration.json")
        jobs[name] = (folder / f"{name}.onnx", {name: shapes[name]}, tensorrt_config(options, candidate.precision))
    entries, device = {}, None
    for name, (onnx_path, inputs, config) in jobs.items():
        plan = staging / f"{name}.plan"
        commands = {str(major): _trtexec(onnx_path, plan, inputs, config, major, staging) for major in TRTEXEC_MAJORS}
        if options.export_only:
            entries[name] = _entry(staging, onnx_path, trtexec=commands)
            continue
        from ume_edge.backends.tensorrt import build_engine

        device = build_engine(onnx_path, plan, inputs, config)
        entries[name] = _entry(staging, plan, tensorrt_onnx=str(onnx_path.relative_to(staging)), trtexec=commands)
    return entries, device


def _trtexec(onnx_path: Path, plan: Path, inputs, config, major: int, staging: Path) -> str:
    """The command as a user would type it inside the engine directory."""
    from ume_edge.backends.tensorrt import trtexec_command

    return trtexec_command(onnx_path.relative_to(staging), plan.relative_to(staging), inputs, config, major)
