"""Tiny Orthanc REST client for the example scripts (standard library only).

  orthanc_tool.py wait URL                 wait until the REST API answers
  orthanc_tool.py upload URL FILE…         POST files to /instances, print the study IDs
  orthanc_tool.py send URL MODALITY ID…    /modalities/MODALITY/store (synchronous C-STORE)
  orthanc_tool.py count URL                number of instances stored
  orthanc_tool.py patient-ids URL          the Patient IDs stored, one per line
"""

from __future__ import annotations

import json
import sys
import time
import urllib.error
import urllib.request


def call(url: str, data: bytes | None = None, timeout: float = 120) -> object:
    request = urllib.request.Request(url, data=data, method="POST" if data is not None else "GET")
    with urllib.request.urlopen(request, timeout=timeout) as response:
        body = response.read()
    return json.loads(body) if body else None


def main(argv: list[str]) -> int:
    command, url, *rest = argv
    if command == "wait":
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                call(url + "/system", timeout=2)
                return 0
            except (urllib.error.URLError, OSError):
                time.sleep(0.2)
        print(f"Orthanc at {url} did not answer", file=sys.stderr)
        return 1
    if command == "upload":
        studies = set()
        for path in rest:
            with open(path, "rb") as handle:
                studies.add(call(url + "/instances", handle.read())["ParentStudy"])  # type: ignore[index]
        print(" ".join(sorted(studies)))
        return 0
    if command == "send":
        modality, *resources = rest
        body = json.dumps({"Resources": resources, "Synchronous": True}).encode()
        call(f"{url}/modalities/{modality}/store", body)
        return 0
    if command == "count":
        print(len(call(url + "/instances")))  # type: ignore[arg-type]
        return 0
    if command == "patient-ids":  # the Patient IDs (0010,0020) Orthanc holds, one per line
        patients = call(url + "/patients?expand")
        print("\n".join(sorted({p["MainDicomTags"].get("PatientID", "")  # type: ignore[index]
                                for p in patients})))  # type: ignore[union-attr]
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
