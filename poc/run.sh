#!/usr/bin/env bash
# One command: FUSS on a local NVIDIA FLARE federation (POC or provisioned kits), loopback only.
# Prepares the kits, gives every site its own data folder / partition entry / config, starts server and sites,
# submits a FUSS job, follows it, downloads the result (+ audit logs) and stops and cleans everything, also on
# failure or Ctrl-C. Options: bash poc/run.sh --help. Details: docs/deployment.md.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  bash scripts/setup.sh || exit 1
fi
export FUSS_SHARED="${FUSS_SHARED:-$(cd .. && pwd)/shared}"
exec .venv/bin/python poc/fuss_poc.py "$@"
