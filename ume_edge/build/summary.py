"""The table a finished build prints: each modality's engine, the accuracy per presence pattern, what to do next."""

from __future__ import annotations

from pathlib import Path

from ume_edge import engine_dir
from ume_edge.build import inputs


def format_summary(manifest: engine_dir.Manifest, out: Path, seconds: float | None = None) -> str:
    took = f" in {seconds:.1f} s" if seconds is not None else ""
    lines = [f"\nBuilt {out}{took} ({manifest.backend}, requested {manifest.precision}, max batch "
             f"{manifest.max_batch})", "", "| modality | precision | calibration | file | size |",
             "|---|---|---|---|---|"]
    for m in manifest.modalities:
        record = m.engine or m.onnx
        if record is None:
            raise ValueError(f"manifest: modality {m.name} has neither an engine nor an ONNX file")
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
