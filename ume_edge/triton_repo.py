"""Write a standard Triton model repository for an engine directory.

    python -m ume_edge.triton_repo --engines engines/avdigits-int8-onnxruntime --out triton_models/

The repository holds one model per modality encoder (``ume_<modality>``), the ``fusion`` model, and the entry
model ``ume``: a Python-backend BLS model whose per-modality inputs are ``optional: true``. It calls only the
encoders whose inputs are present, builds the ``[B, M, C]`` partial logits and the ``[B, M]`` presence mask, calls
``fusion`` and returns ``logits``, ``probs`` and ``label``. (An ensemble cannot skip a step for an absent input, and
Triton's TensorRT backend rejects optional inputs, hence BLS.)

``--entry pipeline`` writes instead an entry model that runs the whole ``ume_edge.runtime.Pipeline`` inside
Triton's Python stub, on a copy of the engine directory (no fusion model, no BLS hops; the Triton host's Python
needs ``ume-edge`` installed). It is the fastest choice on a CPU host; ``python -m ume_edge.serve --runtime
python-backend`` uses it.

Encoders and fusion run on ``onnxruntime_onnx`` (ONNX files), ``tensorrt_plan`` (TensorRT engines), or, with
``--encoder-backend python``, as Python-backend models that run ONNX Runtime - for hosts whose Triton has only the
python backend, such as the one inside the nvidia-pytriton wheel. The fusion never goes to TensorRT (it has no
plan); with ``tensorrt`` encoders it runs on ``onnxruntime_onnx``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

MANIFEST = "manifest.json"
ENTRY_MODEL = "ume"
FUSION_MODEL = "fusion"
ENCODER_BACKENDS = ("auto", "onnxruntime", "python", "tensorrt")
ENTRIES = ("bls", "pipeline")
DEFAULT_MAX_QUEUE_DELAY_US = 100
ENTRY_TEMPLATE = "ume_bls.py"
PIPELINE_TEMPLATE = "ume_pipeline.py"
ONNX_TEMPLATE = "onnx_model.py"

TRITON_DTYPES = {
    "float32": "TYPE_FP32", "float16": "TYPE_FP16", "float64": "TYPE_FP64", "int64": "TYPE_INT64",
    "int32": "TYPE_INT32", "int8": "TYPE_INT8", "uint8": "TYPE_UINT8", "bool": "TYPE_BOOL",
}


def encoder_model_name(modality: str) -> str:
    return f"ume_{modality}"


# ---------------------------------------------------------------------------------------------------------------
# config.pbtxt (protobuf text format) without a protobuf dependency


class Ident(str):
    """An enum value (``TYPE_FP32``, ``KIND_CPU``): written without quotes."""


def to_pbtxt(message: dict) -> str:
    return "\n".join(_message_lines(message, 0)) + "\n"


def _message_lines(message: dict, depth: int) -> list[str]:
    lines: list[str] = []
    for key, value in message.items():
        lines += _field_lines(key, value, depth)
    return lines


def _field_lines(key: str, value, depth: int) -> list[str]:
    pad = "  " * depth
    if isinstance(value, dict):
        return [f"{pad}{key} {{", *_message_lines(value, depth + 1), f"{pad}}}"]
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        lines = [f"{pad}{key} ["]
        for index, item in enumerate(value):
            comma = "," if index < len(value) - 1 else ""
            lines += [f"{pad}  {{", *_message_lines(item, depth + 2), f"{pad}  }}{comma}"]
        return lines + [f"{pad}]"]
    if isinstance(value, list):
        return [f"{pad}{key}: [ {', '.join(_scalar(v) for v in value)} ]"]
    return [f"{pad}{key}: {_scalar(value)}"]


def _scalar(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Ident):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # its escapes (\" \\ \n) are valid text-format escapes
    return str(value)


def _parameters(values: dict[str, str]) -> list[dict]:
    return [{"key": key, "value": {"string_value": value}} for key, value in values.items()]


def _tensor(name: str, dtype: str, dims, optional: bool = False) -> dict:
    if dtype not in TRITON_DTYPES:
        raise ValueError(f"tensor {name!r} has dtype {dtype!r}, which has no Triton type here; "
                         f"supported: {', '.join(TRITON_DTYPES)}")
    tensor = {"name": name, "data_type": Ident(TRITON_DTYPES[dtype]), "dims": [int(d) for d in dims]}
    if optional:
        tensor["optional"] = True
    return tensor


def _scheduling(max_batch: int, instances: int, kind: str, max_queue_delay_us: int) -> dict:
    return {
        "max_batch_size": int(max_batch),
        "dynamic_batching": {"max_queue_delay_microseconds": int(max_queue_delay_us)},
        "instance_group": [{"count": int(instances), "kind": Ident(kind)}],
    }


# ---------------------------------------------------------------------------------------------------------------
# the engine directory


def load_manifest(engines: str | Path) -> dict:
    path = Path(engines) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; build an engine directory first: python -m ume_edge.build")
    manifest = json.loads(path.read_text())
    if manifest.get("schema_version") != 1:
        raise ValueError(f"{path} has schema_version {manifest.get('schema_version')!r}; this ume-edge reads 1")
    return manifest


def resolve_encoder_backend(choice: str, manifest: dict) -> str:
    """``auto`` means ``tensorrt`` for TensorRT engine directories and ``onnxruntime`` otherwise."""
    if choice not in ENCODER_BACKENDS:
        raise ValueError(f"unknown encoder backend {choice!r}; choose one of {', '.join(ENCODER_BACKENDS)}")
    if choice != "auto":
        return choice
    return "tensorrt" if manifest.get("backend") == "tensorrt" else "onnxruntime"


def modality_file(engines: Path, modality: dict, backend: str) -> Path:
    """The engine file an encoder model serves: a ``.plan`` for tensorrt, an ``.onnx`` otherwise."""
    name, listed = modality["name"], engines / modality["file"]
    if backend == "tensorrt":
        suffix, candidates = ".plan", [listed, engines / f"{name}.plan"]
    else:
        suffix, candidates = ".onnx", [listed, engines / f"{name}.onnx", engines / "tensorrt" / f"{name}.onnx"]
    for candidate in candidates:
        if candidate.suffix == suffix and candidate.is_file():
            return candidate
    hint = ("build TensorRT engines on the target GPU: python -m ume_edge.build --backend tensorrt"
            if backend == "tensorrt" else "rebuild the engine directory: python -m ume_edge.build")
    raise FileNotFoundError(f"no {suffix} file for modality {name!r} in {engines}; {hint}")


def template_dir() -> Path:
    """The Python-backend model sources the repository's models are made from (packaged with ume-edge)."""
    return Path(__file__).resolve().parent / "triton_templates"


