"""Benchmark drivers of this repository, run from its root as ``python -m benchmarks.<name> --help``.

They use the ``fuss_components`` library (and, through subprocesses, ``fuss job export`` and ``nvflare
simulator``); the library never imports them. ``paper``: the paper's Tables 1-3 and their ``--verify`` re-runs;
``bench``: feature-extraction throughput and FLARE overhead; ``simulator``: ``nvflare simulator`` with restarts
after FLARE's start-up races; ``quality*``: development-split experiments; ``reliability_*``: robustness and
scale; ``partitions``: class histograms of the label-skewed presets; ``selection``: do the label-free criteria
track mIoU; ``export_speed``: size and speed of exported models. Figures need the ``bench`` extra (``pip install -e '.[bench]'``: matplotlib).
"""
