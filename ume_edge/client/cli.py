"""``python -m ume_edge.client``: the flags, the printed report and the exit status."""

from __future__ import annotations

import argparse
import sys

import numpy as np

from ume_edge.cli_common import show_progress
from ume_edge.client.options import DEFAULT_MAX_FAILURES, ClientOptions
from ume_edge.client.report import SummaryNotSaved, format_report
from ume_edge.client.run import run_client
from ume_edge.client.simulation import DEFAULT_DEADLINE_JITTERS, DEFAULT_JITTER_MS, FALLBACK_JITTER_MS
from ume_edge.constants import DEFAULT_METRICS_PORT
from ume_edge.errors import UmeEdgeError

INTERRUPTED_EXIT_STATUS = 130  # 128 + SIGINT, what a shell reports for a command stopped by Ctrl-C


def parse_modality_values(text: str | None, flag: str) -> dict[str, float]:
    """``"image=0.2,audio=0.3"`` -> ``{"image": 0.2, "audio": 0.3}``."""
    items = filter(None, (part.strip() for part in (text or "").split(",")))
    return dict(_name_value(item, flag) for item in items)


def _name_value(item: str, flag: str) -> tuple[str, float]:
    name, _, number = (part.strip() for part in item.partition("="))
    try:
        value = float(number)
    except ValueError:
        value = float("nan")
    if not name or np.isnan(value):
        raise ValueError(f"{flag} expects name=value pairs separated by commas (e.g. image=0.2,audio=0.3), "
                         f"got {item!r}")
    return name, value


def parse_assignments(items: list[str] | None, flag: str, example: str) -> dict[str, str]:
    """``["image=/camera/image"]`` -> ``{"image": "/camera/image"}`` (the value may itself contain ``=``)."""
    pairs = {}
    for item in items or []:
        name, _, value = (part.strip() for part in item.partition("="))
        if not name or not value:
            raise ValueError(f"{flag} expects MODALITY=VALUE (e.g. {example}), got {item!r}")
        pairs[name] = value
    return pairs


def default_metrics_url(url: str, given: str | None) -> str | None:
    """Port 8002 on ``--url``'s host; none for a list of replicas, whose figures one server's metrics do not hold."""
    if given is not None:
        return None if given == "none" else given
    if "," in url:
        return None
    host = url.rsplit(":", 1)[0]
    return f"http://{host}:{DEFAULT_METRICS_PORT}/metrics"


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m ume_edge.client",
        description="Replay a data set, or a robot's recording, as one stream per sensor against a Triton server "
                    "(gRPC): the readings go "
                    "through a SensorSync, and each frame it emits is one request, without the modalities that "
                    "dropped or missed the deadline; report accuracy per presence pattern, latency percentiles "
                    "and throughput.",
    )
    parser.add_argument("--url", default="localhost:8001",
                        help="gRPC address host:port; replicas as a comma-separated list, or one name whose DNS "
                             "records are the replicas (a headless Service): requests go round-robin, and one that "
                             "finds its replica unavailable is retried on another within --timeout-s "
                             "(default localhost:8001)")
    parser.add_argument("--model", default="ume", help="model name (default ume)")
    parser.add_argument("--dataset", default="avdigits", help="data set name or .npz path (default avdigits)")
    parser.add_argument("--split", default="test", help="split to replay (default test)")
    parser.add_argument("--drop", default="", help="loss probability per sensor, e.g. image=0.2,audio=0.3 "
                        "(default: none lost)")
    parser.add_argument("--jitter-ms", default="", help="mean arrival delay per sensor in ms (exponential), e.g. "
                        f"audio=8,image=3 (default {','.join(f'{k}={v:g}' for k, v in DEFAULT_JITTER_MS.items())}, "
                        f"{FALLBACK_JITTER_MS:g} for other sensors)")
    parser.add_argument("--deadline-ms", type=float, default=None,
                        help="a frame leaves this long after its first reading arrived, with whatever arrived "
                             f"(default: {DEFAULT_DEADLINE_JITTERS:g} x the slowest sensor's mean delay, so only "
                             "lost readings are waited for; with --recording, one sample period of its readings)")
    parser.add_argument("--rate", type=float, default=None, help="samples per second, replayed in real time; with "
                        "--recording, times real time (1: as recorded, 0: as fast as possible) (default: samples far "
                        "apart, requests as fast as --concurrency allows)")
    parser.add_argument("--concurrency", type=int, default=1, help="requests in flight at most (default 1)")
    parser.add_argument("--requests", type=int, default=None, help="requests to send (default: as many as the "
                        "split has samples; more cycles through it)")
    parser.add_argument("--seed", type=int, default=0, help="seed for drops and jitter (default 0)")
    parser.add_argument("--timeout-s", type=float, default=30.0,
                        help="limit for every call to the server, metadata included; a request's tries on several "
                             "replicas share it (default 30)")
    parser.add_argument("--max-failures", type=int, default=DEFAULT_MAX_FAILURES,
                        help="stop sending after this many failed requests in a row and report what came back; "
                             f"0: never stop (default {DEFAULT_MAX_FAILURES})")
    parser.add_argument("--json", dest="json_out", default=None,
                        help="also write the summary as JSON to this file (default: none)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (default: a bar on stderr)")
    parser.add_argument("--send-mask", action="store_true",
                        help="send every modality (zeros where absent) and the 'present' mask, so that the server "
                             "batches requests of every presence pattern together (default: absent modalities are "
                             "left out of the request)")
    parser.add_argument("--metrics-url", default=None,
                        help="the server's metrics endpoint, to print what its entry model counted per presence "
                             "pattern (default: http://<host of --url>:8002/metrics, none for a list of replicas; "
                             "'none' to skip)")
    _add_recording_arguments(parser)
    return parser.parse_args(argv)


