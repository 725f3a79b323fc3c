"""``/metrics``: DicomFlow in Prometheus' text format, through ``prometheus_client``.

Two kinds of series, kept apart because Prometheus treats them differently:

- **Counters and histograms** come from the journal's events as they are written
  (:class:`pipeline.journal.tail.Tail`): a ``received`` event is one more instance
  received, a ``sent`` one more delivered — never from counting files, since retention
  shrinks ``sent/`` and a counter may only go up. They start at zero when the web daemon
  starts (a counter reset, which ``rate()`` handles); with ``[router] journal = false``
  they stay at zero.
- **Gauges** are read from the spool at each scrape, from the same report as
  ``dicomflow status --json``: files and oldest age per stage and endpoint, endpoint
  state, daemons up, free space and the disk floor, the journal's size.

Prometheus naming: the ``dicomflow_`` prefix, base units (seconds, bytes), ``_total``
on counters. Labels are endpoint names, stages, states and daemon names only — all
from the configuration or fixed lists, never a UID, a file name, an AE title or
patient data (a label's every value is a new series kept for weeks).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from pipeline.journal import events as kinds
from pipeline.journal.tail import Tail, TailEvent
from pipeline.log import escape, logger
from pipeline.names import is_valid_endpoint_name

NAMESPACE = "dicomflow"
CATCH_UP_SECONDS = 2.0      # a scrape reads the journal at most this long (the rest next time)
MAX_ENDPOINT_LABELS = 256   # distinct endpoint names counted (bounds the series)
STORE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
SEND_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
#: an endpoint's states (one series each, 1 = current): ``dicomflow status``'s, but for
#: ``up``, which stands for its ``delivering`` and ``idle`` (the destination answers; the
#: queue's gauges tell the two apart)
ENDPOINT_STATES = ("up", "busy", "down", "outside_window", "stopped", "starting",
                   "not_running", "orphaned")
UP_STATES = ("delivering", "idle")
INSTANCE_STAGES = ("incoming", "accepted", "rejected", "quarantine")
ENDPOINT_STAGES = ("outbox", "failed", "sent")

#: what ``Metrics.disk`` returns: free bytes of the spool's filesystem, and the floor
DiskReading = tuple[int, int]


class JournalCounters:
    """The counters and histograms, fed event by event."""

    def __init__(self, registry: CollectorRegistry) -> None:
        def counter(name: str, doc: str, *labels: str) -> Counter:
            return Counter(name, doc, labels, namespace=NAMESPACE, registry=registry)

        self.received = counter("received_instances", "Instances acknowledged to a sender "
                                "(C-STORE success).")
        self.received_bytes = counter("received_bytes", "Bytes of the instances acknowledged.")
        self.rejected = counter("rejected_instances", "Instances filtered out by a rule "
                                "(rejected/).")
        self.quarantined = counter("quarantined_instances", "Files moved to quarantine/ "
                                   "(unreadable, not DICOM, unsafe).")
        self.sent = counter("sent_instances", "Instances delivered, by endpoint and outcome "
                            "(success, or a warning status: stored).", "endpoint", "outcome")
        self.failed = counter("failed_instances", "Instances given up (failed/<endpoint>/).",
                              "endpoint")
        self.retries = counter("send_retries", "Tries that failed: to be retried, or the "
                               "last of a file that then went to failed/.", "endpoint")
        self.retried = counter("retried_instances", "Instances moved back from failed/ by "
                               "an operator.", "endpoint")
        self.deleted = counter("deleted_instances", "Delivered copies deleted from sent/ "
                               "(retention, disk floor).", "endpoint")
        self.store_seconds = Histogram("store_duration_seconds", "Receiver: from a C-STORE's "
                                       "data set received to its acknowledgement (checked, "
                                       "fsynced, renamed).", namespace=NAMESPACE,
                                       registry=registry, buckets=STORE_BUCKETS)
        self.send_seconds = Histogram("send_duration_seconds", "Sender: one C-STORE, request "
                                      "to response.", ["endpoint"], namespace=NAMESPACE,
                                      registry=registry, buckets=SEND_BUCKETS)
        self._endpoints: set[str] = set()

    def declare(self, endpoints: Iterable[str]) -> None:
        """Series at zero for these endpoints (a counter that exists before its first
        increment lets ``increase()`` see that first one)."""
        for name in endpoints:
            if self._endpoint(name) is None:
                continue
            for outcome in ("success", "warning"):
                self.sent.labels(name, outcome)
            for family in (self.failed, self.retries, self.retried, self.deleted,
                           self.send_seconds):
                family.labels(name)

    def count(self, event: TailEvent) -> None:
        kind = event.kind
        if kind == kinds.RECEIVED:
            self.received.inc()
            if event.size is not None and event.size >= 0:
                self.received_bytes.inc(event.size)
            if event.duration is not None and event.duration >= 0:
                self.store_seconds.observe(event.duration)
        elif kind == kinds.REJECTED:
            self.rejected.inc()
        elif kind == kinds.QUARANTINED:
            self.quarantined.inc()
        else:
            self._count_endpoint(event)

    def _count_endpoint(self, event: TailEvent) -> None:
        endpoint = self._endpoint(event.endpoint)
        if endpoint is None:
            return
        if event.kind == kinds.SENT:
            self.sent.labels(endpoint, "success" if not event.status else "warning").inc()
            if event.duration is not None and event.duration >= 0:
                self.send_seconds.labels(endpoint).observe(event.duration)
        elif event.kind == kinds.FAILED:
            self.failed.labels(endpoint).inc()
        elif event.kind == kinds.ATTEMPT:
            self.retries.labels(endpoint).inc()
        elif event.kind == kinds.RETRIED:
            self.retried.labels(endpoint).inc()
        elif event.kind == kinds.DELETED:
            self.deleted.labels(endpoint).inc()

    def _endpoint(self, name: str | None) -> str | None:
        """``name`` if it may be a label value (a valid endpoint name, within the cap)."""
        if name is None or not is_valid_endpoint_name(name):
            return None
        if name not in self._endpoints:
            if len(self._endpoints) >= MAX_ENDPOINT_LABELS:
                return None
            self._endpoints.add(name)
        return name


class SpoolGauges(Collector):
    """The gauges, from a fresh status report at each scrape."""

    def __init__(self, report: Callable[[], dict], disk: Callable[[], DiskReading]) -> None:
        self.report = report
        self.disk = disk
        self._trouble = ""  # the last error said (once, not at every scrape)

    def collect(self) -> Iterator[Metric]:
        try:
            report = self.report()
            free, floor = self.disk()
        except Exception as exc:  # noqa: BLE001 - the counters are still worth a scrape
            if str(exc) != self._trouble:
                logger.warning("web: the spool's gauges cannot be read ({}): left out of /metrics",
                               escape(exc))
                self._trouble = str(exc)
            return
        self._trouble = ""
        yield from _daemons(report)
        yield from _stages(report)
        yield from _endpoints(report)
        yield _gauge("spool_free_bytes", "Free space on the spool's filesystem.", value=free)
        yield _gauge("spool_disk_floor_bytes", "Free space the router keeps (then C-STOREs get "
                     "0xA700).", value=floor)
        size = report.get("journal", {}).get("bytes")
        yield _gauge("journal_bytes", "The journal's size on disk (database and WAL).",
                     value=size or 0)


def _gauge(name: str, doc: str, labels: Iterable[str] = (), value: float | None = None
           ) -> GaugeMetricFamily:
    return GaugeMetricFamily(f"{NAMESPACE}_{name}", doc, value=value,
                             labels=None if value is not None else list(labels))


def _daemons(report: dict) -> Iterator[Metric]:
    up = _gauge("daemon_up", "1 when the daemon runs (it holds its lock), 0 when it should "
                "but does not.", ["daemon"])
    for name, info in report["processes"].items():
        up.add_metric([name], 1 if info["running"] else 0)
    for name, info in report["endpoints"].items():
        if info["configured"]:
            up.add_metric([f"send-{name}"], 1 if info["sender_running"] else 0)
    yield up


def _stages(report: dict) -> Iterator[Metric]:
    files = _gauge("stage_files", "DICOM files in a stage folder.", ["stage"])
    oldest = _gauge("stage_oldest_age_seconds", "Age of the oldest file in a stage folder "
                    "(0 when empty).", ["stage"])
    for stage in INSTANCE_STAGES:
        info = report["stages"].get(stage, {"count": 0, "oldest_age_s": None})
        files.add_metric([stage], info["count"])
        oldest.add_metric([stage], info["oldest_age_s"] or 0)
    yield files
    yield oldest


def _endpoints(report: dict) -> Iterator[Metric]:
    files = _gauge("endpoint_files", "Files of an endpoint per stage (outbox: waiting; "
                   "failed: given up; sent: delivered and kept).", ["endpoint", "stage"])
    oldest = _gauge("endpoint_oldest_age_seconds", "Age of an endpoint's oldest waiting or "
                    "failed file (0 when none).", ["endpoint", "stage"])
    state = _gauge("endpoint_state", "1 for the endpoint's current state, 0 for the others.",
                   ["endpoint", "state"])
    waiting = _gauge("studies_waiting", "Studies or series waiting for completion.", ["endpoint"])
    queued = _gauge("studies_queued", "Studies released and queued for the sender.", ["endpoint"])
    for name, info in report["endpoints"].items():
        for stage in ENDPOINT_STAGES:
            files.add_metric([name, stage], info[stage]["count"])
        for stage in ("outbox", "failed"):
            oldest.add_metric([name, stage], info[stage].get("oldest_age_s") or 0)
        current = str(info["state"]).replace(" ", "_")
        current = "up" if current in UP_STATES else current
        for value in ENDPOINT_STATES:
            state.add_metric([name, value], 1 if value == current else 0)
        studies = info.get("studies")
        if studies is not None:
            waiting.add_metric([name], len(studies["waiting"]))
            queued.add_metric([name], studies["queued"]["count"])
    yield from (files, oldest, state, waiting, queued)


class Metrics:
    """The registry of one web daemon: counters fed from the journal, gauges from the
    spool; :meth:`exposition` is one scrape (thread-safe: the server has several)."""

    def __init__(self, tail: Tail, report: Callable[[], dict], disk: Callable[[], DiskReading],
                 endpoints: Iterable[str] = ()) -> None:
        # no ``*_created`` series (a process-wide switch of prometheus_client; this
        # process exposes nothing else): the exposition is exactly the README's table
        disable_created_metrics()
        self.registry = CollectorRegistry(auto_describe=True)
        self.counters = JournalCounters(self.registry)
        self.counters.declare(endpoints)
        self.registry.register(SpoolGauges(report, disk))
        self.tail = tail.begin()
        self._lock = threading.Lock()

    def catch_up(self, budget: float = CATCH_UP_SECONDS) -> int:
        """Count the journal's new events (for at most ``budget`` seconds)."""
        counted = 0
        deadline = time.monotonic() + budget
        while True:
            batch = self.tail.read()
            for event in batch:
                self.counters.count(event)
            counted += len(batch)
            if not batch or time.monotonic() > deadline:
                return counted

    def exposition(self) -> bytes:
        """One scrape. Only the journal's catching up is serialised (one tail, read in
        order); the gauges are read by each scrape itself, and prometheus_client's values
        are safe to read while another thread counts."""
        with self._lock:
            self.catch_up()
        return generate_latest(self.registry)
