"""A standard Triton model repository for an engine directory.

The repository holds one model per modality encoder (``ume_<modality>``), the ``fusion`` model, and the entry model
``ume``: a Python-backend BLS model whose per-modality inputs are ``optional: true``. It calls only the encoders
whose rows are present, builds the ``[B, M, C]`` partial logits and the ``[B, M]`` presence mask, calls ``fusion``
and returns ``logits``, ``probs`` and ``label``. Like the pipeline entry it takes the optional ``present`` mask and
counts requests by presence pattern on Triton's metrics endpoint; both check requests with ``contract.py``, copied
beside each Python-backend ``model.py`` as ``ume_contract.py`` so the repository needs no ume-edge. (An
ensemble cannot skip a step for an absent input, and Triton's TensorRT backend rejects optional inputs, hence BLS.)

Encoders and fusion are served as the engine directory's backend says (``onnxruntime_onnx`` with ``1/model.onnx``,
``tensorrt_plan`` with ``1/model.plan``: the fusion plan too, so partial logits and fusion share one platform and no
ONNX Runtime is needed on a Jetson). For an export-only TensorRT directory the plans do not exist yet: each model gets
its ONNX as ``source.onnx`` beside its config, and ``build_plans_trt<major>.sh`` at the top builds every
``<model>/1/model.plan`` with trtexec on the target. ``encoder_backend="python"`` writes Python-backend models that
run the ONNX files with ONNX Runtime instead, for a Triton with only the python backend (the nvidia-pytriton wheel's).

``entry="pipeline"`` writes an entry model that runs the whole ``ume_edge.runtime.Pipeline`` inside Triton's Python
stub, on a copy of the engine directory (no fusion model, no BLS hops; the Triton host's Python needs ume-edge). Both
entries take the optional ``present`` mask (bool ``[M]`` per row) with every modality, so that requests of any
presence pattern share batches.

Only model folders (and scripts) this module wrote are ever replaced (a model's ``config.pbtxt`` starts with
``WRITTEN_BY``); anything else in the way is refused before anything is written, and other entries stay untouched.
The whole set is built in a staging folder beside the repository, on the same file system, and only then swapped in,
so a run that fails leaves the repository exactly as it was (see "deciding, then swapping the whole set in").
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from ume_edge import backends, engine_dir
from ume_edge.constants import (
    DEFAULT_MAX_QUEUE_DELAY_US,
    ENTRY_MODEL,
    FUSION_MODEL,
    LABEL,
    LOGITS,
    PARTIAL_LOGITS,
    PRESENT,
    PROBS,
    encoder_model_name,
)
from ume_edge.errors import UmeEdgeError
from ume_edge.serving import contract

LOGGER = logging.getLogger(__name__)

ENCODER_BACKENDS = ("auto", "python")
ENTRIES = ("bls", "pipeline")
ENTRY_TEMPLATE = "ume_bls.py"
PIPELINE_TEMPLATE = "ume_pipeline.py"
ONNX_TEMPLATE = "onnx_model.py"
SOURCE_ONNX = "source.onnx"
WRITTEN_BY = "# Written by python -m ume_edge.triton_repo; the next run replaces this model folder."
SCRIPT_WRITTEN_BY = "Written by ume-edge"  # in the first lines of each target build script

TRITON_DTYPES = {
    "float32": "TYPE_FP32", "float16": "TYPE_FP16", "float64": "TYPE_FP64", "int64": "TYPE_INT64",
    "int32": "TYPE_INT32", "int8": "TYPE_INT8", "uint8": "TYPE_UINT8", "bool": "TYPE_BOOL",
}


class RepositoryError(UmeEdgeError):
    """A repository that cannot be written, or served, as asked; the message says why and what to do."""


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
    tensor: dict[str, object] = {"name": name, "data_type": Ident(TRITON_DTYPES[dtype]), "dims": [int(d) for d in dims]}
    if optional:
        tensor["optional"] = True
    return tensor


def _scheduling(max_batch: int, instances: int, kind: str, max_queue_delay_us: int,
                secondary_devices: tuple[dict, ...] = ()) -> dict:
    group = {"count": int(instances), "kind": Ident(kind)}
    if secondary_devices:
        group["secondary_devices"] = [{"kind": Ident(d["kind"]), "device_id": int(d["device_id"])}
                                      for d in secondary_devices]
    return {
        "max_batch_size": int(max_batch),
        "dynamic_batching": {"max_queue_delay_microseconds": int(max_queue_delay_us)},
        "instance_group": [group],
    }


def template_dir() -> Path:
    """The Python-backend model sources the repository's models are made from (packaged with ume-edge)."""
    return Path(__file__).resolve().parent / "templates"


