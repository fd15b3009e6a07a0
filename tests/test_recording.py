"""Robot recordings: the decoders on messages built by rosbags' type system, one-line errors from the client, and
replays of recordings written by the real writers (MCAP, rosbag2 in both storages) against a served engine
directory."""

import io

import numpy as np
import pytest

from ume_edge.client import ClientOptions, run_client
from ume_edge.client.cli import main
from ume_edge.data import load, pattern_key
from ume_edge.recording import decoders
from ume_edge.recording.decoders import AudioFormat, UnsupportedMessage, decode, timestamp
from ume_edge.recording.export import FORMATS, LABEL_TOPIC, export_recording, topic_for

pytest.importorskip("mcap_ros2")
typesys = pytest.importorskip("rosbags.typesys")

AUDIO_MSGS = {
    "audio_common_msgs/msg/AudioData": "uint8[] data",
    "audio_common_msgs/msg/AudioDataStamped": "std_msgs/Header header\naudio_common_msgs/AudioData audio",
    "audio_common_msgs/msg/AudioInfo": "uint8 channels\nuint32 sample_rate\nstring sample_format\nuint32 bitrate\n"
                                       "string coding_format",
}
SAMPLES = 120
DROP = {"image": 0.25, "audio": 0.25}


@pytest.fixture(scope="module")
def store():
    typestore = typesys.get_typestore(typesys.Stores.LATEST)
    for name, text in AUDIO_MSGS.items():
        typestore.register(typesys.get_types_from_msg(text, name))
    return typestore


def make(store, msgtype, **fields):
    return store.types[msgtype](**fields)


def header(store, sec=12, nanosec=500_000_000):
    return make(store, "std_msgs/msg/Header", stamp=make(store, "builtin_interfaces/msg/Time", sec=sec,
                                                          nanosec=nanosec), frame_id="f")


def image(store, pixels, encoding, bigendian=False, padding=3):
    """An Image of ``pixels`` ([H, W, C]) with ``padding`` bytes after every row."""
    height, width = pixels.shape[:2]
    rows = pixels.astype(pixels.dtype.newbyteorder(">" if bigendian else "<")).reshape(height, -1).view(np.uint8)
    padded = np.concatenate([rows, np.full((height, padding), 0xEE, np.uint8)], axis=1)
    return make(store, "sensor_msgs/msg/Image", header=header(store), height=height, width=width, encoding=encoding,
                is_bigendian=int(bigendian), step=padded.shape[1], data=padded.reshape(-1))


# ------------------------------------------------------------------------------------------------- decoders

@pytest.mark.parametrize("encoding, dtype, channels", [(e, d, c) for e, (d, c) in decoders.IMAGE_ENCODINGS.items()])
@pytest.mark.parametrize("bigendian", [False, True])
def test_images_decode_channels_first_with_row_padding_and_byte_order(store, rng, encoding, dtype, channels,
                                                                      bigendian):
    pixels = (rng.random((5, 7, channels)) * 200).astype(dtype)
    decoded = decode(image(store, pixels, encoding, bigendian), "sensor_msgs/msg/Image")
    expected = pixels[..., ::-1] if encoding == "bgr8" else pixels
    assert decoded.dtype == np.dtype(dtype) and decoded.dtype.isnative
    np.testing.assert_array_equal(decoded, expected.transpose(2, 0, 1))


def test_an_unsupported_encoding_or_type_is_one_line(store, rng):
    with pytest.raises(UnsupportedMessage, match="encoding 'yuv422' is not supported; use one of mono8") as error:
        decode(image(store, np.zeros((2, 2, 2), np.uint8), "yuv422"), "sensor_msgs/msg/Image")
    assert "\n" not in str(error.value)
    with pytest.raises(UnsupportedMessage, match="no decoder for std_msgs/msg/Int32.*--preprocess"):
        decode(make(store, "std_msgs/msg/Int32", data=3), "std_msgs/msg/Int32")