# ---------------------------------------------------------------------------------------------------------------
# the models


def _fresh_model_dir(out: Path, name: str) -> Path:
    model_dir = out / name
    if model_dir.exists():
        shutil.rmtree(model_dir)
    (model_dir / "1").mkdir(parents=True)
    return model_dir


def _write_model(out: Path, name: str, config: dict, files: dict[str, Path]) -> Path:
    """A model directory: ``config.pbtxt`` plus ``1/<target>`` copied from each ``files`` source."""
    model_dir = _fresh_model_dir(out, name)
    (model_dir / "config.pbtxt").write_text(to_pbtxt({"name": name, **config}))
    for target, source in files.items():
        shutil.copyfile(source, model_dir / "1" / target)
    return model_dir


def _runtime_fields(backend: str, threads: int | None = None) -> tuple[dict, str]:
    """(platform/backend fields, instance kind) for an ONNX or plan model."""
    if backend == "tensorrt":
        return {"platform": "tensorrt_plan"}, "KIND_GPU"
    if backend == "python":
        return {"backend": "python", "parameters": _parameters({"intra_op_threads": str(threads or 0)})}, "KIND_CPU"
    return {"platform": "onnxruntime_onnx"}, "KIND_CPU"


def _model_files(backend: str, engine_file: Path) -> dict[str, Path]:
    if backend == "tensorrt":
        return {"model.plan": engine_file}
    if backend == "python":
        return {"model.onnx": engine_file, "model.py": template_dir() / ONNX_TEMPLATE}
    return {"model.onnx": engine_file}


