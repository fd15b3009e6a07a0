"""Replay a data set as sensor streams against a Triton server over gRPC.

    python -m ume_edge.client --url localhost:8001 --drop image=0.2,audio=0.3 --concurrency 16

or, from Python, ``run_client(ClientOptions(url=..., drop={"image": 0.2}))``, which returns the summary as a dict.
Every sensor is a stream on a simulated clock (``simulation``): each reading is lost with the ``--drop``
probability or arrives after a random delay, the readings go through a ``SensorSync`` (``ume_edge.sync``), and each
frame it emits becomes one request without the modalities missing from it. The requests go out asynchronously
(``streaming``), each request limited to ``--timeout-s``, round-robin over the replicas when ``--url`` names
several and retried on another when its replica is unavailable (``replicas``), until ``--max-failures`` fail in a row
or Ctrl-C. At the end it prints accuracy per presence pattern, latency p50/p90/p99 and throughput, the requests each
replica answered (``report``), and what the server's entry model counted (``server_figures``). With ``--rate`` the
requests leave in real time, when their frame was emitted; without it, as fast as ``--concurrency`` allows.

``--recording PATH --topic MODALITY=TOPIC ...`` replays a robot's recording (an MCAP file or a rosbag2 folder) instead:
its readings are decoded (``ume_edge.recording``) and go through the SensorSync on the recording's own clock.

The data set and the ``--json`` path are checked before anything is sent (``dataset``, ``report.check_writable``):
a file that is not a readable ``.npz``, no samples, modalities or labels of different lengths, or a ``--json`` path
that cannot be written stop the client with one line (exit status 2). float64 inputs are sent as float32, what the
model computes in. Ctrl-C prints the report of the requests sent so far (exit status 130).
"""

from ume_edge.client.options import ClientOptions
from ume_edge.client.report import SummaryNotSaved, format_report
from ume_edge.client.run import run_client
from ume_edge.client.streaming import grpc_inputs

__all__ = ["ClientOptions", "SummaryNotSaved", "format_report", "grpc_inputs", "run_client"]
