"""``UmeNode``: the rclpy node. Each subscription callback decodes its message, preprocesses it, checks it against
the served model's input and pushes it into a ``SensorSync``; every frame that comes out becomes an asynchronous
Triton request; each answer is published as a ``std_msgs/msg/Float32MultiArray`` of class probabilities (one
dimension, labelled "class"; the label is its argmax, the confidence its value). Two timers: one emits the frames
whose deadline passed while no message came, one publishes the ``diagnostic_msgs/msg/DiagnosticArray``.

Callbacks of one topic run one at a time (a mutually exclusive callback group per topic, so a sensor's readings
reach the sync in order); different topics and the timers may run in parallel under a ``MultiThreadedExecutor``
(``SensorSync`` takes a lock). Answers are published from tritonclient's thread, as rclpy allows.
"""

from __future__ import annotations

import importlib
import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from ume_edge.errors import UmeEdgeError
from ume_edge.recording import preprocess
from ume_edge.recording.decoders import timestamp
from ume_edge.ros2.diagnostics import SensorHealth, Status, inference_status, sensor_status
from ume_edge.ros2.inference import Inference, ModelInput
from ume_edge.ros2.options import NodeOptions
from ume_edge.sync import Frame, SensorSync

LOGGER = logging.getLogger(__name__)

RESULT_TYPE = "std_msgs/msg/Float32MultiArray"
DIAGNOSTICS_TYPE = "diagnostic_msgs/msg/DiagnosticArray"
PUBLISHER_DEPTH = 10
GRAPH_POLL_S = 0.1


def message_class(msgtype: str) -> type:
    """The Python class of ``package/msg/Name``, from the ROS 2 installation."""
    package, _, name = msgtype.partition("/msg/")
    try:
        return getattr(importlib.import_module(f"{package}.msg"), name)
    except (ImportError, AttributeError):
        raise UmeEdgeError(f"message type {msgtype} cannot be imported: build or install its package and source "
                           f"your ROS 2 setup (e.g. source /opt/ros/jazzy/setup.bash)") from None


