"""The engine directory: the contract between the build, the runtime, serving and Triton repositories.

This module is the only code that reads or writes ``manifest.json``. The manifest is a tree of typed records
(``Manifest`` below); ``load`` checks everything it can before anything is run: every field and its type, that
each file entry stays inside the directory and matches its SHA-256, and that each ONNX file's inputs and outputs are
what the manifest says. ``docs/ENGINE_FORMAT.md`` is generated from these records (``format_reference``).

A build writes into a hidden staging folder beside ``--out`` and only then puts it in place (``publish``). ``--out``
is replaced only when it is absent, empty, or an engine directory that ume-edge wrote (nothing in it but the files its
manifest lists); anything else is refused and left untouched. On Linux the swap is one
``renameat2(RENAME_EXCHANGE)``, so at every instant ``--out`` is either the complete old build or the complete new
one. Staging folders left by killed builds are removed by the next build into the same parent folder.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import hashlib
import json
import logging
import os
import shutil
import tempfile
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from ume_edge.backends import NAMES as BACKEND_NAMES
from ume_edge.constants import INPUT_DTYPES, LOGITS, PARTIAL_LOGITS, PRECISIONS, PRESENT, PROBS
from ume_edge.errors import BuildError, EngineMismatch

LOGGER = logging.getLogger(__name__)

FORMAT = "ume-edge-engine-directory"
SCHEMA_VERSION = 2
MANIFEST_FILE = "manifest.json"
STAGING_MARKER = ".ume-edge-staging"
FUSION_MODES = ("ume", "mma")
REBUILD_HINT = "rebuild it with `python -m ume_edge.build`"
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


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
    source: str = _doc("where the build read it: `reference` (the shipped model), a checkpoint path or `file.py:factory`")
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


@dataclass
class FusionRecord:
    """The fusion kernel (METHOD.md): ``partial_logits [B, M, C]`` and ``present [B, M]`` to logits and probs."""

    mode: str = _doc("`ume` or `mma`")
    modality_order: list[str] = _doc("the M modalities in the order of the fusion's modality axis")
    constants: list[list[float]] | None = _doc("MMA: `c_m = W_m a_m + b_m` per modality, [M][C]; null for UME")
    engine: FileRecord | None = _doc("the fusion as the backend runs it; null in an export-only directory")
    onnx: FileRecord | None = _doc("the fusion's ONNX, when the engine is another file (TensorRT)")


@dataclass
class Manifest:
    """``manifest.json``."""

    format: str = _doc(f"always `{FORMAT}`")
    schema_version: int = _doc(f"{SCHEMA_VERSION}; a directory of another version is refused, never guessed at")
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
    if data.get("format") != FORMAT or data.get("schema_version") != SCHEMA_VERSION:
        found = f"format {data.get('format')!r}, schema version {data.get('schema_version')!r}"
        raise EngineMismatch(f"{source}: {found}; this ume-edge reads {FORMAT} version {SCHEMA_VERSION}. "
                             f"Rebuild it with this version of `python -m ume_edge.build`")
    try:
        manifest = _parse_record(Manifest, data, "")
        _check_values(manifest)
    except _Invalid as error:
        raise EngineMismatch(f"{source}: {error}; the manifest was edited or damaged, {REBUILD_HINT}") from None
    return manifest


# ---------------------------------------------------------------------------------------------------------------
# reading and writing a directory


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def inside(directory: Path, relative: str, where: str) -> Path:
    """``directory / relative``, refusing any path that could lead out of the directory."""
    pure = PurePosixPath(relative)
    if not relative or pure.is_absolute() or ".." in pure.parts or "\\" in relative:
        raise EngineMismatch(f"{where}: the path {relative!r} leads out of the engine directory; {REBUILD_HINT}")
    path = directory.joinpath(*pure.parts)
    resolved, root = path.resolve(), directory.resolve()
    if resolved != root and root not in resolved.parents:
        raise EngineMismatch(f"{where}: {relative!r} is a link that leads out of the engine directory; {REBUILD_HINT}")
    return path


def record_file(directory: Path, path: Path) -> FileRecord:
    """The record of a file the build wrote inside ``directory``."""
    return FileRecord(path.relative_to(directory).as_posix(), file_sha256(path))


def save(directory: Path, manifest: Manifest) -> Path:
    path = directory / MANIFEST_FILE
    path.write_text(json.dumps(manifest.to_json(), indent=2) + "\n")
    return path


def read_manifest(directory: str | os.PathLike) -> Manifest:
    """The directory's manifest, parsed and value-checked, without looking at its files."""
    directory = Path(directory)
    path = directory / MANIFEST_FILE
    if not path.is_file():
        raise EngineMismatch(f"{directory} has no {MANIFEST_FILE}: it is not an engine directory. Build one with "
                             f"`python -m ume_edge.build --out {directory}`")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise EngineMismatch(f"{path} cannot be read as JSON ({error}); {REBUILD_HINT}") from None
    return parse_manifest(data, str(path))


