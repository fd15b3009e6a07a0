"""``--out`` never loses a file: only ume-edge's own engine directories are replaced, in one step, and what killed
builds leave behind is cleaned up by the next one."""

import filecmp
import shutil
import signal
import subprocess
import sys
import time

import pytest
from killed_after_step import run_killed_after  # tests/killed_after_step.py

from ume_edge import engine_dir
from ume_edge.build import BuildOptions, build
from ume_edge.errors import BuildError

pytestmark = pytest.mark.slow  # builds, servers or subprocess runs


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "ume_edge.build", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=600)


def _one_line_error(result):
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ")
    return lines[-1]


def _same_tree(a, b) -> bool:
    """Equal trees, but for the staging marker a kill may leave in the published folder (readers ignore it)."""
    comparison = filecmp.dircmp(a, b, ignore=[engine_dir.STAGING_MARKER])
    if comparison.left_only or comparison.right_only or comparison.funny_files:
        return False
    _, mismatch, errors = filecmp.cmpfiles(a, b, comparison.common_files, shallow=False)
    return not mismatch and not errors and all(_same_tree(a / d, b / d) for d in comparison.common_dirs)


def _hidden(parent):
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_an_existing_folder_that_is_not_an_engine_directory_is_refused_and_untouched(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    line = _one_line_error(_cli("--precision", "fp32", "--out", str(mine)))
    assert str(mine) in line and "not an engine directory" in line and "untouched" in line
    assert (mine / "thesis.tex").read_text() == "years of work"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]


def test_out_dot_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")
    line = _one_line_error(_cli("--precision", "fp32", "--out", ".", cwd=tmp_path))
    assert "not an engine directory" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_an_existing_file_is_refused_and_untouched(tmp_path):
    target = tmp_path / "engines.tar"
    target.write_bytes(b"an archive")
    line = _one_line_error(_cli("--precision", "fp32", "--out", str(target)))
    assert "is an existing file" in line
    assert target.read_bytes() == b"an archive"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["engines.tar"]


def test_out_under_a_regular_file_is_one_line(tmp_path):
    (tmp_path / "file").write_text("x")
    line = _one_line_error(_cli("--precision", "fp32", "--out", str(tmp_path / "file" / "engines")))
    assert "is a file, not a folder" in line


@pytest.fixture(scope="module")
def fp32_build(tmp_path_factory):
    return build(BuildOptions(precision="fp32", out=tmp_path_factory.mktemp("fp32") / "engines"))


def test_an_engine_directory_holding_a_file_of_the_user_is_refused(fp32_build, tmp_path):
    out = tmp_path / "engines"
    shutil.copytree(fp32_build, out)
    (out / "README.txt").write_text("my notes")
    with pytest.raises(BuildError, match=r"also holds files a build did not write \(README.txt\)"):
        engine_dir.check_replaceable(out)
    engine_dir.check_replaceable(fp32_build)  # its own files only: replaceable
    empty = tmp_path / "empty"
    empty.mkdir()
    engine_dir.check_replaceable(empty)


def test_a_rebuild_replaces_the_old_build_and_leaves_nothing_hidden(fp32_build, int8_engines, tmp_path):
    out = tmp_path / "engines"
    shutil.copytree(int8_engines, out)
    staging = engine_dir.make_staging(out)
    shutil.copytree(fp32_build, staging, dirs_exist_ok=True)
    engine_dir.publish(staging, out)
    assert _same_tree(out, fp32_build)
    assert _hidden(tmp_path) == []


# A publish of a new build over an old one, counting its file-system steps (rename, exchange, unlink, rmdir).
_PUBLISH = """
    import shutil
    from pathlib import Path
    from ume_edge import engine_dir
    from ume_edge.engine_dir import publishing

    new_build, out, atomic = Path(ARGS[0]), Path(ARGS[1]), ARGS[2] == "1"
    staging = engine_dir.make_staging(out)
    shutil.copytree(new_build, staging, dirs_exist_ok=True)
    for name in ("rename", "unlink", "rmdir"):
        setattr(os, name, counted(getattr(os, name)))
    publishing.exchange = counted(publishing.exchange) if atomic else (lambda a, b: False)
    engine_dir.publish(staging, out)
"""


@pytest.mark.parametrize("atomic", [True, False], ids=["exchange", "no-exchange"])
def test_a_publish_killed_at_any_step_leaves_the_old_or_the_new_build(fp32_build, int8_engines, tmp_path, atomic):
    kill_after, completed = 1, False
    while not completed:
        work = tmp_path / f"step{kill_after}"
        work.mkdir()
        out = work / "engines"
        shutil.copytree(int8_engines, out)
        completed = run_killed_after(_PUBLISH, kill_after, fp32_build, out, "1" if atomic else "0")
        if atomic or completed:  # with the exchange there is no instant without a complete build at --out
            assert _same_tree(out, int8_engines) or _same_tree(out, fp32_build), f"killed after step {kill_after}"
        engine_dir.remove_stale_staging(work)  # what the next build does first
        assert _same_tree(out, int8_engines) or _same_tree(out, fp32_build), f"killed after step {kill_after}"
        assert _hidden(work) == [], f"killed after step {kill_after}"
        kill_after += 1
    assert kill_after > 3


def test_a_build_killed_while_it_works_leaves_nothing_after_the_next_build_starts(tmp_path):
    process = subprocess.Popen([sys.executable, "-m", "ume_edge.build", "--precision", "fp32", "--out",
                                str(tmp_path / "engines")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not _hidden(tmp_path) and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert _hidden(tmp_path), "the build never created its staging folder"
    staging = engine_dir.make_staging(tmp_path / "engines")  # the first step of the next build
    assert _hidden(tmp_path) == [staging.name]
    assert not (tmp_path / "engines").exists()
