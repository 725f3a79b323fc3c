#!/usr/bin/env bash
# Example 04: study-level routing.
#
#                                               ┌─▶ pacs    (instance level)            ─▶ PACS Orthanc
#   sender Orthanc ──C-STORE──▶ DicomFlow ──────┼─▶ ai      (study level, AXIAL, 5 s)     ─▶ AI Orthanc
#                                               └─▶ archive (study level, 1 h: `release`) ─▶ archive Orthanc
#
# 1. `dicomflow route --study` dry-runs the decisions over the two study folders;
# 2. study A (SCOUT + AXIAL CHEST) and study B (SCOUT only) are sent: the PACS gets every
#    image at once, `dicomflow studies` / `status` show them waiting; 5 s after its last
#    image the AI gets study A whole, in (series, instance) order — and never study B;
# 3. study C is sent; the archive would hold it for an hour: `dicomflow release` sends it now.
# Ports can be changed with the variables below (the test suite uses free ones); VENV is
# the virtual environment DicomFlow is installed in (default: the repository's .venv).
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
VENV="${VENV:-$REPO/.venv}"
BIN="$VENV/bin"
WORK="${WORK:-/tmp/dicomflow-example-04}"
ROUTER_PORT="${ROUTER_PORT:-11112}"
SENDER_HTTP="${SENDER_HTTP:-8041}"; SENDER_DICOM="${SENDER_DICOM:-4241}"
PACS_HTTP="${PACS_HTTP:-8042}"; PACS_DICOM="${PACS_DICOM:-4242}"
AI_HTTP="${AI_HTTP:-8043}"; AI_DICOM="${AI_DICOM:-4243}"
ARCHIVE_HTTP="${ARCHIVE_HTTP:-8044}"; ARCHIVE_DICOM="${ARCHIVE_DICOM:-4244}"
STABLE_TIME="${STABLE_TIME:-5s}"   # the ai endpoint's stable_time
ORTHANC=/usr/sbin/Orthanc
TOOL="$BIN/python $REPO/examples/orthanc_tool.py"
DF() { "$BIN/dicomflow" "$@" --conf "$WORK/conf"; }

source "$REPO/examples/lib.sh"
require_free_ports "$ROUTER_PORT" "$SENDER_HTTP" "$SENDER_DICOM" "$PACS_HTTP" "$PACS_DICOM" \
  "$AI_HTTP" "$AI_DICOM" "$ARCHIVE_HTTP" "$ARCHIVE_DICOM"
rm -rf "$WORK"; mkdir -p "$WORK/conf/endpoints"
cleanup_on_exit "$WORK/conf"

fail() { echo "FAILED: $*" >&2; exit 1; }
# wait_for SECONDS COMMAND… — run COMMAND until it succeeds, 0.2 s apart; give up after
# SECONDS (a hang guard, not a speed promise).
wait_for() {
  local deadline=$((SECONDS + $1)); shift
  until "$@"; do [ "$SECONDS" -lt "$deadline" ] || return 1; sleep 0.2; done
}
count() { $TOOL count "$1" 2>/dev/null || echo 0; }          # instances an Orthanc holds
has_count() { [ "$(count "$1")" -ge "$2" ]; }                 # URL N
waiting() {  # ENDPOINT STUDY_UID [N] — is that study waiting for that endpoint (with ≥ N files)?
  DF studies --waiting --json 2>/dev/null | "$BIN/python" -c 'import json, sys
sys.exit(0 if any(r["endpoint"] == sys.argv[1] and r["study"] == sys.argv[2]
                  and r["instances"] >= int(sys.argv[3]) for r in json.load(sys.stdin)["studies"]) else 1)' \
    "$1" "$2" "${3:-1}"
}
not_waiting() { ! waiting "$@"; }
outbox_empty() { [ -z "$(find "$WORK/spool/outbox/$1" -maxdepth 1 -name '*.dcm' -print -quit)" ]; }
# orthanc_report URL uids|order|series … — the Study UIDs an Orthanc holds; the order its
# instances arrived in (Orthanc's change log) as "series/instance" words; or (series
# STUDY_ID DESCRIPTION) the Orthanc ID of that study's series with that description.
orthanc_report() {
  "$BIN/python" - "$@" <<'PY'
import json, sys, urllib.request
url, what = sys.argv[1], sys.argv[2]
def get(path):
    with urllib.request.urlopen(url + path, timeout=30) as response:
        return json.load(response)
if what == "uids":
    print("\n".join(sorted(s["MainDicomTags"]["StudyInstanceUID"] for s in get("/studies?expand"))))
elif what == "series":
    print(" ".join(s["ID"] for s in get(f"/studies/{sys.argv[3]}/series")
                   if s["MainDicomTags"].get("SeriesDescription") == sys.argv[4]))
else:
    changes = get("/changes?since=0&limit=10000")["Changes"]
    words = []
    for change in changes:
        if change["ChangeType"] == "NewInstance":
            tags = get(f"/instances/{change['ID']}/simplified-tags")
            words.append(f"{tags.get('SeriesNumber', '?')}/{tags.get('InstanceNumber', '?')}")
    print(" ".join(words))
PY
}

