"""The build's performance targets, each a ratio of two cases timed alternately in the same run (this machine is
shared and noisy: absolute times mean little, interleaved ratios hold).

- INT8 ONNX Runtime, batch 64: throughput >= 2x fp32 ONNX Runtime and >= 5x PyTorch eager fp32.
- Batch 1, every modality present: Pipeline.infer <= 0.3x the latency of PyTorch eager fp32.
- A modality absent: latency <= (share of the present encoders in the full latency + 10%) of the full latency.
"""

import pytest

from cases import batch_of, interleaved_medians, record

pytestmark = pytest.mark.target


def _torch_call(torch_model, inputs):
    import torch

    feeds = {n: (torch.from_numpy(x) if x is not None else None) for n, x in inputs.items()}

    def run():
        with torch.no_grad():
            return torch_model(feeds)
    return run


def test_int8_batch64_throughput(benchmark, pipelines, torch_model, test_inputs):
    inputs = batch_of(test_inputs, 64)
    int8, fp32, eager = interleaved_medians(lambda: pipelines["int8"].infer(inputs),
                                            lambda: pipelines["fp32"].infer(inputs), _torch_call(torch_model, inputs))
    record(benchmark, "target", "int8-throughput-b64", "onnxruntime", "int8", 64,
           vs_fp32=fp32 / int8, vs_pytorch=eager / int8)
    benchmark(pipelines["int8"].infer, inputs)
    assert fp32 / int8 >= 2.0, f"INT8 is {fp32 / int8:.2f}x fp32 ONNX Runtime at batch 64 (target 2x)"
    assert eager / int8 >= 5.0, f"INT8 is {eager / int8:.2f}x PyTorch eager fp32 at batch 64 (target 5x)"


def test_batch1_latency_against_pytorch(benchmark, pipelines, torch_model, test_inputs):
    inputs = batch_of(test_inputs, 1)
    int8, eager = interleaved_medians(lambda: pipelines["int8"].infer(inputs), _torch_call(torch_model, inputs))
    record(benchmark, "target", "int8-latency-b1", "onnxruntime", "int8", 1, ratio_to_pytorch=int8 / eager)
    benchmark(pipelines["int8"].infer, inputs)
    assert int8 / eager <= 0.3, f"batch-1 latency is {int8 / eager:.2f}x PyTorch eager fp32 (target <= 0.3x)"


@pytest.mark.parametrize("batch", [1, 64])
@pytest.mark.parametrize("present", ["audio", "image"])
def test_absent_modality_costs_nothing(benchmark, pipelines, encoders, test_inputs, present, batch):
    pipeline = pipelines["int8"]
    full_inputs, partial_inputs = batch_of(test_inputs, batch), batch_of(test_inputs, batch, (present,))
    engines = {n: (lambda n=n: encoders["int8"][n].infer({n: full_inputs[n]})) for n in ("audio", "image")}
    full, partial, audio, image = interleaved_medians(lambda: pipeline.infer(full_inputs),
                                                      lambda: pipeline.infer(partial_inputs),
                                                      engines["audio"], engines["image"])
    share = {"audio": audio, "image": image}[present] / (audio + image)
    record(benchmark, "target", f"only-{present}-b{batch}", "onnxruntime", "int8", batch,
           latency_fraction=partial / full, encoder_share=share)
    benchmark(pipeline.infer, partial_inputs)
    assert partial / full <= share + 0.10, (
        f"only {present} present at batch {batch}: {partial / full:.2f} of the full latency, but its encoder is "
        f"{share:.2f} of the encoder time (allowed {share + 0.10:.2f})")
