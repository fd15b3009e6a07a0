"""``python -m ume_edge.ros2``: the flags, the start (rclpy, the Triton client, the node) and the exit status.
Arguments after ``--ros-args`` (up to a lone ``--``) are rclpy's (remapping, parameters) and go to ``rclpy.init``."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from ume_edge.cli_common import DefaultsFormatter, show_progress
from ume_edge.client.cli import parse_modality_values
from ume_edge.errors import UmeEdgeError
from ume_edge.recording.decoders import TIME_MODES, AudioFormat
from ume_edge.ros2.inference import model_inputs
from ume_edge.ros2.options import DEFAULT_DIAGNOSTICS_TOPIC, DEFAULT_RESULT_TOPIC, NodeOptions, TopicSpec

NO_ROS_EXIT_STATUS = 2
ROS_ARGS, ROS_ARGS_END = "--ros-args", "--"
LOGGER = logging.getLogger(__name__)


def split_ros_args(argv: list[str]) -> tuple[list[str], list[str]]:
    """(the node's own arguments, those rclpy reads): every ``--ros-args ... [--]`` section goes to rclpy."""
    own: list[str] = []
    ros: list[str] = []
    in_ros = False
    for argument in argv:
        if argument == ROS_ARGS or (in_ros and argument == ROS_ARGS_END):
            in_ros = argument == ROS_ARGS
        else:
            (ros if in_ros else own).append(argument)
    return own, ros


def _parse_args(argv: list[str]) -> argparse.Namespace:
    defaults = NodeOptions({"-": TopicSpec("-")})
    parser = argparse.ArgumentParser(
        prog="python -m ume_edge.ros2", formatter_class=DefaultsFormatter,
        description="A ROS 2 node: subscribe to one topic per modality, group the readings into frames "
                    "(SensorSync), ask the served model about each frame over gRPC and publish its class "
                    "probabilities (std_msgs/msg/Float32MultiArray) and a diagnostic_msgs/msg/DiagnosticArray. "
                    "Needs a sourced ROS 2 installation (rclpy). ROS arguments follow --ros-args.")
    parser.add_argument("--url", default=defaults.url, help="Triton gRPC address host:port")
    parser.add_argument("--model", default=defaults.model, help="model name")
    parser.add_argument("--topic", action="append", required=True, metavar="MODALITY=TOPIC[:TYPE]",
                        help="a sensor, e.g. image=/camera/image_raw:sensor_msgs/msg/Image (repeat per modality); "
                             "without :TYPE the type is read from the publisher on the ROS graph (required: no "
                             "default)")
    parser.add_argument("--preprocess", action="append", default=[], metavar="MODALITY=module:function",
                        help="a function from the decoded reading (or the message, for types no decoder handles) "
                             "to the engine input of one sample; module or path/to/file.py")
    parser.add_argument("--audio-format", default=None, help="PCM layout of audio_common_msgs audio, "
                        "FORMAT[:CHANNELS[:RATE]], e.g. S16LE:1:16000 (default: none, and audio messages are refused)")
    parser.add_argument("--time", dest="time_mode", choices=TIME_MODES, default=defaults.time_mode,
                        help="a reading's time: its header.stamp (header; the receive time for messages without "
                             "one), or the receive time on the node's clock (log)")
    parser.add_argument("--deadline-ms", type=float, default=defaults.deadline_ms,
                        help="a frame leaves this long after its first reading arrived, with whatever arrived")
    parser.add_argument("--window-ms", type=float, default=None, help="readings this close in time form one frame "
                        "(default: the deadline; choose about half the sensors' period)")
    parser.add_argument("--required", action="append", default=[], metavar="MODALITY",
                        help="a frame without this modality is dropped, not sent (repeatable)")
    parser.add_argument("--max-age-ms", default="", help="hold-last per modality, e.g. image=100: a frame missing "
                        "it reuses its last reading if at most this old")
    parser.add_argument("--offset-ms", default="", help="added to a sensor's timestamps, e.g. audio=-20")
    parser.add_argument("--max-open", type=int, default=None, help="frames open at most (default: SensorSync's)")
    parser.add_argument("--result-topic", default=DEFAULT_RESULT_TOPIC, help="where the probabilities go")
    parser.add_argument("--diagnostics-topic", default=DEFAULT_DIAGNOSTICS_TOPIC, help="where the diagnostics go")
    parser.add_argument("--diagnostics-period-s", type=float, default=defaults.diagnostics_period_s,
                        help="seconds between two diagnostics messages")
    parser.add_argument("--stale-after-s", type=float, default=defaults.stale_after_s,
                        help="a sensor with no message for this long is reported STALE")
    parser.add_argument("--max-in-flight", type=int, default=defaults.max_in_flight,
                        help="requests in flight at most; a frame that finds none free is skipped and counted")
    parser.add_argument("--timeout-s", type=float, default=defaults.timeout_s, help="limit for every server call")
    parser.add_argument("--node-name", default=defaults.node_name, help="the ROS 2 node's name")
    parser.add_argument("--metrics-port", type=int, default=None,
                        help="serve the sensors' figures (ume_sensor_*, by modality) as Prometheus metrics on this "
                             "port; needs prometheus-client (default: off)")
    parser.add_argument("--metrics-host", default=defaults.metrics_host, help="address the sensor metrics listen on")
    return parser.parse_args(argv)


def options_from_args(args: argparse.Namespace) -> NodeOptions:
    topics = dict(TopicSpec.parse(text) for text in args.topic)
    if len(topics) != len(args.topic):
        raise ValueError("each modality takes one --topic")
    preprocess = dict(_modality_pair(text, "--preprocess", "audio=my_features:log_mel") for text in args.preprocess)
    return NodeOptions(
        topics=topics, url=args.url, model=args.model, preprocess=preprocess,
        audio_format=AudioFormat.parse(args.audio_format) if args.audio_format else None,
        time_mode=args.time_mode, deadline_ms=args.deadline_ms, window_ms=args.window_ms,
        required=tuple(args.required), max_age_ms=parse_modality_values(args.max_age_ms, "--max-age-ms"),
        offset_ms=parse_modality_values(args.offset_ms, "--offset-ms"), max_open=args.max_open,
        result_topic=args.result_topic, diagnostics_topic=args.diagnostics_topic,
        diagnostics_period_s=args.diagnostics_period_s, stale_after_s=args.stale_after_s,
        max_in_flight=args.max_in_flight, timeout_s=args.timeout_s, node_name=args.node_name,
        metrics_port=args.metrics_port, metrics_host=args.metrics_host,
    )


def _modality_pair(text: str, flag: str, example: str) -> tuple[str, str]:
    modality, _, value = text.partition("=")
    if not modality or not value:
        raise ValueError(f"{flag} expects MODALITY=VALUE (e.g. {example}), got {text!r}")
    return modality, value


def import_rclpy() -> Any:
    """rclpy, or ``None`` after one line saying how to get it."""
    try:
        import rclpy
    except ImportError:
        print("error: rclpy cannot be imported: source your ROS 2 setup first (e.g. source /opt/ros/jazzy/setup.bash"
              "); rclpy comes with ROS 2, not from pip", file=sys.stderr)
        return None
    return rclpy


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = _parse_args(split_ros_args(argv)[0])
    try:
        options = options_from_args(args)
    except (ValueError, UmeEdgeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    rclpy = import_rclpy()
    if rclpy is None:
        return NO_ROS_EXIT_STATUS
    show_progress()
    rclpy.init(args=[sys.argv[0], *argv])  # rcl reads only the --ros-args sections
    try:
        return _run(rclpy, options)
    finally:
        rclpy.try_shutdown()


def _start_sensor_metrics(node: Any, options: NodeOptions) -> Any:
    if options.metrics_port is None:
        return None
    from ume_edge.client.sensor_health import SensorMetrics

    metrics = SensorMetrics(node.sync)
    port = metrics.start(options.metrics_port, options.metrics_host)
    LOGGER.info("sensor metrics on http://%s:%d/metrics", options.metrics_host, port)
    return metrics


def _run(rclpy: Any, options: NodeOptions) -> int:
    import tritonclient.grpc as grpcclient
    from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor

    from ume_edge.ros2.node import UmeNode

    client = grpcclient.InferenceServerClient(options.url)
    try:
        try:
            inputs = model_inputs(client, options.model, options.timeout_s)
            node = UmeNode(options, client, inputs)
        except (ValueError, UmeEdgeError) as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        except Exception as error:  # tritonclient raises its own exception types for an unreachable server
            print(f"error: {error}\n(is the server running at {options.url}? start it with: python -m "
                  "ume_edge.serve)", file=sys.stderr)
            return 1
        metrics = _start_sensor_metrics(node, options)
        executor = MultiThreadedExecutor()
        executor.add_node(node.node)
        try:
            executor.spin()
        except (KeyboardInterrupt, ExternalShutdownException):
            pass
        finally:
            executor.shutdown()
            node.close(options.timeout_s)
            if metrics is not None:
                metrics.stop()
        return 0
    finally:
        client.close()
