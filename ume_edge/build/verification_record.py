"""The build's last stage: the verification record (``ume_edge.verification``) of the engines just built, or of the
files an export-only directory's engines will be built from on the target."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ume_edge import engine_dir, verification
from ume_edge.backends.onnxruntime import OnnxRuntimeEngine
from ume_edge.constants import PARTIAL_LOGITS
from ume_edge.data import pattern_key, presence_patterns
from ume_edge.fusion import FusionParams, fuse
from ume_edge.runtime import Pipeline


def fp32_logits(model, golden: dict[str, np.ndarray]) -> verification.Logits:
    from ume_edge.train import torch_predictor

    predict = torch_predictor(model)
    return {pattern_key(p): predict({n: golden[n] if n in p else None for n in model.modality_names})
            for p in presence_patterns(model.modality_names)}


def _export_only_answers(model, directory: Path, manifest: engine_dir.Manifest, golden: dict[str, np.ndarray],
                         threads: int | None) -> tuple[verification.Logits, dict[str, np.ndarray]]:
    """ONNX Runtime on the files the target builds from, fused by the fusion kernel's reference."""
    partials = {}
    for record in manifest.modalities:
        assert record.onnx is not None  # an export-only directory keeps the file its engine is built from
        engine = OnnxRuntimeEngine(directory / record.onnx.path, threads)
        try:
            partials[record.name] = engine.infer({record.name: golden[record.name]})[PARTIAL_LOGITS]
        finally:
            engine.close()
    params, order = FusionParams.from_model(model), manifest.fusion.modality_order
    logits = {}
    for pattern in presence_patterns(order):
        present = np.tile([name in pattern for name in order], (len(golden[order[0]]), 1))
        logits[pattern_key(pattern)] = fuse(params, np.stack([partials[name] for name in order], axis=1), present)
    return logits, partials


def write_record(model, evaluation: dict[str, np.ndarray], spec: str, directory: Path,
                 manifest: engine_dir.Manifest, threads: int | None) -> engine_dir.VerificationRecord:
    """Write ``verification.npz`` into ``directory`` (whose manifest is saved) and return its manifest record."""
    golden, rows_taken = verification.golden_rows(evaluation, manifest.max_batch)
    fp32 = fp32_logits(model, golden)
    if manifest.export_only:
        engines, partials = _export_only_answers(model, directory, manifest, golden, threads)
        run_by = "onnxruntime, on the files the target builds its engines from"
    else:
        with Pipeline.load(directory, threads) as pipeline:
            answers, partials = verification.run_engines(pipeline, golden)
        engines, run_by = answers[verification.ROUTE_INPUTS], f"the {manifest.backend} engines of this directory"
    measured = {pattern: verification.max_abs(engines[pattern], fp32[pattern]) for pattern in fp32}
    same_engines = not manifest.export_only
    vs_build, vs_fp32 = verification.tolerances(measured, [m.precision for m in manifest.modalities], same_engines)
    path = directory / verification.RECORD_FILE
    verification.Golden(golden, fp32, engines, partials).save(path)
    return engine_dir.VerificationRecord(
        file=engine_dir.record_file(directory, path), rows=len(golden[model.modality_names[0]]),
        source=f"{spec}: {rows_taken}", engines_run_by=run_by, measured_vs_fp32=measured,
        tolerance_vs_build=vs_build, tolerance_vs_fp32=vs_fp32, how=verification.how_chosen(same_engines))
