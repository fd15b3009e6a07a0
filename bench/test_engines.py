"""One engine at a time: modality x precision x batch, against the same encoder + head in PyTorch eager fp32."""

import pytest
from cases import BATCHES, record


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("precision", ["int8", "fp32"])
@pytest.mark.parametrize("modality", ["audio", "image"])
def test_onnxruntime_engine(benchmark, encoders, test_inputs, modality, precision, batch):
    engine = encoders[precision][modality]
    feeds = {modality: test_inputs[modality][:batch].copy()}
    record(benchmark, "engine", modality, "onnxruntime", precision, batch)
    benchmark(engine.infer, feeds)


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("modality", ["audio", "image"])
def test_pytorch_eager_engine(benchmark, torch_model, test_inputs, modality, batch):
    import torch

    x = torch.from_numpy(test_inputs[modality][:batch].copy())

    def run():
        with torch.no_grad():
            return torch_model.partial_logits(modality, x)

    record(benchmark, "engine", modality, "pytorch", "fp32", batch)
    benchmark(run)