def python_model_files(template: str, version: str = "1") -> dict[str, Path]:
    """The files of a Python-backend model version: ``template`` as its ``model.py`` and the request contract beside
    it (Triton's stub puts the version folder on ``sys.path``, so ``import ume_contract`` finds it)."""
    return {f"{version}/model.py": template_dir() / template,
            f"{version}/{contract.CONTRACT_FILE}": Path(contract.__file__)}


# ---------------------------------------------------------------------------------------------------------------
# model folders


def _write_model(folder: Path, name: str, config: dict, files: dict[str, Path]) -> Path:
    """A new model folder ``folder/name``: ``config.pbtxt`` plus each ``files`` source copied to its relative target."""
    model_dir = folder / name
    (model_dir / "1").mkdir(parents=True)
    (model_dir / "config.pbtxt").write_text(WRITTEN_BY + "\n" + to_pbtxt({"name": name, **config}))
    for target, source in files.items():
        shutil.copyfile(source, model_dir / target)
    return model_dir


class _Writer:
    """Writes one repository for one engine directory."""

    def __init__(self, engines: Path, manifest: engine_dir.Manifest, python_models: bool, instances: int,
                 max_queue_delay_us: int, threads: int | None):
        self.engines, self.manifest, self.python_models = engines, manifest, python_models
        self.instances, self.max_queue_delay_us, self.threads = instances, max_queue_delay_us, threads
        self.backend = backends.get(manifest.backend)
        self.targets: dict[str, tuple[str, str]] = {}  # engines the target still has to build: key -> (onnx, plan)

    def _runtime(self, key: str, record_engine, record_onnx) -> tuple[dict, dict[str, Path], tuple[dict, ...]]:
        """(platform/backend fields, files to copy, secondary devices) of an encoder (``key``) or the fusion."""
        if self.python_models:
            return ({"backend": "python", "parameters": _parameters({"intra_op_threads": str(self.threads or 0)})},
                    {"1/model.onnx": self.engines / record_engine.path, **python_model_files(ONNX_TEMPLATE)}, ())
        model = self.backend.triton_model(self.manifest, None if key == FUSION_MODEL else key)
        fields = {"platform": model.platform}
        if record_engine is not None:
            return fields, {f"1/{model.file_name}": self.engines / record_engine.path}, model.secondary_devices
        name = FUSION_MODEL if key == FUSION_MODEL else encoder_model_name(key)
        self.targets[key] = (f"{name}/{SOURCE_ONNX}", f"{name}/1/{model.file_name}")
        return fields, {SOURCE_ONNX: self.engines / record_onnx.path}, model.secondary_devices

    def _kind(self) -> str:
        return "KIND_CPU" if self.python_models else \
            self.backend.triton_model(self.manifest, None).instance_kind

    def encoder(self, folder: Path, modality: engine_dir.ModalityRecord) -> Path:
        runtime, files, secondary = self._runtime(modality.name, modality.engine, modality.onnx)
        if self.python_models and modality.value_range is not None:  # the template refuses ids outside it
            runtime["parameters"] += _parameters({"value_ranges": json.dumps({modality.name: modality.value_range})})
        config = {
            **runtime,
            **_scheduling(self.manifest.max_batch, self.instances, self._kind(), self.max_queue_delay_us, secondary),
            "input": [_tensor(modality.name, modality.dtype, modality.shape)],
            "output": [_tensor(PARTIAL_LOGITS, "float32", [self.manifest.model.num_classes])],
        }
        return _write_model(folder, encoder_model_name(modality.name), config, files)

    def fusion(self, folder: Path) -> Path:
        fusion = self.manifest.fusion
        runtime, files, _ = self._runtime(FUSION_MODEL, fusion.engine, fusion.onnx)
        count, classes = len(self.manifest.modalities), self.manifest.model.num_classes
        config = {
            **runtime,
            **_scheduling(self.manifest.max_batch, self.instances, self._kind(), self.max_queue_delay_us),
            "input": [_tensor(PARTIAL_LOGITS, "float32", [count, classes]), _tensor(PRESENT, "float32", [count])],
            "output": [_tensor(LOGITS, "float32", [classes]), _tensor(PROBS, "float32", [classes])],
        }
        return _write_model(folder, FUSION_MODEL, config, files)

    def _entry_config(self, parameters: dict[str, str]) -> dict:
        classes, order = self.manifest.model.num_classes, self.manifest.fusion.modality_order
        mask = [_tensor(PRESENT, "bool", [len(order)], optional=True)]
        return {
            "backend": "python",
            **_scheduling(self.manifest.max_batch, self.instances, "KIND_CPU", self.max_queue_delay_us),
            "input": [_tensor(name, self.manifest.modality(name).dtype, self.manifest.modality(name).shape,
                              optional=True) for name in order] + mask,
            "output": [_tensor(LOGITS, "float32", [classes]), _tensor(PROBS, "float32", [classes]),
                       _tensor(LABEL, "int64", [1])],
            "parameters": _parameters(parameters),
        }

    def bls_entry(self, folder: Path) -> Path:
        """``ume`` as BLS: calls the present modalities' encoder models, then the fusion model. An encoder whose
        engine runs one fixed batch (a DLA plan) gets its rows padded to that batch."""
        order = self.manifest.fusion.modality_order
        fixed = {name: self.manifest.max_batch for name in order
                 if not self.python_models and self.manifest.device.get("dla_core") is not None}
        config = self._entry_config({
            "modality_order": json.dumps(order),
            "encoder_models": json.dumps({name: encoder_model_name(name) for name in order}),
            "encoder_output": PARTIAL_LOGITS,
            "encoder_fixed_batch": json.dumps(fixed),
            "fusion_model": FUSION_MODEL,
            "value_ranges": json.dumps({m.name: m.value_range for m in self.manifest.modalities
                                        if m.value_range is not None}),
        })
        return _write_model(folder, ENTRY_MODEL, config, python_model_files(ENTRY_TEMPLATE))

    def pipeline_entry(self, folder: Path) -> Path:
        """``ume`` running the whole Pipeline in Triton's Python stub, on a copy of the engine directory."""
        config = self._entry_config({"threads": str(self.threads or 0)})
        model_dir = _write_model(folder, ENTRY_MODEL, config, python_model_files(PIPELINE_TEMPLATE))
        shutil.copytree(self.engines, model_dir / "1" / "engines",
                        ignore=shutil.ignore_patterns(engine_dir.STAGING_MARKER))
        return model_dir

    def write_all(self, folder: Path, entry: str) -> list[str]:
        """Every model folder (and build script) into the empty ``folder``; their names, in the order written."""
        written = [self.encoder(folder, modality) for modality in self.manifest.modalities]
        if entry == "pipeline":
            written.append(self.pipeline_entry(folder))
        else:
            written += [self.fusion(folder), self.bls_entry(folder), *self.scripts(folder)]
        return [path.name for path in written]

    def scripts(self, folder: Path) -> list[Path]:
        written = []
        for name, text in self.backend.target_build_scripts(self.manifest, self.targets).items():
            path = folder / name
            path.write_text(text)
            path.chmod(0o755)
            written.append(path)
        return written


