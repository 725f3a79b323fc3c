"""The cost of the journal (issue 18): what it adds to each image's CPU, and how long
``dicomflow trace`` and ``dicomflow reconcile`` take on a big one.

    .venv/bin/python -m tests.bench.journal            # full run (several minutes)
    .venv/bin/python -m tests.bench.journal --quick    # the cpu part scaled down (≈ 1 min)
    .venv/bin/python -m tests.bench.journal --only cpu --rounds 10

Four parts (``--only cpu,writer,trace,reconcile``), each a difference or a time taken within
one run; nothing is asserted (README, Performance):

1. ``cpu``: the CPU per image of the whole pipeline — real ``dicomflow receive``,
   ``filter`` and ``send <ep>`` daemons, a fresh spool and three fresh daemons per round,
   DCMTK ``storescu`` sending small CT images to the receiver, DCMTK ``storescp`` the
   destination — with ``[router] journal = true`` and ``false``, in interleaved rounds
   (on, off, off, on, on, off …: the machine's noise and any drift fall on both;
   ``--rounds``, at least 2 and even). Ten warm-up images go through first; the CPU
   (user + system of the three daemons from /proc) runs from then until every image is
   in ``sent/<ep>/`` (and, with the journal on, the journal holds a ``received``, a
   ``routed`` and a ``sent`` row per image) and the daemons are idle again, read right
   before they are stopped. Per round, and the median of the (on − off) differences of
   neighbouring rounds, in ms per image.
2. ``writer``: the journal's own work, in one process and so without the pipeline's
   noise: an image's three events (``received``, ``routed``, ``sent``, with the details
   the daemons give) recorded and written by a :class:`~pipeline.journal.writer.Journal`
   and its thread, 50 images to a transaction (what the 0.5 s flush makes of a router
   taking ~100 images/s); the CPU of the whole process (both threads) over 6,000
   images, median of 3 runs. On a shared machine the rounds of part 1 vary by more than
   the goal; this is the cost they would show on a quiet one.
3. ``trace``: a journal of 1,000,000 rows written directly (sqlite3 ``executemany`` in
   the schema of :mod:`pipeline.journal.schema`; 200,000 instances × ``received``,
   ``routed`` to two endpoints, ``shaped`` for one, ``sent`` to both; studies of 100 to
   500 instances; times spread over 90 days, 20 % of the instances in the last 24 h),
   plus a spool whose ``sent/<ep>/`` hold an empty file per copy of the last 24 h, named
   as the events say (:mod:`pipeline.spool_names`). ``dicomflow trace`` of a study of
   500 instances and of one instance, as subprocesses, median of 3 runs each (after one
   untimed run, with bytecode caching on: as an installed router runs them); and, for
   the start-up those include (Python, the imports), a trace on an empty spool.
4. ``reconcile``: ``dicomflow reconcile --since 24h`` on the same journal and spool, as a
   subprocess, median of 3 runs.

``--quick``: 60 images × 6 rounds for ``cpu``; parts 2 to 4 unchanged (under a minute).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from pipeline.journal import schema, store
from pipeline.journal.events import RECEIVED, ROUTED, SENT
from pipeline.journal.writer import Journal
from pipeline.spool import Spool
from pipeline.spool_names import SpoolName
from tests.bench.run import (
    DEST_AET,
    DataSet,
    Destination,
    cpu_seconds,
    log,
    make_ct_series,
    storescu,
    wait_until,
)
from tests.helpers import REPO, Daemon, router_port, write_conf

PARTS = ("cpu", "writer", "trace", "reconcile")
EP = "pacs"                       # the cpu part's one endpoint
ENDPOINTS = ("pacs", "ai")        # the big journal's endpoints (ai: a coerced copy)
EVENTS_PER_INSTANCE = 5           # received, routed, shaped (ai), sent (pacs), sent (ai)
STUDY_SIZES = (100, 500)          # instances per study, drawn uniformly
TRACED_STUDY_SIZE = 500
DAY = 86_400.0
SPAN_DAYS = 90
RECENT_SHARE = 0.2                # of the instances, received in the last 24 h
SOP_ROOT = "1.2.826.0.1.3680043.8.498.18.1."
STUDY_ROOT = "1.2.826.0.1.3680043.8.498.18.2."
TIMEOUT = 3600.0


@dataclass(frozen=True)
class Scale:
    """How big each part is (``--quick`` shrinks the cpu part; the journal part takes
    under a minute as it is)."""

    cpu_images: int = 300
    cpu_rounds: int = 8
    cpu_size: int = 64
    journal_rows: int = 1_000_000
    runs: int = 3
    writer_images: int = 6000
    writer_burst: int = 50        # images per transaction (≈ 0.5 s of a 100 images/s router)


QUICK = Scale(cpu_images=60, cpu_rounds=6)


@dataclass
class CpuRound:
    """One round of part 1: ms CPU per image of each daemon."""

    journal: bool
    per_daemon: dict[str, float]

    @property
    def total(self) -> float:
        return sum(self.per_daemon.values())


@dataclass
class BigJournal:
    """Part 2's journal and spool."""

    conf: Path
    rows: int
    instances: int
    recent: int                   # instances received in the last 24 h
    spool_files: int
    study: str                    # the traced study's UID
    instance: str                 # the traced instance's UID
    megabytes: float
    fill_seconds: float


