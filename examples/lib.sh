# Shared by the example scripts (sourced, not run).

# require_free_ports PORT… — stop with a clear message if one is taken.
require_free_ports() {
  local port
  for port in "$@"; do
    if (exec 3<>/dev/tcp/127.0.0.1/"$port") 2>/dev/null; then
      echo "port $port is in use (Debian's own orthanc service? try: systemctl stop orthanc)" >&2
      exit 1
    fi
  done
}

# cleanup_on_exit CONF_DIR — at exit: dicomflow down, then kill every pid in PIDS.
cleanup_on_exit() {
  CLEANUP_CONF="$1"
  PIDS=()
  trap '"$BIN/dicomflow" down --conf "$CLEANUP_CONF" >/dev/null 2>&1 || true
        for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
        wait 2>/dev/null || true' EXIT
}

# write_router_ini CONF_DIR PORT SPOOL — the router.ini both examples use.
write_router_ini() {
  cat >"$1/router.ini" <<INI
[router]
ae_title = DICOMFLOW
bind = 127.0.0.1
port = $2
spool = $3
INI
}

# write_orthanc_json FILE NAME DIR HTTP DICOM AET MODALITIES — an Orthanc configuration:
# storage and index in DIR, REST without authentication but on 127.0.0.1 only, no
# plugins; MODALITIES is the JSON object of its DicomModalities, e.g.
#   '{ "router": [ "DICOMFLOW", "127.0.0.1", 11112 ] }'
write_orthanc_json() {
  cat >"$1" <<JSON
{ "Name": "$2", "StorageDirectory": "$3/storage", "IndexDirectory": "$3/index",
  "HttpPort": $4, "DicomPort": $5, "DicomAet": "$6",
  "RemoteAccessAllowed": false, "AuthenticationEnabled": false, "Plugins": [],
  "DicomModalities": $7 }
JSON
}

# window_now PYTHON WINDOW — prints "open" or "closed", then the next opening (HH:MM:SS)
# and the seconds until the window's state next changes (DicomFlow's own parser).
window_now() {
  "$1" - "$2" <<'PY'
import sys
from datetime import datetime, timedelta
from pipeline.schedule import parse_window
w = parse_window(sys.argv[1]); now = datetime.now()
state = w.is_open(now)
change = now.replace(second=0, microsecond=0) + timedelta(minutes=1)
while w.is_open(change) == state and change - now < timedelta(days=8):
    change += timedelta(minutes=1)
print("open" if state else "closed", w.next_open(now).strftime("%H:%M:%S"),
      int((change - now).total_seconds()))
PY
}
