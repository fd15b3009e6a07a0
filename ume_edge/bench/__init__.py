"""``python -m ume_edge.bench report RESULTS.json``: pytest-benchmark results -> REPORT.md and PNG plots.

Run the suites first (``pytest bench/ --benchmark-json=bench/out/RESULTS.json``). The report goes beside the results
(``bench/out/report/``); the committed baseline (``bench/baseline/``) changes only with ``--update-baseline``.

Every benchmark records its case in ``extra_info``: ``kind`` (engine | pipeline | served, the latencies; target |
memory | peak, a microbenchmark of this machine's peak rate), ``target`` (a modality, a presence pattern such as
``audio+image``, or the target's name), ``backend`` (pytorch | onnxruntime | tensorrt | pytriton | python-backend),
``precision`` and ``batch``; optionally ``model`` (``reference`` when absent), ``macs``, ``gmac_per_s`` and
``peak_fraction``. A target case adds ``status`` (met | missed | inconclusive), its ``checks`` and ``cross_checks``.
The report puts each latency beside PyTorch eager fp32 for the same model, kind, target and batch.
"""
