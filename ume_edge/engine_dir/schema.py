"""The manifest's schema: the typed records of ``manifest.json``, the parser that checks every field, and the format
reference that ``docs/ENGINE_FORMAT.md`` is generated from (``format_reference``)."""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field

from ume_edge.constants import INPUT_DTYPES, PRECISIONS
from ume_edge.errors import EngineMismatch

FORMAT = "ume-edge-engine-directory"
SCHEMA_VERSION = 3
READABLE_SCHEMA_VERSIONS = (2, 3)  # 3 added ``verification``; a version-2 directory reads as one without a record
MANIFEST_FILE = "manifest.json"
STAGING_MARKER = ".ume-edge-staging"
FUSION_MODES = ("ume", "mma")
BACKEND_NAMES = ("tensorrt", "onnxruntime")  # the runtimes a manifest may name; ``ume_edge.backends`` maps them to code
REBUILD_HINT = "rebuild it with `python -m ume_edge.build`"


def _doc(text: str, default=dataclasses.MISSING, default_factory=dataclasses.MISSING):
    return field(default=default, default_factory=default_factory, metadata={"doc": text})


# ---------------------------------------------------------------------------------------------------------------
# the records


@dataclass(frozen=True)
class FileRecord:
    """A file of the directory."""

    path: str = _doc("path relative to the directory, with `/` separators; never leaves the directory")
    sha256: str = _doc("SHA-256 of the file's bytes, checked on every load")


@dataclass
class ModelRecord:
    """The trained model the engines came from."""

    name: str = _doc("model name (a checkpoint's, or the factory's `UMEModel(name=...)`)")
    source: str = _doc("where the build read it: `reference` (the shipped model), a checkpoint path or "
                       "`file.py:factory`")
    sha256: str = _doc("SHA-256 over the model's parameters, in state_dict order")
    fusion: str = _doc("`ume` or `mma`")
    num_classes: int = _doc("C, the number of classes")
    class_names: list[str] = _doc("one name per class")


@dataclass
class ModalityRecord:
    """One modality: its input and the engine that maps it to partial logits."""

    name: str = _doc("modality name; also the engine's input tensor name")
    shape: list[int] = _doc("shape of one sample (no batch axis)")
    dtype: str = _doc("`float32`, or `int64` for token ids")
    precision: str = _doc("what this modality's engine runs: `fp32`, `fp16` or `int8` (after the accuracy gate)")
    engine: FileRecord | None = _doc("the file the backend runs (`.onnx` for ONNX Runtime, `.plan` for TensorRT); "
                                     "null in an export-only directory")
    onnx: FileRecord | None = _doc("the ONNX the engine is built from, when that is another file (TensorRT)")
    calibration: FileRecord | None = _doc("INT8 calibration ranges (ONNX Runtime's calibration cache), if any")
    calibration_method: str | None = _doc("`entropy`, `percentile` or `minmax`; null unless int8")
    quant_format: str | None = _doc("`U8S8` (uint8 activations, int8 weights: ONNX Runtime on a CPU) or `S8S8` "
                                    "(signed, symmetric: TensorRT); null unless int8")
    export_max_abs_diff: float = _doc("largest |ONNX - PyTorch| of the fp32 export on calibration samples")
    float_layers: list[dict] = _doc("layers kept in float by the per-layer fallback: `layer` (its weighted node), "
                                    "`op`, `nodes` (every node left unquantized with it) and `drop_if_quantized` "
                                    "(worst drop in points with that layer back in INT8)", default_factory=list)
    gate: list[dict] = _doc("every accuracy-gate trial: method, worst drop, drops per pattern, passed",
                            default_factory=list)
    value_range: list[int] | None = _doc("int64 inputs: the valid ids `[low, high)`, `high` being the rows of the "
                                         "embedding table the ids index (read from the exported ONNX); inference "
                                         "refuses ids outside it. Null when unknown (ids below 0 are still refused) "
                                         "and for float inputs", default=None)
    int8_scheme: dict = _doc("int8 only: `scheme`, `static` (Q/DQ from the calibration ranges) or `dynamic` (each "
                             "MatMul quantizes its input at every call: an encoder with attention, on ONNX Runtime); "
                             "for an encoder with attention also `why` the gate kept it and the `timings` (ms per "
                             "call of both schemes on the build machine) it compared. Empty otherwise and in "
                             "manifests written before it", default_factory=dict)