def _check_request(manifest: engine_dir.Manifest, python_models: bool, entry: str, instances: int,
                   max_queue_delay_us: int) -> None:
    if entry not in ENTRIES:
        raise RepositoryError(f"unknown entry {entry!r}; choose one of {', '.join(ENTRIES)}")
    if instances < 1:
        raise RepositoryError(f"--instances must be at least 1, got {instances}")
    if max_queue_delay_us < 0:
        raise RepositoryError(f"--max-queue-delay-us must be 0 or more, got {max_queue_delay_us}")
    records = [m.engine for m in manifest.modalities] + [manifest.fusion.engine]
    if (python_models or entry == "pipeline") and not all(r is not None and r.path.endswith(".onnx")
                                                         for r in records):
        raise RepositoryError("Python-backend models and the pipeline entry run ONNX engine files with ONNX Runtime; "
                              f"this is a {manifest.backend} directory"
                              f"{' (export only)' if manifest.export_only else ''}. Write the default layout instead")


def write_repository(engines: str | Path, out: str | Path, *, encoder_backend: str = "auto", entry: str = "bls",
                     instances: int = 1, max_queue_delay_us: int = DEFAULT_MAX_QUEUE_DELAY_US,
                     threads: int | None = None) -> list[Path]:
    """Write (or rewrite) the ``ume``, ``fusion`` and ``ume_<modality>`` models, and for an export-only directory
    the scripts that build its engines, in ``out``; returns what was written. Other files in ``out`` stay.
    Everything is decided before anything is written, and the whole set is swapped in at the end.

    ``threads`` sets ONNX Runtime's threads in the Python-backend models (default: ONNX Runtime's choice).
    """
    if encoder_backend not in ENCODER_BACKENDS:
        raise RepositoryError(f"unknown encoder backend {encoder_backend!r}; choose one of "
                              f"{', '.join(ENCODER_BACKENDS)}")
    engines, out = Path(engines), Path(out)
    manifest = engine_dir.load(engines)
    python_models = encoder_backend == "python"
    _check_request(manifest, python_models, entry, instances, max_queue_delay_us)
    if not manifest.export_only:
        backends.get(manifest.backend)  # an unknown backend is refused before anything is written
    check_out(out)
    _cannot_write(out, recover_interrupted, out)
    _refuse_foreign(out, _model_names(manifest, entry))
    writer = _Writer(engines, manifest, python_models, instances, max_queue_delay_us, threads)
    staging = _cannot_write(out, _make_staging, out)
    try:
        names = writer.write_all(staging / _NEW, entry)
        _refuse_foreign(out, names)  # the scripts too, and whatever appeared meanwhile
        _swap_in(staging, out, names)
    except OSError as error:
        raise RepositoryError(f"cannot write the repository {out}: {error.strerror} ({error.filename}); it was left "
                              "as it was") from error
    finally:
        _cannot_write(out, _close_staging, staging, out)
    return [out / name for name in names]


