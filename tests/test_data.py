import numpy as np
import pytest

from ume_edge.data import avdigits, load, pattern_key, presence_patterns


def test_avdigits_splits_have_the_documented_shapes_and_labels():
    for split in avdigits.SPLITS:
        inputs, labels = load("avdigits", split)
        assert set(inputs) == {"audio", "image"}
        assert inputs["image"].shape == (len(labels), *avdigits.IMAGE_SHAPE)
        assert inputs["audio"].shape == (len(labels), *avdigits.AUDIO_SHAPE)
        assert inputs["image"].dtype == inputs["audio"].dtype == np.float32
        assert labels.dtype == np.int64 and set(np.unique(labels)) == set(range(10))
        assert 0.0 <= inputs["image"].min() and inputs["image"].max() <= 1.0


def test_no_source_image_is_shared_between_train_and_test():
    with np.load(avdigits.DATA_FILE) as arrays:
        train, test = set(arrays["train_image_source"]), set(arrays["test_image_source"])
        assert not train & test
        assert len(train) + len(test) + len(set(arrays["val_image_source"])) + \
            len(set(arrays["calib_image_source"])) == 1797


def test_no_audio_clip_appears_in_both_train_and_test():
    # Every pair got its own rendered, degraded clip; identical spectrograms would mean a shared clip.
    with np.load(avdigits.DATA_FILE) as arrays:
        train = {row.tobytes() for row in arrays["train_audio"]}
        assert not any(row.tobytes() in train for row in arrays["test_audio"])


def test_shipped_file_is_small_enough_to_commit():
    assert avdigits.DATA_FILE.stat().st_size < 25e6


def test_presence_patterns_are_every_non_empty_subset():
    patterns = presence_patterns(["image", "audio", "text"])
    assert len(patterns) == 7
    assert patterns[0] == ("audio", "image", "text")
    assert ("audio",) in patterns and () not in patterns
    assert pattern_key(("image", "audio")) == "audio+image"


def test_unknown_dataset_and_split_are_refused():
    with pytest.raises(ValueError, match="unknown data set"):
        load("imagenet", "train")
    with pytest.raises(ValueError, match="splits"):
        load("avdigits", "holdout")


def _write_avmnist(root, count, rng):
    for modality, shape in (("image", (count, 784)), ("audio", (count, 112, 112))):
        (root / modality).mkdir(exist_ok=True)
        for split in ("train", "test"):
            np.save(root / modality / f"{split}_data.npy", rng.integers(0, 256, shape).astype(np.float32))
    for split in ("train", "test"):
        np.save(root / f"{split}_labels.npy", rng.integers(0, 10, count))


def test_avmnist_loader_reads_the_multibench_layout(tmp_path, rng):
    _write_avmnist(tmp_path, 20, rng)
    inputs, labels = load("avmnist", "test", root=tmp_path)
    assert inputs["image"].shape == (20, 1, 28, 28) and inputs["audio"].shape == (20, 1, 112, 112)
    assert inputs["image"].max() <= 1.0 and labels.shape == (20,)
    train, _ = load("avmnist", "train", root=tmp_path)
    val, _ = load("avmnist", "val", root=tmp_path)
    assert len(train["image"]) == 18 and len(val["image"]) == 2


def test_avmnist_loader_names_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="train_data.npy"):
        load("avmnist", "train", root=tmp_path)
    with pytest.raises(ValueError, match="root"):
        load("avmnist", "train")


def test_log_mel_has_the_fixed_shape():
    signal = np.sin(np.linspace(0, 2000, int(avdigits.SAMPLE_RATE * avdigits.CLIP_SECONDS))).astype(np.float32)
    spec = avdigits.log_mel(signal)
    assert spec.shape == (avdigits.N_MELS, avdigits.N_FRAMES)
    assert spec.min() >= avdigits.DB_FLOOR and spec.max() <= avdigits.DB_CEIL


def test_exports_go_to_the_working_directory_never_into_the_package(tmp_path, monkeypatch):
    shipped = avdigits.DATA_FILE.stat()
    monkeypatch.chdir(tmp_path)
    avdigits.main(["--export-split", "calib"])
    inputs, labels = load(str(tmp_path / "avdigits-calib.npz"), "calib")
    assert len(labels) == 200 and inputs["image"].shape == (200, 1, 28, 28)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["avdigits-calib.npz"]  # no temporary left behind
    assert avdigits.DATA_FILE.stat().st_mtime_ns == shipped.st_mtime_ns


def test_an_interrupted_write_leaves_the_old_file(tmp_path, monkeypatch):
    out = tmp_path / "avdigits-calib.npz"
    out.write_bytes(b"the user's file")

    def interrupted(file, **arrays):
        file.write(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "savez_compressed", interrupted)
    with pytest.raises(KeyboardInterrupt):
        avdigits.main(["--export-split", "calib", "--out", str(out)])
    assert out.read_bytes() == b"the user's file" and sorted(p.name for p in tmp_path.iterdir()) == [out.name]
