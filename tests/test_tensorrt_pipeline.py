"""DevicePipeline: encoders and fusion on one GPU with the partial logits kept there.

Against the fakes in trt_fakes.py (lazy streams, NaN-filled device memory, bounds-checked copies; plans built by
``build_engine`` from small ONNX encoders and the fusion graph, computing with ONNX Runtime) it must give what
``ume_edge.fusion.fuse`` gives over NumPy encoders, for every presence pattern and for mixed per-row masks, with absent
rows never reaching an encoder and only logits and probs coming back to the host. The tests marked ``tensorrt`` and
``gpu`` build real plans of the same model and compare with ONNX Runtime."""

import itertools

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from trt_fakes import batches_run, install, needs_tensorrt_and_gpu  # tests/trt_fakes.py; tests/ is on sys.path

from ume_edge.backends.tensorrt.config import BuildConfig, build_engine
from ume_edge.backends.tensorrt.engine import TensorRTEngine
from ume_edge.backends.tensorrt.pipeline import DevicePipeline, present_runs
from ume_edge.errors import EngineMismatch, InputError
from ume_edge.fusion import FusionParams, fuse, fusion_graph, softmax

SHAPES = {"audio": (6,), "image": (1, 2, 3), "text": (4,)}
ORDER = list(SHAPES)
C = 5
MAX_BATCH = 8
RNG = np.random.default_rng(0)
WEIGHTS = {n: (RNG.standard_normal((int(np.prod(s)), C)).astype(np.float32),
               RNG.standard_normal(C).astype(np.float32)) for n, s in SHAPES.items()}
CONSTANTS = RNG.standard_normal((len(ORDER), C)).astype(np.float32)
PATTERNS = [p for p in itertools.product([False, True], repeat=len(ORDER)) if any(p)]


def params_for(mode: str, order=ORDER, constants=CONSTANTS) -> FusionParams:
    return FusionParams(mode, list(order), C, constants if mode == "mma" else None)


def encode(name: str, x: np.ndarray) -> np.ndarray:
    weight, bias = WEIGHTS[name]
    return x.reshape(len(x), -1) @ weight + bias


def reference(params: FusionParams, given: dict, mask: np.ndarray, encoder=encode) -> tuple[np.ndarray, np.ndarray]:
    """What Pipeline.infer computes: each encoder on its present rows only, then the NumPy fusion."""
    partial = np.zeros((len(mask), len(params.modality_order), C), np.float32)
    for i, name in enumerate(params.modality_order):
        if mask[:, i].any():
            partial[mask[:, i], i] = encoder(name, given[name][mask[:, i]])
    logits = fuse(params, partial, mask)
    return logits, softmax(logits)


def inputs_for(mask: np.ndarray, order=ORDER, shapes=SHAPES, seed=1) -> dict[str, np.ndarray]:
    """Full-batch inputs of every modality with a present row; absent rows hold NaN, so a leak shows."""
    rng = np.random.default_rng(seed)
    given = {}
    for i, name in enumerate(order):
        if mask[:, i].any():
            x = rng.standard_normal((len(mask), *shapes[name])).astype(np.float32)
            x[~mask[:, i]] = np.nan
            given[name] = x
    return given


def random_masks(count: int, batch: int = MAX_BATCH, seed: int = 2) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    masks = []
    while len(masks) < count:
        mask = rng.random((batch, len(ORDER))) < 0.5
        if mask.any(axis=1).all():
            masks.append(mask)
    return masks


