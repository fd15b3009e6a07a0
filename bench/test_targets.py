"""The build's performance targets, each a ratio of cases timed alternately in the same run (this machine is shared
and noisy: absolute times mean little, interleaved ratios hold), each median cross-checked against the standalone
benchmark of the same case.

- INT8 ONNX Runtime, batch 64: throughput >= 2x fp32 ONNX Runtime and >= 5x PyTorch eager fp32.
- Batch 1, every modality present: Pipeline.infer <= 0.3x the latency of PyTorch eager fp32.
- A modality absent: latency <= (share of the present encoders in the full latency + 10%) of the full latency.
"""

import pytest
from cases import Check, Timed, batch_of, case_name

pytestmark = pytest.mark.target
EVERYTHING = "audio+image"


def _torch_call(torch_model, inputs):
    import torch

    feeds = {n: (torch.from_numpy(x) if x is not None else None) for n, x in inputs.items()}

    def run():
        with torch.no_grad():
            return torch_model(feeds)
    return run


def _pipeline(pipelines, precision, inputs, pattern, batch):
    return Timed(case_name("pipeline", pattern, "onnxruntime", precision, batch),
                 lambda: pipelines[precision].infer(inputs))


def _eager(torch_model, inputs, batch):
    return Timed(case_name("pipeline", EVERYTHING, "pytorch", "fp32", batch), _torch_call(torch_model, inputs))


def test_int8_batch64_throughput(benchmark, target_run, pipelines, torch_model, test_inputs):
    inputs = batch_of(test_inputs, 64)
    int8, fp32, eager = target_run.interleave(_pipeline(pipelines, "int8", inputs, EVERYTHING, 64),
                                              _pipeline(pipelines, "fp32", inputs, EVERYTHING, 64),
                                              _eager(torch_model, inputs, 64))
    benchmark(pipelines["int8"].infer, inputs)
    target_run.conclude("int8-throughput-b64", "onnxruntime", "int8", 64,
                        Check("throughput / fp32 ONNX Runtime", fp32 / int8, ">=", 2.0),
                        Check("throughput / PyTorch eager fp32", eager / int8, ">=", 5.0))


def test_batch1_latency_against_pytorch(benchmark, target_run, pipelines, torch_model, test_inputs):
    inputs = batch_of(test_inputs, 1)
    int8, eager = target_run.interleave(_pipeline(pipelines, "int8", inputs, EVERYTHING, 1),
                                        _eager(torch_model, inputs, 1))
    benchmark(pipelines["int8"].infer, inputs)
    target_run.conclude("int8-latency-b1", "onnxruntime", "int8", 1,
                        Check("latency / PyTorch eager fp32", int8 / eager, "<=", 0.3))


@pytest.mark.parametrize("batch", [1, 64])
@pytest.mark.parametrize("present", ["audio", "image"])
def test_absent_modality_costs_nothing(benchmark, target_run, pipelines, encoders, test_inputs, present, batch):
    full_inputs, partial_inputs = batch_of(test_inputs, batch), batch_of(test_inputs, batch, (present,))
    engines = [Timed(case_name("engine", n, "onnxruntime", "int8", batch),
                     lambda n=n: encoders["int8"][n].infer({n: full_inputs[n]})) for n in ("audio", "image")]
    full, partial, audio, image = target_run.interleave(_pipeline(pipelines, "int8", full_inputs, EVERYTHING, batch),
                                                        _pipeline(pipelines, "int8", partial_inputs, present, batch),
                                                        *engines)
    share = {"audio": audio, "image": image}[present] / (audio + image)
    benchmark(pipelines["int8"].infer, partial_inputs)
    target_run.conclude(f"only-{present}-b{batch}", "onnxruntime", "int8", batch,
                        Check(f"latency with only {present} / with every modality", partial / full, "<=", share + 0.10),
                        encoder_share=share)