def write_encoder_model(out: Path, engines: Path, manifest: dict, modality: dict, backend: str,
                        instances: int, max_queue_delay_us: int, threads: int | None = None) -> Path:
    runtime, kind = _runtime_fields(backend, threads)
    num_classes = manifest["model"]["num_classes"]
    config = {
        **runtime,
        **_scheduling(manifest["max_batch"], instances, kind, max_queue_delay_us),
        "input": [_tensor(modality.get("input_name", modality["name"]), modality["dtype"], modality["shape"])],
        "output": [_tensor(modality.get("output_name", "partial_logits"), "float32", [num_classes])],
    }
    engine_file = modality_file(engines, modality, backend)
    return _write_model(out, encoder_model_name(modality["name"]), config, _model_files(backend, engine_file))


def write_fusion_model(out: Path, engines: Path, manifest: dict, backend: str, instances: int,
                       max_queue_delay_us: int, threads: int | None = None) -> Path:
    backend = "onnxruntime" if backend == "tensorrt" else backend
    runtime, kind = _runtime_fields(backend, threads)
    num_modalities, num_classes = len(manifest["modalities"]), manifest["model"]["num_classes"]
    config = {
        **runtime,
        **_scheduling(manifest["max_batch"], instances, kind, max_queue_delay_us),
        "input": [_tensor("partial_logits", "float32", [num_modalities, num_classes]),
                  _tensor("present", "float32", [num_modalities])],
        "output": [_tensor("logits", "float32", [num_classes]), _tensor("probs", "float32", [num_classes])],
    }
    fusion_file = engines / manifest["fusion"]["file"]
    if not fusion_file.is_file():
        raise FileNotFoundError(f"{fusion_file} not found; rebuild the engine directory: python -m ume_edge.build")
    return _write_model(out, FUSION_MODEL, config, _model_files(backend, fusion_file))


def modality_order(manifest: dict) -> list[str]:
    return list(manifest["fusion"].get("modality_order") or [m["name"] for m in manifest["modalities"]])


def _entry_config(manifest: dict, instances: int, max_queue_delay_us: int, parameters: dict[str, str]) -> dict:
    num_classes = manifest["model"]["num_classes"]
    by_name = {m["name"]: m for m in manifest["modalities"]}
    return {
        "backend": "python",
        **_scheduling(manifest["max_batch"], instances, "KIND_CPU", max_queue_delay_us),
        "input": [_tensor(by_name[name].get("input_name", name), by_name[name]["dtype"], by_name[name]["shape"],
                          optional=True) for name in modality_order(manifest)],
        "output": [_tensor("logits", "float32", [num_classes]), _tensor("probs", "float32", [num_classes]),
                   _tensor("label", "int64", [1])],
        "parameters": _parameters(parameters),
    }


def write_entry_model(out: Path, manifest: dict, instances: int, max_queue_delay_us: int) -> Path:
    """``ume`` as BLS: calls the present modalities' encoder models, then the fusion model."""
    by_name = {m["name"]: m for m in manifest["modalities"]}
    order = modality_order(manifest)
    config = _entry_config(manifest, instances, max_queue_delay_us, {
        "modality_order": json.dumps(order),
        "input_names": json.dumps({name: by_name[name].get("input_name", name) for name in order}),
        "encoder_models": json.dumps({name: encoder_model_name(name) for name in order}),
        "encoder_outputs": json.dumps({name: by_name[name].get("output_name", "partial_logits") for name in order}),
        "fusion_model": FUSION_MODEL,
    })
    return _write_model(out, ENTRY_MODEL, config, {"model.py": template_dir() / ENTRY_TEMPLATE})


