"""A ROS 2 node that answers the configured sensor topics with the served ``ume`` model:
``python -m ume_edge.ros2 --url HOST:PORT --topic image=/camera/image:sensor_msgs/msg/Image ...``.

Each subscription's messages are decoded (``ume_edge.recording.decoders``, the code the recording replay uses),
preprocessed when ``--preprocess`` names a function, stamped from ``header.stamp`` and pushed into a ``SensorSync``;
every frame it emits is one asynchronous Triton request (``tritonclient.grpc``), and each answer is published as a
``std_msgs/msg/Float32MultiArray`` of class probabilities. A ``diagnostic_msgs/msg/DiagnosticArray`` with one status
per sensor and one for the inference goes out on a timer. rclpy and the message packages are imported only when the
node starts: they come from a ROS 2 installation, not from pip.
"""

from ume_edge.ros2.node import UmeNode
from ume_edge.ros2.options import NodeOptions, TopicSpec

__all__ = ["NodeOptions", "TopicSpec", "UmeNode"]
