"""The benchmark suites run as the README gives them (with CI's fast settings) and exit 0 whatever the targets say;
the report turns their JSON into a table and plots beside it; --compare counts latency regressions only; targets
fail a run only under -m target; an implausible interleaved timing makes a target inconclusive."""

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ume_edge.bench.compare import regressions
from ume_edge.bench.report import write_report
from ume_edge.bench.results import latencies, load_cases
from ume_edge.bench.tables import latency_table

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--benchmark-min-rounds=1", "--benchmark-max-time=0.0005", "--benchmark-warmup=off"]
BASELINE = ROOT / "bench" / "baseline"


def _pytest(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "pytest", *map(str, args), "-q", "-p", "no:cacheprovider", *FAST],
                          cwd=cwd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


def _report(*args):
    return subprocess.run([sys.executable, "-m", "ume_edge.bench", "report", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def _tree_state() -> tuple[str, dict]:
    """What git sees (tracked changes and untracked files), and the committed baseline's bytes."""
    status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=ROOT, capture_output=True,
                            text=True, check=True).stdout
    return status, {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in BASELINE.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def run(tmp_path_factory, int8_engines):
    """The README's two commands, once: every suite (targets included) but the heavy cases, then the report with its
    default --out. The heavy cases (the edge-size model's build and timing, the concurrent loads) would add minutes to
    CI; the MAC counter they rest on and the report of their records are tested here without them."""
    before = _tree_state()
    results = tmp_path_factory.mktemp("bench") / "out" / "RESULTS.json"
    suites = _pytest("bench/", "-m", "not heavy", f"--benchmark-json={results}")
    assert suites.returncode == 0, suites.stdout[-3000:] + suites.stderr[-3000:]
    report = _report(results)
    assert report.returncode == 0, report.stderr
    return {"results": results, "suites": suites, "before": before, "after": _tree_state()}


@pytest.mark.slow
def test_every_benchmark_records_its_case(run):
    benchmarks = json.loads(run["results"].read_text())["benchmarks"]
    assert {"engine", "pipeline", "target"} <= {b["extra_info"]["kind"] for b in benchmarks}
    for case in benchmarks:
        assert {"kind", "target", "backend", "precision", "batch"} <= set(case["extra_info"]), case["name"]
    pipeline_cases = {(b["extra_info"]["target"], b["extra_info"]["backend"], b["extra_info"]["batch"])
                      for b in benchmarks if b["extra_info"]["kind"] == "pipeline"}
    for pattern in ("audio+image", "audio", "image"):
        for batch in (1, 8, 64):
            assert {(pattern, "onnxruntime", batch), (pattern, "pytorch", batch)} <= pipeline_cases


@pytest.mark.slow
def test_targets_are_reported_not_asserted_in_a_plain_run(run):
    targets = [b["extra_info"] for b in json.loads(run["results"].read_text())["benchmarks"]
               if b["extra_info"]["kind"] == "target"]
    assert targets
    for target in targets:
        assert target["status"] in ("met", "missed", "inconclusive")
        assert target["checks"] and all({"measured", "op", "threshold", "met"} <= set(c) for c in target["checks"])
    assert "performance targets (reported" in run["suites"].stdout


@pytest.mark.slow
def test_report_lands_beside_the_results_and_nothing_else_changes(run):
    out = run["results"].parent / "report"
    text = (out / "REPORT.md").read_text()
    assert "| pipeline | audio+image | onnxruntime | int8 | 64 |" in text
    assert "x PyTorch fp32" in text and "accuracy" in text and "## Targets" in text
    assert "faster" in text and "absent" in text  # the headline answers a newcomer's two questions
    for plot in ("latency_per_pattern.png", "throughput_vs_batch.png"):
        assert (out / plot).stat().st_size > 5000
        assert f"]({plot})" in text
    assert sorted(p.name for p in run["results"].parent.iterdir()) == ["RESULTS.json", "report"]
    assert run["after"] == run["before"]


@pytest.mark.slow
def test_compare_counts_latency_regressions_only(run, tmp_path):
    old = json.loads(run["results"].read_text())
    for case in old["benchmarks"]:  # the old run was three times faster everywhere, memory and targets included
        for statistic in ("q1", "median", "q3"):
            case["stats"][statistic] /= 3
    (tmp_path / "old.json").write_text(json.dumps(old))
    result = _report(run["results"], "--out", tmp_path / "report", "--compare", tmp_path / "old.json")
    assert result.returncode == 1
    kinds = {b["name"]: b["extra_info"] for b in old["benchmarks"]}
    flagged = result.stderr.strip().splitlines()[-1].split(": ", 1)[1].split(", ")
    expected = [name for name, info in kinds.items()
                if info["kind"] in ("engine", "pipeline", "served") and info["backend"] != "pytorch"]
    assert sorted(flagged) == sorted(expected)
    text = (tmp_path / "report" / "REPORT.md").read_text()
    assert "REGRESSION" in text and "(slower; the reference)" in text
    assert _report(run["results"], "--out", tmp_path / "same", "--compare", run["results"]).returncode == 0


# --------------------------------------------------------------------------------------------------------------
# fast: the report from synthetic results, and the target mechanics


def _benchmark(name, median_s, kind="engine", backend="onnxruntime", precision="int8", **info):
    stats = {"q1": median_s * 0.9, "median": median_s, "q3": median_s * 1.1, "data": [median_s] * 5}
    return {"name": name, "stats": stats, "extra_info": {"kind": kind, "target": "audio", "backend": backend,
                                                         "precision": precision, "batch": 1, **info}}


def _write(path, *benchmarks):
    path.write_text(json.dumps({"machine_info": {}, "benchmarks": list(benchmarks)}))
    return path


def _run_of(path, scale):
    return _write(path, _benchmark("engine", 0.001 * scale), _benchmark("memory", 0.001 * scale, kind="memory"),
                  _benchmark("torch", 0.002 * scale, backend="pytorch", precision="fp32"),
                  _benchmark("target", 0.001 * scale, kind="target"))


def test_compare_ignores_memory_targets_and_the_reference(tmp_path):
    old, _ = load_cases(_run_of(tmp_path / "old.json", 1))
    new, _ = load_cases(_run_of(tmp_path / "new.json", 3))
    previous = {c.key: c for c in latencies(old)}
    assert [c.name for c in regressions(new, previous, 1.0)] == ["engine"]
    assert regressions(new, previous, 2.5) == []
    assert _report(tmp_path / "new.json", "--compare", tmp_path / "old.json").returncode == 1
    _run_of(tmp_path / "noise.json", 1.15)  # medians 15% slower, but the interquartile ranges overlap
    noise = load_cases(tmp_path / "noise.json")[0]
    assert regressions(noise, previous, 0.1) == []
    assert "(slower; within the two runs' spread)" in "\n".join(latency_table(noise, previous, 0.1))
    assert _report(tmp_path / "noise.json", "--compare", tmp_path / "old.json", "--threshold", "0.1").returncode == 0


def test_the_baseline_changes_only_with_update_baseline(tmp_path):
    baseline = tmp_path / "baseline"
    results = _write(tmp_path / "RESULTS.json", _benchmark("engine", 0.001))
    refused = _report(results, "--out", baseline / "report", "--baseline", baseline)
    assert refused.returncode == 2 and "--update-baseline" in refused.stderr and not baseline.exists()
    updated = _report(results, "--update-baseline", "--baseline", baseline)
    assert updated.returncode == 0, updated.stderr
    assert (baseline / "report" / "REPORT.md").is_file()
    assert "data" not in json.loads((baseline / "RESULTS.json").read_text())["benchmarks"][0]["stats"]
    again = _report(baseline / "RESULTS.json", "--baseline", baseline)  # its default --out is inside the baseline
    assert again.returncode == 2


def test_edge_model_cases_add_compute_columns(tmp_path):
    plain = _write(tmp_path / "plain.json", _benchmark("e", 0.001))
    write_report(plain, tmp_path / "plain")
    assert "% of peak" not in (tmp_path / "plain" / "REPORT.md").read_text()
    edge = _write(tmp_path / "edge.json", _benchmark("e", 0.001, model="edge", macs=2e6, gmac_per_s=2.0,
                                                     peak_fraction=0.05))
    write_report(edge, tmp_path / "edge")
    text = (tmp_path / "edge" / "REPORT.md").read_text()
    assert "## Fraction of peak" in text and "| edge | audio | onnxruntime | int8 | 5% (2.0) |" in text
    assert "| model |" in text and "% of peak" in text
    peaks = _write(tmp_path / "peaks.json", _benchmark("e", 0.001, model="edge", macs=2e6, gmac_per_s=2.0,
                                                       peak_fraction=0.5),
                   *(_benchmark(f"p{rate}", 0.01, kind="peak", precision="int8", gmac_per_s=rate, macs=2e9,
                                input_shape=[1024, 1024], weight_shape=[1024, 1024]) for rate in (4.0, 3.0)))
    write_report(peaks, tmp_path / "peaks")
    text = (tmp_path / "peaks" / "REPORT.md").read_text()
    assert "| audio | onnxruntime | int8 | 1024 x 1024 | 1024 x 1024 | 10.000 | 4.0 | yes |" in text
    assert "| 3.0 | - |" in text and "| peak |" not in text.split("## All cases")[1]  # peaks are no latencies


def test_report_on_a_missing_file_says_how_to_make_one(tmp_path):
    result = _report(tmp_path / "none.json")
    assert result.returncode == 2 and "--benchmark-json" in result.stderr


@pytest.fixture
def bench_modules(monkeypatch):
    """bench/cases.py and bench/conftest.py, imported as the suites import them."""
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    spec = importlib.util.spec_from_file_location("bench_conftest", ROOT / "bench" / "conftest.py")
    conftest = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(conftest)
    return sys.modules["cases"], conftest


@pytest.mark.parametrize("markexpr, asserted", [("", False), ("target", True), ("not target", False),
                                                ("not slow", False), ("target and not gpu", True),
                                                ("target or slow", False), ("(target)", True)])
def test_targets_are_asserted_when_m_selects_targets_alone(bench_modules, markexpr, asserted):
    assert bench_modules[1].targets_asserted(markexpr) is asserted


class FakeBenchmark:
    def __init__(self):
        self.extra_info = {}


def _target(cases, standalone, asserted=False):
    return cases.TargetRun(FakeBenchmark(), standalone, asserted, block_s=1e-4, outcomes=[])


def test_an_implausible_interleaved_median_makes_the_target_inconclusive(bench_modules, monkeypatch):
    cases, _ = bench_modules
    monkeypatch.setattr(cases, "cpu_ticks", lambda: None)
    name = cases.case_name("pipeline", "audio+image", "pytorch", "fp32", 1)
    for standalone_s, status in ((1e-6, "inconclusive"), (None, "met")):
        run = _target(cases, {name: standalone_s} if standalone_s else {})
        run.interleave(cases.Timed(name, lambda: sum(range(2000))))
        run.conclude("b1", "onnxruntime", "int8", 1, cases.Check("latency / PyTorch", 0.01, "<=", 0.3))
        info = run.benchmark.extra_info
        assert info["status"] == status
        assert info["cross_checks"][0]["standalone_from"] == ("benchmark" if standalone_s else "timed alone")
        assert info["checks"] == [{"what": "latency / PyTorch", "measured": 0.01, "op": "<=", "threshold": 0.3,
                                   "met": True}]


def test_a_busy_machine_makes_the_target_inconclusive(bench_modules, monkeypatch):
    cases, _ = bench_modules
    assert cases.others_share((100, 50, 10), (200, 120, 20)) == pytest.approx(0.6)
    total, busy, own = cases.cpu_ticks()
    assert total >= busy >= 0 and own > 0
    ticks = iter([(0, 0, 0), (100, 60, 10)])
    monkeypatch.setattr(cases, "cpu_ticks", lambda: next(ticks))
    run = _target(cases, {})
    run.conclude("ratio", "onnxruntime", "int8", 64, cases.Check("ratio", 3.0, ">=", 2.0))
    assert run.benchmark.extra_info["status"] == "inconclusive"
    assert "other processes took 50% of the CPUs" in run.outcomes[0]


def test_a_missed_target_fails_only_when_asserted(bench_modules, monkeypatch):
    cases, _ = bench_modules
    monkeypatch.setattr(cases, "cpu_ticks", lambda: None)
    missed = cases.Check("ratio", 1.0, ">=", 2.0)
    _target(cases, {}).conclude("ratio", "onnxruntime", "int8", 64, missed)
    with pytest.raises(pytest.fail.Exception, match="missed: ratio"):
        _target(cases, {}, asserted=True).conclude("ratio", "onnxruntime", "int8", 64, missed)


SYNTHETIC_SUITE = '''
import time

import numpy as np
import pytest

import cases
from cases import Check, Timed, case_name, record

cases.BUSY_LIMIT = 1.0  # this machine's other work must not decide these outcomes


def test_standalone(benchmark):
    record(benchmark, "pipeline", "fake", "onnxruntime", "int8", 1)
    benchmark(time.sleep, 0.001)


@pytest.mark.target
def test_met(benchmark, target_run):
    benchmark(lambda: None)
    target_run.conclude("met", "onnxruntime", "int8", 1, Check("ratio", 3.0, ">=", 2.0))


@pytest.mark.target
def test_missed(benchmark, target_run):
    benchmark(lambda: None)
    target_run.conclude("missed", "onnxruntime", "int8", 1, Check("ratio", 1.0, ">=", 2.0))


@pytest.mark.target
def test_implausible(benchmark, target_run):
    target_run.interleave(Timed(case_name("pipeline", "fake", "onnxruntime", "int8", 1), lambda: time.sleep(0.01)))
    benchmark(lambda: None)
    target_run.conclude("implausible", "onnxruntime", "int8", 1, Check("ratio", 0.01, "<=", 0.3))
'''


@pytest.mark.slow
def test_gating_in_real_pytest_runs(tmp_path):
    """A plain run reports (exit 0); -m target asserts (exit 1 on the missed one), where the implausible timing,
    its standalone case deselected, is checked against timing it alone and passes."""
    for name in ("conftest.py", "cases.py"):
        shutil.copy(ROOT / "bench" / name, tmp_path / name)
    (tmp_path / "test_synthetic.py").write_text(SYNTHETIC_SUITE)
    plain = _pytest(tmp_path, f"--benchmark-json={tmp_path / 'out' / 'RESULTS.json'}", cwd=tmp_path)
    assert plain.returncode == 0, plain.stdout[-3000:]
    statuses = {b["extra_info"]["target"]: b["extra_info"]["status"]
                for b in json.loads((tmp_path / "out" / "RESULTS.json").read_text())["benchmarks"]
                if b["extra_info"]["kind"] == "target"}
    assert statuses == {"met": "met", "missed": "missed", "implausible": "inconclusive"}
    asserted = _pytest(tmp_path, "-m", "target", cwd=tmp_path)
    assert asserted.returncode == 1
    assert "1 failed, 2 passed" in asserted.stdout and "FAILED test_synthetic.py::test_missed" in asserted.stdout


# --------------------------------------------------------------------------------------------------------------
# the edge cases' multiply-accumulates (bench/peak.py)


def _tiny_graph(path):
    """Each counted operator once, at a symbolic batch N, with a head size computed from a Shape (as PyTorch exports
    attention). Per sample: Conv 6x4x4 outputs x (2 channels per group x 3x3) = 1728; ConvTranspose 6x4x4 inputs x
    (3 x 2x2) = 1152; Q.K^T 3x4x4 x 16 = 768; the MatMul with a [16, 5] weight 3x4x5 x 16 = 960; Gemm (transA) 7 x 60
    = 420."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    def weight(name, *shape):
        return numpy_helper.from_array(np.ones(shape, np.float32), name)

    nodes = [helper.make_node("Conv", ["x", "wc"], ["c"], group=2, pads=[1, 1, 1, 1], strides=[2, 2]),
             helper.make_node("ConvTranspose", ["c", "wt"], ["t"], strides=[2, 2]),  # [N, 3, 8, 8]
             helper.make_node("Shape", ["t"], ["t_shape"]),
             helper.make_node("Gather", ["t_shape", "last"], ["t_width"], axis=0),
             helper.make_node("Mul", ["t_width", "t_width"], ["t_area"]),
             helper.make_node("Div", ["t_area", "heads"], ["head_size"]),
             helper.make_node("Concat", ["keep", "heads", "head_size"], ["q_shape"], axis=0),
             helper.make_node("Reshape", ["t", "q_shape"], ["q"]),  # [N, 3, 4, 16]
             helper.make_node("Transpose", ["q"], ["k"], perm=[0, 1, 3, 2]),
             helper.make_node("MatMul", ["q", "k"], ["scores"]),
             helper.make_node("MatMul", ["q", "wm"], ["m"]),  # [N, 3, 4, 5]
             helper.make_node("Flatten", ["m"], ["f"]),
             helper.make_node("Transpose", ["f"], ["ft"], perm=[1, 0]),
             helper.make_node("Gemm", ["ft", "wg"], ["y"], transA=1)]
    constants = [numpy_helper.from_array(np.array(v, np.int64), n)
                 for n, v in (("last", [3]), ("heads", [4]), ("keep", [0, 3]))]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 7]),
                               helper.make_tensor_value_info("scores", TensorProto.FLOAT, None)],
                              [weight("wc", 6, 2, 3, 3), weight("wt", 6, 3, 2, 2), weight("wm", 16, 5),
                               weight("wg", 60, 7), *constants])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_macs_are_counted_from_the_graph_at_each_batch(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    peak = importlib.import_module("peak")
    path = _tiny_graph(tmp_path / "tiny.onnx")
    for batch in (1, 3):
        assert peak.count_macs(path, batch) == {"Conv": 1728 * batch, "ConvTranspose": 1152 * batch,
                                                 "MatMul": (768 + 960) * batch, "Gemm": 420 * batch}
    assert peak.total_macs(path, 3) == 5028 * 3
