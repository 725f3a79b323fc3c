#!/usr/bin/env bash
# Example 03: two sites over a WireGuard VPN, in network namespaces (run as root).
#
#   site A (df3-a)                                                         site B (df3-b)
#   sender Orthanc --> DicomFlow --> archive Orthanc (always, everything)
#                               \--> gateway A ==WireGuard over a slow WAN==> gateway B --> PACS Orthanc
#                                    (window m10 < 5, CT and MR only, associations = 4)
#
# run.sh builds the topology (stop.sh removes it; run.sh first removes what an earlier,
# perhaps interrupted, run left), sends studies from the sender Orthanc's REST API and
# shows where they went; everything stays up afterwards for you to look at.
#   1. a study sent while the window is closed: the archive has it at once, site B not;
#   2. the window opens: site B gets its CT images (never the structured report);
#   3. the WAN link is cut: a second study waits for site B, its endpoint shows down and
#      no file is charged an attempt; the WAN comes back: drained within seconds.
# run.sh --bench instead times a queued study's transfer to site B over the WAN with
# associations = 1 and 4, beside what the link allows. Settings (environment):
#   WINDOW ('m10 < 5'), IMAGES (10), RTT_MS (40), RATE_MBIT (100), ASSOCIATIONS (4; empty:
#   the key is left out), WORK (/tmp/dicomflow-example-03), VENV (the repository's .venv),
#   BENCH_IMAGES (500), BENCH_SIZE (512: rows = columns, 0.5 MB images), BENCH_ASSOCIATIONS ('1 4').
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
VENV="${VENV:-$REPO/.venv}"
BIN="$VENV/bin"
PY="$BIN/python"
WORK="${WORK:-/tmp/dicomflow-example-03}"
WINDOW="${WINDOW:-m10 < 5}"
IMAGES="${IMAGES:-10}"
RTT_MS="${RTT_MS:-40}"
RATE_MBIT="${RATE_MBIT:-100}"
ASSOCIATIONS="${ASSOCIATIONS-4}"
WAIT_LIMIT="${WAIT_LIMIT:-720}"   # seconds to wait for a window to open or close
MODE=demo
[ "${1:-}" = --bench ] && MODE=bench
source "$REPO/examples/lib.sh"
source "$HERE/topology.sh"
TOOL="$PY $REPO/examples/orthanc_tool.py"

