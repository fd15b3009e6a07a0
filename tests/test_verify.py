"""``python -m ume_edge.verify``: a fresh build holds, an engine changed so that only its numbers tell fails naming its
modality, a directory without a record says how to get one, and the record itself is checked like any engine file."""

import json
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from ume_edge import engine_dir, verification
from ume_edge.errors import EngineMismatch
from ume_edge.serve import ServeProcess
from ume_edge.serving.server_config import Endpoints, free_ports


def verify(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ume_edge.verify", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


def with_changed_engine(source, destination, modality: str, factor: float = 1.05):
    """A copy of ``source`` whose ``modality`` engine computes other numbers (its head's weights scaled), with the
    manifest's hash rewritten, so that only the numbers can tell."""
    directory = shutil.copytree(source, destination)
    manifest = engine_dir.load(directory)
    record = manifest.modality(modality)
    path = directory / record.engine.path
    model = onnx.load(path)
    head = next(init for init in model.graph.initializer if init.name == "head.weight")
    head.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(head) * np.float32(factor), head.name))
    onnx.save(model, path)
    record.engine = engine_dir.record_file(directory, path)
    engine_dir.save(directory, manifest)
    engine_dir.load(directory)  # the changed directory is a valid one: only the numbers differ
    return directory


def test_a_fresh_build_holds(int8_engines, tmp_path):
    result = verify(int8_engines, "--json", tmp_path / "verdict.json")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().splitlines()[-1].startswith("holds:")
    report = json.loads((tmp_path / "verdict.json").read_text())
    routes = {(row["route"], row["pattern"]) for row in report["rows"]}
    assert routes == {("encoder", "audio"), ("encoder", "image")} | {
        (route, pattern) for route in verification.ROUTES for pattern in ("audio+image", "audio", "image")}
    assert all(row["holds"] and row["vs_build"] <= 1e-5 for row in report["rows"])


def test_an_engine_changed_numerically_fails_naming_its_modality(int8_engines, tmp_path):
    changed = with_changed_engine(int8_engines, tmp_path / "changed", "image")
    result = verify(changed, "--json", tmp_path / "verdict.json")
    assert result.returncode == 1, result.stdout + result.stderr
    verdict = result.stdout.strip().splitlines()[-1]
    assert verdict.startswith("FAILED: the image engine differs") and "audio+image, image fail" in verdict
    rows = json.loads((tmp_path / "verdict.json").read_text())["rows"]
    failing = {(row["route"], row["pattern"]) for row in rows if not row["holds"]}
    assert failing == {("encoder", "image")} | {(route, pattern) for route in verification.ROUTES
                                                 for pattern in ("audio+image", "image")}


def test_the_tolerances_come_from_what_the_build_measured(int8_engines):
    manifest = engine_dir.load(int8_engines)
    record = manifest.verification
    golden = verification.Golden.load(int8_engines / record.file.path)
    assert record.rows == golden.rows == 32 and set(golden.inputs) == {"audio", "image"}
    for pattern, measured in record.measured_vs_fp32.items():
        assert measured == pytest.approx(np.abs(golden.engines[pattern] - golden.fp32[pattern]).max(), abs=1e-6)
        assert record.tolerance_vs_fp32[pattern] == pytest.approx(measured + record.tolerance_vs_build)
    assert record.tolerance_vs_build == pytest.approx(max(verification.FLOOR["int8"],
                                                          0.25 * max(record.measured_vs_fp32.values())))


def test_a_directory_without_a_record_says_how_to_get_one(int8_engines, tmp_path):
    old = shutil.copytree(int8_engines, tmp_path / "old")
    data = json.loads((old / engine_dir.MANIFEST_FILE).read_text())
    (old / data.pop("verification")["file"]["path"]).unlink()
    data["schema_version"] = 2  # what ume-edge 0.2 wrote: the same manifest, without the record
    (old / engine_dir.MANIFEST_FILE).write_text(json.dumps(data))
    assert engine_dir.load(old).verification is None  # still loads: the runtime serves it as before
    result = verify(old)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and "no verification record" in result.stderr
    assert "Rebuild it with `python -m ume_edge.build`" in result.stderr


def test_a_json_path_that_cannot_be_written_is_refused_before_the_check(int8_engines, tmp_path):
    result = verify(int8_engines, "--json", tmp_path / "missing" / "verdict.json")
    assert result.returncode == 2 and result.stdout == "" and "its folder does not exist" in result.stderr


def test_a_changed_record_is_refused_like_any_engine_file(int8_engines, tmp_path):
    directory = shutil.copytree(int8_engines, tmp_path / "tampered")
    golden = verification.Golden.load(directory / verification.RECORD_FILE)
    golden.engines = {pattern: logits + 1 for pattern, logits in golden.engines.items()}
    golden.save(directory / verification.RECORD_FILE)
    with pytest.raises(EngineMismatch, match="verification.file"):
        engine_dir.load(directory)


def test_the_verdict_names_the_modality_every_failing_pattern_shares():
    assert verification._common_modalities(["audio+image+text", "image+text", "image"],
                                           ["audio", "text", "audio+text"]) == ["image"]
    assert verification._common_modalities(["audio+image"], ["audio", "image"]) == []


@pytest.mark.slow
@pytest.mark.triton
def test_a_served_deployment_of_a_changed_directory_fails(int8_engines, tmp_path):
    pytest.importorskip("pytriton")
    changed = with_changed_engine(int8_engines, tmp_path / "changed", "image")
    with ServeProcess(changed, Endpoints("127.0.0.1", *free_ports(3))) as server:
        served = verify(int8_engines, "--url", server.grpc_url, "--json", tmp_path / "verdict.json")
    assert served.returncode == 1, served.stdout + served.stderr
    assert served.stdout.strip().splitlines()[-1].startswith("FAILED: the image engine differs")
    rows = json.loads((tmp_path / "verdict.json").read_text())["rows"]
    assert {row["route"] for row in rows} == set(verification.ROUTES)  # a server shows no encoder on its own
    assert {row["pattern"] for row in rows if not row["holds"]} == {"audio+image", "image"}


def test_an_unreachable_url_is_one_line(int8_engines):
    result = verify(int8_engines, "--url", f"127.0.0.1:{free_ports(1)[0]}", "--timeout-s", "5")
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "is the server up" in result.stderr
