"""The trtexec lines and the per-major scripts that build plans on a target (issue 9, defect 4): each line uses only
options trtexec of its major version has (``fake_trtexec.ACCEPTED_FLAGS``), TensorRT 10 DLA lines are weakly typed
(trtexec 10 sets kFP16 for --useDLACore, which a strongly typed network refuses), TensorRT 11 lines carry no
precision or typing flags, and the scripts run, with a stand-in trtexec on PATH, only on the TensorRT they are for."""

import shlex
import subprocess

import fake_trtexec
import numpy as np
import onnx
import pytest
from fake_trtexec import ACCEPTED_FLAGS, H100, ORIN, TrtexecError, install_trtexec, parse_plan, path_with, trtexec_calls
from onnx import TensorProto, helper, numpy_helper

from ume_edge.backends.tensorrt.config import BuildConfig
from ume_edge.backends.tensorrt.trtexec import PlanJob, script, trtexec_command

PRECISION_FLAGS = {"--fp16", "--int8", "--best"}


def job(precision="int8", dla_core=None, onnx_path="tensorrt/audio.onnx", **config) -> PlanJob:
    return PlanJob(onnx_path, "audio.plan", {"audio": (1, 40, 48)},
                   BuildConfig(precision=precision, max_batch=16, dla_core=dla_core, **config))


def flags(line: str) -> list[str]:
    return [argument.partition("=")[0] for argument in shlex.split(line)[1:]]


JOBS = {f"{precision}{'-dla' if core is not None else ''}{'-vc' if vc else ''}": job(precision, core,
                                                                                     version_compatible=vc)
        for precision in ("fp32", "fp16", "int8") for core in (None, 1) for vc in (False, True)
        if core is None or precision != "fp32"}


@pytest.mark.parametrize("major", [10, 11])
@pytest.mark.parametrize("name", JOBS)
def test_every_line_uses_only_options_its_trtexec_has(major, name):
    used = flags(trtexec_command(JOBS[name], major))
    assert set(used) <= set(ACCEPTED_FLAGS[major]), set(used) - set(ACCEPTED_FLAGS[major])
    assert len(used) == len(set(used))


def test_tensorrt_10_gpu_lines_are_strongly_typed_without_precision_flags():
    line = trtexec_command(job("int8", timing_cache="cache/h100.cache"), 10)
    assert line == ("trtexec --onnx=tensorrt/audio.onnx --saveEngine=audio.plan --minShapes=audio:1x1x40x48 "
                    "--optShapes=audio:8x1x40x48 --maxShapes=audio:16x1x40x48 --memPoolSize=workspace:1024M "
                    "--timingCacheFile=cache/h100.cache --stronglyTyped")
    for precision in ("fp32", "fp16"):
        assert "--stronglyTyped" in flags(trtexec_command(job(precision), 10))
        assert not PRECISION_FLAGS & set(flags(trtexec_command(job(precision), 10)))


@pytest.mark.parametrize(("precision", "precision_flags"), [("int8", ["--int8", "--fp16"]), ("fp16", ["--fp16"])])
def test_tensorrt_10_dla_lines_are_weakly_typed_with_dla_precisions(precision, precision_flags):
    used = flags(trtexec_command(job(precision, dla_core=1), 10))
    assert "--stronglyTyped" not in used
    assert [f for f in used if f in PRECISION_FLAGS] == precision_flags
    line = trtexec_command(job(precision, dla_core=1), 10)
    assert "--useDLACore=1" in line.split() and "--allowGPUFallback" in line.split()
    assert "--minShapes=audio:16x1x40x48 --optShapes=audio:16x1x40x48 --maxShapes=audio:16x1x40x48" in line


@pytest.mark.parametrize("name", JOBS)
def test_tensorrt_11_lines_carry_no_precision_or_typing_flags(name):
    used = set(flags(trtexec_command(JOBS[name], 11)))
    assert not (PRECISION_FLAGS | {"--stronglyTyped"}) & used
    assert ("--useDLACore" in used) == ("dla" in name) and ("--versionCompatible" in used) == name.endswith("-vc")


def test_lines_quote_paths_for_the_shell():
    line = trtexec_command(job("fp32", onnx_path="my models/a.onnx"), 10)
    assert line.startswith("trtexec '--onnx=my models/a.onnx' --saveEngine=audio.plan ")


# ---------------------------------------------------------------- what trtexec makes of the lines


def audio_onnx(path):
    weight = numpy_helper.from_array(np.ones((1920, 10), np.float32), "weight")
    nodes = [helper.make_node("Flatten", ["audio"], ["flat"], axis=1),
             helper.make_node("MatMul", ["flat", "weight"], ["partial_logits"])]
    graph = helper.make_graph(nodes, "audio", [helper.make_tensor_value_info("audio", TensorProto.FLOAT,
                                                                             ["batch", 1, 40, 48])],
                              [helper.make_tensor_value_info("partial_logits", TensorProto.FLOAT, ["batch", 10])],
                              [weight])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


@pytest.fixture
def target(tmp_path):
    (tmp_path / "tensorrt").mkdir()
    audio_onnx(tmp_path / "tensorrt" / "audio.onnx")
    return tmp_path