def _model_names(manifest: engine_dir.Manifest, entry: str) -> list[str]:
    encoders = [encoder_model_name(name) for name in manifest.modality_names]
    return encoders + ([ENTRY_MODEL] if entry == "pipeline" else [FUSION_MODEL, ENTRY_MODEL])


# ---------------------------------------------------------------------------------------------------------------
# deciding, then swapping the whole set in
#
# The new models are built in a staging folder beside ``out`` (inside it where ``out`` is a mount point: a rename
# cannot cross file systems). Before the first swap the staging folder gets a journal of the new entries' inode
# numbers; each entry then takes its place in one renameat2(RENAME_EXCHANGE), the old one moving into the staging
# folder. A run that fails while swapping swaps everything back; one that was killed is swapped back by the next
# run (``recover_interrupted``) before it decides anything. Once all are in, ``done`` marks the staging folder as
# leftovers only.

_STAGING_INFIX = ".ume-repo-"
_NEW, _OLD, _DISCARDED = "new", "old", "discarded"
_JOURNAL, _DONE = "journal.json", "done"


def check_out(out: Path) -> None:
    """Refuse, with one line, an ``out`` that is a file, lies under one, or is on a file system that cannot be
    written; before any long work."""
    if out.exists() and not out.is_dir():
        raise RepositoryError(f"--out {out} is a file, not a folder; it was left untouched. Choose another path")
    existing = next((p for p in [out, *out.absolute().parents] if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise RepositoryError(f"--out {out}: {existing} is a file, not a folder; choose another path")
    if existing is not None and not os.access(existing, os.W_OK):
        raise RepositoryError(f"--out {out}: {existing} cannot be written (read-only file system or no permission); "
                              "choose a folder you can write to")


def _cannot_write(out: Path, step, *args):
    """``step(*args)``, its OSError as one line."""
    try:
        return step(*args)
    except OSError as error:
        raise RepositoryError(f"--out {out}: cannot write {error.filename} ({error.strerror}); choose a folder you can "
                              "write to, or run the same command again once it is writable") from error


def _is_ours(path: Path) -> bool:
    if path.is_symlink():
        return False
    if path.is_dir():
        config = path / "config.pbtxt"
        return config.is_file() and config.read_text(errors="replace").startswith(WRITTEN_BY)
    if not path.is_file():
        return False
    with path.open(errors="replace") as file:
        return SCRIPT_WRITTEN_BY in file.read(1000)


def _refuse_foreign(out: Path, names: list[str]) -> None:
    foreign = [str(out / name) for name in names if _inode(out / name) is not None and not _is_ours(out / name)]
    if len(foreign) == 1:
        raise RepositoryError(f"{foreign[0]} exists and was not written by ume-edge; nothing was written. Choose "
                              "another --out, or move it away")
    if foreign:
        raise RepositoryError(f"{', '.join(foreign)} exist and were not written by ume-edge; nothing was written. "
                              "Choose another --out, or move them away")


def _inode(path: Path) -> int | None:
    try:
        return os.lstat(path).st_ino
    except FileNotFoundError:
        return None


def _staging_parent(out: Path) -> Path:
    real = out.resolve()
    if real.is_dir() and real.stat().st_dev != real.parent.stat().st_dev:
        return real
    return real.parent


def _staging_prefix(out: Path) -> str:
    return f".{out.resolve().name}{_STAGING_INFIX}"


def _make_staging(out: Path) -> Path:
    parent = _staging_parent(out)
    parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f"{_staging_prefix(out)}{os.getpid()}-", dir=parent))
    (staging / engine_dir.STAGING_MARKER).touch()
    (staging / _NEW).mkdir()
    return staging


