#!/usr/bin/env bash
# The README's first command ends here: run DicomFlow on the shipped conf/ with a demo
# destination, send a sample study through it, and show where every file is.
#
# The demo destination is a DCMTK storescp on 127.0.0.1:11113 (AE DEMOPACS) — what
# conf/endpoints/pacs.ini points at. It is started here, never by the production
# configuration. The router keeps running afterwards; stop everything with
#   examples/00-demo/stop.sh
set -euo pipefail
REPO="$(cd "$(dirname "$0")/../.." && pwd)"
BIN="$REPO/.venv/bin"
CONF="${DICOMFLOW_CONF:-$REPO/conf}"
DEMO="${DEMO_DIR:-/tmp/dicomflow-demo}"
PACS_PORT=11113
mkdir -p "$DEMO/pacs"

echo "== demo destination: storescp DEMOPACS on 127.0.0.1:$PACS_PORT, files in $DEMO/pacs"
if ! (exec 3<>/dev/tcp/127.0.0.1/$PACS_PORT) 2>/dev/null; then
  TCP_NODELAY=1 nohup /usr/bin/storescp -aet DEMOPACS -od "$DEMO/pacs" +uf $PACS_PORT \
    >"$DEMO/storescp.log" 2>&1 &
  echo $! >"$DEMO/storescp.pid"
fi

echo "== dicomflow check"
"$BIN/dicomflow" check --conf "$CONF"
echo "== dicomflow up (receive, filter, send-pacs under supervisord)"
"$BIN/dicomflow" up --conf "$CONF"

SPOOL="$("$BIN/python" -c 'import sys; from pipeline.config import load; print(load(sys.argv[1]).spool)' "$CONF")"
PORT="$("$BIN/python" -c 'import sys; from pipeline.config import load; print(load(sys.argv[1]).router.port)' "$CONF")"
before=$(find "$SPOOL/sent/pacs" -maxdepth 1 -name '*.dcm' | wc -l)

echo "== sending a 5-image sample study with DCMTK storescu to DICOMFLOW@127.0.0.1:$PORT"
"$BIN/python" "$REPO/examples/make_study.py" "$DEMO/study" 5 >/dev/null
TCP_NODELAY=1 /usr/bin/storescu -aet DEMO_CT -aec DICOMFLOW 127.0.0.1 "$PORT" "$DEMO"/study/*.dcm
rm -rf "$DEMO/study"

for _ in $(seq 1 120); do
  now=$(find "$SPOOL/sent/pacs" -maxdepth 1 -name '*.dcm' | wc -l)
  [ $((now - before)) -ge 5 ] && break
  sleep 0.5
done
echo "== dicomflow status"
"$BIN/dicomflow" status --conf "$CONF"
echo "== ls $SPOOL/sent/pacs | tail -5"
ls "$SPOOL/sent/pacs" | tail -5
if [ $((now - before)) -lt 5 ]; then
  echo "demo: the study did not reach the demo destination; see $SPOOL/log/" >&2
  exit 1
fi
echo
echo "The study went modality -> receive -> incoming/ -> filter -> outbox/pacs -> send-pacs -> DEMOPACS."
echo "DicomFlow keeps running on port $PORT. Stop it with: examples/00-demo/stop.sh"
