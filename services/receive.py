"""``dicomflow receive``: the C-STORE SCP that takes images into ``incoming/``.

One small daemon on the skeleton of :mod:`pipeline.daemon`: :class:`Receiver` holds its
dependencies and answers what :class:`pipeline.dicom.scp.Listener` hears, in DicomFlow's
own request types (the network boundary is ``pipeline/dicom/``); nothing lives in module
globals.

The promise it keeps (README, Design notes: promise 1): a C-STORE success (0x0000) is answered only after
the file is written, fsynced, renamed into ``incoming/`` and the directory fsynced.
Datasets stream to disk (DicomFlow's own receive data path, or pynetdicom's chunked
receive with ``DICOMFLOW_PATCHES_OFF=recvpath``; the temp directory is on the
spool's filesystem so publishing is a rename) so memory does not grow with object size.

With ``[router] receive_processes = N`` > 1, N of these daemons share the port
(``SO_REUSEPORT``), each started with ``--process K`` (supervisord's ``numprocs``). Each
is durable on its own; each holds its own lock (``receive-K``), writes its temp files in
its own ``incoming/.tmp/receive-K/`` (so its start-up clean never removes a sibling's
transfer in flight), keeps its own ``max_associations`` and checks the disk floor itself.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from pipeline import log as logmod
from pipeline.config import Config
from pipeline.daemon import Signals, Step, run
from pipeline.dicom import patches, scp
from pipeline.dicom.filemeta import stamp_ae_titles
from pipeline.dicom.scp import AssociationInfo, Listener, StoreRequest
from pipeline.errors import ConfigError, Refusal
from pipeline.intake import Command, check_received, pad_deflated
from pipeline.journal import Journal, NoJournal, for_daemon
from pipeline.journal.events import RECEIVED
from pipeline.lock import DaemonLock, process_name
from pipeline.log import escape, logger
from pipeline.names import is_valid_uid
from pipeline.spool import Spool
from pipeline.studies.mpps import MppsStore

STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_CANNOT_UNDERSTAND = 0xC000
SHUTDOWN_GRACE = 25.0  # seconds to let in-flight associations finish on SIGTERM
TMP_SWEEP_INTERVAL = 60.0


class Receiver:
    """The receive daemon: the listener, the store handler and the temp-file sweep.

    Its work happens in the listener's association threads; its own loop
    (:func:`pipeline.daemon.run`) only sweeps abandoned temp files, so every step is
    idle and ``run(once=True)`` starts listening and closes again.
    """

    def __init__(self, config: Config, spool: Spool, journal: Journal | None = None) -> None:
        self.config = config
        self.journal = journal or NoJournal()
        self.router = config.router
        self.spool = spool
        self.listener = Listener(self.router, self, MppsStore(spool))
        self.stopping = False
        self._wake = threading.Event()
        self._next_sweep = 0.0
        self.stored = 0
        self.refused = 0

    # -- the daemon skeleton ------------------------------------------------

    def start(self) -> None:
        """Listen (OSError if the address cannot be bound)."""
        self.listener.start()
        logger.info("listening as {} on {}:{} (spool {})", self.router.ae_title,
                    self.router.bind, self.router.port, self.spool.root)
        self._next_sweep = time.monotonic() + TMP_SWEEP_INTERVAL

    def step(self) -> Step:
        if time.monotonic() >= self._next_sweep:
            self._sweep_tmp()
            self._next_sweep = time.monotonic() + TMP_SWEEP_INTERVAL
        return Step(wait=max(self._next_sweep - time.monotonic(), 0.0), idle=True)

    def wait(self, seconds: float) -> None:
        self._wake.wait(seconds)
        self._wake.clear()

    def request_stop(self) -> None:
        """From the signal thread (:class:`pipeline.daemon.Signals`) or a test."""
        self.stopping = True
        self._wake.set()

    def close(self) -> None:
        """Stop accepting, let established associations finish (bounded), then close."""
        logger.info("stopping: no new associations; {} in flight", self.listener.in_flight())
        self.listener.close(SHUTDOWN_GRACE)
        logger.info("stopped ({} stored, {} refused)", self.stored, self.refused)

    # -- what the listener hears ----------------------------------------------

    def on_established(self, info: AssociationInfo) -> None:
        calling = info.calling
        logger.debug("association from {} ({}:{})", escape(calling.ae_title),
                     escape(calling.address), calling.port)

    def on_rejected(self, info: AssociationInfo) -> None:
        logger.warning("association from {} calling {!s} at {} rejected",
                       escape(info.calling.ae_title), escape(info.called_ae),
                       escape(info.calling.address))

    def on_store(self, request: StoreRequest) -> int | Refusal:
        """Publish the received file durably, then (and only then) answer success."""
        started = time.monotonic()
        uid = request.sop_instance_uid
        calling = request.calling_ae
        path = request.dataset_path
        if not is_valid_uid(uid) or not is_valid_uid(request.sop_class_uid):
            self.refused += 1
            logger.warning("refused store from {}: invalid SOP Instance/Class UID {!s}",
                           escape(calling), escape(uid))
            return STATUS_CANNOT_UNDERSTAND
        if path is None:
            logger.error("store from {}: no dataset on disk", escape(calling))
            return STATUS_CANNOT_UNDERSTAND
        if not self._enough_space():
            self.refused += 1
            return STATUS_OUT_OF_RESOURCES
        refusal = self._unroutable(path, request)
        if refusal is not None:
            self.refused += 1
            logger.warning("refused store of {} from {}: {}", escape(uid), escape(calling),
                           refusal.comment)
            return refusal
        try:
            if pad_deflated(path, request.transfer_syntax):
                logger.debug("{}: odd-length deflated data set padded to even length", escape(uid))
            if not request.ae_titles_written:
                stamp_ae_titles(path, calling, request.called_ae)
            target = self.spool.publish_new(path, self.spool.incoming, uid)
        except OSError as exc:
            self.refused += 1
            logger.error("cannot store {} from {}: {}", escape(uid), escape(calling),
                         escape(exc.strerror or exc))
            return STATUS_OUT_OF_RESOURCES
        except Exception as exc:  # never let a handler exception become 0xC211
            self.refused += 1
            logger.exception("cannot store {} from {}: {}", escape(uid), escape(calling), escape(exc))
            return STATUS_OUT_OF_RESOURCES
        self.stored += 1
        logger.bind(file=target.name).info("stored from {}", escape(calling))
        self._journal_received(request, target, time.monotonic() - started)
        return STATUS_SUCCESS

    def _journal_received(self, request: StoreRequest, target: Path, duration: float) -> None:
        """The ``received`` event (queued: the journal never delays the answer);
        ``duration``: from the data set received to durable (``/metrics``' store
        duration)."""
        peer = request.association.calling
        try:
            size = os.stat(target).st_size
        except OSError:
            size = None
        self.journal.record(RECEIVED, uid=request.sop_instance_uid, file=target.name,
                            calling=peer.ae_title, called=request.called_ae,
                            peer=f"{peer.address}:{peer.port}",
                            sop_class=request.sop_class_uid, syntax=request.transfer_syntax,
                            size=size, association=request.association.association_id,
                            duration=round(duration, 6))

    def _unroutable(self, path: Path, request: StoreRequest) -> Refusal | None:
        """Why the received data set cannot be routed (and must not be acknowledged).

        The filter would quarantine it: answering success would let the modality delete
        its only copy. Only cheap, seek-only checks (see :mod:`pipeline.intake`).
        """
        uid = request.sop_instance_uid
        command = Command(request.sop_class_uid, uid, request.transfer_syntax)
        try:
            check_received(path, command, self.router.header_limits)
        except Refusal as refusal:
            return refusal
        except OSError as exc:
            return Refusal(STATUS_OUT_OF_RESOURCES, f"cannot read the received data set: "
                                                    f"{escape(exc.strerror or exc, 40)}")
        except Exception:  # a bug in a check must not refuse (or 0xC211) a good file
            logger.exception("cannot check the data set of {}; the filter will", escape(uid))
        return None

    def _enough_space(self) -> bool:
        """Keep the disk floor: prune ``sent/`` oldest-first, else refuse (0xA700)."""
        floor = self.router.disk_floor(self.spool.total_bytes())
        if self.spool.free_bytes() >= floor:
            return True
        pruned = self.spool.prune_sent(until_free=floor,
                                       on_delete=self.journal.deleted_from_sent("disk floor"))
        if pruned:
            logger.warning("disk floor reached: pruned {} delivered file(s) from sent/", pruned)
        if self.spool.free_bytes() >= floor:
            return True
        logger.error("refusing store: free space in {} below the floor of {} bytes",
                     self.spool.root, floor)
        return False

    def _sweep_tmp(self) -> None:
        """Remove temp files of transfers that died (aborted, ENOSPC) long ago — this
        process's, a sibling's that died, or those of a process index no longer
        configured: by age only, so a sibling's transfer in flight is never touched."""
        age = max(300.0, 2 * self.router.network_timeout)
        removed = self.spool.sweep_tmp(self.spool.incoming, older_than=age)
        if removed:
            logger.info("removed {} abandoned temp file(s)", removed)


