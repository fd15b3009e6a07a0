"""The CUDA half of the TensorRT backend on a real GPU: ``TensorRTEngine`` and ``DevicePipeline`` with real
cuda-python device buffers, streams, events, 2-D copies of the present rows, and CUDA-graph capture and replay.
TensorRT itself is replaced by a stand-in whose execution context launches CuPy kernels on the stream it is given,
reading and writing the addresses it was given, as TensorRT's ``execute_async_v3`` does. Needs CUDA, CuPy and
cuda-python, not TensorRT; ``tools/gpu_check.sh`` runs it (``pytest -m gpu tests/test_gpu_cuda.py``)."""

import enum
import functools

import numpy as np
import pytest

from ume_edge.backends.tensorrt import api
from ume_edge.backends.tensorrt.engine import TensorRTEngine
from ume_edge.backends.tensorrt.pipeline import DevicePipeline

cupy = pytest.importorskip("cupy", reason="needs CuPy and a CUDA GPU")


def _gpu_missing() -> str | None:
    try:
        cudart = api.cudart()
    except ImportError:
        return "needs cuda-python (cuda.bindings.runtime)"
    error, count = cudart.cudaGetDeviceCount()
    if error != cudart.cudaError_t.cudaSuccess or count == 0:
        return f"needs a CUDA GPU ({getattr(error, 'name', error)})"
    return None


GPU_MISSING = _gpu_missing()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(GPU_MISSING is not None, reason=GPU_MISSING or "")]

MAX_BATCH = 8
C = 5
SHAPES = {"audio": (6,), "image": (1, 2, 3), "text": (4,)}
ORDER = list(SHAPES)
RNG = np.random.default_rng(0)
WEIGHTS = {n: (RNG.standard_normal((int(np.prod(s)), C)).astype(np.float32),
               RNG.standard_normal(C).astype(np.float32)) for n, s in SHAPES.items()}
CONSTANTS = RNG.standard_normal((len(ORDER), C)).astype(np.float32)

KERNELS = r"""
extern "C" __global__ void linear(const float* x, const float* weight, const float* bias, float* y,
                                  int rows, int features, int classes) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= rows * classes) return;
    int row = i / classes, c = i % classes;
    float total = bias[c];
    for (int k = 0; k < features; ++k) total += x[row * features + k] * weight[k * classes + c];
    y[i] = total;
}

extern "C" __global__ void fusion(const float* partial, const float* present, const float* absent, float* logits,
                                  float* probs, int rows, int modalities, int classes, int ume) {
    int row = blockIdx.x * blockDim.x + threadIdx.x;
    if (row >= rows) return;
    float count = 0.f, top = -3.4e38f, sum = 0.f;
    for (int m = 0; m < modalities; ++m) count += present[row * modalities + m];
    for (int c = 0; c < classes; ++c) {
        float total = 0.f;
        for (int m = 0; m < modalities; ++m)  // an absent row is selected away, never read as a number
            total += present[row * modalities + m] > 0.5f ? partial[(row * modalities + m) * classes + c]
                                                          : absent[m * classes + c];
        if (ume) total /= fmaxf(count, 1.f);
        logits[row * classes + c] = total;
        top = fmaxf(top, total);
    }
    for (int c = 0; c < classes; ++c) sum += expf(logits[row * classes + c] - top);
    for (int c = 0; c < classes; ++c) probs[row * classes + c] = expf(logits[row * classes + c] - top) / sum;
}
"""


@functools.cache
def kernel(name: str):
    return cupy.RawModule(code=KERNELS).get_function(name)  # compiled and loaded now, never during a capture


