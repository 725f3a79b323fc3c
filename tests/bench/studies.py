"""The cost of studies (issue 17): what study-level routing costs the filter and how
soon a complete study is released.

    .venv/bin/python -m tests.bench.studies            # full run (several minutes)
    .venv/bin/python -m tests.bench.studies --quick    # everything scaled down (< 2 min)
    .venv/bin/python -m tests.bench.studies --only cpu,release

Five parts (``--only cpu,release,rebuild,memory,status``), each a ratio or a time taken
within one run; nothing is asserted (README, Performance):

1. ``cpu``: the filter's CPU per image for an instance-level endpoint alone (A) and with
   a study-level endpoint with a condition beside it (B), a fresh ``dicomflow filter``
   daemon per run, A and B in turn for every round (interleaved, the machine's noise
   falls on both). Files are renamed into ``incoming/`` as the receiver publishes
   them; the CPU (user + system from /proc) runs from the first file in until the
   filter is idle again with every copy in the instance-level outbox (B's files then
   wait in ``accepted/``: its ``stable_time`` is an hour).
2. ``release``: real ``dicomflow receive`` + ``filter`` daemons, one study-level endpoint;
   DCMTK ``storescu`` sends a study of small images; the time from ``storescu``'s end
   (the last instance acknowledged, so durable in ``incoming/``) to the study list in
   ``run/studies/queue/<endpoint>/``, with ``completion = stable`` (minus
   ``stable_time``: the excess) and ``completion = mpps`` (a pynetdicom SCU sends
   N-CREATE and N-SET COMPLETED naming every instance to the receiver right after).
3. ``rebuild``: ``accepted/`` filled with small files of many studies (standard names,
   written directly), ``FilterDaemon.start()`` in process (its recovery pass indexes
   them from their headers) timed.
4. ``memory``: as 3 with studies of two instances each: the RSS of a ``dicomflow
   filter`` daemon once ready, minus that of one on an empty spool, per study; and
   the Python memory the in-process start retains (tracemalloc), per study.
5. ``status``: the spool of 4 (its state file lists every waiting study) plus hard
   links in outbox/, sent/ and failed/ up to a total number of files;
   ``dicomflow status --json`` timed as a subprocess (median of a few runs).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from loguru import logger
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import UID, generate_uid

from pipeline.config import load
from pipeline.spool_names import SpoolName
from tests.bench.run import DataSet, cpu_seconds, log, make_ct_series, storescu, wait_until
from tests.helpers import Daemon, dicom_files, make_dataset, router_port, write_conf, write_dataset

PARTS = ("cpu", "release", "rebuild", "memory", "status")
INSTANCE_EP = "pacs"
STUDY_EP = "ai"
#: the study-level endpoint's condition (one that the benchmark's files do not meet:
#: the study is evaluated, not sent)
CONDITION = "SeriesDescription=AXIAL.*"
HOUR = "1h"
MPPS_CLASS = "1.2.840.10008.3.1.2.3.3"
CT_CLASS = "1.2.840.10008.5.1.4.1.1.2"
UID_ROOT = "1.2.826.0.1.3680043.8.498."
TIMEOUT = 3600.0


@dataclass(frozen=True)
class Scale:
    """How big each part is (``--quick`` shrinks every figure)."""

    cpu_images: int = 500
    cpu_rounds: int = 6
    cpu_size: int = 512
    release_images: int = 2000
    release_rounds: int = 2
    stable_time: float = 5.0
    rebuild_files: int = 20_000
    rebuild_studies: int = 200
    memory_studies: int = 10_000
    status_files: int = 100_000
    status_runs: int = 5


QUICK = Scale(cpu_images=60, cpu_rounds=6, cpu_size=128, release_images=200, release_rounds=1,
              stable_time=2.0, rebuild_files=2000, rebuild_studies=20, memory_studies=1000,
              status_files=10_000, status_runs=3)


@dataclass
class Results:
    """Every part's figures, filled in as the parts run."""

    cpu: dict[str, list[float]] = field(default_factory=dict)   # config → ms CPU per image
    release: dict[str, list[float]] = field(default_factory=dict)  # mode → s after the last
    release_after_nset: list[float] = field(default_factory=list)
    stable_time: float = 0.0
    release_images: int = 0
    rebuild: tuple[int, int, float, float] | None = None     # files, studies, s, s CPU
    memory: tuple[int, float, float] | None = None           # studies, RSS MB, traced MB
    status: tuple[int, list[tuple[float, float]]] | None = None  # files, (s, s CPU) per run
    status_empty: list[tuple[float, float]] = field(default_factory=list)