class UmeNode:
    """The node, its subscriptions, publishers and timers; ``client`` is a ``tritonclient.grpc`` client and
    ``inputs`` the served model's inputs (``inference.model_inputs``)."""

    def __init__(self, options: NodeOptions, client: Any, inputs: dict[str, ModelInput]):
        from rclpy.node import Node

        unknown = [modality for modality in options.topics if modality not in inputs]
        if unknown:
            raise ValueError(f"model {options.model!r} has no input {unknown[0]!r} (it takes {', '.join(inputs)})")
        self.options, self.inputs = options, inputs
        self.preprocess = {modality: preprocess.load_preprocess(modality, spec)
                           for modality, spec in options.preprocess.items()}
        self.sync = SensorSync(list(options.topics), options.deadline_ms, options.window_ms,
                               **options.sync_policies())
        self.inference = Inference(client, options.model, {name: i.datatype for name, i in inputs.items()},
                                   self.publish_result, options.max_in_flight, options.timeout_s)
        self.node = Node(options.node_name)
        self.health = {modality: SensorHealth(spec.name, spec.msgtype or self._graph_type(spec.name))
                       for modality, spec in options.topics.items()}
        self.messages = _OutputMessages()
        self._subscribe()
        self.results = self.node.create_publisher(self.messages.result, options.result_topic, PUBLISHER_DEPTH)
        self.diagnostics = self.node.create_publisher(self.messages.diagnostics, options.diagnostics_topic,
                                                      PUBLISHER_DEPTH)
        self._start_timers()

    def _subscribe(self) -> None:
        from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
        from rclpy.qos import qos_profile_sensor_data

        for modality, health in self.health.items():
            self.node.create_subscription(message_class(health.msgtype), health.topic, self._receiver(modality),
                                          qos_profile_sensor_data, callback_group=MutuallyExclusiveCallbackGroup())

    def _start_timers(self) -> None:
        from rclpy.callback_groups import MutuallyExclusiveCallbackGroup

        timers = MutuallyExclusiveCallbackGroup()
        self.node.create_timer(self.options.poll_period_s, self.poll, callback_group=timers)
        self.node.create_timer(self.options.diagnostics_period_s, self.publish_diagnostics, callback_group=timers)

    def _graph_type(self, topic: str) -> str:
        """The message type published on ``topic``, waiting up to ``discovery_timeout_s`` for a publisher."""
        name = self.node.resolve_topic_name(topic)
        give_up = time.monotonic() + self.options.discovery_timeout_s
        while True:
            types = dict(self.node.get_topic_names_and_types()).get(name)
            if types and len(types) == 1:
                return types[0]
            if types:
                raise ValueError(f"topic {name} carries several types ({', '.join(types)}); name one: "
                                 f"--topic MODALITY={topic}:TYPE")
            if time.monotonic() > give_up:
                raise ValueError(f"no publisher of {name} found in {self.options.discovery_timeout_s:g} s; name the "
                                 f"type to subscribe before it appears: --topic MODALITY={topic}:TYPE")
            time.sleep(GRAPH_POLL_S)

    def _receiver(self, modality: str) -> Callable[[Any], None]:
        def callback(message: Any) -> None:
            self.receive(modality, message)
        return callback

    def receive(self, modality: str, message: Any) -> None:
        """One message of ``modality``: into the sync as an engine input, or counted and logged if it is not one."""
        health = self.health[modality]
        health.messages += 1
        health.last_message_s = time.monotonic()
        log_time_ns = self.node.get_clock().now().nanoseconds
        try:
            array = self.engine_input(modality, message)
        except UmeEdgeError as error:
            if health.last_error != str(error):
                LOGGER.warning("%s: %s", health.topic, error)
            health.rejected += 1
            health.last_error = str(error)
            return
        health.last_error = None
        self.submit(self.sync.push(modality, timestamp(message, log_time_ns, self.options.time_mode), array))

    def engine_input(self, modality: str, message: Any) -> np.ndarray:
        """Decoded (as the recording replay decodes: a type no decoder handles goes to the preprocess function as
        the message itself), preprocessed when a function is given, and checked against the model's input."""
        from tritonclient.utils import triton_to_np_dtype

        function = self.preprocess.get(modality)
        reading = preprocess.engine_reading(modality, message, self.health[modality].msgtype, self.options.audio_format,
                                            self.options.preprocess.get(modality), function)
        wanted = self.inputs[modality]
        preprocess.check_input(modality, reading, list(wanted.shape), np.dtype(triton_to_np_dtype(wanted.datatype)),
                               preprocessed=function is not None)
        return reading

    def poll(self) -> None:
        """Send the frames whose deadline passed (the poll timer's callback)."""
        self.submit(self.sync.poll())

    def submit(self, frames: list[Frame]) -> None:
        for frame in frames:
            self.inference.submit(frame)

    def publish_result(self, frame: Frame, probs: np.ndarray) -> None:
        self.results.publish(self.messages.probabilities(probs))

    def statuses(self) -> list[Status]:
        stats = self.sync.stats()
        now_s = time.monotonic()
        sensors = [sensor_status(modality, health, stats["modalities"][modality], now_s, self.options.stale_after_s)
                   for modality, health in self.health.items()]
        return [*sensors, inference_status(self.options.url, self.options.model, self.inference.counts(),
                                           stats["frames"])]

    def publish_diagnostics(self) -> None:
        """Publish one DiagnosticArray (the diagnostics timer's callback)."""
        stamp = self.node.get_clock().now().to_msg()
        self.diagnostics.publish(self.messages.diagnostic_array(stamp, self.statuses()))

    def close(self, timeout_s: float) -> None:
        """Send the frames still open, wait up to ``timeout_s`` for the answers, and destroy the node."""
        self.submit(self.sync.flush())
        if not self.inference.wait_idle(timeout_s):
            LOGGER.warning("%d requests still in flight after %g s", self.inference.counts().in_flight, timeout_s)
        self.node.destroy_node()


class _OutputMessages:
    """The message classes the node publishes, and how it fills them: every field given by keyword (generated
    rclpy messages take any subset; other implementations of the same definitions may need all)."""

    def __init__(self) -> None:
        self.result = message_class(RESULT_TYPE)
        self.diagnostics = message_class(DIAGNOSTICS_TYPE)
        self.layout = message_class("std_msgs/msg/MultiArrayLayout")
        self.dimension = message_class("std_msgs/msg/MultiArrayDimension")
        self.header = message_class("std_msgs/msg/Header")
        self.status = message_class("diagnostic_msgs/msg/DiagnosticStatus")
        self.key_value = message_class("diagnostic_msgs/msg/KeyValue")

    def probabilities(self, probs: np.ndarray) -> Any:
        size = int(probs.size)
        layout = self.layout(dim=[self.dimension(label="class", size=size, stride=size)], data_offset=0)
        return self.result(layout=layout, data=[float(p) for p in probs])  # rclpy takes Python floats, not numpy's

    def diagnostic_array(self, stamp: Any, statuses: list[Status]) -> Any:
        return self.diagnostics(header=self.header(stamp=stamp, frame_id=""),
                                status=[self._status(status) for status in statuses])

    def _status(self, status: Status) -> Any:
        values = [self.key_value(key=key, value=value) for key, value in status.values.items()]
        return self.status(level=getattr(self.status, status.level), name=status.name, message=status.message,
                           hardware_id=status.hardware_id, values=values)
