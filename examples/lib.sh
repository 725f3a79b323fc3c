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