def process_index(config: Config, process: int | None) -> int | None:
    """The index this receive process runs as: None when it is the only one.

    With ``receive_processes`` > 1 every process needs ``--process K`` (1..N): its lock,
    temp folder and log name come from it, and two processes with one index would
    share them. A ConfigError naming the key otherwise."""
    count = config.router.receive_processes
    if count == 1 and process in (None, 1):
        return None
    if process is None or not 1 <= process <= count:
        given = "no --process" if process is None else f"--process {process}"
        raise ConfigError(str(config.router.conf_file), "router", "receive_processes",
                          f"is {count}: each receive process needs --process 1..{count} "
                          f"({given} given)")
    return process


def main(config: Config, process: int | None = None) -> int:
    router = config.router
    index = process_index(config, process)
    name = process_name("receive", index)
    logmod.setup_daemon(name, router)
    patches.install("receive")
    spool = Spool(router.spool).create(config.endpoints)
    with DaemonLock(spool.run_dir, name):
        if index is None:
            removed = spool.clean_tmp(spool.incoming)
            tmp_dir = spool.tmp_dir(spool.incoming)
        else:
            # Our own folder only: the siblings' transfers are in flight in theirs.
            tmp_dir = spool.process_tmp_dir(spool.incoming, name)
            removed = spool.clean_tmp(spool.incoming, process=name)
            logger.info("receive process {} of {} (port shared with SO_REUSEPORT)",
                        index, router.receive_processes)
        spool.clean_dead_tmp(spool.run_dir)
        if removed:
            logger.info("removed {} stale temp file(s) from {}", removed,
                        tmp_dir.relative_to(spool.root))
        scp.configure(tmp_dir)
        journal = for_daemon(spool.run_dir, name, router.journal, router.journal_phi)
        receiver = Receiver(config, spool, journal)
        try:
            with Signals(receiver.request_stop):
                return run(receiver)
        except OSError as exc:
            logger.error("cannot listen on {}:{}: {}", router.bind, router.port, exc.strerror or exc)
            return 1
        finally:
            journal.close()