def _replace(source: Path, target: Path, aside: Path) -> None:
    """``source`` to ``target`` in one step; what was at ``target`` goes to ``aside``."""
    if _inode(target) is None:
        os.rename(source, target)
        return
    aside.parent.mkdir(exist_ok=True)
    if engine_dir.exchange(source, target):
        os.rename(source, aside)
    else:  # no atomic swap on this file system
        os.rename(target, aside)
        os.rename(source, target)


def _swap_in(staging: Path, out: Path, names: list[str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    journal = staging / _JOURNAL
    journal.with_suffix(".tmp").write_text(json.dumps({name: _inode(staging / _NEW / name) for name in names}))
    os.replace(journal.with_suffix(".tmp"), journal)
    for name in names:
        _replace(staging / _NEW / name, out / name, staging / _OLD / name)
    (staging / _DONE).touch()


def _roll_back(staging: Path, out: Path) -> bool:
    """Put back every old entry that a run which did not finish had swapped out; whether it had begun swapping."""
    journal = staging / _JOURNAL
    if (staging / _DONE).exists() or not journal.exists():
        return False
    for name, inode in json.loads(journal.read_text()).items():
        old = next((p for p in (staging / _NEW / name, staging / _OLD / name) if _inode(p) not in (None, inode)), None)
        target = out / name
        if _inode(target) == inode:
            if old is None:  # there was none
                (staging / _DISCARDED).mkdir(exist_ok=True)
                os.rename(target, staging / _DISCARDED / name)
            else:
                _replace(old, target, staging / _DISCARDED / name)
        elif old is not None and _inode(target) is None:
            os.rename(old, target)
    journal.unlink()
    return True


def _close_staging(staging: Path, out: Path) -> None:
    """Roll back what an unfinished run swapped in, then remove its staging folder: the journal first (so a kill
    halfway never rolls back from half-removed old models), the marker last (so the next run recognises the rest)."""
    if _roll_back(staging, out):
        LOGGER.warning("put back the models of %s that an unfinished run had replaced", out)
    (staging / _JOURNAL).unlink(missing_ok=True)
    for child in staging.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        elif child.name != engine_dir.STAGING_MARKER:
            child.unlink()
    (staging / engine_dir.STAGING_MARKER).unlink(missing_ok=True)
    staging.rmdir()


def recover_interrupted(out: Path) -> None:
    """Undo what runs into ``out`` that were killed while swapping had done, and remove what they left."""
    parent, prefix = _staging_parent(out), _staging_prefix(out)
    if not parent.is_dir():
        return
    for staging in sorted(parent.glob(f"{prefix}*")):
        pid = staging.name[len(prefix):].split("-", 1)[0]
        if not pid.isdigit() or engine_dir.pid_alive(int(pid)) or not staging.is_dir():
            continue
        if (staging / engine_dir.STAGING_MARKER).is_file() or not any(staging.iterdir()):
            _close_staging(staging, out)
            LOGGER.info("removed %s, left by a run that was killed", staging)


def serve_hint(manifest: engine_dir.Manifest, out: Path) -> str:
    """What to run next, as it works here."""
    if manifest.export_only:
        return (f"on the target: sh {out}/build_plans_trt10.sh (TensorRT 10, JetPack 6) or build_plans_trt11.sh, then "
                f"tritonserver --model-repository={out.resolve()}")
    if manifest.device.get("version_compatible"):
        return f"tritonserver --model-repository={out.resolve()} --backend-config=tensorrt,version-compatible=true"
    return f"python -m ume_edge.serve --repository {out}   (or tritonserver --model-repository={out.resolve()})"
