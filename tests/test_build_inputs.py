"""Every build input a user can get wrong is refused with one line naming the file, modality or option and what to
do, before anything is written; and default engine directories never collide."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ume_edge import engine_dir
from ume_edge.build import BuildOptions, build, ensure_default_engines
from ume_edge.build.inputs import DEFAULT_CALIB, read_data
from ume_edge.build.stages import default_out
from ume_edge.errors import BackendUnavailable, BuildError


def _calib():
    return read_data(DEFAULT_CALIB, "calibration").inputs


def _npz(path, **arrays):
    np.savez(path, **arrays)
    return str(path)


def _with(arrays, **changes):
    return {**arrays, **changes}


def _nan_rows(array, rows):
    array = array.copy()
    array[rows, 0, 0, 0] = np.nan
    return array


@pytest.fixture(scope="module")
def calib():
    return _calib()


CASES = {
    "a garbage checkpoint": (lambda d, c: dict(model=str(_write(d / "m.pt", b"not a checkpoint"))),
                             r"--model .*m.pt: not a checkpoint written by `python -m ume_edge.train`"),
    "a torch file that is no checkpoint": (lambda d, c: dict(model=str(_torch(d / "m.pt"))),
                                           r"not a ume-edge checkpoint"),
    "a missing checkpoint": (lambda d, c: dict(model=str(d / "none.pt")), r"none.pt: no such checkpoint"),
    "a factory that raises": (lambda d, c: dict(model=_factory(d, "raise RuntimeError('broke')")),
                              r"the factory failed \(RuntimeError: broke\)"),
    "a factory of the wrong type": (lambda d, c: dict(model=_factory(d, "return 42")),
                                    r"returned int, expected a UMEModel"),
    "a factory with a syntax error": (lambda d, c: dict(model=_factory(d, "return (")), r"f.py, line \d+"),
    "an .npy as calibration data": (lambda d, c: dict(calib_data=_npy(d)), r"is not an .npz archive \(an .npy"),
    "a text file as calibration data": (lambda d, c: dict(calib_data=str(_write(d / "c.npz", b"text"))),
                                        r"c.npz is not an .npz archive"),
    "NaN in calibration data": (lambda d, c: dict(calib_data=_npz(d / "c.npz", **_with(
        c, image=_nan_rows(c["image"], [3, 7])))), r"modality 'image': calibration data .* NaN or Inf in 2 row"),
    "no calibration rows": (lambda d, c: dict(calib_data=_npz(d / "c.npz", **{k: v[:0] for k, v in c.items()})),
                            r"calibration data .* has no rows"),
    "one calibration sample": (lambda d, c: dict(calib_data=_npz(d / "c.npz", **{k: v[:1] for k, v in c.items()})),
                               r"has 1 sample\(s\); INT8 ranges need at least 16"),
    "modalities of different lengths": (lambda d, c: dict(calib_data=_npz(d / "c.npz", **_with(
        c, audio=c["audio"][:50]))), r"different numbers of rows \{'audio': 50, 'image': 200\}"),
    "labels of the wrong length": (lambda d, c: dict(eval_data=_npz(d / "e.npz", **c, labels=np.zeros(5, int))),
                                   r"`labels` has shape \[5\], expected \[200\]"),
    "labels outside the classes": (lambda d, c: dict(eval_data=_npz(d / "e.npz", **c, labels=np.full(200, 12))),
                                   r"200 label\(s\) outside 0..9"),
    "labels that are not integers": (lambda d, c: dict(eval_data=_npz(d / "e.npz", **c, labels=np.zeros(200))),
                                     r"`labels` are float64; give integer class indices"),
    "NaN in evaluation data": (lambda d, c: dict(eval_data=_npz(d / "e.npz", **_with(
        c, audio=_nan_rows(c["audio"], [0])))), r"modality 'audio': evaluation data .* NaN or Inf in 1 row"),
    "no evaluation rows": (lambda d, c: dict(eval_data=_npz(d / "e.npz", **{k: v[:0] for k, v in c.items()})),
                           r"evaluation data .* has no rows"),
    "labels at chance": (lambda d, c: dict(eval_data=_npz(d / "e.npz", **c, labels=np.random.default_rng(0).integers(
        0, 10, 200))), r"no better than chance .* --allow-chance-accuracy"),
    "a negative --max-drop": (lambda d, c: dict(max_drop=-1.0), r"--max-drop is points of accuracy .* not -1.0"),
    "a NaN --max-drop": (lambda d, c: dict(max_drop=float("nan")), r"--max-drop"),
    "--max-batch 0": (lambda d, c: dict(max_batch=0), r"--max-batch must be at least 1"),
    "fp16 on ONNX Runtime": (lambda d, c: dict(precision="fp16", backend="onnxruntime"),
                             r"fp16 is not a precision of onnxruntime"),
    "--export-only for ONNX Runtime": (lambda d, c: dict(export_only=True, backend="onnxruntime"),
                                       r"--export-only .* Use --export-only with --backend tensorrt"),
    "--out under a file": (lambda d, c: dict(out=_write(d / "f", b"x") / "engines"), r"is a file, not a folder"),
    "--out unwritable": (lambda d, c: dict(out=Path("/proc/ume-edge/engines")), r"cannot write in /proc"),
}


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


def _torch(path):
    torch.save({"weights": torch.zeros(3)}, path)
    return path


def _npy(folder):
    np.save(folder / "c.npy", np.zeros((8, 1, 28, 28), np.float32))
    return str(folder / "c.npy")


def _factory(folder, body):
    (folder / "f.py").write_text(f"def build():\n    {body}\n")
    return f"{folder / 'f.py'}:build"


@pytest.mark.parametrize("case", list(CASES))
def test_a_bad_input_is_one_build_error_and_nothing_is_written(case, calib, tmp_path):
    make, message = CASES[case]
    work = tmp_path / "work"
    work.mkdir()
    options = {"out": tmp_path / "out", **make(work, calib)}
    with pytest.raises(BuildError, match=message) as raised:
        build(BuildOptions(**options))
    assert "\n" not in str(raised.value)
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_tensorrt_without_tensorrt_is_one_line_with_what_to_do():
    with pytest.raises(BackendUnavailable, match=r"pip install 'ume-edge\[tensorrt\]'.* --export-only"):
        build(BuildOptions(backend="tensorrt"))


def test_the_command_line_answers_a_bad_input_in_one_line(tmp_path):
    np.save(tmp_path / "c.npy", np.zeros((8, 1, 28, 28), np.float32))
    result = subprocess.run([sys.executable, "-m", "ume_edge.build", "--calib-data", str(tmp_path / "c.npy"),
                             "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: calibration data {tmp_path / 'c.npy'}")


def test_help_shows_every_default():
    result = subprocess.run([sys.executable, "-m", "ume_edge.build", "--help"], capture_output=True, text=True)
    entries = result.stdout.split("\n  -")[1:]
    assert len(entries) >= 17
    for entry in entries:
        assert entry.startswith("h, --help") or "default" in " ".join(entry.split()), entry


# ---------------------------------------------------------------------------------------------------------------
# default engine directories never collide


@pytest.mark.slow
def test_another_model_named_like_the_reference_never_replaces_the_reference_build(tmp_path, int8_engines):
    from ume_edge.model import load_reference

    model = load_reference()
    with torch.no_grad():
        model.heads["audio"].bias += 1.0  # a user's own AV-Digits model: same name, other weights
    model.save(tmp_path / "avdigits.pt")
    before = engine_dir.load(int8_engines)
    out = build(BuildOptions(model=str(tmp_path / "avdigits.pt"), precision="fp32", out=None))
    try:
        assert out != int8_engines and out.name.startswith("avdigits-") and out.name.endswith("-fp32-onnxruntime")
        assert engine_dir.load(int8_engines) == before
        assert engine_dir.load(out).model.source == str(tmp_path / "avdigits.pt")
    finally:
        import shutil

        shutil.rmtree(out)


def test_default_names_separate_precision_backend_and_export_only():
    names = {default_out("reference", p, b, e).name for p in ("int8", "fp32") for b in ("onnxruntime", "tensorrt")
             for e in (False, True)}
    assert len(names) == 8


@pytest.mark.slow
def test_stale_default_engines_are_rebuilt(int8_engines, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = ensure_default_engines("fp32")
    assert out.parent == tmp_path / "engines"
    manifest = engine_dir.load(out)
    data = manifest.to_json()
    data["versions"]["onnxruntime"] = "0.1.0"  # as after an upgrade of ONNX Runtime
    engine_dir.save(out, engine_dir.parse_manifest(data))
    assert ensure_default_engines("fp32") == out
    assert engine_dir.load(out).versions["onnxruntime"] != "0.1.0"
