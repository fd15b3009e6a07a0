"""A fake rclpy (and ROS 2 message packages) for running ``ume_edge.ros2`` without ROS 2, held to rclpy's real API.

    world = install(monkeypatch, "jazzy")        # sys.modules gets rclpy, rclpy.node, ... and the message packages
    ...                                          # the code under test creates its node
    world.deliver("/camera/image", message)      # every subscription on that topic gets it, in the caller's thread
    world.fire_timers()                          # every live timer's callback, once
    world.published["/ume/probs"]                # what was published there, in order

Only the names of ``MODULE_NAMES`` that the node uses are faked; each fake module's surface is checked against
tests/api_tables/rclpy-<distro>.json (``module_table``; made by tools/rclpy_table.py from rclpy's source) with
``api_conformance.check_object``. Behaviour follows rclpy's source where the node depends on it: ``rclpy.init`` once
per context, a node only after it, a QoSProfile or a depth for every endpoint, ``Publisher.publish`` refusing another
message type (TypeError), topic names validated and expanded as rcl does, ``timer_period_ns`` an int of nanoseconds,
``Time.to_msg`` a ``builtin_interfaces/msg/Time``. Message classes come from rosbags' typestore for the distro:
the same definitions, field names and constants as the generated rclpy messages (rosbags writes ``byte`` fields as
int where rclpy uses bytes of length one; code that uses the class constants, as it should, works with both).
"""

from __future__ import annotations

import enum
import functools
import json
import re
import sys
import types
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

TABLES = Path(__file__).with_name("api_tables")
MODULE_NAMES = ("rclpy", "rclpy.node", "rclpy.qos", "rclpy.executors", "rclpy.callback_groups", "rclpy.publisher",
                "rclpy.subscription", "rclpy.timer", "rclpy.clock", "rclpy.time")
MESSAGE_PACKAGES = ("builtin_interfaces", "std_msgs", "sensor_msgs", "diagnostic_msgs")
DISTRO_STORES = {"jazzy": "ROS2_JAZZY", "humble": "ROS2_HUMBLE"}
TOPIC_NAME = re.compile(r"~?/?[A-Za-z_{][\w{}]*(/[A-Za-z_{][\w{}]*)*")  # rcl's rules, without substitutions
S_TO_NS = 10**9

_world: FakeRos | None = None


@functools.cache
def _table(distro: str) -> dict:
    return json.loads((TABLES / f"rclpy-{distro}.json").read_text())


def module_table(distro: str, module: str) -> dict:
    """The table of one rclpy module, shaped as ``api_conformance.check_object`` reads it."""
    table = _table(distro)
    return {"package": table["package"], "version": table["version"], **table["modules"][module]}


class FakeRos:
    """What the fake rclpy saw: the nodes, subscriptions, publishers, timers; what tests drive it with."""

    def __init__(self, distro: str, messages: dict[str, type]):
        self.distro, self.messages = distro, messages
        self.initialised = False
        self.now_ns = 1_700_000_000 * S_TO_NS
        self.nodes: list[Node] = []
        self.subscriptions: list[Subscription] = []
        self.publishers: list[Publisher] = []
        self.timers: list[Timer] = []
        self.published: dict[str, list] = defaultdict(list)
        self.graph: dict[str, list[str]] = {}  # topic -> types of its publishers outside the node
        self.on_spin: Callable[[], None] | None = None  # what "spinning" does: the test's script

    def deliver(self, topic: str, message) -> int:
        """Call every live subscription on ``topic`` with ``message``; returns how many got it."""
        receivers = [s for s in self.subscriptions if s.topic_name == topic and not s.node.destroyed]
        for subscription in receivers:
            if not isinstance(message, subscription.msg_type):
                raise TypeError(f"{topic} carries {subscription.msg_type.__msgtype__}, not {type(message).__name__}")
            subscription.callback(message)
        return len(receivers)

    def fire_timers(self) -> None:
        for timer in list(self.timers):
            if not timer.is_canceled() and not timer.node.destroyed:
                timer.callback()


def _world_now() -> FakeRos:
    if _world is None:
        raise RuntimeError("the fake rclpy is not installed")
    return _world


def _expand(topic: str, node: Node) -> str:
    if not TOPIC_NAME.fullmatch(topic) or topic.endswith("/") or "//" in topic:
        raise ValueError(f"Invalid topic name {topic!r}")  # rclpy raises InvalidTopicNameException(ValueError)
    if topic.startswith("~"):
        return f"/{node.name}{topic[1:]}"
    return topic if topic.startswith("/") else f"/{topic}"


def _check_qos(qos_profile) -> None:
    if not isinstance(qos_profile, (QoSProfile, int)) or isinstance(qos_profile, bool):
        raise TypeError(f"Expected QoSProfile or int, but received {type(qos_profile)!r}")


def _check_msg_type(msg_type) -> None:
    if not isinstance(msg_type, type) or not hasattr(msg_type, "__msgtype__"):
        raise AttributeError(f"{msg_type!r} is not a message type")  # rclpy fails on its missing _TYPE_SUPPORT