step() { echo "== $*"; }
die() { echo "run.sh: $*" >&2; echo "(everything is left up to look at; remove it with $HERE/stop.sh)" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "needs root (network namespaces, veths, tc, WireGuard)"
for binary in /usr/bin/wireguard-go /usr/bin/wg /usr/sbin/Orthanc "$BIN/dicomflow"; do
  [ -x "$binary" ] || die "$binary is missing (README: apt-get install -y wireguard-go wireguard-tools orthanc)"
done

step "removing what an earlier run left (stop.sh)"
WORK="$WORK" VENV="$VENV" "$HERE/stop.sh" >/dev/null
rm -rf "$WORK"; mkdir -p "$WORK/wg" "$WORK/conf/endpoints"

# --- the topology -------------------------------------------------------------------
step "namespaces: $NAMESPACES"
for ns in $NAMESPACES; do ip netns add "$ns"; ip -n "$ns" link set lo up; done
veth() {  # veth NS1 IF1 ADDR1/LEN NS2 IF2 ADDR2/LEN — one link, both ends inside namespaces
  ip link add "$2" netns "$1" type veth peer name "$5" netns "$4"
  ip -n "$1" addr add "$3" dev "$2"; ip -n "$1" link set "$2" up
  ip -n "$4" addr add "$6" dev "$5"; ip -n "$4" link set "$5" up
}
step "site A LAN $NET_A, site B LAN $NET_B, WAN 198.18.100.0/30 + 198.18.100.4/30"
veth "$NS_A" df3-a0 "$IP_A/24" "$NS_GWA" df3-gwa0 "$IP_GWA_LAN/24"
veth "$NS_GWA" df3-gwa1 "$IP_GWA_WAN/30" "$NS_WAN" df3-wan0 "$IP_WAN_A/30"
veth "$NS_WAN" df3-wan1 "$IP_WAN_B/30" "$NS_GWB" df3-gwb1 "$IP_GWB_WAN/30"
veth "$NS_B" df3-b0 "$IP_B/24" "$NS_GWB" df3-gwb0 "$IP_GWB_LAN/24"
# Each site routes only the other site's subnet, through its gateway; the gateways
# forward, the WAN namespace does not (only the relay crosses it).
ip -n "$NS_A" route add "$NET_B" via "$IP_GWA_LAN"
ip -n "$NS_B" route add "$NET_A" via "$IP_GWB_LAN"
for ns in "$NS_GWA" "$NS_GWB"; do in_ns "$ns" sh -c 'echo 1 >/proc/sys/net/ipv4/ip_forward'; done  # per namespace

step "WAN: ${RTT_MS} ms round trip (udp_delay.py in $NS_WAN), ${RATE_MBIT} Mbit/s each way (tc tbf)"
for dev in df3-wan0 df3-wan1; do
  # burst: a few ms at the rate (tbf needs more than rate/HZ); latency bounds its queue
  in_ns "$NS_WAN" tc qdisc add dev "$dev" root tbf rate "${RATE_MBIT}mbit" burst 64kb latency 100ms
done
delay=$(awk "BEGIN { print $RTT_MS / 2000 }")
in_ns "$NS_WAN" setsid "$PY" "$HERE/udp_delay.py" --delay "$delay" \
  "$IP_WAN_A:$WG_PORT=$IP_GWA_WAN:$WG_PORT" "$IP_WAN_B:$WG_PORT=$IP_GWB_WAN:$WG_PORT" \
  >"$WORK/udp_delay.log" 2>&1 </dev/null &

step "WireGuard: $WG_A in $NS_GWA <-> $WG_B in $NS_GWB (wireguard-go), endpoints through the relay"
(umask 077; for gw in a b; do wg genkey >"$WORK/wg/$gw.key"; wg pubkey <"$WORK/wg/$gw.key" >"$WORK/wg/$gw.pub"; done)
wireguard() {  # wireguard NS IFNAME KEY PEER_PUB PEER_NET ENDPOINT
  WG_PROCESS_FOREGROUND=1 in_ns "$1" setsid /usr/bin/wireguard-go "$2" >"$WORK/$2.log" 2>&1 </dev/null &
  for _ in $(seq 1 100); do [ -S "$WG_SOCKETS/$2.sock" ] && break; sleep 0.1; done
  [ -S "$WG_SOCKETS/$2.sock" ] || die "wireguard-go did not start $2 (see $WORK/$2.log)"
  in_ns "$1" wg set "$2" listen-port "$WG_PORT" private-key "$WORK/wg/$3.key" \
    peer "$(cat "$WORK/wg/$4.pub")" allowed-ips "$5" endpoint "$6" persistent-keepalive 15
  ip -n "$1" link set "$2" up
  ip -n "$1" route replace "$5" dev "$2"
}
wireguard "$NS_GWA" "$WG_A" a b "$NET_B" "$IP_WAN_A:$WG_PORT"
wireguard "$NS_GWB" "$WG_B" b a "$NET_A" "$IP_WAN_B:$WG_PORT"

# --- the Orthancs -------------------------------------------------------------------
start_orthanc() {  # NS NAME HTTP DICOM AET MODALITIES
  write_orthanc_json "$WORK/$2.json" "$2" "$WORK/$2" "$3" "$4" "$5" "$6"
  TCP_NODELAY=1 in_ns "$1" setsid /usr/sbin/Orthanc "$WORK/$2.json" >>"$WORK/$2.log" 2>&1 </dev/null &
}
step "Orthancs: sender ($NS_A, SENDER, REST :$SENDER_HTTP), archive ($NS_A, ARCHIVE@$IP_A:$ARCHIVE_DICOM),"
echo "   site B PACS ($NS_B, SITEB@$IP_B:$SITEB_DICOM); REST on each namespace's own 127.0.0.1"
start_orthanc "$NS_A" sender "$SENDER_HTTP" "$SENDER_DICOM" SENDER \
  "{ \"router\": [ \"DICOMFLOW\", \"$IP_A\", $ROUTER_PORT ] }"
start_orthanc "$NS_A" archive "$ARCHIVE_HTTP" "$ARCHIVE_DICOM" ARCHIVE "{}"
start_orthanc "$NS_B" siteb "$SITEB_HTTP" "$SITEB_DICOM" SITEB "{}"
in_ns "$NS_A" $TOOL wait "http://127.0.0.1:$SENDER_HTTP"
in_ns "$NS_A" $TOOL wait "http://127.0.0.1:$ARCHIVE_HTTP"
in_ns "$NS_B" $TOOL wait "http://127.0.0.1:$SITEB_HTTP"
count() { in_ns "$1" $TOOL count "http://127.0.0.1:$2"; }   # count NS HTTP_PORT

step "the tunnel: site A reaches SITEB@$IP_B:$SITEB_DICOM through it"
for _ in $(seq 1 100); do
  in_ns "$NS_A" timeout 2 bash -c "exec 3<>/dev/tcp/$IP_B/$SITEB_DICOM" 2>/dev/null && break
  sleep 0.2
done
in_ns "$NS_A" timeout 2 bash -c "exec 3<>/dev/tcp/$IP_B/$SITEB_DICOM" 2>/dev/null || die "no path through the tunnel"
in_ns "$NS_GWA" wg show "$WG_A" | sed -n '/latest handshake/s/^ */   /p'

# --- DicomFlow in site A ------------------------------------------------------------
SPOOL="$WORK/spool"
cat >"$WORK/conf/router.ini" <<INI
[router]
ae_title = DICOMFLOW
bind = $IP_A
port = $ROUTER_PORT
spool = $SPOOL
INI
associations_line() {  # the [endpoint] associations line, or a note that it is left out
  if [ -n "$1" ]; then echo "associations = $1"; else echo "; associations left out (ASSOCIATIONS='')"; fi
}
write_siteb_ini() {  # ASSOCIATIONS WINDOW_LINES FILTER_LINES [COERCE_LINES]
  cat >"$WORK/conf/endpoints/siteb.ini" <<INI
; site B's PACS, across the VPN
[endpoint]
host = $IP_B
port = $SITEB_DICOM
ae_title = SITEB
; a thin, distant link: several associations keep it busy while each waits for its answers
$(associations_line "$1")
$2
$3
${4:-}
INI
}
flow() { in_ns "$NS_A" "$BIN/dicomflow" "$@" --conf "$WORK/conf"; }
siteb_state() { flow status --json | "$PY" -c 'import json, sys; print(json.load(sys.stdin)["endpoints"]["siteb"]["state"])'; }
files_in() { find "$1" -maxdepth 1 -type f -name '*.dcm' 2>/dev/null | wc -l; }
associations_open() { in_ns "$NS_A" ss -Htn state established dst "$IP_B" | wc -l; }

if [ "$MODE" = bench ]; then
  BENCH_IMAGES="${BENCH_IMAGES:-500}"; BENCH_SIZE="${BENCH_SIZE:-512}"
  write_siteb_ini "" "" ""
  step "bench: DicomFlow in $NS_A ($IP_A:$ROUTER_PORT), one endpoint: siteb (no window, no filter)"
  flow check; flow up
  CTL=("$BIN/supervisorctl" -c "$SPOOL/run/supervisord.conf")
  sender_took() {  # LOG — seconds from the sender's last start to its last delivery, by its own log
    # (the process's start-up is left out: in service a sender is started once, not per study)
    "$PY" - "$1" <<'PY'
import sys
from datetime import datetime
lines = open(sys.argv[1]).read().splitlines()
start = max(i for i, line in enumerate(lines) if "| sender started" in line)
stamp = lambda line: datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S.%f")
last = [line for line in lines[start:] if line.endswith("| delivered")][-1]
print(f"{(stamp(last) - stamp(lines[start])).total_seconds():.2f}")
PY
  }
  step "bench: what the path carries, bulk TCP through the tunnel (tcp_rate.py, 4 streams, 3 s)"
  in_ns "$NS_B" setsid "$PY" "$HERE/tcp_rate.py" serve "$IP_B" 5001 >"$WORK/tcp_rate.log" 2>&1 </dev/null &
  for _ in $(seq 1 50); do in_ns "$NS_A" timeout 2 bash -c "exec 3<>/dev/tcp/$IP_B/5001" 2>/dev/null && break; sleep 0.1; done
  path_mbit=$(in_ns "$NS_A" "$PY" "$HERE/tcp_rate.py" send "$IP_B" 5001 3 4)
  echo "   ${path_mbit} Mbit/s (the WAN's cap: ${RATE_MBIT} Mbit/s; ${RTT_MS} ms round trip)"
  printf '\n%-13s %6s %7s %9s %9s %9s %s\n' associations images MB "time (s)" "link (s)" "path (s)" "link/time"
  for n in ${BENCH_ASSOCIATIONS:-1 4}; do
    [ "$n" = 1 ] && write_siteb_ini "" "" "" || write_siteb_ini "$n" "" ""   # 1 is the default
    flow up >/dev/null
    "${CTL[@]}" stop send-siteb >/dev/null
    rm -rf "$WORK/bench"; "$PY" "$REPO/examples/make_study.py" "$WORK/bench" "$BENCH_IMAGES" --size "$BENCH_SIZE" >/dev/null
    bytes=$(cat "$WORK/bench"/*.dcm | wc -c)
    cp "$WORK/bench"/*.dcm "$SPOOL/incoming/"   # the drop folder; the filter queues them
    for _ in $(seq 1 1200); do [ "$(files_in "$SPOOL/outbox/siteb")" -ge "$BENCH_IMAGES" ] && break; sleep 0.1; done
    [ "$(files_in "$SPOOL/outbox/siteb")" -eq "$BENCH_IMAGES" ] || die "the study was not queued for siteb"
    before=$(files_in "$SPOOL/sent/siteb")
    "${CTL[@]}" start send-siteb >/dev/null
    for _ in $(seq 1 36000); do [ $(($(files_in "$SPOOL/sent/siteb") - before)) -ge "$BENCH_IMAGES" ] && break; sleep 0.1; done
    [ $(($(files_in "$SPOOL/sent/siteb") - before)) -eq "$BENCH_IMAGES" ] || die "siteb did not get the study"
    took=$(sender_took "$SPOOL/log/send-siteb.log")
    awk -v n="$n" -v i="$BENCH_IMAGES" -v b="$bytes" -v t="$took" -v r="$RATE_MBIT" -v p="$path_mbit" 'BEGIN {
      link = b * 8 / (r * 1e6); path = b * 8 / (p * 1e6)
      printf "%-13s %6d %7.1f %9.1f %9.1f %9.1f %8.0f %%\n", n, i, b / 1e6, t, link, path, 100 * link / t }'
  done
  echo
  echo "link (s): the study's bytes at ${RATE_MBIT} Mbit/s — what the WAN allows, before DICOM, TCP and WireGuard overheads;"
  echo "path (s): the same bytes at the ${path_mbit} Mbit/s bulk TCP measured through the tunnel above;"
  echo "time (s): from the queued sender's start (its log; process start-up left out) to the last file acknowledged by site B, over ${RTT_MS} ms RTT."
  echo "site B's Orthanc holds $(count "$NS_B" "$SITEB_HTTP") instances. Remove everything with: $HERE/stop.sh"
  exit 0
fi

write_siteb_ini "$ASSOCIATIONS" "[filter]
; CT and MR only: structured reports and the rest stay at site A
sop_whitelist = CTImageStorage, MRImageStorage" "[schedule]
; only inside its window (the older DicomFlowRouter's cyclic form by default)
window = $WINDOW" "[coerce]
; site B's PACS keeps patients of several hospitals: our IDs get our prefix and issuer
; (site B's copies only; the local archive gets the received files, hard-linked)
operations = PatientID = SITEA-{PatientID}
    IssuerOfPatientID = SITEA"
cat >"$WORK/conf/endpoints/archive.ini" <<INI
; the local archive: everything, always
[endpoint]
host = $IP_A
port = $ARCHIVE_DICOM
ae_title = ARCHIVE
INI
step "DicomFlow in $NS_A: DICOMFLOW@$IP_A:$ROUTER_PORT; endpoints archive (always) and siteb (window '$WINDOW', CT/MR, associations = ${ASSOCIATIONS:-left out})"
flow check
flow up

send_study() {  # DIR — a study of IMAGES CT images + 1 structured report, via the sender's REST API
  "$PY" "$REPO/examples/make_study.py" "$1" "$IMAGES" --sr >/dev/null
  local study
  study=$(in_ns "$NS_A" $TOOL upload "http://127.0.0.1:$SENDER_HTTP" "$1"/*.dcm)
  in_ns "$NS_A" $TOOL send "http://127.0.0.1:$SENDER_HTTP" router "$study"
}
wait_count() {  # NS HTTP EXPECTED SECONDS
  for _ in $(seq 1 $(($4 * 5))); do
    [ "$(count "$1" "$2" 2>/dev/null || echo 0)" -ge "$3" ] && return 0
    sleep 0.2
  done
  return 1
}
window() { window_now "$PY" "$WINDOW"; }
where() {
  echo "   archive (site A) has $(count "$NS_A" "$ARCHIVE_HTTP") instances; site B has $(count "$NS_B" "$SITEB_HTTP");" \
       "outbox/siteb holds $(files_in "$SPOOL/outbox/siteb"); siteb is $(siteb_state)"
}

read -r state opens change < <(window)
if [ "$state" = open ]; then
  step "the site-B window is open; waiting ${change}s for it to close, so the wait can be seen"
  for _ in $(seq 1 "$WAIT_LIMIT"); do [ "$(window | cut -d' ' -f1)" = closed ] && break; sleep 1; done
  [ "$(window | cut -d' ' -f1)" = closed ] || die "the window did not close"
fi

step "1. study 1 ($IMAGES CT + 1 SR) from the sender Orthanc, outside site B's window"
send_study "$WORK/study1"
wait_count "$NS_A" "$ARCHIVE_HTTP" $((IMAGES + 1)) 60 || die "the archive did not get study 1"
for _ in $(seq 1 100); do [ "$(siteb_state)" = outside_window ] && break; sleep 0.1; done
where
[ "$(count "$NS_B" "$SITEB_HTTP")" -eq 0 ] || die "site B got files outside its window"
[ "$(siteb_state)" = outside_window ] || die "siteb is not outside_window"
flow status --json >"$WORK/status-outside-window.json"

read -r state opens change < <(window)
step "2. waiting for site B's window to open at $opens"
for _ in $(seq 1 "$WAIT_LIMIT"); do [ "$(count "$NS_B" "$SITEB_HTTP")" -ge "$IMAGES" ] && break; sleep 1; done
echo "   $(date +%H:%M:%S): window open"
where
[ "$(count "$NS_B" "$SITEB_HTTP")" -eq "$IMAGES" ] || die "site B did not get the $IMAGES CT images (no SR) in its window"

step "3. the WAN cut (df3-wan0 down, the link to gateway A; the tunnel interfaces stay up)"
# A cut during an open association is noticed only after dimse_timeout; this example
# shows the usual case — the next connection over a dead WAN — so it waits for the
# idle association to be released first.
for _ in $(seq 1 300); do [ "$(associations_open)" -eq 0 ] && break; sleep 0.2; done
read -r state opens change < <(window)
if [ "$state" != open ] || [ "$change" -lt 35 ]; then
  echo "   too little of the window is left (${change}s); waiting for the next opening"
  for _ in $(seq 1 "$WAIT_LIMIT"); do [ "$(window | cut -d' ' -f1)" = closed ] && break; sleep 1; done
  for _ in $(seq 1 "$WAIT_LIMIT"); do [ "$(window | cut -d' ' -f1)" = open ] && break; sleep 1; done
fi
cp "$SPOOL/run/retry-siteb.json" "$WORK/retry-before-cut.json" 2>/dev/null || echo '{}' >"$WORK/retry-before-cut.json"
ip -n "$NS_WAN" link set df3-wan0 down
send_study "$WORK/study2"
wait_count "$NS_A" "$ARCHIVE_HTTP" $((2 * IMAGES + 2)) 60 || die "the archive did not get study 2"
for _ in $(seq 1 600); do [ "$(siteb_state)" = down ] && break; sleep 0.1; done
flow status --json >"$WORK/status-wan-down.json"
cp "$SPOOL/run/retry-siteb.json" "$WORK/retry-during-cut.json" 2>/dev/null || echo '{}' >"$WORK/retry-during-cut.json"
where
flow status | sed -n '/siteb/,$p' | head -6 | sed 's/^/   /'
[ "$(siteb_state)" = down ] || die "siteb is not shown down"
[ "$(files_in "$SPOOL/failed/siteb")" -eq 0 ] || die "files went to failed/siteb"
"$PY" - "$WORK/retry-before-cut.json" "$WORK/retry-during-cut.json" <<'PY' || die "a file was charged an attempt"
import json, sys
before, during = (json.load(open(p)).get("files", {}) for p in sys.argv[1:])
sys.exit(before != during)
PY
echo "   no file charged: failed/siteb is empty, the retry book unchanged"

step "   the WAN comes back"
ip -n "$NS_WAN" link set df3-wan0 up
# The connected routes come back with the link; these make sure the tunnel's do too.
ip -n "$NS_GWA" route replace "$NET_B" dev "$WG_A"
ip -n "$NS_GWB" route replace "$NET_A" dev "$WG_B"
started=$EPOCHREALTIME
for _ in $(seq 1 "$WAIT_LIMIT"); do [ "$(count "$NS_B" "$SITEB_HTTP")" -ge $((2 * IMAGES)) ] && break; sleep 0.2; done
took=$(awk "BEGIN { printf \"%.1f\", $EPOCHREALTIME - $started }")
[ "$(count "$NS_B" "$SITEB_HTTP")" -eq $((2 * IMAGES)) ] || die "site B did not get study 2 after the WAN came back"
echo "   site B drained ${took}s after the WAN came back"
where
[ "$(files_in "$SPOOL/outbox/siteb")" -eq 0 ] || die "outbox/siteb is not empty"
step "   patient IDs: site B's carry the SITEA- prefix, the archive's are as received"
siteb_ids=$(in_ns "$NS_B" $TOOL patient-ids "http://127.0.0.1:$SITEB_HTTP")
archive_ids=$(in_ns "$NS_A" $TOOL patient-ids "http://127.0.0.1:$ARCHIVE_HTTP")
echo "   site B: $(echo $siteb_ids); archive: $(echo $archive_ids)"
[ "$siteb_ids" = "$(echo "$archive_ids" | sed 's/^/SITEA-/')" ] || die "site B's patient IDs are not the archive's with the SITEA- prefix"
echo "OK: the archive got both studies at once; site B got the CT images only inside its window, with SITEA- patient IDs, held study 2 while the WAN was down (no file charged) and drained ${took}s after it came back."
echo "Everything is still up: e.g. ip netns exec $NS_A $BIN/dicomflow status --conf $WORK/conf; remove it with $HERE/stop.sh"