@dataclass
class Results:
    """Every part's figures, filled in as the parts run."""

    cpu: list[CpuRound] = field(default_factory=list)
    cpu_images: int = 0
    journal: BigJournal | None = None
    timed: dict[str, list[tuple[float, float]]] = field(default_factory=dict)  # (wall s, CPU s)
    writer: list[float] = field(default_factory=list)  # ms CPU per image, one per run
    writer_burst: int = 0


def fresh_dir(base: Path, name: str) -> Path:
    path = base / f"{name}-{time.monotonic_ns()}"
    path.mkdir(parents=True)
    return path


# -- 1. CPU per image, journal on and off ----------------------------------------------

class PipelineRound:
    """A conf dir, a spool, and the three daemons of one round."""

    def __init__(self, base: Path, journal: bool, dest: Destination) -> None:
        self.journal = journal
        self.base = fresh_dir(base, f"cpu-{'on' if journal else 'off'}")
        endpoint = {"endpoint": {"host": "127.0.0.1", "port": dest.port, "ae_title": DEST_AET}}
        self.conf = write_conf(self.base, router={"log_level": "INFO",
                                                  "journal": "true" if journal else "false"},
                               endpoints={EP: endpoint})
        self.spool = Spool(self.base / "spool")
        self.port = router_port(self.conf)
        self.daemons = {"receive": Daemon(self.conf, "receive"),
                        "filter": Daemon(self.conf, "filter"),
                        f"send-{EP}": Daemon(self.conf, "send", EP)}

    def __enter__(self) -> PipelineRound:
        for daemon in self.daemons.values():
            daemon.start()
        for daemon, ready in zip(self.daemons.values(), ("listening as", "filter ready",
                                                          "sender started"), strict=True):
            daemon.wait_log(ready, timeout=TIMEOUT)
        return self

    def __exit__(self, *exc: object) -> None:
        for daemon in self.daemons.values():
            daemon.stop()
        shutil.rmtree(self.base, ignore_errors=True)

    def cpu(self) -> dict[str, float]:
        return {name: cpu_seconds(daemon.pid) for name, daemon in self.daemons.items()}

    def sent_files(self) -> int:
        try:
            return sum(1 for e in os.scandir(self.spool.root / "sent" / EP)
                       if not e.name.startswith("."))
        except FileNotFoundError:
            return 0

    def journal_rows(self) -> dict[str, int]:
        path = store.journal_path(self.spool.run_dir)
        if not path.exists():
            return {}
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
        try:
            return dict(conn.execute("SELECT kind, count(*) FROM events GROUP BY kind").fetchall())
        except sqlite3.Error:
            return {}  # not yet created by the first daemon's writer
        finally:
            conn.close()

    def delivered(self, count: int) -> bool:
        if self.sent_files() < count:
            return False
        if not self.journal:
            return True
        rows = self.journal_rows()
        return all(rows.get(kind, 0) >= count for kind in ("received", "routed", "sent"))

    def wait_idle(self) -> dict[str, float]:
        """The daemons' CPU once they stopped moving (their trailing journal and state
        writes included): the sum unchanged over three reads 50 ms apart."""
        last, same = self.cpu(), 0
        deadline = time.monotonic() + 30
        while same < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
            now = self.cpu()
            same = same + 1 if sum(now.values()) == sum(last.values()) else 0
            last = now
        return last