# -- small files with fresh UIDs, fast --------------------------------------------------

class Template:
    """A small CT file whose three UIDs are replaced byte for byte by same-length ones
    (writing 20,000 files through pydicom would take longer than what is measured)."""

    WIDTH = 12  # digits of the number that makes each UID unique

    def __init__(self) -> None:
        self.uids = {kind: (UID_ROOT + f"{digit}." + "9" * 20 + ".1" + "0" * self.WIDTH)
                     for digit, kind in enumerate(("study", "series", "sop"), start=1)}
        ds = make_dataset(rows=8, cols=8, patient_name="BENCH^STUDIES", patient_id="BENCH04",
                          study_uid=self.uids["study"], SeriesInstanceUID=self.uids["series"],
                          SeriesNumber=1)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = UID(self.uids["sop"])
        with tempfile.TemporaryDirectory() as tmp:
            self.data = write_dataset(ds, Path(tmp) / "t.dcm").read_bytes()

    def uid(self, kind: str, number: int) -> str:
        # a component never starts with 0 (PS3.5 §9.1): the leading 1 stays
        return self.uids[kind][: -self.WIDTH] + f"{number:0{self.WIDTH}d}"

    def instance(self, study: int, series: int, sop: int) -> tuple[str, bytes]:
        """(SOP Instance UID, file bytes) of one instance."""
        data = self.data
        for kind, number in (("study", study), ("series", series), ("sop", sop)):
            data = data.replace(self.uids[kind].encode(), self.uid(kind, number).encode())
        return self.uid("sop", sop), data


