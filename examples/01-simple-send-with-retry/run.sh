#!/usr/bin/env bash
# Example 01: simple send with retry.
#
#   sender Orthanc (HTTP 8041) --C-STORE--> DicomFlow (11112) --C-STORE--> receiver Orthanc (HTTP 8042)
#
# 1. a study goes through at once;
# 2. the receiver is stopped, a second study waits in outbox/receiver;
# 3. the receiver comes back and the study is delivered within seconds — nobody retries by hand.
# Ports can be changed with the variables below (the test suite uses free ones).
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
BIN="$REPO/.venv/bin"
WORK="${WORK:-/tmp/dicomflow-example-01}"
ROUTER_PORT="${ROUTER_PORT:-11112}"
SENDER_HTTP="${SENDER_HTTP:-8041}"; SENDER_DICOM="${SENDER_DICOM:-4241}"
RECEIVER_HTTP="${RECEIVER_HTTP:-8042}"; RECEIVER_DICOM="${RECEIVER_DICOM:-4242}"
ORTHANC=/usr/sbin/Orthanc
TOOL="$BIN/python $REPO/examples/orthanc_tool.py"

source "$REPO/examples/lib.sh"
require_free_ports "$ROUTER_PORT" "$SENDER_HTTP" "$SENDER_DICOM" "$RECEIVER_HTTP" "$RECEIVER_DICOM"
rm -rf "$WORK"; mkdir -p "$WORK/conf/endpoints"
cleanup_on_exit "$WORK/conf"

orthanc_config() {  # name http dicom
  cat >"$WORK/$1.json" <<JSON
{ "Name": "$1", "StorageDirectory": "$WORK/$1/storage", "IndexDirectory": "$WORK/$1/index",
  "HttpPort": $2, "DicomPort": $3, "DicomAet": "$(echo "$1" | tr a-z A-Z)",
  "RemoteAccessAllowed": false, "AuthenticationEnabled": false, "Plugins": [],
  "DicomModalities": { "router": [ "DICOMFLOW", "127.0.0.1", $ROUTER_PORT ] } }
JSON
}
start_orthanc() {  # name
  TCP_NODELAY=1 "$ORTHANC" "$WORK/$1.json" >>"$WORK/$1.log" 2>&1 &
  PIDS+=($!); eval "${1^^}_PID=$!"
}

echo "== the router: conf in $WORK/conf, one endpoint 'receiver' -> RECEIVER@127.0.0.1:$RECEIVER_DICOM"
write_router_ini "$WORK/conf" "$ROUTER_PORT" "$WORK/spool"
cat >"$WORK/conf/endpoints/receiver.ini" <<INI
[endpoint]
host = 127.0.0.1
port = $RECEIVER_DICOM
ae_title = RECEIVER
INI
"$BIN/dicomflow" up --conf "$WORK/conf"

echo "== two Orthancs: sender (http://127.0.0.1:$SENDER_HTTP) and receiver (http://127.0.0.1:$RECEIVER_HTTP)"
orthanc_config sender "$SENDER_HTTP" "$SENDER_DICOM"
orthanc_config receiver "$RECEIVER_HTTP" "$RECEIVER_DICOM"
start_orthanc sender; start_orthanc receiver
$TOOL wait "http://127.0.0.1:$SENDER_HTTP"; $TOOL wait "http://127.0.0.1:$RECEIVER_HTTP"

send_study() {  # directory
  "$BIN/python" "$REPO/examples/make_study.py" "$1" 5 >/dev/null
  local study
  study=$($TOOL upload "http://127.0.0.1:$SENDER_HTTP" "$1"/*.dcm)
  $TOOL send "http://127.0.0.1:$SENDER_HTTP" router "$study"
}
wait_count() {  # expected seconds
  for _ in $(seq 1 $(($2 * 5))); do
    [ "$($TOOL count "http://127.0.0.1:$RECEIVER_HTTP" 2>/dev/null || echo 0)" -ge "$1" ] && return 0
    sleep 0.2
  done
  return 1
}

echo "== 1. study A: sender Orthanc -> DicomFlow -> receiver Orthanc"
send_study "$WORK/studyA"
wait_count 5 60 || { echo "study A did not arrive" >&2; exit 1; }
echo "   receiver Orthanc has $($TOOL count "http://127.0.0.1:$RECEIVER_HTTP") instances"

echo "== 2. receiver Orthanc stopped; study B is sent"
kill "$RECEIVER_PID"; wait "$RECEIVER_PID" 2>/dev/null || true
send_study "$WORK/studyB"
for _ in $(seq 1 150); do
  [ "$(find "$WORK/spool/outbox/receiver" -maxdepth 1 -name '*.dcm' | wc -l)" -ge 5 ] && break
  sleep 0.2
done
echo "   waiting in outbox/receiver:"
ls "$WORK/spool/outbox/receiver" | sed 's/^/     /'
[ "$(find "$WORK/spool/outbox/receiver" -maxdepth 1 -name '*.dcm' | wc -l)" -eq 5 ] \
  || { echo "study B is not waiting in the outbox" >&2; exit 1; }
sleep 2  # let the sender notice the endpoint is down, so status shows it
"$BIN/dicomflow" status --conf "$WORK/conf"

echo "== 3. receiver Orthanc restarted"
start_orthanc receiver
$TOOL wait "http://127.0.0.1:$RECEIVER_HTTP"
started=$EPOCHREALTIME
wait_count 10 60 || { echo "study B was not delivered after the receiver came back" >&2; exit 1; }
took=$(awk "BEGIN { printf \"%.1f\", $EPOCHREALTIME - $started }")
echo "   study B delivered ${took}s after the receiver came back"
"$BIN/dicomflow" status --conf "$WORK/conf"
[ "$(find "$WORK/spool/outbox/receiver" -maxdepth 1 -name '*.dcm' | wc -l)" -eq 0 ] \
  || { echo "outbox not empty" >&2; exit 1; }
echo "OK: 10 instances at the receiver, outbox empty, nothing retried by hand."
