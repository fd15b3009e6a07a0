"""The fusion kernel: one masked, weighted sum over per-modality partial logits (docs/method.md, "The fusion algebra").

Inputs: ``partial_logits [B, M, C]`` (``z_m = W_m f_m + b_m``) and ``present [B, M]`` (1 = present).

- UME: ``logits = sum_m p_m z_m / max(1, sum_m p_m)``
- MMA: ``logits = sum_m p_m z_m + sum_m (1 - p_m) c_m`` with ``c_m = W_m a_m + b_m``

docs/method.md writes the MMA bias as one ``b``; here ``b = sum_m b_m`` travels with the modalities, so every engine
has the same output in both modes. ``fuse`` is the NumPy reference; ``fusion_graph`` is the same computation as a
tiny ONNX graph, run by the backend that runs the encoders. Rows of an absent modality may hold anything: they
are selected away, never multiplied.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ume_edge.constants import LOGITS, ONNX_OPSET, PARTIAL_LOGITS, PRESENT, PROBS
from ume_edge.errors import InputError


@dataclass
class FusionParams:
    mode: str
    modality_order: list[str]
    num_classes: int
    constants: np.ndarray | None = None  # [M, C], MMA only

    @classmethod
    def from_model(cls, model) -> FusionParams:
        import torch

        constants = None
        if model.fusion == "mma":
            with torch.no_grad():
                constants = np.stack([model.placeholder_logits(n).numpy() for n in model.modality_names])
        return cls(model.fusion, model.modality_names, model.num_classes, constants)

    @classmethod
    def from_record(cls, fusion, num_classes: int) -> FusionParams:
        """From an engine directory's ``FusionRecord``."""
        constants = None if fusion.constants is None else np.asarray(fusion.constants, dtype=np.float32)
        return cls(fusion.mode, list(fusion.modality_order), num_classes, constants)

    def constants_as_lists(self) -> list[list[float]] | None:
        return None if self.constants is None else self.constants.astype(float).tolist()


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def _mma_constants(params: FusionParams) -> np.ndarray:
    if params.constants is None:
        raise ValueError(f"{params.mode} fusion needs its constants (the absent modalities' partial logits)")
    return params.constants


def fuse(params: FusionParams, partial_logits: np.ndarray, present: np.ndarray) -> np.ndarray:
    """The NumPy reference of the fusion kernel."""
    present = np.asarray(present, dtype=bool)
    if not present.any(axis=1).all():
        raise InputError("a row has no modality present; the fusion kernel cannot predict from nothing")
    absent_value = 0.0 if params.mode == "ume" else _mma_constants(params)[None]
    selected = np.where(present[:, :, None], partial_logits, absent_value)
    total = selected.sum(axis=1)
    if params.mode == "ume":
        total = total / np.maximum(present.sum(axis=1, keepdims=True), 1)
    return total.astype(np.float32)


def fusion_graph(params: FusionParams) -> onnx.ModelProto:
    """The fusion kernel as an ONNX graph: ``(partial_logits, present) -> (logits, probs)``."""
    m, c = len(params.modality_order), params.num_classes
    absent = (np.zeros((1, 1, 1), np.float32) if params.mode == "ume"
              else _mma_constants(params).astype(np.float32)[None])
    initializers = [numpy_helper.from_array(absent, "absent_value"),
                    numpy_helper.from_array(np.array([2], np.int64), "class_axis"),
                    numpy_helper.from_array(np.array([1], np.int64), "modality_axis"),
                    numpy_helper.from_array(np.array(0.5, np.float32), "half"),
                    numpy_helper.from_array(np.array(1.0, np.float32), "one")]
    nodes = [
        helper.make_node("Unsqueeze", [PRESENT, "class_axis"], ["present3"]),
        helper.make_node("Greater", ["present3", "half"], ["is_present"]),
        helper.make_node("Where", ["is_present", PARTIAL_LOGITS, "absent_value"], ["selected"]),
        helper.make_node("ReduceSum", ["selected", "modality_axis"], ["total"], keepdims=0),
    ]
    if params.mode == "ume":
        nodes += [
            helper.make_node("ReduceSum", [PRESENT, "modality_axis"], ["count"], keepdims=1),
            helper.make_node("Max", ["count", "one"], ["divisor"]),
            helper.make_node("Div", ["total", "divisor"], [LOGITS]),
        ]
    else:
        nodes.append(helper.make_node("Identity", ["total"], [LOGITS]))
    nodes.append(helper.make_node("Softmax", [LOGITS], [PROBS], axis=1))
    graph = helper.make_graph(
        nodes, f"ume_fusion_{params.mode}",
        [helper.make_tensor_value_info(PARTIAL_LOGITS, TensorProto.FLOAT, ["batch", m, c]),
         helper.make_tensor_value_info(PRESENT, TensorProto.FLOAT, ["batch", m])],
        [helper.make_tensor_value_info(LOGITS, TensorProto.FLOAT, ["batch", c]),
         helper.make_tensor_value_info(PROBS, TensorProto.FLOAT, ["batch", c])],
        initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", ONNX_OPSET)], producer_name="ume-edge")
    onnx.checker.check_model(model, full_check=True)
    return model