echo "== the router: conf in $WORK/conf, endpoints pacs, ai and archive"
write_router_ini "$WORK/conf" "$ROUTER_PORT" "$WORK/spool"
cat >"$WORK/conf/endpoints/pacs.ini" <<INI
; every image, at once
[endpoint]
host = 127.0.0.1
port = $PACS_DICOM
ae_title = PACS
INI
cat >"$WORK/conf/endpoints/ai.ini" <<INI
; whole studies with an axial series, once no image has come for $STABLE_TIME
[endpoint]
host = 127.0.0.1
port = $AI_DICOM
ae_title = AI

[filter]
level = study
conditions = SeriesDescription=.*AXIAL.*
stable_time = $STABLE_TIME
INI
cat >"$WORK/conf/endpoints/archive.ini" <<INI
; whole studies, an hour after their last image — or when an operator releases one
[endpoint]
host = 127.0.0.1
port = $ARCHIVE_DICOM
ae_title = ARCHIVE

[filter]
level = study
stable_time = 1h
INI
sed 's/^/   /' "$WORK/conf/endpoints/ai.ini"
DF check
DF up

echo "== four Orthancs: sender, PACS, AI, archive (HTTP $SENDER_HTTP, $PACS_HTTP, $AI_HTTP, $ARCHIVE_HTTP)"
MODALITIES="{ \"router\": [ \"DICOMFLOW\", \"127.0.0.1\", $ROUTER_PORT ] }"
start_orthanc() {  # name http dicom
  write_orthanc_json "$WORK/$1.json" "$1" "$WORK/$1" "$2" "$3" "${1^^}" "$MODALITIES"
  TCP_NODELAY=1 "$ORTHANC" "$WORK/$1.json" >>"$WORK/$1.log" 2>&1 &
  PIDS+=($!)
  $TOOL wait "http://127.0.0.1:$2"
}
start_orthanc sender "$SENDER_HTTP" "$SENDER_DICOM"
start_orthanc pacs "$PACS_HTTP" "$PACS_DICOM"
start_orthanc ai "$AI_HTTP" "$AI_DICOM"
start_orthanc archive "$ARCHIVE_HTTP" "$ARCHIVE_DICOM"
SENDER="http://127.0.0.1:$SENDER_HTTP"; PACS="http://127.0.0.1:$PACS_HTTP"
AI="http://127.0.0.1:$AI_HTTP"; ARCHIVE="http://127.0.0.1:$ARCHIVE_HTTP"

new_study() { "$BIN/python" "$REPO/examples/make_study.py" "$WORK/studies/$1" --size 64 "${@:2}"; }
STUDY_A=$(new_study A --series SCOUT=2 --series "AXIAL CHEST=6")
STUDY_B=$(new_study B --series SCOUT=3)
echo "   study A $STUDY_A: series 1 SCOUT (2 images), series 2 AXIAL CHEST (6)"
echo "   study B $STUDY_B: series 1 SCOUT (3 images)"

