"""`python -m ume_edge.train` never loses a user's files and refuses bad arguments before it trains (issue 21)."""

import json
import queue
import resource
import signal
import subprocess
import sys
import threading
import time

import pytest

from ume_edge.model import UMEModel
from ume_edge.train import main

# The shortest training the CLI allows; a bad option given after these replaces the good one.
TINY = ["--seeds", "0", "--max-samples", "2", "--uni-epochs", "1", "--mma-epochs", "1", "--naive-epochs", "1"]
OLD_CHECKPOINT, OLD_REPORT = b"the previous checkpoint\n" * 1000, b'{"previous": "report"}\n'


def _old_outputs(folder):
    """A previous run's checkpoint and report, to check that a failed run leaves them byte-identical."""
    out = folder / "m.pt"
    out.write_bytes(OLD_CHECKPOINT)
    (folder / "m-report.json").write_bytes(OLD_REPORT)
    return out


def _assert_old_outputs_untouched(folder):
    assert sorted(p.name for p in folder.iterdir()) == ["m-report.json", "m.pt"]  # no temporary left behind
    assert (folder / "m.pt").read_bytes() == OLD_CHECKPOINT
    assert (folder / "m-report.json").read_bytes() == OLD_REPORT


def _refused(argv, capsys) -> str:
    """Run the CLI in-process; it must exit 2 before any training output. Returns its last stderr line."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert "Traceback" not in err and "(1 of 1)" not in err and "[1/4]" not in err and "val mean acc" not in err
    return err.strip().splitlines()[-1]


@pytest.mark.parametrize("option, value", [
    ("--max-samples", "-1"), ("--max-samples", "0"),
    ("--missing-prob", "2"), ("--missing-prob", "-0.1"), ("--missing-prob", "nan"),
    ("--seeds", "99999999999999999999"), ("--seeds", "-1"), ("--seeds", "0,4294967296"), ("--ship-seed", "-1"),
    ("--uni-epochs", "0"), ("--mma-epochs", "0"), ("--naive-epochs", "-3"), ("--batch-size", "0"),
    ("--lr", "nan"), ("--lr", "inf"), ("--lr", "0"), ("--lr", "-0.001"), ("--mma-lr", "nan"),
    ("--weight-decay", "-1"), ("--weight-decay", "inf"),
])
def test_a_bad_number_is_refused_in_one_line_before_training(tmp_path, capsys, option, value):
    line = _refused(["--out", str(tmp_path / "m.pt"), *TINY, option, value], capsys)
    assert line.startswith(f"python -m ume_edge.train: error: argument {option}: expected ")
    assert value in line
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("layout, out_name, problem", [
    ("out is a folder", "m.pt", "it is a folder"),
    ("report path is a folder", "m.pt", "m-report.json: it is a folder"),
    ("parent is a file", "a-file/m.pt", "a-file is a file, not a folder"),
])
def test_an_unwritable_out_is_refused_before_training(tmp_path, capsys, layout, out_name, problem):
    (tmp_path / "a-file").write_text("not a folder")
    if layout == "out is a folder":
        (tmp_path / "m.pt").mkdir()
    if layout == "report path is a folder":
        (tmp_path / "m-report.json").mkdir()
    before = sorted(tmp_path.rglob("*"))
    line = _refused(["--out", str(tmp_path / out_name), *TINY], capsys)
    assert line.startswith("error: cannot write ") and problem in line
    assert sorted(tmp_path.rglob("*")) == before


def _limit_file_size():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # so that a write past the limit fails with EFBIG instead
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))  # the checkpoint is several MiB


@pytest.mark.slow
def test_a_failed_save_leaves_the_previous_checkpoint_and_report_as_they_were(tmp_path):
    out = _old_outputs(tmp_path)
    result = subprocess.run([sys.executable, "-m", "ume_edge.train", "--out", str(out), *TINY],
                            capture_output=True, text=True, timeout=300, preexec_fn=_limit_file_size)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith(f"error: could not write {out}") and last_line.endswith("are as they were")
    _assert_old_outputs_untouched(tmp_path)


@pytest.mark.slow
def test_a_successful_run_replaces_the_previous_checkpoint_and_report_and_leaves_no_temporary(tmp_path):
    out = _old_outputs(tmp_path)
    result = subprocess.run([sys.executable, "-m", "ume_edge.train", "--out", str(out), *TINY],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m-report.json", "m.pt"]
    report = json.loads((tmp_path / "m-report.json").read_text())
    assert UMEModel.load(out).report == report and report["shipped_seed"] == 0


def _read_lines_in_background(stream) -> tuple[queue.Queue, threading.Thread]:
    lines = queue.Queue()
    reader = threading.Thread(target=lambda: [lines.put(line) for line in stream], daemon=True)
    reader.start()
    return lines, reader


@pytest.mark.slow
def test_ctrl_c_during_training_says_nothing_was_written_and_means_it(tmp_path):
    out = _old_outputs(tmp_path)
    process = subprocess.Popen(
        [sys.executable, "-m", "ume_edge.train", "--out", str(out), *TINY, "--max-samples", "64",
         "--uni-epochs", "200"], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    try:
        (lines, reader), seen, deadline = _read_lines_in_background(process.stderr), [], time.monotonic() + 120
        while not any("epoch" in line for line in seen) and time.monotonic() < deadline:
            seen.append(lines.get(timeout=max(0.1, deadline - time.monotonic())))
        assert any("epoch" in line for line in seen), "".join(seen)
        process.send_signal(signal.SIGINT)
        returncode = process.wait(timeout=60)
    finally:
        process.kill()
    reader.join(timeout=10)
    while not lines.empty():
        seen.append(lines.get())
    stderr = "".join(seen)
    assert returncode == 130, stderr
    assert "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1] == f"interrupted: nothing was written; {out} is as it was"
    _assert_old_outputs_untouched(tmp_path)
