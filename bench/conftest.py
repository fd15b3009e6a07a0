"""Fixtures for the benchmark suites: the reference model's engines, its PyTorch eager baseline, real inputs, and the
target cases' shared state.

Run: pytest bench/ --benchmark-json=bench/out/RESULTS.json && python -m ume_edge.bench report bench/out/RESULTS.json

Targets are measured and reported in every run; they fail the run only when ``-m`` selects target cases alone
(``pytest bench/ -m target``).
"""

import os
from pathlib import Path

import numpy as np
import pytest
from cases import LATENCY_KINDS, ROUNDS, TargetRun, case_name

from ume_edge.data import load

EDGE_OUT = Path(__file__).resolve().parent / "out" / "edge"
EDGE_MODEL = Path(__file__).resolve().parent / "edge_model.py"
# The edge model's weights are random, so its classes are near ties and INT8 flips many of them: agreement with fp32
# measures nothing there. The gate is loosened so that the benchmark times the INT8 engines a trained model would get.
EDGE_MAX_DROP = 10.0

TARGETS_ASSERTED = pytest.StashKey[bool]()
STANDALONE_MEDIANS = pytest.StashKey[dict]()
TARGET_OUTCOMES = pytest.StashKey[list]()
LOAD_BEFORE = pytest.StashKey[float]()


def targets_asserted(markexpr: str) -> bool:
    """Whether a ``-m`` expression asks for target cases (``target``, ``target and not gpu``), not merely allows them
    (``not slow``) or leaves them out (``not target``, ``target or slow``)."""
    words = markexpr.replace("(", " ").replace(")", " ").split()
    wanted = [i for i, word in enumerate(words) if word == "target" and (i == 0 or words[i - 1] != "not")]
    return bool(wanted) and "or" not in words


def pytest_configure(config):
    config.addinivalue_line("markers", "target: a performance target (ratios measured in the same run); "
                                       "asserted only under -m target")
    config.addinivalue_line("markers", "heavy: builds the edge-size model (about a minute the first time), times it, "
                                       "or runs a concurrent load; the test suite's quick run of the benchmarks "
                                       "leaves these out")
    config.stash[TARGETS_ASSERTED] = targets_asserted(config.option.markexpr)
    config.stash[STANDALONE_MEDIANS] = {}
    config.stash[TARGET_OUTCOMES] = []
    config.stash[LOAD_BEFORE] = os.getloadavg()[0]
    results = config.getoption("benchmark_json", None)
    if results:  # pytest-benchmark writes it only after the whole run, into a folder that must exist
        Path(results).parent.mkdir(parents=True, exist_ok=True)


def pytest_benchmark_update_machine_info(config, machine_info):
    """The load other processes put on the machine before the run, which slows and scatters every number."""
    machine_info["load_average_before"] = config.stash[LOAD_BEFORE]


def pytest_terminal_summary(terminalreporter, config):
    outcomes = config.stash.get(TARGET_OUTCOMES, [])
    if not outcomes:
        return
    asserted = config.stash[TARGETS_ASSERTED]
    terminalreporter.section("performance targets (asserted)" if asserted else
                             "performance targets (reported; `pytest bench/ -m target` asserts them)")
    for outcome in outcomes:
        terminalreporter.write_line(outcome)


@pytest.fixture
def target_run(request, benchmark):
    """A target case's timing and verdict; each alternating block lasts --benchmark-max-time / ROUNDS."""
    config = request.config
    block_s = float(config.getoption("benchmark_max_time")) / ROUNDS
    return TargetRun(benchmark, config.stash[STANDALONE_MEDIANS], config.stash[TARGETS_ASSERTED], block_s,
                     config.stash[TARGET_OUTCOMES])


@pytest.fixture(scope="session")
def engine_dirs():
    from ume_edge.build import ensure_default_engines

    return {precision: ensure_default_engines(precision) for precision in ("int8", "fp32")}


@pytest.fixture(scope="session")
def pipelines(engine_dirs):
    from ume_edge.runtime import Pipeline

    return {precision: Pipeline.load(path) for precision, path in engine_dirs.items()}


@pytest.fixture(scope="session")
def encoders(pipelines):
    """Each modality's engine on its own, per precision."""
    return {precision: {name: pipeline.open_encoder(name) for name in pipeline.modality_names}
            for precision, pipeline in pipelines.items()}


@pytest.fixture(scope="session")
def torch_model():
    import torch

    from ume_edge.model import load_reference

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    return load_reference()


@pytest.fixture(scope="session")
def test_inputs():
    inputs, _ = load("avdigits", "test")
    return inputs


@pytest.fixture(autouse=True)
def _keep_stats(request):
    """Add the 90th percentile to each benchmark's extra_info (pytest-benchmark's JSON stops at the quartiles), and
    keep each latency case's median for the targets' cross-check."""
    yield
    benchmark = request.node.funcargs.get("benchmark")
    stats = getattr(getattr(benchmark, "stats", None), "stats", None)
    if stats is None or not stats.data:
        return
    info = benchmark.extra_info
    info["p90_s"] = float(np.percentile(stats.data, 90))
    if info.get("kind") in LATENCY_KINDS:
        name = case_name(info["kind"], info["target"], info["backend"], info["precision"], info["batch"],
                         info.get("model", "reference"))
        request.config.stash[STANDALONE_MEDIANS][name] = float(stats.median)


def _current(directory: Path, sha256: str) -> bool:
    from ume_edge import backends, engine_dir
    from ume_edge.errors import UmeEdgeError

    try:
        manifest = engine_dir.load(directory)
        backends.get(manifest.backend).check_compatible(manifest)
    except UmeEdgeError:
        return False
    return manifest.model.sha256 == sha256


@pytest.fixture(scope="session")
def edge_engine_dirs():
    """The edge-size model's INT8 and fp32 ONNX Runtime builds (bench/edge_model.py), made once into bench/out/edge/
    and made again when the model or this machine's runtime changed (about a minute)."""
    from edge_model import build as edge_model
    from edge_model import calibration_data

    from ume_edge.build import BuildOptions, build
    from ume_edge.build.stages import model_sha256

    sha256 = model_sha256(edge_model())
    calibration = EDGE_OUT / "calibration.npz"
    directories = {}
    for precision in ("int8", "fp32"):
        out = EDGE_OUT / f"edge-{precision}-onnxruntime"
        if not _current(out, sha256):
            EDGE_OUT.mkdir(parents=True, exist_ok=True)
            np.savez(calibration, **calibration_data(256))
            build(BuildOptions(model=f"{EDGE_MODEL}:build", precision=precision, backend="onnxruntime",
                               calib_data=str(calibration), max_drop=EDGE_MAX_DROP, out=out))
        directories[precision] = out
    return directories


@pytest.fixture(scope="session")
def edge_inputs():
    """Inputs of the edge model's shapes, none seen in calibration."""
    from edge_model import calibration_data

    return calibration_data(64, seed=1)


@pytest.fixture
def standalone_medians(request) -> dict[str, float]:
    """This run's medians by ``case_name``, which a target cross-checks its interleaved medians against; a case of a
    kind that ``_keep_stats`` does not keep (``peak``) adds its own."""
    return request.config.stash[STANDALONE_MEDIANS]