def trtexec_builds(line: str, release: str, device, folder) -> fake_trtexec.PlanHeader:
    """The plan the stand-in trtexec of ``release`` builds from ``line`` in ``folder``."""
    arguments = shlex.split(line)[1:]
    options = fake_trtexec._parse_arguments(arguments, int(release.split(".")[0]))
    options["--onnx"] = str(folder / options["--onnx"])
    return fake_trtexec.build_plan(options, release, device)


@pytest.mark.parametrize("name", JOBS)
@pytest.mark.parametrize(("major", "release", "device"), [(10, "10.3.0", ORIN), (11, "11.4.1", ORIN),
                                                          (10, "10.16.1", H100), (11, "11.4.0", H100)])
def test_trtexec_of_the_lines_major_builds_every_line_it_can(target, name, major, release, device):
    line = trtexec_command(JOBS[name], major)
    if "dla" in name and device is H100:
        with pytest.raises(TrtexecError, match="DLA"):
            trtexec_builds(line, release, device, target)
        return
    plan = trtexec_builds(line, release, device, target)
    assert plan.dla == ("dla" in name) and plan.version_compatible == name.endswith("-vc")
    assert not plan.strongly_typed or not {"FP16", "INT8"} & set(plan.builder_flags)


def test_the_stand_in_refuses_what_trtexec_10_refuses(target):
    """The lines before issue 9 combined --useDLACore with --stronglyTyped; trtexec 10 then sets kFP16 and TensorRT
    refuses it on a strongly typed network."""
    old_dla_line = ("trtexec --onnx=tensorrt/audio.onnx --saveEngine=audio.plan --minShapes=audio:4x1x40x48 "
                    "--optShapes=audio:4x1x40x48 --maxShapes=audio:4x1x40x48 --useDLACore=0 --allowGPUFallback "
                    "--stronglyTyped")
    with pytest.raises(TrtexecError, match="kFP16"):
        trtexec_builds(old_dla_line, "10.3.0", ORIN, target)
    with pytest.raises(TrtexecError, match="Unknown option: --fp16"):
        trtexec_builds(trtexec_command(job("fp16", dla_core=0), 10), "11.4.1", ORIN, target)


# ---------------------------------------------------------------- the scripts, run with the stand-in trtexec


def write_scripts(folder, jobs) -> dict[int, object]:
    paths = {}
    for major in (10, 11):
        paths[major] = folder / f"build_plans_trt{major}.sh"
        paths[major].write_text(script(jobs, major, "Then adopt them."))
    return paths


def run_script(path, trtexec_folder) -> subprocess.CompletedProcess:
    return subprocess.run(["sh", str(path)], capture_output=True, text=True, timeout=120,
                          env={"PATH": path_with(trtexec_folder)})


@pytest.mark.parametrize(("major", "release", "device", "dla_core"), [
    (10, "10.3.0", ORIN, 1), (10, "10.7.0", ORIN, 0), (10, "10.16.1", H100, None), (11, "11.4.1", ORIN, 1),
    (11, "11.4.0", H100, None)])
def test_a_script_builds_every_plan_on_the_tensorrt_it_is_for(target, major, release, device, dla_core):
    jobs = [job("int8", dla_core), PlanJob("tensorrt/audio.onnx", "sub/audio16.plan", {"audio": (1, 40, 48)},
                                           BuildConfig(precision="fp16", max_batch=4, dla_core=dla_core))]
    scripts = write_scripts(target, jobs)
    bin_folder = target / "bin"
    install_trtexec(bin_folder, release, device)
    result = run_script(scripts[major], bin_folder)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().splitlines()[-1] == "done. Then adopt them."
    for plan in ("audio.plan", "sub/audio16.plan"):
        header, _ = parse_plan((target / plan).read_bytes())
        assert header.tensorrt == release and header.dla == (dla_core is not None)
    calls = trtexec_calls(bin_folder)
    assert calls[0] == ["--help"] and [c[1] for c in calls[1:]] == ["--saveEngine=audio.plan",
                                                                    "--saveEngine=sub/audio16.plan"]


@pytest.mark.parametrize(("major", "release", "dla_core", "wanted"), [
    (10, "11.4.1", None, "TensorRT 10.x (trtexec v100000 to v109999); trtexec here is v110401"),
    (11, "10.16.1", None, "TensorRT 11.x (trtexec v110000 to v119999); trtexec here is v101601"),
    (10, "10.8.0", 0, "TensorRT 10.x with DLA (trtexec v100000 to v100799); trtexec here is v100800"),
    (11, "11.4.0", 0, "TensorRT 11.x with DLA (trtexec v110401 to v119999); trtexec here is v110400"),
])
def test_a_script_refuses_a_trtexec_of_another_version_before_building(target, major, release, dla_core, wanted):
    scripts = write_scripts(target, [job("int8", dla_core)])
    bin_folder = target / "bin"
    install_trtexec(bin_folder, release, ORIN)
    result = run_script(scripts[major], bin_folder)
    assert result.returncode == 1
    assert f"error: this script is for {wanted}. Use the script for your TensorRT version." in result.stderr
    assert trtexec_calls(bin_folder) == [["--help"]] and not (target / "audio.plan").exists()
