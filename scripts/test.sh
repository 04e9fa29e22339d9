#!/usr/bin/env bash
# Set up (if needed) and run the test suite. Extra arguments go to pytest: `-m fast` is the quick tier (docs/testing.md).
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh || exit 1
export FUSS_SHARED="${FUSS_SHARED:-$(cd .. && pwd)/shared}"
.venv/bin/python -m pytest "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: treating as a failure" >&2
  exit 1
fi
exit "$rc"