def _add_recording_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--recording", default=None, help="replay this MCAP file or rosbag2 folder (MCAP or sqlite3 "
                        "storage) instead of a data set; needs pip install 'ume-edge[sensors]' (default: none)")
    parser.add_argument("--topic", action="append", metavar="MODALITY=TOPIC",
                        help="a recording's topic for one modality, e.g. image=/camera/image; once per modality "
                             "(default: none)")
    parser.add_argument("--label-topic", default=None, help="a recording's label topic (std_msgs Int32, UInt8 or "
                        "String); a frame's label is the latest one at or before it (default: none, no accuracy)")
    parser.add_argument("--time", choices=("header", "log"), default="header",
                        help="a reading's timestamp: header.stamp where the message has one, or the log time "
                             "(default: header)")
    parser.add_argument("--loop", type=int, default=1, help="replay the recording this many times (default 1)")
    parser.add_argument("--start", type=float, default=0.0,
                        help="seconds into the recording to start from (default 0)")
    parser.add_argument("--duration", type=float, default=None,
                        help="seconds of the recording to replay (default: to the end)")
    parser.add_argument("--preprocess", action="append", metavar="MODALITY=module:function",
                        help="turn a decoded reading into the engine's input with your function (module:function "
                             "or file.py:function); once per modality (default: none, readings sent as decoded)")
    parser.add_argument("--audio-format", default=None,
                        help="PCM layout of audio_common_msgs audio, FORMAT[:CHANNELS[:RATE]], e.g. S16LE:1:16000 "
                             "(default: from the recording's AudioInfo topic)")
    parser.add_argument("--metrics-port", type=int, default=None,
                        help="serve the sensors' figures (ume_sensor_*, by modality) as Prometheus metrics on this "
                             "port while the replay runs; needs prometheus-client (default: off)")
    parser.add_argument("--metrics-host", default="127.0.0.1",
                        help="address the sensor metrics listen on (default 127.0.0.1)")


def options_from_args(args: argparse.Namespace) -> ClientOptions:
    return ClientOptions(
        url=args.url, model=args.model, dataset=args.dataset, split=args.split,
        drop=parse_modality_values(args.drop, "--drop"), jitter_ms=parse_modality_values(args.jitter_ms, "--jitter-ms"),
        deadline_ms=args.deadline_ms, rate=args.rate, concurrency=args.concurrency, requests=args.requests,
        seed=args.seed, timeout_s=args.timeout_s, max_failures=args.max_failures, send_mask=args.send_mask,
        metrics_url=default_metrics_url(args.url, args.metrics_url), json_out=args.json_out,
        progress=not args.no_progress, recording=args.recording,
        topics=parse_assignments(args.topic, "--topic", "image=/camera/image"), label_topic=args.label_topic,
        time=args.time, loop=args.loop, start_s=args.start, duration_s=args.duration,
        preprocess=parse_assignments(args.preprocess, "--preprocess", "audio=my_audio:to_log_mel"),
        audio_format=args.audio_format, sensor_metrics_port=args.metrics_port, sensor_metrics_host=args.metrics_host,
    )


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    show_progress()
    try:
        summary = run_client(options_from_args(args))
    except SummaryNotSaved as error:
        print(format_report(error.summary))
        print(f"error: {error}", file=sys.stderr)
        return 2
    except (ValueError, UmeEdgeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted (Ctrl-C)", file=sys.stderr)
        return INTERRUPTED_EXIT_STATUS
    except Exception as error:  # tritonclient raises its own exception types for an unreachable server
        print(f"error: {error}\n(is the server running? start it with: python -m ume_edge.serve)", file=sys.stderr)
        return 1
    print(format_report(summary))
    if summary["interrupted"]:
        return INTERRUPTED_EXIT_STATUS
    return 0 if summary["errors"] == 0 else 1