def cpu_round(base: Path, journal: bool, dest: Destination, data: DataSet,
              warm: DataSet) -> CpuRound:
    with PipelineRound(base, journal, dest) as run:
        storescu(run.port, warm.files, "DICOMFLOW")
        wait_until(lambda: run.delivered(warm.count), TIMEOUT, 0.02, "the warm-up delivered")
        before = run.wait_idle()
        storescu(run.port, data.files, "DICOMFLOW")
        wait_until(lambda: run.delivered(warm.count + data.count), TIMEOUT, 0.02,
                   f"every image in sent/{EP}" + (" and journalled" if journal else ""))
        after = run.wait_idle()
        if not journal and run.journal_rows():
            log("cpu: journal = false, yet the journal has rows")
        return CpuRound(journal, {name: (after[name] - before[name]) * 1000 / data.count
                                  for name in after})


def journal_on(index: int) -> bool:
    """Round ``index``'s switch, in ABBA order (on, off, off, on, on, off …): each pair of
    neighbours holds one of each, and a drift along the run (the destination's folder
    filling, the page cache) falls on the two sides equally rather than always on "on"."""
    return index % 4 in (0, 3)


def measure_cpu(base: Path, scale: Scale, rounds: int, results: Results) -> None:
    data = make_ct_series(base / "data" / "ct", scale.cpu_images, scale.cpu_size)
    warm = make_ct_series(base / "data" / "warm", 10, scale.cpu_size)
    results.cpu_images = data.count
    dest = Destination(base).start()
    try:
        for index in range(rounds):
            journal = journal_on(index)
            result = cpu_round(base, journal, dest, data, warm)
            results.cpu.append(result)
            parts = ", ".join(f"{name} {ms:.2f}" for name, ms in result.per_daemon.items())
            log(f"cpu round {index + 1}: journal {'on ' if journal else 'off'}: "
                f"{result.total:.2f} ms CPU/image ({parts})")
    finally:
        dest.stop()
        shutil.rmtree(base / "data", ignore_errors=True)


# -- 2. the journal's own work, in one process -----------------------------------------

def written_at_least(journal: Journal, count: int) -> bool:
    return journal.written >= count


def writer_run(base: Path, scale: Scale) -> float:
    """ms CPU per image of recording an image's three events as the daemons do and
    writing them with the writer thread, in bursts of ``writer_burst`` images (one
    transaction each, as the 0.5 s flush makes them at ~100 images/s)."""
    journal = Journal(fresh_dir(base, "writer") / store.FILE_NAME, "bench",
                      flush_interval=0.01).start()
    journal.record(ROUTED)  # the database opened and written once before the clock starts
    wait_until(lambda: journal.written >= 1, TIMEOUT, 0.01, "the writer's first event")
    start = time.process_time()
    for first in range(0, scale.writer_images, scale.writer_burst):
        for number in range(first, first + scale.writer_burst):
            uid = f"{SOP_ROOT}{number}"
            name = str(SpoolName.new(uid, time.time()))
            journal.record(RECEIVED, uid=uid, file=name, calling="CT01", called="DICOMFLOW",
                           peer="127.0.0.1:40122", sop_class="1.2.840.10008.5.1.4.1.1.2",
                           syntax="1.2.840.10008.1.2.1", size=527_000, association=3)
            journal.about(ROUTED, name, uid=uid, study=f"{STUDY_ROOT}1",
                          series=f"{STUDY_ROOT}1.1", endpoints=[EP], waiting=[], refused={},
                          sop_class="1.2.840.10008.5.1.4.1.1.2")
            journal.about(SENT, name, endpoint=EP, status=0, duration=0.012,
                          association="STORESCP@127.0.0.1:11113")
        wait_until(partial(written_at_least, journal, 1 + 3 * (first + scale.writer_burst)),
                   TIMEOUT, 0.002, "the burst written")
    cpu = time.process_time() - start
    journal.close()
    return cpu * 1000 / scale.writer_images


