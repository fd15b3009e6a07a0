"""The wheel, installed with no extras into a fresh virtual environment, brings no torch; there, outside the checkout,
``Pipeline`` and ``ume-edge verify`` run an engine directory built by the development environment, ``ume-edge
--help`` lists the verbs, ``ume-edge build`` names the extra it needs, and nothing is written into site-packages."""

import json
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import numpy as np
import pytest

from ume_edge.data import load
from ume_edge.runtime import Pipeline

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
ROWS = 16
PIPELINE_SCRIPT = """
import json, sys
import numpy as np
import ume_edge
from ume_edge.data import load
from ume_edge.runtime import Pipeline

inputs, _ = load("avdigits", "test")
batch = {name: x[:ROWS] for name, x in inputs.items()}
with Pipeline.load(sys.argv[1]) as pipeline:
    both = pipeline.infer(batch)
    image_only = pipeline.infer({**batch, "audio": None})
print(json.dumps({"package": ume_edge.__file__, "torch_imported": "torch" in sys.modules,
                  "both": both.logits.tolist(), "image_only": image_only.logits.tolist()}))
""".replace("ROWS", str(ROWS))


def _run(command: list, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}  # so that any file in site-packages is one ume-edge wrote
    env.pop("PYTHONPATH", None)
    return subprocess.run([str(part) for part in command], capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=timeout)


def _wheel(work: Path) -> Path:
    """Built from a copy of the working tree, so that no build output lands in the checkout."""
    source = work / "source"
    shutil.copytree(ROOT / "ume_edge", source / "ume_edge", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    built = _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                  work / "wheel", source], cwd=work)
    assert built.returncode == 0, built.stderr
    return next((work / "wheel").glob("ume_edge-*.whl"))


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The fresh environment's bin/ folder."""
    work = tmp_path_factory.mktemp("install")
    wheel = _wheel(work)
    venv.create(work / "venv", with_pip=False)
    bin_dir = work / "venv" / "bin"
    installing = _run([sys.executable, "-m", "pip", "--python", bin_dir / "python", "install", "-q", "--no-compile",
                       wheel], cwd=work, timeout=600)
    assert installing.returncode == 0, installing.stderr
    return bin_dir


@pytest.fixture
def engines(int8_engines, tmp_path) -> Path:
    return Path(shutil.copytree(int8_engines, tmp_path / "reference-int8"))


def _package_files(bin_dir: Path) -> set[Path]:
    site_packages = next((bin_dir.parent / "lib").glob("python3.*/site-packages"))
    return set(site_packages.rglob("*"))


def test_the_core_install_has_no_torch(installed, tmp_path):
    for module in ("torch", "onnxconverter_common"):
        script = f"import importlib.util; print(importlib.util.find_spec({module!r}))"
        found = _run([installed / "python", "-c", script], cwd=tmp_path)
        assert found.stdout.strip() == "None", f"{module} is installed: {found.stdout}{found.stderr}"


def test_ume_edge_help_lists_the_verbs(installed, tmp_path):
    result = _run([installed / "ume-edge", "--help"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    listed = [line.split()[0] for line in result.stdout.splitlines() if line.startswith("  ")]
    assert listed == ["build", "serve", "triton-repo", "client", "ros2", "verify", "bench", "train"]


def test_a_pipeline_infers_there_as_in_development(installed, engines, tmp_path):
    before = _package_files(installed)
    result = _run([installed / "python", "-c", PIPELINE_SCRIPT, engines], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert Path(answer["package"]).is_relative_to(installed.parent) and not answer["torch_imported"]
    inputs, _ = load("avdigits", "test")
    batch = {name: x[:ROWS] for name, x in inputs.items()}
    with Pipeline.load(engines) as pipeline:
        np.testing.assert_allclose(answer["both"], pipeline.infer(batch).logits, atol=1e-5)
        np.testing.assert_allclose(answer["image_only"], pipeline.infer({**batch, "audio": None}).logits, atol=1e-5)
    assert _package_files(installed) == before


def test_verify_holds_there(installed, engines, tmp_path):
    before = _package_files(installed)
    result = _run([installed / "ume-edge", "verify", engines], cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert _package_files(installed) == before


def test_build_names_the_extra_it_needs(installed, tmp_path):
    before = _package_files(installed)
    result = _run([installed / "ume-edge", "build"], cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines()[-1] == ("error: building engines needs PyTorch, which is not installed: "
                                              "pip install 'ume-edge[build]'")
    assert "Traceback" not in result.stderr and not (tmp_path / "engines").exists()
    assert _package_files(installed) == before
