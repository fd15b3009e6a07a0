"""The ROS 2 node (``ume_edge.ros2``) against the fake rclpy of tests/fake_rclpy.py, whose surface is checked here
against the tables tools/rclpy_table.py read from rclpy's source (jazzy and humble), with messages from rosbags'
typestore; the slow test runs it against a served engine directory and compares with ``Pipeline.infer``."""

import enum
import logging
import sys
import time
import urllib.request

import fake_rclpy
import numpy as np
import pytest
from api_conformance import check_object

from ume_edge.ros2.cli import main, split_ros_args
from ume_edge.ros2.inference import ModelInput, model_inputs
from ume_edge.ros2.options import NodeOptions, TopicSpec
from ume_edge.serving.server_config import free_ports

pytest.importorskip("rosbags")

DISTROS = ("jazzy", "humble")
IMAGE_TOPIC, AUDIO_TOPIC = "/camera/image", "/mic/spectrogram"
TOPICS = {"image": TopicSpec(IMAGE_TOPIC, "sensor_msgs/msg/Image"),
          "audio": TopicSpec(AUDIO_TOPIC, "std_msgs/msg/Float32MultiArray")}
SAMPLE_PERIOD_NS = 100_000_000


# ------------------------------------------------------------------------------------------------ the fake and tables

@pytest.mark.parametrize("distro", DISTROS)
@pytest.mark.parametrize("module", fake_rclpy.MODULE_NAMES)
def test_the_fake_rclpy_has_the_real_surface(distro, module):
    assert check_object(fake_rclpy.fake_modules()[module], fake_rclpy.module_table(distro, module)) == []


@pytest.mark.parametrize("distro", DISTROS)
def test_a_wrong_fake_is_caught(distro):
    class WrongNode(fake_rclpy.Node):
        def create_subscription(self, msg_type, topic, callback, qos, *, callback_group=None):
            raise AssertionError("never called")

        def spin(self):
            raise AssertionError("never called")

    class WrongReliability(enum.IntEnum):
        RELIABLE = 2

    mismatches = check_object(WrongNode, fake_rclpy.module_table(distro, "rclpy.node"), "Node")
    assert [line.split(":")[0] for line in mismatches] == ["WrongNode.create_subscription(msg_type, topic, callback, "
                                                          "qos, callback_group)", "WrongNode.spin"]
    qos = fake_rclpy.fake_modules()["rclpy.qos"]
    qos.ReliabilityPolicy = WrongReliability
    assert check_object(qos, fake_rclpy.module_table(distro, "rclpy.qos")) == [
        "module.ReliabilityPolicy.RELIABLE is 2; the real value is 1"]


def test_the_tables_differ_where_rclpy_does():
    """Read from each branch's source: jazzy's create_timer took autostart, humble's does not."""
    def timer_parameters(distro):
        table = fake_rclpy.module_table(distro, "rclpy.node")
        return [p["name"] for p in table["classes"]["Node"]["members"]["create_timer"]["overloads"][0]["parameters"]]

    assert timer_parameters("jazzy")[-1] == "autostart"
    assert "autostart" not in timer_parameters("humble")
    for distro in DISTROS:
        sources = fake_rclpy._table(distro)["sources"]
        assert sources["ref"] == distro and len(sources["commit"]) == 40


# ------------------------------------------------------------------------------------------------ options and CLI

def test_topic_specs_and_ros_arguments():
    assert TopicSpec.parse("image=/cam/image:sensor_msgs/msg/Image") == ("image", TopicSpec("/cam/image",
                                                                                             "sensor_msgs/msg/Image"))
    assert TopicSpec.parse("audio=mic") == ("audio", TopicSpec("mic"))
    for bad in ("image", "=/cam", "image=/cam:sensor_msgs/Image"):
        with pytest.raises(ValueError, match="--topic"):
            TopicSpec.parse(bad)
    assert split_ros_args(["--url", "h:1", "--ros-args", "-r", "__ns:=/r", "--", "--topic", "a=b"]) == (
        ["--url", "h:1", "--topic", "a=b"], ["-r", "__ns:=/r"])
    with pytest.raises(ValueError, match="--required names video"):
        NodeOptions(TOPICS, required=("video",))