@dataclass
class FusionRecord:
    """The fusion kernel (docs/method.md): ``partial_logits [B, M, C]`` and ``present [B, M]`` to logits and probs."""

    mode: str = _doc("`ume` or `mma`")
    modality_order: list[str] = _doc("the M modalities in the order of the fusion's modality axis")
    constants: list[list[float]] | None = _doc("MMA: `c_m = W_m a_m + b_m` per modality, [M][C]; null for UME")
    engine: FileRecord | None = _doc("the fusion as the backend runs it; null in an export-only directory")
    onnx: FileRecord | None = _doc("the fusion's ONNX, when the engine is another file (TensorRT)")


@dataclass
class VerificationRecord:
    """The golden inputs and the answers any deployment of these engines must reproduce (``python -m ume_edge.verify``,
    docs/verify.md)."""

    file: FileRecord = _doc("`verification.npz`: per modality the golden inputs (`input/<modality>`, R rows), per "
                            "presence pattern the fp32 PyTorch logits (`fp32/<pattern>`) and the engines' logits "
                            "(`engines/<pattern>`), per modality the engine's partial logits (`partial/<modality>`)")
    rows: int = _doc("R, the golden rows; every presence pattern is run on all of them")
    source: str = _doc("where the golden rows come from (the evaluation data and which rows)")
    engines_run_by: str = _doc("what produced the recorded engine answers: the engines themselves, or (export-only) "
                               "ONNX Runtime on the files the target builds its engines from")
    measured_vs_fp32: dict[str, float] = _doc("per pattern, the largest |engines - fp32| logit at build time")
    tolerance_vs_build: float = _doc("largest |Δlogit| allowed between a deployment and the recorded engine answers")
    tolerance_vs_fp32: dict[str, float] = _doc("per pattern, largest |Δlogit| allowed between a deployment and fp32: "
                                               "measured_vs_fp32 + tolerance_vs_build")
    how: str = _doc("how the tolerances were chosen, in words")
    checks: list[dict] = _doc("checks recorded later (`build --adopt`): where, when, the verdict and the measured "
                              "numbers, and whether a failure was accepted", default_factory=list)


@dataclass
class Manifest:
    """``manifest.json``."""

    format: str = _doc(f"always `{FORMAT}`")
    schema_version: int = _doc(f"{SCHEMA_VERSION}; version 2 (no `verification`) is read as well, any other is "
                               "refused, never guessed at")
    model: ModelRecord = _doc("the trained model")
    backend: str = _doc("the runtime the engines are for: `onnxruntime` or `tensorrt`")
    precision: str = _doc("the precision the build was asked for")
    max_batch: int = _doc("the largest batch the engines take")
    export_only: bool = _doc("true when no engine was built: the files to build them on the target are here")
    modalities: list[ModalityRecord] = _doc("one record per modality, in the model's order")
    fusion: FusionRecord = _doc("the fusion kernel")
    versions: dict[str, str | None] = _doc("ume_edge, onnx, numpy, onnxruntime (and tensorrt) versions of the build")
    device: dict = _doc("what the engines were built for: the CPU (`kind`, `arch`, `isa`) or the GPU (`kind`, "
                        "`gpu_name`, `compute_capability`, `tensorrt`, `dla_core`, `hardware_compatible`, "
                        "`version_compatible`)")
    backend_settings: dict = _doc("the backend's build settings (TensorRT: workspace, DLA core, timing cache, "
                                  "compatibility)", default_factory=dict)
    scripts: dict[str, FileRecord] = _doc("shell scripts that build the engines on the target, by name (TensorRT: "
                                          "one per major version)", default_factory=dict)
    made_on_target: list[str] = _doc("files the scripts write (export-only directories)", default_factory=list)
    calibration: dict = _doc("calibration method, data file and its SHA-256, sample count", default_factory=dict)
    accuracy: dict = _doc("the verification table: data, metric, samples, and per presence pattern the fp32 "
                          "PyTorch score, the engines' score and the drop", default_factory=dict)
    tensorrt_rules: dict[str, list[str]] = _doc("per modality, how its TensorRT-target file breaks TensorRT's Q/DQ "
                                                "rules (empty when it follows them)", default_factory=dict)
    built_at: str = _doc("local time of the build, ISO 8601", default="")
    verification: VerificationRecord | None = _doc("the verification record; null for a directory built before "
                                                   "ume-edge 0.3 (schema version 2)", default=None)

    @property
    def modality_names(self) -> list[str]:
        return [m.name for m in self.modalities]

    def modality(self, name: str) -> ModalityRecord:
        return next(m for m in self.modalities if m.name == name)

    def file_records(self) -> dict[str, FileRecord]:
        """Every file entry, by where it sits in the manifest (``modalities[audio].engine``, ...)."""
        records = {f"modalities[{m.name}].{key}": getattr(m, key) for m in self.modalities
                   for key in ("engine", "onnx", "calibration")}
        records.update({f"fusion.{key}": getattr(self.fusion, key) for key in ("engine", "onnx")})
        records.update({f"scripts[{name}]": record for name, record in self.scripts.items()})
        if self.verification is not None:
            records["verification.file"] = self.verification.file
        return {where: record for where, record in records.items() if record is not None}

    def declared_files(self) -> set[str]:
        """Every path a build (or its scripts on the target) may have put in the directory."""
        return {MANIFEST_FILE, STAGING_MARKER, *(r.path for r in self.file_records().values()), *self.made_on_target}

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------------------------
# parsing: JSON -> records, every field checked


