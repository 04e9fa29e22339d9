"""The prepared GPU check (benchmarks/gpu_check.py) rehearsed on the CPU: one run measures every figure and
writes them, so that the short time a GPU machine is lent is spent measuring, not debugging."""

from __future__ import annotations

import json

from benchmarks import gpu_check


def test_gpu_check_rehearsal_on_the_cpu_writes_every_figure(tmp_path):
    out = tmp_path / "gpu.json"
    args = gpu_check.get_args_parser().parse_args(
        ["--device", "cpu", "--images", "4", "--validation-images", "3", "--steps", "2", "4", "--backbone",
         "fuss_tiny_vit_patch14", "--block", "-1", "--dim", "8",
         "--no-simulator", "--work", str(tmp_path / "work"), "--out", str(out)])
    gpu_check.main(args)
    report = json.loads(out.read_text())
    assert report["device"] == "cpu" and "card" not in report
    assert report["extraction"]["images"] == 4 and report["extraction"]["images_per_second"] > 0
    assert report["training"]["steps_per_second"] > 0
    assert set(report["training"]["round_seconds"]) == {"2", "4"}
    assert report["evaluation"]["images"] == 3 and 0.0 <= report["evaluation"]["miou"] <= 1.0