def launch(function, count: int, *args) -> None:
    """``function`` over ``count`` threads on the current (external) stream; pointers as 64-bit integers."""
    values = [np.uint64(a) if isinstance(a, Pointer) else (a if isinstance(a, cupy.ndarray) else np.int32(a))
              for a in args]
    function(((count + 127) // 128,), (128,), tuple(values))


class Pointer(int):
    """A device address, passed to a kernel as a pointer."""


class StreamHandle:
    """A stream handle (what ``execute_async_v3`` gets) as the CUDA stream protocol presents it."""

    def __init__(self, handle: int):
        self.handle = handle

    def __cuda_stream__(self):
        return 0, self.handle


def cupy_stream(handle: int):
    """The stream ``handle`` for CuPy's launches (``Stream.from_external`` from CuPy 14, ``ExternalStream`` before)."""
    if hasattr(cupy.cuda.Stream, "from_external"):
        return cupy.cuda.Stream.from_external(StreamHandle(handle))
    return cupy.cuda.ExternalStream(handle)


# ---------------------------------------------------------------- the stand-in for TensorRT


class StandInPlan:
    """What one stand-in plan computes: per-sample input and output shapes, and a CuPy launch of
    ``(addresses, batch)``. ``during_capture`` is what its context does on a capturing stream: ``enqueue`` (as
    TensorRT does), ``refuse`` (return False), ``synchronize`` (a call CUDA forbids during a capture, which
    invalidates it) or ``raise``. ``enqueued`` counts the launches queued outside graph replays."""

    def __init__(self, inputs, outputs, run, during_capture="enqueue"):
        self.inputs, self.outputs, self.run, self.during_capture = inputs, outputs, run, during_capture
        self.enqueued = 0


def encoder_plan(name: str, **options) -> StandInPlan:
    weight, bias = (cupy.asarray(w) for w in WEIGHTS[name])
    function, features = kernel("linear"), weight.shape[0]

    def run(addresses, batch):
        launch(function, batch * C, Pointer(addresses[name]), weight, bias, Pointer(addresses["partial_logits"]),
               batch, features, C)

    return StandInPlan({name: SHAPES[name]}, {"partial_logits": (C,)}, run, **options)


def fusion_plan(mode: str, **options) -> StandInPlan:
    absent = cupy.asarray(CONSTANTS if mode == "mma" else np.zeros_like(CONSTANTS))
    function, m = kernel("fusion"), len(ORDER)

    def run(addresses, batch):
        launch(function, batch, Pointer(addresses["partial_logits"]), Pointer(addresses["present"]), absent,
               Pointer(addresses["logits"]), Pointer(addresses["probs"]), batch, m, C, int(mode == "ume"))

    return StandInPlan({"partial_logits": (m, C), "present": (m,)}, {"logits": (C,), "probs": (C,)}, run, **options)


class StandInTensorRT:
    """As much of the ``tensorrt`` module as TensorRTEngine uses; ``plans`` maps a plan file's bytes to its plan."""

    __version__ = "stand-in"
    TensorIOMode = enum.IntEnum("TensorIOMode", {"NONE": 0, "INPUT": 1, "OUTPUT": 2})
    DataType = enum.IntEnum("DataType", {"FLOAT": 0})

    class Logger:
        WARNING = 2

        def __init__(self, min_severity=2):
            self.min_severity = min_severity

    def __init__(self, plans: dict[bytes, StandInPlan]):
        self.plans = plans

    def nptype(self, trt_type):
        return np.float32

    def Runtime(self, logger):  # noqa: N802 (tensorrt's name)
        return StandInRuntime(self)


class StandInRuntime:
    def __init__(self, trt: StandInTensorRT):
        self.trt, self.engine_host_code_allowed, self.DLA_core = trt, False, -1

    def deserialize_cuda_engine(self, serialized_engine):
        plan = self.trt.plans.get(bytes(serialized_engine))
        return None if plan is None else StandInEngine(self.trt, plan)


class StandInEngine:
    def __init__(self, trt: StandInTensorRT, plan: StandInPlan):
        self.trt, self.plan, self.names = trt, plan, [*plan.inputs, *plan.outputs]
        self.num_io_tensors = len(self.names)

    def get_tensor_name(self, index):
        return self.names[index]

    def get_tensor_mode(self, name):
        return self.trt.TensorIOMode.INPUT if name in self.plan.inputs else self.trt.TensorIOMode.OUTPUT

    def get_tensor_dtype(self, name):
        return self.trt.DataType.FLOAT

    def get_tensor_profile_shape(self, name, profile_index):
        return [(batch, *self.plan.inputs[name]) for batch in (1, MAX_BATCH // 2, MAX_BATCH)]

    def create_execution_context(self):
        return StandInContext(self.plan)


class StandInContext:
    def __init__(self, plan: StandInPlan):
        self.plan, self.shapes, self.addresses, self.streams = plan, {}, {}, {}

    def set_input_shape(self, name, shape):
        if tuple(shape[1:]) != self.plan.inputs[name] or not 1 <= shape[0] <= MAX_BATCH:
            return False
        self.shapes[name] = tuple(shape)
        return True

    def get_tensor_shape(self, name):
        batch = self.shapes[next(iter(self.plan.inputs))][0]
        return self.shapes[name] if name in self.plan.inputs else (batch, *self.plan.outputs[name])

    def set_tensor_address(self, name, memory):
        self.addresses[name] = int(memory)
        return True

    def execute_async_v3(self, stream_handle):
        cudart = api.cudart()
        status = api.call(cudart.cudaStreamIsCapturing(stream_handle))
        if status == cudart.cudaStreamCaptureStatus.cudaStreamCaptureStatusActive:
            if self.plan.during_capture == "refuse":
                return False
            if self.plan.during_capture == "raise":
                raise RuntimeError("the stand-in failed while the stream was capturing")
            if self.plan.during_capture == "synchronize":
                cudart.cudaStreamSynchronize(stream_handle)  # refused by CUDA, and the capture is invalidated
                return True
        else:
            self.plan.enqueued += 1
        if stream_handle not in self.streams:  # wrapped at the run before a capture, never during one
            self.streams[stream_handle] = cupy_stream(stream_handle)
        with self.streams[stream_handle]:
            self.plan.run(self.addresses, self.get_tensor_shape(next(iter(self.plan.inputs)))[0])
        return True


# ---------------------------------------------------------------- fixtures and references


@pytest.fixture
def stand_in(monkeypatch, tmp_path):
    """Install a stand-in TensorRT (the real cuda-python stays) and return ``plan_file(plan) -> path``."""
    trt = StandInTensorRT({})
    monkeypatch.setattr(api, "tensorrt", lambda: trt)

    def plan_file(plan: StandInPlan, name: str):
        key = f"stand-in plan {name} {len(trt.plans)}".encode()
        trt.plans[key] = plan
        path = tmp_path / f"{name}.plan"
        path.write_bytes(key)
        return path

    return plan_file


def encode(name: str, x: np.ndarray) -> np.ndarray:
    weight, bias = WEIGHTS[name]
    return x.reshape(len(x), -1) @ weight + bias


def fused(mode: str, given: dict, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """NumPy: each encoder on its present rows, then UME or MMA (docs/method.md) and softmax."""
    partial = np.zeros((len(mask), len(ORDER), C), np.float32)
    for i, name in enumerate(ORDER):
        if mask[:, i].any():
            partial[mask[:, i], i] = encode(name, given[name][mask[:, i]])
    absent = CONSTANTS[None] if mode == "mma" else 0.0
    logits = np.where(mask[:, :, None], partial, absent).sum(axis=1)
    if mode == "ume":
        logits = logits / np.maximum(mask.sum(axis=1, keepdims=True), 1)
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    return logits, probs / probs.sum(axis=1, keepdims=True)


def inputs_for(mask: np.ndarray, seed: int) -> dict[str, np.ndarray]:
    """Full-batch inputs of every modality with a present row; absent rows hold NaN, so a leak shows."""
    rng = np.random.default_rng(seed)
    given = {}
    for i, name in enumerate(ORDER):
        if mask[:, i].any():
            given[name] = rng.standard_normal((len(mask), *SHAPES[name])).astype(np.float32)
            given[name][~mask[:, i]] = np.nan
    return given


def masks() -> list[np.ndarray]:
    patterns = [np.array(p, bool) for p in np.ndindex(2, 2, 2) if any(p)]
    whole = [np.tile(p, (batch, 1)) for p in patterns for batch in (1, 4, MAX_BATCH)]
    rng = np.random.default_rng(3)
    mixed = [m for m in (rng.random((MAX_BATCH, len(ORDER))) < 0.5 for _ in range(40)) if m.any(axis=1).all()]
    return whole + mixed[:10]


def free_device_memory() -> int:
    free, _ = api.call(api.cudart().cudaMemGetInfo())
    return free


# ---------------------------------------------------------------- one engine


def test_an_engine_runs_its_kernel_on_its_stream_between_the_copies(stand_in):
    with TensorRTEngine(stand_in(encoder_plan("audio"), "audio")) as engine:
        for batch in (1, 3, MAX_BATCH):
            x = RNG.standard_normal((batch, 6)).astype(np.float32)
            np.testing.assert_allclose(engine.infer({"audio": x})["partial_logits"], encode("audio", x), rtol=1e-5,
                                       atol=1e-5)


def test_a_captured_batch_replays_its_cuda_graph_with_new_data(stand_in):
    plan = encoder_plan("audio")
    with TensorRTEngine(stand_in(plan, "audio"), cuda_graph_batch_sizes=(4,)) as engine:
        assert plan.enqueued == 1  # the run before the capture; the captured launch went into the graph
        for seed in range(3):
            x = np.random.default_rng(seed).standard_normal((4, 6)).astype(np.float32)
            np.testing.assert_allclose(engine.infer({"audio": x})["partial_logits"], encode("audio", x), rtol=1e-5,
                                       atol=1e-5)
        assert plan.enqueued == 1  # replays enqueue nothing through TensorRT
        engine.infer({"audio": np.ones((3, 6), np.float32)})
        assert plan.enqueued == 2


def test_device_tensors_in_and_out_without_host_copies(stand_in):
    x = cupy.asarray(RNG.standard_normal((5, 6)).astype(np.float32))
    with TensorRTEngine(stand_in(encoder_plan("audio"), "audio")) as engine:
        output = engine.infer_device({"audio": x.data.ptr}, batch_size=5)["partial_logits"]
        memory = cupy.cuda.UnownedMemory(output.pointer, 5 * C * 4, engine)
        got = cupy.ndarray(output.shape, cupy.float32, cupy.cuda.MemoryPointer(memory, 0)).get()
    np.testing.assert_allclose(got, encode("audio", x.get()), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("failure", ["refuse", "synchronize"])
def test_a_failed_capture_is_ended_and_that_batch_runs_without_a_graph(stand_in, caplog, failure):
    plan = encoder_plan("audio", during_capture=failure)
    with TensorRTEngine(stand_in(plan, "audio"), cuda_graph_batch_sizes=(4,)) as engine:
        assert "CUDA-graph capture at batch 4 failed" in caplog.text
        cudart = api.cudart()
        status = api.call(cudart.cudaStreamIsCapturing(engine.stream))
        assert status == cudart.cudaStreamCaptureStatus.cudaStreamCaptureStatusNone
        x = RNG.standard_normal((4, 6)).astype(np.float32)
        np.testing.assert_allclose(engine.infer({"audio": x})["partial_logits"], encode("audio", x), rtol=1e-5,
                                   atol=1e-5)
        assert plan.enqueued == 2  # the run before the capture, then a plain run


def test_closing_and_failing_half_way_give_the_device_memory_back(stand_in):
    big = {"audio": (1 << 22,)}  # 16 MiB a row: 128 MiB of input buffer at MAX_BATCH
    plan = StandInPlan(big, {"partial_logits": (C,)}, lambda addresses, batch: None)
    TensorRTEngine(stand_in(plan, "warm-up")).close()
    before, slack = free_device_memory(), 8 << 20  # the driver's own bookkeeping may move a few MiB
    engine = TensorRTEngine(stand_in(plan, "big"))
    assert free_device_memory() <= before - (128 << 20)
    engine.close()
    assert abs(free_device_memory() - before) < slack
    failing = StandInPlan(big, {"partial_logits": (C,)}, lambda addresses, batch: None, during_capture="raise")
    for _ in range(3):
        with pytest.raises(RuntimeError, match="while the stream was capturing"):
            TensorRTEngine(stand_in(failing, "failing"), cuda_graph_batch_sizes=(2,))
    assert abs(free_device_memory() - before) < slack


# ---------------------------------------------------------------- the pipeline


@pytest.mark.parametrize("mode", ["ume", "mma"])
@pytest.mark.parametrize("graphs", [(), (1, 4, MAX_BATCH)], ids=["plain", "cuda-graphs"])
def test_the_device_pipeline_answers_every_pattern_and_per_row_mask(stand_in, mode, graphs):
    engines = {n: TensorRTEngine(stand_in(encoder_plan(n), n), cuda_graph_batch_sizes=graphs) for n in ORDER}
    fusion = TensorRTEngine(stand_in(fusion_plan(mode), "fusion"), cuda_graph_batch_sizes=graphs)
    with DevicePipeline(engines, fusion, ORDER, C) as pipeline:
        for index, mask in enumerate(masks() * 2):  # twice over the same buffers: stale rows must not matter
            given = inputs_for(mask, seed=index)
            logits, probs = pipeline.infer(given, mask)
            expected_logits, expected_probs = fused(mode, given, mask)
            np.testing.assert_allclose(logits, expected_logits, rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(probs, expected_probs, rtol=1e-5, atol=1e-6)
