"""Interleaved A/B of each pynetdicom patch: what does each one save, in one run?

    .venv/bin/python -m tests.bench.patches_ab --rounds 4 --count 200

Each round runs DicomFlow end to end (DCMTK storescu → receive → filter → send → DCMTK
storescp, warm daemons) once with every patch on, once with all off
(``DICOMFLOW_FASTPATH=0``) and once with each patch off alone
(``DICOMFLOW_PATCHES_OFF=<name>``), in turn, so that the machine's noise falls on all
variants alike. It prints the median CPU per image of each daemon per variant and, per
patch, the share of the receive and send daemons' CPU it saves
((CPU without it − CPU with all) / CPU without it). Nothing is asserted: it measures.
The README's Performance section keeps the figures, and a patch that saves less than
5 % of the CPU of the daemon it patches (and fixes nothing) is dropped.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

from tests.bench.run import Rate, log, make_ct_series, run_transfer

ALL_ON = "all on"
ALL_OFF = "all off"


def variants(patches: list[str]) -> dict[str, dict[str, str]]:
    table = {ALL_ON: {}, ALL_OFF: {"DICOMFLOW_FASTPATH": "0"}}
    for name in patches:
        table[f"without {name}"] = {"DICOMFLOW_PATCHES_OFF": name}
    return table


def median_of(rates: list[Rate], daemon: str) -> float:
    return statistics.median(r.per_process.get(daemon, float("nan")) for r in rates)


def report(results: dict[str, list[Rate]], patches: list[str]) -> str:
    daemons = ("receive", "filter", "send")
    lines = ["| variant | images/s | " + " | ".join(f"{d} ms CPU/image" for d in daemons) + " |",
             "|---|---|" + "---|" * len(daemons)]
    for name, rates in results.items():
        speed = statistics.median(r.images_s for r in rates)
        cells = " | ".join(f"{median_of(rates, d):.2f}" for d in daemons)
        lines.append(f"| {name} | {speed:.0f} | {cells} |")
    lines += ["", "| patch | receive CPU saved | send CPU saved |", "|---|---|---|"]
    base = results[ALL_ON]
    rows = [(name, results[f"without {name}"]) for name in patches] + [("all patches", results[ALL_OFF])]
    for name, without in rows:
        saved = []
        for daemon in ("receive", "send"):
            off, on = median_of(without, daemon), median_of(base, daemon)
            saved.append(f"{(off - on) / off * 100:+.1f} % ({off:.2f} → {on:.2f} ms)")
        lines.append(f"| {name} | {saved[0]} | {saved[1]} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.patches_ab",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--count", type=int, default=200, help="CT images per transfer")
    parser.add_argument("--size", type=int, default=512, help="rows = columns of the CT images")
    parser.add_argument("--patches", required=True,
                        help="comma-separated patch names (DICOMFLOW_PATCHES_OFF)")
    parser.add_argument("--workdir", type=Path)
    args = parser.parse_args(argv)
    patches = [p for p in args.patches.split(",") if p]
    base = Path(tempfile.mkdtemp(prefix="dicomflow-ab-", dir=args.workdir))
    results: dict[str, list[Rate]] = {}
    try:
        ct = make_ct_series(base / "data" / "ct", args.count, args.size)
        warm = make_ct_series(base / "data" / "warm", 10, args.size)
        for round_ in range(args.rounds):
            for name, env in variants(patches).items():
                rate = run_transfer("dicomflow", base, ct, warmup=warm, env=env)
                results.setdefault(name, []).append(rate)
                detail = ", ".join(f"{k} {v:.2f}" for k, v in rate.per_process.items())
                log(f"round {round_ + 1}: {name}: {rate.images_s:.0f} images/s ({detail})")
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print(report(results, patches))
    return 0


if __name__ == "__main__":
    sys.exit(main())
