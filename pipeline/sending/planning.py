"""Which files go out together: one association covers ≤128 presentation contexts
and one calling AE title; the association in use is kept while it covers the next
files (README, How it works). A file that cannot be read or proposed goes to
``failed/`` alone, so it never blocks the queue. A released study (a study list,
:mod:`pipeline.sending.studies`) goes out on an association of its own, negotiated for
all of its files in the outbox, so that the study is not split over associations.

Mixed into :class:`services.send.Sender`, whose ``__init__`` sets the state
(declared in :mod:`pipeline.sending.state`).
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from pipeline import log as logsetup
from pipeline.dicom import scu as net
from pipeline.dicom.filemeta import FileMeta, read_file_meta
from pipeline.errors import PermanentError
from pipeline.log import escape
from pipeline.names import is_valid_ae_title
from pipeline.sending.state import SenderState
from pipeline.shaping import provenance
from pipeline.spool import fresh_name_like

BATCH_LIMIT = 1000           # files planned per association round (bounds each rescan)


@dataclass
class Current:
    """The association in use and what it was negotiated for."""

    link: net.Link
    calling_ae: str
    pairs: frozenset[tuple[str, str]]
    study: str | None = None   # the study list it carries (then nothing else), or None

    @property
    def alive(self) -> bool:
        return self.link.alive


@dataclass
class Plan:
    """The next batch: the leading due files that share one association."""

    calling: str
    batch: list[tuple[Path, FileMeta]]
    pairs: frozenset[tuple[str, str]]   # what to propose, if a new association is needed
    study: str | None                   # the study list the batch belongs to, or None


class PlanningMixin(SenderState):
    """Association planning, and each file's meta (cached) that planning needs."""

    def _associate(self, calling_ae: str, pairs: frozenset[tuple[str, str]],
                   study: str | None = None) -> Current | None:
        link = net.associate(self.ep, calling_ae, pairs, fallback=self.ep.transcode)
        if isinstance(link, net.AssociationFailure):
            self._mark_down(link.reason)
            return None
        if link.established:
            self.associations += 1
            self.log.info("association established ({} contexts proposed, {} accepted, calling {})",
                          link.proposed, link.accepted, escape(calling_ae))
        return Current(link, calling_ae, pairs, study)  # else answered: the files are refused

    def _calling_ae(self, meta: FileMeta) -> str:
        if self.ep.pass_calling_ae_title and meta.source_ae and is_valid_ae_title(meta.source_ae):
            return meta.source_ae.strip()
        return self.ep.calling_ae_title

    def _plan(self, due: list[Path]) -> Plan:
        """The leading files that fit one association: the current one if it covers them,
        else a new one with ≤128 contexts and one calling AE title. Files of one study
        list never share a batch with other files; a study's new association is proposed
        for every file of it in the outbox (not only the due ones), so it goes over one."""
        batch: list[tuple[Path, FileMeta]] = []
        calling: str | None = None
        study: str | None = None
        pairs: set[tuple[str, str]] = set()
        current = self.current if self.current and self.current.alive else None
        for path in due[:BATCH_LIMIT]:
            meta = self._meta(path)
            if meta is None:
                continue
            ae = self._calling_ae(meta)
            pair = (str(meta.sop_class), str(meta.transfer_syntax))
            if not self._proposable(path, meta, pair):
                continue
            group = self.studies.of(path.name)
            if calling is None:
                calling, study = ae, group
                if current and (ae != current.calling_ae or pair not in current.pairs
                                or group != current.study):
                    current = None
                if current is None and group is not None:
                    pairs = self._study_pairs(group, ae)
            if ae != calling or group != study:
                break
            if current:
                if pair not in current.pairs:
                    break
            elif pair not in pairs:
                if net.context_count(pairs | {pair}, self.ep.transcode) > net.MAX_CONTEXTS:
                    break
                pairs.add(pair)
            batch.append((path, meta))
        if current is None and self.current is not None:
            self.release()
        proposed = frozenset(pairs) if current is None else current.pairs
        return Plan(calling or self.ep.calling_ae_title, batch, proposed, study)

    def _study_pairs(self, study: str, calling: str) -> set[tuple[str, str]]:
        """The contexts for every file of the study list ``study`` in the outbox (with
        this calling AE title) — or none, if they need more than one association can
        have: then the study is split, batch by batch, and one line says so."""
        pairs: set[tuple[str, str]] = set()
        for path in self.studies.members.get(study, []):
            meta = self._meta(path)
            if meta is None or self._calling_ae(meta) != calling:
                continue
            pair = (str(meta.sop_class), str(meta.transfer_syntax))
            if self._proposable(path, meta, pair):
                pairs.add(pair)
        needed = net.context_count(pairs, self.ep.transcode)
        if needed <= net.MAX_CONTEXTS:
            return pairs
        if study not in self.studies.split_said:
            self.studies.split_said.add(study)
            self.log.info("study list {} needs {} presentation contexts, more than the {} of one "
                          "association: it goes over several", study, needed, net.MAX_CONTEXTS)
        return set()

    def _meta(self, path: Path) -> FileMeta | None:
        """The file's meta (cached); an unreadable file goes to failed/ at once so it
        never blocks the queue. None for files to skip."""
        cached = self.metas.get(path.name)
        if cached is not None:
            return cached
        try:
            st = os.lstat(path)
            if not stat.S_ISREG(st.st_mode):
                return None
            meta = read_file_meta(path, st.st_size)
        except FileNotFoundError:
            return None
        except PermanentError as exc:
            self._fail(path, None, str(exc), self._file_log(path))
            return None
        except OSError as exc:  # unreadable (permissions, I/O error): the file, not the sender
            self._fail(path, None, f"cannot read the file: {exc.strerror or exc}",
                       self._file_log(path))
            return None
        if self.ep.shapes and meta.shaped_for != self.name:
            self._hand_back(path, f"not shaped for {self.name} (a retried or hand-moved original?)")
            return None
        if self.ep.deidentify is not None and not provenance.says_identity_removed(path):
            self._hand_back(path, "it does not say Patient Identity Removed = YES")
            return None
        self.metas[path.name] = meta
        return meta

    def _hand_back(self, path: Path, why: str) -> None:
        """A shaping endpoint sends only the copies the filter shaped for it (and a
        de-identifying one only those that say Patient Identity Removed = YES): anything
        else (a retried or hand-moved original, another endpoint's copy) goes back to the
        filter through ``accepted/<endpoint>/``, to be shaped for this endpoint alone."""
        log = self._file_log(path)
        folder = self.spool.handback(self.name)
        try:
            try:
                self.spool.move(path, folder)
            except FileExistsError:  # another file of that name is waiting there
                self.spool.move(path, folder, fresh_name_like(path.name))
        except FileNotFoundError:
            return
        except OSError as exc:
            log.warning(f"{why}, cannot hand it back to the filter ({exc.strerror or exc}): it "
                        f"stays in the outbox")
            return
        log.info(f"{why}: handed back to the filter (accepted/{self.name}/), which shapes it")

    def _file_log(self, path: Path):
        """The logger for one file: a standard name as is, a hand-made one hidden at
        INFO (export tools put patient names in file names)."""
        return self.log.bind(file=logsetup.shown_name(path.name))

    def _proposable(self, path: Path, meta: FileMeta, pair: tuple[str, str]) -> bool:
        """Can this file's (SOP class, transfer syntax) go into a presentation context?
        A file the network layer refuses would otherwise break the whole association, on every
        start: it goes to failed/ alone."""
        if pair in self.good_pairs:
            return True
        problem = net.proposal_problem(pair)
        if problem is not None:
            self._fail(path, meta, f"cannot propose a presentation context for it: {problem}",
                       self._file_log(path))
            return False
        self.good_pairs.add(pair)
        return True