def load(directory: str | os.PathLike) -> Manifest:
    """The manifest of a complete, untampered directory: files inside it, hashes equal, ONNX inputs and outputs as
    declared. Raises ``EngineMismatch`` naming the field or file and what to do."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    for where, record in manifest.file_records().items():
        path = inside(directory, record.path, where)
        if not path.is_file():
            raise EngineMismatch(f"{path} is missing ({where}); {REBUILD_HINT}")
        if file_sha256(path) != record.sha256:
            raise EngineMismatch(f"{path} ({where}) does not match the SHA-256 in the manifest: it was changed or "
                                 f"damaged after the build; {REBUILD_HINT}")
    check_onnx_files(directory, manifest)
    return manifest


# ---------------------------------------------------------------------------------------------------------------
# ONNX files against the manifest


def _onnx_signature(path: Path, where: str) -> tuple[dict, dict]:
    """({input: (dtype, dims)}, {output: (dtype, dims)}); a symbolic dimension is None."""
    import onnx
    from onnx import helper

    try:
        graph = onnx.load(str(path), load_external_data=False).graph
    except Exception as error:  # onnx raises DecodeError and others for a file that is not ONNX
        raise EngineMismatch(f"{path} ({where}) is not a readable ONNX file ({type(error).__name__}); "
                             f"{REBUILD_HINT}") from None

    def describe(values):
        return {v.name: (helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name,
                         [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim])
                for v in values}

    initializers = {i.name for i in graph.initializer}
    return describe([i for i in graph.input if i.name not in initializers]), describe(graph.output)


def _expect(path: Path, where: str, found: dict, expected: dict) -> None:
    def same(dims, want):
        return len(dims) == len(want) and all(w is None or d in (None, w) for d, w in zip(dims, want))

    if set(found) != set(expected) or not all(found[n][0] == expected[n][0] and same(found[n][1], expected[n][1])
                                              for n in expected):
        raise EngineMismatch(f"{path} ({where}) has tensors {found}, but the manifest says {expected}: the file does "
                             f"not belong to this directory; {REBUILD_HINT}")


def check_onnx_files(directory: Path, manifest: Manifest) -> None:
    classes, count = manifest.model.num_classes, len(manifest.modalities)
    for m in manifest.modalities:
        for key in ("engine", "onnx"):
            record = getattr(m, key)
            if record is None or not record.path.endswith(".onnx"):
                continue
            path, where = directory / record.path, f"modalities[{m.name}].{key}"
            inputs, outputs = _onnx_signature(path, where)
            _expect(path, where, inputs, {m.name: (m.dtype, [None, *m.shape])})
            _expect(path, where, outputs, {PARTIAL_LOGITS: ("float32", [None, classes])})
    for key in ("engine", "onnx"):
        record = getattr(manifest.fusion, key)
        if record is None or not record.path.endswith(".onnx"):
            continue
        path, where = directory / record.path, f"fusion.{key}"
        inputs, outputs = _onnx_signature(path, where)
        _expect(path, where, inputs, {PARTIAL_LOGITS: ("float32", [None, count, classes]),
                                      PRESENT: ("float32", [None, count])})
        _expect(path, where, outputs, {LOGITS: ("float32", [None, classes]), PROBS: ("float32", [None, classes])})
        _check_fusion_graph(path, where, manifest.fusion, classes)


def _check_fusion_graph(path: Path, where: str, fusion: FusionRecord, num_classes: int) -> None:
    """The fusion file computes the manifest's fusion: the same operations and the same constants."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    from ume_edge.fusion import FusionParams, fusion_graph

    expected = fusion_graph(FusionParams.from_record(fusion, num_classes))
    graph = onnx.load(str(path), load_external_data=False).graph
    constants = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    wanted = {i.name: numpy_helper.to_array(i) for i in expected.graph.initializer}
    same_ops = [n.op_type for n in graph.node] == [n.op_type for n in expected.graph.node]
    same_constants = constants.keys() == wanted.keys() and all(
        constants[k].shape == wanted[k].shape and np.allclose(constants[k], wanted[k], atol=1e-6) for k in wanted)
    if not (same_ops and same_constants):
        raise EngineMismatch(f"{path} ({where}) does not compute the {fusion.mode.upper()} fusion the manifest "
                             f"describes (operations or constants differ); {REBUILD_HINT}")


