"""The face every runtime shows the rest of ume-edge, and the host-side executor they can share.

A ``Backend`` says whether it can run here (and why not), its version and device; it compiles a build's chosen ONNX
files into what it runs; it checks that an engine directory fits this machine; and it opens a directory as an
``Executor``: ``infer(inputs, mask) -> (logits, probs)`` and ``close()``. Nothing outside ``ume_edge.backends``
compares backend names: whatever differs between runtimes is an attribute or a method here.
"""

from __future__ import annotations

import abc
import argparse
import dataclasses
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Generic, Protocol, TypeVar

import numpy as np

from ume_edge.constants import LOGITS, PARTIAL_LOGITS, PRESENT, PROBS
from ume_edge.engine_dir import Manifest
from ume_edge.errors import BuildError, UmeEdgeError


class OptionError(UmeEdgeError, ValueError):
    """An option this machine cannot honour (more threads than cores, ...)."""


def check_threads(threads: int | None) -> None:
    """Refuse a thread count outside 1 to this machine's cores (``None``: the runtime's default)."""
    cores = os.cpu_count() or 1
    if threads is None:
        return
    if isinstance(threads, bool) or not isinstance(threads, int) or not 1 <= threads <= cores:
        raise OptionError(f"threads={threads!r}: give a whole number from 1 to {cores} (the cores of this machine), "
                          "or leave it unset to use them all")


class Engine(Protocol):
    """One engine file: named host arrays in, named host arrays out."""

    input_names: list[str]
    output_names: list[str]

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def close(self) -> None: ...