class _Invalid(Exception):
    def __init__(self, where: str, problem: str):
        super().__init__(f"{where}: {problem}")


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _parse(tp, value, where: str):
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        return _parse(next(a for a in args if a is not type(None)), value, where)
    if dataclasses.is_dataclass(tp):
        return _parse_record(tp, value, where)
    if origin is list:
        if not isinstance(value, list):
            raise _Invalid(where, f"expected a list, found {type(value).__name__}")
        return [_parse(args[0], item, f"{where}[{i}]") for i, item in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise _Invalid(where, f"expected an object, found {type(value).__name__}")
        return {k: _parse(args[1], v, f"{where}.{k}") for k, v in value.items()} if args else value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise _Invalid(where, f"expected {_type_name(tp)}, found {json.dumps(value)[:40]}")
    return value


def _parse_record(cls, value, where: str):
    if not isinstance(value, dict):
        raise _Invalid(where, f"expected an object, found {type(value).__name__}")
    hints = typing.get_type_hints(cls)
    values = {}
    for spec in dataclasses.fields(cls):
        required = spec.default is dataclasses.MISSING and spec.default_factory is dataclasses.MISSING
        if spec.name not in value:
            if required:
                raise _Invalid(f"{where}.{spec.name}".lstrip("."), "missing")
            continue
        values[spec.name] = _parse(hints[spec.name], value[spec.name], f"{where}.{spec.name}".lstrip("."))
    return cls(**values)


def _check_values(manifest: Manifest) -> None:
    """What the types cannot say: allowed words, sizes that agree with each other."""
    problems = []
    model, fusion, names = manifest.model, manifest.fusion, manifest.modality_names
    if manifest.backend not in BACKEND_NAMES:
        problems.append(f"backend: {manifest.backend!r} is not one this ume-edge knows ({', '.join(BACKEND_NAMES)})")
    if manifest.precision not in PRECISIONS:
        problems.append(f"precision: {manifest.precision!r} is not one of {', '.join(PRECISIONS)}")
    missing = [where for where, record in [*((f"modalities[{m.name}].engine", m.engine) for m in manifest.modalities),
                                           ("fusion.engine", fusion.engine)] if record is None]
    if missing and not manifest.export_only:
        problems.append(f"{', '.join(missing)}: no engine file, yet export_only is false")
    if manifest.max_batch < 1:
        problems.append(f"max_batch: {manifest.max_batch} is below 1")
    if model.num_classes < 1 or len(model.class_names) != model.num_classes:
        problems.append(f"model: {len(model.class_names)} class names for num_classes {model.num_classes}")
    if not names or len(set(names)) != len(names):
        problems.append(f"modalities: names must be unique and at least one, found {names}")
    for m in manifest.modalities:
        if m.dtype not in INPUT_DTYPES:
            problems.append(f"modalities[{m.name}].dtype: {m.dtype!r} is not one of {', '.join(INPUT_DTYPES)}")
        if m.precision not in PRECISIONS:
            problems.append(f"modalities[{m.name}].precision: {m.precision!r} is not one of {', '.join(PRECISIONS)}")
        if not m.shape or any(d < 1 for d in m.shape):
            problems.append(f"modalities[{m.name}].shape: {m.shape} must be positive sizes")
        if m.value_range is not None and (m.dtype != "int64" or len(m.value_range) != 2
                                          or not 0 <= m.value_range[0] < m.value_range[1]):
            problems.append(f"modalities[{m.name}].value_range: {m.value_range} must be [low, high) with "
                            "0 <= low < high, and only for int64 inputs")
    if fusion.mode not in FUSION_MODES or fusion.mode != model.fusion:
        problems.append(f"fusion.mode: {fusion.mode!r} (model.fusion {model.fusion!r})")
    if sorted(fusion.modality_order) != sorted(names):
        problems.append(f"fusion.modality_order: {fusion.modality_order} does not match the modalities {names}")
    expected_constants = [len(names), model.num_classes] if fusion.mode == "mma" else None
    found_constants = None if fusion.constants is None else [len(fusion.constants), *{len(r) for r in fusion.constants}]
    if found_constants != expected_constants:
        problems.append(f"fusion.constants: shape {found_constants}, expected {expected_constants}")
    if problems:
        raise _Invalid("manifest", "; ".join(problems))


def parse_manifest(data, source: str = MANIFEST_FILE) -> Manifest:
    """A ``Manifest`` from parsed JSON; ``EngineMismatch`` naming the first field that is wrong."""
    if not isinstance(data, dict):
        raise EngineMismatch(f"{source} is not a JSON object; {REBUILD_HINT}")
    if data.get("format") != FORMAT or data.get("schema_version") not in READABLE_SCHEMA_VERSIONS:
        found = f"format {data.get('format')!r}, schema version {data.get('schema_version')!r}"
        raise EngineMismatch(f"{source}: {found}; this ume-edge reads {FORMAT} versions "
                             f"{', '.join(map(str, READABLE_SCHEMA_VERSIONS))}. Rebuild it with this version of "
                             "`python -m ume_edge.build`")
    if data["schema_version"] < SCHEMA_VERSION and "verification" in data:
        raise EngineMismatch(f"{source}: schema version {data['schema_version']} has no verification record, yet "
                             f"this one has; the manifest was edited or damaged, {REBUILD_HINT}")
    try:
        manifest = _parse_record(Manifest, {**data, "schema_version": SCHEMA_VERSION}, "")
        _check_values(manifest)
    except _Invalid as error:
        raise EngineMismatch(f"{source}: {error}; the manifest was edited or damaged, {REBUILD_HINT}") from None
    return manifest


# ---------------------------------------------------------------------------------------------------------------
# the format reference (docs/ENGINE_FORMAT.md is generated from it)


def _markdown(text: str) -> str:
    return text.replace("``", "`").replace("|", "\\|")


def _type_text(tp) -> str:
    text = str(tp).replace(f"{__name__}.", "").replace("typing.", "")
    return _markdown(text.replace("<class '", "").replace("'>", ""))


def engine_file(record: ModalityRecord | FusionRecord) -> FileRecord:
    """``record.engine``, which every record of a directory that is not export-only has (``validate`` checks)."""
    if record.engine is None:
        raise EngineMismatch(f"{getattr(record, 'name', 'fusion')}: no engine file (an export-only directory?)")
    return record.engine


def format_reference() -> str:
    """The manifest's fields, as Markdown tables, one per record."""
    lines = []
    for cls in (Manifest, ModelRecord, ModalityRecord, FusionRecord, VerificationRecord, FileRecord):
        hints = typing.get_type_hints(cls)
        lines += [f"### `{cls.__name__}`", "", _markdown((cls.__doc__ or "").strip()), "", "| field | type | meaning |",
                  "|---|---|---|"]
        for spec in dataclasses.fields(cls):
            lines.append(f"| `{spec.name}` | `{_type_text(hints[spec.name])}` | {_markdown(spec.metadata['doc'])} |")
        lines.append("")
    return "\n".join(lines)
