"""Issue 21, the build's part: a checkpoint cannot run code, an interrupted build says what is true, and a full or
unwritable disk is one line that leaves --out as it was."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from ume_edge.build import BuildOptions, build
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
    return subprocess.run([sys.executable, "-m", "ume_edge.build", *args], capture_output=True, text=True,
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