class Executor(Protocol):
    """An engine directory, opened: the present rows of each modality through its engine, then the fusion."""

    def infer(self, inputs: dict[str, np.ndarray], mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(logits, probs)`` for presence ``mask`` (bool ``[B, M]``, the fusion's modality order); ``inputs``
        holds the full-batch array of every modality with a present row."""

    def close(self) -> None: ...


@dataclass(frozen=True)
class OpenOptions:
    """How to open a directory: CPU threads (ONNX Runtime), the GPU and CUDA-graph batch sizes (TensorRT)."""

    threads: int | None = None
    device_id: int = 0
    cuda_graph_batch_sizes: tuple[int, ...] = ()

    def __post_init__(self):
        check_threads(self.threads)


@dataclass(frozen=True)
class BackendOptions:
    """A backend's own build options. Each field is a flag of ``python -m ume_edge.build`` (``--workspace-mb`` for
    ``workspace_mb``) with ``metadata["help"]`` as its help; a build refuses the options of another backend."""

    backend: ClassVar[str]
    title: ClassVar[str]

    @staticmethod
    def flag(name: str) -> str:
        return "--" + name.replace("_", "-")

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """One argument group with a flag per field, its default the field's."""
        if not dataclasses.fields(cls):
            return
        group = parser.add_argument_group(cls.title)
        hints = typing.get_type_hints(cls)
        for spec in dataclasses.fields(cls):
            if hints[spec.name] is bool:
                group.add_argument(cls.flag(spec.name), action="store_true", help=spec.metadata["help"])
            else:
                group.add_argument(cls.flag(spec.name), type=_value_type(hints[spec.name]), default=spec.default,
                                   help=spec.metadata["help"])

    @classmethod
    def field_names(cls) -> set[str]:
        return {spec.name for spec in dataclasses.fields(cls)}

    def flags(self) -> list[str]:
        """The flags set to something other than their defaults, as typed on a command line."""
        return [self.flag(spec.name) + ("" if value is True else f" {value}") for spec in dataclasses.fields(self)
                if (value := getattr(self, spec.name)) != spec.default]


def _value_type(hint: Any) -> Any:
    """``int`` for ``int | None``: what argparse converts a flag's text with."""
    return next((arg for arg in typing.get_args(hint) if arg is not type(None)), hint)


OptionsT = TypeVar("OptionsT", bound=BackendOptions)


@dataclass
class CompileJob(Generic[OptionsT]):
    """What the build's compile stage hands a backend: the chosen file per modality, the fusion ONNX, and the
    backend's own options."""

    staging: Path
    chosen: dict[str, Any]  # modality name -> build.gate.Candidate (backends never import the build)
    fusion_onnx: Path
    input_shapes: dict[str, tuple[int, ...]]
    num_modalities: int
    num_classes: int
    max_batch: int
    export_only: bool
    options: OptionsT


DEFAULT_OPEN_OPTIONS = OpenOptions()


@dataclass
class CompiledFiles:
    """Where each engine landed in the staging folder, and what the engines were built for."""

    engines: dict[str, Path | None]  # modality name or "fusion" -> the file the backend runs (None: export only)
    onnx: dict[str, Path] = field(default_factory=dict)  # -> the ONNX it is built from, when another file
    calibration: dict[str, Path] = field(default_factory=dict)
    scripts: dict[str, Path] = field(default_factory=dict)
    made_on_target: list[str] = field(default_factory=list)
    device: dict = field(default_factory=dict)
    settings: dict = field(default_factory=dict)


@dataclass(frozen=True)
class TritonModel:
    """How Triton serves one engine file of this backend."""

    platform: str
    file_name: str
    instance_kind: str
    secondary_devices: tuple[dict, ...] = ()


class Backend(abc.ABC, Generic[OptionsT]):
    name: str
    options_type: type[OptionsT]
    precisions: tuple[str, ...]
    int8_format: str  # the Q/DQ flavour this backend runs: "U8S8" or "S8S8"
    fallback_precision: str  # what a modality falls back to when INT8 costs too much
    enforces_tensorrt_rules: bool = False  # a TensorRT-target file that breaks TensorRT's Q/DQ rules fails the build
    can_export_only: bool = False

    @abc.abstractmethod
    def unavailable_reason(self) -> str | None:
        """One line saying what is missing here and how to get it; None when usable."""

    def is_available(self) -> bool:
        return self.unavailable_reason() is None

    @abc.abstractmethod
    def version(self) -> str | None: ...

    @abc.abstractmethod
    def device(self) -> dict:
        """This machine as a manifest's ``device`` records it."""

    def check_build_options(self, options: OptionsT, precision: str, max_batch: int, export_only: bool) -> None:
        """Refuse, before any work, options this backend cannot build (``BuildError``)."""

    @abc.abstractmethod
    def compile(self, job: CompileJob[OptionsT]) -> CompiledFiles: ...

    @abc.abstractmethod
    def check_compatible(self, manifest: Manifest, options: OpenOptions = DEFAULT_OPEN_OPTIONS) -> None:
        """Raise ``EngineMismatch`` or ``BackendUnavailable`` unless ``manifest``'s engines run here."""

    @abc.abstractmethod
    def open_engine(self, path: Path, options: OpenOptions, device: dict | None = None) -> Engine:
        """One engine file; ``device`` is what it was built for (a manifest's ``device``)."""

    @abc.abstractmethod
    def open(self, directory: Path, manifest: Manifest, options: OpenOptions) -> Executor: ...

    @abc.abstractmethod
    def triton_model(self, manifest: Manifest, modality: str | None) -> TritonModel:
        """How Triton serves a modality's engine (``None``: the fusion's)."""

    def target_build_scripts(self, manifest: Manifest, targets: dict[str, tuple[str, str]]) -> dict[str, str]:
        """Scripts (name -> text) that build each ``targets[key] = (source, engine)`` on the target, for a
        repository made from an export-only directory; empty for a backend that never exports only."""
        return {}

    def adopt_engines(self, directory: Path, manifest: Manifest) -> tuple[dict[str, Path], dict]:
        """The engines an export-only ``directory``'s scripts built on this machine (by modality and "fusion"), each
        loaded and checked, and the device they run on."""
        raise BuildError(f"{self.name} directories are never export-only; there is nothing to adopt")

    def target_onnx(self, candidate: Any) -> Path:
        """The ONNX file of a gate candidate that stands for this backend's engine (what the gate scores)."""
        return candidate.file


class HostExecutor:
    """Engines that take and give host arrays: each modality's present rows through its engine, then the fusion.
    Rows of an absent modality are never computed; the fusion selects them away."""

    def __init__(self, engines: dict[str, Engine], fusion: Engine, modality_order: list[str], num_classes: int):
        self.engines, self.fusion = engines, fusion
        self.modality_order, self.num_classes = list(modality_order), int(num_classes)

    def infer(self, inputs: dict[str, np.ndarray], mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        batch = len(mask)
        partial = np.zeros((batch, len(self.modality_order), self.num_classes), np.float32)
        for i, (name, any_row, every_row) in enumerate(zip(self.modality_order, mask.any(0), mask.all(0), strict=True)):
            if not any_row:
                continue
            rows = slice(None) if every_row else mask[:, i]
            partial[rows, i] = self._run(f"modality {name!r}", self.engines[name],
                                         {name: inputs[name][rows]})[PARTIAL_LOGITS]
        fused = self._run("the fusion", self.fusion, {PARTIAL_LOGITS: partial, PRESENT: mask.astype(np.float32)})
        return fused[LOGITS], fused[PROBS]

    @staticmethod
    def _run(what: str, engine: Engine, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            return engine.infer(feeds)
        except Exception as error:  # the runtime's own exception types; the caller needs ours and which engine
            rows = len(next(iter(feeds.values())))
            raise UmeEdgeError(f"{what}: its engine failed on {rows} row(s): "
                               f"{type(error).__name__}: {error}") from error

    def close(self) -> None:
        for engine in [*self.engines.values(), self.fusion]:
            engine.close()
