#!/usr/bin/env bash
# Stop what examples/00-demo/run.sh started: the router and the demo destination.
set -uo pipefail
REPO="$(cd "$(dirname "$0")/../.." && pwd)"
DEMO="${DEMO_DIR:-/tmp/dicomflow-demo}"
"$REPO/.venv/bin/dicomflow" down --conf "${DICOMFLOW_CONF:-$REPO/conf}"
if [ -f "$DEMO/storescp.pid" ]; then
  kill "$(cat "$DEMO/storescp.pid")" 2>/dev/null || true
  rm -f "$DEMO/storescp.pid"
fi
