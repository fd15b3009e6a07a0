"""The UME-MMA model: per-modality encoders, a linear head per modality, and late fusion.

``UMEModel(modalities, num_classes, fusion="ume" | "mma")``. ``model(inputs, present=None)`` takes a dict in which
an absent modality is ``None`` (the whole batch) and an optional per-row mask ``present={"audio": bool[B]}`` for
mixed batches. An absent modality's encoder is never run. Fusion (see docs/method.md, "The fusion algebra"):

- ``ume``: logits = mean over the present modalities of ``z_m = W_m f_m + b_m``.
- ``mma``: logits = sum over modalities of ``W_m g_m + b_m``, ``g_m = f_m`` if present else the placeholder ``a_m``.
"""

from __future__ import annotations

import functools
import importlib
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import torch
from torch import nn

from ume_edge.errors import InputError, UmeEdgeError
from ume_edge.user_code import load_file

FUSIONS = ("ume", "mma")
CHECKPOINT_FORMAT = "ume-edge-checkpoint/1"
REFERENCE_DIR = Path(__file__).with_name("reference")
REFERENCE_CHECKPOINT = REFERENCE_DIR / "avdigits.pt"
REFERENCE_REPORT = REFERENCE_DIR / "avdigits-report.json"
_DTYPES = {"float32": torch.float32, "int64": torch.int64}