# ------------------------------------------------------------------------------------------------ rclpy

def init(*, args=None, context=None, domain_id=None, signal_handler_options=None) -> None:
    world = _world_now()
    if world.initialised:
        raise RuntimeError("Context.init() must only be called once")
    world.initialised = True


def ok(*, context=None) -> bool:
    return _world_now().initialised


def shutdown(*, context=None, uninstall_handlers=None) -> None:
    world = _world_now()
    if not world.initialised:
        raise RuntimeError("Context must be initialized before it can be shutdown")
    world.initialised = False


def try_shutdown(*, context=None) -> None:
    _world_now().initialised = False


# ------------------------------------------------------------------------------------------------ rclpy.qos

class HistoryPolicy(enum.IntEnum):
    SYSTEM_DEFAULT = 0
    KEEP_LAST = 1
    KEEP_ALL = 2
    UNKNOWN = 3


class ReliabilityPolicy(enum.IntEnum):
    SYSTEM_DEFAULT = 0
    RELIABLE = 1
    BEST_EFFORT = 2
    UNKNOWN = 3


class DurabilityPolicy(enum.IntEnum):
    SYSTEM_DEFAULT = 0
    TRANSIENT_LOCAL = 1
    VOLATILE = 2
    UNKNOWN = 3


class QoSProfile:
    def __init__(self, **kwargs):
        self._settings = kwargs

    @property
    def depth(self):
        return self._settings.get("depth", 0)

    @property
    def reliability(self):
        return self._settings.get("reliability", ReliabilityPolicy.SYSTEM_DEFAULT)

    @property
    def history(self):
        return self._settings.get("history", HistoryPolicy.KEEP_LAST)


# rmw's rmw_qos_profile_sensor_data
qos_profile_sensor_data = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=5,
                                     reliability=ReliabilityPolicy.BEST_EFFORT, durability=DurabilityPolicy.VOLATILE)


# ------------------------------------------------------------------------------------------------ rclpy.callback_groups

class CallbackGroup:
    def __init__(self):
        self.entities: list = []

    def add_entity(self, entity) -> None:
        self.entities.append(entity)


class MutuallyExclusiveCallbackGroup(CallbackGroup):
    pass


class ReentrantCallbackGroup(CallbackGroup):
    pass


# ------------------------------------------------------------------------------------------------ rclpy.time, clock

class Time:
    def __init__(self, *, seconds=0, nanoseconds=0, clock_type=None):
        self._nanoseconds = int(seconds * S_TO_NS) + int(nanoseconds)

    @property
    def nanoseconds(self) -> int:
        return self._nanoseconds

    def seconds_nanoseconds(self) -> tuple[int, int]:
        return divmod(self._nanoseconds, S_TO_NS)

    def to_msg(self):
        sec, nanosec = self.seconds_nanoseconds()
        return _world_now().messages["builtin_interfaces/msg/Time"](sec=sec, nanosec=nanosec)


class Clock:
    def __init__(self, *, clock_type=None):
        self._clock_type = clock_type

    def now(self) -> Time:
        return Time(nanoseconds=_world_now().now_ns)


# ------------------------------------------------------------------------------------------------ endpoints, timers

class Publisher:
    def __init__(self, publisher_impl, msg_type, topic, qos_profile, event_callbacks, callback_group):
        self.node, self.msg_type, self._topic, self.qos_profile = publisher_impl, msg_type, topic, qos_profile

    @property
    def topic_name(self) -> str:
        return self._topic

    def publish(self, msg) -> None:
        if not isinstance(msg, (self.msg_type, bytes)):
            raise TypeError()  # as rclpy's Publisher.publish
        _world_now().published[self._topic].append(msg)


class Subscription:
    def __init__(self, subscription_impl, msg_type, topic, callback, callback_group, qos_profile, raw,
                 event_callbacks):
        self.node, self.msg_type, self._topic, self.callback = subscription_impl, msg_type, topic, callback
        self.qos_profile = qos_profile

    @property
    def topic_name(self) -> str:
        return self._topic


class Timer:
    def __init__(self, callback, callback_group, timer_period_ns, clock, *, context=None):
        self.callback, self.callback_group, self._period_ns = callback, callback_group, timer_period_ns
        self._canceled = False
        self.node: Node | None = None

    @property
    def timer_period_ns(self) -> int:
        return self._period_ns

    def cancel(self) -> None:
        self._canceled = True

    def is_canceled(self) -> bool:
        return self._canceled


# ------------------------------------------------------------------------------------------------ rclpy.node

