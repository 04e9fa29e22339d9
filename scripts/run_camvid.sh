#!/usr/bin/env bash
# Set up (if needed) and run the main job: the camvid federation in the NVIDIA FLARE simulator.
# 3 training sites (0001TP, 0006R0, 0016E5) + the held-out validation site Seq05VD = 4 simulated clients.
# Extra arguments go to `nvflare simulator` (e.g. -t 2 to use fewer threads).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export FUSS_SHARED="${FUSS_SHARED:-$(cd .. && pwd)/shared}"
export FUSS_CACHE_DIR="${FUSS_CACHE_DIR:-$PWD/fuss_cache}"
WORKSPACE="${WORKSPACE:-$PWD/workspaces/fuss_camvid}"
echo "data/weights: $FUSS_SHARED  feature cache: $FUSS_CACHE_DIR  workspace: $WORKSPACE"
.venv/bin/nvflare simulator jobs/fuss_camvid -w "$WORKSPACE" -n 4 -t 4 "$@"
echo "done: global model, metrics.json and TensorBoard events under $WORKSPACE/server/simulate_job/"
echo "      tensorboard --logdir $WORKSPACE/server/simulate_job/tb_events"