def fill_accepted(spool: Path, template: Template, studies: int, per_study: int) -> int:
    """``studies`` × ``per_study`` files in ``accepted/`` under standard names (arrival
    order = study order), as a filter leaves them when it stops: each also hard-linked
    into the instance-level outbox and recorded in ``run/studies/reached.log`` (so the
    restart only indexes them). The number of files written."""
    accepted, outbox = spool / "accepted", spool / "outbox" / INSTANCE_EP
    records = spool / "run" / "studies"
    for directory in (accepted, outbox, records):
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    base = time.time() - 600
    number = 0
    with open(records / "reached.log", "w", encoding="ascii") as reached:
        for study in range(studies):
            for _ in range(per_study):
                uid, data = template.instance(study, study, number)
                name = str(SpoolName.new(uid, base + number * 1e-4))
                fd = os.open(accepted / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                try:
                    os.write(fd, data)
                finally:
                    os.close(fd)
                os.link(accepted / name, outbox / name)
                reached.write(f"{name}\t{INSTANCE_EP}\n")
                number += 1
    os.chmod(records / "reached.log", 0o600)
    return number


def study_endpoint(**filter_: str) -> dict[str, dict]:
    return {"endpoint": {"host": "127.0.0.1", "port": 1, "ae_title": "AI"},
            "filter": {"level": "study", "conditions": CONDITION, "stable_time": HOUR,
                       "max_wait": HOUR, **filter_}}


def instance_endpoint() -> dict[str, dict]:
    return {"endpoint": {"host": "127.0.0.1", "port": 1, "ae_title": "PACS"}}


def fresh_dir(base: Path, name: str) -> Path:
    path = base / f"{name}-{time.monotonic_ns()}"
    path.mkdir(parents=True)
    return path


# -- 1. CPU per image, with and without a study-level endpoint ---------------------------

CONFIG_A = "A: instance-level endpoint"
CONFIG_B = "B: + study-level endpoint"
CONFIGS: dict[str, bool] = {CONFIG_A: False, CONFIG_B: True}


class FilterProcess:
    """A conf dir, a spool and one ``dicomflow filter`` daemon."""

    def __init__(self, base: Path, with_study: bool) -> None:
        self.base = fresh_dir(base, "filter")
        endpoints = {INSTANCE_EP: instance_endpoint()}
        if with_study:
            endpoints[STUDY_EP] = study_endpoint()
        self.conf = write_conf(self.base, router={"log_level": "INFO"}, endpoints=endpoints)
        self.spool = self.base / "spool"
        self.staging = self.base / "staging"
        self.staging.mkdir()
        self.daemon = Daemon(self.conf, "filter", log_name="filter")

    def __enter__(self) -> FilterProcess:
        self.daemon.start().wait_log("filter ready")
        return self

    def __exit__(self, *exc: object) -> None:
        self.daemon.stop()
        shutil.rmtree(self.base, ignore_errors=True)

    def feed(self, data: DataSet, tag: str) -> None:
        """Every file into ``incoming/`` by rename, as the receiver publishes."""
        for index, path in enumerate(data.files):
            staged = self.staging / f"{tag}{index:06d}.dcm"
            os.link(path, staged)
            os.rename(staged, self.spool / "incoming" / staged.name)

    def routed(self, count: int) -> bool:
        return (len(dicom_files(self.spool / "outbox" / INSTANCE_EP)) >= count
                and not dicom_files(self.spool / "incoming"))

    def wait_idle(self) -> float:
        """The daemon's CPU once it stopped moving (its trailing record and state
        writes included): unchanged over three reads 50 ms apart."""
        last, same = cpu_seconds(self.daemon.pid), 0
        deadline = time.monotonic() + 60
        while same < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
            now = cpu_seconds(self.daemon.pid)
            same = same + 1 if now == last else 0
            last = now
        return last


def cpu_round(base: Path, with_study: bool, data: DataSet, warm: DataSet) -> float:
    """One run: the filter's ms CPU per image."""
    with FilterProcess(base, with_study) as run:
        run.feed(warm, "warm")
        wait_until(lambda: run.routed(warm.count), TIMEOUT, 0.01, "warm-up")
        cpu0 = run.wait_idle()
        run.feed(data, "ct")
        wait_until(lambda: run.routed(warm.count + data.count), TIMEOUT, 0.005,
                   "every file in the instance-level outbox")
        return (run.wait_idle() - cpu0) * 1000 / data.count


def measure_cpu(base: Path, scale: Scale, results: Results) -> None:
    data = make_ct_series(base / "data" / "ct", scale.cpu_images, scale.cpu_size)
    warm = make_ct_series(base / "data" / "warm", 10, scale.cpu_size)
    for round_ in range(scale.cpu_rounds):
        for name, with_study in CONFIGS.items():
            ms = cpu_round(base, with_study, data, warm)
            results.cpu.setdefault(name, []).append(ms)
            log(f"cpu round {round_ + 1}: {name}: {ms:.2f} ms CPU/image")
    shutil.rmtree(base / "data", ignore_errors=True)


# -- 2. from the last instance to the release ------------------------------------------

STABLE, MPPS = "stable", "mpps"


def make_study(directory: Path, count: int) -> tuple[str, dict[str, list[str]], list[Path]]:
    """One study of ``count`` small images in two series: (study UID, series UID →
    SOP Instance UIDs, files)."""
    study = generate_uid()
    series: dict[str, list[str]] = {generate_uid(): [], generate_uid(): []}
    files = []
    for index in range(count):
        number = index % 2
        series_uid = list(series)[number]
        ds = make_dataset(rows=8, cols=8, study_uid=study, SeriesInstanceUID=series_uid,
                          SeriesNumber=number + 1, InstanceNumber=index // 2 + 1,
                          patient_name="BENCH^RELEASE", patient_id="BENCH05")
        series[series_uid].append(ds.SOPInstanceUID)
        files.append(write_dataset(ds, directory / f"img{index:05d}.dcm"))
    return study, series, files


def mpps_datasets(study: str, series: dict[str, list[str]]) -> tuple[Dataset, Dataset]:
    """The N-CREATE attribute list and the N-SET COMPLETED modification list."""
    create = Dataset()
    item = Dataset()
    item.StudyInstanceUID = study
    create.ScheduledStepAttributesSequence = Sequence([item])
    create.PerformedProcedureStepID = "PPS1"
    create.PerformedProcedureStepStatus = "IN PROGRESS"
    create.Modality = "CT"
    create.PerformedSeriesSequence = Sequence()
    done = Dataset()
    done.PerformedProcedureStepStatus = "COMPLETED"
    items = []
    for series_uid, instances in series.items():
        entry = Dataset()
        entry.SeriesInstanceUID = series_uid
        refs = []
        for uid in instances:
            ref = Dataset()
            ref.ReferencedSOPClassUID = CT_CLASS
            ref.ReferencedSOPInstanceUID = uid
            refs.append(ref)
        entry.ReferencedImageSequence = Sequence(refs)
        items.append(entry)
    done.PerformedSeriesSequence = Sequence(items)
    return create, done


def send_mpps(port: int, create: Dataset, done: Dataset) -> None:
    """N-CREATE then N-SET COMPLETED over one association (TCP_NODELAY, as a sender
    should: DESIGN §8)."""
    from pynetdicom import AE, evt  # only here: the benchmark's MPPS SCU

    def nodelay(event: evt.Event) -> None:
        wrapper = event.assoc.dul.socket
        if wrapper is not None and wrapper.socket is not None:
            wrapper.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(MPPS_CLASS)
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOMFLOW",
                         evt_handlers=[(evt.EVT_CONN_OPEN, nodelay)])
    if not assoc.is_established:
        raise RuntimeError("MPPS association refused")
    try:
        uid = generate_uid()
        for status, _ in (assoc.send_n_create(create, MPPS_CLASS, uid),
                          assoc.send_n_set(done, MPPS_CLASS, uid)):
            if status is None or status.get("Status", -1) != 0:
                raise RuntimeError(f"MPPS refused: {status}")
    finally:
        assoc.release()


