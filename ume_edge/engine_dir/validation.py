"""Reading and writing a directory: the manifest, every file's SHA-256 and place, and each ONNX file's tensors against
what the manifest says."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path, PurePosixPath

from ume_edge.constants import LOGITS, PARTIAL_LOGITS, PRESENT, PROBS
from ume_edge.engine_dir.schema import MANIFEST_FILE, REBUILD_HINT, FileRecord, FusionRecord, Manifest, parse_manifest
from ume_edge.errors import EngineMismatch


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
        return len(dims) == len(want) and all(w is None or d in (None, w) for d, w in zip(dims, want, strict=True))

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
