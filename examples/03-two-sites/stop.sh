#!/usr/bin/env bash
# Remove everything examples/03-two-sites/run.sh made — also after a failed or
# interrupted run, from names alone (the df3- prefix, topology.sh), never anything else:
# DicomFlow (dicomflow down), every process inside the df3- namespaces (Orthancs,
# wireguard-go, the UDP relay, supervisord and its daemons), the namespaces (with their
# veths, qdiscs and WireGuard interfaces), stray df3- links in the host's namespace and
# stale df3- sockets in /var/run/wireguard. The work folder ($WORK) is kept for reading.
set -uo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
VENV="${VENV:-$REPO/.venv}"
WORK="${WORK:-/tmp/dicomflow-example-03}"
source "$HERE/topology.sh"
[ "$(id -u)" = 0 ] || { echo "stop.sh: needs root" >&2; exit 1; }

ours() { ip netns list | awk '{print $1}' | grep "^$PREFIX" || true; }
pids_in_ours() { for ns in $(ours); do ip netns pids "$ns" 2>/dev/null; done; }

if [ -f "$WORK/spool/run/supervisord.pid" ] && [ -x "$VENV/bin/dicomflow" ]; then
  echo "== dicomflow down"
  "$VENV/bin/dicomflow" down --conf "$WORK/conf" >/dev/null 2>&1 || true
fi
pids=$(pids_in_ours)
if [ -n "$pids" ]; then
  echo "== stopping the processes in the $PREFIX namespaces: $(echo $pids)"
  kill $pids 2>/dev/null
  for _ in $(seq 1 100); do [ -z "$(pids_in_ours)" ] && break; sleep 0.1; done
  pids=$(pids_in_ours)
  [ -n "$pids" ] && kill -KILL $pids 2>/dev/null
  for _ in $(seq 1 50); do [ -z "$(pids_in_ours)" ] && break; sleep 0.1; done
fi
for ns in $(ours); do echo "== ip netns del $ns"; ip netns del "$ns"; done
for link in $(ip -o link show | awk -F': ' '{print $2}' | cut -d@ -f1 | grep "^$PREFIX" || true); do
  echo "== ip link del $link"; ip link del "$link" 2>/dev/null
done
for sock in "$WG_SOCKETS/$PREFIX"*.sock; do
  [ -e "$sock" ] && { echo "== rm $sock"; rm -f "$sock"; }
done
left="$(ours)$(ip -o link show | awk -F': ' '{print $2}' | grep "^$PREFIX")"
if [ -n "$left" ]; then echo "stop.sh: could not remove: $left" >&2; exit 1; fi
echo "== removed (work folder kept: $WORK)"