def linear_encoder_onnx(name: str, shape: tuple[int, ...]) -> onnx.ModelProto:
    """``partial_logits = flatten(x) @ W + b``: a tiny encoder with its slice of the head, as ENGINE_FORMAT.md says."""
    weight, bias = WEIGHTS[name]
    nodes = [helper.make_node("Flatten", [name], ["flat"], axis=1),
             helper.make_node("MatMul", ["flat", "weight"], ["product"]),
             helper.make_node("Add", ["product", "bias"], ["partial_logits"])]
    graph = helper.make_graph(nodes, f"{name}_encoder",
                              [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", *shape])],
                              [helper.make_tensor_value_info("partial_logits", TensorProto.FLOAT, ["batch", C])],
                              [numpy_helper.from_array(weight, "weight"), numpy_helper.from_array(bias, "bias")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    return model


def build_plans(folder, mode: str, config: BuildConfig, order=ORDER) -> dict:
    """Plans of the encoders and the fusion, built by ``build_engine``; and the ONNX files they came from."""
    files = {}
    models = {n: linear_encoder_onnx(n, SHAPES[n]) for n in order}
    models["fusion"] = fusion_graph(params_for(mode, order, CONSTANTS[:len(order)]))
    inputs = {n: {n: SHAPES[n]} for n in order}
    inputs["fusion"] = {"partial_logits": (len(order), C), "present": (len(order),)}
    for key, model in models.items():
        files[key] = folder / f"{key}.onnx", folder / f"{key}.plan"
        onnx.save(model, files[key][0])
        build_engine(files[key][0], files[key][1], inputs[key], config)
    return files


# ---------------------------------------------------------------- against the fakes


class FakeSetup:
    """Plans of every modality and the fusion built with the fakes, and a way to open them as a DevicePipeline."""

    def __init__(self, monkeypatch, tmp_path, mode: str):
        self.params = params_for(mode)
        self.trt, self.cuda = install(monkeypatch)
        built = build_plans(tmp_path, mode, BuildConfig(max_batch=MAX_BATCH))
        self.paths = {key: plan for key, (_, plan) in built.items()}

    def pipeline(self, cuda_graph_batch_sizes=(), order=ORDER) -> DevicePipeline:
        engines = {n: TensorRTEngine(self.paths[n], cuda_graph_batch_sizes=cuda_graph_batch_sizes) for n in order}
        fusion = TensorRTEngine(self.paths["fusion"], cuda_graph_batch_sizes=cuda_graph_batch_sizes)
        return DevicePipeline(engines, fusion, list(order), C)

    def batches_run(self) -> dict[str, list[int]]:
        return {name: batches_run(self.trt, name) for name in ORDER}

    def forget_runs(self) -> None:
        self.trt.runs.clear()
        self.cuda.copies.clear()


@pytest.fixture(params=["ume", "mma"])
def setup(request, monkeypatch, tmp_path):
    return FakeSetup(monkeypatch, tmp_path, request.param)


def check_run(setup: FakeSetup, pipeline: DevicePipeline, mask: np.ndarray) -> None:
    setup.forget_runs()
    given = inputs_for(mask)
    logits, probs = pipeline.infer(given, mask)
    expected_logits, expected_probs = reference(setup.params, given, mask)
    assert logits.dtype == probs.dtype == np.float32 and logits.shape == probs.shape == (len(mask), C)
    np.testing.assert_allclose(logits, expected_logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(probs, expected_probs, rtol=1e-5, atol=1e-6)
    for i, name in enumerate(ORDER):  # absent rows never reach an encoder; an absent modality's encoder never runs
        rows = int(mask[:, i].sum())
        assert setup.batches_run()[name] == ([rows] if rows else []), name


def test_every_presence_pattern_matches_numpy(setup):
    with setup.pipeline() as pipeline:
        for pattern in PATTERNS * 2:  # the same buffers again: stale rows from earlier runs must not matter
            check_run(setup, pipeline, np.tile(np.array(pattern), (5, 1)))


def test_mixed_per_row_masks_match_numpy(setup):
    masks = random_masks(12) + [np.eye(len(ORDER), dtype=bool)[[0, 1, 2, 0, 0, 2, 1, 1]],
                                np.array([[True, False, False]] * 7 + [[False, True, True]])]
    with setup.pipeline() as pipeline:
        for mask in masks:
            check_run(setup, pipeline, mask)


def test_one_strided_copy_per_run_of_present_rows_and_only_logits_and_probs_come_back(setup):
    mask = np.array([[1, 1, 0], [1, 0, 0], [0, 1, 1], [1, 1, 1], [0, 0, 1], [1, 1, 1]], bool)
    with setup.pipeline() as pipeline:
        check_run(setup, pipeline, mask)
    copies = setup.cuda.copies
    row, pitch = C * 4, len(ORDER) * C * 4
    strided = [c for c in copies if c["kind"] == "cudaMemcpyDeviceToDevice"]
    # audio rows 0-1, 3, 5; image rows 0, 2-3, 5; text rows 2-5
    assert [c["height"] for c in strided] == [2, 1, 1, 1, 2, 1, 4]
    assert all((c["width"], c["spitch"], c["dpitch"]) == (row, row, pitch) for c in strided)
    to_host = [c for c in copies if c["kind"] == "cudaMemcpyDeviceToHost"]
    assert [c["width"] for c in to_host] == [len(mask) * C * 4] * 2  # logits and probs, nothing else
    to_device = [c["width"] for c in copies if c["kind"] == "cudaMemcpyHostToDevice"]
    assert to_device == [4 * 6 * 4, 4 * 6 * 4, 4 * 4 * 4, len(mask) * len(ORDER) * 4]  # present rows, then the mask


def test_a_whole_present_modality_is_one_strided_copy(setup):
    with setup.pipeline() as pipeline:
        check_run(setup, pipeline, np.tile([True, False, True], (7, 1)))
    strided = [c["height"] for c in setup.cuda.copies if c["kind"] == "cudaMemcpyDeviceToDevice"]
    assert strided == [7, 7]


def test_encoders_and_fusion_replay_their_cuda_graphs(setup):
    """A captured batch size replays its graph; the fusion's graph reads the partial logits copied into its buffer."""
    four = np.array([[1, 1, 0], [1, 0, 1], [1, 1, 1], [1, 1, 1]], bool)  # audio 4 rows, image 3, text 3; batch 4
    eight = np.array([[1, 0, 1], [0, 1, 1], [1, 1, 1], [0, 1, 1], [1, 0, 0], [0, 1, 0], [1, 1, 0], [1, 0, 0]], bool)
    with setup.pipeline(cuda_graph_batch_sizes=(4,)) as pipeline:
        check_run(setup, pipeline, four)
        assert setup.cuda.graph_launches == 2  # audio and fusion
        check_run(setup, pipeline, eight)  # audio 5 rows, image 5, text 4; batch 8
        assert setup.cuda.graph_launches == 3  # text


def test_a_missing_wait_between_streams_is_caught_by_the_fakes(setup, monkeypatch):
    """The fakes run each stream's work only when waited for: without the fusion stream's waits on the encoders,
    the fusion reads its never-written NaN buffer. So the passing tests above do check the synchronisation."""
    with setup.pipeline() as pipeline:
        success = (setup.cuda.cudaError_t.cudaSuccess,)
        monkeypatch.setattr(setup.cuda, "cudaStreamWaitEvent", lambda stream, event, flags: success)
        mask = np.ones((3, len(ORDER)), bool)
        logits, _ = pipeline.infer(inputs_for(mask), mask)
    assert np.isnan(logits).all()


def test_close_frees_everything_once(setup):
    pipeline = setup.pipeline()
    mask = np.ones((2, len(ORDER)), bool)
    pipeline.infer(inputs_for(mask), mask)
    pipeline.close()
    pipeline.close()
    assert set(setup.cuda.alive().values()) == {0}


@pytest.mark.parametrize(("mask", "given", "message"), [
    (np.ones((2, 3), np.int64), None, r"'mask' must be a bool array \[rows, 3\].*int64 \[2, 3\]"),
    (np.ones((2, 2), bool), None, r"'mask' must be a bool array.*bool \[2, 2\]"),
    (np.ones((0, 3), bool), None, r"'mask' must be a bool array"),
    (np.array([[1, 0, 0], [0, 0, 0]], bool), None, r"rows \[1\] have no modality present"),
    (np.array([[1, 0, 1], [1, 0, 0]], bool), {"audio"}, r"modality 'text' has present rows"),
])
def test_bad_masks_and_missing_inputs_are_refused(setup, mask, given, message):
    with setup.pipeline() as pipeline:
        inputs = inputs_for(np.ones((len(mask), 3), bool)) if len(mask) else {}
        inputs = {n: x for n, x in inputs.items() if given is None or n in given}
        with pytest.raises(InputError, match=message):
            pipeline.infer(inputs, mask)


def test_a_batch_above_the_profile_is_refused(setup):
    mask = np.ones((MAX_BATCH + 1, len(ORDER)), bool)
    with setup.pipeline() as pipeline, pytest.raises(InputError, match=r"with batch 1..8"):
        pipeline.infer(inputs_for(mask), mask)


def test_engines_that_do_not_form_a_pipeline_are_refused(setup):
    engines = {n: TensorRTEngine(setup.paths[n]) for n in ORDER}
    fusion = TensorRTEngine(setup.paths["fusion"])
    with pytest.raises(EngineMismatch, match="no engine for modality 'text'"):
        DevicePipeline({n: engines[n] for n in ORDER[:2]}, fusion, ORDER, C)
    with pytest.raises(EngineMismatch, match=r"image.plan has inputs \['image'\].*expected input 'audio'"):
        DevicePipeline({**engines, "audio": engines["image"]}, fusion, ORDER, C)
    with pytest.raises(EngineMismatch, match=r"audio.plan gives partial_logits float32 \[8, 5\], expected .*, 7\]"):
        DevicePipeline(engines, fusion, ORDER, 7)
    with pytest.raises(EngineMismatch, match=r"fusion.plan has inputs .*'present': \(3,\).*expected inputs.*\(2,\)"):
        DevicePipeline({n: engines[n] for n in ORDER[:2]}, fusion, ORDER[:2], C)
    for engine in [*engines.values(), fusion]:
        engine.close()


def test_present_runs():
    assert present_runs(np.array([1, 1, 0, 1, 0, 0, 1, 1, 1], bool)) == [(0, 2), (3, 4), (6, 9)]
    assert present_runs(np.array([0, 0], bool)) == [] and present_runs(np.array([True])) == [(0, 1)]


# ---------------------------------------------------------------- real TensorRT on a real GPU

@pytest.fixture(scope="module")
def real_plans(tmp_path_factory):
    """Real plans of the encoders and of the UME and MMA fusion graphs, and the ONNX they came from."""
    plans = {}
    for mode in ("ume", "mma"):
        folder = tmp_path_factory.mktemp(f"trt_{mode}")
        plans[mode] = build_plans(folder, mode, BuildConfig(max_batch=MAX_BATCH, timing_cache=folder / "timing.cache"))
    return plans


def onnxruntime_encoder(files):
    import onnxruntime as ort

    sessions = {n: ort.InferenceSession(str(files[n][0]), providers=["CPUExecutionProvider"]) for n in ORDER}
    return lambda name, x: sessions[name].run(None, {name: x})[0]


@needs_tensorrt_and_gpu
@pytest.mark.parametrize("mode", ["ume", "mma"])
@pytest.mark.parametrize("graphs", [(), (4,)], ids=["plain", "cuda-graphs"])
def test_real_device_pipeline_matches_onnxruntime_and_fuse(real_plans, mode, graphs):
    files = real_plans[mode]
    encoder = onnxruntime_encoder(files)
    engines = {n: TensorRTEngine(files[n][1], cuda_graph_batch_sizes=graphs) for n in ORDER}
    fusion = TensorRTEngine(files["fusion"][1], cuda_graph_batch_sizes=graphs)
    with DevicePipeline(engines, fusion, ORDER, C) as pipeline:
        for mask in (random_masks(8) + [np.tile(np.array(p), (b, 1)) for p in PATTERNS for b in (1, 4)]) * 2:
            given = inputs_for(mask, seed=int(mask.sum()))
            logits, probs = pipeline.infer(given, mask)
            expected_logits, expected_probs = reference(params_for(mode), given, mask, encoder)
            np.testing.assert_allclose(logits, expected_logits, rtol=1e-2, atol=1e-2)  # TF32 kernels
            np.testing.assert_allclose(probs, expected_probs, rtol=1e-2, atol=1e-2)
