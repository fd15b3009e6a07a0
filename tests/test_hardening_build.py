"""Issue 21, the build's part: a checkpoint cannot run code, an interrupted build says what is true, and a full or
unwritable disk is one line that leaves --out as it was."""

import os
import resource
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

from ume_edge import engine_dir
from ume_edge.build import BuildOptions, build, cli
from ume_edge.build.cli import main
from ume_edge.engine_dir import publishing
from ume_edge.model import ConvEncoder, Modality, UMEModel, UntrustedEncoder

ENCODER_MODULE = '''
import torch


class PlainEncoder(torch.nn.Module):
    def __init__(self, size, feature_dim):
        super().__init__()
        self.init_kwargs = dict(size=size, feature_dim=feature_dim)
        self.linear = torch.nn.Linear(size, feature_dim)

    def forward(self, x):
        return torch.relu(self.linear(x))


def not_a_class():
    return None
'''


def _cli(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "ume_edge.build", *args], capture_output=True, text=True, check=False,
                          timeout=300, **kwargs)


def _one_line_error(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert lines[-1].startswith("error: ") and len([line for line in lines if line.startswith("error")]) == 1
    return lines[-1]


@pytest.fixture
def tiny_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = UMEModel([Modality("image", ConvEncoder(1, (8, 8), (4,), 8), (1, 8, 8), "float32", 8)], 3, name="tiny")
    model.save(tmp_path / "tiny.pt")
    np.savez(tmp_path / "calib.npz", image=np.random.default_rng(0).normal(size=(32, 1, 8, 8)).astype(np.float32))
    return tmp_path / "tiny.pt"


def _with_encoder(checkpoint, out, encoder: str, kwargs: dict):
    """``checkpoint`` as UMEModel.save wrote it, its first encoder replaced: what an attacker hands over."""
    saved = torch.load(checkpoint, weights_only=True)
    saved["architecture"]["modalities"][0].update(encoder=encoder, encoder_kwargs=kwargs)
    torch.save(saved, out)
    return out


@pytest.fixture
def encoder_module(tmp_path, monkeypatch):
    (tmp_path / "my_encoders.py").write_text(ENCODER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "my_encoders", raising=False)
    return tmp_path


# ---------------------------------------------------------------------------------------------------------------
# 1. a checkpoint names code


def test_a_checkpoint_naming_a_foreign_callable_runs_nothing_and_says_how_to_trust_it(tiny_checkpoint, tmp_path):
    marker = tmp_path / "ran"
    evil = _with_encoder(tiny_checkpoint, tmp_path / "evil.pt", "subprocess:run", {"args": ["touch", str(marker)]})
    line = _one_line_error(_cli("--model", str(evil), "--out", str(tmp_path / "out")))
    assert not marker.exists()
    assert "names encoder 'subprocess:run', which is not one of ume-edge's" in line
    assert "--trust-encoder subprocess:run" in line
    assert not (tmp_path / "out").exists()


def test_a_trusted_name_that_is_not_a_module_class_is_refused(tiny_checkpoint, tmp_path):
    marker = tmp_path / "ran"
    evil = _with_encoder(tiny_checkpoint, tmp_path / "evil.pt", "subprocess:run", {"args": ["touch", str(marker)]})
    line = _one_line_error(_cli("--model", str(evil), "--trust-encoder", "subprocess:run",
                                "--out", str(tmp_path / "out")))
    assert not marker.exists()
    assert "'subprocess:run' is not a torch.nn.Module class" in line


def test_a_malformed_trust_encoder_is_a_usage_error():
    result = _cli("--trust-encoder", "subprocess.run")
    assert result.returncode == 2 and "expected module:Class" in result.stderr


def test_the_library_refuses_before_importing_the_named_module(tiny_checkpoint, tmp_path, encoder_module):
    named = _with_encoder(tiny_checkpoint, tmp_path / "named.pt", "my_encoders:PlainEncoder", {"size": 4})
    with pytest.raises(UntrustedEncoder, match=r"trusted_encoders=\['my_encoders:PlainEncoder'\]"):
        UMEModel.load(named)
    assert "my_encoders" not in sys.modules


def test_a_trusted_encoder_of_ones_own_round_trips(tmp_path, encoder_module):
    from my_encoders import PlainEncoder

    model = UMEModel([Modality("vector", PlainEncoder(4, 6), (4,), "float32", 6)], 3, name="own")
    model.save(tmp_path / "own.pt")
    with pytest.raises(UntrustedEncoder):
        UMEModel.load(tmp_path / "own.pt")
    loaded = UMEModel.load(tmp_path / "own.pt", trusted_encoders=["my_encoders:PlainEncoder"])
    x = {"vector": torch.rand(5, 4)}
    with torch.no_grad():
        assert torch.equal(model.eval()(x), loaded(x))


def test_ume_edges_own_encoders_need_no_trust(tiny_checkpoint):
    assert UMEModel.load(tiny_checkpoint).modality_names == ["image"]


@pytest.mark.slow
def test_build_accepts_a_checkpoint_whose_encoder_the_user_trusts(tmp_path, encoder_module):
    from my_encoders import PlainEncoder

    UMEModel([Modality("vector", PlainEncoder(4, 6), (4,), "float32", 6)], 3, name="own").save(tmp_path / "own.pt")
    np.savez(tmp_path / "calib.npz", vector=np.random.default_rng(0).normal(size=(32, 4)).astype(np.float32))
    result = _cli("--model", str(tmp_path / "own.pt"), "--trust-encoder", "my_encoders:PlainEncoder",
                  "--calib-data", str(tmp_path / "calib.npz"), "--precision", "fp32", "--out", str(tmp_path / "out"),
                  env={**os.environ, "PYTHONPATH": os.pathsep.join([str(encoder_module), *sys.path])})
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out" / "vector.onnx").is_file()



# ---------------------------------------------------------------------------------------------------------------
# 2. Ctrl-C at the end of a build


def _build_args(checkpoint, out):
    return ["--model", str(checkpoint), "--calib-data", str(checkpoint.with_name("calib.npz")), "--precision", "fp32",
            "--out", str(out)]


def _interrupted_main(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 130
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_ctrl_c_while_the_summary_prints_says_the_build_was_published(tiny_checkpoint, tmp_path, monkeypatch,
                                                                      capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "format_summary", interrupted)
    out = tmp_path / "out"
    line = _interrupted_main(_build_args(tiny_checkpoint, out), capsys)
    assert line.startswith("interrupted after the build completed") and f"published at {out}" in line
    assert "nothing was written" not in line
    assert engine_dir.load(out).model.name == "tiny"


def test_ctrl_c_during_the_publish_waits_for_it_and_says_so(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    publish = publishing.publish

    def publish_then_ctrl_c(staging, out):
        publish(staging, out)
        os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(publishing, "publish", publish_then_ctrl_c)
    out = tmp_path / "out"
    line = _interrupted_main(_build_args(tiny_checkpoint, out), capsys)
    assert f"published at {out}" in line
    assert engine_dir.load(out).model.name == "tiny"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_ctrl_c_before_the_publish_keeps_the_previous_build(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    out = build(BuildOptions(model=str(tiny_checkpoint), calib_data=str(tmp_path / "calib.npz"), precision="fp32",
                             out=tmp_path / "out"))
    before = (out / engine_dir.MANIFEST_FILE).read_text()

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(engine_dir, "save", interrupted)
    line = _interrupted_main(_build_args(tiny_checkpoint, out), capsys)
    assert line == "interrupted: nothing was written; --out is as it was"
    assert (out / engine_dir.MANIFEST_FILE).read_text() == before
    assert [path.name for path in tmp_path.iterdir() if ".tmp-" in path.name] == []


# ---------------------------------------------------------------------------------------------------------------
# 3. a disk that refuses a write


def _build_with_file_size_limit(limit: int, *args):
    """The build command in a process whose files cannot grow past ``limit`` bytes: writes then fail with EFBIG
    (SIGXFSZ ignored), or come up short, as on a disk that fills up."""
    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return _cli(*args, preexec_fn=limit_file_size)


def _no_staging_left(folder):
    assert [path.name for path in folder.iterdir() if ".tmp-" in path.name] == []


@pytest.mark.slow
def test_a_file_size_limit_is_one_line_and_keeps_the_previous_build(tiny_checkpoint, tmp_path):
    out = build(BuildOptions(model=str(tiny_checkpoint), calib_data=str(tmp_path / "calib.npz"), precision="fp32",
                             out=tmp_path / "out"))
    before = (out / engine_dir.MANIFEST_FILE).read_text()
    line = _one_line_error(_build_with_file_size_limit(3000, *_build_args(tiny_checkpoint, out)))
    assert line.startswith(f"error: file too large (the file system's or `ulimit -f`'s limit) while writing {out}")
    assert line.endswith(f"raise the limit or choose another --out; {out} is as it was")
    assert (out / engine_dir.MANIFEST_FILE).read_text() == before
    _no_staging_left(tmp_path)


@pytest.mark.slow
def test_a_write_cut_short_is_named_as_the_cause(tiny_checkpoint, tmp_path):
    args = [*_build_args(tiny_checkpoint, tmp_path / "out")]
    args[args.index("fp32")] = "int8"  # the calibration samples are the largest file numpy writes
    line = _one_line_error(_build_with_file_size_limit(6000, *args))
    assert "a write was cut short (the disk is full or a file-size limit was reached)" in line
    assert not (tmp_path / "out").exists()
    _no_staging_left(tmp_path)


@pytest.fixture
def tiny_disk(tmp_path):
    """A 12 KiB tmpfs: the tiny model's ONNX files fill it while the build copies them into place."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12k", "tmpfs", str(disk)], capture_output=True,
                             text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({mounted.stderr.strip()}); the file-size-limit tests cover "
                    "the rest")
    yield disk
    subprocess.run(["umount", str(disk)], check=True)


@pytest.mark.slow
def test_a_full_disk_in_a_late_stage_is_one_line(tiny_checkpoint, tiny_disk):
    line = _one_line_error(_cli(*_build_args(tiny_checkpoint, tiny_disk / "out")))
    assert line.startswith(f"error: no space left on device while writing {tiny_disk / 'out'}")
    assert "free space there or choose another --out" in line
    assert list(tiny_disk.iterdir()) == []


class RunsCodeWhenUnpickled:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_pickle_that_runs_code_is_refused_without_advice_to_unpickle_it(tmp_path):
    marker = tmp_path / "ran"
    torch.save({"format": "ume-edge-checkpoint/1", "architecture": RunsCodeWhenUnpickled(marker)}, tmp_path / "p.pt")
    line = _one_line_error(_cli("--model", str(tmp_path / "p.pt"), "--out", str(tmp_path / "out")))
    assert not marker.exists()
    assert "not a ume-edge checkpoint (torch cannot read it as tensors and plain data: UnpicklingError)" in line
    assert "weights_only" not in line
