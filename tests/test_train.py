import json
import subprocess
import sys

from ume_edge.model import UMEModel


def test_train_cli_runs_every_stage_and_writes_checkpoint_and_report(tmp_path):
    out = tmp_path / "m.pt"
    result = subprocess.run(
        [sys.executable, "-m", "ume_edge.train", "--dataset", "avdigits", "--out", str(out),
         "--uni-epochs", "1", "--mma-epochs", "1", "--naive-epochs", "1"],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    for stage in ("[1/4] uni-modal pre-training: audio", "[1/4] uni-modal pre-training: image", "[2/4] MMA",
                  "[3/4] naive baseline", "[4/4] selection"):
        assert stage in result.stderr
    report = json.loads((tmp_path / "m-report.json").read_text())
    assert set(report["models"]) == {"uni:audio", "uni:image", "naive", "ume", "mma", "selected"}
    assert report["selected"] in ("ume", "mma")
    assert report["models"]["selected"] == report["models"][report["selected"]]
    assert report["models"]["uni:audio"]["image"] is None  # a uni-modal model cannot answer without its modality
    assert set(report["ceiling_gaps"]["selected"]) == {"audio", "image"}
    assert "| selected (" in result.stdout and "Ceiling gap" in result.stdout
    model = UMEModel.load(out)
    assert model.fusion == report["selected"] and model.name == "avdigits"
