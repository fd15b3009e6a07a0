"""The benchmark suites run (with CI's fast settings) and the report turns their JSON into a table and plots."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # runs the benchmark suites
FAST = ["--benchmark-min-rounds=1", "--benchmark-max-time=0.0005", "--benchmark-warmup=off"]


@pytest.fixture(scope="module")
def results(tmp_path_factory, int8_engines):
    path = tmp_path_factory.mktemp("bench") / "RESULTS.json"
    run = subprocess.run([sys.executable, "-m", "pytest", "bench/", "-m", "not target", "-q", "-p", "no:cacheprovider",
                          f"--benchmark-json={path}", *FAST], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return path


def _report(*args):
    return subprocess.run([sys.executable, "-m", "ume_edge.bench", "report", *map(str, args)],
                          capture_output=True, text=True, timeout=120)


def test_every_benchmark_records_its_case(results):
    benchmarks = json.loads(results.read_text())["benchmarks"]
    kinds = {b["extra_info"]["kind"] for b in benchmarks}
    assert {"engine", "pipeline"} <= kinds
    for bench in benchmarks:
        assert {"kind", "target", "backend", "precision", "batch"} <= set(bench["extra_info"]), bench["name"]
    pipeline_cases = {(b["extra_info"]["target"], b["extra_info"]["backend"], b["extra_info"]["batch"])
                      for b in benchmarks if b["extra_info"]["kind"] == "pipeline"}
    for pattern in ("audio+image", "audio", "image"):
        for batch in (1, 8, 64):
            assert {(pattern, "onnxruntime", batch), (pattern, "pytorch", batch)} <= pipeline_cases


def test_report_writes_a_table_and_plots(results, tmp_path):
    result = _report(results, "--out", tmp_path)
    assert result.returncode == 0, result.stderr
    text = (tmp_path / "REPORT.md").read_text()
    assert "| pipeline | audio+image | onnxruntime | int8 | 64 |" in text
    assert "x PyTorch fp32" in text and "accuracy" in text
    assert "faster" in text and "absent" in text  # the headline answers a newcomer's two questions
    for plot in ("latency_per_pattern.png", "throughput_vs_batch.png"):
        assert (tmp_path / plot).stat().st_size > 5000
        assert f"]({plot})" in text


def test_compare_marks_regressions(results, tmp_path):
    old = json.loads(results.read_text())
    for bench in old["benchmarks"]:
        bench["stats"]["median"] /= 3  # the old run was three times faster everywhere
    (tmp_path / "old.json").write_text(json.dumps(old))
    result = _report(results, "--out", tmp_path, "--compare", tmp_path / "old.json")
    assert result.returncode == 1
    assert "REGRESSION" in (tmp_path / "REPORT.md").read_text()
    assert _report(results, "--out", tmp_path, "--compare", results).returncode == 0


def test_report_on_a_missing_file_says_how_to_make_one(tmp_path):
    result = _report(tmp_path / "none.json")
    assert result.returncode == 2 and "--benchmark-json" in result.stderr