# ---------------------------------------------------------------------------------------------------------------
# the valid ids of an integer input

# Ops that pass their input's values through unchanged (only the shape may change).
_VALUE_PRESERVING_OPS = {"Cast", "Reshape", "Unsqueeze", "Squeeze", "Flatten", "Identity"}


def index_range(onnx_path: str | os.PathLike, input_name: str) -> list[int] | None:
    """``[0, rows]`` when ``input_name`` (through value-preserving ops) indexes the rows of initializer tables with
    ``Gather`` (an embedding lookup), the smallest table deciding; None when it cannot be told."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    table_rows = {i.name: i.dims[0] for i in graph.initializer if i.dims}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    carrying, rows = [input_name], []
    seen = {input_name}
    while carrying:
        tensor = carrying.pop()
        for node in consumers.get(tensor, []):
            if node.op_type == "Gather" and list(node.input[1:2]) == [tensor] and _gather_axis(node) == 0 \
                    and node.input[0] in table_rows:
                rows.append(table_rows[node.input[0]])
            elif node.op_type in _VALUE_PRESERVING_OPS and node.input[0] == tensor:
                carrying += [out for out in node.output if out not in seen]
                seen.update(node.output)
    return [0, int(min(rows))] if rows else None


def _gather_axis(node) -> int:
    return next((attribute.i for attribute in node.attribute if attribute.name == "axis"), 0)


# ---------------------------------------------------------------------------------------------------------------
# the format reference (docs/ENGINE_FORMAT.md is generated from it)


def _markdown(text: str) -> str:
    return text.replace("``", "`").replace("|", "\\|")


def _type_text(tp) -> str:
    text = str(tp).replace("ume_edge.engine_dir.", "").replace("typing.", "")
    return _markdown(text.replace("<class '", "").replace("'>", ""))


def format_reference() -> str:
    """The manifest's fields, as Markdown tables, one per record."""
    lines = []
    for cls in (Manifest, ModelRecord, ModalityRecord, FusionRecord, FileRecord):
        hints = typing.get_type_hints(cls)
        lines += [f"### `{cls.__name__}`", "", _markdown(cls.__doc__.strip()), "", "| field | type | meaning |",
                  "|---|---|---|"]
        for spec in dataclasses.fields(cls):
            lines.append(f"| `{spec.name}` | `{_type_text(hints[spec.name])}` | {_markdown(spec.metadata['doc'])} |")
        lines.append("")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# what may be replaced