def write_pipeline_entry_model(out: Path, engines: Path, manifest: dict, instances: int, max_queue_delay_us: int,
                               threads: int | None) -> Path:
    """``ume`` running the whole Pipeline in Triton's Python stub, on a copy of the engine directory."""
    config = _entry_config(manifest, instances, max_queue_delay_us, {"threads": str(threads or 0)})
    model_dir = _write_model(out, ENTRY_MODEL, config, {"model.py": template_dir() / PIPELINE_TEMPLATE})
    shutil.copytree(engines, model_dir / "1" / "engines")
    return model_dir


def write_repository(engines: str | Path, out: str | Path, *, encoder_backend: str = "auto", entry: str = "bls",
                     instances: int = 1, max_queue_delay_us: int = DEFAULT_MAX_QUEUE_DELAY_US,
                     threads: int | None = None) -> list[Path]:
    """Write (or overwrite) the ``ume``, ``fusion`` and ``ume_<modality>`` models in ``out``; other files stay.

    ``threads`` sets ONNX Runtime's threads in the Python-backend models (default: ONNX Runtime's choice).
    """
    if entry not in ENTRIES:
        raise ValueError(f"unknown entry {entry!r}; choose one of {', '.join(ENTRIES)}")
    if instances < 1:
        raise ValueError(f"--instances must be at least 1, got {instances}")
    if max_queue_delay_us < 0:
        raise ValueError(f"--max-queue-delay-us must be 0 or more, got {max_queue_delay_us}")
    engines, out = Path(engines), Path(out)
    manifest = load_manifest(engines)
    backend = resolve_encoder_backend(encoder_backend, manifest)
    out.mkdir(parents=True, exist_ok=True)
    written = [write_encoder_model(out, engines, manifest, modality, backend, instances, max_queue_delay_us, threads)
               for modality in manifest["modalities"]]
    if entry == "pipeline":
        written.append(write_pipeline_entry_model(out, engines, manifest, instances, max_queue_delay_us, threads))
        return written
    written.append(write_fusion_model(out, engines, manifest, backend, instances, max_queue_delay_us, threads))
    written.append(write_entry_model(out, manifest, instances, max_queue_delay_us))
    return written


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m ume_edge.triton_repo",
        description="Write a Triton model repository (encoders, fusion, and the BLS entry model 'ume' that skips "
                    "absent modalities) for an engine directory. Serve it with an NGC tritonserver, or with the "
                    "nvidia-pytriton wheel's tritonserver (python backend only) using --encoder-backend python.",
    )
    parser.add_argument("--engines", help="engine directory written by python -m ume_edge.build (default: the "
                                         "reference INT8 build, built first if missing)")
    parser.add_argument("--out", default="triton_models", help="model repository to write into (default: triton_models/)")
    parser.add_argument("--encoder-backend", choices=ENCODER_BACKENDS, default="auto",
                        help="how encoders and fusion run: auto = tensorrt for TensorRT engine directories, else "
                             "onnxruntime; python = Python-backend models running ONNX Runtime (default: auto)")
    parser.add_argument("--entry", choices=ENTRIES, default="bls",
                        help="bls: 'ume' calls the encoder and fusion models (default); pipeline: 'ume' runs the "
                             "whole ume-edge Pipeline in Triton's Python stub (needs ume-edge installed there)")
    parser.add_argument("--instances", type=int, default=1, help="instances per model (instance_group count)")
    parser.add_argument("--threads", type=int, default=None,
                        help="ONNX Runtime threads in Python-backend models (default: ONNX Runtime's choice)")
    parser.add_argument("--max-queue-delay-us", type=int, default=DEFAULT_MAX_QUEUE_DELAY_US,
                        help=f"dynamic batching delay in microseconds (default {DEFAULT_MAX_QUEUE_DELAY_US})")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    if args.engines is None:
        from ume_edge.build import ensure_default_engines

        args.engines = ensure_default_engines()
    try:
        written = write_repository(args.engines, args.out, encoder_backend=args.encoder_backend, entry=args.entry,
                                   instances=args.instances, max_queue_delay_us=args.max_queue_delay_us,
                                   threads=args.threads)
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for model_dir in written:
        print(model_dir)
    print(f"serve with: tritonserver --model-repository={Path(args.out).resolve()}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
