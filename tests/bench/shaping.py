"""The cost of shaping (issues 15, 16): the filter's CPU per image with a plain endpoint
(a hard link per file), a coerced endpoint and a de-identifying one (each its own
shaped file per file).

    .venv/bin/python -m tests.bench.shaping --count 300 --rounds 3

The same CT series (512×512×16 bit ≈ 0.5 MB each, made once) goes through a fresh
``dicomflow filter`` daemon (a real subprocess, warm: ten files go through first,
untimed) once per variant per round, the variants in turn, so that the machine's noise
falls on both alike. Files arrive as the receiver delivers them: hard-linked into a
staging folder on the spool's disk, then renamed into ``incoming/``. The filter's CPU
(user + system, from /proc, as ``tests.bench.run`` reads it) is taken from the first
file in to the last copy in the outbox; no sender runs. It prints, per variant, the
median CPU per image and images/s, and each shaped variant's ratio to plain. Nothing is asserted:
it measures (README, Performance).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from tests.bench.run import DataSet, cpu_seconds, log, make_ct_series, wait_until
from tests.helpers import Daemon, dicom_files, write_conf, write_key

OPERATIONS = "PatientID = SITEA-{PatientID}\nIssuerOfPatientID = SITEA"
PLAIN = "plain endpoint"
COERCED = "coerced endpoint"
DEIDENTIFIED = "de-identifying endpoint"
KEY_FILE = "keys/bench.key"
#: each variant's endpoint sections beside [endpoint]
VARIANTS: dict[str, dict[str, dict]] = {
    PLAIN: {}, COERCED: {"coerce": {"operations": OPERATIONS}},
    DEIDENTIFIED: {"deidentify": {"profile": "basic", "key_file": KEY_FILE}}}
ENDPOINT = "dest"


@dataclass(frozen=True)
class Round:
    """One variant's run: the filter's CPU per image (ms) and its rate."""

    cpu_ms: float
    images_s: float


class FilterRun:
    """A conf dir, a spool and one filter daemon with one endpoint ``dest``."""

    def __init__(self, base: Path, shaping: dict[str, dict]) -> None:
        self.base = base / f"filter-{time.monotonic_ns()}"
        sections: dict[str, dict] = {"endpoint": {"host": "127.0.0.1", "port": 1, "ae_title": "DEST"},
                                     **shaping}
        self.conf = write_conf(self.base, router={"log_level": "INFO"},
                               endpoints={ENDPOINT: sections})
        if "deidentify" in shaping:
            write_key(self.conf, KEY_FILE)
        self.spool = self.base / "spool"
        self.staging = self.base / "staging"
        self.staging.mkdir()
        self.daemon = Daemon(self.conf, "filter", log_name="filter")

    def start(self) -> FilterRun:
        self.daemon.start().wait_log("filter ready")
        return self

    def feed(self, data: DataSet, tag: str) -> None:
        """Every file into ``incoming/`` by rename, as the receiver publishes."""
        incoming = self.spool / "incoming"
        for index, path in enumerate(data.files):
            staged = self.staging / f"{tag}{index:06d}.dcm"
            os.link(path, staged)
            os.rename(staged, incoming / staged.name)

    def routed(self) -> int:
        return len(dicom_files(self.spool / "outbox" / ENDPOINT))

    def idle(self) -> bool:
        return not dicom_files(self.spool / "incoming") and not dicom_files(self.spool / "accepted")

    def remove(self) -> None:
        self.daemon.stop()
        shutil.rmtree(self.base, ignore_errors=True)


def run_variant(base: Path, shaping: dict[str, dict], data: DataSet, warm: DataSet) -> Round:
    run = FilterRun(base, shaping).start()
    try:
        run.feed(warm, "warm")
        wait_until(lambda: run.routed() >= warm.count and run.idle(), 600, 0.01, "warm-up")
        cpu0, start = cpu_seconds(run.daemon.pid), time.monotonic()
        run.feed(data, "ct")
        wait_until(lambda: run.routed() >= warm.count + data.count and run.idle(), 3600, 0.005,
                   "every file in the outbox")
        elapsed = time.monotonic() - start
        cpu = cpu_seconds(run.daemon.pid) - cpu0
        return Round(cpu * 1000 / data.count, data.count / elapsed)
    finally:
        run.remove()


def measure(base: Path, data: DataSet, warm: DataSet, rounds: int) -> dict[str, list[Round]]:
    """Interleaved rounds of every variant on the same files (what ``tests.bench.run``
    may call for its report)."""
    results: dict[str, list[Round]] = {}
    for round_ in range(rounds):
        for name, shaping in VARIANTS.items():
            result = run_variant(base, shaping, data, warm)
            results.setdefault(name, []).append(result)
            log(f"round {round_ + 1}: {name}: filter {result.cpu_ms:.2f} ms CPU/image, "
                f"{result.images_s:.0f} images/s")
    return results


def report(results: dict[str, list[Round]]) -> str:
    """The benchmark rows: per variant, then the coerced/plain ratio."""
    lines = ["| filter, one endpoint | ms CPU/image (median) | images/s (median) |", "|---|---|---|"]
    medians = {}
    for name, rounds in results.items():
        medians[name] = statistics.median(r.cpu_ms for r in rounds)
        speed = statistics.median(r.images_s for r in rounds)
        lines.append(f"| {name} | {medians[name]:.2f} | {speed:.0f} |")
    for shaped, what in ((COERCED, "coercion"), (DEIDENTIFIED, "de-identification")):
        if PLAIN not in medians or shaped not in medians:
            continue
        plain, cost = medians[PLAIN], medians[shaped]
        lines += ["", f"{what} costs {cost - plain:+.2f} ms CPU per image in the filter "
                      f"({shaped}/plain = {cost / plain:.2f}×); per round: "
                      + ", ".join(f"{c.cpu_ms / p.cpu_ms:.2f}×"
                                  for p, c in zip(results[PLAIN], results[shaped], strict=True))]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.shaping",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=300, help="CT images per run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--size", type=int, default=512, help="rows = columns of the CT images")
    parser.add_argument("--workdir", type=Path, help="where the data and spools go (one disk)")
    args = parser.parse_args(argv)
    base = Path(tempfile.mkdtemp(prefix="dicomflow-shaping-", dir=args.workdir))
    try:
        data = make_ct_series(base / "data" / "ct", args.count, args.size)
        warm = make_ct_series(base / "data" / "warm", 10, args.size)
        results = measure(base, data, warm, args.rounds)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print(report(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
