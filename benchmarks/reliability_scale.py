"""Scale benchmark: CamVid split further by frame ranges into N simulated clients, a short FUSS job
through the NVIDIA FLARE simulator with the real backbone's cached features, peak RSS per process and wall time per
round against N, and (several ``--local-steps``) wall time against the local steps per round.

    FUSS_SHARED=../shared FUSS_CACHE_DIR=/path/to/camvid/cache \
        python -m benchmarks.reliability_scale --clients 3 6 12 --out docs/results/reliability_scale.json
    ... python -m benchmarks.reliability_scale --clients 3 --local-steps 5 20 80 --out docs/results/scale_local_steps.json

Each training sequence (0001TP, 0006R0, 0016E5) is cut into contiguous frame ranges, the number of ranges per
sequence proportional to its size (largest remainder, at least one each): 3 -> 1/1/1, 6 -> 1/1/4, 12 -> 3/2/7.
Seq05VD validates. Every client holds all images of its range (530 training images in total, whatever N), so the
feature memory is the same and the per-process overhead is what grows with N. Default schedule: 3 rounds x 5
local steps, validation after the last round only (so round 0 = first use of the cache, round 1 = a plain
training round, round 2 = training + validation of Seq05VD's 171 images).

Set ``OMP_NUM_THREADS=1`` in the environment to give each process one intra-op thread (see docs/reliability.md:
on 2 cores, many processes with torch's default of 2 threads each spin against each other).

Memory is sampled from /proc every 0.25 s over the simulator and all its descendants: per process the peak
resident set (``VmHWM``), and the largest sum of resident sets at one instant (a fork that has not exec'd yet
shares its parent's pages and is not counted). Round times are the server's
"Round r started" -> "Round r finished." log timestamps (round 0 includes loading and checking each client's
cached features and building its kNN index).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

TRAIN_SEQUENCES = ("0001TP", "0006R0", "0016E5")
VALIDATION_SEQUENCE = "Seq05VD"


def clients_per_sequence(sizes: dict[str, int], n: int) -> dict[str, int]:
    """Largest-remainder apportionment of ``n`` clients over sequences by size, at least one each."""
    if n < len(sizes):
        raise ValueError(f"need at least {len(sizes)} clients (one per sequence), got {n}")
    total = sum(sizes.values())
    quota = {s: n * k / total for s, k in sizes.items()}
    counts = {s: max(1, int(q)) for s, q in quota.items()}
    order = sorted(sizes, key=lambda s: (-(quota[s] - int(quota[s])), s))
    i = 0
    while sum(counts.values()) < n:
        counts[order[i % len(order)]] += 1
        i += 1
    while sum(counts.values()) > n:  # only when the "at least one" floor overshot
        big = max((s for s in counts if counts[s] > 1), key=lambda s: counts[s] - quota[s])
        counts[big] -= 1
    return counts


def frame_range_partition(dataset, n: int, validation_every: int = 1, frame_step: int = 1):
    """Partition (fuss_components.partition) of the camvid training sequences into ``n`` frame-range clients;
    ``frame_step`` keeps every k-th frame (a subset for quick runs)."""
    import numpy as np

    from fuss_components.partition import Partition, partition_by_site

    by_site = partition_by_site(dataset, TRAIN_SEQUENCES, [VALIDATION_SEQUENCE], seed=0)
    sizes = {s: len(by_site.clients[s]) for s in TRAIN_SEQUENCES}
    counts = clients_per_sequence(sizes, n)
    clients = {}
    for seq in TRAIN_SEQUENCES:
        ids = sorted(by_site.clients[seq])[::frame_step]  # <sequence>_<zero-padded frame>: sorted = frame order
        for j, chunk in enumerate(np.array_split(np.array(ids, dtype=object), counts[seq])):
            clients[f"{seq}_r{j + 1}"] = [str(i) for i in chunk]
    validation = {VALIDATION_SEQUENCE: sorted(by_site.validation[VALIDATION_SEQUENCE])[::validation_every]}
    return Partition(dataset=dataset.name, strategy="site", seed=0, num_classes=dataset.num_classes,
                     clients=clients, validation=validation,
                     meta={"split": "frame ranges per sequence", "clients_per_sequence": counts})


# ------------------------------------------------------------------------------------------- /proc sampling


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            kids.setdefault(int(fields[1]), []).append(int(entry))
        except (OSError, IndexError, ValueError):
            continue
    return kids


def _tree(root: int) -> list[int]:
    kids, out, todo = _children(), [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(kids.get(pid, []))
    return out


def _status(pid: int) -> dict[str, str]:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                out[key] = value.strip()
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            out["cmdline"] = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        pass
    return out


def _kb(text: str | None) -> int:
    return int(text.split()[0]) if text else 0


def _role(cmdline: str) -> str:
    match = re.search(r"simulator_worker .*?-o \S*/([^/\s]+)", cmdline)
    if match:
        return match.group(1)
    if "simulator_worker" in cmdline:
        return "worker"
    if "nvflare" in cmdline and "simulator" in cmdline:
        return "simulator/server"
    return cmdline.split(" ")[0].rsplit("/", 1)[-1] or "?"


def run_monitored(cmd: list[str], env: dict, log_path: Path, timeout: float, interval: float = 0.25,
                  workspace: Path | None = None) -> dict:
    """Run ``cmd``; sample its process tree until it ends. Returns rc, wall seconds, per-process peaks (MB), and
    ``start_race``: the FLARE start-up race (benchmarks.simulator.START_RACES) seen in ``workspace``'s logs,
    after which the run was killed (it would otherwise wait for the lost client for ever)."""
    from benchmarks.simulator import START_RACES, LogWatch, kill_group

    peaks: dict[int, dict] = {}
    peak_total_kb = 0
    race = None
    watch = LogWatch(workspace) if workspace else None
    started = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            while proc.poll() is None:
                race = watch and next((m for m in START_RACES if m in watch.new_text()), None)
                if race or time.perf_counter() - started > timeout:
                    kill_group(proc)
                    break
                total = 0
                tree = {pid: _status(pid) for pid in _tree(proc.pid)}
                for pid, st in tree.items():
                    if not st.get("VmHWM"):
                        continue
                    parent = tree.get(int(st.get("PPid", "0") or 0), {})
                    if parent and parent.get("cmdline") == st.get("cmdline"):
                        continue  # a fork that has not exec'd yet (e.g. a subprocess call): shares its parent's pages
                    total += _kb(st.get("VmRSS"))
                    entry = peaks.setdefault(pid, {"role": "?", "hwm_kb": 0})
                    entry["role"] = _role(st.get("cmdline", ""))  # latest: a fresh fork still shows its parent's
                    entry["hwm_kb"] = max(entry["hwm_kb"], _kb(st["VmHWM"]))
                peak_total_kb = max(peak_total_kb, total)
                time.sleep(interval)
        finally:
            rc = proc.wait()
    wall = time.perf_counter() - started
    processes = sorted(({"pid": pid, "role": e["role"], "peak_rss_mb": round(e["hwm_kb"] / 1024, 1)}
                        for pid, e in peaks.items() if e["hwm_kb"] > 50 * 1024), key=lambda e: -e["peak_rss_mb"])
    return {"rc": rc, "wall_s": round(wall, 1), "processes": processes,
            "peak_total_rss_mb": round(peak_total_kb / 1024, 1), "start_race": race}


def round_times(server_log: Path) -> list[dict]:
    stamp = r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) .*"
    starts, ends = {}, {}
    for line in server_log.read_text(errors="replace").splitlines():
        m = re.match(stamp + r"Round (\d+) (started|finished)", line)
        if m:
            t = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
            (starts if m.group(3) == "started" else ends)[int(m.group(2))] = t
    return [{"round": r, "seconds": round(ends[r] - starts[r], 1)} for r in sorted(starts) if r in ends]


# ------------------------------------------------------------------------------------------- one run


def scale_manifest(n: int, work: Path, validation_every: int = 1, frame_step: int = 1) -> Path:
    """The N-client frame-range partition of CamVid, saved as ``work/camvid_<n>clients.json``."""
    from fuss_components.datasets import open_dataset
    from fuss_components.paths import data_root

    work.mkdir(parents=True, exist_ok=True)
    part = frame_range_partition(open_dataset("camvid", data_root()), n, validation_every, frame_step)
    return part.save(work / f"camvid_{n}clients.json")


def run_scale(n: int, work: Path, rounds: int = 2, local_steps: int = 5, validation_every: int = 1,
              timeout: float = 1200, extra_env: dict | None = None, sim_threads: int | None = None,
              frame_step: int = 1) -> dict:
    """Export and simulate the N-client job; returns the measurements (and the workspace path)."""
    from benchmarks.simulator import nvflare_command
    from fuss_components.config import FussConfig
    from fuss_components.presets import PRESETS
    from fuss_flare.job import main as export

    from fuss_components.partition import Partition
    from fuss_flare import site_policy

    manifest = scale_manifest(n, work, validation_every, frame_step)
    part = Partition.load(manifest)
    cfg = FussConfig.from_dict({"partition": str(manifest), "train": {"num_clusters": PRESETS["camvid"].num_clusters},
                                "federation": {"rounds": rounds, "local_steps": local_steps}})
    cfg.save(work / "config.json")
    name = f"camvid_{n}clients"
    rc = export(["export", "--config", str(work / "config.json"), "--name", name, "--out", str(work / "jobs")])
    if rc != 0:
        raise RuntimeError(f"job export failed ({rc})")
    sites = n + 1
    ws = work / "ws"
    env = {**os.environ, **(extra_env or {})}
    threads = min(sim_threads or sites, sites)
    for attempt in range(2):  # one restart after a FLARE start-up race, in a fresh workspace
        if attempt:
            ws = work / "ws_restart"
        site_policy.install(ws)  # FUSS's class allow list: the simulator's participants need it like real sites
        cmd = [*nvflare_command(), "simulator", str(work / "jobs" / name), "-w", str(ws), "-t", str(threads)]
        result = run_monitored(cmd, env, work / "simulator.log", timeout, workspace=ws)
        if not result["start_race"]:
            break
    app = ws / "server" / "simulate_job" / "app_server"
    metrics = json.loads((app / "metrics.json").read_text()) if (app / "metrics.json").is_file() else {}
    site_peaks = [p["peak_rss_mb"] for p in result["processes"] if p["role"] in part.clients or
                  p["role"] in part.validation]
    result.update(
        clients=n, sites=sites, sim_threads=threads, omp_num_threads=env.get("OMP_NUM_THREADS"), rounds=rounds, local_steps=local_steps, images=sum(part.sizes().values()),
        clients_per_sequence=part.meta["clients_per_sequence"], workspace=str(ws),
        round_seconds=round_times(ws / "server" / "log.txt") if (ws / "server" / "log.txt").is_file() else [],
        accepted=[r.get("accepted", []) for r in metrics.get("rounds", [])],
        final_val_miou=(metrics.get("final") or {}).get("val_miou"),
        error=metrics.get("error"),
        max_site_process_rss_mb=max(site_peaks) if site_peaks else None,
        server_process_rss_mb=max((p["peak_rss_mb"] for p in result["processes"]
                                   if p["role"] == "simulator/server"), default=None),
    )
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[3, 6, 12])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--local-steps", type=int, nargs="+", default=[5],
                        help="local steps per round; several values measure wall time against local steps")
    parser.add_argument("--sim-threads", type=int, default=None,
                        help="simulator -t (default: one per site; fewer = a fresh worker process per task)")
    parser.add_argument("--work", default=None, help="folder for manifests, jobs and workspaces (default: temp)")
    parser.add_argument("--out", default=None, help="write the measurements as JSON here")
    args = parser.parse_args(argv)
    work = Path(args.work or tempfile.mkdtemp(prefix="fuss_scale_")).resolve()  # the sites run in other folders
    results = []
    for n, steps in itertools.product(args.clients, args.local_steps):
        folder = work / (f"n{n}" if len(args.local_steps) == 1 else f"n{n}_steps{steps}")
        res = run_scale(n, folder, args.rounds, steps, sim_threads=args.sim_threads)
        results.append(res)
        print(json.dumps({k: res[k] for k in ("clients", "local_steps", "sim_threads", "omp_num_threads", "rc", "wall_s", "round_seconds", "peak_total_rss_mb",
                                              "max_site_process_rss_mb", "server_process_rss_mb",
                                              "final_val_miou", "error", "processes")}), flush=True)
    if args.out:
        from fuss_components.files import atomic_write_json

        atomic_write_json(args.out, results, indent=1)
    return 0 if all(r["rc"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