def measure_writer(base: Path, scale: Scale, results: Results) -> None:
    results.writer_burst = scale.writer_burst
    for _ in range(scale.runs):
        results.writer.append(writer_run(base, scale))
    log("writer: " + ", ".join(f"{ms:.3f}" for ms in results.writer) + " ms CPU per image")


# -- 3., 4. a big journal: trace and reconcile -------------------------------------------

def study_sizes(instances: int, rng: random.Random) -> list[int]:
    """Studies of 100-500 instances adding up to ``instances``; the first (the newest,
    received in the last 24 h) is the traced one, of 500."""
    sizes = [min(TRACED_STUDY_SIZE, instances)]
    while sum(sizes) < instances:
        sizes.append(min(rng.randint(*STUDY_SIZES), instances - sum(sizes)))
    return sizes


def arrival_time(number: int, instances: int, recent: int, now: float) -> float:
    """Instance ``number`` (0 = the newest): the ``recent`` newest evenly over the last
    24 h (15 min clear of its ends), the others evenly over the 89 days before."""
    if number < recent:
        return now - 300 - number * (DAY - 1200) / max(recent, 1)
    old = instances - recent
    return now - DAY - (number - recent) * ((SPAN_DAYS - 1) * DAY - 600) / max(old, 1)


def details() -> dict[str, str]:
    """Each kind's ``detail`` as the daemons write it (the event contract)."""
    return {kind: json.dumps(value, separators=(",", ":")) for kind, value in {
        "received": {"calling": "CT01", "called": "DICOMFLOW", "peer": "10.0.0.21:40122",
                     "sop_class": "1.2.840.10008.5.1.4.1.1.2", "syntax": "1.2.840.10008.1.2.1",
                     "size": 527_000, "association": 4711},
        "routed": {"endpoints": list(ENDPOINTS), "waiting": [], "refused": {},
                   "sop_class": "1.2.840.10008.5.1.4.1.1.2"},
        "sent-pacs": {"duration": 0.012, "association": "PACS@10.0.0.5:104"},
        "sent-ai": {"duration": 0.018, "association": "AI@10.0.0.9:11112"},
    }.items()}


def journal_rows(sizes: list[int], recent: int, now: float,
                 names: list[str]) -> Iterator[tuple[object, ...]]:
    """Every instance's five events in :data:`schema.COLUMNS` order; the spool names of
    the last 24 h's instances are appended to ``names`` on the way."""
    instances = sum(sizes)
    detail = details()
    number = 0
    for study_number, size in enumerate(sizes):
        study = f"{STUDY_ROOT}{study_number + 1}"
        series = f"{study}.1"
        for _ in range(size):
            uid = f"{SOP_ROOT}{number + 1}"
            at = arrival_time(number, instances, recent, now)
            name = str(SpoolName.new(uid, at))
            if number < recent:
                names.append(name)
            shaped = json.dumps({"copy_uid": uid, "shaping": ["coerce"]}, separators=(",", ":"))
            yield (at, "received", "receive", uid, name, None, None, None, None,
                   detail["received"], None, None)
            yield (at + 0.05, "routed", "filter", uid, name, None, study, series, None,
                   detail["routed"], None, None)
            yield (at + 0.06, "shaped", "filter", uid, name, "ai", None, None, None, shaped,
                   None, None)
            yield (at + 0.2, "sent", "send-pacs", uid, name, "pacs", None, None, 0,
                   detail["sent-pacs"], None, None)
            yield (at + 0.3, "sent", "send-ai", uid, name, "ai", None, None, 0,
                   detail["sent-ai"], None, None)
            number += 1


def touch_all(directory: Path, names: list[str]) -> None:
    for name in names:
        os.close(os.open(directory / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))


