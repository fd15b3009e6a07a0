"""PyTorch -> ONNX, one file per modality: the encoder followed by its slice of the head (``z_m = W_m f_m + b_m``)."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from ume_edge.constants import ONNX_OPSET, PARTIAL_LOGITS
from ume_edge.errors import BuildError
from ume_edge.model import UMEModel

MAX_RELATIVE_DIFF = 1e-3


class PartialLogits(nn.Module):
    """What one modality's engine computes."""

    def __init__(self, model: UMEModel, name: str):
        super().__init__()
        self.encoder, self.head = model.encoders[name], model.heads[name]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))


def export_modality(model: UMEModel, name: str, path: Path, samples: np.ndarray) -> float:
    """Write ``path`` (opset 17, dynamic batch, checker-clean) and return the max abs difference from PyTorch on
    ``samples`` (real inputs of this modality)."""
    module = PartialLogits(model, name).eval()
    example = torch.from_numpy(np.ascontiguousarray(samples[:2]))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(module, (example,), str(path), input_names=[name], output_names=[PARTIAL_LOGITS],
                              dynamic_axes={name: {0: "batch"}, PARTIAL_LOGITS: {0: "batch"}}, opset_version=ONNX_OPSET,
                              dynamo=False, do_constant_folding=True)
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as error:  # the exporter raises many types; the user needs the modality and the cause
        raise BuildError(f"modality {name!r}: the encoder does not export to ONNX: {_first_line(error)}") from error
    _check_reads_input(path, name)
    diff, scale = compare_with_torch(module, path, name, samples)
    if not diff <= MAX_RELATIVE_DIFF * max(scale, 1.0):
        raise BuildError(f"modality {name!r}: the exported ONNX differs from PyTorch by {diff:.3g} (outputs reach "
                         f"{scale:.3g}); the encoder likely has data-dependent Python control flow")
    return diff


def _check_reads_input(path: Path, name: str) -> None:
    graph = onnx.load(str(path), load_external_data=False).graph
    inputs = {i.name for i in graph.input} - {init.name for init in graph.initializer}
    consumed = {i for node in graph.node for i in node.input}
    if inputs != {name} or name not in consumed:
        raise BuildError(f"modality {name!r}: the exported graph does not compute from its input (the encoder "
                         "leaves torch, e.g. through .numpy() or Python numbers); keep forward() in torch ops")


def compare_with_torch(module: nn.Module, path: Path, name: str, samples: np.ndarray) -> tuple[float, float]:
    """(max |ONNX Runtime - PyTorch|, max |PyTorch|) over ``samples``."""
    from ume_edge.backends.onnxruntime import OnnxRuntimeEngine

    engine = OnnxRuntimeEngine(path)
    with torch.no_grad():
        expected = module(torch.from_numpy(np.ascontiguousarray(samples))).numpy()
    got = engine.infer({name: samples})[PARTIAL_LOGITS]
    return float(np.max(np.abs(got - expected))), float(np.max(np.abs(expected)))


def _first_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"