class ConvEncoder(nn.Module):
    """A small CNN over a ``[channels, height, width]`` input (an image or a spectrogram).

    The first block is a strided convolution by default: a first layer over one or two channels has dot products
    too short for int8 kernels to pay, and striding it early keeps its cost small in every precision."""

    def __init__(self, in_channels: int = 1, input_hw: tuple[int, int] = (28, 28), widths=(32, 64),
                 feature_dim: int = 64, dropout: float = 0.2, strided: tuple[bool, ...] | None = None):
        super().__init__()
        strided = tuple(strided) if strided is not None else (True,) + (False,) * (len(widths) - 1)
        if len(strided) != len(widths):
            raise ValueError(f"strided has {len(strided)} entries for {len(widths)} widths")
        self.init_kwargs = dict(in_channels=in_channels, input_hw=tuple(input_hw), widths=tuple(widths),
                                feature_dim=feature_dim, dropout=dropout, strided=tuple(strided))
        layers, channels, (h, w) = [], in_channels, input_hw
        for width, stride in zip(widths, strided, strict=True):
            # Each block halves the resolution: a strided convolution, or a convolution and a 2x2 max-pool.
            conv = nn.Conv2d(channels, width, 3, stride=2 if stride else 1, padding=1)
            layers += [conv, nn.BatchNorm2d(width), nn.ReLU()] + ([] if stride else [nn.MaxPool2d(2)])
            channels, h, w = width, h // 2, w // 2
        self.features = nn.Sequential(*layers)
        self.project = nn.Sequential(nn.Flatten(), nn.Dropout(dropout), nn.Linear(channels * h * w, feature_dim),
                                     nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(self.features(x))


class CheckpointRefused(UmeEdgeError, ValueError):
    """A checkpoint names an encoder that ume-edge will not build: not a ``module:Class`` name, or not a module."""


class UntrustedEncoder(CheckpointRefused):
    """A checkpoint names an encoder class that is neither ume-edge's own nor trusted by the caller: building it would
    import, and so run, whatever code the file names."""

    def __init__(self, source: str, encoder: str):
        super().__init__(f"{source} names encoder {encoder!r}, which is not one of ume-edge's; loading it would import "
                         f"and run that code. If you wrote it and trust it, pass trusted_encoders=[{encoder!r}]")
        self.source, self.encoder = source, encoder


class TokenEncoder(nn.Module):
    """Mean of token embeddings over an int64 ``[sequence]`` input of token ids (0 is padding)."""

    def __init__(self, vocab_size: int, embed_dim: int = 32, feature_dim: int = 32):
        super().__init__()
        self.init_kwargs = dict(vocab_size=vocab_size, embed_dim=embed_dim, feature_dim=feature_dim)
        self.embed = nn.Embedding(vocab_size, embed_dim, padding_idx=0)
        self.project = nn.Sequential(nn.Linear(embed_dim, feature_dim), nn.ReLU())

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        mask = (tokens != 0).unsqueeze(-1).float()
        pooled = (self.embed(tokens) * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        return self.project(pooled)


@dataclass
class Modality:
    """One input stream: its encoder, the shape of one sample (no batch axis), dtype and feature size."""

    name: str
    encoder: nn.Module
    input_shape: tuple[int, ...]
    dtype: str = "float32"
    feature_dim: int = 64

    def __post_init__(self):
        self.input_shape = tuple(int(d) for d in self.input_shape)
        if self.dtype not in _DTYPES:
            raise ValueError(f"modality {self.name!r}: dtype must be one of {', '.join(_DTYPES)}, not {self.dtype!r}")
        if not self.name.isidentifier():
            raise ValueError(f"modality name {self.name!r} must be an identifier (it names engine inputs)")


class UMEModel(nn.Module):
    def __init__(self, modalities: list[Modality], num_classes: int, fusion: str = "ume",
                 learn_placeholder: bool = False, class_names: list[str] | None = None, name: str = "model"):
        super().__init__()
        if fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {', '.join(FUSIONS)}, not {fusion!r}")
        if len({m.name for m in modalities}) != len(modalities) or not modalities:
            raise ValueError("modalities must be a non-empty list with unique names")
        self.modalities = list(modalities)
        self.num_classes = num_classes
        self.fusion = fusion
        self.name = name
        self.class_names = class_names or [str(c) for c in range(num_classes)]
        self.encoders = nn.ModuleDict({m.name: m.encoder for m in modalities})
        self.heads = nn.ModuleDict({m.name: nn.Linear(m.feature_dim, num_classes) for m in modalities})
        self.placeholders = nn.ParameterDict({
            m.name: nn.Parameter(torch.zeros(m.feature_dim), requires_grad=learn_placeholder) for m in modalities})

    @property
    def modality_names(self) -> list[str]:
        return [m.name for m in self.modalities]

    def modality(self, name: str) -> Modality:
        for m in self.modalities:
            if m.name == name:
                return m
        raise InputError(f"unknown modality {name!r}; this model has {', '.join(self.modality_names)}")

    def partial_logits(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """``z_m = W_m E_m(x) + b_m``: what a modality's engine computes."""
        return self.heads[name](self.encoders[name](x))

    def placeholder_logits(self, name: str) -> torch.Tensor:
        """``c_m = W_m a_m + b_m``: what an absent modality contributes under MMA."""
        return self.heads[name](self.placeholders[name])

    def forward(self, inputs: dict[str, torch.Tensor | None],
                present: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        masks = self._presence(inputs, present or {})
        batch = next(iter(masks.values())).shape[0]
        device = next(self.parameters()).device
        total = torch.zeros(batch, self.num_classes, device=device)
        count = torch.zeros(batch, 1, device=device)
        for m in self.modalities:
            mask = masks[m.name].to(device)
            if mask.any():
                x = inputs[m.name]
                assert x is not None  # ``_presence`` marks a row present only for a modality given
                z = self.partial_logits(m.name, x[mask])
                total = total.index_put((mask.nonzero(as_tuple=True)[0],), z, accumulate=True)
            if self.fusion == "mma" and not mask.all():
                total = total + (~mask).unsqueeze(1) * self.placeholder_logits(m.name)
            count = count + mask.unsqueeze(1)
        return total / count.clamp(min=1.0) if self.fusion == "ume" else total

    def _presence(self, inputs, present) -> dict[str, torch.Tensor]:
        """Validate the inputs and return a bool ``[B]`` presence mask per modality."""
        for name in [*inputs, *present]:
            self.modality(name)
        given = {name: x for name, x in inputs.items() if x is not None}
        if not given:
            raise InputError(f"no modality present: give at least one of {', '.join(self.modality_names)}")
        batches = {name: self._check_tensor(name, x) for name, x in given.items()}
        if len(set(batches.values())) != 1:
            raise InputError(f"batch sizes differ between modalities: {batches}")
        batch = next(iter(batches.values()))
        masks = {}
        for m in self.modalities:
            if m.name not in given:
                masks[m.name] = torch.zeros(batch, dtype=torch.bool)
                continue
            mask = torch.as_tensor(present.get(m.name, torch.ones(batch, dtype=torch.bool)), dtype=torch.bool)
            if mask.shape != (batch,):
                raise InputError(f"present[{m.name!r}] must have shape ({batch},), got {tuple(mask.shape)}")
            masks[m.name] = mask.cpu()
        empty = ~torch.stack(list(masks.values())).any(0)
        if empty.any():
            rows = empty.nonzero().flatten().tolist()[:10]
            raise InputError(f"rows {rows} have no modality present; drop them or give at least one modality")
        return masks

    def _check_tensor(self, name: str, x: torch.Tensor) -> int:
        m = self.modality(name)
        if not isinstance(x, torch.Tensor):
            raise InputError(f"modality {name!r}: expected a torch.Tensor, got {type(x).__name__}")
        if x.dtype != _DTYPES[m.dtype]:
            raise InputError(f"modality {name!r}: expected dtype {m.dtype}, got {str(x.dtype).replace('torch.', '')}")
        if tuple(x.shape[1:]) != m.input_shape or x.ndim != len(m.input_shape) + 1:
            raise InputError(f"modality {name!r}: expected shape [batch, {', '.join(map(str, m.input_shape))}], "
                             f"got {list(x.shape)}")
        return x.shape[0]

    # ------------------------------------------------------------ checkpoints

    def save(self, path: str | Path, report: dict | None = None) -> None:
        """Write the architecture (encoder classes and their ``init_kwargs``) and the weights to one file."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"format": CHECKPOINT_FORMAT, "architecture": self.architecture(), "state_dict": self.state_dict(),
                    "report": report}, path)

    def architecture(self) -> dict:
        modalities = []
        for m in self.modalities:
            if not hasattr(m.encoder, "init_kwargs"):
                raise ValueError(
                    f"modality {m.name!r}: encoder {type(m.encoder).__name__} has no `init_kwargs`, so save() cannot "
                    "record how to rebuild it. Set self.init_kwargs in its __init__, or load the model from a "
                    "`file.py:factory` instead of a checkpoint.")
            cls = type(m.encoder)
            modalities.append(dict(name=m.name, input_shape=list(m.input_shape), dtype=m.dtype,
                                   feature_dim=m.feature_dim, encoder=f"{cls.__module__}:{cls.__qualname__}",
                                   encoder_kwargs=m.encoder.init_kwargs))
        return dict(modalities=modalities, num_classes=self.num_classes, fusion=self.fusion, name=self.name,
                    class_names=self.class_names,
                    learn_placeholder=any(p.requires_grad for p in self.placeholders.values()))

    @classmethod
    def load(cls, source: str | Path, trusted_encoders: Iterable[str] = ()) -> UMEModel:
        """A checkpoint written by ``save``, or ``path/to/file.py:factory`` (a callable returning a UMEModel).

        A checkpoint's encoders must be ume-edge's own or named in ``trusted_encoders`` (``"module:Class"``): the
        file is data, and importing a class it names runs that module's code."""
        text = str(source)
        if ".py:" in text:
            return _from_factory(text)
        path = Path(text)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such checkpoint "
                                    "(give a .pt written by UMEModel.save or file.py:factory)")
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # torch's own message suggests weights_only=False, which would run the file's code
            raise ValueError(f"{path}: not a ume-edge checkpoint (torch cannot read it as tensors and plain data: "
                             f"{type(error).__name__})") from None
        found = checkpoint.get("format") if isinstance(checkpoint, dict) else type(checkpoint).__name__
        if found != CHECKPOINT_FORMAT:
            raise ValueError(f"{path}: not a ume-edge checkpoint (format {found!r})")
        model = cls.from_architecture(checkpoint["architecture"], trusted_encoders, f"checkpoint {path}")
        model.load_state_dict(checkpoint["state_dict"])
        model.report = checkpoint.get("report")
        return model.eval()

    @classmethod
    def from_architecture(cls, arch: dict, trusted_encoders: Iterable[str] = (),
                          source: str = "the architecture") -> UMEModel:
        specs = arch["modalities"]
        encoder_classes = _encoder_classes([spec["encoder"] for spec in specs], set(trusted_encoders), source)
        modalities = [Modality(spec["name"], encoder_cls(**spec["encoder_kwargs"]), tuple(spec["input_shape"]),
                               spec["dtype"], spec["feature_dim"])
                      for spec, encoder_cls in zip(specs, encoder_classes, strict=True)]
        return cls(modalities, arch["num_classes"], arch["fusion"], arch.get("learn_placeholder", False),
                   arch.get("class_names"), arch.get("name", "model"))


OWN_ENCODERS = {f"{cls.__module__}:{cls.__qualname__}": cls for cls in (ConvEncoder, TokenEncoder)}
ENCODER_NAME = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*")


def _encoder_classes(names: list, trusted: set[str], source: str) -> list[type[nn.Module]]:
    """The class of each ``module:Class`` name; every name is checked before anything is imported."""
    for name in names:
        if not (isinstance(name, str) and ENCODER_NAME.fullmatch(name)):
            raise CheckpointRefused(f"{source} names encoder {name!r}, which is not a module:Class name")
        if name not in OWN_ENCODERS and name not in trusted:
            raise UntrustedEncoder(source, name)
    return [OWN_ENCODERS.get(name) or _import_encoder(name) for name in names]


def _import_encoder(name: str) -> type[nn.Module]:
    module_name, _, qualname = name.partition(":")
    try:
        found = functools.reduce(getattr, qualname.split("."), importlib.import_module(module_name))
    except (ImportError, AttributeError, ValueError) as error:
        raise CheckpointRefused(f"trusted encoder {name!r} cannot be imported ({error})") from None
    if not (isinstance(found, type) and issubclass(found, nn.Module)):
        raise CheckpointRefused(f"trusted encoder {name!r} is not a torch.nn.Module class (it is a "
                                f"{type(found).__name__}); trust only the encoder classes your checkpoint needs")
    return found


def _from_factory(spec: str) -> UMEModel:
    file, factory_name = spec.rsplit(":", 1)
    path = Path(file)
    try:
        module = load_file(path, f"ume_user_model_{path.stem}")
    except (FileNotFoundError, ImportError) as error:
        raise type(error)(f"{error} (expected file.py:factory)") from None
    factory = getattr(module, factory_name, None)
    if not callable(factory):
        raise ValueError(f"{path} has no callable {factory_name!r}")
    model = factory()
    if not isinstance(model, UMEModel):
        raise TypeError(f"{spec} returned {type(model).__name__}, expected a UMEModel")
    return model.eval()


def load_reference() -> UMEModel:
    """The shipped AV-Digits model (the selected UME-MMA model): the default of every command."""
    return UMEModel.load(REFERENCE_CHECKPOINT)


def reference_report() -> dict:
    """The training report of the shipped model. The top level is the shipped seed's (test accuracy per pattern
    for every model, ceiling gaps, the selection); ``seeds`` holds every seed's and ``summary`` their spread."""
    return json.loads(REFERENCE_REPORT.read_text())


def conv_modalities(shapes: dict[str, tuple[int, ...]], feature_dim: int = 64, widths=(32, 128)) -> list[Modality]:
    """A ``ConvEncoder`` per ``[channels, height, width]`` modality, in name order (the reference architecture)."""
    # ``ConvEncoder`` unpacks ``input_hw`` into (height, width), refusing any other length.
    return [Modality(name, ConvEncoder(shape[0], cast("tuple[int, int]", shape[1:]), widths, feature_dim), shape,
                     "float32", feature_dim)
            for name, shape in sorted(shapes.items())]
