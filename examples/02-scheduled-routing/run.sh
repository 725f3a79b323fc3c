#!/usr/bin/env bash
# Example 02: scheduled routing to two destinations.
#
#   storescu --> DicomFlow --> local  (storescp, always open, everything)
#                          \-> remote (storescp, delivery window, CT images only —
#                                      structured reports are not sent remote)
#
# The remote window is the older DicomFlowRouter cyclic form `m10 < 5` (open during the
# first 5 minutes of every 10). With EXAMPLE_FAST=1 (used by the test suite) it is
# instead a short HH:MM - HH:MM range opening about a minute from now. Any window can
# be given with REMOTE_WINDOW='19:00 - 07:00' (or a cron expression).
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
BIN="$REPO/.venv/bin"
WORK="${WORK:-/tmp/dicomflow-example-02}"
ROUTER_PORT="${ROUTER_PORT:-11112}"
LOCAL_PORT="${LOCAL_PORT:-11121}"
REMOTE_PORT="${REMOTE_PORT:-11122}"
PY="$BIN/python"

if [ -z "${REMOTE_WINDOW:-}" ]; then
  if [ "${EXAMPLE_FAST:-0}" = 1 ]; then
    REMOTE_WINDOW=$("$PY" -c '
from datetime import datetime, timedelta
now = datetime.now()
start = (now + timedelta(minutes=2 if now.second > 40 else 1)).replace(second=0, microsecond=0)
end = start + timedelta(minutes=3)
print(f"{start:%H:%M} - {end:%H:%M}")')
  else
    REMOTE_WINDOW="m10 < 5"
  fi
fi

source "$REPO/examples/lib.sh"
require_free_ports "$ROUTER_PORT" "$LOCAL_PORT" "$REMOTE_PORT"
rm -rf "$WORK"; mkdir -p "$WORK/conf/endpoints" "$WORK/local" "$WORK/remote"
cleanup_on_exit "$WORK/conf"

write_router_ini "$WORK/conf" "$ROUTER_PORT" "$WORK/spool"
cat >"$WORK/conf/endpoints/local.ini" <<INI
; the local PACS: everything, always
[endpoint]
host = 127.0.0.1
port = $LOCAL_PORT
ae_title = LOCAL
INI
cat >"$WORK/conf/endpoints/remote.ini" <<INI
; the remote site: CT images only, and only inside its delivery window
[endpoint]
host = 127.0.0.1
port = $REMOTE_PORT
ae_title = REMOTE
[filter]
sop_whitelist = CTImageStorage
[schedule]
window = $REMOTE_WINDOW
INI
echo "== remote window: $REMOTE_WINDOW"
"$BIN/dicomflow" check --conf "$WORK/conf"

for side in local remote; do
  port_var="${side^^}_PORT"
  TCP_NODELAY=1 /usr/bin/storescp -aet "${side^^}" -od "$WORK/$side" +uf "${!port_var}" \
    >"$WORK/$side.log" 2>&1 &
  PIDS+=($!)
done
"$BIN/dicomflow" up --conf "$WORK/conf"

read -r state opens _ < <(window_now "$PY" "$REMOTE_WINDOW")  # examples/lib.sh
if [ "$state" = open ]; then
  echo "== the remote window is open right now; waiting for it to close so the wait can be seen"
  while [ "$(window_now "$PY" "$REMOTE_WINDOW" | cut -d' ' -f1)" = open ]; do sleep 5; done
fi
count() { find "$1" -maxdepth 1 -type f | wc -l; }

echo "== sending a study: 4 CT images + 1 structured report"
"$PY" "$REPO/examples/make_study.py" "$WORK/study" 4 --sr >/dev/null
TCP_NODELAY=1 /usr/bin/storescu -aet MODALITY -aec DICOMFLOW 127.0.0.1 "$ROUTER_PORT" "$WORK"/study/*.dcm
for _ in $(seq 1 300); do [ "$(count "$WORK/local")" -ge 5 ] && break; sleep 0.2; done
echo "   local has $(count "$WORK/local") files (at once); remote has $(count "$WORK/remote")"
[ "$(count "$WORK/local")" -eq 5 ] || { echo "local did not get the study" >&2; exit 1; }
[ "$(count "$WORK/remote")" -eq 0 ] || { echo "remote got files outside its window" >&2; exit 1; }
sleep 1
"$BIN/dicomflow" status --conf "$WORK/conf"
echo "   waiting in outbox/remote (the report is not there: remote takes CT only):"
ls "$WORK/spool/outbox/remote" | sed 's/^/     /'

read -r state opens _ < <(window_now "$PY" "$REMOTE_WINDOW")  # examples/lib.sh
echo "== waiting for the remote window to open at $opens"
for _ in $(seq 1 ${WAIT_LIMIT:-720}); do [ "$(count "$WORK/remote")" -ge 4 ] && break; sleep 1; done
echo "   $(date +%H:%M:%S): remote has $(count "$WORK/remote") files"
"$BIN/dicomflow" status --conf "$WORK/conf"
[ "$(count "$WORK/remote")" -eq 4 ] || { echo "remote did not get the 4 CT images" >&2; exit 1; }
[ "$(count "$WORK/local")" -eq 5 ] || { echo "local count changed" >&2; exit 1; }
echo "OK: local got 5 at once; remote got the 4 CT images when its window opened, not the report."