def big_journal(base: Path, rows: int) -> BigJournal:
    """Part 2's conf dir: its spool's journal filled, its ``sent/<ep>/`` too."""
    start = time.monotonic()
    root = fresh_dir(base, "journal")
    endpoint = {"endpoint": {"host": "127.0.0.1", "port": 1, "ae_title": "PACS"}}
    conf = write_conf(root, router={"log_level": "INFO"},
                      endpoints={name: endpoint for name in ENDPOINTS})
    spool = Spool(root / "spool").create(ENDPOINTS)
    instances = rows // EVENTS_PER_INSTANCE
    recent = int(instances * RECENT_SHARE)
    sizes = study_sizes(instances, random.Random(18))
    path = store.journal_path(spool.run_dir)
    conn = store.open_journal(path).conn
    names: list[str] = []
    try:
        conn.execute("BEGIN")
        conn.executemany(schema.INSERT, journal_rows(sizes, recent, time.time(), names))
        conn.execute("COMMIT")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()
    for name in ENDPOINTS:
        touch_all(spool.root / "sent" / name, names)
    size = sum(p.stat().st_size for p in path.parent.glob(path.name + "*"))
    journal = BigJournal(conf, instances * EVENTS_PER_INSTANCE, instances, recent,
                         len(names) * len(ENDPOINTS), f"{STUDY_ROOT}1", f"{SOP_ROOT}1",
                         size / 1e6, time.monotonic() - start)
    log(f"journal: {journal.rows:,} rows ({instances:,} instances, {len(sizes):,} studies, "
        f"{recent:,} in the last 24 h), {journal.megabytes:.0f} MB, {journal.spool_files:,} "
        f"files in sent/, made in {journal.fill_seconds:.0f} s")
    return journal


def timed_cli(conf: Path, args: list[str], runs: int, ok: tuple[int, ...] = (0,)) -> \
        list[tuple[float, float]]:
    """``dicomflow <args>`` as a subprocess, ``runs`` times: (wall s, CPU s) each."""
    cmd = [sys.executable, "-m", "services.cli", "--conf", str(conf), *args]
    # as an installed router runs it: with its bytecode cached (an environment that sets
    # PYTHONDONTWRITEBYTECODE would otherwise compile DicomFlow's ~80 modules every run)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    subprocess.run(cmd, capture_output=True, timeout=TIMEOUT, cwd=REPO, env=env)  # untimed
    times = []
    for _ in range(runs):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.monotonic()
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, cwd=REPO,
                              env=env)
        wall = time.monotonic() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        times.append((wall, after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime))
        if done.returncode not in ok:
            raise RuntimeError(f"dicomflow {' '.join(args)} exited {done.returncode}: "
                               f"{(done.stdout + done.stderr)[-2000:]}")
    first = done.stdout.strip().splitlines()[:1]
    log(f"{' '.join(args[:2])}: " + ", ".join(f"{t:.2f} s" for t, _ in times)
        + (f" — {first[0][:120]}" if first else ""))
    return times


def measure_trace(base: Path, journal: BigJournal, scale: Scale, results: Results) -> None:
    """Both traces, and that of an unknown UID on an empty spool (no journal): the
    command's start-up (Python, its imports), which the other two include."""
    empty = write_conf(fresh_dir(base, "empty"), router={"log_level": "INFO"})
    results.timed["trace empty"] = timed_cli(empty, ["trace", journal.instance], scale.runs,
                                             ok=(0, 1))
    results.timed["trace study"] = timed_cli(journal.conf, ["trace", journal.study], scale.runs)
    results.timed["trace instance"] = timed_cli(journal.conf, ["trace", journal.instance],
                                                scale.runs)


def measure_reconcile(journal: BigJournal, scale: Scale, results: Results) -> None:
    # exit 1 (something unaccounted for) is still a timing; the first line says so
    results.timed["reconcile"] = timed_cli(journal.conf, ["reconcile", "--since", "24h"],
                                           scale.runs, ok=(0, 1))


# -- the report ------------------------------------------------------------------------