class Node:
    def __init__(self, node_name, *, context=None, cli_args=None, namespace=None, **options):
        world = _world_now()
        if not world.initialised:
            raise RuntimeError("rclpy.init() has not been called")  # rclpy: NotInitializedException
        self.name, self.destroyed = node_name, False
        self._default_group = MutuallyExclusiveCallbackGroup()
        world.nodes.append(self)

    def get_name(self) -> str:
        return self.name

    def get_clock(self) -> Clock:
        return Clock()

    def resolve_topic_name(self, topic, *, only_expand=False) -> str:
        return _expand(topic, self)

    def get_topic_names_and_types(self, no_demangle=False) -> list[tuple[str, list[str]]]:
        return [(topic, list(types)) for topic, types in sorted(_world_now().graph.items())]

    def create_subscription(self, msg_type, topic, callback, qos_profile, *, callback_group=None, **options):
        _check_msg_type(msg_type)
        _check_qos(qos_profile)
        subscription = Subscription(self, msg_type, _expand(topic, self), callback, callback_group, qos_profile, False,
                                    None)
        (callback_group or self._default_group).add_entity(subscription)
        _world_now().subscriptions.append(subscription)
        return subscription

    def create_publisher(self, msg_type, topic, qos_profile, *, callback_group=None, **options):
        _check_msg_type(msg_type)
        _check_qos(qos_profile)
        publisher = Publisher(self, msg_type, _expand(topic, self), qos_profile, None, callback_group)
        _world_now().publishers.append(publisher)
        return publisher

    def create_timer(self, timer_period_sec, callback, callback_group=None, clock=None):
        timer = Timer(callback, callback_group or self._default_group, int(float(timer_period_sec) * S_TO_NS),
                      clock or self.get_clock())
        timer.node = self
        (callback_group or self._default_group).add_entity(timer)
        _world_now().timers.append(timer)
        return timer

    def destroy_node(self) -> None:
        self.destroyed = True


# ------------------------------------------------------------------------------------------------ rclpy.executors

class ExternalShutdownException(Exception):
    pass


class Executor:
    def __init__(self, *, context=None):
        self._nodes: list[Node] = []

    def add_node(self, node) -> bool:
        if node in self._nodes:
            return False
        self._nodes.append(node)
        return True

    def get_nodes(self) -> list:
        return list(self._nodes)

    def spin(self) -> None:
        """Runs the test's script (``FakeRos.on_spin``), then returns as a shut-down context would."""
        world = _world_now()
        if world.on_spin is not None:
            world.on_spin()

    def shutdown(self, timeout_sec=None) -> bool:
        self._nodes.clear()
        return True


class MultiThreadedExecutor(Executor):
    def __init__(self, num_threads=None, *, context=None):
        super().__init__(context=context)


# ------------------------------------------------------------------------------------------------ installing

MODULE_CONTENTS: dict[str, tuple] = {
    "rclpy": (init, ok, shutdown, try_shutdown),
    "rclpy.node": (Node,),
    "rclpy.qos": (HistoryPolicy, ReliabilityPolicy, DurabilityPolicy, QoSProfile, ("qos_profile_sensor_data",
                                                                                    qos_profile_sensor_data)),
    "rclpy.executors": (Executor, MultiThreadedExecutor, ExternalShutdownException),
    "rclpy.callback_groups": (CallbackGroup, MutuallyExclusiveCallbackGroup, ReentrantCallbackGroup),
    "rclpy.publisher": (Publisher,),
    "rclpy.subscription": (Subscription,),
    "rclpy.timer": (Timer,),
    "rclpy.clock": (Clock,),
    "rclpy.time": (Time,),
}


def fake_modules() -> dict[str, types.ModuleType]:
    """A fresh module object per rclpy module, holding only what the fake defines for it."""
    modules = {}
    for name, contents in MODULE_CONTENTS.items():
        module = types.ModuleType(name)
        for item in contents:
            attribute, value = item if isinstance(item, tuple) else (item.__name__, item)
            setattr(module, attribute, value)
        modules[name] = module
    return modules  # not rclpy's attributes: the table lists no submodules (code imports them by name)


def message_modules(distro: str) -> tuple[dict[str, types.ModuleType], dict[str, type]]:
    """``package.msg`` modules holding rosbags' classes of ``MESSAGE_PACKAGES`` for ``distro``, and the classes by
    type name."""
    from rosbags.typesys import Stores, get_typestore

    typestore = get_typestore(getattr(Stores, DISTRO_STORES[distro]))
    classes = {name: cls for name, cls in typestore.types.items() if name.split("/")[0] in MESSAGE_PACKAGES}
    modules: dict[str, types.ModuleType] = {}
    for name, cls in classes.items():
        package, _, short = name.split("/")
        modules.setdefault(package, types.ModuleType(package))
        msg = modules.setdefault(f"{package}.msg", types.ModuleType(f"{package}.msg"))
        setattr(msg, short, cls)
        modules[package].msg = msg
    return modules, classes


def install(monkeypatch, distro: str) -> FakeRos:
    """Put the fake rclpy and the message packages into ``sys.modules`` (undone with ``monkeypatch``)."""
    modules, classes = message_modules(distro)
    modules.update(fake_modules())
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    world = FakeRos(distro, classes)
    monkeypatch.setattr(sys.modules[__name__], "_world", world)
    return world