echo "== 1. dicomflow route --study $WORK/studies (dry run, nothing is sent)"
DF route --study "$WORK/studies" | sed 's/^/   /'

upload() { $TOOL upload "$SENDER" "$WORK/studies/$1"/*.dcm; }
echo "== 2. studies A and B, interleaved: A's AXIAL CHEST series, study B, A's SCOUT series"
ID_A=$(upload A); ID_B=$(upload B)
AXIAL=$(orthanc_report "$SENDER" series "$ID_A" "AXIAL CHEST")
SCOUT=$(orthanc_report "$SENDER" series "$ID_A" SCOUT)
{ $TOOL send "$SENDER" router "$AXIAL" && $TOOL send "$SENDER" router "$ID_B" \
    && $TOOL send "$SENDER" router "$SCOUT"; } & SEND_PID=$!  # in the background: look while A waits
# The rows come from the filter's snapshot (run/studies/state.json), which may lag the
# arrivals: show them once it has all 8 files of study A.
if wait_for 10 waiting ai "$STUDY_A" 8; then
  echo "   waiting for completion ($STABLE_TIME for ai, 1h for archive):"
else  # ai's $STABLE_TIME passed before the snapshot showed study A whole
  wait_for 60 waiting archive "$STUDY_A" 8 || fail "study A is not waiting"
  echo "   study A already went to ai; waiting for completion for archive (1h):"
fi
DF studies | sed 's/^/   /'
DF status | sed 's/^/   /'
wait "$SEND_PID" || fail "the sender Orthanc could not send studies A and B"
wait_for 60 has_count "$PACS" 11 || fail "the PACS did not get the 11 images"
echo "   PACS Orthanc has $(count "$PACS") instances, in arrival order (series/instance):"
echo "     $(orthanc_report "$PACS" order)   (A's series 2, then B, then A's series 1)"

wait_for 120 has_count "$AI" 8 || fail "the AI did not get study A"
wait_for 120 not_waiting ai "$STUDY_B" || fail "study B is still waiting for ai"
wait_for 60 outbox_empty ai || fail "outbox/ai did not drain"
[ "$(count "$AI")" -eq 8 ] || fail "the AI has $(count "$AI") instances, expected 8"
[ "$(orthanc_report "$AI" uids)" = "$STUDY_A" ] || fail "the AI holds other studies than A"
AI_ORDER=$(orthanc_report "$AI" order)
echo "   AI Orthanc has study A only, $(count "$AI") instances, in this order: $AI_ORDER"
echo "   (send-ai: $(grep -c 'association established' "$WORK/spool/log/send-ai.log") association(s))"
[ "$AI_ORDER" = "1/1 1/2 2/1 2/2 2/3 2/4 2/5 2/6" ] || fail "study A did not reach the AI in order"

echo "== 3. study C: the archive would wait an hour for it — released by hand"
STUDY_C=$(new_study C --series "CT HEAD=4")
echo "   study C $STUDY_C: series 1 CT HEAD (4 images)"
$TOOL send "$SENDER" router "$(upload C)"
wait_for 60 waiting archive "$STUDY_C" 4 || fail "study C is not waiting for archive"
DF studies --endpoint archive | sed 's/^/   /'
echo "   \$ dicomflow release $STUDY_C"
DF release "$STUDY_C" | sed 's/^/   /'
wait_for 120 has_count "$ARCHIVE" 4 || fail "the archive did not get study C"
wait_for 60 outbox_empty archive || fail "outbox/archive did not drain"
[ "$(orthanc_report "$ARCHIVE" uids)" = "$STUDY_C" ] || fail "the archive holds other studies than C"
echo "   archive Orthanc has study C, $(count "$ARCHIVE") instances; A and B still wait for it:"
DF studies --endpoint archive | sed 's/^/   /'
wait_for 60 has_count "$PACS" 15 || fail "the PACS did not get study C"
wait_for 120 not_waiting ai "$STUDY_C" || fail "study C is still waiting for ai"
[ "$(count "$AI")" -eq 8 ] || fail "the AI got more than study A"
echo "OK: pacs got all 15 at once; ai got study A whole (8, in order), not B or C; archive got C on release."
