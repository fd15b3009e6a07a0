import dataclasses
import json

import numpy as np
import onnxruntime as ort
import pytest
import torch

from ume_edge.data import presence_patterns
from ume_edge.engine_dir import FusionRecord
from ume_edge.errors import InputError
from ume_edge.fusion import FusionParams, fuse, fusion_graph, softmax
from ume_edge.model import ConvEncoder, Modality, UMEModel


def _model(fusion, learn_placeholder=False):
    torch.manual_seed(0)
    model = UMEModel([Modality(n, ConvEncoder(1, (8, 8), (4,), 6), (1, 8, 8), "float32", 6) for n in ("a", "b", "c")],
                     num_classes=5, fusion=fusion, learn_placeholder=learn_placeholder).eval()
    with torch.no_grad():
        for p in model.placeholders.values():
            p.normal_()  # a learned, non-zero placeholder exercises the constants c_m
    return model


def _partials(model, x):
    with torch.no_grad():
        return np.stack([model.partial_logits(n, x[n]).numpy() for n in model.modality_names], axis=1)


def _session(params):
    return ort.InferenceSession(fusion_graph(params).SerializeToString(), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("fusion", ["ume", "mma"])
def test_kernel_equals_pytorch_for_every_pattern(fusion):
    model = _model(fusion, learn_placeholder=True)
    x = {n: torch.rand(6, 1, 8, 8) for n in model.modality_names}
    params, partial = FusionParams.from_model(model), _partials(model, x)
    session = _session(params)
    for pattern in presence_patterns(model.modality_names):
        present = np.array([[n in pattern for n in model.modality_names]] * 6)
        with torch.no_grad():
            expected = model({n: (x[n] if n in pattern else None) for n in model.modality_names}).numpy()
        # absent rows may hold anything: garbage there must not leak into the answer
        garbage = np.where(present[:, :, None], partial, np.nan).astype(np.float32)
        np.testing.assert_allclose(fuse(params, garbage, present), expected, atol=1e-5)
        logits, probs = session.run(None, {"partial_logits": garbage, "present": present.astype(np.float32)})
        np.testing.assert_allclose(logits, expected, atol=1e-5)
        np.testing.assert_allclose(probs, softmax(expected), atol=1e-6)


@pytest.mark.parametrize("fusion", ["ume", "mma"])
def test_kernel_equals_pytorch_for_mixed_row_masks(fusion):
    model = _model(fusion)
    rng = np.random.default_rng(3)
    present = rng.random((32, 3)) < 0.5
    present[~present.any(1), 0] = True
    x = {n: torch.rand(32, 1, 8, 8) for n in model.modality_names}
    with torch.no_grad():
        expected = model(x, {n: torch.from_numpy(present[:, i]) for i, n in enumerate(model.modality_names)}).numpy()
    params = FusionParams.from_model(model)
    partial = _partials(model, x)
    np.testing.assert_allclose(fuse(params, partial, present), expected, atol=1e-5)
    logits, _ = _session(params).run(None, {"partial_logits": partial, "present": present.astype(np.float32)})
    np.testing.assert_allclose(logits, expected, atol=1e-5)


def test_reference_refuses_a_row_with_nothing_present():
    params = FusionParams("ume", ["a", "b"], 3)
    with pytest.raises(InputError, match="no modality present"):
        fuse(params, np.zeros((2, 2, 3), np.float32), np.array([[1, 0], [0, 0]], bool))


def test_params_round_trip_through_the_manifest():
    params = FusionParams.from_model(_model("mma"))
    record = FusionRecord(params.mode, params.modality_order, params.constants_as_lists(), None, None)
    again = FusionParams.from_record(FusionRecord(**json.loads(json.dumps(dataclasses.asdict(record)))),
                                     params.num_classes)
    assert again.mode == "mma" and again.modality_order == ["a", "b", "c"]
    np.testing.assert_allclose(again.constants, params.constants, atol=1e-6)
