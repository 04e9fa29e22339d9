#!/usr/bin/env bash
# Set up (if needed) and run the main job: the camvid federation in the NVIDIA FLARE simulator.
# The job's deploy_map names its four sites (0001TP, 0006R0, site-0016E5 train; Seq05VD validates), so no -n;
# -t 4 runs them side by side (each site then uses cores / 4 threads). Run from the repository root: the
# simulator's default workspace ./simulator_workspace holds FUSS's class allow list in local/.
# Extra arguments go to `nvflare simulator`, run through benchmarks/simulator_launcher.py: nvflare 2.9.0's
# simulator can start two client processes under one name (docs/reliability.md 2); the launcher closes that race.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export FUSS_SHARED="${FUSS_SHARED:-$(cd .. && pwd)/shared}"
echo "data/weights: $FUSS_SHARED  feature cache: ${FUSS_CACHE_DIR:-~/.cache/fuss}  workspace: $PWD/simulator_workspace"
.venv/bin/python benchmarks/simulator_launcher.py simulator jobs/fuss_camvid -t 4 "$@"
echo "done: global model, metrics.json and TensorBoard events under $PWD/simulator_workspace/server/simulate_job/"
echo "      .venv/bin/tensorboard --logdir $PWD/simulator_workspace/server/simulate_job/tb_events"
