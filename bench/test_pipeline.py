"""The whole pipeline per presence pattern (absent modalities are never computed) against PyTorch eager fp32."""

import pytest
from cases import BATCHES, PATTERNS, batch_of, record

from ume_edge.data import pattern_key


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("precision", ["int8", "fp32"])
@pytest.mark.parametrize("pattern", PATTERNS, ids=pattern_key)
def test_onnxruntime_pipeline(benchmark, pipelines, test_inputs, pattern, precision, batch):
    pipeline = pipelines[precision]
    inputs = batch_of(test_inputs, batch, pattern)
    accuracy = pipeline.manifest.accuracy["patterns"][pattern_key(pattern)]["engines"]
    record(benchmark, "pipeline", pattern_key(pattern), "onnxruntime", precision, batch, accuracy=accuracy)
    benchmark(pipeline.infer, inputs)


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("pattern", PATTERNS, ids=pattern_key)
def test_pytorch_eager_pipeline(benchmark, torch_model, pipelines, test_inputs, pattern, batch):
    import torch

    inputs = {n: (torch.from_numpy(x) if x is not None else None)
              for n, x in batch_of(test_inputs, batch, pattern).items()}
    accuracy = pipelines["fp32"].manifest.accuracy["patterns"][pattern_key(pattern)]["fp32_torch"]

    def run():
        with torch.no_grad():
            return torch_model(inputs)

    record(benchmark, "pipeline", pattern_key(pattern), "pytorch", "fp32", batch, accuracy=accuracy)
    benchmark(run)