def release_round(base: Path, mode: str, stable: float, study: tuple) -> tuple[float, float]:
    """One study sent; (seconds from the last instance to the release, seconds from the
    N-SET's response to it — 0 in stable mode)."""
    uid, series, files = study
    root = fresh_dir(base, f"release-{mode}")
    conf = write_conf(root, router={"log_level": "INFO"}, endpoints={STUDY_EP: study_endpoint(
        conditions="", completion=mode, stable_time=f"{stable:g}s")})
    queue_dir = root / "spool" / "run" / "studies" / "queue" / STUDY_EP
    daemons = [Daemon(conf, "receive"), Daemon(conf, "filter")]
    try:
        for daemon in daemons:
            daemon.start()
        daemons[0].wait_log("listening as")
        daemons[1].wait_log("filter ready")
        port = router_port(conf)
        storescu(port, files, "DICOMFLOW")
        last = time.monotonic()
        after_nset = last
        if mode == MPPS:
            send_mpps(port, *mpps_datasets(uid, series))
            after_nset = time.monotonic()
        wait_until(lambda: queue_dir.is_dir() and any(
            not n.startswith(".") for n in os.listdir(queue_dir)), TIMEOUT, 0.002, "the release")
        released = time.monotonic()
        return released - last, released - after_nset
    finally:
        for daemon in daemons:
            daemon.stop()
        shutil.rmtree(root, ignore_errors=True)


def measure_release(base: Path, scale: Scale, results: Results) -> None:
    study = make_study(base / "data" / "release", scale.release_images)
    results.stable_time, results.release_images = scale.stable_time, scale.release_images
    for round_ in range(scale.release_rounds):
        for mode in (STABLE, MPPS):
            seconds, after_nset = release_round(base, mode, scale.stable_time, study)
            results.release.setdefault(mode, []).append(seconds)
            if mode == MPPS:
                results.release_after_nset.append(after_nset)
            log(f"release round {round_ + 1}: completion = {mode}: {seconds:.3f} s after the "
                f"last instance")
    shutil.rmtree(base / "data", ignore_errors=True)


# -- 3., 4., 5. a full accepted/: rebuild, memory, status --------------------------------

def waiting_spool(base: Path, template: Template, studies: int, per_study: int) -> Path:
    """A conf dir whose spool's ``accepted/`` holds the waiting files."""
    root = fresh_dir(base, "waiting")
    conf = write_conf(root, router={"log_level": "INFO"},
                      endpoints={INSTANCE_EP: instance_endpoint(), STUDY_EP: study_endpoint()})
    fill_accepted(root / "spool", template, studies, per_study)
    return conf


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """loguru at WARNING while the filter runs in this process (its INFO lines would be
    timed too)."""
    logger.remove()
    handler = logger.add(sys.stderr, level="WARNING")
    try:
        yield
    finally:
        logger.remove(handler)
        logger.add(sys.stderr, level="INFO")


def timed_start(conf: Path, traced: bool = False) -> tuple[float, float, int]:
    """Seconds ``FilterDaemon.start()`` takes (wall, CPU of this process); with
    ``traced``, the bytes of Python memory it leaves allocated (tracemalloc, slower)."""
    from services.filter import FilterDaemon

    config = load(conf)
    with quiet():
        if traced:
            tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0] if traced else 0
        daemon = FilterDaemon(config)
        start, cpu = time.monotonic(), time.process_time()
        daemon.start()
        seconds, cpu = time.monotonic() - start, time.process_time() - cpu
        grown = tracemalloc.get_traced_memory()[0] - before if traced else 0
        if traced:
            tracemalloc.stop()
        if daemon.desk.index.waiting_for is not None:
            waiting = len(daemon.desk.index.waiting_for)
            log(f"start(): {waiting} file(s) indexed as waiting")
        daemon.close()
    return seconds, cpu, grown