def test_without_rclpy_one_line_says_to_source_ros(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "rclpy", None)  # import rclpy raises ImportError
    assert main(["--topic", f"image={IMAGE_TOPIC}:sensor_msgs/msg/Image"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "source your ROS 2 setup" in error


# ------------------------------------------------------------------------------------------------ the node, no server

def _image(world, stamp_ns, image):
    messages = world.messages
    stamp = messages["builtin_interfaces/msg/Time"](sec=stamp_ns // 10**9, nanosec=stamp_ns % 10**9)
    header = messages["std_msgs/msg/Header"](stamp=stamp, frame_id="camera")
    channels, height, width = image.shape
    assert channels == 1
    return messages["sensor_msgs/msg/Image"](header=header, height=height, width=width, encoding="32FC1",
                                             is_bigendian=0, step=width * 4,
                                             data=np.ascontiguousarray(image, "<f4").view(np.uint8).reshape(-1))


def _mono8(world, stamp_ns, height=28, width=28):
    image = _image(world, stamp_ns, np.zeros((1, height, width), np.float32))
    image.encoding, image.step, image.data = "mono8", width, np.zeros(height * width, np.uint8)
    return image


def _spectrogram(world, array):
    messages = world.messages
    sizes = array.shape
    strides = [int(np.prod(sizes[index:])) for index in range(len(sizes))]
    dims = [messages["std_msgs/msg/MultiArrayDimension"](label=label, size=size, stride=stride)
            for label, size, stride in zip(("channel", "mel", "frame"), sizes, strides, strict=True)]
    layout = messages["std_msgs/msg/MultiArrayLayout"](dim=dims, data_offset=0)
    return messages["std_msgs/msg/Float32MultiArray"](layout=layout, data=array.astype(np.float32).reshape(-1))


@pytest.fixture
def manifest_inputs(int8_engines):
    """The engine inputs as the served model's metadata gives them (batch axis -1), from the engine directory."""
    from ume_edge import engine_dir

    manifest = engine_dir.load(int8_engines)
    return {m.name: ModelInput("FP32", (-1, *m.shape)) for m in (manifest.modality(n) for n in ("image", "audio"))}


@pytest.fixture
def world(monkeypatch):
    world = fake_rclpy.install(monkeypatch, "jazzy")
    import rclpy

    rclpy.init()
    return world


def _statuses(world):
    array = world.published["/diagnostics"][-1]
    return {status.name: status for status in array.status}


def test_a_message_the_engine_cannot_take_is_counted_and_reported(world, manifest_inputs, caplog):
    from ume_edge.ros2.node import UmeNode

    node = UmeNode(NodeOptions(TOPICS), None, manifest_inputs)
    assert [s.topic_name for s in world.subscriptions] == [IMAGE_TOPIC, AUDIO_TOPIC]
    assert [t.timer_period_ns for t in world.timers] == [12_500_000, 1_000_000_000]
    with caplog.at_level(logging.WARNING, "ume_edge.ros2.node"):
        for _ in range(3):
            assert world.deliver(IMAGE_TOPIC, _mono8(world, world.now_ns)) == 1
    assert len(caplog.records) == 1  # one line, not one per message
    assert "the engine takes float32 [1, 28, 28] per sample but the decoded reading is uint8" in caplog.text
    node.publish_diagnostics()
    statuses = _statuses(world)
    image, audio = statuses["ume_edge: sensor image"], statuses["ume_edge: sensor audio"]
    values = {kv.key: kv.value for kv in image.values}
    assert image.level == image.ERROR and "uint8" in image.message
    assert values["messages"] == "3" and values["rejected"] == "3" and values["received"] == "0"
    assert audio.level == audio.STALE and audio.message == "no message yet"
    assert statuses["ume_edge: inference"].level == audio.OK


def test_a_topic_without_a_type_takes_the_publishers(world, manifest_inputs):
    from ume_edge.ros2.node import UmeNode

    world.graph = {IMAGE_TOPIC: ["sensor_msgs/msg/Image"]}
    topics = {"image": TopicSpec(IMAGE_TOPIC.lstrip("/")), "audio": TOPICS["audio"]}
    node = UmeNode(NodeOptions(topics, discovery_timeout_s=0.2), None, manifest_inputs)
    assert node.health["image"].msgtype == "sensor_msgs/msg/Image"
    assert world.subscriptions[0].msg_type is world.messages["sensor_msgs/msg/Image"]
    with pytest.raises(ValueError, match="no publisher of /mic found in 0.2 s; name the type"):
        UmeNode(NodeOptions({**topics, "audio": TopicSpec("/mic")}, discovery_timeout_s=0.2), None, manifest_inputs)


def test_an_input_the_model_lacks_is_one_line(world, manifest_inputs):
    from ume_edge.ros2.node import UmeNode

    with pytest.raises(ValueError, match="model 'ume' has no input 'video'"):
        UmeNode(NodeOptions({**TOPICS, "video": TopicSpec("/video", "sensor_msgs/msg/Image")}), None,
                manifest_inputs)


def test_a_preprocess_function_turns_the_message_into_the_engine_input(world, manifest_inputs, tmp_path, caplog):
    from ume_edge.ros2.node import UmeNode

    (tmp_path / "features.py").write_text("import numpy as np\n"
                                          "def scaled(image):\n    return (image / 255).astype(np.float32)\n"
                                          "def flat(image):\n    return image.reshape(-1).astype(np.float32)\n")
    scaled = UmeNode(NodeOptions(TOPICS, preprocess={"image": f"{tmp_path}/features.py:scaled"}), None,
                     manifest_inputs)
    message = _mono8(world, world.now_ns)
    message.data = np.full(28 * 28, 51, np.uint8)
    np.testing.assert_allclose(scaled.engine_input("image", message), np.full((1, 28, 28), 0.2, np.float32))
    flat = UmeNode(NodeOptions(TOPICS, preprocess={"image": f"{tmp_path}/features.py:flat"}), None, manifest_inputs)
    with caplog.at_level(logging.WARNING, "ume_edge.ros2.node"):
        flat.receive("image", message)
    assert caplog.messages == [f"{IMAGE_TOPIC}: image: the engine takes float32 [1, 28, 28] per sample but the "
                               "--preprocess function returned float32 [784]"]


# ------------------------------------------------------------------------------------------------ a served engine

@pytest.fixture(scope="module")
def server(served_reference):
    return served_reference


PATTERNS = (("image", "audio"), ("image",), ("audio",))


@pytest.mark.slow
@pytest.mark.triton
def test_the_node_answers_as_the_pipeline_does(world, server, int8_engines):
    import tritonclient.grpc as grpcclient

    from ume_edge import data
    from ume_edge.ros2.node import UmeNode
    from ume_edge.runtime import Pipeline

    inputs, _ = data.load("avdigits", "test")
    deadline_ms = 300.0
    options = NodeOptions(TOPICS, url=server.grpc_url, deadline_ms=deadline_ms, window_ms=20)
    client = grpcclient.InferenceServerClient(server.grpc_url)
    node = UmeNode(options, client, model_inputs(client, "ume", 30))
    samples = 9
    for sample in range(samples):
        present = PATTERNS[sample % len(PATTERNS)]
        world.now_ns += SAMPLE_PERIOD_NS
        if "image" in present:
            world.deliver(IMAGE_TOPIC, _image(world, world.now_ns, inputs["image"][sample]))
        if "audio" in present:  # no header: stamped with its receive time, the fake clock's now
            world.deliver(AUDIO_TOPIC, _spectrogram(world, inputs["audio"][sample]))
        if len(present) < 2:
            time.sleep(deadline_ms / 1e3)
            world.fire_timers()  # the poll timer sends the frame whose deadline passed
        assert node.inference.wait_idle(30)
    world.fire_timers()
    node.close(timeout_s=30)
    client.close()

    published = world.published["/ume/probs"]
    assert len(published) == samples
    with Pipeline.load(int8_engines) as pipeline:
        for sample, message in enumerate(published):
            present = PATTERNS[sample % len(PATTERNS)]
            expected = pipeline.infer({name: inputs[name][sample:sample + 1] if name in present else None
                                       for name in ("image", "audio")}).probs[0]
            assert message.layout.dim[0].label == "class" and message.layout.dim[0].size == expected.size
            np.testing.assert_allclose(message.data, expected, atol=1e-6, err_msg=f"sample {sample} {present}")

    statuses = _statuses(world)
    inference = {kv.key: kv.value for kv in statuses["ume_edge: inference"].values}
    assert (inference["sent"], inference["answered"], inference["failed"]) == (str(samples), str(samples), "0")
    for modality in ("image", "audio"):
        status = statuses[f"ume_edge: sensor {modality}"]
        values = {kv.key: kv.value for kv in status.values}
        delivered = sum(modality in PATTERNS[sample % len(PATTERNS)] for sample in range(samples))
        assert status.level == status.OK, status.message
        assert values["messages"] == values["received"] == values["included"] == str(delivered)


@pytest.mark.slow
@pytest.mark.triton
def test_the_command_runs_the_node_until_ros_shuts_down(monkeypatch, server):
    from ume_edge import data

    world = fake_rclpy.install(monkeypatch, "humble")
    inputs, _ = data.load("avdigits", "test")

    def spin():
        world.now_ns += SAMPLE_PERIOD_NS
        world.deliver(IMAGE_TOPIC, _image(world, world.now_ns, inputs["image"][0]))
        world.deliver(AUDIO_TOPIC, _spectrogram(world, inputs["audio"][0]))
        world.fire_timers()

    scraped = []

    def spin_and_scrape():
        spin()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            scraped.append(response.read().decode())

    (port,) = free_ports(1)
    world.on_spin = spin_and_scrape
    status = main(["--url", server.grpc_url, "--topic", f"image={IMAGE_TOPIC}:sensor_msgs/msg/Image",
                   "--topic", f"audio={AUDIO_TOPIC}:std_msgs/msg/Float32MultiArray", "--metrics-port", str(port),
                   "--metrics-host", "127.0.0.1", "--ros-args", "-r", "__node:=ume"])
    assert status == 0
    assert 'ume_sensor_readings_received_total{modality="image"} 1.0' in scraped[0]  # the sensors, for Prometheus
    assert len(world.published["/ume/probs"]) == 1  # the frame was answered before the node was destroyed
    assert world.nodes[0].destroyed and not world.initialised