def cpu_lines(results: Results) -> tuple[list[str], list[str]]:
    on = [r.total for r in results.cpu if r.journal]
    off = [r.total for r in results.cpu if not r.journal]
    if not on or not off:
        return [], []
    # neighbours (0, 1), (2, 3) … hold one round of each (journal_on): (on, off) pairs
    pairs = [(a, b) if a.journal else (b, a)
             for a, b in zip(results.cpu[::2], results.cpu[1::2], strict=True)]
    spread = [a.total - b.total for a, b in pairs]
    paired = statistics.median(spread)
    count = results.cpu_images
    lines = [f"| pipeline CPU per image (receive + filter + send), journal on | "
             f"{statistics.median(on):.2f} ms | |",
             f"| pipeline CPU per image, journal off | {statistics.median(off):.2f} ms | |",
             f"| journal's cost: on − off (median of {len(pairs)} paired rounds, {count} images "
             f"each; the pairs' differences ranged {min(spread):+.2f} to {max(spread):+.2f}) | "
             f"{paired:+.2f} ms per image | ≤ 0.3 ms |"]
    names = list(results.cpu[0].per_daemon)
    each = {name: statistics.median(a.per_daemon[name] - b.per_daemon[name] for a, b in pairs)
            for name in names}
    lines.append("| of which (median of the pairs' differences) | "
                 + ", ".join(f"{name} {ms:+.2f} ms" for name, ms in each.items()) + " | |")
    rounds = ["| round | journal | " + " | ".join(names) + " | total (ms CPU/image) |",
              "|---|---|" + "---|" * (len(names) + 1)]
    for index, r in enumerate(results.cpu, start=1):
        rounds.append(f"| {index} | {'on' if r.journal else 'off'} | "
                      + " | ".join(f"{r.per_daemon[n]:.2f}" for n in names)
                      + f" | {r.total:.2f} |")
    return lines, rounds


def report(results: Results) -> str:
    """The README-ready table, then the per-round values."""
    lines = ["| the journal (issue 18) | measured | goal |", "|---|---|---|"]
    cpu, rounds = cpu_lines(results)
    lines += cpu
    if results.writer:
        lines.append("| the journal's own work per image: its 3 events recorded and written by the "
                     f"writer thread, in one process, {results.writer_burst}-image transactions | "
                     f"{statistics.median(results.writer):.3f} ms CPU (median of "
                     f"{len(results.writer)}) | ≤ 0.3 ms |")
    journal = results.journal
    if journal is not None:
        lines.append(f"| journal of {journal.rows:,} rows ({journal.instances:,} instances over "
                     f"{SPAN_DAYS} days, {journal.recent:,} in the last 24 h) | "
                     f"{journal.megabytes:.0f} MB ({journal.megabytes * 1e6 / journal.rows:.0f} "
                     f"bytes/row) | |")
        labels = {"trace empty": ("`dicomflow trace` on an empty spool (its start-up)", ""),
                  "trace study": (f"`dicomflow trace <study>`, {TRACED_STUDY_SIZE} instances",
                                  "≤ 1 s"),
                  "trace instance": ("`dicomflow trace <instance>`", "≤ 1 s"),
                  "reconcile": (f"`dicomflow reconcile --since 24h` ({journal.recent:,} "
                                f"instances, {journal.spool_files:,} files in sent/)", "≤ 30 s")}
        for key, runs in results.timed.items():
            label, goal = labels[key]
            wall, cpu_s = (statistics.median(r[i] for r in runs) for i in (0, 1))
            lines.append(f"| {label} | {wall:.2f} s ({cpu_s:.2f} s CPU), median of {len(runs)} "
                         f"| {goal} |")
    notes = ["", *rounds] if rounds else []
    return "\n".join(lines + notes)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.journal",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="the cpu part scaled down (≈ 1 min in all)")
    parser.add_argument("--only", default=",".join(PARTS), help=f"parts: {','.join(PARTS)}")
    parser.add_argument("--rounds", type=int, help="cpu rounds, on and off in turn (even; "
                        "default 8, --quick 6)")
    parser.add_argument("--workdir", type=Path, help="where the data and spools go (one disk)")
    args = parser.parse_args(argv)
    args.parts = set(args.only.split(","))
    unknown = args.parts - set(PARTS)
    if unknown:
        parser.error(f"unknown part(s): {', '.join(sorted(unknown))}")
    if args.rounds is not None and (args.rounds < 2 or args.rounds % 2):
        parser.error("--rounds: an even number, at least 2 (one on, one off)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    scale = QUICK if args.quick else Scale()
    results = Results()
    base = Path(tempfile.mkdtemp(prefix="dicomflow-journal-", dir=args.workdir))
    try:
        if "cpu" in args.parts:
            measure_cpu(base, scale, args.rounds or scale.cpu_rounds, results)
        if "writer" in args.parts:
            measure_writer(base, scale, results)
        if args.parts & {"trace", "reconcile"}:
            results.journal = big_journal(base, scale.journal_rows)
            if "trace" in args.parts:
                measure_trace(base, results.journal, scale, results)
            if "reconcile" in args.parts:
                measure_reconcile(results.journal, scale, results)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print(report(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