@pytest.mark.parametrize("image_format", ["png", "jpeg"])
def test_compressed_images_decode_with_pillow(store, image_format):
    from PIL import Image

    gradient = np.add.outer(np.arange(16) * 8, np.arange(24) * 4).astype(np.uint8)
    pixels = np.stack([gradient, 255 - gradient, gradient // 2], axis=-1)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=image_format.upper())
    message = make(store, "sensor_msgs/msg/CompressedImage", header=header(store), format=image_format,
                   data=np.frombuffer(buffer.getvalue(), np.uint8))
    decoded = decode(message, "sensor_msgs/msg/CompressedImage")
    assert decoded.shape == (3, 16, 24) and decoded.dtype == np.uint8
    error = np.abs(decoded.astype(int) - pixels.transpose(2, 0, 1)).mean()
    assert error == 0 if image_format == "png" else error < 4


@pytest.mark.parametrize("bigendian", [False, True])
def test_point_clouds_become_named_fields_as_float32_columns(store, rng, bigendian):
    order = ">" if bigendian else "<"
    point = np.dtype({"names": ["x", "y", "z", "intensity"], "formats": [order + "f4"] * 3 + [order + "u2"],
                      "offsets": [0, 4, 8, 14], "itemsize": 20})
    points = np.zeros((2, 3), point)
    for name in ("x", "y", "z"):
        points[name] = rng.normal(size=(2, 3))
    points["intensity"] = rng.integers(0, 60000, size=(2, 3))
    rows = np.concatenate([points.view(np.uint8).reshape(2, -1), np.zeros((2, 4), np.uint8)], axis=1)  # row padding
    field = store.types["sensor_msgs/msg/PointField"]
    fields = [field(name="x", offset=0, datatype=7, count=1), field(name="y", offset=4, datatype=7, count=1),
              field(name="z", offset=8, datatype=7, count=1), field(name="intensity", offset=14, datatype=4, count=1)]
    message = make(store, "sensor_msgs/msg/PointCloud2", header=header(store), height=2, width=3, fields=fields,
                   is_bigendian=bigendian, point_step=20, row_step=64, data=rows.reshape(-1), is_dense=True)
    decoded = decode(message, "sensor_msgs/msg/PointCloud2")
    expected = np.stack([points[name].reshape(-1).astype(np.float32) for name in point.names], axis=1)
    np.testing.assert_array_equal(decoded, expected)
    assert decoded.dtype == np.float32 and decoded.shape == (6, 4)


def test_audio_pcm_from_a_flag_or_an_audio_info_message(store):
    samples = np.array([[0, -32768], [16384, 32767]], "<i2")
    data = make(store, "audio_common_msgs/msg/AudioData", data=samples.view(np.uint8).reshape(-1))
    decoded = decode(data, "audio_common_msgs/msg/AudioData", AudioFormat.parse("S16LE:2:16000"))
    np.testing.assert_array_equal(decoded, samples / 32768.0)
    floats = np.array([0.25, -0.5, 1.0], ">f4")
    info = make(store, "audio_common_msgs/msg/AudioInfo", channels=1, sample_rate=8000, sample_format="F32BE",
                bitrate=0, coding_format="wave")
    stamped = make(store, "audio_common_msgs/msg/AudioDataStamped", header=header(store),
                   audio=make(store, "audio_common_msgs/msg/AudioData", data=floats.view(np.uint8)))
    decoded = decode(stamped, "audio_common_msgs/msg/AudioDataStamped", AudioFormat.from_info(info))
    np.testing.assert_array_equal(decoded, floats.reshape(-1, 1))
    with pytest.raises(UnsupportedMessage, match="--audio-format"):
        decode(data, "audio_common_msgs/msg/AudioData")
    with pytest.raises(UnsupportedMessage, match="not whole S32LE frames"):
        decode(data, "audio_common_msgs/msg/AudioData", AudioFormat("S32LE", 3))


def test_multi_arrays_honour_dims_strides_and_data_offset(store):
    dim = store.types["std_msgs/msg/MultiArrayDimension"]
    buffer = np.arange(2 + 2 * 4, dtype=np.float32)  # two leading elements, then 2 rows of 4 of which 3 are used
    layout = make(store, "std_msgs/msg/MultiArrayLayout", dim=[dim(label="rows", size=2, stride=8),
                                                                 dim(label="cols", size=3, stride=4)], data_offset=2)
    decoded = decode(make(store, "std_msgs/msg/Float32MultiArray", layout=layout, data=buffer),
                     "std_msgs/msg/Float32MultiArray")
    np.testing.assert_array_equal(decoded, [[2, 3, 4], [6, 7, 8]])
    flat = make(store, "std_msgs/msg/MultiArrayLayout", dim=[], data_offset=1)
    for msgtype, dtype in decoders.MULTI_ARRAY_TYPES.items():
        values = np.arange(5).astype(dtype)
        decoded = decode(make(store, msgtype, layout=flat, data=values), msgtype)
        assert decoded.dtype == np.dtype(dtype)
        np.testing.assert_array_equal(decoded, values[1:])
    too_far = make(store, "std_msgs/msg/MultiArrayLayout", dim=[dim(label="x", size=20, stride=20)], data_offset=0)
    with pytest.raises(UnsupportedMessage, match="reaches past its 10 elements"):
        decode(make(store, "std_msgs/msg/Float32MultiArray", layout=too_far, data=buffer),
               "std_msgs/msg/Float32MultiArray")


def test_timestamps_come_from_the_header_unless_log_time_is_asked_for(store):
    message = image(store, np.zeros((1, 1, 1), np.uint8), "mono8")
    assert timestamp(message, 99_000_000_000) == 12.5
    assert timestamp(message, 99_000_000_000, "log") == 99.0
    assert timestamp(make(store, "std_msgs/msg/Int32", data=1), 7_000_000_000) == 7.0


# ------------------------------------------------------------------------------------ one-line errors, no server

@pytest.fixture(scope="module")
def samples():
    inputs, labels = load("avdigits", "test")
    return {name: array[:SAMPLES] for name, array in inputs.items()}, labels[:SAMPLES]


@pytest.fixture(scope="module")
def recordings(samples, tmp_path_factory):
    """One recording per format, written by the real writers, and which readings each holds."""
    inputs, labels = samples
    folder = tmp_path_factory.mktemp("recordings")
    return {fmt: (folder / f"avdigits-{fmt}", export_recording(folder / f"avdigits-{fmt}", inputs, labels, fmt,
                                                                 DROP, seed=4)) for fmt in FORMATS}


def client_error(capsys, *args):
    code = main(["--url", "127.0.0.1:1", "--no-progress", "--metrics-url", "none", *args])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, err
    return err


def test_each_modality_has_readings_missing_in_every_format(recordings):
    for _, kept in recordings.values():
        assert set(kept) == {"audio", "image"}
        for present in kept.values():
            assert 0.6 < present.mean() < 0.9


def test_a_truncated_file_is_one_line(recordings, tmp_path, capsys):
    whole = recordings["mcap"][0].read_bytes()
    truncated = tmp_path / "truncated.mcap"
    truncated.write_bytes(whole[:len(whole) // 2])
    err = client_error(capsys, "--recording", str(truncated), "--topic", "image=/image")
    assert f"{truncated}: " in err and "truncated" in err


def test_an_unknown_topic_names_the_recordings_topics(recordings, capsys):
    for path, _ in recordings.values():
        err = client_error(capsys, "--recording", str(path), "--topic", "image=/camera/image")
        assert "has no topic '/camera/image'" in err
        assert "/audio (std_msgs/msg/Float32MultiArray), /image (sensor_msgs/msg/Image), /label" in err


def test_an_unsupported_encoding_is_one_line(store, tmp_path, capsys):
    from rosbags.rosbag2 import Writer

    path = tmp_path / "yuv"
    with Writer(path, version=9) as writer:
        connection = writer.add_connection("/camera", "sensor_msgs/msg/Image", typestore=store)
        message = image(store, np.zeros((2, 2, 2), np.uint8), "yuv422")
        writer.write(connection, 1, store.serialize_cdr(message, "sensor_msgs/msg/Image"))
    err = client_error(capsys, "--recording", str(path), "--topic", "image=/camera")
    assert "encoding 'yuv422' is not supported" in err


def test_recording_flags_are_checked(capsys):
    assert "--recording needs at least one --topic" in client_error(capsys, "--recording", "x.mcap")
    assert "--drop and --jitter-ms simulate" in client_error(capsys, "--recording", "x.mcap", "--topic", "a=/a",
                                                             "--drop", "a=0.1")
    assert "--topic expects MODALITY=VALUE" in client_error(capsys, "--recording", "x.mcap", "--topic", "/a")
    assert "give it with --recording" in client_error(capsys, "--topic", "a=/a")
    assert "no such file or folder" in client_error(capsys, "--recording", "missing.mcap", "--topic", "a=/a")


# ----------------------------------------------------------------------------- replays against a served engine

@pytest.fixture(scope="module")
def server(served_reference):
    return served_reference


def engines_own(int8_engines, samples, kept):
    """Accuracy and count per presence pattern of ``Pipeline.infer`` on the samples with a reading in the recording."""
    from ume_edge.runtime import Pipeline

    inputs, labels = samples
    rows: dict[str, list[bool]] = {}
    with Pipeline.load(int8_engines) as pipeline:
        for index in range(SAMPLES):
            present = [name for name in inputs if kept[name][index]]
            if present:
                given = {name: inputs[name][index:index + 1] if name in present else None for name in inputs}
                correct = pipeline.infer(given).labels[0] == labels[index]
                rows.setdefault(pattern_key(present), []).append(bool(correct))
    return {key: {"count": len(row), "accuracy": float(np.mean(row))} for key, row in sorted(rows.items())}


@pytest.mark.triton
@pytest.mark.parametrize("fmt", FORMATS)
def test_a_recording_replays_with_every_frame_answered_and_the_engines_accuracy(server, int8_engines, samples,
                                                                               recordings, fmt, tmp_path):
    path, kept = recordings[fmt]
    preprocess = tmp_path / "same.py"
    preprocess.write_text("def same(array):\n    return array\n")
    summary = run_client(ClientOptions(
        url=server.grpc_url, recording=path, topics={name: topic_for(name) for name in kept}, label_topic=LABEL_TOPIC,
        concurrency=4, preprocess={"image": f"{preprocess}:same"} if fmt == "rosbag2-sqlite3" else {}))
    expected = engines_own(int8_engines, samples, kept)
    frames = sum(row["count"] for row in expected.values())
    assert summary["requests"] == summary["answered"] == frames and summary["errors"] == 0
    assert summary["per_pattern"] == expected
    assert len(expected) == 3  # audio, image and both
    assert summary["late"] == {} and sum(summary["sync_dropped"].values()) == 0


@pytest.mark.triton
def test_a_preprocess_that_returns_the_wrong_shape_is_one_line(server, recordings, tmp_path, capsys):
    preprocess = tmp_path / "flat.py"
    preprocess.write_text("def flatten(array):\n    return array.reshape(-1)\n")
    err = client_error(capsys, "--url", server.grpc_url, "--recording", str(recordings["mcap"][0]),
                       "--topic", "image=/image", "--preprocess", f"image={preprocess}:flatten")
    assert err == ("error: image: the engine takes float32 [1, 28, 28] per sample but the --preprocess function "
                   "returned float32 [784]\n")


def test_a_missing_recording_library_is_one_line_naming_the_extra(recordings, monkeypatch, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "mcap_ros2.decoder", None)  # what an uninstalled package makes import raise
    err = client_error(capsys, "--recording", str(recordings["mcap"][0]), "--topic", "image=/image")
    assert "pip install 'ume-edge[sensors]'" in err
