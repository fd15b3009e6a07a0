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
so a run that fails leaves the repository exactly as it was (``repository_swap``). The configs are rendered by
``model_config``.
"""

from __future__ import annotations

import json
import shutil
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
from ume_edge.serving import contract
from ume_edge.serving.model_config import scheduling, string_parameters, tensor, to_pbtxt
from ume_edge.serving.repository_swap import WRITTEN_BY, RepositoryError, prepare_out, write_and_swap_in

ENCODER_BACKENDS = ("auto", "python")
ENTRIES = ("bls", "pipeline")
ENTRY_TEMPLATE = "ume_bls.py"
PIPELINE_TEMPLATE = "ume_pipeline.py"
ONNX_TEMPLATE = "onnx_model.py"
SOURCE_ONNX = "source.onnx"


def template_dir() -> Path:
    """The Python-backend model sources the repository's models are made from (packaged with ume-edge)."""
    return Path(__file__).resolve().parent / "templates"


def python_model_files(template: str, version: str = "1") -> dict[str, Path]:
    """The files of a Python-backend model version: ``template`` as its ``model.py`` and the request contract beside
    it (Triton's stub puts the version folder on ``sys.path``, so ``import ume_contract`` finds it)."""
    return {f"{version}/model.py": template_dir() / template,
            f"{version}/{contract.CONTRACT_FILE}": Path(contract.__file__)}


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
            parameters = string_parameters({"intra_op_threads": str(self.threads or 0)})
            return ({"backend": "python", "parameters": parameters},
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
            value_ranges = json.dumps({modality.name: modality.value_range})
            runtime["parameters"] += string_parameters({"value_ranges": value_ranges})
        config = {
            **runtime,
            **scheduling(self.manifest.max_batch, self.instances, self._kind(), self.max_queue_delay_us, secondary),
            "input": [tensor(modality.name, modality.dtype, modality.shape)],
            "output": [tensor(PARTIAL_LOGITS, "float32", [self.manifest.model.num_classes])],
        }
        return _write_model(folder, encoder_model_name(modality.name), config, files)

    def fusion(self, folder: Path) -> Path:
        fusion = self.manifest.fusion
        runtime, files, _ = self._runtime(FUSION_MODEL, fusion.engine, fusion.onnx)
        count, classes = len(self.manifest.modalities), self.manifest.model.num_classes
        config = {
            **runtime,
            **scheduling(self.manifest.max_batch, self.instances, self._kind(), self.max_queue_delay_us),
            "input": [tensor(PARTIAL_LOGITS, "float32", [count, classes]), tensor(PRESENT, "float32", [count])],
            "output": [tensor(LOGITS, "float32", [classes]), tensor(PROBS, "float32", [classes])],
        }
        return _write_model(folder, FUSION_MODEL, config, files)

    def _entry_config(self, parameters: dict[str, str]) -> dict:
        classes, order = self.manifest.model.num_classes, self.manifest.fusion.modality_order
        mask = [tensor(PRESENT, "bool", [len(order)], optional=True)]
        return {
            "backend": "python",
            **scheduling(self.manifest.max_batch, self.instances, "KIND_CPU", self.max_queue_delay_us),
            "input": [tensor(name, self.manifest.modality(name).dtype, self.manifest.modality(name).shape,
                              optional=True) for name in order] + mask,
            "output": [tensor(LOGITS, "float32", [classes]), tensor(PROBS, "float32", [classes]),
                       tensor(LABEL, "int64", [1])],
            "parameters": string_parameters(parameters),
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
    prepare_out(out, _model_names(manifest, entry))
    writer = _Writer(engines, manifest, python_models, instances, max_queue_delay_us, threads)
    names = write_and_swap_in(out, lambda folder: writer.write_all(folder, entry))
    return [out / name for name in names]


def _model_names(manifest: engine_dir.Manifest, entry: str) -> list[str]:
    encoders = [encoder_model_name(name) for name in manifest.modality_names]
    return encoders + ([ENTRY_MODEL] if entry == "pipeline" else [FUSION_MODEL, ENTRY_MODEL])


def serve_hint(manifest: engine_dir.Manifest, out: Path) -> str:
    """What to run next, as it works here."""
    if manifest.export_only:
        return (f"on the target: sh {out}/build_plans_trt10.sh (TensorRT 10, JetPack 6) or build_plans_trt11.sh, then "
                f"tritonserver --model-repository={out.resolve()}")
    if manifest.device.get("version_compatible"):
        return f"tritonserver --model-repository={out.resolve()} --backend-config=tensorrt,version-compatible=true"
    return f"python -m ume_edge.serve --repository {out}   (or tritonserver --model-repository={out.resolve()})"