def measure_rebuild(base: Path, scale: Scale, template: Template, results: Results) -> None:
    per_study = scale.rebuild_files // scale.rebuild_studies
    conf = waiting_spool(base, template, scale.rebuild_studies, per_study)
    seconds, cpu, _ = timed_start(conf)
    results.rebuild = (scale.rebuild_studies * per_study, scale.rebuild_studies, seconds, cpu)
    log(f"rebuild: {scale.rebuild_studies * per_study} files in {seconds:.2f} s ({cpu:.2f} s CPU)")
    shutil.rmtree(conf.parent, ignore_errors=True)


def daemon_rss_mb(conf: Path) -> float:
    """VmRSS of a ``dicomflow filter`` daemon once it is ready."""
    daemon = Daemon(conf, "filter", log_name="filter-rss").start()
    try:
        daemon.wait_log("filter ready", timeout=TIMEOUT)
        with open(f"/proc/{daemon.pid}/status") as fp:
            for line in fp:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        raise RuntimeError("no VmRSS")
    finally:
        daemon.stop()


def measure_memory(base: Path, scale: Scale, template: Template, results: Results) -> Path:
    """Part 4; returns the conf of its spool (part 5 reuses it)."""
    empty = waiting_spool(base, template, 0, 0)
    full = waiting_spool(base, template, scale.memory_studies, 2)
    rss = daemon_rss_mb(full) - daemon_rss_mb(empty)
    _, _, grown = timed_start(full, traced=True)
    results.memory = (scale.memory_studies, rss, grown / 1e6)
    log(f"memory: {scale.memory_studies} studies waiting: +{rss:.1f} MB RSS, "
        f"{grown / 1e6:.1f} MB traced")
    shutil.rmtree(empty.parent, ignore_errors=True)
    return full


def spread_links(conf: Path, total: int) -> int:
    """Hard links of one file under standard names in outbox/, sent/ and failed/ of
    the instance-level endpoint, until the spool holds ``total`` files; how many."""
    spool = conf.parent / "spool"
    source = next(p for p in (spool / "accepted").iterdir() if not p.name.startswith("."))
    existing = len(dicom_files(spool / "accepted")) + len(dicom_files(spool / "outbox" / INSTANCE_EP))
    wanted = max(total - existing, 0)
    shares = {"outbox": 0.5, "sent": 0.4, "failed": 0.1}
    made = 0
    base = time.time() - 3600
    for index, (stage, share) in enumerate(shares.items()):
        directory = spool / stage / INSTANCE_EP
        directory.mkdir(parents=True, exist_ok=True)
        count = wanted - made if index == len(shares) - 1 else int(wanted * share)
        for _ in range(count):
            uid = f"{UID_ROOT}7.{made}"
            os.link(source, directory / str(SpoolName.new(uid, base + made * 1e-4)))
            made += 1
    return existing + made


def timed_status(conf: Path, runs: int) -> list[tuple[float, float]]:
    """``dicomflow status --json`` as a subprocess, ``runs`` times: (wall s, CPU s)."""
    cmd = [sys.executable, "-m", "services.cli", "status", "--json", "--conf", str(conf)]
    times = []
    for _ in range(runs):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.monotonic()
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                              cwd=Path(__file__).resolve().parents[2])
        wall = time.monotonic() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        times.append((wall, after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime))
        if done.returncode != 0:
            raise RuntimeError(f"status failed: {done.stderr[-2000:]}")
    if "waiting" not in done.stdout:
        log("status: no waiting studies in the output (state file unread?)")
    return times


def measure_status(base: Path, conf: Path, scale: Scale, template: Template,
                   results: Results) -> None:
    """Part 5, and the same command on an empty spool (its start-up: the imports)."""
    files = spread_links(conf, scale.status_files)
    state = conf.parent / "spool" / "run" / "studies" / "state.json"
    log(f"status: {files} files, state file {state.stat().st_size / 1e6:.1f} MB")
    empty = waiting_spool(base, template, 0, 0)
    results.status_empty = timed_status(empty, scale.status_runs)
    results.status = (files, timed_status(conf, scale.status_runs))
    log("status: " + ", ".join(f"{t:.2f} s ({c:.2f} s CPU)" for t, c in results.status[1])
        + "; empty spool: " + ", ".join(f"{t:.2f} s" for t, _ in results.status_empty))
    shutil.rmtree(empty.parent, ignore_errors=True)


