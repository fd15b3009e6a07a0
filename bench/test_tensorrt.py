"""TensorRT cases: per engine and for the pipeline at batch 1 / 8 / 64 / the built maximum, and the H100 targets.
They run where TensorRT and a CUDA GPU are present and skip elsewhere (no machine this project runs on has TensorRT).

Targets (reference model, INT8 plans, H100-class GPU): batch-2048 throughput >= 4x PyTorch eager fp16, and
batch-1 pipeline latency <= 0.1 ms.
"""

import numpy as np
import pytest
from cases import Check, Timed, batch_of, case_name, record

from ume_edge.backends import tensorrt

pytestmark = [pytest.mark.skipif(not tensorrt.BACKEND.is_available(),
                                 reason="TensorRT and a CUDA GPU are required; none here"),
              pytest.mark.tensorrt, pytest.mark.gpu]
MAX_BATCH = 2048
BATCHES = (1, 8, 64, MAX_BATCH)


@pytest.fixture(scope="module")
def plans(tmp_path_factory):
    from ume_edge.build import BuildOptions, build
    from ume_edge.runtime import Pipeline

    out = tmp_path_factory.mktemp("trt") / "avdigits-int8-tensorrt"
    return Pipeline.load(build(BuildOptions(backend="tensorrt", max_batch=MAX_BATCH, out=out)))


def _inputs(test_inputs, batch, pattern=("audio", "image")):
    repeats = -(-batch // len(test_inputs["audio"]))
    tiled = {n: np.concatenate([x] * repeats) for n, x in test_inputs.items()}
    return batch_of(tiled, batch, pattern)


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("modality", ["audio", "image"])
def test_tensorrt_engine(benchmark, plans, test_inputs, modality, batch):
    feeds = {modality: _inputs(test_inputs, batch)[modality]}
    record(benchmark, "engine", modality, "tensorrt", "int8", batch)
    with plans.open_encoder(modality) as engine:
        benchmark(engine.infer, feeds)


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("pattern", [("audio", "image"), ("audio",), ("image",)], ids="+".join)
def test_tensorrt_pipeline(benchmark, plans, test_inputs, pattern, batch):
    inputs = _inputs(test_inputs, batch, pattern)
    record(benchmark, "pipeline", "+".join(pattern), "tensorrt", "int8", batch)
    benchmark(plans.infer, inputs)


@pytest.mark.target
def test_h100_targets(benchmark, target_run, plans, torch_model, test_inputs):
    import torch

    gpu_model = torch_model.to("cuda").half()
    big = _inputs(test_inputs, MAX_BATCH)
    feeds = {n: torch.from_numpy(x).cuda().half() for n, x in big.items()}

    def eager_fp16():
        with torch.no_grad():
            gpu_model(feeds)
        torch.cuda.synchronize()

    trt, eager = target_run.interleave(
        Timed(case_name("pipeline", "audio+image", "tensorrt", "int8", MAX_BATCH), lambda: plans.infer(big)),
        Timed(case_name("pipeline", "audio+image", "pytorch", "fp16", MAX_BATCH), eager_fp16))
    one = _inputs(test_inputs, 1)
    batch1 = target_run.interleave(Timed(case_name("pipeline", "audio+image", "tensorrt", "int8", 1),
                                         lambda: plans.infer(one)))[0]
    benchmark(plans.infer, big)
    target_run.conclude("tensorrt-h100", "tensorrt", "int8", MAX_BATCH,
                        Check("throughput / PyTorch eager fp16", eager / trt, ">=", 4.0),
                        Check("batch-1 pipeline latency (ms)", batch1 * 1e3, "<=", 0.1))