def _own_declared_files(directory: Path) -> set[str] | None:
    """The files an ume-edge manifest in ``directory`` declares (any schema version), or None when it has none."""
    try:
        data = json.loads((directory / MANIFEST_FILE).read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    if not isinstance(data, dict) or not {"schema_version", "modalities", "fusion", "backend"} <= set(data):
        return None
    try:
        return parse_manifest(data).declared_files()
    except EngineMismatch:
        return _declared_by_older_schema(data)


def _declared_by_older_schema(data: dict) -> set[str]:
    """Schema 1 kept one ``file`` per entry and TensorRT files under ``tensorrt/``."""
    files = {MANIFEST_FILE, STAGING_MARKER, "tensorrt/fusion.onnx"}
    for entry in [*data.get("modalities", []), data.get("fusion", {})]:
        if isinstance(entry, dict):
            files.update(v for k, v in entry.items() if k in ("file", "tensorrt_onnx") and isinstance(v, str))
            if isinstance(entry.get("name"), str):
                files.update({f"tensorrt/{entry['name']}.onnx", f"tensorrt/{entry['name']}.calibration.json"})
    return files


def _unknown_entries(directory: Path, known: set[str]) -> list[str]:
    unknown = []
    for path in sorted(directory.rglob("*")):
        relative = path.relative_to(directory).as_posix()
        if path.is_symlink() or (path.is_file() and relative not in known):
            unknown.append(relative)
        elif path.is_dir() and not any(k.startswith(relative + "/") for k in known):
            unknown.append(relative + "/")
    return unknown


def check_replaceable(out: Path) -> None:
    """Refuse, with one line, an ``--out`` whose replacement could lose a file that ume-edge did not write."""
    if out.is_symlink():
        raise BuildError(f"--out {out} is a symbolic link; give the folder it points to, or another path")
    if not out.exists():
        parent = next((p for p in out.parents if p.exists()), None)
        if parent is not None and not parent.is_dir():
            raise BuildError(f"--out {out}: {parent} is a file, not a folder; choose another path")
        return
    if not out.is_dir():
        raise BuildError(f"--out {out} is an existing file, not an engine directory; it was left untouched. "
                         "Choose another path")
    if not any(out.iterdir()):
        return
    declared = _own_declared_files(out)
    if declared is None:
        raise BuildError(f"--out {out} exists and is not an engine directory written by ume-edge (no ume-edge "
                         "manifest.json); it was left untouched. Choose another path, or remove it yourself")
    unknown = _unknown_entries(out, declared)
    if unknown:
        shown = ", ".join(unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
        raise BuildError(f"--out {out} is an engine directory but also holds files a build did not write ({shown}); "
                         "it was left untouched. Move them out, or choose another path")


# ---------------------------------------------------------------------------------------------------------------
# staging and publishing


def make_staging(out: Path) -> Path:
    """A fresh hidden folder beside ``out`` to build into (same file system, so it can be renamed into place)."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_staging(out.parent)
        return _marked_folder(out)
    except OSError as error:
        raise BuildError(f"--out {out}: cannot write in {out.parent} ({error.strerror}); choose a folder you can "
                         "write to") from error


def _marked_folder(out: Path) -> Path:
    folder = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
    (folder / STAGING_MARKER).touch()
    return folder


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_staging(parent: Path) -> None:
    """Clean up after builds that were killed (their process is gone): a complete build whose ``--out`` is missing
    is put back in place, any other staging folder is removed."""
    for candidate in sorted(parent.glob(".*.tmp-*-*")):
        name, _, rest = candidate.name[1:].rpartition(".tmp-")
        pid = rest.split("-", 1)[0]
        if not pid.isdigit() or pid_alive(int(pid)) or not candidate.is_dir():
            continue
        if not (candidate / STAGING_MARKER).is_file() and any(candidate.iterdir()):
            continue  # not ours
        out = parent / name
        if not out.exists() and _own_declared_files(candidate) is not None:
            (candidate / STAGING_MARKER).unlink()
            os.rename(candidate, out)
            LOGGER.warning("restored %s, which a killed build had moved aside", out)
            continue
        _remove_staging(candidate)
        LOGGER.info("removed %s, left by a build that was killed", candidate)


def exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux ``renameat2``); False where the system or file system cannot."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def publish(staging: Path, out: Path) -> None:
    """Put the finished ``staging`` folder (marked, complete) at ``out``; an old build there is replaced only now.

    The old build is marked as staging before the swap, so whatever instant a kill comes, the next build finds
    either a complete ``out`` and removable leftovers, or a complete build to put back at ``out``."""
    check_replaceable(out)
    if not out.exists():
        os.rename(staging, out)
        (out / STAGING_MARKER).unlink()
        return
    (out / STAGING_MARKER).touch()
    if exchange(staging, out):
        old = staging
    else:  # no atomic swap on this system: the old build moves aside, then the new one takes its place
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
        os.rename(out, old)
        os.rename(staging, out)
    (out / STAGING_MARKER).unlink()
    _remove_staging(old)


def _remove_staging(folder: Path) -> None:
    """Remove a staging folder, its marker last, so a kill halfway leaves it recognisable (or empty)."""
    for child in folder.iterdir():
        if child.name == STAGING_MARKER:
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()
    (folder / STAGING_MARKER).unlink(missing_ok=True)
    folder.rmdir()


def discard(staging: Path) -> None:
    """Remove a staging folder after a failed or interrupted build."""
    if staging.exists():
        _remove_staging(staging)
