"""``python -m ume_edge.triton_repo`` decides before it writes and swaps the whole set in: a refused, failed or killed
run leaves the repository exactly as it was (or, once it got through, fully new), and a bad ``--out`` is one line."""

import hashlib
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from killed_after_step import run_killed_after  # tests/killed_after_step.py

from ume_edge.serving import repository, repository_swap


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "ume_edge.triton_repo", *map(str, args)], capture_output=True,
                          text=True, timeout=120)


def _one_line_error(result):
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def _tree_hash(folder: Path) -> str:
    """Every entry's path, kind and bytes."""
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        kind = "link" if path.is_symlink() else "dir" if path.is_dir() else "file"
        digest.update(f"{path.relative_to(folder)}\0{kind}\0".encode())
        if kind == "file":
            digest.update(path.read_bytes())
    return digest.hexdigest()


def _hidden(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


@pytest.fixture
def old_repository(int8_engines, tmp_path):
    """A repository from an earlier run (Python-backend models, so the next default run differs in every model),
    beside a model of the user's own."""
    out = tmp_path / "triton_models"
    repository.write_repository(int8_engines, out, encoder_backend="python")
    mine = out / "my_model"
    (mine / "1").mkdir(parents=True)
    (mine / "config.pbtxt").write_text('name: "my_model"\nbackend: "python"\n')
    (mine / "1" / "model.py").write_text("# months of work\n")
    return out


def test_a_user_model_in_the_way_is_refused_before_anything_is_written(int8_engines, old_repository):
    shutil.rmtree(old_repository / "ume")
    (old_repository / "ume" / "1").mkdir(parents=True)
    (old_repository / "ume" / "config.pbtxt").write_text('name: "ume"\nbackend: "python"\n')
    (old_repository / "ume" / "1" / "model.py").write_text("# the user's own entry model\n")
    before = _tree_hash(old_repository)
    result = _cli("--engines", int8_engines, "--out", old_repository)
    assert _tree_hash(old_repository) == before  # the older encoder folders too
    line = _one_line_error(result)
    assert f"{old_repository / 'ume'} exists and was not written by ume-edge; nothing was written" in line
    assert _hidden(old_repository.parent) == []


def test_a_rewrite_replaces_only_its_own_models_and_leaves_nothing_hidden(int8_engines, old_repository):
    mine = _tree_hash(old_repository / "my_model")
    result = _cli("--engines", int8_engines, "--out", old_repository)
    assert result.returncode == 0, result.stderr
    assert (old_repository / "ume_audio" / "1" / "model.onnx").is_file()
    assert not (old_repository / "ume_audio" / "1" / "model.py").exists()  # the old Python model is gone whole
    assert _tree_hash(old_repository / "my_model") == mine
    assert _hidden(old_repository.parent) == [] and _hidden(old_repository) == []


@pytest.mark.slow
def test_a_user_script_named_like_a_build_script_is_refused(tmp_path):
    """An export-only TensorRT directory's repository gets build_plans_trt<major>.sh at the top: a user's file of that
    name is not replaced either."""
    from ume_edge.build import BuildOptions, build

    exported = build(BuildOptions(backend="tensorrt", export_only=True, precision="int8", max_batch=4,
                                  out=tmp_path / "export"))
    out = tmp_path / "triton_models"
    repository.write_repository(exported, out)
    (out / "build_plans_trt10.sh").write_text("#!/bin/sh\necho my own build\n")
    before = _tree_hash(out)
    line = _one_line_error(_cli("--engines", exported, "--out", out, "--max-queue-delay-us", 500))
    assert f"{out / 'build_plans_trt10.sh'} exists and was not written by ume-edge" in line
    assert _tree_hash(out) == before
    assert _hidden(tmp_path) == []


def _limit_file_size():
    resource.setrlimit(resource.RLIMIT_FSIZE, (600_000, 600_000))  # the 1 MB audio encoder cannot be copied


def test_a_write_failure_midway_leaves_the_repository_as_it_was(int8_engines, old_repository):
    before = _tree_hash(old_repository)
    result = subprocess.run([sys.executable, "-m", "ume_edge.triton_repo", "--engines", str(int8_engines), "--out",
                             str(old_repository)], capture_output=True, text=True, timeout=120,
                            preexec_fn=_limit_file_size)  # Python ignores SIGXFSZ: the write fails with EFBIG
    line = _one_line_error(result)
    assert "File too large" in line and "it was left as it was" in line
    assert _tree_hash(old_repository) == before
    assert _hidden(old_repository.parent) == []


def test_out_is_an_existing_file(int8_engines, tmp_path):
    target = tmp_path / "models.tar"
    target.write_bytes(b"an archive")
    line = _one_line_error(_cli("--engines", int8_engines, "--out", target))
    assert "is a file, not a folder" in line
    assert target.read_bytes() == b"an archive"
    line = _one_line_error(_cli("--engines", int8_engines, "--out", target / "triton_models"))
    assert f"{target} is a file, not a folder" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models.tar"]


@pytest.fixture
def read_only_folder(tmp_path):
    """A read-only tmpfs (root ignores permission bits); /sys where this sandbox refuses to mount."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro", "tmpfs", str(folder)], capture_output=True).returncode:
        yield Path("/sys")
        return
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def test_out_that_is_a_mount_point_is_rewritten_in_place(int8_engines, tmp_path):
    """A rename cannot cross file systems: for an ``--out`` that is its own mount (a container volume), the staging
    folder goes inside it, and is gone afterwards."""
    out = tmp_path / "volume"
    out.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(out)], capture_output=True).returncode:
        pytest.skip("this sandbox refuses to mount a tmpfs")
    try:
        repository.write_repository(int8_engines, out, encoder_backend="python")
        result = _cli("--engines", int8_engines, "--out", out)
        assert result.returncode == 0, result.stderr
        audio = out / "ume_audio" / "1"
        assert (audio / "model.onnx").is_file() and not (audio / "model.py").exists()
        assert _hidden(out) == [] and _hidden(tmp_path) == []
    finally:
        subprocess.run(["umount", str(out)], check=True)


def test_out_on_a_read_only_file_system_is_one_line(int8_engines, read_only_folder):
    line = _one_line_error(_cli("--engines", int8_engines, "--out", read_only_folder / "triton_models"))
    assert "cannot be written" in line or "choose a folder you can write to" in line
    assert not (read_only_folder / "triton_models").exists()


# A rewrite of the repository, counting its steps (a file copied while it builds, a rename, replace or exchange while
# it swaps). What the next run does first must then leave the old repository or the new one, whole.
_REWRITE = """
    import shutil
    from ume_edge import engine_dir
    from ume_edge.serving import repository

    engines, out, atomic = ARGS[0], ARGS[1], ARGS[2] == "1"
    os.rename, os.replace, shutil.copyfile = counted(os.rename), counted(os.replace), counted(shutil.copyfile)
    engine_dir.exchange = counted(engine_dir.exchange) if atomic else (lambda a, b: False)
    repository.write_repository(engines, out)
"""


@pytest.mark.slow
@pytest.mark.parametrize("atomic", [True, False], ids=["exchange", "no-exchange"])
def test_a_run_killed_at_any_step_leaves_the_old_or_the_new_repository(int8_engines, old_repository, tmp_path, atomic):
    new = tmp_path / "new"
    repository.write_repository(int8_engines, new)
    shutil.copytree(old_repository / "my_model", new / "my_model")
    old_hash, new_hash = _tree_hash(old_repository), _tree_hash(new)
    kill_after, completed = 1, False
    while not completed and kill_after < 40:
        work = tmp_path / f"step{kill_after}"
        out = work / "triton_models"
        shutil.copytree(old_repository, out)
        completed = run_killed_after(_REWRITE, kill_after, int8_engines, out, "1" if atomic else "0")
        repository_swap.recover_interrupted(out)  # what the next run does first
        assert _tree_hash(out) in (old_hash, new_hash), f"killed after step {kill_after}"
        assert _hidden(work) == [] and _hidden(out) == [], f"killed after step {kill_after}"
        kill_after += 1
    assert completed and kill_after > 10