# -- the report ------------------------------------------------------------------------

def report(results: Results) -> str:
    """The README-ready table, then the per-round values."""
    lines = ["| study-level routing (issue 17) | measured | goal |", "|---|---|---|"]
    notes = []
    if len(results.cpu) == len(CONFIGS):
        a, b = (statistics.median(results.cpu[name]) for name in CONFIGS)
        lines += [f"| filter CPU per image, {CONFIG_A} | {a:.2f} ms | |",
                  f"| filter CPU per image, {CONFIG_B} | {b:.2f} ms | |",
                  f"| difference B − A (medians) | {b - a:+.2f} ms | ≤ +0.3 ms |"]
        rounds = list(zip(results.cpu[CONFIG_A], results.cpu[CONFIG_B], strict=True))
        paired = statistics.median(y - x for x, y in rounds)
        lines.append(f"| difference B − A (median of the rounds' differences) | {paired:+.2f} ms "
                     f"| ≤ +0.3 ms |")
        notes.append("CPU per round (A / B, ms per image): "
                     + ", ".join(f"{x:.2f} / {y:.2f}" for x, y in rounds))
    if results.release:
        count, stable = results.release_images, results.stable_time
        if STABLE in results.release:
            seconds = statistics.median(results.release[STABLE])
            lines.append(f"| last of {count:,} instances → release, completion = stable "
                         f"(stable_time {stable:g} s) | {seconds:.2f} s ({seconds - stable:+.2f} s "
                         f"over stable_time) | ≈ stable_time |")
        if MPPS in results.release:
            seconds = statistics.median(results.release[MPPS])
            nset = statistics.median(results.release_after_nset)
            lines.append(f"| last of {count:,} instances → release, completion = mpps | "
                         f"{seconds:.2f} s ({nset:.2f} s after the N-SET's response) | ≈ 0 |")
        notes.append("release per round (s after the last instance): " + "; ".join(
            f"{mode}: " + ", ".join(f"{s:.2f}" for s in values)
            for mode, values in results.release.items()))
    if results.rebuild:
        files, studies, seconds, cpu = results.rebuild
        lines.append(f"| index rebuild, {files:,} waiting files of {studies:,} studies | "
                     f"{seconds:.2f} s ({files / seconds:,.0f} files/s; {cpu:.2f} s CPU, "
                     f"{cpu * 1e3 / files:.2f} ms/file) | ≤ 10 s |")
    if results.memory:
        studies, rss, traced = results.memory
        lines.append(f"| memory, {studies:,} studies × 2 instances waiting | +{rss:.0f} MB RSS "
                     f"({rss * 1e3 / studies:.1f} KB/study); {traced:.0f} MB Python "
                     f"({traced * 1e3 / studies:.1f} KB/study) | |")
    if results.status:
        files, runs = results.status
        wall, cpu = (statistics.median(r[i] for r in runs) for i in (0, 1))
        empty = statistics.median(r[0] for r in results.status_empty)
        lines.append(f"| `dicomflow status --json`, {files:,} files | {wall:.2f} s ({cpu:.2f} s CPU; "
                     f"{empty:.2f} s on an empty spool), median of {len(runs)} | ≤ 2 s |")
        notes.append("status runs (s, CPU s): " + ", ".join(f"{t:.2f} ({c:.2f})" for t, c in runs))
    return "\n".join(lines + [""] + notes)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.studies",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="everything scaled down (< 2 min)")
    parser.add_argument("--only", default=",".join(PARTS), help=f"parts: {','.join(PARTS)}")
    parser.add_argument("--workdir", type=Path, help="where the data and spools go (one disk)")
    args = parser.parse_args(argv)
    args.parts = set(args.only.split(","))
    unknown = args.parts - set(PARTS)
    if unknown:
        parser.error(f"unknown part(s): {', '.join(sorted(unknown))}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    scale = QUICK if args.quick else Scale()
    results = Results()
    base = Path(tempfile.mkdtemp(prefix="dicomflow-studies-", dir=args.workdir))
    try:
        template = Template()
        if "cpu" in args.parts:
            measure_cpu(base, scale, results)
        if "release" in args.parts:
            measure_release(base, scale, results)
        if "rebuild" in args.parts:
            measure_rebuild(base, scale, template, results)
        if args.parts & {"memory", "status"}:
            conf = measure_memory(base, scale, template, results)
            if "status" in args.parts:
                measure_status(base, conf, scale, template, results)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print(report(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
